"""Decoding blood-cell images to 8-bit RGB.

Every image type a slide scanner or a dataset may hand us (grayscale, palette,
RGBA, CMYK, 16-bit TIFF) becomes 8-bit RGB. Anything that cannot be decoded
raises `ImageDecodeError` so a caller can record it and move on: symlink loops,
dangling links and FIFOs are named without being opened (opening a FIFO blocks),
and images larger than a pixel budget are refused from their header, before decoding.

Its own module so that both preprocessing (images.py) and stain fitting (stain.py) use it
without the two importing each other.
"""
from __future__ import annotations

import errno
import os
import re
import stat
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

# A 13000 x 13000 PNG compresses to 164 KB and decodes to 2 GB; a single-cell image is well under 1 MP.
DEFAULT_MAX_PIXELS = 50_000_000
# Long side / short side. A cell crop is about square (Acevedo 360 x 363, DeepAPL ~1:1); an image 20 times longer than
# it is wide is a strip, a scan line or a mislabelled file, and resizing it (crop: 224 x 5,600 px per 8 px of width,
# 224 x 11.2 M px for 8 x 400,000) would allocate far more than its own pixels.
DEFAULT_MAX_ASPECT = 20.0


def printable_name(name: str | os.PathLike) -> str:
    """A file name as text that can be written anywhere: bytes that are not UTF-8 (which the OS hands to Python as
    lone surrogates) shown as backslash escapes, `\\xe9`. Valid names are returned unchanged."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def is_utf8_name(name: str | os.PathLike) -> bool:
    try:
        os.fspath(name).encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


class ImageDecodeError(Exception):
    def __init__(self, path, reason: str) -> None:
        super().__init__(f"{printable_name(path)}: {reason}")
        self.path = printable_name(path)
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


def aspect_problem(width: int, height: int, max_aspect: float | None = DEFAULT_MAX_ASPECT) -> str | None:
    """Why a `width` x `height` image is refused before any resize (its long side over `max_aspect` times its short
    side), or None; the caller adds how to lift the limit. max_aspect None = no limit."""
    long, short = max(width, height), min(width, height)
    if max_aspect is None or long <= max_aspect * max(short, 1):
        return None
    return (f"{width} x {height} px has an aspect ratio of {long / max(short, 1):,.0f}:1, above the limit of "
            f"{max_aspect:g}:1 (a cell image is about square; resized it would be a sliver or stretched)")


def open_rgb(path: str | os.PathLike, max_pixels: int | None = DEFAULT_MAX_PIXELS,
             max_aspect: float | None = DEFAULT_MAX_ASPECT) -> Image.Image:
    """Fully decode `path` to 8-bit RGB, or raise ImageDecodeError saying why.

    max_pixels: images with more pixels (width x height, read from the header) are refused before decoding;
    None = no budget (PIL's own decompression-bomb limit still applies).
    max_aspect: images whose long side is more than this many times their short side (header) are refused before
    decoding, so before any resize; None = no limit.
    """
    p = Path(path)
    if not is_utf8_name(p):  # its name could be written to no table, log or page; the file itself may be fine
        raise ImageDecodeError(p, "the file name is not UTF-8 text (shown with \\x escapes); rename the file to "
                                  "include it")
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
            thin = aspect_problem(w, h, max_aspect)
            if thin:
                raise ImageDecodeError(p, f"{thin}; raise the limit with --max-aspect (0 = no limit) to include it")
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
        # PIL refuses above twice its own limit while reading the header, before our budget is asked: say ours
        n = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{int(n[1]) / 1e6:.1f} megapixels" if n else "too many pixels"
        budget = (f"above the pixel budget of {max_pixels / 1e6:g} MP (raise it with --max-pixels to decode it)"
                  if max_pixels is not None and (not n or int(n[1]) > max_pixels) else
                  f"above PIL's decompression-bomb limit of {2 * Image.MAX_IMAGE_PIXELS / 1e6:g} MP, which "
                  "--max-pixels does not lift")
        raise ImageDecodeError(p, f"{size}, {budget}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageDecodeError(p, f"corrupt or truncated image ({exc})") from None
