"""topk: each token keeps its k largest pre-activations (Gao et al. 2024), AuxK loss on dead latents.

Also the base of batchtopk and matryoshka: they change which (token, latent) pairs are kept (`_select`), the
reconstruction term (`_mse`) and what a step updates besides the weights (`_after_forward`)."""
from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field

from ..kernels import SparseEncoderGather, sparse_decode, topk_rows
from ..model import SAE, SAEOutput, _host_branch
from ..options import ConfigError, NonNegative, PositiveInt, TokenDeadOptions
from . import register


class TopKOptions(TokenDeadOptions):
    k: PositiveInt = 32                  # active latents per token (the mean, for the batch variants)
    aux_k: PositiveInt | None = None     # AuxK latents; None -> d_in // 2 (Gao et al. 2024)
    aux_coeff: NonNegative = 1.0 / 32
    sparse_kernels: bool = True          # sparse decode + sparse encoder gradient (False = dense, for benchmarks)
    encoder_init_scale: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0  # W_enc starts as this x W_dec^T (docs/sae.md)


@register
class TopKSAE(SAE):
    arch = "topk"
    Options = TopKOptions

    @classmethod
    def resolve_options(cls, values: dict, d_in: int, n_latents: int) -> dict:
        if not 0 < values["k"] <= n_latents:
            raise ConfigError("k", f"must be in 1..n_latents={n_latents}, got {values['k']}")
        return values

    def _init_encoder(self, w_dec: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return w_dec.t() * self.cfg.encoder_init_scale  # Gao et al.: the decoder transpose, optionally scaled

    def _pairs(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, latent indices) each token keeps: its k largest pre-activations, rectified."""
        vals, idx = topk_rows(pre, self.cfg.k)
        return F.relu(vals), idx

    def _activate(self, pre: torch.Tensor) -> torch.Tensor:
        vals, idx = self._pairs(pre)
        return torch.zeros_like(pre).scatter_(1, idx, vals)

    def encode_sparse(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """One top-k of the pre-activations, no dense scatter: encode() is these pairs written into zeros."""
        self._check_input(x)
        return self._pairs(self._pre(x.float() * self.input_scale))

    def _select(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, cols) of the kept (token, latent) pairs, rows ascending."""
        idx = topk_rows(pre, self.cfg.k)[1]
        rows = torch.arange(pre.shape[0], device=pre.device).repeat_interleave(self.cfg.k)
        return rows, idx.flatten()

    def _mse(self, x: torch.Tensor, x_hat: torch.Tensor, vals: torch.Tensor, cols: torch.Tensor, recon_of):
        return (x_hat - x).pow(2).sum(-1).mean()

    def _after_forward(self, vals: torch.Tensor, active: torch.Tensor, momentum: float | None) -> None:
        """What a training step updates besides the weights (batchtopk: its inference threshold)."""

    def _forward_normalised(self, x: torch.Tensor, dead: torch.Tensor | None, momentum: float | None) -> SAEOutput:
        cfg, n_rows, n = self.cfg, x.shape[0], self.cfg.n_latents
        x_c = x - self.b_dec
        if cfg.sparse_kernels:
            with torch.no_grad():
                pre = torch.addmm(self.b_enc, x_c, self.W_enc)
                rows, cols = self._select(pre)
            vals = F.relu(SparseEncoderGather.apply(x_c.detach(), self.b_dec, self.W_enc, self.b_enc, rows, cols,
                                                     pre[rows, cols]))
            recon_of = lambda v: sparse_decode(rows, cols, v, self.W_dec, n_rows) + self.b_dec  # noqa: E731
            gather = lambda r, c: SparseEncoderGather.apply(x_c.detach(), self.b_dec, self.W_enc, self.b_enc, r, c,  # noqa: E731
                                                            pre[r, c])
        else:
            pre = torch.addmm(self.b_enc, x_c, self.W_enc)
            with torch.no_grad():
                rows, cols = self._select(pre)
            vals = F.relu(pre[rows, cols])

            def recon_of(v):
                z = torch.zeros(n_rows, n, dtype=v.dtype, device=v.device).index_put((rows, cols), v)
                return torch.addmm(self.b_dec, z, self.W_dec)
            gather = lambda r, c: pre[r, c]  # noqa: E731
        x_hat = recon_of(vals)
        mse = self._mse(x, x_hat, vals, cols, recon_of)
        active = vals > 0
        # counts, not `fired[cols[active]] = True`: boolean indexing would wait for the device every step
        fired = torch.zeros(n, dtype=torch.int32, device=x.device).index_add_(0, cols, active.int()) > 0
        aux = x.new_zeros(())
        if dead is not None and not _host_branch(x):
            aux = cfg.aux_coeff * torch.where(dead.any(), self._auxk(x, x_hat, pre, dead, gather), 0.0)
        elif dead is not None and bool(dead.any()):
            aux = cfg.aux_coeff * self._auxk(x, x_hat, pre, dead, gather)
        if self.training:
            self._after_forward(vals, active, momentum)
        return SAEOutput(recon=x_hat, loss=mse + aux, mse=mse.detach(), sparsity=x.new_zeros(()), aux=aux.detach(),
                         fvu=self._fvu(x, x_hat), _l0=active.sum().float().detach() / n_rows, fired=fired,
                         _sparse=(rows, cols, vals.detach(), n_rows, n))

    def _auxk(self, x, x_hat, pre, dead, gather) -> torch.Tensor:
        """Gao et al. AuxK: the top k_aux dead latents reconstruct the residual (normalised MSE).

        On a GPU k_aux does not depend on how many latents are dead (counting them would wait for the device): where
        fewer are dead, the picks beyond them are live latents, zeroed by the mask, so the sum is the same. The CPU
        picks among the dead columns alone (tests/test_sae_sync.py: both forms give the same step)."""
        k_aux = min(self.cfg.aux_k_effective, self.cfg.n_latents)
        with torch.no_grad():
            if _host_branch(x):  # only the dead columns, topk over them: no (N, n) masked copy, a smaller top-k
                dead_cols = dead.nonzero().squeeze(1)
                k_aux = min(k_aux, dead_cols.numel())
                cols = dead_cols[pre.index_select(1, dead_cols).topk(k_aux, dim=1).indices].flatten()
            else:
                cols = pre.masked_fill(~dead, float("-inf")).topk(k_aux, dim=1).indices.flatten()
            rows = torch.arange(x.shape[0], device=x.device).repeat_interleave(k_aux)
        v = F.relu(gather(rows, cols)) * dead[cols]
        e = (x - x_hat).detach()
        e_hat = sparse_decode(rows, cols, v, self.W_dec, x.shape[0])
        return (e_hat - e).pow(2).sum(-1).mean() / e.pow(2).sum(-1).mean().clamp_min(1e-12)
