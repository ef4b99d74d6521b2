"""batchtopk: the batch keeps its k x N largest pre-activations (Bussmann et al. 2024); at inference a JumpReLU
with one threshold, the running estimate of the smallest activation training kept."""
from __future__ import annotations

import math
from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field

from ..kernels import batch_topk_flat
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
            flat_idx = (batch_topk_flat(pre, n_keep) if _host_branch(pre)
                        else pre.flatten().topk(n_keep).indices).sort().values
        else:
            flat_idx = (pre.flatten() > self.threshold).nonzero().squeeze(1)
        return flat_idx // n, flat_idx % n

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
