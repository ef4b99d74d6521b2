"""SAEConfig: everything needed to rebuild an SAE (and train it), as a plain dataclass."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

FORMAT_VERSION = 1
ARCHS = ("relu-l1", "topk", "batchtopk", "jumprelu", "matryoshka")


@dataclass
class SAEConfig:
    arch: str
    d_in: int
    n_latents: int
    # sparsity
    k: int = 32                      # topk / batchtopk / matryoshka: active latents per token (mean for batch variants)
    l1_coeff: float = 8e-5           # relu-l1 (CytoSAE/PatchSAE value, see docs/sae.md)
    l0_coeff: float = 1e-3           # jumprelu
    jumprelu_bandwidth: float = 1e-3  # rectangle-kernel width of the straight-through estimator
    jumprelu_init_threshold: float = 1e-3
    aux_k: int | None = None         # AuxK latents; None -> d_in // 2 (Gao et al. 2024)
    aux_coeff: float = 1.0 / 32
    dead_tokens: int = 10_000_000    # topk family: a latent is dead after this many tokens without firing
    dead_feature_window: int = 64    # relu-l1 ghost grads: dead after this many steps without firing (CytoSAE: 64)
    use_ghost_grads: bool = True
    # batchtopk/matryoshka inference threshold: EMA of the smallest kept activation. None -> scales with the run:
    # an average over the last 5% of its steps, at most 100 (0.99); a fixed 0.99 kept a 147-step run's threshold
    # near its first batches' (held-out L0 18 for k=32). 0.99 where the run length is unknown.
    threshold_momentum: float | None = None
    matryoshka_prefixes: list[int] = field(default_factory=list)  # empty -> [n/64, n/16, n/4, n]
    # input normalisation: x_internal = x * input_scale; input_scale makes E||x||^2 = 1 over the first batches
    # None -> off for relu-l1 (CytoSAE trained on raw activations), on for the other architectures
    normalize_inputs: bool | None = None
    # optimisation
    lr: float = 4e-4
    lr_warmup_steps: int = 500       # at most this many warm-up steps ...
    lr_warmup_fraction: float = 0.05  # ... and at most this fraction of the run's steps (a short run is not all warm-up)
    lr_decay_steps: int = 0          # linear decay to 0 over the last N steps (0 = constant after warm-up)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    init_b_dec: str = "geometric_median"  # or "mean" or "zeros"
    init_batches: int = 4            # how many (re-chunked) batches are sampled for b_dec / input scale
    sparse_kernels: bool = True      # topk family: sparse decode + sparse encoder gradient (False = dense, for benchmarks)

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"SAEConfig.arch must be one of {ARCHS}, got {self.arch!r}")
        if self.d_in <= 0 or self.n_latents <= 0:
            raise ValueError(f"SAEConfig d_in and n_latents must be positive, got {self.d_in}, {self.n_latents}")
        if self.arch in ("topk", "batchtopk", "matryoshka") and not 0 < self.k <= self.n_latents:
            raise ValueError(f"SAEConfig.k must be in 1..n_latents={self.n_latents}, got {self.k}")
        self.adam_betas = tuple(self.adam_betas)
        if not 0.0 <= self.lr_warmup_fraction <= 1.0 or self.lr_warmup_steps < 0 or self.lr_decay_steps < 0:
            raise ValueError(f"SAEConfig: lr_warmup_fraction must be in [0, 1] and lr_warmup_steps, lr_decay_steps "
                             f">= 0, got {self.lr_warmup_fraction}, {self.lr_warmup_steps}, {self.lr_decay_steps}")
        if self.normalize_inputs is None:
            self.normalize_inputs = self.arch != "relu-l1"
        if self.arch == "matryoshka":
            if not self.matryoshka_prefixes:
                n = self.n_latents
                self.matryoshka_prefixes = sorted({max(1, n // 64), max(1, n // 16), max(1, n // 4), n})
            p = list(self.matryoshka_prefixes)
            if p != sorted(set(p)) or p[-1] != self.n_latents or p[0] < 1:
                raise ValueError(f"SAEConfig.matryoshka_prefixes must be increasing and end at n_latents="
                                 f"{self.n_latents}, got {p}")

    @property
    def aux_k_effective(self) -> int:
        return self.aux_k if self.aux_k is not None else max(1, self.d_in // 2)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["adam_betas"] = list(self.adam_betas)
        return d

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "SAEConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"{source}: unknown SAEConfig fields {unknown}; written by a newer cytosae? "
                             f"Known fields: {sorted(names)}")
        required = [f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        missing = [r for r in required if r not in d]
        if missing:
            raise ValueError(f"{source}: missing required SAEConfig fields {missing}")
        return cls(**d)
