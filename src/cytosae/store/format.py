"""On-disk layout of an activation store, shared by the writer and the reader.

A store is one directory:
  manifest.json            what was extracted, how, and which shards are complete
  shard_00000.safetensors  tokens (n_images, n_tokens, d_model) of consecutive images
  images.parquet           one row per stored image, store order, with the data manifest's columns
  skipped.csv              image_id,path,reason of every listed file that could not be decoded

Every shard's size and sha256 are recorded in manifest.json when it is written and
checked when the store is opened, so a truncated or bit-flipped shard is named
instead of being read; manifest.json is checked against its schema and its own
checksum (schema.py). Stores written before checksums existed still open.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from .schema import FORMAT, FORMAT_VERSION, seal, validate  # noqa: F401  (the schema owns the format's name)
MANIFEST = "manifest.json"
IMAGES = "images.parquet"
SKIPPED = "skipped.csv"
DTYPES = ("float16", "float32", "bfloat16")


CHECKSUM_ALGORITHM = "sha256"  # 1.2 GB/s with SHA-NI, faster than blake2b (0.7 GB/s) on the CPUs we measured


class DamagedFile(ValueError):
    """A file's size or checksum differs from what was recorded when it was written."""


def bytes_checksum(data: bytes) -> dict:
    """{"size", "sha256"} of bytes about to be written (hashing in memory saves reading the file back)."""
    return {"size": len(data), CHECKSUM_ALGORITHM: hashlib.new(CHECKSUM_ALGORITHM, data).hexdigest()}


def file_checksum(path: Path) -> dict:
    with open(path, "rb") as fh:
        digest = hashlib.file_digest(fh, CHECKSUM_ALGORITHM)
    return {"size": Path(path).stat().st_size, CHECKSUM_ALGORITHM: digest.hexdigest()}


def verify_file(path: Path, expected: dict | None, remedy: str, full: bool = True) -> None:
    """Raise a one-line error naming `path` if it is missing or differs from `expected` (size, then hash).

    `expected` None (files written before checksums existed) checks only that the file exists.
    `full=False` checks the size alone (a stat, no read).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; {remedy}")
    if not expected:
        return
    size = path.stat().st_size
    if size != expected["size"]:
        raise DamagedFile(f"{path} is damaged: {size:,} bytes where {expected['size']:,} were written "
                          f"(truncated or overwritten); {remedy}")
    algorithm = next((a for a in expected if a != "size"), None)
    if full and algorithm is not None:
        with open(path, "rb") as fh:
            actual = hashlib.file_digest(fh, algorithm).hexdigest()
        if actual != expected[algorithm]:
            raise DamagedFile(f"{path} is damaged: its {algorithm} differs from the one recorded when it was "
                              f"written (bit rot, a bad copy or an edit); {remedy}")


def canonical_json(obj: dict, without: str) -> bytes:
    """The bytes a self-checksum is taken over: `obj` less its `without` key, keys sorted, no spaces, ASCII.
    Never change this form: every sealed manifest.json and config.json would then read as edited."""
    return json.dumps({k: v for k, v in obj.items() if k != without}, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=True).encode()


def self_checksum(obj: dict, key: str) -> str:
    """sha256 of `obj`'s canonical JSON without `key`: what a file records under `key` to detect edits to itself
    (a store's manifest_sha256, an SAE config's config_sha256)."""
    return hashlib.sha256(canonical_json(obj, key)).hexdigest()


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


def read_json_object(path: Path, fix: str) -> dict:
    """A JSON object from `path`, or a one-line ValueError naming the file and saying what to do (`fix`)."""
    try:
        obj = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); {fix}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} does not hold a JSON object; {fix}")
    return obj


def read_manifest(store_dir: Path) -> dict:
    path = Path(store_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {store_dir} is not an activation store. "
            "Create one with `cytosae extract DATA --out DIR` or `cytosae import-embeddings`."
        )
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); the store is damaged, extract it again.") from None
    return validate(meta, path)


def write_manifest(store_dir: Path, meta: dict) -> None:
    """The one writer of manifest.json: the current format version and the manifest's own checksum added."""
    atomic_write_json(Path(store_dir) / MANIFEST, seal(meta))
