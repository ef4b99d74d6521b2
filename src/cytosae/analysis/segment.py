"""Cell regions of a single-cell blood image, without a trained model (issue #19).

`segment_cell(rgb)` labels each pixel of an (H, W, 3) uint8 RGB image (the 224 px input the model saw:
`Preprocess(...).resize_image(pil)`) as background, cytoplasm, nucleus or border, for May-Grünwald-Giemsa /
Wright stained smears:

1. Foreground, in CIELAB (perceptual: a distance of ~2 is a just-noticeable difference). The smear's colour
   is the median of the brighter half of the frame's pixels (a crop's edges are mostly smear; red cells there
   are darker); a pixel is foreground when more than FOREGROUND_DELTA_E from it. Holes are filled, so a cell
   whose cytoplasm is the smear's colour but whose membrane shows counts whole.
2. Nucleus candidates: chromatin takes up the basic dyes and is dark and blue, so its score L* + b* (median
   over 5 px, which sees through granules) is low: under Otsu's split of the foreground's score, kept within
   the gap measured between nuclei and cytoplasm or red cells; an opening drops lone granules and specks.
3. The cell: the nucleus candidate nearest the image centre anchors it (a crop is centred on its cell);
   without any, the foreground component nearest the centre. Neighbours touching it are cut off in two
   ways. By shape: a watershed of the distance to the background, seeded by the anchor, by other cells'
   nuclei (dark blobs the frame cuts or far from the anchor) and by every other blob's core; a blob joined
   by a neck nearly as wide as itself merges back (a lobe, an eccentric cytoplasm). By colour: a red cell
   pressed flat against the cell leaves no neck, but it is pink where cytoplasm is blue, lilac or granular,
   so pixels closer in colour to the neighbours than to the rim of cytoplasm round the nucleus are cut.
   Everything outside the cell, neighbour cells and red cells included, is background.
4. Border: the cell's pixels within `border_px(size)` of the background or the image edge (3 px at 224 px,
   scaled to the image's shorter side), whatever they lie on: the outer ring where the membrane is.

`patch_regions(labels, grid)` turns labels into each region's share of every ViT patch, in token order.
Everything here is a pure function of its input: no state, no randomness.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from skimage.color import rgb2lab
from skimage.feature import peak_local_max
from skimage.filters import gaussian, threshold_otsu
from skimage.morphology import convex_hull_image, disk, remove_small_holes, remove_small_objects
from skimage.segmentation import watershed

REGIONS = ("background", "cytoplasm", "nucleus", "border")
BACKGROUND, CYTOPLASM, NUCLEUS, BORDER = range(4)
FOREGROUND_DELTA_E = 5.0  # CIELAB units from the smear's colour (JPEG noise on a smear: ~1-2)
FRAME_SHARE = 0.06  # the outer margin, as a share of the image's side, whose colour is the smear's
BORDER_PX_AT_224 = 3
SMALL_HOLE_PX = 300  # at 224 px: a red cell's central pallor or a vacuole; larger holes are gaps between cells
NUCLEUS_SCORE = (25.0, 35.0)  # L* + b*: nuclei measured -20 to 25, cytoplasm 40 to 70, red cells 50 to 80
NEAR_NUCLEUS_PX = 4  # at 224: the rim of cytoplasm round the nucleus whose colour is the cell's own
MIN_REF_PX = 40  # at 224: fewest pixels to take the cytoplasm's colour from
MIN_NEIGHBOUR_PX = 300  # at 224: fewest pixels to take the neighbours' colour from (a red cell: ~450)
CUT_LIGHTNESS_WEIGHT = 0.5  # L* counts half against a*, b* when telling cytoplasm from red cells
MIN_COLOUR_CONTRAST = 6.0  # CIELAB units between the cell's cytoplasm and its neighbours to cut by colour
NECK_SHARE = 0.7  # a neck this share of the narrower blob's half-width or wider joins it to the cell
LOBE_GAP_PX = 20  # at 224: dark blobs farther than this from the cell's nucleus, or cut by the frame...
MIN_NUCLEUS_PX = 150  # at 224: ...belong to other cells when this large (platelets, granule clumps: smaller)
MIN_NEIGHBOUR_RADIUS = 5.0  # px at 224: a blob thinner than this seeds no neighbour (a red cell: ~10-12)


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


def _background_colour(lab: np.ndarray) -> np.ndarray:
    """The smear's colour: the median of the brighter half of the frame's pixels (a crop's edges are mostly
    smear, and red cells or neighbours there are darker than it)."""
    m = max(1, round(FRAME_SHARE * min(lab.shape[:2])))
    frame = np.concatenate([lab[:m].reshape(-1, 3), lab[-m:].reshape(-1, 3),
                            lab[m:-m, :m].reshape(-1, 3), lab[m:-m, -m:].reshape(-1, 3)])
    light = frame[:, 0]
    return np.median(frame[light >= np.median(light)], axis=0)


def _foreground(lab: np.ndarray, s: float) -> tuple[np.ndarray, np.ndarray]:
    """(blobs, filled): pixels unlike the smear with their small holes (a red cell's pallor, a vacuole) filled,
    and with all holes filled. Filling every hole makes a cell whole whose cytoplasm is the smear's colour
    but whose membrane shows; it also fills the gaps between touching cells, so their shapes come from `blobs`."""
    fg = np.linalg.norm(lab - _background_colour(lab), axis=-1) > FOREGROUND_DELTA_E
    # Closing joins a faint membrane's gaps before holes are filled.
    fg = ndi.binary_closing(np.pad(fg, 2), structure=disk(max(1, round(s))))[2:-2, 2:-2]
    fg = remove_small_objects(fg, max_size=round(20 * s * s))
    blobs = remove_small_holes(fg, max_size=round(SMALL_HOLE_PX * s * s))
    return blobs, ndi.binary_fill_holes(fg)


def _dark(lab: np.ndarray, fg: np.ndarray, s: float) -> np.ndarray:
    """Nucleus candidates: chromatin takes up the basic dyes, so it is dark and blue (low L* + b*), while red
    cells are pink (b* > 0) and cytoplasm lighter. Otsu's split of the foreground's score, kept inside the gap
    measured between nuclei and cytoplasm or red cells on Acevedo and DeepAPL smears."""
    # The median over a few px sees through granules lying on the nucleus, which are pale or orange.
    score = ndi.median_filter(lab[..., 0] + lab[..., 2], size=max(3, round(5 * s)) | 1)
    values = score[fg]
    t = threshold_otsu(values) if values.size >= 16 and np.ptp(values) > 1 else NUCLEUS_SCORE[1]
    dark = fg & (score < np.clip(t, *NUCLEUS_SCORE))
    # Granules lying on the nucleus (eosinophil, neutrophil) punch small holes in it; granules and specks
    # lying alone are thinner than the opening.
    dark = remove_small_holes(dark, max_size=round(30 * s * s))
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


def _foreign_nuclei(dark: np.ndarray, anchor: np.ndarray, s: float) -> np.ndarray:
    """Dark blobs large enough to be a nucleus that belong to other cells: those the image's frame cuts (a
    crop is centred on its own cell) and those far from the anchor (a neutrophil's lobes lie close together)."""
    comps, n = ndi.label(dark & ~anchor)
    if n == 0:
        return np.zeros_like(dark)
    index = np.arange(1, n + 1)
    near = ndi.minimum(ndi.distance_transform_edt(~anchor), comps, index=index)
    area = ndi.sum(np.ones(dark.shape), comps, index=index)
    frame = np.zeros(n + 1, dtype=bool)
    frame[np.unique(np.concatenate([comps[0], comps[-1], comps[:, 0], comps[:, -1]]))] = True
    far = np.flatnonzero((area >= MIN_NUCLEUS_PX * s * s) & ((near > LOBE_GAP_PX * s) | frame[1:])) + 1
    return np.isin(comps, far)


def _saddles(ws: np.ndarray, dist: np.ndarray, n: int) -> np.ndarray:
    """Per watershed region 0..n, the widest neck (highest distance to the background) it shares with region 1."""
    saddle = np.zeros(n + 1)
    for a, b, da, db in ((ws[:, :-1], ws[:, 1:], dist[:, :-1], dist[:, 1:]), (ws[:-1], ws[1:], dist[:-1], dist[1:])):
        for one, other, d_one, d_other in ((a, b, da, db), (b, a, db, da)):
            edge = (one == 1) & (other > 1)
            np.maximum.at(saddle, other[edge], np.minimum(d_one, d_other)[edge])
    return saddle


def _cell(blobs: np.ndarray, filled: np.ndarray, anchor: np.ndarray, foreign: np.ndarray, s: float) -> np.ndarray:
    """The filled foreground blob holding `anchor`, cut from touching neighbours at the necks between blobs: a
    watershed of the distance to the background, seeded by the anchor, the `foreign` nuclei (other cells') and
    every other blob's core. A blob
    joined to the cell by a neck nearly as wide as the narrower of the two is the cell's own bulge (a lobe, an
    eccentric cytoplasm), and merges back."""
    comps, _ = ndi.label(filled)
    ids = np.unique(comps[anchor])
    region = np.isin(comps, ids[ids > 0])
    dist = ndi.distance_transform_edt(blobs & region)
    peaks = peak_local_max(dist, min_distance=max(2, round(8 * s)), threshold_abs=MIN_NEIGHBOUR_RADIUS * s,
                           labels=region.astype(int), exclude_border=False)
    markers, n_foreign = ndi.label(foreign & region)
    markers[markers > 0] += 1
    peaks = [p for p in peaks if not (anchor | foreign)[p[0], p[1]]]
    for i, (y, x) in enumerate(peaks, start=n_foreign + 2):
        markers[y, x] = i
    markers[anchor] = 1
    n = n_foreign + len(peaks) + 1
    ws = watershed(-dist, markers, mask=region)
    height = ndi.maximum(dist, ws, index=np.arange(n + 1))
    for _ in range(len(peaks)):  # merging a bulge can make its own neighbours adjacent to the cell
        own = dist[ws == 1].max()
        bulge = np.flatnonzero(_saddles(ws, dist, n) > NECK_SHARE * np.minimum(height, own))
        bulge = bulge[bulge > n_foreign + 1]  # another cell's nucleus never merges
        if not bulge.size:
            break
        ws[np.isin(ws, bulge)] = 1
    return ndi.binary_fill_holes(ws == 1)


def _unlike_neighbours(lab: np.ndarray, cell: np.ndarray, dark: np.ndarray, filled: np.ndarray,
                       s: float) -> np.ndarray:
    """Cut from `cell` what is coloured like its neighbours rather than like its own cytoplasm: a red cell
    pressed flat against a white cell leaves no neck for the watershed, but it is pink (eosin) where cytoplasm
    is blue, lilac or granular. Colours are compared smoothed over granule texture; when the cytoplasm next to
    the nucleus and the neighbours' colour are too alike to tell apart, the cell is kept as the shapes cut it."""
    nucleus = cell & dark
    # Neighbours: foreground beyond a gap round the cell's convex hull, not the crumbs a watershed line leaves
    # inside its outline (granule clumps in a cytoplasm the smear's colour).
    hull = convex_hull_image(cell) if cell.any() else cell
    others = filled & ~dark & ~ndi.binary_dilation(hull, structure=disk(max(1, round(3 * s))))
    near = cell & ~nucleus & (ndi.distance_transform_edt(~nucleus) <= NEAR_NUCLEUS_PX * s)
    if not nucleus.any() or others.sum() < MIN_NEIGHBOUR_PX * s * s or near.sum() < MIN_REF_PX * s * s:
        return cell
    smooth = gaussian(lab, sigma=1.5 * s, channel_axis=-1)
    own, theirs = np.median(smooth[near], axis=0), np.median(smooth[others], axis=0)
    if np.linalg.norm(own - theirs) < MIN_COLOUR_CONTRAST:
        return cell
    w = np.array([CUT_LIGHTNESS_WEIGHT, 1.0, 1.0])  # thickness changes lightness more than the stain's hue
    like_own = np.linalg.norm((smooth - own) * w, axis=-1) <= np.linalg.norm((smooth - theirs) * w, axis=-1)
    # A majority over a few px: granular cytoplasm has single pixels of either colour.
    like_own = gaussian(like_own.astype(np.float32), sigma=2 * s) > 0.5
    keep = ndi.binary_opening(cell & (like_own | nucleus), structure=disk(max(1, round(3 * s))))
    comps, _ = ndi.label(keep)
    ids = np.unique(comps[nucleus & keep])
    return ndi.binary_fill_holes(np.isin(comps, ids[ids > 0]) | nucleus)


def segment_cell(rgb: np.ndarray) -> np.ndarray:
    """uint8 (H, W) labels in REGIONS values of one (H, W, 3) uint8 RGB single-cell image. An image with no
    foreground (blank or uniform) is all background."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"segment_cell: expected an (H, W, 3) uint8 RGB image, got {rgb.shape} {rgb.dtype}")
    s = _scale(rgb.shape[:2])
    lab = rgb2lab(rgb)
    blobs, fg = _foreground(lab, s)
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
    cell = _unlike_neighbours(lab, _cell(blobs, fg, anchor, _foreign_nuclei(dark, anchor, s), s), dark, fg, s)
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
