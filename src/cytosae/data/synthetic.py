"""A built-in synthetic sample: single-cell images with known generating factors.

Each cell is drawn from its class's factor values (nucleus shape and lobes,
granule colour and density, size) with per-cell variation, plus two factors drawn
independently of the class for every cell (cytoplasm colour and smear background),
so that a latent can be checked against a factor that is not just the class in
disguise. Patients differ in class mix by diagnosis, and a small share of the cells of
APL-like patients carry diagnostic inclusions (dark red rods in the cytoplasm, like Auer
rods) that no other patient's cells ever have: factor `inclusion` ("auer_rods" / "none"),
the few cells a patient-level model should attend to. The factors are written to the
manifest, so they are ground truth for checking what SAE latents found.
Every image has its own RNG seeded by (seed, index): deterministic and order-free.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

GRANULE_RGB = {"none": None, "pink": (225, 120, 160), "orange": (230, 90, 30), "purple": (70, 30, 120)}
CYTOPLASM_RGB = {"pale": (235, 215, 225), "blue": (150, 170, 220), "grey": (190, 185, 200)}
BACKGROUND_RGB = {"pink": (238, 214, 222), "lilac": (214, 206, 240), "white": (248, 248, 246)}
# Drawn per cell, independently of the class (uniformly over these values).
INDEPENDENT_FACTORS = {"cytoplasm_colour": tuple(CYTOPLASM_RGB), "background": tuple(BACKGROUND_RGB)}


@dataclass(frozen=True)
class CellClass:
    name: str
    nucleus_shape: str  # round | kidney | lobed
    lobes: int
    granule_colour: str
    granule_density: float  # granules per 100 px^2 of cytoplasm
    size_px: int  # cell radius at 224 px


CLASSES = (
    CellClass("neutrophil", "lobed", 3, "pink", 0.6, 52),
    CellClass("eosinophil", "lobed", 2, "orange", 2.0, 56),
    CellClass("lymphocyte", "round", 1, "none", 0.0, 36),
    CellClass("monocyte", "kidney", 1, "none", 0.0, 66),
    CellClass("blast", "round", 1, "none", 0.0, 58),
    CellClass("promyelocyte", "round", 1, "purple", 2.5, 64),
)
# Class mix per diagnosis: APL-like samples are dominated by granular promyelocytes.
DIAGNOSES = {
    "APL": (0.15, 0.05, 0.1, 0.05, 0.15, 0.5),
    "AML": (0.15, 0.05, 0.15, 0.1, 0.5, 0.05),
}
FACTORS = ("nucleus_shape", "lobes", "granule_colour", "granule_density", "size_px", "cytoplasm_colour", "background",
           "inclusion")
# Diagnostic cells: the share of an APL-like patient's cells with rods. Drawn from their own RNG stream, so every
# other factor (and every cell without rods) is the same pixel for pixel with or without them.
DIAGNOSTIC_CELLS = {"APL": 0.1}
ROD_RGB = (150, 0, 25)
# Region values of the true masks (`true_regions`), the same as cytosae.analysis.segment.REGIONS.
MASK_CYTOPLASM, MASK_NUCLEUS = 1, 2


def _both(d: ImageDraw.ImageDraw, md: ImageDraw.ImageDraw | None, shape: str, xy, fill, region: int, **kw) -> None:
    """Draw one shape on the image and, when a mask is drawn too, the same shape in its region value.
    The mask never consumes RNG draws, so an image is the same pixel for pixel with or without it."""
    getattr(d, shape)(xy, fill=fill, **kw)
    if md is not None:
        getattr(md, shape)(xy, fill=region, **{k: (region if k == "outline" else v) for k, v in kw.items()})


def _draw_cell(cls: CellClass, rng: np.random.Generator, size: int,
               rods: np.random.Generator | None = None, mask: Image.Image | None = None) -> tuple[Image.Image, dict]:
    """`mask`: an "L" image of `size` that receives the cell's regions (granules and rods lie in the
    region under them, so they are not drawn there)."""
    s = size / 224
    md = ImageDraw.Draw(mask) if mask is not None else None
    cytoplasm_colour, background = (str(rng.choice(v)) for v in INDEPENDENT_FACTORS.values())
    img = Image.new("RGB", (size, size), BACKGROUND_RGB[background])
    d = ImageDraw.Draw(img)
    cx, cy = size / 2 + rng.normal(0, 4 * s), size / 2 + rng.normal(0, 4 * s)
    r = cls.size_px * s * rng.uniform(0.92, 1.08)
    cyto = np.array(CYTOPLASM_RGB[cytoplasm_colour]) + rng.integers(-8, 9, 3)
    _both(d, md, "ellipse", [cx - r, cy - r, cx + r, cy + r], tuple(int(v) for v in cyto), MASK_CYTOPLASM,
          outline=(170, 140, 170))
    nuc = (80 + int(rng.integers(-10, 10)), 40, 120 + int(rng.integers(-10, 10)))
    if cls.nucleus_shape == "round":
        nr = r * rng.uniform(0.62, 0.72)
        _both(d, md, "ellipse", [cx - nr, cy - nr, cx + nr, cy + nr], nuc, MASK_NUCLEUS)
    elif cls.nucleus_shape == "kidney":
        nr = r * 0.55
        _both(d, md, "ellipse", [cx - nr, cy - nr * 0.8, cx + nr, cy + nr * 0.8], nuc, MASK_NUCLEUS)
        _both(d, md, "ellipse", [cx - nr * 0.4, cy - nr * 0.2 - nr * 0.9, cx + nr * 0.4, cy - nr * 0.2],
              tuple(cyto.astype(int)), MASK_CYTOPLASM)
    else:  # lobed: lobes on an arc joined by thin strands
        angle0 = rng.uniform(0, 2 * np.pi)
        pts = []
        for j in range(cls.lobes):
            a = angle0 + j * 2 * np.pi / (cls.lobes + 1.5)
            pts.append((cx + 0.45 * r * np.cos(a), cy + 0.45 * r * np.sin(a)))
        for p, q in zip(pts, pts[1:]):
            _both(d, md, "line", [p, q], nuc, MASK_NUCLEUS, width=max(2, int(4 * s)))
        lr = r * 0.28
        for x, y in pts:
            _both(d, md, "ellipse", [x - lr, y - lr, x + lr, y + lr], nuc, MASK_NUCLEUS)
    if cls.granule_colour != "none":
        n = int(cls.granule_density * np.pi * r * r / 100 * rng.uniform(0.8, 1.2))
        g = np.array(GRANULE_RGB[cls.granule_colour])
        gr = max(1.0, 1.6 * s)
        for _ in range(n):
            rho, th = r * np.sqrt(rng.uniform(0, 0.9)), rng.uniform(0, 2 * np.pi)
            x, y = cx + rho * np.cos(th), cy + rho * np.sin(th)
            col = tuple(int(v) for v in np.clip(g + rng.integers(-15, 16, 3), 0, 255))
            d.ellipse([x - gr, y - gr, x + gr, y + gr], fill=col)
    if rods:
        _draw_rods(d, cx, cy, r, s, rods)
    img = img.filter(ImageFilter.GaussianBlur(0.6 * s))
    factors = {"nucleus_shape": cls.nucleus_shape, "lobes": cls.lobes, "granule_colour": cls.granule_colour,
               "granule_density": cls.granule_density, "size_px": cls.size_px,
               "cytoplasm_colour": cytoplasm_colour, "background": background,
               "inclusion": "auer_rods" if rods else "none"}
    return img, factors


def _draw_rods(d: ImageDraw.ImageDraw, cx: float, cy: float, r: float, s: float, rng: np.random.Generator) -> None:
    """Two or three thick rods between nucleus and membrane, at random angles."""
    for _ in range(int(rng.integers(2, 4))):
        a, tilt = rng.uniform(0, 2 * np.pi), rng.uniform(-0.6, 0.6)
        mx, my = cx + 0.78 * r * np.cos(a), cy + 0.78 * r * np.sin(a)
        dx, dy = 0.3 * r * np.cos(a + np.pi / 2 + tilt), 0.3 * r * np.sin(a + np.pi / 2 + tilt)
        d.line([(mx - dx, my - dy), (mx + dx, my + dy)], fill=ROD_RGB, width=max(2, int(5 * s)))


def _cells(seed: int, n_patients: int, cells_per_patient: int, diagnostic: dict[str, float] | None,
           mixes: dict[str, tuple[float, ...]] | None):
    """The sample's cells in manifest order: (patient_id, diagnosis, cell index in patient, class, cell RNG,
    rods RNG or None). make_sample and true_regions both draw from here, so a mask follows its image's draws."""
    diagnostic = DIAGNOSTIC_CELLS if diagnostic is None else diagnostic
    mixes = DIAGNOSES if mixes is None else mixes
    diagnoses = list(mixes)
    for p in range(n_patients):
        pid = f"P{p:03d}"
        dx = diagnoses[p % len(diagnoses)]
        for c in range(cells_per_patient):
            index = p * cells_per_patient + c
            rng = np.random.default_rng([seed, index])
            cls = CLASSES[int(rng.choice(len(CLASSES), p=mixes[dx]))]
            rods = np.random.default_rng([seed, index, 1])
            yield pid, dx, c, cls, rng, rods if rods.uniform() < diagnostic.get(dx, 0.0) else None


def make_sample(out_dir: str | Path, seed: int = 0, n_patients: int = 12, cells_per_patient: int = 24,
                size: int = 224, diagnostic: dict[str, float] | None = None,
                mixes: dict[str, tuple[float, ...]] | None = None) -> Path:
    """Draw the sample into `out_dir` (images, manifest.csv, patients.csv); returns the manifest path.
    `diagnostic`: per diagnosis, the share of its cells with rods (default DIAGNOSTIC_CELLS; {} for none).
    `mixes`: per diagnosis, the class mix (default DIAGNOSES); one mix for all makes the rods the only difference."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows, patients = [], {}
    for pid, dx, c, cls, rng, rods in _cells(seed, n_patients, cells_per_patient, diagnostic, mixes):
        if pid not in patients:
            patients[pid] = {"patient_id": pid, "diagnosis": dx}
            (out / pid).mkdir(exist_ok=True)
        img, factors = _draw_cell(cls, rng, size, rods)
        rel = f"{pid}/cell_{c:03d}.png"
        img.save(out / rel, optimize=False)
        rows.append({"path": rel, "label": cls.name, "patient_id": pid, "diagnosis": dx, **factors})
    for name, table in (("manifest.csv", rows), ("patients.csv", list(patients.values()))):
        with open(out / name, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(table[0]))
            w.writeheader()
            w.writerows(table)
    return out / "manifest.csv"


def true_regions(seed: int = 0, n_patients: int = 12, cells_per_patient: int = 24, size: int = 224,
                 diagnostic: dict[str, float] | None = None, mixes: dict[str, tuple[float, ...]] | None = None,
                 out_size: int = 224) -> dict[str, np.ndarray]:
    """The true region labels of the sample make_sample draws with the same arguments, keyed by manifest `path`:
    uint8 (out_size, out_size) in cytosae.analysis.segment.REGIONS values (0 background, 1 cytoplasm, 2 nucleus,
    3 border: the cell's outer ring, marked by segment.mark_border as for a segmentation). The shapes come from
    the same RNG draws as the images (the images' bytes are unchanged); a mask drawn at another `size` is
    resized to `out_size` by nearest neighbour, as the model's 224 px input would be squashed."""
    from cytosae.analysis.segment import mark_border  # analysis imports data; imported here to keep data first

    masks = {}
    for pid, _, c, cls, rng, rods in _cells(seed, n_patients, cells_per_patient, diagnostic, mixes):
        mask = Image.new("L", (size, size), 0)
        _draw_cell(cls, rng, size, rods, mask=mask)
        if size != out_size:
            mask = mask.resize((out_size, out_size), Image.NEAREST)
        masks[f"{pid}/cell_{c:03d}.png"] = mark_border(np.asarray(mask, dtype=np.uint8).copy())
    return masks
