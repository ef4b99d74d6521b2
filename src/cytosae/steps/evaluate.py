"""The evaluate step: reconstruction and sparsity of an SAE on a store (RUN/sae/eval.json in a run)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Optional

from pydantic import Field, model_validator

from cytosae.run import Run
from cytosae.steps.common import (Warn, analysis_batch, device, need, one_line, open_run, open_sae, open_store, record,
                                  run_dataset, warner)
from cytosae.steps.config import EvaluateSettings
from cytosae.store.format import Written

EVAL = "eval.json"  # in the run: RUN/sae/eval.json (+ SPLICED, spliced_path)
SPLICED = "eval.spliced.json"  # --spliced: what cytosae.analysis.spliced measured, beside eval.json
FIX = "rebuild it with `cytosae evaluate` (--run RUN: the same command)"
SPLICED_FIX = "rebuild it with `cytosae evaluate --spliced` (--run RUN: the same command)"

COLUMNS = ["tokens", "fvu", "explained_variance", "cosine_similarity", "l0", "dead_fraction", "dense_fraction",
           "shrinkage"]


@dataclass
class EvaluateResult:
    sae_dir: Path
    store: Path
    arch: str
    n_latents: int
    figures: dict  # what eval.json holds: per token group (all, cls, patch) the measured figures
    out: Optional[Path]
    spliced: Optional[dict] = None  # --spliced: what cytosae.analysis.spliced measured
    spliced_out: Optional[Path] = None
    dataset: Optional[str] = None
    spliced_lines: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"SAE {self.sae_dir} ({self.arch}, {self.n_latents} latents) measured on store {self.store}:",
               f"{'tokens':<8}" + "".join(f"{c:>20}" for c in COLUMNS)]
        for group in ("all", "cls", "patch"):
            if group in self.figures:
                out.append(f"{group:<8}" + "".join(f"{self.figures[group].get(c, float('nan')):>20.4g}"
                                                   for c in COLUMNS))
        out.append("fvu = unexplained variance fraction; dead = never fired on these tokens; dense = fires on >10% "
                   "of them" + (f"; JSON -> {self.out}" if self.out else ""))
        if self.spliced is not None:
            out += self.spliced_lines + ([f"spliced figures: JSON -> {self.spliced_out}"] if self.spliced_out else [])
        return out


def spliced_path(out: Path) -> Path:
    """Where --spliced writes its figures: next to evaluate's JSON (RUN/sae/eval.json -> RUN/sae/eval.spliced.json)."""
    return out.with_name(f"{out.stem}.spliced.json")


def _placed(cfg: EvaluateSettings, rd: Run | None) -> EvaluateSettings:
    if rd is not None:
        dataset = run_dataset(rd, cfg.dataset or rd.training_settings().get("dataset"))
        cfg = cfg.model_copy(update={"dataset": dataset, "sae_dir": cfg.sae_dir or rd.sae_dir,
                                     "store": cfg.store or rd.store_dir(dataset),
                                     "out": cfg.out or rd.sae_dir / EVAL})
    need(cfg.sae_dir, "SAE_DIR", "use the run's SAE")
    need(cfg.store, "STORE", "measure on the run's dataset")
    return cfg


def run_evaluate(cfg: EvaluateSettings, run: str | Path | Run | None = None, warn: Warn = None,
                 step: str = "evaluate") -> EvaluateResult:
    """Measure the SAE on the store for all, CLS and patch tokens; write the figures to cfg.out when given.
    `step`: the name run.json records it under (a sweep's other SAEs are `evaluate:NAME`)."""
    from cytosae.sae import evaluate_sae
    from cytosae.store.format import atomic_write_json

    started = time.time()
    rd = open_run(run, sae=cfg.sae_name)
    given, cfg = cfg, _placed(cfg, rd)
    dev = device(cfg.device)
    sae, st = open_sae(cfg.sae_dir, cfg.allow_unfinished, warn), open_store(cfg.store)
    res = evaluate_sae(sae.to(dev), st, max_images=cfg.max_images)
    res["sae_dir"], res["store"] = str(cfg.sae_dir), str(cfg.store)
    if rd is not None:  # a run can move: paths inside it are recorded relative to it
        res["sae_dir"], res["store"], res["dataset"] = rd.portable(cfg.sae_dir), rd.portable(cfg.store), cfg.dataset
    if cfg.out is not None:
        atomic_write_json(cfg.out, res)
    result = EvaluateResult(cfg.sae_dir, cfg.store, sae.cfg.arch, sae.cfg.n_latents, res, cfg.out, dataset=cfg.dataset)
    if cfg.spliced:  # which says the same of its own figures
        _spliced(cfg, rd, sae, st, dev, result, warn)
    else:
        _warn_fvu(res, f"{min(st.n_images, cfg.max_images or st.n_images)} images of {st.path.name}", warner(warn))
    if not cfg.spliced and cfg.out is not None:  # a spliced JSON from an earlier evaluate would pass for this one's
        spliced_path(cfg.out).unlink(missing_ok=True)
    record(rd, step, given, started, dataset=cfg.dataset)
    return result


def _warn_fvu(res: dict, on: str, say) -> None:
    from cytosae.sae.evaluate import fvu_warnings

    for line in fvu_warnings({g: res[g]["fvu"] for g in ("cls", "patch") if g in res}, on):
        say(line)


def _spliced(cfg: EvaluateSettings, rd: Run | None, sae, st, dev, result: EvaluateResult, warn: Warn) -> None:
    """The SAE spliced into the backbone the store was extracted with (cytosae.analysis.spliced)."""
    from cytosae.analysis.spliced import backbone_for_store, lines, spliced_faithfulness
    from cytosae.store.format import atomic_write_json

    spec = dict((rd.meta.get("backbone") or {}) if rd is not None else {})
    if rd is not None and spec.get("weights"):
        spec["weights"] = rd.resolve(spec["weights"])
    with one_line("--spliced: "):
        bb = backbone_for_store(st, spec, weights=cfg.weights, device=dev)
        figures = spliced_faithfulness(bb, st, sae=sae, max_images=cfg.max_images, batch=analysis_batch(dev),
                                       warn=warner(warn))
    figures["sae_dir"], figures["dataset"] = str(cfg.sae_dir), cfg.dataset
    if rd is not None:
        figures["sae_dir"], figures["store"] = rd.portable(cfg.sae_dir), rd.portable(cfg.store)
    result.spliced, result.spliced_lines = figures, lines(figures, cfg.dataset or str(cfg.store))
    if cfg.out is not None:
        result.spliced_out = spliced_path(cfg.out)
        atomic_write_json(result.spliced_out, figures)


# ---------------------------------------------------------------- eval.json as its readers read it
class GroupFigures(Written):
    """One token group's figures (sae.evaluate_sae); a group without tokens records only `tokens: 0`."""
    tokens: Annotated[int, Field(ge=0)]
    fvu: Optional[float] = None
    explained_variance: Optional[float] = None
    mse: Optional[float] = None
    cosine_similarity: Optional[float] = None
    l0: Optional[float] = None
    dead_fraction: Optional[float] = None
    dense_fraction: Optional[float] = None
    shrinkage: Optional[float] = None


class EvalFigures(Written):
    all: GroupFigures
    cls: Optional[GroupFigures] = None
    patch: Optional[GroupFigures] = None
    definitions: dict[str, str]
    sae_dir: Optional[str] = None
    store: Optional[str] = None
    dataset: Optional[str] = None


def read_eval(path: str | Path, shown: str | None = None) -> dict[str, Any]:
    """eval.json (a file, or the SAE folder holding it) checked against EvalFigures; InvalidFile naming the file
    (`shown`) and field otherwise."""
    from cytosae.store.format import read_json_model

    path = Path(path)
    return read_json_model(path / EVAL if path.is_dir() else path, EvalFigures, FIX, shown)


# ---------------------------------------------------------------- eval.spliced.json as its readers read it
class Closeness(Written):
    """One token group's final output against the clean one (analysis.spliced._Output); NaN where undefined."""
    cosine: float
    relative_l2: float


class GroupCloseness(Written):
    cls: Closeness
    patch: Closeness


class Accuracies(Written):
    """A classifier's cross-validated accuracy on the final CLS under each input, and the fraction recovered."""
    clean: Annotated[float, Field(ge=0, le=1)]
    spliced: Annotated[float, Field(ge=0, le=1)]
    control: Annotated[float, Field(ge=0, le=1)]
    recovered: Optional[float]


class Downstream(Written):
    """One label column: cross-validated (knn, probe, folds) or, where it could not be, why (skipped)."""
    n_images: Annotated[int, Field(ge=0)]
    n_classes: Annotated[int, Field(ge=0)]
    folds: Optional[str] = None
    knn: Optional[Accuracies] = None
    probe: Optional[Accuracies] = None
    skipped: Optional[str] = None

    @model_validator(mode="after")
    def _measured_or_skipped(self) -> "Downstream":
        if self.skipped is None and None in (self.folds, self.knn, self.probe):
            raise ValueError("folds: knn, probe and folds are recorded unless the column was skipped (with why)")
        return self


class GroupFvu(Written):
    cls: float  # NaN when the stored group has no variance
    patch: float


class Outputs(Written):
    spliced: GroupCloseness
    control: GroupCloseness


class SplicedBackbone(Written):
    name: str
    n_blocks: Annotated[int, Field(ge=1)]
    layer_index: Annotated[int, Field(ge=0)]
    remaining_blocks: list[Annotated[int, Field(ge=0)]]
    weights_sha256: Optional[str] = None
    random_weights_seed: Optional[int] = None


class SplicedFigures(Written):
    """eval.spliced.json (run_evaluate --spliced, from analysis.spliced.spliced_faithfulness)."""
    store: str
    n_images: Annotated[int, Field(ge=1)]
    backbone: SplicedBackbone
    fvu: GroupFvu
    output: Outputs
    downstream: dict[str, Downstream]
    definitions: dict[str, str]
    sae_dir: Optional[str] = None
    dataset: Optional[str] = None


def read_spliced(path: str | Path, shown: str | None = None) -> dict[str, Any]:
    """eval.spliced.json (a file, or the SAE folder holding it) checked against SplicedFigures; InvalidFile naming
    the file (`shown`) and field otherwise."""
    from cytosae.store.format import read_json_model

    path = Path(path)
    return read_json_model(path / SPLICED if path.is_dir() else path, SplicedFigures, SPLICED_FIX, shown)
