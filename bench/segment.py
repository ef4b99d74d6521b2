"""Cell regions (cytosae.analysis.segment) on real cells: time, per-class shares, a figure; and the synthetic IoU.

(a) Times segment_cell on --per-class Acevedo cells of each of the 13 classes (seed 0; 16 x 13 = 208 by
    default), each as the model sees it (Preprocess().resize_image: 224 x 224), one process, one thread:
    wall-clock ms and CPU ms of the process (the second is what a busy shared machine inflates least).
(b) Per Acevedo class, the mean share of the image in each region and the nucleus-to-cell ratio
    (nucleus px / cell px, cell = cytoplasm + nucleus + border): lymphocytes and erythroblasts should be
    mostly nucleus, neutrophils and monocytes much less, platelets (no nucleus; their granular centre
    reads as one) tiny cells. This is how the regions were checked on real data, with the figure.
(c) Draws docs/figures/segmentation.png: 8 Acevedo cells of different classes and 4 DeepAPL cells (2 APL,
    2 AML; seed 0), each image beside its regions.
(d) IoU per region against cytosae.data.synthetic.true_regions over the default synthetic sample (288 cells;
    runs without real data).

    python bench/segment.py [--per-class 16]

Writes bench/results/segment.json (or --out). Skips (a)-(c), saying so, when ../shared/data is absent.
About a minute on 2 shared cores.
"""
from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from _report import SHARED_DATA, write_result

REPO = Path(__file__).resolve().parents[1]
FIGURE_CLASSES = ("lymphocyte", "erythroblast", "neutrophil_segmented", "eosinophil", "monocyte", "basophil",
                  "promyelocyte", "platelet")
COLOURS = np.array([[0, 0, 0], [60, 170, 255], [230, 30, 60], [40, 220, 80]], dtype=float)  # REGIONS order


def model_input(path) -> np.ndarray:
    from cytosae.data import Preprocess, open_rgb

    return np.asarray(Preprocess().resize_image(open_rgb(path)))


def synthetic_iou() -> dict:
    from cytosae.analysis.segment import REGIONS, segment_cell
    from cytosae.data.synthetic import make_sample, true_regions

    inter, union = np.zeros(len(REGIONS)), np.zeros(len(REGIONS))
    with tempfile.TemporaryDirectory() as tmp:
        m = pd.read_csv(make_sample(tmp, seed=0))
        truth = true_regions(seed=0)
        for p in m.path:
            pred, true = segment_cell(model_input(Path(tmp) / p)), truth[p]
            for k in range(len(REGIONS)):
                inter[k] += ((pred == k) & (true == k)).sum()
                union[k] += ((pred == k) | (true == k)).sum()
    return {"n_cells": len(m), "iou": dict(zip(REGIONS, np.round(inter / union, 4).tolist()))}


def acevedo_shares(per_class: int) -> tuple[dict, dict]:
    from cytosae.analysis.segment import NUCLEUS, REGIONS, patch_regions, segment_cell

    m = pd.read_csv(SHARED_DATA / "acevedo" / "manifest.csv")
    m = pd.concat([g.sample(n=min(per_class, len(g)), random_state=0) for _, g in m.groupby("label")])
    rows, seg_s, cpu_s, patch_s = [], [], [], []
    for path, label in zip(m.path, m.label):
        rgb = model_input(SHARED_DATA / "acevedo" / path)
        t0, c0 = time.perf_counter(), time.process_time()
        labels = segment_cell(rgb)
        t1 = time.perf_counter()
        cpu_s.append(time.process_time() - c0)
        patch_regions(labels)
        seg_s.append(t1 - t0)
        patch_s.append(time.perf_counter() - t1)
        counts = np.bincount(labels.ravel(), minlength=len(REGIONS)) / labels.size
        rows.append({"label": label, **dict(zip(REGIONS, counts)),
                     "nucleus_to_cell": counts[NUCLEUS] / max(1e-9, 1 - counts[0])})
    df = pd.DataFrame(rows)
    per = df.groupby("label").agg(["mean", "std"]).round(4)
    classes = {c: {"n": int((df.label == c).sum()),
                   **{k: {"mean": float(per.loc[c, (k, "mean")]), "std": float(per.loc[c, (k, "std")])}
                      for k in (*REGIONS, "nucleus_to_cell")}} for c in per.index}
    order = df.groupby("label").nucleus_to_cell.mean().sort_values(ascending=False)
    ms = np.array(seg_s) * 1000
    timing = {"n_images": len(df), "segment_ms_mean": round(float(ms.mean()), 1),
              "segment_cpu_ms_mean": round(float(np.mean(cpu_s) * 1000), 1),
              "segment_ms_median": round(float(np.median(ms)), 1),
              "segment_ms_p95": round(float(np.percentile(ms, 95)), 1),
              "patch_regions_ms_mean": round(float(np.mean(patch_s) * 1000), 2)}
    return timing, {"per_class": classes, "nucleus_to_cell_order": [f"{c} {v:.2f}" for c, v in order.items()]}


def overlay(rgb: np.ndarray, labels: np.ndarray) -> np.ndarray:
    alpha = np.where(labels > 0, 0.45, 0.0)[..., None]
    return (rgb * (1 - alpha) + COLOURS[labels] * alpha).astype(np.uint8)


def draw_figure(out: Path) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    from PIL import Image

    from cytosae.analysis.segment import REGIONS, segment_cell

    ace = pd.read_csv(SHARED_DATA / "acevedo" / "manifest.csv")
    apl = pd.read_csv(SHARED_DATA / "deepapl" / "manifest.csv")
    cells = [(f"Acevedo {c}", SHARED_DATA / "acevedo" / ace[ace.label == c].sample(n=1, random_state=0).path.iloc[0])
             for c in FIGURE_CLASSES]
    for dx in ("APL", "AML"):
        for p in apl[apl.diagnosis == dx].sample(n=2, random_state=0).path:
            cells.append((f"DeepAPL {dx}", SHARED_DATA / "deepapl" / p))
    fig, axes = plt.subplots(4, 6, figsize=(10.5, 7.4))
    for i, (title, path) in enumerate(cells):
        rgb = model_input(path)
        ax_img, ax_seg = axes[i // 3, 2 * (i % 3)], axes[i // 3, 2 * (i % 3) + 1]
        ax_img.imshow(rgb)
        ax_seg.imshow(overlay(rgb, segment_cell(rgb)))
        ax_img.set_title(title, fontsize=8, loc="left")
    for ax in axes.ravel():
        ax.set_axis_off()
    fig.legend(handles=[Patch(color=COLOURS[k] / 255, label=r) for k, r in enumerate(REGIONS) if k],
               loc="lower center", ncol=3, fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.04, 1, 1), pad=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, dpi=72, format="png")
    plt.close(fig)
    # A 256-colour palette keeps a figure of 24 photos under 300 KB without visible loss.
    img = Image.open(buf).convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out, optimize=True)
    shown = out.relative_to(REPO) if out.is_relative_to(REPO) else out
    return {"path": str(shown), "bytes": out.stat().st_size,
            "cells": [f"{t}: {p.relative_to(SHARED_DATA)}" for t, p in cells]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-class", type=int, default=16, help="Acevedo cells per class to time and measure")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "segment.json")
    ap.add_argument("--figure", type=Path, default=REPO / "docs" / "figures" / "segmentation.png")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO / "src"))
    import torch

    torch.set_num_threads(1)
    result = {"synthetic": synthetic_iou()}
    if (SHARED_DATA / "acevedo" / "manifest.csv").is_file() and (SHARED_DATA / "deepapl" / "manifest.csv").is_file():
        result["timing"], result["acevedo"] = acevedo_shares(args.per_class)
        result["figure"] = draw_figure(args.figure.resolve())
    else:
        result["skipped"] = f"real images not found at {SHARED_DATA} (acevedo/, deepapl/): timing, shares, figure"
        print(result["skipped"], file=sys.stderr)
    write_result(args.out, result)


if __name__ == "__main__":
    main()
