"""Label alignment, sparse probing, spliced faithfulness and a k sweep on real cells: do an SAE's latents rank
each class's cells better than PCA, k-means or the same SAE untrained, on the same tokens, and which k to choose?

Data: --per-class real Acevedo cells of each of its 13 fine classes (seed 0; all of a class when it has fewer).
Pipeline, through the package's own study runner (`cytosae run`) in one run directory (--work): extract block -2
of --backbone (dinobloom-s; RANDOM weights unless --weights, since no pretrained weights are on the development
machines, so the figures measure the methods on random-ViT features, not DinoBloom's), a TopK sweep over --ks
(--expansion x d, --epochs over all tokens, seed 0), each SAE evaluated spliced into the backbone and aligned
(any_patch = max over patch tokens; the primary also with cls = the CLS token), the sweep table. Then the
alignment pass alone at --big-latents (default 49,152, DinoBloom-B's 64x) on the same cells: its time and peak
resident memory (VmHWM after a reset), the SAE trained one epoch first. Figures per method, means over the 13
classes: the best score's AP and AUROC (exact), Purity@16, Coverage@0.3, sparse probing (top-m scores, m = 1, 2,
5, 20; definitions in cytosae.analysis.alignment / probing and in each alignment.json).

    python bench/alignment.py [--per-class 50] [--ks 16,32,64] [--weights DINOBLOOM_S.pth] [--big-latents 0]
    python bench/alignment.py --dataset deepapl --per-class 100 --big-latents 0 --work /tmp/align-deepapl \
        --out bench/results/alignment-deepapl.json     # cell types, folds grouped by patient

Writes bench/results/alignment.json (or --out). About 25 min on one core for 650 cells.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd

from _report import SHARED_DATA, write_result

DATASETS = {"acevedo": "label", "deepapl": "cell_type"}  # each one's class column

REPO = Path(__file__).resolve().parents[1]


def _subset(dataset: str, per_class: int, work: Path) -> Path:
    """A manifest CSV of `per_class` cells per class (seed 0; 0 = every cell, unlabelled ones too), by absolute
    path."""
    root = SHARED_DATA / dataset
    table = pd.read_csv(root / "manifest.csv")
    if per_class:
        table = table.sample(frac=1.0, random_state=0).groupby(DATASETS[dataset]).head(per_class)
    picked = table.sort_values("path").assign(path=lambda t: [str(root / p) for p in t.path])
    csv = work / "data" / f"{dataset}.csv"
    csv.parent.mkdir(parents=True, exist_ok=True)
    picked.to_csv(csv, index=False)
    return csv


STUDY = """[run]
dir = "run"

[backbone]
name = "{backbone}"
{weights}batch_size = 32
seed = 0
device = "{device}"

[datasets.{dataset}]
data = "{csv}"

[sae]
arch = "topk"
expansion = {expansion}
k = [{ks}]
epochs = {epochs}
batch_size = 4096
seed = 0
log = "none"
device = "{device}"

[evaluate]
spliced = true
device = "{device}"

[align]
token_policy = "any_patch"
label_column = "{label}"
device = "{device}"

[stats]
enabled = false
"""


def _rounded(value):
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def _methods(alignment: dict) -> dict:
    return {r["method"]: _rounded({k: v for k, v in r.items() if k != "method"}) for r in alignment["table"]}


def _probing(alignment: dict) -> list[dict]:
    """The sparse-probing table, means over classes per method and m."""
    return _rounded(alignment["probing"]["table"])


def _sae_figures(run: Path, name: str, primary: bool) -> dict:
    folder = run / ("sae" if primary else f"saes/{name}")
    quality = run / ("quality" if primary else f"saes/{name}/quality")
    ev = json.loads((folder / "eval.json").read_text())
    spliced = json.loads((folder / "eval.spliced.json").read_text())
    alignment = json.loads((quality / "alignment.json").read_text())
    return {"name": name, "primary": primary, "k": json.loads((folder / "config.json").read_text())["k"],
            "l0": round(ev["all"]["l0"], 3), "fvu_patch": round(ev["patch"]["fvu"], 4),
            "fvu_cls": round(ev["cls"]["fvu"], 4), "dead_fraction": round(ev["all"]["dead_fraction"], 4),
            "spliced": _rounded({"output": spliced["output"], "downstream": spliced["downstream"]}),
            "alignment_any_patch": _methods(alignment), "probing_any_patch": _probing(alignment)}


def _big_alignment(args, run: Path, seconds: dict) -> dict:
    """The alignment pass alone at args.big_latents latents: time and peak resident memory."""
    from _report import peak_rss_gib, reset_peak_rss

    from cytosae.steps import AlignSettings, TrainSettings, run_align, run_train

    store = run / "stores" / args.dataset
    d = json.loads((store / "manifest.json").read_text())["d_model"]
    expansion = max(1, args.big_latents // d)
    big = args.work / "big"
    t = time.time()
    run_train(TrainSettings(store=store, out=big / "sae", arch="topk", expansion=expansion, k=32, epochs=1,
                            batch_size=4096, seed=0, log="none", device=args.device))
    seconds["train_big"] = round(time.time() - t, 1)
    before = reset_peak_rss()
    t = time.time()
    res = run_align(AlignSettings(sae_dir=big / "sae", store=store, out=big / "quality", device=args.device,
                                  label_column=DATASETS[args.dataset]))
    seconds["align_big"] = round(time.time() - t, 1)
    print("\n".join(res.lines()))
    alignment = json.loads((big / "quality" / "alignment.json").read_text())
    return {"n_latents": expansion * d, "k": 32, "epochs": 1, "seconds": seconds["align_big"],
            "rss_before_gib": None if before is None else round(before, 3), "peak_rss_gib": round(peak_rss_gib(), 3),
            "peak_is_of_align_alone": before is not None, "alignment_any_patch": _methods(alignment)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", choices=sorted(DATASETS), default="acevedo",
                    help="acevedo (13 classes) or deepapl (82 patients: cell_type classes, folds grouped by patient)")
    ap.add_argument("--per-class", type=int, default=50, help="cells per class (0: every cell)")
    ap.add_argument("--backbone", default="dinobloom-s")
    ap.add_argument("--weights", type=Path, default=None)
    ap.add_argument("--expansion", type=int, default=16)
    ap.add_argument("--ks", default="16,32,64", help="k of each SAE of the sweep (the first is the primary)")
    ap.add_argument("--big-latents", type=int, default=49_152, help="latents of the alignment pass timed alone "
                                                                      "(0: skip it)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--work", type=Path, default=Path("/tmp/cytosae-bench-alignment"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "alignment.json")
    args = ap.parse_args()
    if not (SHARED_DATA / args.dataset / "manifest.csv").is_file():
        raise SystemExit(f"real images not found at {SHARED_DATA / args.dataset}; this benchmark needs "
                         f"../shared/data/{args.dataset} (or CYTOSAE_SHARED_DATA)")
    from cytosae.steps import AlignSettings, run_align
    from cytosae.study import run_study

    args.work.mkdir(parents=True, exist_ok=True)
    csv = _subset(args.dataset, args.per_class, args.work)
    weights = f'weights = "{args.weights.resolve()}"\n' if args.weights else ""
    (args.work / "study.toml").write_text(STUDY.format(backbone=args.backbone, weights=weights, csv=csv,
                                                       device=args.device, expansion=args.expansion, ks=args.ks,
                                                       epochs=args.epochs, dataset=args.dataset,
                                                       label=DATASETS[args.dataset]))
    t = time.time()
    run_study(args.work / "study.toml")
    run = args.work / "run"
    steps = json.loads((run / "run.json").read_text())["steps"]
    seconds = {name: round(step.get("seconds", 0.0), 1) for name, step in steps.items()}
    seconds["study"] = round(time.time() - t, 1)
    sweep = json.loads((run / "quality" / "sweep.json").read_text())
    saes = [_sae_figures(run, r["name"], r["name"] == sweep["primary"]) for r in sweep["saes"]]
    t = time.time()
    cls = run_align(AlignSettings(token_policy="cls", out=run / "quality" / "cls", device=args.device,
                                  label_column=DATASETS[args.dataset]), run=run)
    print("\n".join(cls.lines()))
    seconds["align_cls_primary"] = round(time.time() - t, 1)
    cls_doc = json.loads((run / "quality" / "cls" / "alignment.json").read_text())
    big = _big_alignment(args, run, seconds) if args.big_latents else None
    summary = json.loads((run / "quality" / "alignment.json").read_text())
    write_result(args.out, {
        "what": f"label alignment (mean over classes of the best score's AP, AUROC, Purity@16, Coverage@0.3), sparse "
                f"probing, spliced faithfulness and a k sweep of TopK SAEs vs PCA, k-means and the untrained SAE, "
                f"on {summary['n_images']} real {args.dataset} cells ({summary['n_labelled']} labelled by "
                f"{DATASETS[args.dataset]}, {len(summary['classes'])} classes, "
                f"{f'up to {args.per_class} each' if args.per_class else 'every cell'}, seed 0), block -2 tokens of "
                f"{args.backbone} with "
                f"{'weights ' + args.weights.name if args.weights else 'RANDOM weights'}",
        "dataset": args.dataset, "n_images": summary["n_images"], "classes": summary["classes"],
        "backbone": args.backbone, "pretrained": args.weights is not None,
        "sae": {"arch": "topk", "expansion": args.expansion, "ks": [int(k) for k in args.ks.split(",")],
                "epochs": args.epochs, "d_in": summary["d_model"], "primary": sweep["primary"]},
        "sweep": {"saes": saes, "pareto": sweep["pareto"]},
        "primary_cls": {"alignment": _methods(cls_doc), "probing": _probing(cls_doc)},
        "big": big, "seconds": seconds, "probing_folds": summary["probing"]["folds"],
        "definitions": summary["definitions"], "probing_definitions": summary["probing"]["definitions"]})


if __name__ == "__main__":
    main()
