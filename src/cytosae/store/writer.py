"""Extract backbone token activations into a sharded, resumable store.

Resumption works because shards are a pure function of the settings: shard i
always holds the images at manifest rows [i*shard_size, (i+1)*shard_size)
(minus the ones that fail to decode), computed in the same batches. A killed
run keeps every shard listed in manifest.json and recomputes the rest, so its
result is byte-identical to an uninterrupted run.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pandas as pd
import torch
from safetensors.torch import save as st_save
from torch.utils.data import DataLoader

from cytosae.data.images import DEFAULT_MAX_PIXELS

from .format import (
    DTYPES,
    FORMAT,
    FORMAT_VERSION,
    IMAGES,
    MANIFEST,
    SKIPPED,
    DamagedFile,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_parquet,
    bytes_checksum,
    read_manifest,
    shard_name,
    verify_file,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExtractConfig:
    layer: int = -2
    dtype: str = "float16"
    batch_size: int = 32
    shard_size: int = 512
    num_workers: int = 1
    progress: bool = True
    max_pixels: int | None = DEFAULT_MAX_PIXELS  # larger images are skipped from their header, before decoding

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.batch_size < 1 or self.shard_size < 1:
            raise ValueError("batch_size and shard_size must be positive")


@dataclass
class ExtractResult:
    out_dir: Path
    n_images: int
    n_skipped: int
    n_shards: int
    shards_reused: int
    seconds: float
    images_per_second: float  # over the images computed in this run


def _ids_digest(image_ids: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(image_ids).encode()).hexdigest()


def _settings(backbone, manifest: pd.DataFrame, cfg: ExtractConfig, layer_index: int) -> dict:
    """Everything that determines the store's bytes; a resume must match all of it."""
    return {
        "backbone": backbone.name,
        "weights_sha256": backbone.weights_sha256,
        "random_weights": bool(backbone.random_weights),
        # random weights are drawn from this seed; a resume with another seed would mix two backbones in one store
        "random_weights_seed": getattr(backbone, "seed", None) if backbone.random_weights else None,
        "layer": cfg.layer,
        "layer_index": layer_index,
        "n_blocks": backbone.n_blocks,
        "token_stream": "residual stream after block layer_index (before the final norm)",
        "preprocessing": backbone.preprocess_config.to_dict(),
        "dtype": cfg.dtype,
        "max_pixels": cfg.max_pixels,
        "shard_size": cfg.shard_size,
        "batch_size": cfg.batch_size,
        "n_inputs": len(manifest),
        "image_ids_sha256": _ids_digest(list(manifest["image_id"])),
    }


def _batches_per_shard(n: int, shard_size: int, batch_size: int, first_shard: int) -> list[list[int]]:
    """Batch index lists that never cross a shard boundary, so a shard's bytes do not depend on where a run started."""
    batches = []
    for start in range(first_shard * shard_size, n, shard_size):
        stop = min(start + shard_size, n)
        for b in range(start, stop, batch_size):
            batches.append(list(range(b, min(b + batch_size, stop))))
    return batches


def _resolve_layer(layer: int, n_blocks: int) -> int:
    if not -n_blocks <= layer < n_blocks:
        raise ValueError(f"layer {layer} is out of range for a backbone with {n_blocks} blocks "
                         f"(valid: {-n_blocks}..{n_blocks - 1}; -2 is the second-to-last block)")
    return layer % n_blocks


def extract(manifest: pd.DataFrame, backbone, out_dir: str | Path, config: ExtractConfig | None = None) -> ExtractResult:
    """Write the tokens of every decodable image in `manifest` to `out_dir`, resuming if possible."""
    from cytosae.data import ImageDataset, collate_skipping

    cfg = config or ExtractConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if len(manifest) == 0:
        raise ValueError("the data manifest is empty: no images to extract")
    layer_index = _resolve_layer(cfg.layer, backbone.n_blocks)
    settings = _settings(backbone, manifest, cfg, layer_index)

    shards: list[dict] = []
    if (out / MANIFEST).exists():
        previous = read_manifest(out)
        if previous.get("settings") != settings:
            diff = sorted(k for k in settings if previous.get("settings", {}).get(k) != settings[k])
            raise ValueError(
                f"{out} already holds a store made with different settings ({', '.join(diff)}). "
                "Use another --out folder, or delete this one to start again."
            )
        shards = previous["shards"]
        if previous.get("complete"):
            log.info("store %s is already complete", out)
            return ExtractResult(out, previous["n_images"], previous["n_skipped"], len(shards), len(shards), 0.0, 0.0)
        shards = _intact_prefix(out, shards)
    reused = len(shards)

    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "complete": False,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "settings": settings,
        "n_tokens": backbone.n_tokens,
        "d_model": backbone.embed_dim,
        "grid": backbone.grid,
        "shards": shards,
    }
    if backbone.random_weights:
        log.warning("extracting with RANDOM backbone weights (seed %s): these activations describe no trained model",
                    settings["random_weights_seed"])

    n = len(manifest)
    n_shards = -(-n // cfg.shard_size)
    dataset = ImageDataset(manifest, backbone.preprocess_config, max_pixels=cfg.max_pixels)
    loader = DataLoader(
        dataset,
        batch_sampler=_batches_per_shard(n, cfg.shard_size, cfg.batch_size, first_shard=reused),
        num_workers=cfg.num_workers,
        collate_fn=collate_skipping,
        persistent_workers=False,
    )
    dtype = getattr(torch, cfg.dtype)
    ids = manifest["image_id"].tolist()
    todo = sum(min(cfg.shard_size, n - s * cfg.shard_size) for s in range(reused, n_shards))

    from tqdm.auto import tqdm

    bar = tqdm(total=todo, unit="img", desc=f"extract {backbone.name} block {layer_index}", disable=not cfg.progress)
    t0 = time.perf_counter()
    current = _ShardBuffer(reused)
    for indices, images, skipped in loader:
        shard_index = int((indices[0] if len(indices) else skipped[0][0]) // cfg.shard_size)
        if shard_index != current.index:
            raise AssertionError("batches crossed a shard boundary")  # _batches_per_shard guarantees this
        if len(indices):
            current.add(indices.tolist(), backbone.tokens(images, layer=cfg.layer).to(dtype))
        current.skipped += [(ids[i], manifest.iloc[i]["path"], reason) for i, reason in skipped]
        bar.update(len(indices) + len(skipped))
        last_in_shard = min((shard_index + 1) * cfg.shard_size, n) - 1
        if max(list(indices.tolist()) + [i for i, _ in skipped]) == last_in_shard:
            shards.append(current.write(out, ids))
            atomic_write_json(out / MANIFEST, meta)  # the shard is durable before it is listed
            current = _ShardBuffer(shard_index + 1)
    bar.close()
    seconds = time.perf_counter() - t0

    _finalise(out, meta, manifest)
    return ExtractResult(out, meta["n_images"], meta["n_skipped"], len(shards), reused, seconds,
                         todo / seconds if seconds > 0 else 0.0)


def _intact_prefix(out: Path, shards: list[dict]) -> list[dict]:
    """The listed shards up to the first damaged or missing one; that one and the rest are computed again."""
    for i, s in enumerate(shards):
        if s.get("file"):
            try:
                verify_file(out / s["file"], s.get("checksum"), "computing it again")
            except (FileNotFoundError, DamagedFile) as exc:
                log.warning("%s", exc)
                return shards[:i]
    return shards


class _ShardBuffer:
    def __init__(self, index: int) -> None:
        self.index = index
        self.rows: list[int] = []
        self.tokens: list[torch.Tensor] = []
        self.skipped: list[tuple[str, str]] = []

    def add(self, rows: list[int], tokens: torch.Tensor) -> None:
        self.rows += rows
        self.tokens.append(tokens.contiguous())

    def write(self, out: Path, ids: list[str]) -> dict:
        name = shard_name(self.index)
        entry = {"file": name, "index": self.index, "image_ids": [ids[r] for r in self.rows],
                 "rows": self.rows, "skipped": [list(s) for s in self.skipped]}
        if self.rows:
            tokens = torch.cat(self.tokens)
            data = st_save({"tokens": tokens}, metadata={"format": FORMAT})
            atomic_write_bytes(out / name, data)
            entry["n_images"] = int(tokens.shape[0])
            entry["checksum"] = bytes_checksum(data)
        else:
            entry.update(file=None, n_images=0)  # every image in this shard failed to decode
        return entry


def relocatable_paths(images: pd.DataFrame) -> tuple[pd.DataFrame, str | None]:
    """Image paths relative to the data root, and that root: a store (and its run) can move with its data.

    The root is what every `path` ends in `image_id` after (image ids are paths relative to the data root);
    images outside it keep their absolute path.
    """
    roots = {p[: -len(i) - 1] for p, i in zip(images["path"].astype(str), images["image_id"].astype(str))
             if p.endswith("/" + i) and len(p) > len(i) + 1}
    if len(roots) != 1:
        return images, None
    root = roots.pop()
    images = images.copy()
    images["path"] = [i if str(p) == f"{root}/{i}" else p for p, i in zip(images["path"], images["image_id"])]
    return images, root


def _finalise(out: Path, meta: dict, manifest: pd.DataFrame) -> None:
    rows = [r for s in meta["shards"] for r in s["rows"]]
    id_of = dict(zip(manifest["path"], manifest["image_id"]))  # shards written before image ids were recorded
    skipped = [s if len(s) == 3 else [id_of.get(s[0]), *s] for shard in meta["shards"] for s in shard["skipped"]]
    images, meta["data_root"] = relocatable_paths(manifest.iloc[rows].reset_index(drop=True))
    atomic_write_parquet(out / IMAGES, images)
    skipped_df = pd.DataFrame(skipped, columns=["image_id", "path", "reason"])
    atomic_write_bytes(out / SKIPPED, skipped_df.to_csv(index=False).encode())
    meta["n_images"] = len(rows)
    meta["n_skipped"] = len(skipped)
    meta["complete"] = True
    atomic_write_json(out / MANIFEST, meta)
    if skipped:
        log.warning("%d of %d images could not be decoded and were skipped; see %s",
                    len(skipped), len(manifest), out / SKIPPED)

