"""Decoding blood-cell images to RGB and preprocessing them for a ViT.

Every image type a slide scanner or a dataset may hand us (grayscale, palette,
RGBA, CMYK, 16-bit TIFF) becomes 8-bit RGB. Anything that cannot be decoded
raises `ImageDecodeError` so a caller can record it and move on: symlink loops,
dangling links and FIFOs are named without being opened (opening a FIFO blocks),
and images larger than a pixel budget are refused from their header, before decoding.
"""
from __future__ import annotations

import errno
import logging
import os
import stat
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from .stain import Stain, StainError

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE_POLICIES = ("squash", "pad", "crop")
# A 13000 x 13000 PNG compresses to 164 KB and decodes to 2 GB; a single-cell image is well under 1 MP.
DEFAULT_MAX_PIXELS = 50_000_000


class ImageDecodeError(Exception):
    def __init__(self, path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit microscopy TIFFs rarely use the full range; stretching by the image's own
        # min..max keeps the contrast visible instead of an almost black picture.
        a = np.asarray(img, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = np.zeros_like(a) if hi <= lo else (a - lo) / (hi - lo) * 255.0
        return Image.fromarray(np.round(a).astype(np.uint8), "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Smear backgrounds are bright; compositing on white keeps transparent margins background-like.
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
               (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def _regular_file_size(p: Path) -> int:
    """Size of the regular file at `p` (following symlinks), or ImageDecodeError saying what it is instead."""
    try:
        st = os.stat(p)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ImageDecodeError(p, "symlink loop (the link leads back to itself)") from None
        if exc.errno == errno.ENOENT and os.path.islink(p):
            raise ImageDecodeError(p, f"dangling symlink (its target {os.readlink(p)} does not exist)") from None
        if exc.errno == errno.ENOENT:
            raise ImageDecodeError(p, "file not found") from None
        if exc.errno == errno.EACCES:
            raise ImageDecodeError(p, "permission denied") from None
        raise ImageDecodeError(p, f"cannot be read ({exc.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        kind = next((name for test, name in _FILE_KINDS if test(st.st_mode)), "not a plain file")
        raise ImageDecodeError(p, f"not a regular file ({kind})")
    return st.st_size


def open_rgb(path: str | os.PathLike, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Fully decode `path` to 8-bit RGB, or raise ImageDecodeError saying why.

    max_pixels: images with more pixels (width x height, read from the header) are refused before decoding;
    None = no budget (PIL's own decompression-bomb limit still applies).
    """
    p = Path(path)
    try:
        if _regular_file_size(p) == 0:
            raise ImageDecodeError(p, "zero-byte file")
        with warnings.catch_warnings():  # PIL warns above 89 MP while opening; our budget speaks instead
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(p)
        with img:
            w, h = img.size
            if max_pixels is not None and w * h > max_pixels:
                raise ImageDecodeError(p, f"{w} x {h} = {w * h / 1e6:.1f} megapixels, above the pixel budget of "
                                          f"{max_pixels / 1e6:g} MP (raise it with --max-pixels to decode it)")
            img.load()  # force full decode so truncated files fail here, not later
            return _to_rgb(img).copy()
    except ImageDecodeError:
        raise
    except FileNotFoundError:
        raise ImageDecodeError(p, "file not found") from None
    except PermissionError:
        raise ImageDecodeError(p, "permission denied") from None
    except UnidentifiedImageError:
        raise ImageDecodeError(p, "not an image (unrecognised format)") from None
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(p, f"too many pixels to decode safely ({exc})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageDecodeError(p, f"corrupt or truncated image ({exc})") from None


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
            return img.resize((s, s), Image.BICUBIC)
        w, h = img.size
        if self.resize == "pad":
            scale = s / max(w, h)
            inner = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)
            canvas = Image.new("RGB", (s, s), (255, 255, 255))
            canvas.paste(inner, ((s - inner.width) // 2, (s - inner.height) // 2))
            return canvas
        scale = s / min(w, h)
        big = img.resize((max(s, round(w * scale)), max(s, round(h * scale))), Image.BICUBIC)
        left, top = (big.width - s) // 2, (big.height - s) // 2
        return big.crop((left, top, left + s, top + s))

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

    def __init__(self, manifest, preprocess: Preprocess, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> None:
        self.paths = list(manifest["path"])
        self.preprocess = preprocess
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            return i, self.preprocess(open_rgb(self.paths[i], self.max_pixels), str(self.paths[i])), None
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

