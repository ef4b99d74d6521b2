"""Preprocessing decoded blood-cell images for a ViT (decoding itself: cytosae.data.decode)."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .decode import (DEFAULT_MAX_ASPECT, DEFAULT_MAX_PIXELS, ImageDecodeError, _to_rgb,  # noqa: F401  (re-exported)
                     open_rgb)
from .stain import Stain, StainError

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE_POLICIES = ("squash", "pad", "crop")


# Above this many pixels a resize step takes the bounded route below. At 224 px that is a source side over 18,724 px
# or (crop) an aspect ratio over 83:1, never a cell image: images extracted before the bound keep their bytes.
MAX_INTERMEDIATE_PIXELS = 1 << 22  # 4.2 M pixels, 17 MB as PIL stores them


def _bicubic(img: Image.Image, size: tuple[int, int], box: tuple[float, ...] | None = None) -> Image.Image:
    """PIL's bicubic resize of `box` (the whole image by default) to `size`, with a bounded intermediate.

    PIL resamples horizontally first, into an image of the output's width and the source's height: squashing an
    8 x 400,000 image would allocate 224 x 400,000 pixels. Where that intermediate is large the two passes are
    run in the order with the smaller one (vertical first: the source's width x the output's height).
    """
    w, h = img.size
    x0, y0, x1, y1 = box or (0, 0, w, h)
    if size[0] * h <= MAX_INTERMEDIATE_PIXELS or size[0] * h <= w * size[1]:
        return img.resize(size, Image.BICUBIC, box=box)
    rows = img.resize((w, size[1]), Image.BICUBIC, box=(0, y0, w, y1))  # vertical pass only: w x size[1]
    return rows.resize(size, Image.BICUBIC, box=(x0, 0, x1, size[1]))


def _centre_crop(img: Image.Image, s: int) -> Image.Image:
    """Fit the shorter side to `s`, keep the centre s x s.

    Resizing the whole image and cropping it (as below for ordinary images, whose bytes stay as they were) would
    allocate s x 11.2 M pixels for an 8 x 400,000 image; there the centre square alone is resampled from the
    source (PIL's `box`), each output pixel taken from the same source position as before.
    """
    w, h = img.size
    scale = s / min(w, h)
    big_w, big_h = max(s, round(w * scale)), max(s, round(h * scale))
    left, top = (big_w - s) // 2, (big_h - s) // 2
    if big_w * big_h <= MAX_INTERMEDIATE_PIXELS and big_w * h <= MAX_INTERMEDIATE_PIXELS:
        return img.resize((big_w, big_h), Image.BICUBIC).crop((left, top, left + s, top + s))
    fx, fy = w / big_w, h / big_h
    return _bicubic(img, (s, s), box=(left * fx, top * fy, (left + s) * fx, (top + s) * fy))


@dataclass(frozen=True)
class Preprocess:
    """PIL RGB -> normalised float tensor (3, size, size).

    stain:  optional colour normalisation to a reference image (cytosae.data.stain), applied first, at the
            image's own resolution. Where it fails on an image (a blank one has no stain to measure) the image
            keeps its own colours and a warning names it: one odd image never stops an extraction.
    squash: resize to size x size ignoring aspect ratio (CytoSAE's choice; cells stay whole).
    pad:    fit the longer side, pad with white (a smear's background) to a square.
    crop:   fit the shorter side, centre crop (may cut the cell's edge).
    All resizing is bicubic with PIL's antialiasing.
    """

    size: int = 224
    resize: str = "squash"
    mean: tuple[float, float, float] = field(default=IMAGENET_MEAN)
    std: tuple[float, float, float] = field(default=IMAGENET_STD)
    stain: Stain | None = None

    def __post_init__(self) -> None:
        if self.resize not in RESIZE_POLICIES:
            raise ValueError(f"resize must be one of {RESIZE_POLICIES}, got {self.resize!r}")

    def normalise_colours(self, img: Image.Image, source: str | None = None) -> Image.Image:
        """`img` in the stain reference's colours; unchanged without a stain or where the normaliser fails."""
        if self.stain is None:
            return img
        try:
            return self.stain.apply(img)
        except StainError as exc:
            log.warning("%s stain normalisation failed on %s (%s); it keeps its own colours",
                        self.stain.method, source or "an image", exc)
            return img

    def resize_image(self, img: Image.Image, source: str | None = None) -> Image.Image:
        """The size x size RGB image the backbone sees: colour-normalised (with a stain), then resized.
        The explorer shows this, so a viewer sees the colours the model saw."""
        img = self.normalise_colours(img.convert("RGB"), source)
        s = self.size
        if self.resize == "squash":
            return _bicubic(img, (s, s))
        w, h = img.size
        if self.resize == "pad":
            scale = s / max(w, h)
            inner = _bicubic(img, (max(1, round(w * scale)), max(1, round(h * scale))))
            canvas = Image.new("RGB", (s, s), (255, 255, 255))
            canvas.paste(inner, ((s - inner.width) // 2, (s - inner.height) // 2))
            return canvas
        return _centre_crop(img, s)

    def __call__(self, img: Image.Image, source: str | None = None) -> torch.Tensor:
        arr = np.asarray(self.resize_image(img, source), dtype=np.float32) / 255.0
        x = torch.from_numpy(arr).permute(2, 0, 1)
        mean = torch.tensor(self.mean, dtype=torch.float32)[:, None, None]
        std = torch.tensor(self.std, dtype=torch.float32)[:, None, None]
        return ((x - mean) / std).contiguous()

    def to_dict(self) -> dict:
        d = {"size": self.size, "resize": self.resize, "mean": list(self.mean), "std": list(self.std)}
        if self.stain is not None:  # absent without one: stores written before stains existed still resume
            d["stain"] = self.stain.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess":
        stain = d.get("stain")
        return cls(size=int(d["size"]), resize=d["resize"], mean=tuple(d["mean"]), std=tuple(d["std"]),
                   stain=Stain.from_dict(stain) if stain else None)


class ImageDataset(Dataset):
    """Manifest rows -> (row index, tensor or None, reason or None); a bad image never raises."""

    def __init__(self, manifest, preprocess: Preprocess, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                 max_aspect: float | None = DEFAULT_MAX_ASPECT) -> None:
        self.paths = list(manifest["path"])
        self.preprocess = preprocess
        self.max_pixels, self.max_aspect = max_pixels, max_aspect

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            img = open_rgb(self.paths[i], self.max_pixels, self.max_aspect)  # both budgets before any resize
            return i, self.preprocess(img, str(self.paths[i])), None
        except ImageDecodeError as exc:
            return i, None, exc.reason


def collate_skipping(items: Sequence[tuple]):
    good = [(i, x) for i, x, _ in items if x is not None]
    skipped = [(i, reason) for i, x, reason in items if x is None]
    if good:
        images = torch.stack([x for _, x in good])
    else:
        images = torch.zeros((0, 3, 1, 1))
    return torch.tensor([i for i, _ in good], dtype=torch.long), images, skipped

