"""Attention MIL training time: one fit (as inside one CV fold) at the sizes of patient cohorts.

    python bench/mil.py [--device cpu] [--patients 100] [--cells 50,500] [--dims 384,6144]

Random per-cell inputs (speed does not depend on content; early stopping is switched off so every fit runs
--epochs epochs). d=384 is a DinoBloom-S embedding, d=6144 a 16x SAE's concept vector (mostly zeros).
Writes bench/results/mil.json.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from _report import write_result

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--patients", type=int, default=100)
    ap.add_argument("--cells", default="50,500")
    ap.add_argument("--dims", default="384,6144")
    ap.add_argument("--epochs", type=int, default=30)
    args = ap.parse_args()
    from cytosae.analysis.mil import Bags, MILConfig, fit_mil

    rows = []
    for d in map(int, args.dims.split(",")):
        for cells in map(int, args.cells.split(",")):
            g = torch.Generator().manual_seed(0)
            n = args.patients * cells
            x = torch.randn(n, d, generator=g)
            kind = "embedding"
            if d > 1000:  # concept vectors: non-negative, ~2% of latents active
                x = torch.relu(x) * (torch.rand(n, d, generator=g) < 0.04)
                kind = "concepts"
            bags = Bags(x, np.arange(0, n + 1, cells), [f"P{i:03d}" for i in range(args.patients)],
                        [str(i) for i in range(n)])
            y = np.array(["APL" if i % 3 == 0 else "AML" for i in range(args.patients)])
            cfg = MILConfig(max_epochs=args.epochs, patience=10 ** 6, device=args.device)
            t0 = time.perf_counter()
            fit_mil(bags, y, ["AML", "APL"], kind, cfg)
            s = time.perf_counter() - t0
            rows.append({"patients": args.patients, "cells_per_patient": cells, "d": d, "input": kind,
                         "epochs": args.epochs, "fit_s": round(s, 2), "s_per_epoch": round(s / args.epochs, 3)})
            print(rows[-1], flush=True)
    write_result(REPO / "bench" / "results" / "mil.json", {
        "what": "attention MIL (gated attention, one branch per class, hidden 64): seconds for one fit on "
                f"{args.patients} patients (80% train, 20% early-stopping validation), {args.epochs} epochs, "
                "random inputs, early stopping off",
        "device": args.device, "results": rows})


if __name__ == "__main__":
    main()
