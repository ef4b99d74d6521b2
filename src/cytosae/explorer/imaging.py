"""Decoding and validating uploads; showing images the way the model saw them (the package's Preprocess), so
16x16 overlays line up."""
from __future__ import annotations

import io
import re
import warnings

from PIL import Image, UnidentifiedImageError

from cytosae.data.decode import DEFAULT_MAX_ASPECT, aspect_problem

MAX_UPLOAD_BYTES = 10 * 1024 * 1024
MAX_UPLOAD_PIXELS = 25_000_000
ALLOWED_FORMATS = {"PNG", "JPEG", "TIFF", "BMP", "WEBP"}
ACCEPTED = "PNG, JPEG, TIFF, BMP or WebP"
NOT_READABLE = f"the uploaded file is not a readable image ({ACCEPTED})"


class InvalidImage(ValueError):
    pass


def decode_upload(data: bytes, max_bytes: int = MAX_UPLOAD_BYTES, max_pixels: int = MAX_UPLOAD_PIXELS,
                  max_aspect: float | None = DEFAULT_MAX_ASPECT) -> Image.Image:
    """RGB image from uploaded bytes; the type is decided by decoding, never by the file name. Its size and aspect
    ratio are checked from the header, before decoding and before any resize (extraction's own limit)."""
    if len(data) == 0:
        raise InvalidImage("the uploaded file is empty")
    if len(data) > max_bytes:
        raise InvalidImage(f"the uploaded file is {len(data)} bytes; the limit is {max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if img.format not in ALLOWED_FORMATS:
                raise InvalidImage(f"image format {img.format} is not accepted; send a {ACCEPTED} image")
            w, h = img.size
            if w * h > max_pixels:  # checked before decoding pixels: a tiny file can declare a huge canvas
                raise InvalidImage(f"the image is {w}x{h} pixels; the limit is {max_pixels} pixels")
            if min(w, h) < 8:
                raise InvalidImage(f"the image is {w}x{h} pixels; too small to be a cell image")
            thin = aspect_problem(w, h, max_aspect)
            if thin:
                raise InvalidImage(f"the uploaded image: {thin}; crop it to the cell and upload that")
            img.load()
    except InvalidImage:
        raise
    except UnidentifiedImageError:  # its message is the repr of our BytesIO: nothing the sender can use
        raise InvalidImage(NOT_READABLE) from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise InvalidImage(f"{NOT_READABLE}: {_reason(exc)}") from None
    from cytosae.data.images import _to_rgb

    return _to_rgb(img).copy()  # the same colour conversion as images read for the store (16-bit, alpha on white)


def _reason(exc: Exception) -> str:
    """The decoder's complaint on one line, without object reprs (`<... object at 0x...>`) or memory addresses."""
    text = re.sub(r"<[^<>]*\bat 0x[0-9a-fA-F]+>|\b0x[0-9a-fA-F]{8,}\b", "", str(exc))
    text = " ".join(text.split())[:200]
    return text or type(exc).__name__


def open_image(path) -> Image.Image:
    from cytosae.data import open_rgb
    return open_rgb(path)


def preprocess_of(settings: dict | None):
    """The store's Preprocess (cytosae.data) from its recorded settings; the package default when none."""
    from cytosae.data import Preprocess

    s = settings or {}
    if {"size", "resize", "mean", "std"} <= set(s):
        return Preprocess.from_dict(s)
    return Preprocess(**{k: s[k] for k in ("size", "resize") if k in s})


def model_view(img: Image.Image, preprocessing: dict | None = None) -> Image.Image:
    """The size x size RGB image the backbone saw, before normalisation: the package's own resize."""
    return preprocess_of(preprocessing).resize_image(img.convert("RGB"))


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()
