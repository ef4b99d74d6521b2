"""How far apart two cohorts' colours are before and after stain normalisation (extract --stain).

Acevedo (CellaVision DM96, one Spanish lab) and DeepAPL (CellaVision, Johns Hopkins) cells, --n-images
drawn at random (seed 0) from each. Every image is normalised to ONE Acevedo reference with the package's
own Preprocess (cytosae.data.stain: torchstain's Reinhard, and Macenko for comparison), at its own
resolution, as `extract --stain` does. The reference is the "typical" Acevedo image: of --n-images further
Acevedo images (none of them measured), the one whose CIELAB mean is nearest their average.

Reported per method (none = the images as they are):
- cohort_lab_mean: the average over a cohort's images of each image's CIELAB mean (L 0..100, a, b);
- lab_mean_distance: Euclidean distance between the two cohorts' cohort_lab_mean (CIELAB units, ~delta E);
- lab_std_distance: the same for the per-image CIELAB standard deviations (contrast);
- colour_separability: cross-validated balanced accuracy (5 folds) of a logistic regression telling the
  cohorts apart from per-image colour statistics alone (CIELAB mean and std): 0.5 = indistinguishable;
- failed: images the normaliser failed on (they keep their own colours, as in extraction);
- apply_ms_per_image: the normaliser's time per image (one decoding process; extraction runs several).
Reinhard sets every image's LAB means and stds to the reference's, so its distances are small by
construction (what is left is uint8 rounding and clipping); the separability says what cue remains.

    python bench/stain.py [--n-images 100]

Writes bench/results/stain.json (or --out). About 30 s on 2 shared cores for 100 + 100 images.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from torchstain.numpy.utils.rgb2lab import rgb2lab

from _report import write_result

REPO = Path(__file__).resolve().parents[1]
DATA = (REPO / ".." / "shared" / "data").resolve()


def lab_stats(img) -> np.ndarray:
    """Per-channel CIELAB mean and std of an RGB image: (L, a, b) means, then stds."""
    lab = rgb2lab(np.asarray(img, dtype=np.float32) / 255).reshape(-1, 3).astype(np.float64)
    lab = lab / np.array([2.55, 1, 1]) - np.array([0, 128, 128])  # OpenCV's 8-bit scale -> CIELAB
    return np.concatenate([lab.mean(axis=0), lab.std(axis=0)])


def separability(x: np.ndarray, y: np.ndarray) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    folds = StratifiedKFold(5, shuffle=True, random_state=0)
    return float(cross_val_score(model, x, y, cv=folds, scoring="balanced_accuracy").mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-images", type=int, default=100)
    ap.add_argument("--methods", default="reinhard,macenko")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "stain.json")
    args = ap.parse_args()
    if not (DATA / "acevedo" / "manifest.csv").is_file() or not (DATA / "deepapl" / "manifest.csv").is_file():
        sys.exit(f"needs the Acevedo and DeepAPL images at {DATA} (see its README)")
    sys.path.insert(0, str(REPO / "src"))
    from cytosae.data import Preprocess, open_rgb
    from cytosae.data.stain import StainError, fit_stain

    n = args.n_images
    ace = pd.read_csv(DATA / "acevedo" / "manifest.csv").sample(2 * n, random_state=0)
    apl = pd.read_csv(DATA / "deepapl" / "manifest.csv").sample(n, random_state=0)
    cohorts = {"acevedo": [DATA / "acevedo" / p for p in ace["path"][:n]],
               "deepapl": [DATA / "deepapl" / p for p in apl["path"]]}
    candidates = [DATA / "acevedo" / p for p in ace["path"][n:]]
    cand_means = np.stack([lab_stats(open_rgb(p))[:3] for p in candidates])
    reference = candidates[int(np.argmin(np.linalg.norm(cand_means - cand_means.mean(axis=0), axis=1)))]

    images = {name: [open_rgb(p) for p in paths] for name, paths in cohorts.items()}
    labels = np.array([name for name, imgs in images.items() for _ in imgs])
    result = {"what": "colour distance between two cohorts before/after stain normalisation to one Acevedo image",
              "n_images_per_cohort": n, "reference": str(reference.relative_to(DATA)), "methods": {}}
    for method in ["none", *args.methods.split(",")]:
        t = time.perf_counter()
        stain = None if method == "none" else fit_stain(method, reference)
        failed, apply_s = 0, 0.0
        stats = {}
        for name, imgs in images.items():
            rows = []
            for img in imgs:
                out = img
                if stain is not None:
                    t_apply = time.perf_counter()
                    try:
                        out = stain.apply(img)
                    except StainError:  # as extraction does: the image keeps its own colours
                        failed += 1
                    apply_s += time.perf_counter() - t_apply
                rows.append(lab_stats(out))
            stats[name] = np.stack(rows)
        cohort_mean = {k: v[:, :3].mean(axis=0) for k, v in stats.items()}
        cohort_std = {k: v[:, 3:].mean(axis=0) for k, v in stats.items()}
        result["methods"][method] = {
            "cohort_lab_mean": {k: [round(float(x), 3) for x in v] for k, v in cohort_mean.items()},
            "cohort_lab_std": {k: [round(float(x), 3) for x in v] for k, v in cohort_std.items()},
            "lab_mean_distance": round(float(np.linalg.norm(cohort_mean["acevedo"] - cohort_mean["deepapl"])), 3),
            "lab_std_distance": round(float(np.linalg.norm(cohort_std["acevedo"] - cohort_std["deepapl"])), 3),
            "colour_separability": round(separability(np.concatenate(list(stats.values())), labels), 3),
            "failed": failed,
            "apply_ms_per_image": round(1000 * apply_s / len(labels), 1),  # one core, 360 x 363 images
            "seconds": round(time.perf_counter() - t, 2),
        }
        if stain is not None:
            result["methods"][method]["reference_params"] = Preprocess(stain=stain).to_dict()["stain"]["params"]
    write_result(args.out, result)


if __name__ == "__main__":
    main()
