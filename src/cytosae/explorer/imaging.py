"""Decoding, validating and resizing images the way the model saw them, so 16x16 overlays line up."""
from __future__ import annotations

import io
import warnings

from PIL import Image, ImageOps, UnidentifiedImageError

MAX_UPLOAD_BYTES = 10 * 1024 * 1024
MAX_UPLOAD_PIXELS = 25_000_000
ALLOWED_FORMATS = {"PNG", "JPEG", "TIFF", "BMP", "WEBP"}


class InvalidImage(ValueError):
    pass


def decode_upload(data: bytes, max_bytes: int = MAX_UPLOAD_BYTES, max_pixels: int = MAX_UPLOAD_PIXELS) -> Image.Image:
    """RGB image from uploaded bytes; the type is decided by decoding, never by the file name."""
    if len(data) == 0:
        raise InvalidImage("the uploaded file is empty")
    if len(data) > max_bytes:
        raise InvalidImage(f"the uploaded file is {len(data)} bytes; the limit is {max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if img.format not in ALLOWED_FORMATS:
                raise InvalidImage(f"image format {img.format} is not accepted; use one of {sorted(ALLOWED_FORMATS)}")
            w, h = img.size
            if w * h > max_pixels:  # checked before decoding pixels: a tiny file can declare a huge canvas
                raise InvalidImage(f"the image is {w}x{h} pixels; the limit is {max_pixels} pixels")
            if min(w, h) < 8:
                raise InvalidImage(f"the image is {w}x{h} pixels; too small to be a cell image")
            img.load()
    except InvalidImage:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombWarning,
            Image.DecompressionBombError) as exc:
        raise InvalidImage(f"the uploaded file is not a readable image ({type(exc).__name__}: {exc})") from None
    return ImageOps.exif_transpose(img).convert("RGB")


def open_image(path) -> Image.Image:
    try:
        from cytosae.data import open_rgb
    except ImportError:
        with Image.open(path) as im:
            return im.convert("RGB")
    return open_rgb(path)


def model_view(img: Image.Image, preprocessing: dict | None = None) -> Image.Image:
    """The size x size RGB image the backbone saw (before normalisation)."""
    pre = preprocessing or {}
    size = int(pre.get("size", 224))
    mode = pre.get("resize", "squash")
    if mode == "pad":
        side = max(img.size)
        canvas = Image.new("RGB", (side, side), (255, 255, 255))
        canvas.paste(img, ((side - img.width) // 2, (side - img.height) // 2))
        img = canvas
    elif mode == "crop":
        side = min(img.size)
        left, top = (img.width - side) // 2, (img.height - side) // 2
        img = img.crop((left, top, left + side, top + side))
    return img.resize((size, size), Image.BICUBIC)


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()
