"""Cell regions of a single-cell blood image, without a trained model (issue #19).

`segment_cell(rgb)` labels each pixel of an (H, W, 3) uint8 RGB image (the 224 px input the model saw:
`Preprocess(...).resize_image(pil)`) as background, cytoplasm, nucleus or border, for May-Grünwald-Giemsa /
Wright stained smears:

1. Colour in CIELAB (perceptual: a distance of ~2 is a just-noticeable difference). The smear background is
   the brightest part of a blood film, so its colour is the median of the brightest 20 % of the pixels; a
   pixel belongs to the foreground when it is more than FOREGROUND_DELTA_E from it. Holes are filled, so a
   cell whose cytoplasm is the background's colour but whose membrane is visible still counts whole.
2. Nucleus candidates: the dark stained chromatin, foreground pixels whose lightness L* is under Otsu's
   threshold between the foreground's dark and light modes; an opening removes granules and specks.
3. The cell: the nucleus candidate nearest the image centre anchors it (a crop is centred on its cell);
   without any, the foreground component nearest the centre. Neighbour cells and red cells touching it are
   cut off along the necks of the foreground (a watershed of the distance to the background, seeded by the
   anchor and by every other blob), and everything outside the cell, neighbours included, is background.
4. Border: the cell's pixels within `border_px(size)` of the background (3 px at 224 px, scaled to the
   image's size), whatever they lie on: the outer ring where the membrane is.

`patch_regions(labels, grid)` turns labels into each region's share of every ViT patch, in token order.
Everything here is a pure function of its input: no state, no randomness.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from skimage.color import rgb2lab
from skimage.feature import peak_local_max
from skimage.filters import gaussian, threshold_otsu
from skimage.morphology import disk, remove_small_objects
from skimage.segmentation import watershed

REGIONS = ("background", "cytoplasm", "nucleus", "border")
BACKGROUND, CYTOPLASM, NUCLEUS, BORDER = range(4)
FOREGROUND_DELTA_E = 8.0  # CIELAB units from the background colour; smear background varies ~2-4
BRIGHTEST_SHARE = 0.2  # the share of brightest pixels whose median colour is the background's
BORDER_PX_AT_224 = 3


def border_px(size: int) -> int:
    """The border ring's width in px for an image whose shorter side is `size`: 3 at 224, at least 1."""
    return max(1, round(BORDER_PX_AT_224 * size / 224))


def mark_border(labels: np.ndarray) -> np.ndarray:
    """Relabel as BORDER the cell pixels (any non-background label) within border_px of the background or
    of the image edge; returns a new array. Used for segmentations and the synthetic true masks alike."""
    cell = labels != BACKGROUND
    if not cell.any():
        return labels.copy()
    dist = ndi.distance_transform_edt(np.pad(cell, 1))[1:-1, 1:-1]
    out = labels.copy()
    out[cell & (dist <= border_px(min(labels.shape)))] = BORDER
    return out


def _scale(shape: tuple[int, int]) -> float:
    return min(shape) / 224


def _foreground(lab: np.ndarray) -> np.ndarray:
    light = lab[..., 0]
    bright = light >= np.quantile(light, 1 - BRIGHTEST_SHARE)
    background = np.median(lab[bright], axis=0)
    fg = np.linalg.norm(lab - background, axis=-1) > FOREGROUND_DELTA_E
    return ndi.binary_fill_holes(fg)


def _dark(lab: np.ndarray, fg: np.ndarray, s: float) -> np.ndarray:
    """Nucleus candidates: foreground darker than Otsu's split of the foreground's lightness."""
    light = lab[..., 0][fg]
    if light.size < 16 or np.ptp(light) < 1:
        return np.zeros_like(fg)
    dark = fg & (lab[..., 0] < threshold_otsu(light))
    dark = ndi.binary_opening(dark, structure=disk(max(1, round(2 * s))))
    return remove_small_objects(dark, max_size=round(30 * s * s))


def _nearest_centre(components: np.ndarray, n: int) -> int:
    """The component (1..n) with a pixel nearest the image centre; 0 when n is 0."""
    if n == 0:
        return 0
    h, w = components.shape
    yy, xx = np.nonzero(components)
    d2 = (yy - (h - 1) / 2) ** 2 + (xx - (w - 1) / 2) ** 2
    best = np.full(n + 1, np.inf)
    np.minimum.at(best, components[yy, xx], d2)
    return int(np.argmin(best[1:]) + 1)


def _cell(fg: np.ndarray, anchor: np.ndarray, s: float) -> np.ndarray:
    """The foreground blob holding `anchor`, cut from touching neighbours at the necks between blobs."""
    comps, _ = ndi.label(fg)
    ids = np.unique(comps[anchor])
    region = np.isin(comps, ids[ids > 0])
    dist = ndi.distance_transform_edt(region)
    peaks = peak_local_max(dist, min_distance=max(2, round(8 * s)), labels=region.astype(int), exclude_border=False)
    markers = np.zeros(fg.shape, dtype=np.int32)
    # A peak whose inscribed disc reaches the anchor is the cell's own bulge, not a neighbour.
    to_anchor = ndi.distance_transform_edt(~anchor)
    other = [p for p in peaks if to_anchor[p[0], p[1]] > dist[p[0], p[1]] + 1]
    for i, (y, x) in enumerate(other, start=2):
        markers[y, x] = i
    markers[anchor] = 1
    cell = watershed(-dist, markers, mask=region) == 1
    return ndi.binary_fill_holes(cell)


def segment_cell(rgb: np.ndarray) -> np.ndarray:
    """uint8 (H, W) labels in REGIONS values of one (H, W, 3) uint8 RGB single-cell image. An image with no
    foreground (blank or uniform) is all background."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"segment_cell: expected an (H, W, 3) uint8 RGB image, got {rgb.shape} {rgb.dtype}")
    s = _scale(rgb.shape[:2])
    lab = rgb2lab(gaussian(rgb, sigma=max(0.5, s), channel_axis=-1, preserve_range=True).astype(np.uint8))
    fg = _foreground(lab)
    labels = np.zeros(rgb.shape[:2], dtype=np.uint8)
    if not fg.any():
        return labels
    dark = _dark(lab, fg, s)
    dark_comps, n_dark = ndi.label(dark)
    if n_dark:
        anchor = dark_comps == _nearest_centre(dark_comps, n_dark)
    else:
        fg_comps, n_fg = ndi.label(fg)
        anchor = fg_comps == _nearest_centre(fg_comps, n_fg)
    cell = _cell(fg, anchor, s)
    labels[cell] = CYTOPLASM
    labels[cell & dark] = NUCLEUS
    return mark_border(labels)


def segment_images(rgbs) -> np.ndarray:
    """uint8 (N, H, W) labels of N same-sized RGB images (an (N, H, W, 3) array or a sequence of them)."""
    out = [segment_cell(np.asarray(rgb)) for rgb in rgbs]
    if not out:
        return np.zeros((0, 0, 0), dtype=np.uint8)
    return np.stack(out)


def patch_regions(labels: np.ndarray, grid: int = 16) -> np.ndarray:
    """float32 (grid * grid, len(REGIONS)): each region's share of each patch's pixels, patches in row-major
    order (ViT patch-token order). Patch edges fall at floor(i * H / grid), so H need not divide by grid."""
    labels = np.asarray(labels)
    if labels.ndim != 2 or min(labels.shape) < grid:
        raise ValueError(f"patch_regions: expected (H, W) labels with H, W >= grid={grid}, got {labels.shape}")
    if labels.max(initial=0) >= len(REGIONS):
        raise ValueError(f"patch_regions: label {int(labels.max())} is not a REGIONS value (0..{len(REGIONS) - 1})")
    h, w = labels.shape
    rows = np.arange(h) * grid // h
    cols = np.arange(w) * grid // w
    patch = rows[:, None] * grid + cols[None, :]
    counts = np.bincount((patch * len(REGIONS) + labels).ravel(), minlength=grid * grid * len(REGIONS))
    counts = counts.reshape(grid * grid, len(REGIONS)).astype(np.float64)
    return (counts / counts.sum(axis=1, keepdims=True)).astype(np.float32)
