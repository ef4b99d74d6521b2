"""Stain (colour) normalisation against a reference image, with torchstain's numpy normalisers.

Cohorts stained or scanned in different labs differ in colour; a backbone sees that difference and so do its
SAE's concepts. Macenko (stain vectors in optical density) or Reinhard (LAB means and standard deviations)
maps every image onto a reference image's colours before resizing.

`fit_stain` fits once on the reference and keeps only the fitted numbers (`Stain.params`, plain floats): the
store records those, not the reference's path, so a moved run reproduces the same colours and a resume with
another reference is refused (its preprocessing settings differ). The normaliser applied to every image is
always rebuilt from those numbers, so a fresh run and a resumed one compute the same bytes.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
from PIL import Image

from .decode import ImageDecodeError, open_rgb

STAIN_METHODS = ("none", "macenko", "reinhard")


class StainError(Exception):
    """The normaliser could not be fitted on or applied to an image (e.g. a blank one: no stain to measure)."""


def _normaliser(method: str):
    from torchstain.numpy.normalizers import NumpyMacenkoNormalizer, NumpyReinhardNormalizer

    if method == "macenko":
        return NumpyMacenkoNormalizer()
    if method == "reinhard":
        return NumpyReinhardNormalizer()
    raise ValueError(f"stain method must be one of {', '.join(STAIN_METHODS)}, got {method!r}")


def _guarded(fn, *args):
    """Run a torchstain step with numpy's floating-point errors raised: a blank image divides by a zero
    standard deviation or fits on no stained pixel, which would otherwise yield NaN pixels silently."""
    try:
        with np.errstate(divide="raise", invalid="raise", over="raise"):
            return fn(*args)
    except (FloatingPointError, ValueError, IndexError, ZeroDivisionError, np.linalg.LinAlgError) as exc:
        raise StainError(f"{type(exc).__name__}: {exc}; a blank or uniform image has no stain to measure") from None


def _stained_pixels(arr: np.ndarray) -> int:
    """Pixels Macenko fits on: optical density at least 0.15 in every channel (torchstain's Io=240, beta=0.15).
    Counted first so that a white frame fails with a clear reason instead of numpy's empty-slice warnings."""
    od = -np.log((arr.reshape(-1, 3).astype(np.float64) + 1) / 240)
    return int((od >= 0.15).all(axis=1).sum())


def _check_macenko(arr: np.ndarray) -> None:
    if _stained_pixels(arr) < 3:  # its covariance needs a few pixels
        raise StainError("no stained pixels: a blank image has no stain to measure")


@dataclass(frozen=True)
class Stain:
    """A fitted normaliser: method, its fitted numbers (JSON-ready) and the reference image's sha256."""

    method: str
    params: dict
    reference_sha256: str

    def __post_init__(self) -> None:
        if self.method not in STAIN_METHODS[1:]:
            raise ValueError(f"stain method must be one of {', '.join(STAIN_METHODS[1:])}, got {self.method!r}")
        expected = {"macenko": {"stain_matrix", "max_concentrations"},
                    "reinhard": {"target_means", "target_stds"}}[self.method]
        if set(self.params) != expected:
            raise ValueError(f"{self.method} stain parameters must be {sorted(expected)}, got {sorted(self.params)}")

    def __hash__(self) -> int:  # params is a dict; the sha256 and method identify a fit
        return hash((self.method, self.reference_sha256))

    @cached_property
    def _normaliser(self):
        n = _normaliser(self.method)
        p = self.params
        if self.method == "macenko":
            n.HERef = np.asarray(p["stain_matrix"], dtype=np.float64)
            n.maxCRef = np.asarray(p["max_concentrations"], dtype=np.float64)
        else:  # float32, as torchstain's own fit leaves them: the same arithmetic as a freshly fitted normaliser
            n.target_means = np.asarray(p["target_means"], dtype=np.float32)
            n.target_stds = np.asarray(p["target_stds"], dtype=np.float32)
        return n

    def apply(self, img: Image.Image) -> Image.Image:
        """`img` (RGB) in the reference's colours; StainError if the normaliser fails on it."""
        arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
        if self.method == "macenko":
            _check_macenko(arr)
            out = _guarded(lambda a: self._normaliser.normalize(a, stains=False)[0], arr)
        else:
            out = _guarded(self._normaliser.normalize, arr)
        return Image.fromarray(np.ascontiguousarray(out, dtype=np.uint8), "RGB")

    def to_dict(self) -> dict:
        return {"method": self.method, "params": self.params, "reference_sha256": self.reference_sha256}

    @classmethod
    def from_dict(cls, d: dict) -> "Stain":
        return cls(method=d["method"], params=d["params"], reference_sha256=d["reference_sha256"])


def fit_stain(method: str, reference: str | Path) -> Stain:
    """Fit `method` (macenko | reinhard) on the reference image; ValueError naming the file if it cannot be."""
    ref = Path(reference)
    n = _normaliser(method)
    try:
        arr = np.asarray(open_rgb(ref), dtype=np.uint8)
    except ImageDecodeError as exc:
        raise ValueError(f"stain reference {exc.path}: {exc.reason}") from None
    try:
        if method == "macenko":
            _check_macenko(arr)
        _guarded(n.fit, arr)
    except StainError as exc:
        raise ValueError(f"stain reference {ref}: {method} normalisation cannot be fitted on it ({exc}); "
                         "choose a reference image with a stained cell on a normal background") from None
    if method == "macenko":
        params = {"stain_matrix": np.asarray(n.HERef, dtype=np.float64).tolist(),
                  "max_concentrations": np.asarray(n.maxCRef, dtype=np.float64).tolist()}
    else:
        params = {"target_means": [float(v) for v in n.target_means], "target_stds": [float(v) for v in n.target_stds]}
    if not all(np.isfinite(v).all() for v in map(np.asarray, params.values())):
        raise ValueError(f"stain reference {ref}: the fitted {method} parameters are not finite; choose another image")
    if method == "reinhard" and min(params["target_stds"]) < 1e-3:  # every image would become one flat colour
        raise ValueError(f"stain reference {ref}: the image has a uniform colour (no stain to match); "
                         "choose a reference image with a stained cell")
    return Stain(method, params, hashlib.sha256(ref.read_bytes()).hexdigest())
