"""The sweep step: the SAEs of a sweep side by side, to choose one (RUN/quality/sweep.json, sweep.parquet, figure).

A study whose [sae] section gives lists (`k = [16, 32]`) trains one SAE per combination: the primary one at
RUN/sae (what every other step uses), the others at RUN/saes/NAME, each evaluated (and aligned when the study
has [align]). This step reads what those steps wrote, one row per SAE, and marks the Pareto front: the SAEs no
other beats on both sparsity (L0, lower is better) and fidelity (FVU, lower) or class alignment (AP, higher).
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

from cytosae.run import Run
from cytosae.steps.analysis import AnalysisResult
from cytosae.steps.common import Warn, need, one_line, open_run, record
from cytosae.steps.config import StepError, SweepSettings
from cytosae.steps.evaluate import EVAL, SPLICED, read_eval, read_spliced

SWEPT = ("k", "expansion", "l1_coeff")  # the [sae] keys a study may give as lists
SWEEP_FILES = ("sweep.json", "sweep.parquet", "figures/sweep_pareto.png")  # what run_sweep writes in RUN/quality
COLUMNS = ["name", "primary", "dataset", "layer", "arch", "k", "expansion", "l1_coeff", "n_latents", "fvu_patch", "fvu_cls",
           "fvu_all", "l0", "dead_fraction", "mean_best_ap", "spliced_recovered", "pareto_fvu", "pareto_ap", "sae_dir",
           "store"]
DEFINITIONS = {
    "fvu_patch": "unexplained variance fraction of the patch tokens (eval.json patch.fvu); lower is better",
    "fvu_cls": "unexplained variance fraction of the CLS tokens (eval.json cls.fvu)",
    "l0": "mean number of latents firing per token, over all tokens (eval.json all.l0)",
    "dead_fraction": "fraction of latents that never fire on the evaluated tokens (eval.json all.dead_fraction)",
    "mean_best_ap": "the SAE's mean over classes of its best latent's average precision (cytosae align); "
                    "null when the study has no [align]",
    "spliced_recovered": "fraction of the label probe's accuracy the spliced SAE keeps (eval.spliced.json "
                         "downstream, first label column); null without [evaluate] spliced = true",
    "pareto_fvu": "no other SAE has both lower-or-equal L0 and lower-or-equal patch FVU (one strictly)",
    "pareto_ap": "no other SAE has both lower-or-equal L0 and higher-or-equal mean best AP (one strictly)",
}


def sae_folders(rd: Run, cfg: SweepSettings) -> dict[str, tuple[Path, Path, str]]:
    """name -> (SAE folder, its align folder, the train step that made it), the primary one first."""
    out = {cfg.primary: (rd.sae_dir, rd.sae_quality_dir(None), "train")}
    for name in cfg.saes:
        out[name] = (rd.sweep_sae_dir(name), rd.sae_quality_dir(name), f"train:{name}")
    return out


def _read(path: Path, step: str, reader=None) -> dict:
    """`path` through its writer's typed `reader` (a JSON object without one), as a one-line StepError."""
    from cytosae.store.format import read_json_object

    if not path.is_file():
        raise StepError(f"{path} not found: the sweep needs it; run the study again (its {step} step writes it)")
    with one_line():
        return reader(path) if reader else read_json_object(path, f"run the study again (its {step} step writes it)")


def _store_layer(rd: Run, ev: dict) -> int | None:
    """The block the SAE's store holds (a layer sweep's SAEs differ in it), from the store evaluate measured on."""
    store = rd.resolve(ev.get("store"))
    if store is None:
        return None
    layer = (_read(store / "manifest.json", "extract").get("settings") or {}).get("layer")
    return int(layer) if isinstance(layer, int) else None


def _alignment_ap(rd: Run, quality: Path, train_step: str) -> float | None:
    """The SAE's mean best AP from `cytosae align`, unless that alignment is older than the SAE (the primary's
    quality/ outlives a retraining when the study has dropped [align])."""
    import pandas as pd

    path = quality / "alignment.parquet"
    aligned = (rd.steps.get(train_step.replace("train", "align")) or {}).get("finished")
    if not path.is_file() or aligned is None or aligned < (rd.steps.get(train_step) or {}).get("finished", ""):
        return None
    table = pd.read_parquet(path)
    sae = table[table.method == "sae"]
    return float(sae.mean_best_ap.iloc[0]) if len(sae) else None


def _spliced_recovered(sae_dir: Path, step: str) -> float | None:
    if not (sae_dir / SPLICED).is_file():
        return None
    for entry in _read(sae_dir / SPLICED, step, read_spliced)["downstream"].values():
        rec = (entry.get("probe") or {}).get("recovered")
        if rec is not None:
            return float(rec)
    return None


def sae_row(rd: Run, name: str, folders: tuple[Path, Path, str], primary: bool) -> dict:
    """What the sweep table says of one SAE, from its config.json, eval.json, alignment and training record."""
    from cytosae.sae.model import read_config

    sae_dir, quality, train_step = folders
    evaluate = train_step.replace("train", "evaluate")
    config = _read(sae_dir / "config.json", train_step, lambda p: read_config(p.parent))
    ev = _read(sae_dir / EVAL, evaluate, read_eval)
    settings = _swept(rd, train_step)
    nan = float("nan")
    return {"name": name, "primary": primary, "arch": config.get("arch"), "k": settings.get("k"),
            "expansion": settings.get("expansion", config["n_latents"] // max(config.get("d_in", 1), 1)),
            "l1_coeff": settings.get("l1_coeff"), "n_latents": int(config["n_latents"]),
            "dataset": ev.get("dataset"), "layer": _store_layer(rd, ev),
            "fvu_patch": (ev.get("patch") or {}).get("fvu", nan), "fvu_cls": (ev.get("cls") or {}).get("fvu", nan),
            "fvu_all": ev["all"]["fvu"], "l0": ev["all"]["l0"], "dead_fraction": ev["all"]["dead_fraction"],
            "mean_best_ap": _alignment_ap(rd, quality, train_step),
            "spliced_recovered": _spliced_recovered(sae_dir, evaluate),
            "sae_dir": rd.portable(sae_dir), "store": ev.get("store")}


def pareto_front(x: list[float], y: list[float], maximize_y: bool = False) -> list[bool]:
    """Which points no other point dominates (x lower-or-equal and y better-or-equal, one strictly); a point with
    a missing value is never on the front."""
    sign = -1.0 if maximize_y else 1.0
    pts = [(a, sign * b) if _finite(a) and _finite(b) else None for a, b in zip(x, y)]

    def dominated(p) -> bool:
        return any(q is not None and q[0] <= p[0] and q[1] <= p[1] and q != p for q in pts)
    return [p is not None and not dominated(p) for p in pts]


def _finite(v) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v)


def run_sweep(cfg: SweepSettings, run: str | Path | Run | None = None, warn: Warn = None,
              step: str = "sweep") -> AnalysisResult:
    """One row per SAE of the run's sweep -> RUN/quality/sweep.json, sweep.parquet, figures/sweep_pareto.png."""
    import pandas as pd

    from cytosae.store.format import atomic_write_json, atomic_write_parquet

    started = time.time()
    rd = need(open_run(run), "--run RUN", "compare the run's SAEs")
    cfg = _recorded(cfg, rd)
    folders = sae_folders(rd, cfg)
    rows = [sae_row(rd, name, f, name == cfg.primary) for name, f in folders.items()]
    table = pd.DataFrame(rows)
    table["pareto_fvu"] = pareto_front(list(table.l0), list(table.fvu_patch.fillna(table.fvu_all)))
    table["pareto_ap"] = pareto_front(list(table.l0), list(table.mean_best_ap), maximize_y=True)
    table = table[COLUMNS]
    out = rd.quality_dir
    out.mkdir(parents=True, exist_ok=True)  # a study without [align] has written nothing there yet
    atomic_write_parquet(out / SWEEP_FILES[1], table)
    figure = sweep_figure(table, out / SWEEP_FILES[2])
    records = json.loads(table.to_json(orient="records"))  # NaN -> null, numpy scalars -> JSON
    atomic_write_json(out / SWEEP_FILES[0], {
        "primary": cfg.primary, "dataset": rows[0]["dataset"], "n_saes": len(rows), "saes": records,
        "pareto": {"fvu_vs_l0": [r["name"] for r in records if r["pareto_fvu"]],
                   "ap_vs_l0": [r["name"] for r in records if r["pareto_ap"]]},
        "figure": rd.portable(figure), "definitions": DEFINITIONS})
    rd.set_sweep(cfg.primary, {r["name"]: {"dir": r["sae_dir"], "store": r["store"],
                                           "settings": {**_swept(rd, folders[r["name"]][2]), "layer": r["layer"]}}
                               for r in rows})
    record(rd, step, cfg, started)
    return AnalysisResult(out, _lines(table, out, figure))


def _recorded(cfg: SweepSettings, rd: Run) -> SweepSettings:
    """The settings with what the command line left out taken from the sweep run.json records."""
    recorded = rd.sweep
    primary = cfg.primary or recorded.get("primary")
    if primary is None:
        raise StepError(f"{rd.path} records no sweep: give --primary NAME (the SAE at sae/) and --saes A,B (those "
                        f"at saes/), or run a study with [sae] lists")
    saes = cfg.saes if cfg.saes is not None else [n for n in recorded.get("saes") or {} if n != primary]
    return cfg.model_copy(update={"primary": primary, "saes": saes})


def _swept(rd: Run, train_step: str) -> dict:
    """The SAE's values of the sweepable keys, as its train step recorded them; k and l1_coeff only where its
    architecture takes them (a TopK SAE's l1_coeff is a default nothing read)."""
    from cytosae.sae.archs import arch_options

    settings = (rd.steps.get(train_step) or {}).get("settings") or {}
    own = arch_options(settings["arch"]) if "arch" in settings else set(SWEPT)
    return {k: settings[k] for k in SWEPT if k in settings and (k == "expansion" or k in own)}


def _lines(table, out: Path, figure: Path) -> list[str]:
    said = [f"sweep of {len(table)} SAEs (primary {table.name.iloc[0]} at sae/), each evaluated on its training "
            f"dataset; * = on the Pareto front of patch FVU vs L0:"]
    for r in table.itertuples():
        ap = "" if r.mean_best_ap is None or not _finite(r.mean_best_ap) else f"  align AP {r.mean_best_ap:.3f}"
        said.append(f"  {'*' if r.pareto_fvu else ' '} {r.name:<16} {r.n_latents:>7} latents  L0 {r.l0:8.2f}  "
                    f"FVU patch {r.fvu_patch:.4f} CLS {r.fvu_cls:.4f}  dead {r.dead_fraction:.1%}{ap}")
    said.append(f"table -> {out / 'sweep.parquet'}, {out / 'sweep.json'}; figure -> {figure}")
    return said


def sweep_figure(table, path: Path) -> Path:
    """Patch (and CLS) FVU vs L0, and mean best AP vs L0 when aligned; the Pareto front drawn as a step line."""
    from matplotlib.ticker import ScalarFormatter

    from cytosae.analysis.figures import plt, save_figure

    aligned = table.mean_best_ap.notna().any()
    fig, axes = plt.subplots(1, 2 if aligned else 1, figsize=(11 if aligned else 6, 4.6), squeeze=False)
    ax = axes[0][0]
    ax.scatter(table.l0, table.fvu_patch, label="patch tokens", zorder=3)
    ax.scatter(table.l0, table.fvu_cls, marker="^", alpha=0.6, label="CLS tokens", zorder=3)
    _front(ax, table, "fvu_patch", "pareto_fvu")
    ax.set_xlabel("L0 (latents firing per token)")
    ax.set_ylabel("FVU (unexplained variance fraction)")
    ax.set_title(f"{len(table)} SAEs on {table.dataset.iloc[0]}: fidelity vs sparsity")
    ax.legend(fontsize=8)
    if aligned:
        ax = axes[0][1]
        ax.scatter(table.l0, table.mean_best_ap, zorder=3)
        _front(ax, table, "mean_best_ap", "pareto_ap")
        ax.set_xlabel("L0 (latents firing per token)")
        ax.set_ylabel("mean over classes of the best latent's AP")
        ax.set_title("class alignment vs sparsity")
    for ax in axes[0]:
        if (table.l0 > 0).all():  # k sweeps are geometric: equal steps on a log axis
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_formatter(ScalarFormatter())
    if (table[["fvu_patch", "fvu_cls"]].fillna(1) > 0).all().all():  # CLS FVU can be orders above patch FVU
        axes[0][0].set_yscale("log")
    return save_figure(fig, path)


def _front(ax, table, y: str, flag: str) -> None:
    front = table[table[flag]].sort_values("l0")
    ax.plot(front.l0, front[y], "k--", linewidth=1, label="Pareto front", zorder=2)
    for r in table.itertuples():
        ax.annotate(r.name + (" (primary)" if r.primary else ""), (r.l0, getattr(r, y)), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
