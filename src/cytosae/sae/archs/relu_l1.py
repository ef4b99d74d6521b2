"""relu-l1: the CytoSAE / HugoFry sae_training SAE: ReLU latents, L1 penalty, ghost gradients for dead latents."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..model import SAE, SAEOutput
from ..options import CommonOptions, NonNegative, PositiveInt
from . import register


class ReluL1Options(CommonOptions):
    normalize_inputs: bool = False      # CytoSAE trained on raw activations
    l1_coeff: NonNegative = 8e-5        # CytoSAE/PatchSAE value, see docs/sae.md
    dead_feature_window: PositiveInt = 64  # ghost grads: dead after this many steps without firing (CytoSAE: 64)
    use_ghost_grads: bool = True


@register
class ReluL1SAE(SAE):
    arch = "relu-l1"
    Options = ReluL1Options
    counts_dead_in_tokens = False  # CytoSAE counts steps since a latent last fired

    @property
    def dead_limit(self) -> int:
        return self.cfg.dead_feature_window

    def _init_encoder(self, w_dec: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        d, n = self.cfg.d_in, self.cfg.n_latents
        w_enc = torch.empty(d, n)
        w_enc.uniform_(-1.0 / math.sqrt(n), 1.0 / math.sqrt(n), generator=gen)
        return w_enc.mul_(math.sqrt(n / d))  # kaiming-uniform on fan_in = d_in

    def _activate(self, pre: torch.Tensor) -> torch.Tensor:
        return F.relu(pre, inplace=not pre.requires_grad)

    def _forward_normalised(self, x: torch.Tensor, dead: torch.Tensor | None, momentum=None) -> SAEOutput:
        # HugoFry sae_training / CytoSAE loss, term by term (docs/sae.md).
        pre = self._pre(x)
        z = F.relu(pre)
        x_hat = torch.addmm(self.b_dec, z, self.W_dec)
        x_norm = (x - x.mean(0, keepdim=True)).pow(2).sum(-1, keepdim=True).sqrt()
        mse_el = (x_hat - x).pow(2) / x_norm
        mse = mse_el.mean()
        # z >= 0: the L1 norm is a plain sum, and a latent fired in the batch iff its column sum is > 0; one pass
        # over the (N, n_latents) activations serves both (a boolean mask and its .sum() cost ~2 s a step at 64x)
        col_sums = z.sum(0)
        l1 = self.cfg.l1_coeff * col_sums.sum() / z.shape[0]
        aux = torch.zeros((), device=x.device)
        # the trainer passes a mask only when some latent may be dead; indexing by it needs its count anyway
        if self.cfg.use_ghost_grads and dead is not None and bool(dead.any()):
            aux = self._ghost_grads(x, x_hat, pre, dead, mse_el)
        fired = col_sums.detach() > 0
        return SAEOutput(recon=x_hat, loss=mse + l1 + aux, mse=mse.detach(), sparsity=l1.detach(), aux=aux.detach(),
                         fvu=self._fvu(x, x_hat), fired=fired, _dense=z)

    def _ghost_grads(self, x, x_hat, pre, dead, mse_el) -> torch.Tensor:
        resid = x - x_hat
        ghost_acts = torch.exp(pre[:, dead])
        ghost_out = ghost_acts @ self.W_dec[dead]
        scale = resid.norm(dim=-1) / (1e-6 + ghost_out.norm(dim=-1) * 2)
        ghost_out = ghost_out * scale[:, None].detach()
        r = resid.detach()
        ghost_el = (ghost_out - r).pow(2) / r.pow(2).sum(-1, keepdim=True).sqrt()
        ghost_el = (mse_el / (ghost_el + 1e-6)).detach() * ghost_el
        return ghost_el.mean()
