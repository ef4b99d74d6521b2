"""A description of every latent, from measured facts only (issue #19): where in the cell it fires, how far it
spreads, the colour it fires on, the classes and datasets it fires on, the patients it is enriched in.

Definitions (also written to descriptions.json, so every number says what it is):
- one streaming pass over every store's images: each batch's patch tokens are encoded by the SAE, and every
  measure below is a per-latent sum (matrix products over the batch's patches; for the TopK family, sums over
  each token's kept latents alone), so memory is O(n_latents x a few) whatever the number of images, plus the
  non-zero image-level activations kept for the AP (below);
- a patch's regions: the share of its pixels in each of background, cytoplasm, nucleus and border
  (cytosae.analysis.segment.segment_cell of the 224 px image the model saw, Preprocess.resize_image of the
  stored image file; patch_regions in ViT patch order); a patch's colour: the mean CIELAB of its pixels;
- activation-mass shares (share_background, share_cytoplasm, share_nucleus, share_border): the latent's
  activation summed over every patch of every image, split by the patches' region shares, as fractions of the
  total (they sum to 1); area_*: the same split of the patch area of the images where it fires, so
  enrichment = share / area says whether it prefers a region beyond that region's size;
- region: the region of highest enrichment among those holding at least REGION_MIN_SHARE of the mass;
- colour_L, colour_a, colour_b: the activation-weighted mean CIELAB colour of its region's pixels in the
  patches it fires on (each patch weighted by activation x that region's share of it, so the rest of the
  patch does not dilute it); patch_colour_*: the same of whole patches; colour_name: a coarse name of
  colour_* (colour_name: lightness, chroma and hue angle bins);
- spots: pixels more than SPOT_DELTA_E CIELAB units from their local background (the per-channel median over
  about 10 x 10 px): granules, inclusions, thin strands; spot_share: their share of the pixels of the patches it
  fires on (activation-weighted), spot_enrichment: spot_share over the mean spot share of the images where it
  fires, spot_L/a/b: their mean colour there; spot_colour_name names it (the text: "pink with orange spots")
  only from SPOT_MIN_SHARE and SPOT_ENRICHMENT, i.e. where the latent sits on spots more than its cells have;
- extent: per image where it fires (on at least one patch), the number of patches above half that image's
  maximum, averaged over those images (extent_patches); "one patch" below 1.5, "local (2-4 patches)" below
  4.5, "whole cell" from WHOLE_CELL_SHARE of the cell's patches (patches mostly not background, averaged the
  same way; never said of a background latent), else "regional";
- share_edge_ring: share of the activation mass on the outermost ring of patches (the image edge);
- image-level activation for classes: the maximum over the image's patch tokens (the `any_patch` policy);
  per class, the average precision (sklearn's step-wise AP, ties grouped) of the image-level activation as a
  score of "this cell is of the class" over every labelled cell, exact (cells where it is 0 tie at the end;
  multi-label cells 'a|b' count toward each label; the labelled cells of every store pooled);
  best_class: the class of highest AP (the class it ranks best), best_class_ap that AP, and
  best_class_enrichment its cells' mean image-level activation over that of all labelled cells;
- top_classes: the labels of its top images by image-level mean activation (stats/top_images.parquet,
  by = image), of the dataset where most of them are labelled, as "class count/n" (at most 3);
- datasets: the stores it fires on (at least one patch of one image); freq_image: share of all images;
- patient enrichment (patients/compare.parquet): the comparison of smallest q where the latent's fraction of
  firing cells is higher in patient_group (effect > 0 for group_a, < 0 for a named group_b), its q and effect;
- flags: dead (fires on no image), background-only (share_background >= BACKGROUND_ONLY), image-border
  (share_edge_ring >= EDGE_RING), fires-on-everything (freq_image >= EVERYTHING).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch

DEFINITIONS = __doc__.split("Definitions (also written to descriptions.json, so every number says what it is):\n")[1]
CONCEPTS = "concepts"  # RUN/concepts: cytosae.run.Run.concepts_dir
DESCRIPTIONS = "descriptions.parquet"
DESCRIPTIONS_JSON = "descriptions.json"
REQUIRED_COLUMNS = ("latent", "text", "best_class", "best_class_ap", "top_classes", "share_background",
                    "share_cytoplasm", "share_nucleus", "share_border", "extent", "colour_L", "colour_a", "colour_b",
                    "colour_name", "datasets", "patient_group", "patient_q", "patient_effect", "flags")
REGION_MIN_SHARE = 0.2
WHOLE_CELL_SHARE = 0.6
BACKGROUND_ONLY = 0.9
EDGE_RING = 0.6
EVERYTHING = 0.9
Q_SAID = 0.05  # the text names a patient group only below this q
SPOT_DELTA_E = 30.0  # CIELAB distance from the local background that makes a pixel a spot
SPOT_MIN_SHARE = 0.05
SPOT_ENRICHMENT = 1.5
THRESHOLDS = {"region_min_share": REGION_MIN_SHARE, "whole_cell_share": WHOLE_CELL_SHARE,
              "background_only": BACKGROUND_ONLY, "edge_ring": EDGE_RING, "fires_on_everything": EVERYTHING,
              "extent_one_patch_below": 1.5, "extent_local_below": 4.5, "half_max": 0.5, "q_said": Q_SAID,
              "spot_delta_e": SPOT_DELTA_E, "spot_min_share": SPOT_MIN_SHARE, "spot_enrichment": SPOT_ENRICHMENT}



# ---------------------------------------------------------------- what one image looks like, per patch


def _patch_index(h: int, w: int, grid: int) -> np.ndarray:
    """Each pixel's patch, row-major (the same patch edges as segment.patch_regions)."""
    return ((np.arange(h) * grid // h)[:, None] * grid + (np.arange(w) * grid // w)[None, :]).ravel()


def patch_colours(rgb: np.ndarray, labels: np.ndarray, grid: int) -> np.ndarray:
    """float32 (grid * grid, len(REGIONS) + 1, 3): the mean CIELAB colour of each patch's pixels of each region
    (0 where the patch has none of it), and last of all its pixels; patches in ViT order."""
    from skimage.color import rgb2lab

    from cytosae.analysis.segment import REGIONS

    lab = rgb2lab(np.asarray(rgb)).reshape(-1, 3)
    n, r = grid * grid, len(REGIONS)
    patch = _patch_index(*rgb.shape[:2], grid)
    out = np.zeros((n, r + 1, 3))
    for key, k in ((patch * r + np.asarray(labels).ravel(), n * r), (patch, n)):
        counts = np.bincount(key, minlength=k)
        sums = np.stack([np.bincount(key, weights=lab[:, c], minlength=k) for c in range(3)], 1)
        mean = sums / np.maximum(counts, 1)[:, None]
        if k == n:
            out[:, r] = mean
        else:
            out[:, :r] = mean.reshape(n, r, 3)
    return out.astype(np.float32)


def spot_pixels(rgb: np.ndarray) -> np.ndarray:
    """bool (H, W): pixels that stand out from their surroundings (granules, inclusions, thin strands): more than
    SPOT_DELTA_E CIELAB units from the local background, the per-channel median over about 10 x 10 px. The median
    is taken at half resolution (2 x 2 means, a 5 x 5 window): the background is smooth, and the full-resolution
    window costs four times as much; a straight edge between two flat areas is no spot (the median is its side)."""
    from skimage.color import rgb2lab
    from skimage.filters.rank import median

    rgb = np.asarray(rgb, dtype=np.uint8)
    h, w = rgb.shape[:2]
    half = rgb if min(h, w) < 2 else \
        rgb[:h // 2 * 2, :w // 2 * 2].reshape(h // 2, 2, w // 2, 2, 3).mean((1, 3)).round().astype(np.uint8)
    window = np.ones((5, 5), bool)
    local = np.stack([median(half[..., c], footprint=window) for c in range(3)], -1)
    rows, cols = np.minimum(np.arange(h) // 2, local.shape[0] - 1), np.minimum(np.arange(w) // 2, local.shape[1] - 1)
    background = local[rows][:, cols]
    return np.linalg.norm(rgb2lab(rgb) - rgb2lab(background), axis=-1) > SPOT_DELTA_E


def patch_spots(rgb: np.ndarray, grid: int, spots: np.ndarray | None = None) -> np.ndarray:
    """float32 (grid * grid, 4): per patch, the share of its pixels that are spots (spot_pixels) and their mean
    CIELAB colour (0 where it has none); patches in ViT order."""
    from skimage.color import rgb2lab

    spots = spot_pixels(rgb) if spots is None else spots
    lab = rgb2lab(np.asarray(rgb)).reshape(-1, 3)
    n, patch = grid * grid, _patch_index(*rgb.shape[:2], grid)
    counts = np.bincount(patch, minlength=n)
    key = patch[spots.ravel()]
    found = np.bincount(key, minlength=n)
    sums = np.stack([np.bincount(key, weights=lab[spots.ravel(), c], minlength=n) for c in range(3)], 1)
    return np.concatenate([(found / np.maximum(counts, 1))[:, None], sums / np.maximum(found, 1)[:, None]],
                          1).astype(np.float32)


class ImageViews:
    """The image each stored token set came from, as the model saw it: region shares and colour per patch."""

    def __init__(self, store, grid: int):
        from cytosae.data.images import Preprocess

        self.store, self.grid = store, grid
        self.preprocess = Preprocess.from_dict(store.meta["settings"]["preprocessing"])

    def __call__(self, image_id: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(region shares (P, 4), colours (P, 5, 3): per region and of the whole patch, patch_colours; spots
        (P, 4): their share and colour, patch_spots)."""
        from cytosae.analysis.segment import patch_regions, segment_cell
        from cytosae.data import open_rgb

        path = self.store.image_file(image_id)
        if path is None:
            raise FileNotFoundError(f"{self.store.path}/images.parquet: the image file of {image_id!r} is not under "
                                    f"its data folder {self.store.data_root or '(not recorded)'}; describing a latent "
                                    f"needs the images the model saw: put them back there")
        rgb = np.asarray(self.preprocess.resize_image(open_rgb(path)), dtype=np.uint8)
        labels = segment_cell(rgb)
        return patch_regions(labels, self.grid), patch_colours(rgb, labels, self.grid), patch_spots(rgb, self.grid)


def edge_ring(grid: int) -> np.ndarray:
    """bool (grid * grid,): the outermost ring of patches."""
    r, c = np.divmod(np.arange(grid * grid), grid)
    return (r == 0) | (c == 0) | (r == grid - 1) | (c == grid - 1)


# ---------------------------------------------------------------- the streaming pass


@dataclass
class Totals:
    """Per-latent sums over one store's images (float64, on the pass's device), and its labelled cells'
    non-zero image-level activations (for the AP; positions counted over every store's labelled cells)."""
    name: str
    n_latents: int
    n_classes: int
    device: torch.device
    n_images: int = 0
    n_labelled: int = 0
    measured: bool = False  # regions and colours (the store has the images the model saw)
    grid: int | None = None
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    nonzero: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)
    members: list[np.ndarray] = field(default_factory=list)  # (b_labelled, C) class membership, per batch

    def add(self, key: str, value: torch.Tensor) -> None:
        value = value.double()
        self.sums[key] = self.sums[key] + value if key in self.sums else value

    def get(self, key: str, *shape: int) -> np.ndarray:
        """The sum as numpy; zeros of `shape` when nothing was added (no images, no labels)."""
        v = self.sums.get(key)
        return v.cpu().numpy() if v is not None else np.zeros(shape or (self.n_latents,))


def _grid(n_tokens: int, has_cls: bool) -> int | None:
    n = n_tokens - int(has_cls)
    g = math.isqrt(max(n, 0))
    return g if n > 1 and g * g == n else None


def _patch_weights(tot: Totals, ring: torch.Tensor, views: list | None, b: int, p: int) -> torch.Tensor:
    """(b, p, 1 [+ 4 + 15 + 1 + 3]) per patch: on the edge ring; with the images, its region shares, each region's
    colour weighted by its share of the patch (summed, then divided by the region's mass) and the whole patch's,
    its spot share and the spots' colour weighted by that share."""
    weights = [ring.float()[None, :, None].expand(b, p, 1)]
    if views is not None:
        regions = torch.as_tensor(np.stack([v[0] for v in views]), device=tot.device)  # (b, p, 4)
        lab = torch.as_tensor(np.stack([v[1] for v in views]), device=tot.device)  # (b, p, 5, 3)
        r = regions.shape[-1]
        weighted = torch.cat([regions[..., None] * lab[:, :, :r], lab[:, :, r:]], 2).reshape(b, p, -1)
        spots = torch.as_tensor(np.stack([v[2] for v in views]), device=tot.device)  # (b, p, 4)
        weights += [regions, weighted, spots[..., :1], spots[..., :1] * spots[..., 1:]]
    return torch.cat(weights, 2)


def _patch_sums(batch, start: int, img_max: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per latent: the patches above half their image's maximum, and the activations times each patch's `weights`
    (n, c). A dense batch: one batched product (the activations read once, never copied); pairs (the TopK family):
    sums over the kept pairs alone."""
    if batch.dense is not None:
        patch = batch.dense[:, start:]
        above = (patch > 0.5 * img_max[:, None, :]).sum(1).sum(0)
        return above, torch.bmm(patch.transpose(1, 2), weights).sum(0)
    image, at, lat, v = _pairs(batch, start)
    above = torch.zeros(batch.n_latents, dtype=torch.long, device=v.device).index_add_(
        0, lat, (v > 0.5 * img_max[image, lat]).long())
    sums = torch.zeros(batch.n_latents, weights.shape[-1], dtype=weights.dtype, device=v.device).index_add_(
        0, lat, v[:, None].to(weights.dtype) * weights[image, at])
    return above, sums


def _pairs(batch, start: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(image, patch, latent, value) of every kept pair of a sparse batch's patch tokens, flattened."""
    vals, idx = batch.vals[:, start:], batch.idx[:, start:]
    b, p, w = vals.shape
    image = torch.arange(b, device=vals.device).view(b, 1, 1).expand(b, p, w).flatten()
    at = torch.arange(p, device=vals.device).view(1, p, 1).expand(b, p, w).flatten()
    return image, at, idx.flatten(), vals.flatten()


def _patch_mass(batch, start: int) -> torch.Tensor:
    """(n,) each latent's activation summed over the batch's patch tokens."""
    if batch.dense is not None:
        return batch.dense[:, start:].sum((0, 1))
    _, _, lat, v = _pairs(batch, start)
    return torch.zeros(batch.n_latents, device=v.device).index_add_(0, lat, v)


def _patch_max(batch, start: int) -> torch.Tensor:
    """(b, n) each image's largest activation over its patch tokens (0 where it does not fire)."""
    if batch.dense is not None:
        return batch.dense[:, start:].amax(1)
    b, n = batch.shape[0], batch.n_latents
    image, _, lat, v = _pairs(batch, start)
    return torch.zeros(b * n, device=v.device).scatter_reduce_(0, image * n + lat, v, "amax").view(b, n)


def _add_patches(tot: Totals, sums: torch.Tensor, fires: torch.Tensor, weights: torch.Tensor) -> None:
    """Edge ring and (with the images) region mass, area, colour, spots and cell size of one batch, from its
    patch sums (n, 1 [+ 23]) and the (b, p, c) patch weights they were taken with."""
    tot.add("ring", sums[:, 0])
    if not tot.measured:
        return
    regions, r = weights[..., 1:5], 4
    end = 1 + r + 3 * (r + 1)
    tot.add("region", sums[:, 1:1 + r])
    tot.add("lab", sums[:, 1 + r:end])
    tot.add("spot", sums[:, end])
    tot.add("spot_lab", sums[:, end + 1:])
    f = fires.T.float()  # (n, b): sums over the images where it fires
    tot.add("area", f @ regions.mean(1))
    tot.add("spot_area", f @ weights[..., end].mean(1))
    tot.add("cell", f @ (regions[..., 0] < 0.5).sum(1).float())


def _add_classes(tot: Totals, img_max: torch.Tensor, member: np.ndarray, offset: int) -> int:
    """Class sums and the non-zero image-level activations of the batch's labelled cells; returns their count."""
    keep = member.any(1)
    if not keep.any():
        return 0
    m = torch.as_tensor(member[keep], dtype=torch.float32, device=tot.device)  # (b_lab, C)
    s = img_max[torch.as_tensor(keep, device=tot.device)]
    tot.add("class_sum", m.T @ s)
    tot.add("class_n", m.sum(0))
    tot.add("labelled_sum", s.sum(0))
    tot.members.append(member[keep])
    rows, cols = s.nonzero(as_tuple=True)
    # int32 positions: 12 bytes per kept activation (cells and latents stay far below 2^31)
    tot.nonzero.append(((rows + offset).cpu().numpy().astype(np.int32), cols.cpu().numpy().astype(np.int32),
                        s[rows, cols].cpu().numpy()))
    return int(keep.sum())


def accumulate(encoded, name: str, classes: list[str], label_column: str, offset: int = 0,
               views: Callable | None = None, max_nonzeros: int = 200_000_000, already: int = 0) -> Totals:
    """One pass over the store of `encoded` (an EncodedStore: the store with the SAE on its device): the per-latent
    sums of the module docstring. `views(image_id) -> (regions (P, 4), colours (P, 5, 3), spots (P, 4))` gives
    each image's patches (ImageViews), None for a store without its images; `offset`: the labelled cells of the
    stores before this one (positions for the pooled AP); `max_nonzeros`: the most image-level activations kept
    over every store, `already` of them by the stores before this one."""
    from cytosae.analysis.stats import _labels_of

    store, n_latents = encoded.store, encoded.n_latents
    tot = Totals(name, n_latents, len(classes), encoded.device, measured=views is not None)
    tot.grid = _grid(store.n_tokens, store.has_cls)
    ring = torch.as_tensor(edge_ring(tot.grid) if tot.grid else np.zeros(0, bool), device=tot.device)
    index = {c: i for i, c in enumerate(classes)}
    labels = dict(zip(store.images["image_id"].astype(str), store.images[label_column])) \
        if label_column in store.images.columns else {}
    kept = already
    for batch in encoded.batches():
        (b, t), ids = batch.shape, batch.ids
        start = int(store.has_cls and t > 1)
        with torch.inference_mode():
            img_max = _patch_max(batch, start)
            fires = img_max > 0
            tot.add("fire", fires.sum(0))
            tot.add("mass", _patch_mass(batch, start))
            if tot.grid:
                weights = _patch_weights(tot, ring, [views(i) for i in ids] if views else None, b, t - start)
                above, sums = _patch_sums(batch, start, img_max, weights)
                tot.add("above", above)
                _add_patches(tot, sums, fires, weights)
            member = np.zeros((b, len(classes)), bool)
            for row, image_id in enumerate(ids):
                for c in _labels_of(labels.get(str(image_id))):
                    member[row, index[c]] = True
            n_lab = _add_classes(tot, img_max, member, offset + tot.n_labelled)
        tot.n_labelled += n_lab
        kept += len(tot.nonzero[-1][0]) if n_lab else 0
        if kept > max_nonzeros:
            raise ValueError(f"{kept:,}+ non-zero image-level activations exceed max_nonzeros={max_nonzeros:,} "
                             f"(kept for the exact AP); raise --max-nonzeros if the memory is there")
        tot.n_images += b
    return tot


# ---------------------------------------------------------------- average precision from the non-zero scores


def sparse_ap(rows: np.ndarray, cols: np.ndarray, values: np.ndarray, positive: np.ndarray,
              n_latents: int) -> np.ndarray:
    """(C, n_latents) AP of each latent's scores for each class, from its non-zero scores (rows = cell, cols =
    latent, values > 0); every other cell scores 0, one tie group at the end. `positive`: (C, n) bool. Equal to
    sklearn's average_precision_score on the dense columns (tests/test_describe.py checks it); NaN for a class
    without cells."""
    n = positive.shape[1]
    order = np.lexsort((-np.asarray(values, np.float64), cols))
    rows, cols, values = rows[order], cols[order], np.asarray(values, np.float64)[order]
    m = len(cols)
    idx = np.arange(m)
    new_latent = np.ones(m, bool)
    new_latent[1:] = cols[1:] != cols[:-1]
    seg_start = np.maximum.accumulate(np.where(new_latent, idx, 0)) if m else idx
    is_end = np.ones(m, bool)
    is_end[:-1] = (cols[1:] != cols[:-1]) | (values[1:] != values[:-1])
    end = np.minimum.accumulate(np.where(is_end, idx, m)[::-1])[::-1] if m else idx  # last of each tie group
    seen = end - seg_start + 1  # cells ranked at or above this tie group
    ap = np.full((len(positive), n_latents), np.nan)
    for c, pos in enumerate(positive):
        n_pos = float(pos.sum())
        if n_pos == 0:
            continue
        y = pos[rows].astype(np.float64)
        tp = np.cumsum(y)
        tp_end = tp[end] - np.where(seg_start > 0, tp[np.maximum(seg_start - 1, 0)], 0.0) if m else tp
        per = np.bincount(cols, weights=y * tp_end / seen, minlength=n_latents)
        tp_nz = np.bincount(cols, weights=y, minlength=n_latents)
        ap[c] = per / n_pos + (n_pos - tp_nz) / n  # the zero group: the rest of the recall at precision n_pos / n
    return ap


# ---------------------------------------------------------------- from sums to facts


def colour_name(L: float, a: float, b: float) -> str | None:
    """A coarse name of a CIELAB colour: achromatic (chroma < 6) by lightness; else a hue word by hue angle (pink
    330-15 degrees, red 15-40 from chroma 40, orange 40-75, yellow, green, cyan, blue 250-290, purple 290-330),
    "pale" before it from L 75, "dark" below L 40."""
    if not np.isfinite(L):
        return None
    chroma, hue = math.hypot(a, b), math.degrees(math.atan2(b, a)) % 360
    if chroma < 6:
        return "white" if L >= 90 else "pale grey" if L >= 70 else "grey" if L >= 40 else "dark grey"
    if 15 <= hue < 40:
        word = "red" if chroma >= 40 else "pink"
    else:
        word = next(w for upper, w in ((15, "pink"), (75, "orange"), (110, "yellow"), (200, "green"), (250, "cyan"),
                                       (290, "blue"), (330, "purple"), (361, "pink")) if hue < upper)
    return f"pale {word}" if L >= 75 else f"dark {word}" if L < 40 else word


def hue_word(name: str | None) -> str | None:
    """The hue of a colour_name without pale/dark; the achromatic names are one hue, "grey"."""
    if name is None:
        return None
    word = name.split()[-1]
    return "grey" if word in ("white", "grey") else word


def extent_word(patches: float, cell: float, region: str | None) -> str | None:
    if not np.isfinite(patches):
        return None
    if patches < THRESHOLDS["extent_one_patch_below"]:
        return "one patch"
    if patches < THRESHOLDS["extent_local_below"]:
        return "local (2-4 patches)"
    if region != "background" and np.isfinite(cell) and cell > 0 and patches >= WHOLE_CELL_SHARE * cell:
        return "whole cell"
    return "regional"


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def where_facts(totals: list[Totals], n_latents: int) -> pd.DataFrame:
    """Region shares and enrichment, colour, extent and edge ring, from the stores' sums."""
    from cytosae.analysis.segment import REGIONS

    measured = [t for t in totals if t.measured]
    gridded = [t for t in totals if t.grid]
    msum = lambda ts, key, *shape: sum((t.get(key, *shape) for t in ts), np.zeros(shape or (n_latents,)))  # noqa: E731
    r = len(REGIONS)
    mass, region = msum(measured, "mass"), msum(measured, "region", n_latents, r)  # a measured store: every image
    lab = msum(measured, "lab", n_latents, 3 * (r + 1)).reshape(n_latents, r + 1, 3)
    area, cell = msum(measured, "area", n_latents, 4), msum(measured, "cell")
    fire_measured, fire_gridded = msum(measured, "fire"), msum(gridded, "fire")
    out = {}
    shares = _ratio(region, mass[:, None])
    areas = _ratio(area, area.sum(1, keepdims=True))
    for i, name in enumerate(REGIONS):
        out[f"share_{name}"], out[f"area_{name}"] = shares[:, i], areas[:, i]
    enrich = _ratio(shares, areas)
    eligible = np.where(shares >= REGION_MIN_SHARE, np.nan_to_num(enrich, nan=-1.0), -np.inf)
    has = np.isfinite(shares).all(1)
    out["region"] = [REGIONS[int(np.argmax(e))] if h else None for e, h in zip(eligible, has)]
    out["region_enrichment"] = np.where(has, np.take_along_axis(enrich, np.argmax(eligible, 1)[:, None], 1)[:, 0],
                                        np.nan)
    # the colour of its region's pixels in the patches it fires on (not diluted by the rest of those patches)
    named = np.array([REGIONS.index(x) if x else 0 for x in out["region"]])
    colour = _ratio(lab[np.arange(n_latents), named], region[np.arange(n_latents), named][:, None])
    colour[~has] = np.nan
    out["colour_L"], out["colour_a"], out["colour_b"] = colour[:, 0], colour[:, 1], colour[:, 2]
    out["colour_name"] = [colour_name(*c) for c in colour]
    out.update(_spot_facts(measured, msum, mass, fire_measured, n_latents))
    whole = _ratio(lab[:, r], mass[:, None])
    out["patch_colour_L"], out["patch_colour_a"], out["patch_colour_b"] = whole[:, 0], whole[:, 1], whole[:, 2]
    out["extent_patches"] = _ratio(msum(gridded, "above"), fire_gridded)
    out["cell_patches"] = _ratio(cell, fire_measured)
    out["extent"] = [extent_word(p, c, r) for p, c, r in zip(out["extent_patches"], out["cell_patches"], out["region"])]
    out["share_edge_ring"] = _ratio(msum(gridded, "ring"), msum(gridded, "mass"))
    return pd.DataFrame(out)


def _spot_facts(measured: list[Totals], msum, mass: np.ndarray, fires: np.ndarray, n_latents: int) -> dict:
    """Spots under the latent: their activation-weighted share of its patches, that share over the mean share of
    the images where it fires (enrichment), their colour, and its name where both clear their thresholds."""
    share = _ratio(msum(measured, "spot"), mass)
    enrichment = _ratio(share, _ratio(msum(measured, "spot_area"), fires))
    colour = _ratio(msum(measured, "spot_lab", n_latents, 3), msum(measured, "spot")[:, None])
    said = (np.nan_to_num(share) >= SPOT_MIN_SHARE) & (np.nan_to_num(enrichment) >= SPOT_ENRICHMENT)
    return {"spot_share": share, "spot_enrichment": enrichment, "spot_L": colour[:, 0], "spot_a": colour[:, 1],
            "spot_b": colour[:, 2], "spot_colour_name": [colour_name(*c) if ok else None for c, ok in zip(colour, said)]}


def class_facts(totals: list[Totals], classes: list[str], n_latents: int) -> pd.DataFrame:
    """best_class (the class of highest AP), its exact AP and enrichment, over every labelled cell of every store."""
    n = sum(t.n_labelled for t in totals)
    if not classes or n == 0:
        return pd.DataFrame({"best_class": [None] * n_latents, "best_class_ap": np.nan,
                             "best_class_enrichment": np.nan, "n_labelled": n})
    c = len(classes)
    class_sum = sum((t.get("class_sum", c, n_latents) for t in totals), np.zeros((c, n_latents)))
    class_n = sum((t.get("class_n", c) for t in totals), np.zeros(c))
    overall = sum((t.get("labelled_sum") for t in totals), np.zeros(n_latents)) / n
    enrich = _ratio(class_sum / np.maximum(class_n, 1)[:, None], overall[None, :])
    parts = [p for t in totals for p in t.nonzero]
    rows, cols, vals = (np.concatenate([p[i] for p in parts]) for i in range(3))
    positive = np.concatenate([m for t in totals for m in t.members]).T  # (C, n), cells in pooled order
    ap = sparse_ap(rows, cols, vals, positive, n_latents)
    fired = overall > 0
    best = np.where(fired, np.argmax(np.nan_to_num(ap, nan=-1.0), 0), -1)  # ties: the first class by name
    at = (np.maximum(best, 0), np.arange(n_latents))
    return pd.DataFrame({"best_class": [classes[b] if b >= 0 else None for b in best],
                         "best_class_ap": np.where(fired, ap[at], np.nan),
                         "best_class_enrichment": np.where(fired, enrich[at], np.nan), "n_labelled": n})


def top_class_facts(top_images: pd.DataFrame | None, n_latents: int) -> pd.DataFrame:
    """top_classes ("class count/n", at most 3) and the top class, its count and n, from stats' top images:
    those of the dataset where most of them are labelled (the first in the table on ties). Whole-table
    operations: 49,152 latents x 16 top images is 786k rows."""
    from cytosae.analysis.stats import _labels_of

    out = pd.DataFrame({"top_classes": [None] * n_latents, "top_class": None, "top_count": 0, "top_n": 0})
    if top_images is None or top_images.empty:
        return out
    t = top_images.loc[(top_images.by == "image") & top_images.latent.between(0, n_latents - 1),
                       ["dataset", "latent", "label"]].copy()
    t["labels"] = t.label.map(_labels_of)
    t["order"] = t.dataset.map({d: i for i, d in enumerate(dict.fromkeys(t.dataset))})
    per = t.assign(labelled=t.labels.str.len() > 0).groupby(["latent", "order"], as_index=False) \
        .agg(n=("labelled", "size"), labelled=("labelled", "sum"))
    chosen = per.sort_values(["latent", "labelled", "order"], ascending=[True, False, True], kind="stable") \
        .drop_duplicates("latent")
    chosen = chosen[chosen.labelled > 0]
    t = t.merge(chosen[["latent", "order", "n"]], on=["latent", "order"]).explode("labels")
    counts = t.groupby(["latent", "labels", "n"], as_index=False).size()
    counts = counts.sort_values(["latent", "size", "labels"], ascending=[True, False, True], kind="stable")
    counts = counts.groupby("latent", sort=False).head(3)
    counts["said"] = counts["labels"].astype(str) + " " + counts["size"].astype(str) + "/" + counts["n"].astype(str)
    said = counts.groupby("latent", sort=False)["said"].agg(", ".join)
    first = counts.drop_duplicates("latent")
    at = first.latent.to_numpy(dtype=np.int64)
    out.loc[at, "top_classes"] = said.loc[at].to_numpy()
    out.loc[at, "top_class"] = first["labels"].astype(str).to_numpy()
    out.loc[at, "top_count"] = first["size"].to_numpy(dtype=np.int64)
    out.loc[at, "top_n"] = first["n"].to_numpy(dtype=np.int64)
    return out


def patient_facts(compare: pd.DataFrame | None, n_latents: int) -> pd.DataFrame:
    """Per latent, the comparison of smallest q where it is enriched in a named group: group, q, effect."""
    out = pd.DataFrame({"patient_group": [None] * n_latents, "patient_vs": None, "patient_q": np.nan,
                        "patient_effect": np.nan})
    if compare is None or compare.empty:
        return out
    c = compare[compare.group_b != "kruskal_wallis"]
    up = c[c.effect > 0].assign(group=lambda t: t.group_a, vs=lambda t: t.group_b, gain=lambda t: t.effect)
    down = c[(c.effect < 0) & (c.group_b != "rest")].assign(group=lambda t: t.group_b, vs=lambda t: t.group_a,
                                                           gain=lambda t: -t.effect)
    sides = pd.concat([up, down], ignore_index=True)
    sides = sides[sides.latent.between(0, n_latents - 1)]
    best = sides.sort_values(["latent", "q", "gain"], ascending=[True, True, False], kind="stable") \
        .drop_duplicates("latent")
    at = best.latent.astype(int).to_numpy()
    out.loc[at, "patient_group"] = best.group.astype(str).to_numpy()
    out.loc[at, "patient_vs"] = best.vs.astype(str).to_numpy()
    out.loc[at, "patient_q"] = best.q.to_numpy(dtype=float)
    out.loc[at, "patient_effect"] = best.gain.to_numpy(dtype=float)
    return out


def _plural(name: str, k: int) -> str:
    return name if k == 1 or name.endswith("s") else f"{name}s"


def _dataset_words(fired: list[str], names: list[str], freq: float) -> str:
    if len(names) == 1:
        return f"{freq:.0%} of {names[0]} images"
    if len(fired) == len(names):
        return f"all {len(names)} datasets"
    return f"{', '.join(fired)} only" if len(fired) <= 2 else f"{len(fired)} of {len(names)} datasets"


def text_of(r: dict, names: list[str]) -> str:
    """The one line: where, how far, what colour; classes; datasets; patients; flags."""
    if r["dead"]:
        return f"dead: fires on no image of {', '.join(names)}"
    colour, spots = r["colour_name"], r.get("spot_colour_name")
    if isinstance(spots, str):  # (a column of names and None reads back None as NaN)
        colour = f"{colour} with {spots} spots" if colour else f"{spots} spots"
    where = [w for w in (r["region"], r["extent"], colour) if w]
    parts = [", ".join(where)] if where else []
    ap = f"AP {r['best_class_ap']:.2f}" if np.isfinite(r["best_class_ap"]) else None
    if r["top_class"]:
        top = f"top-{r['top_n']}: {r['top_count']} {_plural(r['top_class'], r['top_count'])}"
        if ap and r["best_class"] == r["top_class"]:
            top += f" ({ap})"
        elif ap:
            top += f"; best class {r['best_class']} ({ap})"
        parts.append(top)
    elif ap:
        parts.append(f"best class {r['best_class']} ({ap})")
    parts.append(_dataset_words(r["datasets"].split(", ") if r["datasets"] else [], names, r["freq_image"]))
    if r["patient_group"] is not None and np.isfinite(r["patient_q"]) and r["patient_q"] < Q_SAID:
        parts.append(f"{r['patient_group']}-enriched q={r['patient_q']:.2g}")
    if r["flags"]:
        parts.append(f"[{r['flags']}]")
    return "; ".join(parts)


# ---------------------------------------------------------------- the whole description


@dataclass
class Descriptions:
    table: pd.DataFrame  # one row per latent
    summary: dict


def store_classes(stores: dict, label_column: str) -> list[str]:
    from cytosae.analysis.stats import _labels_of

    return sorted({c for st in stores.values() if label_column in st.images.columns
                   for v in st.images[label_column] for c in _labels_of(v)})


def has_images(store) -> bool:
    """The images the model saw can be rebuilt: preprocessing recorded and a patch grid (not imported vectors)."""
    return bool(store.meta.get("settings", {}).get("preprocessing")) and \
        _grid(store.n_tokens, store.has_cls) is not None


def describe_latents(sae, stores: dict, top_images: pd.DataFrame | None = None, compare: pd.DataFrame | None = None,
                     label_column: str = "label", batch_size: int = 8, device: str | torch.device = "cpu",
                     max_nonzeros: int = 200_000_000) -> Descriptions:
    """Every latent of `sae` on every store of `stores` (name -> ActivationStore), with the class facts of
    stats' `top_images` and the patient facts of patients' `compare` when given (module docstring)."""
    from cytosae.analysis.encoded import EncodedStore

    n_latents = sae.cfg.n_latents
    classes = store_classes(stores, label_column)
    totals, offset, kept = [], 0, 0
    for name, st in stores.items():
        views = ImageViews(st, _grid(st.n_tokens, st.has_cls)) if has_images(st) else None
        totals.append(accumulate(EncodedStore(st, sae, torch.device(device), batch_size), name, classes,
                                 label_column, offset, views, max_nonzeros, kept))
        offset += totals[-1].n_labelled
        kept += sum(len(p[0]) for p in totals[-1].nonzero)
    names = list(stores)
    fire = np.stack([t.get("fire") for t in totals])  # (n_stores, n_latents) images where it fires
    n_images = sum(t.n_images for t in totals)
    table = pd.concat([pd.DataFrame({"latent": np.arange(n_latents, dtype=np.int64)}), where_facts(totals, n_latents),
                       class_facts(totals, classes, n_latents), top_class_facts(top_images, n_latents),
                       patient_facts(compare, n_latents)], axis=1)
    table["freq_image"] = fire.sum(0) / max(n_images, 1)
    table["datasets"] = [", ".join(n for n, f in zip(names, fire[:, j]) if f > 0) for j in range(n_latents)]
    table["n_datasets"] = (fire > 0).sum(0).astype(np.int64)
    table["dead"] = table.n_datasets == 0
    table["background_only"] = table.share_background.fillna(0) >= BACKGROUND_ONLY
    table["image_border"] = table.share_edge_ring.fillna(0) >= EDGE_RING
    table["fires_on_everything"] = table.freq_image >= EVERYTHING
    flag_cols = {"dead": "dead", "background_only": "background-only", "image_border": "image-border",
                 "fires_on_everything": "fires-on-everything"}
    table["flags"] = [",".join(w for c, w in flag_cols.items() if r[c]) for r in table[list(flag_cols)]
                      .to_dict("records")]
    table["text"] = [text_of(r, names) for r in table.to_dict("records")]
    summary = {"n_latents": n_latents, "sae": {"arch": sae.cfg.arch, "n_latents": n_latents, "d_in": sae.cfg.d_in},
               "stores": [{"dataset": t.name, "n_images": t.n_images, "n_labelled": t.n_labelled, "grid": t.grid,
                           "regions_and_colours": t.measured} for t in totals],
               "label_column": label_column, "classes": classes, "n_labelled": offset,
               "top_images": top_images is not None, "patients": compare is not None,
               "counts": {"dead": int(table.dead.sum()), "background_only": int(table.background_only.sum()),
                          "image_border": int(table.image_border.sum()),
                          "fires_on_everything": int(table.fires_on_everything.sum()),
                          "by_region": {str(k): int(v) for k, v in table.region.value_counts().items()},
                          "by_extent": {str(k): int(v) for k, v in table.extent.value_counts().items()}},
               "thresholds": THRESHOLDS, "definitions": DEFINITIONS.strip()}
    return Descriptions(table[list(REQUIRED_COLUMNS) + [c for c in table.columns if c not in REQUIRED_COLUMNS]],
                        summary)


def write_descriptions(desc: Descriptions, out_dir: str | Path, inputs: dict | None = None) -> list[Path]:
    """OUT/descriptions.parquet (one row per latent) and OUT/descriptions.json (what was measured on what)."""
    from cytosae.store.format import atomic_write_json, atomic_write_parquet

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / DESCRIPTIONS, out / DESCRIPTIONS_JSON]
    atomic_write_parquet(paths[0], desc.table)
    atomic_write_json(paths[1], {**desc.summary, "inputs": inputs or {}})
    return paths


def read_descriptions(run) -> pd.DataFrame | None:
    """RUN/concepts/descriptions.parquet (a run folder, a Run, or the concepts folder itself), checked for the
    columns readers rely on; None when the run has no descriptions yet (`cytosae describe --run RUN`)."""
    base = Path(getattr(run, "path", run))
    path = base / DESCRIPTIONS if (base / DESCRIPTIONS).is_file() else base / CONCEPTS / DESCRIPTIONS
    if not path.is_file():
        return None
    try:
        table = pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several kinds for a damaged file
        raise ValueError(f"{path} cannot be read ({type(exc).__name__}: {exc}); rerun `cytosae describe`") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"{path} lacks column(s) {missing}: it was written by another version; rerun "
                         f"`cytosae describe`")
    return table
