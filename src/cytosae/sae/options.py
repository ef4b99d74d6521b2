"""Typed schemas of an SAE's config.json: the options every architecture shares, training progress, checksums.

Each architecture declares its own options as a subclass of CommonOptions (sae/archs/*.py). Types are strict:
a config.json holding "k": "16" or "normalize_inputs": "no" is refused with one line naming the field, never
coerced (pydantic would otherwise turn "16" into 16 and "no" into False).
"""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

PositiveInt = Annotated[int, Field(ge=1)]
Count = Annotated[int, Field(ge=0)]
NonNegative = Annotated[float, Field(ge=0.0)]
Positive = Annotated[float, Field(gt=0.0)]


class ConfigError(ValueError):
    """One field of an SAE config is invalid. str() is one line; `field` and `problem` let callers name the file."""

    def __init__(self, field: str, problem: str, where: str = "SAEConfig") -> None:
        self.field, self.problem = field, problem
        super().__init__(f"{where}.{field} {problem}")


class Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False, validate_default=True)


class CommonOptions(Strict):
    """Options of every architecture: input normalisation and optimisation. An architecture may change a default."""
    # x_internal = x * input_scale; input_scale makes E||x||^2 = 1 over the first batches
    normalize_inputs: bool = True
    lr: Positive = 4e-4
    lr_warmup_steps: Count = 500       # at most this many warm-up steps ...
    lr_warmup_fraction: Annotated[float, Field(ge=0.0, le=1.0)] = 0.05  # ... and at most this fraction of the run
    lr_decay_steps: Count = 0          # linear decay to 0 over the last N steps (0 = constant after warm-up)
    adam_betas: tuple[Annotated[float, Field(ge=0.0, lt=1.0)], Annotated[float, Field(ge=0.0, lt=1.0)]] = (0.9, 0.999)
    init_b_dec: Literal["geometric_median", "mean", "zeros"] = "geometric_median"
    init_batches: PositiveInt = 4      # how many (re-chunked) batches are sampled for b_dec / input scale

    @field_validator("adam_betas", mode="before")
    @classmethod
    def _json_pair(cls, v):  # JSON has no tuples: config.json holds a list
        return tuple(v) if isinstance(v, list) else v


class TokenDeadOptions(CommonOptions):
    """Architectures whose dead-latent clock counts tokens (the trainer reads `dead_tokens`)."""
    dead_tokens: PositiveInt = 10_000_000  # a latent is dead after this many tokens without firing


class TrainingProgress(Strict):
    """config.json's `training` block: how far the run that saved the SAE got (written by Trainer.checkpoint)."""
    finished: bool
    step: Count
    total_steps: Count
    tokens_seen: Count
    total_tokens: PositiveInt
    data_ended: bool = False

    @model_validator(mode="after")
    def _consistent(self):
        if self.step > self.total_steps:
            raise ValueError(f"step: {self.step} is more than total_steps {self.total_steps}")
        if self.tokens_seen >= self.total_tokens and not self.finished:
            raise ValueError(f"finished: false although tokens_seen {self.tokens_seen:,} reaches total_tokens "
                             f"{self.total_tokens:,}")
        return self


class FileChecksum(Strict):
    size: Count
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


def validate(model: type[Strict], data: dict, where: str = "SAEConfig") -> Strict:
    """model(**data), or a ConfigError naming the first bad field (`where.field must be ..., got ...`)."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise _config_error(exc.errors()[0], where) from None


def _config_error(err: dict, where: str) -> ConfigError:
    loc = [str(p) for p in err.get("loc", ()) if p not in ("function-after", "function-before")]
    msg = err.get("msg", "is invalid")
    if err.get("type") == "value_error":  # a model validator's message: "field: problem"
        text = msg.removeprefix("Value error, ")
        head, _, rest = text.partition(": ")
        return ConfigError(".".join(loc + [head]), rest or text, where)
    field = loc[0] + "".join(f"[{p}]" for p in loc[1:]) if loc else "?"
    if err.get("type") == "missing":
        return ConfigError(field, "is missing", where)
    problem = ("must be " + msg[len("Input should be "):]) if msg.startswith("Input should be ") else msg
    return ConfigError(field, f"{problem}, got {err.get('input')!r}", where)
