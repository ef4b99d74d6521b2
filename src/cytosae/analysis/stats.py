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
from typing import TYPE_CHECKING, Annotated, Optional

import numpy as np
import pandas as pd
import torch
from pydantic import Field

from cytosae.store.format import Written

if TYPE_CHECKING:
    from cytosae.analysis.encoded import EncodedBatch, EncodedStore

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


def compute_latent_stats(encoded: "EncodedStore", manifest: pd.DataFrame, k: int = 16, label_column: str = "label",
                         noisy_threshold: float | None = 0.1, dataset: str = "data", n_bins: int = 20,
                         label_columns: list[str] | None = None) -> LatentStats:
    """One pass over `encoded` (analysis.encoded.EncodedStore: the store's images through the SAE on its device).

    Each batch and every running total live on `encoded.device`; the tables come back on the CPU. A TopK-family
    SAE's batches are accumulated from their (latent, value) pairs, never as (tokens x n_latents).
    `label_columns`: multi-label targets as one 0/1 column per label (e.g. CT-RATE's abnormalities): an image's
    labels are the columns it has (classify.truthy), and class profiles are per label (replaces label_column)."""
    n_latents = encoded.n_latents
    labels_by_id, label_column = _image_labels(manifest, label_column, label_columns)
    acc = _Totals(n_latents, sorted({c for v in labels_by_id.values() for c in _labels_of(v)}), k, encoded.device)
    for batch in encoded.batches():
        acc.add(batch, labels_by_id)
    if acc.n_images == 0:
        raise ValueError(f"dataset {dataset!r} has no images to compute statistics on")
    acc.to_cpu()
    top_images = _top_table(acc, dataset, labels_by_id)
    latents = _latent_table(acc, top_images, dataset, noisy_threshold)
    sample = torch.cat(acc.image_acts).numpy()
    summary = {
        "dataset": dataset, "n_images": acc.n_images, "n_tokens": acc.n_tokens, "n_latents": n_latents, "k": k,
        "grid": acc.grid, "label_column": label_column, "classes": acc.classes, "noisy_threshold": noisy_threshold,
        "n_noisy": int(latents.noisy.sum()), "n_dead_on_dataset": int((latents.freq_image == 0).sum()),
        "histogram_images": int(sample.shape[0]), "definitions": DEFINITIONS.strip(),
    }
    return LatentStats(latents, top_images, _class_table(acc, dataset), _histograms(sample, dataset, n_bins), summary)


def _image_labels(manifest: pd.DataFrame, label_column: str, label_columns: list[str] | None) -> tuple[dict, str]:
    """image_id -> its label value ('a|b' for several), and the label column's name as summary.json gives it."""
    if label_columns:
        from cytosae.analysis.classify import label_table

        present = label_table(manifest, list(label_columns), "image")
        return ({i: "|".join(c for c, v in row.items() if v) for i, row in zip(present.index, present.to_dict("records"))},
                ",".join(label_columns))
    return (dict(zip(manifest["image_id"], manifest[label_column])) if label_column in manifest else {}), label_column


class _Totals:
    """The running totals of one pass, on the device of the batches: O(n_latents x (k + classes)) memory."""

    HISTOGRAM_IMAGES = 4096  # image-level activations kept for histograms: (n_images x n_latents) is too big

    def __init__(self, n_latents: int, classes: list[str], k: int, device: torch.device):
        f64 = {"dtype": torch.float64, "device": device}
        self.n_latents, self.classes, self.k, self.device = n_latents, classes, k, device
        self.cls_index = {c: i for i, c in enumerate(classes)}
        self.n_images = self.n_tokens = 0
        self.grid = None
        self.fire_tokens, self.fire_images, self.sum_act_firing, self.sum_act_all = (
            torch.zeros(n_latents, **f64) for _ in range(4))
        self.max_act = torch.zeros(n_latents, device=device)
        self.class_sum, self.class_fire = (torch.zeros(len(classes), n_latents, **f64) for _ in range(2))
        self.class_n = torch.zeros(len(classes), **f64)
        self.top = {by: (torch.full((n_latents, 0), -1.0, device=device),
                         torch.zeros((n_latents, 0), dtype=torch.long, device=device),
                         torch.zeros((n_latents, 0), dtype=torch.long, device=device)) for by in ("image", "patch")}
        self.ids: list[str] = []
        self.image_acts: list[torch.Tensor] = []

    def add(self, batch: "EncodedBatch", labels_by_id: dict) -> None:
        """One batch of token activations: every total from its (b, n_latents) image-level reductions."""
        (b, t), batch_ids = batch.shape, batch.ids
        self.grid = math.isqrt(batch.n_patches) if t > 1 else None
        img_act = batch.patch_mean()  # (b, n_latents)
        fires_img = batch.fires_any()
        self.fire_tokens += batch.fire_counts()
        self.fire_images += fires_img.sum(0).double()
        self.sum_act_firing += (img_act * fires_img).sum(0).double()
        self.sum_act_all += img_act.sum(0).double()
        self.max_act = torch.maximum(self.max_act, batch.max_over_tokens())
        self._add_classes(batch_ids, img_act, fires_img, labels_by_id)
        patch_max, patch_arg = batch.patch_max()
        ranked = (("image", img_act, torch.full_like(patch_arg, -1)), ("patch", patch_max, patch_arg))
        self._add_top(ranked[:1 if t == 1 else 2], torch.arange(self.n_images, self.n_images + b, device=self.device))
        if len(self.image_acts) * b < self.HISTOGRAM_IMAGES:
            self.image_acts.append(img_act)
        self.ids += batch_ids
        self.n_images += b
        self.n_tokens += b * t

    def _add_classes(self, batch_ids, img_act, fires_img, labels_by_id) -> None:
        """Per class sums by one product with the batch's (b, classes) membership (a cell may have several)."""
        if not self.classes:
            return
        member = torch.zeros(len(batch_ids), len(self.classes), dtype=torch.float64)
        for i, image_id in enumerate(batch_ids):
            for c in _labels_of(labels_by_id.get(image_id)):
                member[i, self.cls_index[c]] = 1.0
        member = member.to(self.device)
        self.class_sum += member.T @ img_act.double()
        self.class_fire += member.T @ fires_img.double()
        self.class_n += member.sum(0)

    def _add_top(self, ranked, positions: torch.Tensor) -> None:
        """Keep each latent's k best (value, image position, patch) so far, by image and by patch."""
        for by, vals, where in ranked:
            v0, i0, p0 = self.top[by]
            v = torch.cat([v0, vals.T], 1)
            ii = torch.cat([i0, positions.expand(self.n_latents, len(positions))], 1)
            pp = torch.cat([p0, where.T], 1)
            keep_v, keep = v.topk(min(self.k, v.shape[1]), dim=1)
            self.top[by] = (keep_v, ii.gather(1, keep), pp.gather(1, keep))

    def to_cpu(self) -> None:
        for name in ("fire_tokens", "fire_images", "sum_act_firing", "sum_act_all", "max_act", "class_sum",
                     "class_fire", "class_n"):
            setattr(self, name, getattr(self, name).cpu())
        self.top = {by: tuple(t.cpu() for t in kept) for by, kept in self.top.items()}
        self.image_acts = [a.cpu() for a in self.image_acts]


def _top_table(acc: _Totals, dataset: str, labels_by_id: dict) -> pd.DataFrame:
    """One row per kept (latent, rank) where the latent fires: an image where it does not is not a top image."""
    columns = ["dataset", "latent", "by", "rank", "image_id", "value", "patch", "label"]
    parts = []
    ids = np.array(acc.ids, dtype=object)
    for by, (v, ii, pp) in acc.top.items():
        v = v.numpy()
        # values are sorted per latent, so "fires" keeps a prefix of each row: the ranks stay 0, 1, ...
        latent, rank = np.nonzero(v > 0)
        if not len(latent):  # an empty part would turn the string columns of the others into objects
            continue
        image_id = ids[ii.numpy()[latent, rank]]
        parts.append(pd.DataFrame({"dataset": dataset, "latent": latent, "by": by, "rank": rank,
                                   "image_id": image_id.tolist(), "value": v[latent, rank].astype(np.float64),
                                   "patch": pp.numpy()[latent, rank],
                                   "label": [labels_by_id.get(i) for i in image_id]}, columns=columns))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame([], columns=columns)


def _latent_table(acc: _Totals, top_images: pd.DataFrame, dataset: str, noisy_threshold: float | None) -> pd.DataFrame:
    fire_images, n_images = acc.fire_images, acc.n_images
    entropies, top_labels = _top_label_columns(top_images, acc.n_latents)
    return pd.DataFrame({
        "dataset": dataset, "latent": np.arange(acc.n_latents), "freq_image": (fire_images / n_images).numpy(),
        "freq_token": (acc.fire_tokens / acc.n_tokens).numpy(),
        "mean_act": torch.where(fire_images > 0, acc.sum_act_firing / fire_images.clamp(min=1), 0.0).numpy(),
        "max_act": acc.max_act.numpy(), "label_entropy": entropies, "top_label": top_labels,
        "noisy": ((acc.sum_act_all / n_images).numpy() > noisy_threshold) if noisy_threshold is not None else False,
    })


def _top_label_columns(top_images: pd.DataFrame, n_latents: int) -> tuple[list[float], list]:
    """Per latent, the entropy and the most common of its top images' labels (by "image", in rank order).
    One latent's rows are one run of the table once sorted by latent (stable: ranks keep their order); labels
    and entropies are memoised, as 49,152 latents share few label values and count patterns."""
    rows = top_images[top_images.by == "image"]
    latent = rows.latent.to_numpy()
    order = np.argsort(latent, kind="stable")
    every = rows.label.tolist()
    labels = [every[i] for i in order]
    bounds = np.searchsorted(latent[order], np.arange(n_latents + 1))
    split: dict = {}
    entropy_of: dict = {}
    entropies, top_labels = [], []
    for j in range(n_latents):
        labs = []
        for v in labels[bounds[j]:bounds[j + 1]]:
            if not isinstance(v, str):
                labs += _labels_of(v)
            else:
                labs += split[v] if v in split else split.setdefault(v, _labels_of(v))
        counts = Counter(labs)  # insertion order: the first label to reach the top count wins a tie, as before
        key = tuple(counts.values())
        if key not in entropy_of:
            entropy_of[key] = entropy(labs)
        entropies.append(entropy_of[key])
        top_labels.append(counts.most_common(1)[0][0] if labs else None)
    return entropies, top_labels


def _class_table(acc: _Totals, dataset: str) -> pd.DataFrame:
    n = acc.class_n.clamp(min=1)[:, None]
    return pd.DataFrame({
        "dataset": dataset,
        "latent": np.tile(np.arange(acc.n_latents), len(acc.classes)),
        "class": np.repeat(acc.classes, acc.n_latents),
        "mean_act": (acc.class_sum / n).flatten().numpy(),
        "freq": (acc.class_fire / n).flatten().numpy(),
    })


def _histograms(sample: np.ndarray, dataset: str, n_bins: int) -> pd.DataFrame:
    """Per latent, np.histogram(its values > 0, bins=n_bins) for all latents at once: the same edges (linspace
    from min to max, +-0.5 when they are equal) and the same binning as numpy's uniform-bin path, whose steps are
    repeated here over (images x latents) instead of one call per latent (49,152 calls took most of a pass)."""
    # float64: float32 activations a few ulps apart cannot be cut into n_bins finite bins (numpy raises)
    x = sample.astype(np.float64)
    pos = x > 0
    fires = pos.any(0)
    lo = np.where(fires, np.where(pos, x, np.inf).min(0, initial=np.inf), 0.0)
    hi = np.where(fires, np.where(pos, x, -np.inf).max(0, initial=-np.inf), 1.0)
    same = lo == hi
    lo, hi = np.where(same, lo - 0.5, lo), np.where(same, hi + 0.5, hi)
    edges = _edges(lo, hi, n_bins)
    counts = np.zeros((x.shape[1], n_bins), dtype=np.intp)
    image, latent = np.nonzero(pos)
    if len(latent):
        v = x[image, latent]
        first = lo[latent]
        idx = ((v - first) / (hi[latent] - first) * n_bins).astype(np.intp)
        idx[idx == n_bins] -= 1
        idx[v < edges[latent, idx]] -= 1
        idx[(v >= edges[latent, idx + 1]) & (idx != n_bins - 1)] += 1
        counts = np.bincount(latent * n_bins + idx, minlength=x.shape[1] * n_bins).reshape(-1, n_bins)
    edges[~fires] = 0.0
    return pd.DataFrame({"dataset": dataset, "latent": np.arange(x.shape[1]), "bin_edges": edges.tolist(),
                         "counts": counts.tolist()}, columns=["dataset", "latent", "bin_edges", "counts"])


def _edges(lo: np.ndarray, hi: np.ndarray, n_bins: int) -> np.ndarray:
    """(latents, n_bins + 1) np.linspace(lo_j, hi_j, n_bins + 1) in one call: elementwise the same arithmetic, except
    where a step underflows to 0 (linspace then takes another path for the whole array), done one by one."""
    step = (hi - lo) / n_bins
    if len(lo) == 0 or bool((step == 0).any()):
        return np.stack([np.linspace(a, b, n_bins + 1) for a, b in zip(lo, hi)]) if len(lo) else np.zeros((0, n_bins + 1))
    return np.linspace(lo, hi, n_bins + 1, axis=1)


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
    """For each value of a generating factor: the best latent's purity (share of its top-k images with that value)
    and `n_tied`, how many latents reach that same purity. A factor carried by one cell class (the synthetic
    sample's nucleus shape, granule colour) is as pure in any latent of that class: 56 latents tie at 1.0 for
    "round" in `make demo`, a third of them on the nucleus, and `best_latent` is the lowest-numbered one."""
    value_of = dict(zip(manifest["image_id"], manifest[factor].astype(str)))
    tops = top_images[(top_images.by == "image") & (top_images["rank"] < k)].copy()
    tops["value"] = tops.image_id.map(value_of)
    counts = tops.groupby(["latent", "value"]).size().unstack(fill_value=0)
    full = counts.div(k)  # latents with fewer than k firing images are penalised, not flattered
    rows = []
    for v in sorted(manifest[factor].astype(str).unique()):
        if v in full.columns:
            best = full[v].idxmax()
            top = float(full.loc[best, v])
            rows.append({"factor": factor, "value": v, "best_latent": int(best), "purity": top,
                         "n_tied": int((full[v] == top).sum())})
    return pd.DataFrame(rows)
