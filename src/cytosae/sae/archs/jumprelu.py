"""jumprelu: latents pass where the pre-activation exceeds a learned per-latent threshold; L0 penalty trained
through a rectangle-kernel straight-through estimator (Rajamanoharan et al. 2024)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..kernels import JumpReLUFn, StepFn
from ..model import SAE, SAEOutput
from ..options import NonNegative, Positive, TokenDeadOptions
from . import register


class JumpReLUOptions(TokenDeadOptions):
    lr: Positive = 7e-5
    l0_coeff: NonNegative = 1e-3
    jumprelu_bandwidth: Positive = 1e-3  # rectangle-kernel width of the straight-through estimator
    jumprelu_init_threshold: Positive = 1e-3


@register
class JumpReLUSAE(SAE):
    arch = "jumprelu"
    Options = JumpReLUOptions

    def _init_state(self) -> None:
        self.log_threshold = nn.Parameter(torch.full((self.cfg.n_latents,), math.log(self.cfg.jumprelu_init_threshold)))

    @classmethod
    def _state_shapes(cls, cfg) -> dict[str, tuple[int, ...]]:
        return {"threshold": (cfg.n_latents,)}

    def _state_tensors(self) -> dict[str, torch.Tensor]:
        return {"threshold": self.log_threshold.exp()}

    def _state_target(self, name: str, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if name == "threshold":  # saved as the threshold, trained as its log
            return self.log_threshold, value.clamp_min(1e-30).log()
        return super()._state_target(name, value)

    def _activate(self, pre: torch.Tensor) -> torch.Tensor:
        below = pre <= self.log_threshold.exp()
        return pre.masked_fill(below, 0.0) if pre.requires_grad else pre.masked_fill_(below, 0.0)

    def _forward_normalised(self, x: torch.Tensor, dead: torch.Tensor | None, momentum=None) -> SAEOutput:
        pre = self._pre(x)
        thr = self.log_threshold.exp()
        bw = self.cfg.jumprelu_bandwidth
        z = JumpReLUFn.apply(pre, thr, bw)
        x_hat = torch.addmm(self.b_dec, z, self.W_dec)
        mse = (x_hat - x).pow(2).sum(-1).mean()
        l0_term = self.cfg.l0_coeff * StepFn.apply(pre, thr, bw).sum(1).mean()
        with torch.no_grad():  # z >= 0: a latent fired iff its column maximum is > 0; no boolean (N, n) mask
            fired = z.amax(0) > 0
        return SAEOutput(recon=x_hat, loss=mse + l0_term, mse=mse.detach(), sparsity=l0_term.detach(),
                         aux=torch.zeros((), device=x.device), fvu=self._fvu(x, x_hat), fired=fired, _dense=z)
