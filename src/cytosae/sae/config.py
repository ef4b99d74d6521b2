"""SAEConfig: everything needed to rebuild an SAE (and train it), as a plain dataclass; its fields are config.json's.

The record is flat (one field per option of any architecture) so config.json keeps one layout for all of them.
Types, ranges and defaults belong to the architectures (sae/archs/*.py): a field left None takes the default of
the architecture that owns it, and every field is then checked against its owner's typed schema.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

FORMAT_VERSION = 2  # 2: config.json carries config_sha256, its own checksum
READABLE_VERSIONS = (1, 2)  # 1: SAEs saved before it, still loaded (their edits cannot be told)


@dataclass
class SAEConfig:
    arch: str
    d_in: int
    n_latents: int
    # sparsity (None: the owning architecture's default; see sae/archs/ and docs/sae.md)
    k: int | None = None                    # topk family: active latents per token (mean for batch variants)
    l1_coeff: float | None = None           # relu-l1
    l0_coeff: float | None = None           # jumprelu
    jumprelu_bandwidth: float | None = None  # rectangle-kernel width of the straight-through estimator
    jumprelu_init_threshold: float | None = None
    aux_k: int | None = None                # AuxK latents; None -> d_in // 2 (Gao et al. 2024)
    aux_coeff: float | None = None
    dead_tokens: int | None = None          # topk family, jumprelu: dead after this many tokens without firing
    dead_feature_window: int | None = None  # relu-l1 ghost grads: dead after this many steps without firing
    use_ghost_grads: bool | None = None
    threshold_momentum: float | None = None  # batchtopk/matryoshka inference threshold EMA; None scales with the run
    matryoshka_prefixes: list[int] = field(default_factory=list)  # empty -> [n/64, n/16, n/4, n]
    normalize_inputs: bool | None = None    # None -> off for relu-l1 (CytoSAE trained on raw activations), else on
    # optimisation
    lr: float | None = None
    lr_warmup_steps: int | None = None
    lr_warmup_fraction: float | None = None
    lr_decay_steps: int | None = None
    adam_betas: tuple[float, float] | None = None
    init_b_dec: str | None = None           # "geometric_median", "mean" or "zeros"
    init_batches: int | None = None
    sparse_kernels: bool | None = None      # topk family: sparse decode + encoder gradient (False: dense, benchmarks)
    encoder_init_scale: float | None = None  # topk family: W_enc starts as this x W_dec^T

    def __post_init__(self) -> None:
        from .archs import resolve_config  # the registry imports the model, which imports this module

        for name, value in resolve_config(self).items():
            setattr(self, name, value)

    @property
    def aux_k_effective(self) -> int:
        return self.aux_k if self.aux_k is not None else max(1, self.d_in // 2)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["adam_betas"] = list(self.adam_betas)
        return d

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "SAEConfig":
        """The config in `d` (config.json's fields); a bad field raises one line naming `source` and the field."""
        from .options import ConfigError

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
        try:
            return cls(**d)
        except ConfigError as exc:
            raise ValueError(f"{source}: field {exc.field!r} {exc.problem}; restore the file, or write the SAE "
                             f"again (rerun `cytosae train`, or sae.save())") from None


def __getattr__(name):  # ARCHS lived here before the registry; the registry imports this module, hence lazily
    if name == "ARCHS":
        from .archs import ARCHS
        return ARCHS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
