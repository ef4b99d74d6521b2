"""On-disk layout of an activation store, shared by the writer and the reader.

A store is one directory:
  manifest.json            what was extracted, how, and which shards are complete
  shard_00000.safetensors  tokens (n_images, n_tokens, d_model) of consecutive images
  images.parquet           one row per stored image, store order, with the data manifest's columns
  skipped.csv              path,reason of every image that could not be decoded
"""
from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

FORMAT = "cytosae-activation-store"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
IMAGES = "images.parquet"
SKIPPED = "skipped.csv"
DTYPES = ("float16", "float32", "bfloat16")


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.safetensors"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temp file in the same folder and rename, so readers never see half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_parquet(path: Path, table) -> None:
    buf = io.BytesIO()
    table.to_parquet(buf, index=False)
    atomic_write_bytes(path, buf.getvalue())


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode())


def read_manifest(store_dir: Path) -> dict:
    path = Path(store_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {store_dir} is not an activation store. "
            "Create one with `cytosae extract DATA --out DIR` or `cytosae import-embeddings`."
        )
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); the store is damaged, extract it again.") from exc
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: field 'format' is {meta.get('format')!r}, expected {FORMAT!r}.")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(
            f"{path}: format_version {meta['format_version']} is newer than this cytosae "
            f"understands ({FORMAT_VERSION}); upgrade cytosae."
        )
    return meta
