"""batchtopk: the batch keeps its k x N largest pre-activations (Bussmann et al. 2024); at inference a JumpReLU
with one threshold, the running estimate of the smallest activation training kept."""
from __future__ import annotations

import math
from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field

from ..kernels import topk_rows
from ..model import SAE, _host_branch
from . import register
from .topk import TopKOptions, TopKSAE


class BatchTopKOptions(TopKOptions):
    # EMA momentum of the inference threshold. None -> scales with the run: an average over the last 5% of its
    # steps, at most 100 (0.99); a fixed 0.99 kept a 147-step run's threshold near its first batches' (held-out
    # L0 18 for k=32). 0.99 where the run length is unknown.
    threshold_momentum: Annotated[float, Field(ge=0.0, lt=1.0)] | None = None


@register
class BatchTopKSAE(TopKSAE):
    arch = "batchtopk"
    Options = BatchTopKOptions

    def _init_state(self) -> None:
        # running estimate of the smallest activation BatchTopK keeps: the inference (JumpReLU) threshold
        self.register_buffer("threshold", torch.zeros(()))

    @classmethod
    def _state_shapes(cls, cfg) -> dict[str, tuple[int, ...]]:
        return {"threshold": ()}

    def _state_tensors(self) -> dict[str, torch.Tensor]:
        return {"threshold": self.threshold}

    def _activate(self, pre: torch.Tensor) -> torch.Tensor:
        if self.training:  # top k*N over the batch
            flat = F.relu(pre).flatten()
            vals, idx = flat.topk(min(self.cfg.k * pre.shape[0], flat.numel()))
            return torch.zeros_like(flat).scatter_(0, idx, vals).view_as(pre)
        below = pre <= self.threshold
        return pre.masked_fill(below, 0.0) if pre.requires_grad else pre.masked_fill_(below, 0.0)

    def encode_sparse(self, x: torch.Tensor) -> None:
        """Inference is a threshold (a JumpReLU): the count per token varies, so encode() gives it densely."""
        return None

    def _select(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n_rows, n = pre.shape
        if self.training:
            n_keep = min(self.cfg.k * n_rows, pre.numel())
            flat_idx = (self._batch_topk_indices(pre, n_keep) if _host_branch(pre)
                        else pre.flatten().topk(n_keep).indices).sort().values
        else:
            flat_idx = (pre.flatten() > self.threshold).nonzero().squeeze(1)
        return flat_idx // n, flat_idx % n

    def _batch_topk_indices(self, pre: torch.Tensor, n_keep: int) -> torch.Tensor:
        """Flat indices of the n_keep largest pre-activations of the batch (exact).

        A top-k over all N x n_latents values (201 M at 64x, batch 4096) is ~70% of a step. Each token's share
        of the batch's top n_keep is k on average, so the winners are looked for among each token's top 4k
        candidates; t, the n_keep-th largest candidate, is at most the true threshold. A token whose 4k-th
        candidate still reaches t ("overflowing": real tokens of very large norm do) may have more winners, so
        all its values join the search; any other token's values beyond its candidates are below t, so the
        top n_keep of that union is the exact answer. Each overflowing token holds 4k of the N*k candidates
        reaching t, so at most a quarter of the tokens overflow: the search never exceeds a quarter of the
        batch's values plus the candidates."""
        n_rows, n = pre.shape
        per_row = min(n, 4 * self.cfg.k)
        if per_row * n_rows <= n_keep or per_row == n:
            return pre.flatten().topk(n_keep).indices
        cand_vals, cand_idx = topk_rows(pre, per_row)
        top_vals, top_pos = cand_vals.flatten().topk(n_keep)
        over = cand_vals[:, -1] >= top_vals[-1]
        if not bool(over.any()):
            rows = torch.div(top_pos, per_row, rounding_mode="floor")
            return rows * n + cand_idx.flatten()[top_pos]
        over_rows = over.nonzero().squeeze(1)
        rest = (~over).nonzero().squeeze(1)
        vals = torch.cat([cand_vals[rest].flatten(), pre[over_rows].flatten()])
        flat = torch.cat([(rest[:, None] * n + cand_idx[rest]).flatten(),
                          (over_rows[:, None] * n + torch.arange(n, device=pre.device)).flatten()])
        return flat[vals.topk(n_keep).indices]

    @torch.no_grad()
    def _after_forward(self, vals: torch.Tensor, active: torch.Tensor, momentum: float | None) -> None:
        if momentum is None:  # forward() without the trainer's run-scaled momentum
            momentum = 0.99 if self.cfg.threshold_momentum is None else self.cfg.threshold_momentum
        # written with where(): no host round trip per step
        kept_min = vals.detach().masked_fill(~active, float("inf")).min()
        m = torch.where(self.threshold > 0, momentum, 0.0)  # first batch: no zero bias
        updated = self.threshold * m + (1 - m) * kept_min
        self.threshold.copy_(torch.where(torch.isfinite(kept_min), updated, self.threshold))

    def to_jumprelu(self) -> SAE:
        """An equivalent JumpReLU SAE using the learned running threshold."""
        from ..config import SAEConfig

        d = self.cfg.to_dict()
        d.update(arch="jumprelu", matryoshka_prefixes=[])
        out = SAE(SAEConfig(**d))
        with torch.no_grad():
            for name in ("W_enc", "b_enc", "W_dec", "b_dec", "input_scale"):
                getattr(out, name).copy_(getattr(self, name))
            out.log_threshold.fill_(math.log(max(float(self.threshold), 1e-30)))
        return out.eval()
