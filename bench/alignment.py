"""Label alignment on real cells: does an SAE's best latent per class rank that class's cells better than PCA,
k-means or the same SAE untrained, on the same tokens (cytosae.analysis.alignment, `cytosae align`)?

Data: --per-class real Acevedo cells of each of its 13 fine classes (seed 0; all of a class when it has fewer).
Pipeline, through the package's own steps in one run directory (--work): extract block -2 of --backbone
(dinobloom-s; RANDOM weights unless --weights, since no pretrained weights are on the development machines,
so the figures measure the methods on random-ViT features, not DinoBloom's), train a TopK SAE (--expansion x d,
k=--k, --epochs over all tokens, seed 0), then `align` once per token policy (any_patch = max over patch tokens,
cls = the CLS token). Figures per method, means over the 13 classes: the best score's AP and AUROC (exact),
Purity@16, Coverage@0.3 (definitions in cytosae.analysis.alignment and in each alignment.json).

    python bench/alignment.py [--per-class 50] [--weights DINOBLOOM_S.pth]

Writes bench/results/alignment.json (or --out). About 6 min on 2 shared cores for 650 cells, most of it extraction.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd

from _report import ACEVEDO, write_result

REPO = Path(__file__).resolve().parents[1]


def _subset(per_class: int, work: Path) -> Path:
    """A manifest CSV of `per_class` cells per class (seed 0), by absolute path."""
    table = pd.read_csv(ACEVEDO / "manifest.csv")
    picked = (table.sample(frac=1.0, random_state=0).groupby("label").head(per_class).sort_values("path")
              .assign(path=lambda t: [str(ACEVEDO / p) for p in t.path]))
    csv = work / "data" / "acevedo.csv"
    csv.parent.mkdir(parents=True, exist_ok=True)
    picked.to_csv(csv, index=False)
    return csv


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--per-class", type=int, default=50)
    ap.add_argument("--backbone", default="dinobloom-s")
    ap.add_argument("--weights", type=Path, default=None)
    ap.add_argument("--expansion", type=int, default=16)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--work", type=Path, default=Path("/tmp/cytosae-bench-alignment"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "alignment.json")
    args = ap.parse_args()
    if not (ACEVEDO / "manifest.csv").is_file():
        raise SystemExit(f"real images not found at {ACEVEDO}; this benchmark needs ../shared/data/acevedo "
                         f"(or CYTOSAE_SHARED_DATA)")
    from cytosae.steps import (AlignSettings, ExtractSettings, TrainSettings, run_align, run_extract, run_train)

    run = args.work / "run"
    csv = _subset(args.per_class, args.work)
    seconds = {}
    t = time.time()
    run_extract(ExtractSettings(data=csv, name="acevedo", backbone=args.backbone, weights=args.weights,
                                batch_size=32, device=args.device), run=run)
    seconds["extract"] = round(time.time() - t, 1)
    t = time.time()
    run_train(TrainSettings(arch="topk", expansion=args.expansion, k=args.k, epochs=args.epochs, batch_size=4096,
                            seed=0, log="none", device=args.device), run=run)
    seconds["train"] = round(time.time() - t, 1)
    policies = {}
    for policy in ("any_patch", "cls"):
        t = time.time()
        out = run / "quality" / policy
        res = run_align(AlignSettings(token_policy=policy, out=out, device=args.device), run=run)
        print("\n".join(res.lines()))
        summary = json.loads((out / "alignment.json").read_text())
        policies[policy] = {r["method"]: {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()
                                          if k != "method"} for r in summary["table"]}
        seconds[f"align_{policy}"] = round(time.time() - t, 1)
    sae_cfg = json.loads((run / "sae" / "config.json").read_text())
    write_result(args.out, {
        "what": f"label alignment (mean over classes of the best score's AP, AUROC, Purity@16, Coverage@0.3) of a "
                f"TopK SAE vs PCA, k-means and the untrained SAE, on {summary['n_images']} real Acevedo cells "
                f"({len(summary['classes'])} classes, up to {args.per_class} each, seed 0), block -2 tokens of "
                f"{args.backbone} with {'weights ' + args.weights.name if args.weights else 'RANDOM weights'}",
        "dataset": "acevedo", "n_images": summary["n_images"], "classes": summary["classes"],
        "backbone": args.backbone, "pretrained": args.weights is not None,
        "sae": {"arch": sae_cfg["arch"], "n_latents": sae_cfg["n_latents"], "k": sae_cfg["k"],
                "epochs": args.epochs, "d_in": sae_cfg["d_in"]},
        "by_token_policy": policies, "seconds": seconds,
        "definitions": summary["definitions"]})


if __name__ == "__main__":
    main()
