"""One typed, validated configuration per step (pydantic): what the CLI's flags, a study file's sections and the
Python API all build, so that every way in refuses the same bad values up front, with one line naming the key.

Field names are the CLI's parameter names (`batch_size` = `--batch-size`): run.json records a step's settings
under them, and runs recorded before these classes existed read the same.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# Paths arrive as strings from TOML and as Path from typer: the one place strictness is relaxed.
PathArg = Annotated[Path, Field(strict=False)]
Positive = Annotated[int, Field(ge=1)]
NonNegative = Annotated[int, Field(ge=0)]

# cytosae.sae.archs.ARCHS, spelled out so reading settings needs no torch (tests/test_sae_schema.py compares them)
ARCHS = ("relu-l1", "topk", "batchtopk", "jumprelu", "matryoshka")
TRAIN_PRECISIONS = ("fp32", "bf16")  # cytosae.sae.trainer.PRECISIONS
EXTRACT_PRECISIONS = ("fp32", "bf16", "fp16")  # cytosae.backbones.backbone.PRECISIONS
LOGGERS = ("none", "jsonl", "tensorboard", "wandb")
TOKEN_POLICIES = ("cls", "any_patch", "mean")


class StepError(ValueError):
    """A step cannot run as configured, or its inputs are wrong: the message is one line saying what to do."""


def _one_of(choices: tuple[str, ...], sep: str = ", "):
    def check(value: str) -> str:
        if value not in choices:
            raise ValueError(f"must be one of {sep.join(choices)}")
        return value
    return check


def _comma_list(value: Any) -> Any:
    """`a,b` on the command line, ["a", "b"] in a study file; None = none."""
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return value


class StepSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class ExtractSettings(StepSettings):
    data: PathArg
    out: Optional[PathArg] = None
    name: Optional[str] = None
    backbone: str = "dinobloom-b"
    weights: Optional[PathArg] = None
    layer: int = -2
    patients: Optional[PathArg] = None
    resize: str = "squash"
    dtype: str = "float16"
    batch_size: Positive = 32
    shard_size: Positive = 512
    workers: Optional[NonNegative] = None
    device: str = "auto"
    precision: str = "fp32"
    max_minutes: Optional[Annotated[float, Field(ge=0)]] = None  # 0: stop after the first shard
    seed: int = 0
    max_pixels: NonNegative = 50_000_000
    max_aspect: Annotated[float, Field(ge=0)] = 20.0  # long side / short side; 0 = no limit
    stain: str = "none"
    stain_reference: Optional[PathArg] = None

    _resize = field_validator("resize")(_one_of(("squash", "pad", "crop"), " | "))
    _dtype = field_validator("dtype")(_one_of(("float16", "float32", "bfloat16"), " | "))
    _precision = field_validator("precision")(_one_of(EXTRACT_PRECISIONS))
    _stain = field_validator("stain")(_one_of(("none", "macenko", "reinhard"), " | "))

    @model_validator(mode="after")
    def _stain_needs_reference(self):
        if self.stain == "none" and self.stain_reference is not None:
            raise ValueError("--stain-reference needs --stain macenko or --stain reinhard")
        if self.stain != "none" and self.stain_reference is None:
            raise ValueError(f"--stain {self.stain} needs --stain-reference REF (an image with the colours to match)")
        return self


class TrainSettings(StepSettings):
    store: Optional[PathArg] = None
    out: Optional[PathArg] = None
    dataset: Optional[str] = None
    arch: str = "topk"
    expansion: Positive = 64
    tokens: str = "all"
    total_tokens: NonNegative = 0
    epochs: Positive = 1
    k: Positive = 32
    l1_coeff: Annotated[float, Field(ge=0)] = 8e-5
    lr: Optional[Annotated[float, Field(gt=0)]] = None
    batch_size: Positive = 4096
    shuffle: NonNegative = 262144
    checkpoint_every: Positive = 5_000_000
    seed: int = 0
    log: str = "jsonl"
    log_every: Positive = 50
    device: str = "auto"
    precision: str = "fp32"

    _arch = field_validator("arch")(_one_of(ARCHS, " | "))
    _tokens = field_validator("tokens")(_one_of(("all", "cls", "patch")))
    _log = field_validator("log")(_one_of(LOGGERS))
    _precision = field_validator("precision")(_one_of(TRAIN_PRECISIONS, "|"))

    def arch_options(self) -> dict:
        """The settings' options (k, l1_coeff) that the architecture takes, per its registry entry
        (cytosae.sae.archs.arch_options): train_sae gets only those."""
        from cytosae.sae.archs import arch_options

        own = arch_options(self.arch)
        return {name: getattr(self, name) for name in ("k", "l1_coeff") if name in own}


class OnRunSaeSettings(StepSettings):
    """A step that analyses one SAE of a run: `sae_name` (`--sae NAME`) picks an SAE of the run's sweep, whose
    inputs and outputs then default to its own folders (RUN/saes/NAME/stats, ...; `Run.for_sae`); None: the run's
    own SAE at sae/."""
    sae_name: Optional[str] = None


class SaeOnStoreSettings(OnRunSaeSettings):
    """What every step that encodes one store with the run's SAE names: which SAE, which store (or --dataset of
    the run), where its output goes, whether an unfinished SAE may be used, and the device."""
    sae_dir: Optional[PathArg] = None
    store: Optional[PathArg] = None
    out: Optional[PathArg] = None
    dataset: Optional[str] = None
    allow_unfinished: bool = False
    device: str = "auto"


class EvaluateSettings(SaeOnStoreSettings):
    max_images: Optional[Positive] = None
    spliced: bool = False  # also splice the SAE into the backbone (cytosae.analysis.spliced)
    weights: Optional[PathArg] = None  # the backbone's weights for --spliced (default: the run's)

    @model_validator(mode="after")
    def _weights_need_spliced(self):
        if self.weights is not None and not self.spliced:
            raise ValueError("--weights is the backbone's, for --spliced only; add --spliced")
        return self


class StatsSettings(OnRunSaeSettings):
    sae_dir: Optional[PathArg] = None
    stores: Optional[list[PathArg]] = None
    out: Optional[PathArg] = None
    k: Positive = 16
    label_column: str = "label"
    noisy_threshold: float = 0.1
    galleries: NonNegative = 12
    factors: list[str] = []
    allow_unfinished: bool = False
    device: str = "auto"
    labels: list[str] = []

    _lists = field_validator("factors", "labels", mode="before")(_comma_list)


class AlignSettings(SaeOnStoreSettings):
    label_column: str = "label"
    token_policy: str = "any_patch"
    seed: Optional[int] = None  # of the untrained SAE and the baselines; None: the run's training seed, else 0
    max_clusters: Positive = 512
    fit_tokens: Positive = 20_000
    max_cells: Positive = 500_000_000

    _policy = field_validator("token_policy")(_one_of(TOKEN_POLICIES, " | "))


class CompareSaesSettings(StepSettings):
    a: PathArg  # an SAE directory, or a run (its SAE, and its stats for the top-image overlap)
    b: PathArg
    out: Optional[PathArg] = None  # JSON of the figures
    candidates: Positive = 8  # c: B's most similar latents per latent of A that the assignment may choose from
    method: str = "auto"  # auto | dense | candidates (cytosae.analysis.stability)
    allow_unfinished: bool = False
    device: str = "auto"

    _method = field_validator("method")(_one_of(("auto", "dense", "candidates"), " | "))


class SweepSettings(StepSettings):
    """The sweep table of a run (cytosae.steps.sweep): which of its SAEs to compare, the primary one first."""
    primary: Optional[str] = None  # the SAE at RUN/sae; None: the run's recorded sweep
    saes: Optional[list[str]] = None  # the others, at RUN/saes/NAME; None: the run's recorded sweep

    @field_validator("saes", mode="before")
    @classmethod
    def _list(cls, value):
        return None if value is None else _comma_list(value)  # None (not given) is not "no other SAE"


class PatientsSettings(SaeOnStoreSettings):
    external: bool = False
    threshold: float = 0.0
    token_policy: str = "cls"
    target: str = "diagnosis"
    examples: NonNegative = 5

    _policy = field_validator("token_policy")(_one_of(TOKEN_POLICIES, " | "))


class DescribeSettings(OnRunSaeSettings):
    sae_dir: Optional[PathArg] = None
    stores: Optional[list[PathArg]] = None
    stats: Optional[PathArg] = None  # the stats folder (top_images.parquet); with a run: RUN/stats when present
    patients: Optional[PathArg] = None  # the patients folder (compare.parquet); with a run: RUN/patients when present
    out: Optional[PathArg] = None
    label_column: str = "label"
    max_nonzeros: Positive = 200_000_000  # non-zero image-level activations kept for the exact AP
    allow_unfinished: bool = False
    device: str = "auto"


class ClassifySettings(StepSettings):
    barcodes: Optional[PathArg] = None
    out: Optional[PathArg] = None
    target: str = "diagnosis"
    labels: list[str] = []
    level: str = "patient"
    store: Optional[PathArg] = None
    cell_type_column: Optional[str] = None
    proportion: Optional[str] = None
    external: Optional[PathArg] = None
    external_store: Optional[PathArg] = None
    sae: Optional[PathArg] = None
    mil: str = "auto"
    token_policy: Optional[str] = None
    mil_embedding: str = "cls"
    mil_repeats: Optional[Positive] = None
    mil_epochs: Positive = 100
    device: str = "cpu"
    folds: Annotated[int, Field(ge=2)] = 5
    repeats: Positive = 10
    positive: Optional[str] = None
    seed: int = 0

    _lists = field_validator("labels", mode="before")(_comma_list)
    _level = field_validator("level")(_one_of(("patient", "image"), " | "))
    _embedding = field_validator("mil_embedding")(_one_of(("cls", "mean_patch"), " | "))

    @field_validator("token_policy")
    @classmethod
    def _policy(cls, value):
        return None if value is None else _one_of(TOKEN_POLICIES, " | ")(value)

    @field_validator("mil")
    @classmethod
    def _mil(cls, value: str) -> str:
        if value not in ("auto", "none"):
            bad = [k.strip() for k in value.split(",") if k.strip() not in ("embedding", "concepts")]
            if bad or not value.strip():
                raise ValueError(f"{value!r}: unknown input {(bad or [''])[0]!r}; use auto, none, or a comma list "
                                 f"of embedding,concepts")
        return value

    def mil_kinds(self, have_store: bool, have_sae: bool) -> tuple[str, ...]:
        """The MIL inputs to train: `auto` takes what the given store and SAE allow."""
        if self.mil == "auto":
            return tuple(k for k, ok in (("embedding", have_store), ("concepts", have_store and have_sae)) if ok)
        if self.mil == "none":
            return ()
        kinds = tuple(k.strip() for k in self.mil.split(",") if k.strip())
        if not have_store or ("concepts" in kinds and not have_sae):
            raise StepError(f"--mil {self.mil}: MIL needs --store (and --sae for concepts)")
        return kinds


# ---------------------------------------------------------------- building one, with a one-line error


def build(cls: type[StepSettings], values: dict, where: str | None = None) -> StepSettings:
    """`cls(**values)`, or a StepError of one line: from the CLI (`where` None) naming the flag, from a study
    file naming `where` (e.g. "study.toml [sae]") and the key."""
    try:
        return cls(**values)
    except ValidationError as exc:
        raise StepError(describe(exc, cls, where)) from None


def describe(exc: ValidationError, cls: type[StepSettings], where: str | None) -> str:
    err = exc.errors()[0]
    key = ".".join(str(p) for p in err["loc"] if not isinstance(p, int))
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        return f"{where}: unknown key {key!r}; known: {', '.join(cls.model_fields)}"
    if not key:  # a rule between fields: its message names them
        return f"{where}: {msg}" if where else msg
    name = f"--{key.replace('_', '-')}" if where is None else key
    if err["type"] != "value_error":
        msg = msg.replace("Input should", "should")
    got = f", got {err['input']!r}" if "input" in err and not isinstance(err["input"], dict) else ""
    return f"{where + ': ' if where else ''}{name} {msg}{got}"
