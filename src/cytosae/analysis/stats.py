"""Per-latent statistics over a dataset, streamed in memory O(n_latents x k).

Definitions (also written to summary.json, so every number says what it is):
- a latent *fires* on a token when its activation is > 0;
- token-level firing frequency: fraction of all tokens (CLS and patches) it fires on;
- image-level firing frequency: fraction of images where it fires on at least one token;
- image-level activation: mean of its activation over the image's patch tokens (PatchSAE's aggregation;
  the CLS token is reported by the SAE evaluation, not here);
- mean_act: mean image-level activation over the images where it fires (0 when it never fires);
- top images: the k images with the highest image-level activation, and the k with the strongest
  single patch (patch index p = row * grid + col, token p + 1; CLS excluded);
- stores with one vector per image (imported embeddings, no patch tokens): that vector is the image's
  activation, and there are no top images by patch;
- label entropy: natural-log entropy of the labels of its top-k images (over those present when fewer than k).
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Callable, Iterable, Optional

import numpy as np
import pandas as pd
import torch
from pydantic import Field

from cytosae.store.format import Written

DEFINITIONS = __doc__.split("Definitions (also written to summary.json, so every number says what it is):\n")[1]


@dataclass
class LatentStats:
    latents: pd.DataFrame
    top_images: pd.DataFrame
    class_profile: pd.DataFrame
    histograms: pd.DataFrame
    summary: dict


def _labels_of(value) -> list[str]:
    """Multi-label cells: 'a|b' or a list count toward each label."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return []
    if isinstance(value, (list, tuple, np.ndarray)):
        return [str(v) for v in value]
    return [s for s in str(value).split("|") if s]


def entropy(labels: list[str]) -> float:
    if not labels:
        return float("nan")
    counts = np.array(list(Counter(labels).values()), dtype=np.float64)
    p = counts / counts.sum()
    return float(max(0.0, -(p * np.log(p)).sum()))  # max: no -0.0 for a single label


def compute_latent_stats(encode: Callable[[torch.Tensor], torch.Tensor], images: Iterable[tuple[list[str], torch.Tensor]],
                         manifest: pd.DataFrame, n_latents: int, k: int = 16, label_column: str = "label",
                         noisy_threshold: float | None = 0.1, dataset: str = "data", n_bins: int = 20,
                         device: str | torch.device = "cpu", label_columns: list[str] | None = None) -> LatentStats:
    """Stream (image_ids, tokens (b, T, D)) with CLS first; `encode` maps (N, D) -> (N, n_latents) >= 0.

    Each batch and every running total live on `device` (where `encode`'s SAE must be, e.g.
    `SAE.load(dir, device=...)`); the tables come back on the CPU.
    `label_columns`: multi-label targets as one 0/1 column per label (e.g. CT-RATE's abnormalities): an image's
    labels are the columns it has (classify.truthy), and class profiles are per label (replaces label_column)."""
    from cytosae.devices import resolve_device

    dev = resolve_device(device)
    if label_columns:
        from cytosae.analysis.classify import label_table

        present = label_table(manifest, list(label_columns), "image")
        labels_by_id = {i: "|".join(c for c, v in row.items() if v)
                        for i, row in zip(present.index, present.to_dict("records"))}
        label_column = ",".join(label_columns)
    else:
        labels_by_id = dict(zip(manifest["image_id"], manifest[label_column])) if label_column in manifest else {}
    classes = sorted({c for v in labels_by_id.values() for c in _labels_of(v)})
    cls_index = {c: i for i, c in enumerate(classes)}

    n_images = n_tokens = 0
    fire_tokens = torch.zeros(n_latents, dtype=torch.float64, device=dev)
    fire_images = torch.zeros(n_latents, dtype=torch.float64, device=dev)
    sum_act_firing = torch.zeros(n_latents, dtype=torch.float64, device=dev)
    sum_act_all = torch.zeros(n_latents, dtype=torch.float64, device=dev)
    max_act = torch.zeros(n_latents, device=dev)
    class_sum = torch.zeros(len(classes), n_latents, dtype=torch.float64, device=dev)
    class_fire = torch.zeros(len(classes), n_latents, dtype=torch.float64, device=dev)
    class_n = torch.zeros(len(classes), dtype=torch.float64, device=dev)
    top = {by: (torch.full((n_latents, 0), -1.0, device=dev), torch.zeros((n_latents, 0), dtype=torch.long, device=dev),
                torch.zeros((n_latents, 0), dtype=torch.long, device=dev)) for by in ("image", "patch")}
    ids: list[str] = []
    image_acts: list[torch.Tensor] = []  # kept only for histograms: (n_images x n_latents) is too big, so sampled below
    grid = None

    with torch.inference_mode():
        for batch_ids, tokens in images:
            b, t, d = tokens.shape
            grid = math.isqrt(t - 1) if t > 1 else None
            z = encode(tokens.to(dev, non_blocking=True).reshape(-1, d)).reshape(b, t, n_latents).float()
            # one vector per image (imported embeddings): that token stands for the image and its only "patch"
            patch = z[:, 1:] if t > 1 else z
            img_act = patch.mean(1)  # (b, n_latents)
            fires_img = (z > 0).any(1)
            fire_tokens += (z > 0).sum((0, 1)).double()
            fire_images += fires_img.sum(0).double()
            sum_act_firing += (img_act * fires_img).sum(0).double()
            sum_act_all += img_act.sum(0).double()
            max_act = torch.maximum(max_act, z.amax((0, 1)))
            for i, image_id in enumerate(batch_ids):
                for c in _labels_of(labels_by_id.get(image_id)):
                    j = cls_index[c]
                    class_sum[j] += img_act[i].double()
                    class_fire[j] += fires_img[i].double()
                    class_n[j] += 1
            positions = torch.arange(n_images, n_images + b, device=dev)
            patch_max, patch_arg = patch.max(1)
            for by, vals, where in (("image", img_act, torch.full_like(patch_arg, -1)), ("patch", patch_max, patch_arg))[
                    :1 if t == 1 else 2]:
                v0, i0, p0 = top[by]
                v = torch.cat([v0, vals.T], 1)
                ii = torch.cat([i0, positions.expand(n_latents, b)], 1)
                pp = torch.cat([p0, where.T], 1)
                keep_v, keep = v.topk(min(k, v.shape[1]), dim=1)
                top[by] = (keep_v, ii.gather(1, keep), pp.gather(1, keep))
            if len(image_acts) * b < 4096:
                image_acts.append(img_act)
            ids += list(batch_ids)
            n_images += b
            n_tokens += b * t
    if n_images == 0:
        raise ValueError(f"dataset {dataset!r} has no images to compute statistics on")
    fire_tokens, fire_images, sum_act_firing, sum_act_all, max_act, class_sum, class_fire, class_n = (
        t.cpu() for t in (fire_tokens, fire_images, sum_act_firing, sum_act_all, max_act, class_sum, class_fire, class_n))
    top = {by: tuple(t.cpu() for t in kept) for by, kept in top.items()}
    image_acts = [a.cpu() for a in image_acts]

    freq_image = (fire_images / n_images).numpy()
    mean_act = torch.where(fire_images > 0, sum_act_firing / fire_images.clamp(min=1), 0.0).numpy()
    rows, top_labels, entropies = [], [], []
    for by, (v, ii, pp) in top.items():
        for latent in range(n_latents):
            for rank in range(v.shape[1]):
                if v[latent, rank] <= 0:
                    break  # an image where the latent does not fire is not a top image
                image_id = ids[int(ii[latent, rank])]
                rows.append((dataset, latent, by, rank, image_id, float(v[latent, rank]), int(pp[latent, rank]),
                             labels_by_id.get(image_id)))
    top_images = pd.DataFrame(rows, columns=["dataset", "latent", "by", "rank", "image_id", "value", "patch", "label"])
    by_image = top_images[top_images.by == "image"].groupby("latent")["label"].apply(list).to_dict()
    for latent in range(n_latents):
        labs = [c for v in by_image.get(latent, []) for c in _labels_of(v)]
        entropies.append(entropy(labs))
        top_labels.append(Counter(labs).most_common(1)[0][0] if labs else None)
    latents = pd.DataFrame({
        "dataset": dataset, "latent": np.arange(n_latents), "freq_image": freq_image,
        "freq_token": (fire_tokens / n_tokens).numpy(), "mean_act": mean_act, "max_act": max_act.numpy(),
        "label_entropy": entropies, "top_label": top_labels,
        "noisy": ((sum_act_all / n_images).numpy() > noisy_threshold) if noisy_threshold is not None else False,
    })
    n = class_n.clamp(min=1)[:, None]
    class_profile = pd.DataFrame({
        "dataset": dataset,
        "latent": np.tile(np.arange(n_latents), len(classes)),
        "class": np.repeat(classes, n_latents),
        "mean_act": (class_sum / n).flatten().numpy(),
        "freq": (class_fire / n).flatten().numpy(),
    })
    sample = torch.cat(image_acts).numpy()
    hist = []
    for latent in range(n_latents):
        # float64: float32 activations a few ulps apart cannot be cut into n_bins finite bins (numpy raises)
        vals = sample[:, latent][sample[:, latent] > 0].astype(np.float64)
        counts, edges = np.histogram(vals, bins=n_bins) if len(vals) else (np.zeros(n_bins, int), np.zeros(n_bins + 1))
        hist.append((dataset, latent, edges.tolist(), counts.tolist()))
    histograms = pd.DataFrame(hist, columns=["dataset", "latent", "bin_edges", "counts"])
    summary = {
        "dataset": dataset, "n_images": n_images, "n_tokens": n_tokens, "n_latents": n_latents, "k": k, "grid": grid,
        "label_column": label_column, "classes": classes, "noisy_threshold": noisy_threshold,
        "n_noisy": int(latents.noisy.sum()), "n_dead_on_dataset": int((freq_image == 0).sum()),
        "histogram_images": int(sample.shape[0]), "definitions": DEFINITIONS.strip(),
    }
    return LatentStats(latents, top_images, class_profile, histograms, summary)


def write_stats(stats: list[LatentStats], out_dir: str | Path) -> Path:
    """Write the tables of one or more datasets as docs/run-layout.md's stats/ folder."""
    from cytosae.store.format import atomic_write_json, atomic_write_parquet

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, file in TABLES.items():
        table = pd.concat([getattr(s, name) for s in stats], ignore_index=True)
        atomic_write_parquet(out / file, table)
    from cytosae.analysis import figures

    for s in stats:
        name = s.summary["dataset"]
        figures.save_figure(figures.frequency_activation_scatter(s.latents, name),
                            out / "figures" / f"frequency_vs_activation_{name}.png")
        if s.summary["classes"]:
            figures.save_figure(figures.class_profile_heatmap(s.class_profile, s.latents, name),
                                out / "figures" / f"class_profile_{name}.png")
    atomic_write_json(out / SUMMARY, {"datasets": [s.summary for s in stats],
                                      "figures": sorted(p.name for p in (out / "figures").glob("*.png"))})
    return out


# ---------------------------------------------------------------- stats/ as its readers read it
SUMMARY = "summary.json"
LATENTS, TOP_IMAGES = "latents.parquet", "top_images.parquet"
TABLES = {"latents": LATENTS, "top_images": TOP_IMAGES, "class_profile": "class_profile.parquet",
          "histograms": "histograms.parquet"}  # LatentStats field -> file
# the columns some reader uses without checking (the explorer's filters, `compare-saes`, notebook cards)
COLUMNS = {LATENTS: ("dataset", "latent", "freq_image", "top_label"),
           TOP_IMAGES: ("dataset", "latent", "by", "rank", "image_id", "value"),
           TABLES["class_profile"]: ("dataset", "latent", "class", "mean_act", "freq"),
           TABLES["histograms"]: ("dataset", "latent", "bin_edges", "counts")}
FIX = "rebuild it with `cytosae stats` (--run RUN: the same command)"


class DatasetSummary(Written):
    dataset: str
    n_images: Annotated[int, Field(ge=0)]
    n_tokens: Annotated[int, Field(ge=0)]
    n_latents: Annotated[int, Field(ge=0)]
    k: Annotated[int, Field(ge=1)]
    definitions: str
    grid: Optional[int] = None
    label_column: Optional[str] = None
    classes: list[str] = []
    noisy_threshold: Optional[float] = None
    n_noisy: Optional[int] = None
    n_dead_on_dataset: Optional[int] = None


class StatsSummary(Written):
    datasets: list[DatasetSummary]
    figures: list[str] = []


def read_stats_summary(stats_dir: str | Path, shown: str | None = None) -> dict:
    """stats/summary.json checked against StatsSummary; InvalidFile naming the file (`shown`) and field otherwise."""
    from cytosae.store.format import read_json_model

    return read_json_model(Path(stats_dir) / SUMMARY, StatsSummary, FIX, shown)


def read_stats_table(stats_dir: str | Path, file: str, shown: str | None = None) -> pd.DataFrame:
    """One of stats/'s tables (a COLUMNS key) with the columns its readers use, or InvalidFile naming it."""
    from cytosae.store.format import read_table

    return read_table(Path(stats_dir) / file, COLUMNS[file], FIX, shown)


def factor_purity(top_images: pd.DataFrame, manifest: pd.DataFrame, factor: str, k: int = 16) -> pd.DataFrame:
    """For each value of a generating factor: the best latent's purity (share of its top-k images with that value)."""
    value_of = dict(zip(manifest["image_id"], manifest[factor].astype(str)))
    tops = top_images[(top_images.by == "image") & (top_images["rank"] < k)].copy()
    tops["value"] = tops.image_id.map(value_of)
    counts = tops.groupby(["latent", "value"]).size().unstack(fill_value=0)
    full = counts.div(k)  # latents with fewer than k firing images are penalised, not flattered
    rows = []
    for v in sorted(manifest[factor].astype(str).unique()):
        if v in full.columns:
            best = full[v].idxmax()
            rows.append({"factor": factor, "value": v, "best_latent": int(best), "purity": float(full.loc[best, v])})
    return pd.DataFrame(rows)
