"""Import precomputed embeddings of any model as an activation store.

Users who already have activations (another foundation model, another
extraction pipeline) bring an array plus a manifest naming the image of each
row; everything downstream (SAE training, statistics, explorer) then works the
same as on `cytosae extract` output.
"""
from __future__ import annotations

import datetime as _dt
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors import safe_open
from safetensors.torch import save as st_save

from .format import (CHECKSUM_ALGORITHM, DTYPES, FORMAT, FORMAT_VERSION, IMAGES, MANIFEST, SKIPPED, atomic_write_bytes,
                     atomic_write_parquet, bytes_checksum, file_checksum, shard_name, write_manifest)


def _load_array(path: Path, key: str | None) -> np.ndarray:
    if path.suffix == ".npy":
        # mmap: the array may be larger than memory; allow_pickle=False refuses object arrays (code execution).
        return np.load(path, mmap_mode="r", allow_pickle=False)
    if path.suffix == ".safetensors":
        with safe_open(path, framework="np") as fh:
            keys = list(fh.keys())
            if key is None:
                if len(keys) != 1:
                    raise ValueError(f"{path} holds tensors {keys}; say which one with --key")
                key = keys[0]
            if key not in keys:
                raise ValueError(f"{path} has no tensor {key!r}; it holds {keys}")
            return fh.get_tensor(key)
    raise ValueError(f"{path}: unsupported embeddings file type {path.suffix!r}; use .npy or .safetensors")


def import_embeddings(
    array_path: str | Path,
    manifest: pd.DataFrame,
    out_dir: str | Path,
    *,
    key: str | None = None,
    has_cls: bool = True,
    source: str = "imported",
    dtype: str = "float16",
    shard_size: int = 512,
) -> Path:
    """Write `array` ((N, D) or (N, T, D), row i = manifest row i) as a store in `out_dir`.

    `has_cls` says whether token 0 is a CLS token; (N, D) arrays are one token per image
    and count as CLS. Patch tokens form a square grid when T - has_cls is a perfect square.
    """
    array_path = Path(array_path)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    arr, has_cls = _checked_array(array_path, key, manifest, has_cls)
    n, t, d = arr.shape
    n_patch = t - int(has_cls)
    grid = math.isqrt(n_patch) if n_patch > 0 and math.isqrt(n_patch) ** 2 == n_patch else None

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards = _write_shards(arr, manifest["image_id"].astype(str).tolist(), out, dtype, shard_size, array_path)
    atomic_write_parquet(out / IMAGES, manifest.reset_index(drop=True))
    atomic_write_bytes(out / SKIPPED, b"image_id,path,reason\n")
    write_manifest(out, {
        "format": FORMAT, "format_version": FORMAT_VERSION, "complete": True,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "settings": {"backbone": source, "imported_from": str(array_path),
                     "source_sha256": file_checksum(array_path)[CHECKSUM_ALGORITHM],
                     "dtype": dtype, "shard_size": shard_size, "layer": None},
        "n_tokens": t, "d_model": d, "grid": grid, "has_cls": has_cls,
        "n_images": n, "n_skipped": 0, "shards": shards,
    })
    return out


def _checked_array(array_path: Path, key: str | None, manifest: pd.DataFrame, has_cls: bool) -> tuple[np.ndarray, bool]:
    """The (N, T, D) array, one row per manifest row, floating point; (N, D) arrays as one CLS token per image."""
    arr = _load_array(array_path, key)
    if arr.ndim == 2:
        arr = arr[:, None, :]
        has_cls = True
    if arr.ndim != 3:
        raise ValueError(f"{array_path}: embeddings must be (N, D) or (N, T, D), got shape {tuple(arr.shape)}")
    if arr.shape[0] != len(manifest):
        raise ValueError(f"{array_path} has {arr.shape[0]} rows but the manifest lists {len(manifest)} images; "
                         "row i of the array must be the image in manifest row i")
    if "image_id" not in manifest.columns:
        raise ValueError("the manifest needs an 'image_id' (or 'path') column naming the image of each row")
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"{array_path}: embeddings must be floating point, got {arr.dtype}")
    return arr, has_cls


def _write_shards(arr: np.ndarray, ids: list[str], out: Path, dtype: str, shard_size: int,
                  array_path: Path) -> list[dict]:
    """The array's rows as shards of `shard_size` images in `dtype`, each written atomically; their manifest entries."""
    shards = []
    for index, start in enumerate(range(0, len(ids), shard_size)):
        stop = min(start + shard_size, len(ids))
        block = torch.from_numpy(np.array(arr[start:stop], copy=True)).to(getattr(torch, dtype))
        if not torch.isfinite(block).all():
            bad = start + int((~torch.isfinite(block)).flatten(1).any(1).nonzero()[0, 0])
            raise ValueError(f"{array_path}: row {bad} ({ids[bad]}) holds NaN or inf after conversion to {dtype}")
        data = st_save({"tokens": block}, metadata={"format": FORMAT})
        atomic_write_bytes(out / shard_name(index), data)
        shards.append({"file": shard_name(index), "index": index, "image_ids": ids[start:stop],
                       "rows": list(range(start, stop)), "skipped": [], "n_images": stop - start,
                       "checksum": bytes_checksum(data)})
    return shards
