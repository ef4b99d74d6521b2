"""The registry of SAE architectures: one class per file, registered under the name config.json's `arch` holds.

    ARCHS                      registered names, in registration order
    arch_class(name)           the SAE subclass (SAE(cfg) and SAE.load(dir) build it from cfg.arch)
    arch_options(name)         {option: default} of that architecture (its own options first, then the shared ones)

An architecture is a subclass of model.SAE with `arch` (its name) and `Options` (a typed schema, subclass of
options.CommonOptions) and its activation and loss; `register` checks that an option two architectures share
(k, dead_tokens, ...) has one type and one default, so a field of the flat SAEConfig has one owner.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import create_model

from ..options import CommonOptions, ConfigError, PositiveInt, Strict, validate

if TYPE_CHECKING:
    from ..model import SAE

_REGISTRY: dict[str, type["SAE"]] = {}
_SCHEMA: list = []  # the union schema of every registered option, built on first use


def register(cls: type["SAE"]) -> type["SAE"]:
    """Class decorator: make `cls` the SAE of architecture `cls.arch`."""
    if not cls.arch or cls.arch in _REGISTRY:
        raise ValueError(f"SAE architecture {cls.arch!r} is unnamed or registered twice")
    mine = cls.Options.model_fields
    for other in _REGISTRY.values():
        for name, f in other.Options.model_fields.items():
            if name in mine and name not in CommonOptions.model_fields and (
                    f.annotation != mine[name].annotation or f.default != mine[name].default
                    or f.metadata != mine[name].metadata):
                raise ValueError(f"option {name!r} of {cls.arch!r} differs from {other.arch!r}'s: "
                                 f"one option, one type and default")
    _REGISTRY[cls.arch] = cls
    _SCHEMA.clear()
    return cls


def arch_class(name: str) -> type["SAE"]:
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ConfigError("arch", f"must be one of {tuple(_REGISTRY)}, got {name!r}") from None


def arch_options(name: str) -> dict:
    """{option name: default} of architecture `name`: what `train_sae(..., **options)` and the CLI may set.
    Defaults that depend on the SAE's size are None (aux_k -> d_in // 2, matryoshka_prefixes [] -> n/64..n)."""
    opts = arch_class(name).Options.model_fields
    own = [n for n in opts if n not in CommonOptions.model_fields]
    return {n: opts[n].get_default(call_default_factory=True) for n in own + list(CommonOptions.model_fields)}


def _schema() -> type[Strict]:
    """One model with every field of SAEConfig, typed by the architecture that owns it."""
    if not _SCHEMA:
        fields = {"arch": (str, ...), "d_in": (PositiveInt, ...), "n_latents": (PositiveInt, ...)}
        for cls in _REGISTRY.values():
            for name, f in cls.Options.model_fields.items():
                fields.setdefault(name, (f.annotation, f))
        _SCHEMA.append(create_model("SAEConfigSchema", __base__=Strict, **fields))
    return _SCHEMA[0]


def resolve_config(cfg) -> dict:
    """Every field of `cfg` checked and filled: None takes the default of `cfg.arch` (for its own and the shared
    options) or of the architecture owning the option; then the architecture's own checks (k <= n_latents, ...)."""
    cls = arch_class(cfg.arch)
    given = {n: v for n, v in vars(cfg).items() if v is not None}
    if isinstance(given.get("adam_betas"), list):
        given["adam_betas"] = tuple(given["adam_betas"])
    if isinstance(given.get("matryoshka_prefixes"), tuple):
        given["matryoshka_prefixes"] = list(given["matryoshka_prefixes"])
    own = {n: given[n] for n in cls.Options.model_fields if n in given}
    values = validate(cls.Options, own).model_dump()
    values.update(validate(_schema(), {**given, **values}).model_dump(exclude=set(values)))
    # prefixes given to another architecture would be silently ignored (and a topk SAE reported as nested)
    if "matryoshka_prefixes" not in cls.Options.model_fields and values.get("matryoshka_prefixes"):
        raise ConfigError("matryoshka_prefixes", f"is an option of matryoshka SAEs, not of {cfg.arch!r} ones; "
                          f"leave it empty, got {values['matryoshka_prefixes']!r}")
    return cls.resolve_options(values, cfg.d_in, cfg.n_latents)


from . import relu_l1, topk, batchtopk, jumprelu, matryoshka  # noqa: E402,F401 - register, in this order

ARCHS: tuple[str, ...] = tuple(_REGISTRY)
