"""Extract backbone token activations into a sharded, resumable store.

Resumption works because shards are a pure function of the settings: shard i
always holds the images at manifest rows [i*shard_size, (i+1)*shard_size)
(minus the ones that fail to decode), computed in the same batches. A killed
run keeps every shard listed in manifest.json and recomputes the rest, so its
result is byte-identical to an uninterrupted run.

Several processes (torchrun) split the missing shards between them; each writes its own
shards and records each finished one in progress/shard_XXXXX.json, which rank 0 merges into
manifest.json once all are done. Since a shard's bytes do not depend on which process made
it, the store equals a one-process run's, and a killed run resumes from manifest.json plus
progress/, with any number of processes.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pandas as pd
import torch
from safetensors.torch import save as st_save
from torch.utils.data import DataLoader

from cytosae.data.decode import DEFAULT_MAX_ASPECT, DEFAULT_MAX_PIXELS, printable_name

from cytosae.distributed import rank_and_world

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
    file_checksum,
    shard_name,
    verify_file,
    write_manifest,
)

log = logging.getLogger(__name__)

PROGRESS = "progress"  # per-shard entries written by the processes of a multi-process run, merged at its end


@dataclass(frozen=True)
class ExtractConfig:
    layer: int = -2
    dtype: str = "float16"
    batch_size: int = 32
    shard_size: int = 512
    num_workers: int | None = None  # decoding processes; None = default_workers()
    progress: bool = True
    max_pixels: int | None = DEFAULT_MAX_PIXELS  # larger images are skipped from their header, before decoding
    max_aspect: float | None = DEFAULT_MAX_ASPECT  # so are thinner ones (long side / short side), before any resize
    precision: str = "fp32"  # forward pass: fp32 (reference parity) | bf16 | fp16 autocast
    max_seconds: float | None = None  # stop after the shard that crosses this; a rerun resumes

    def __post_init__(self) -> None:
        from cytosae.backbones.backbone import PRECISIONS

        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.batch_size < 1 or self.shard_size < 1:
            raise ValueError("batch_size and shard_size must be positive")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.num_workers is not None and self.num_workers < 0:
            raise ValueError(f"num_workers must be 0 or more, got {self.num_workers}")


def default_workers() -> int:
    """Decoding processes: every core but the one driving the model, at most 8 (0 on one core)."""
    return max(0, min(8, (os.cpu_count() or 1) - 1))


@dataclass
class ExtractResult:
    out_dir: Path
    n_images: int
    n_skipped: int
    n_shards: int
    shards_reused: int
    seconds: float
    images_per_second: float  # over the images this process computed in this run
    complete: bool = True
    # where this process's time went: waiting for decoded batches, forward pass (incl. copies), shard writes
    decode_wait_seconds: float = 0.0
    compute_seconds: float = 0.0
    write_seconds: float = 0.0


class EmptyStoreError(ValueError):
    """Extraction decoded no image at all: nothing downstream could use the store."""


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
        "max_aspect": cfg.max_aspect,
        "precision": cfg.precision,
        "shard_size": cfg.shard_size,
        "batch_size": cfg.batch_size,
        "n_inputs": len(manifest),
        "image_ids_sha256": _ids_digest(list(manifest["image_id"])),
    }


def _batches_per_shard(n: int, shard_size: int, batch_size: int, shards: Sequence[int]) -> list[list[int]]:
    """Batch index lists of the given shards that never cross a shard boundary, so a shard's bytes do not
    depend on where a run started nor on which process computes it."""
    batches = []
    for shard in shards:
        start, stop = shard * shard_size, min((shard + 1) * shard_size, n)
        for b in range(start, stop, batch_size):
            batches.append(list(range(b, min(b + batch_size, stop))))
    return batches


def _resolve_layer(layer: int, n_blocks: int) -> int:
    if not -n_blocks <= layer < n_blocks:
        raise ValueError(f"layer {layer} is out of range for a backbone with {n_blocks} blocks "
                         f"(valid: {-n_blocks}..{n_blocks - 1}; -2 is the second-to-last block)")
    return layer % n_blocks


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _check_same_weights(backbone, world: int) -> None:
    """Every process must run the same model: random weights drawn without a common seed differ per process."""
    import torch.distributed as dist

    with torch.no_grad():
        mark = torch.stack([p.detach().double().sum() for p in backbone.model.parameters()]).sum().reshape(1)
    mark = mark.to(backbone.device)
    low, high = mark.clone(), mark.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if not torch.equal(low, high):
        raise ValueError("the processes hold different backbone weights (random weights drawn without a common "
                         "seed?); pass --weights, or seed every process the same way before loading the backbone")


def _progress_entries(out: Path) -> dict[int, dict]:
    """Shards finished by the processes of a multi-process run, not yet merged into manifest.json."""
    entries = {}
    for path in sorted((out / PROGRESS).glob("shard_*.json")):
        entry = json.loads(path.read_text())
        entries[int(entry["index"])] = entry
    return entries


def _previous(out: Path, settings: dict) -> tuple[dict | None, dict[int, dict]]:
    """The store already at `out` (None if there is none) and its finished shards by index."""
    if not (out / MANIFEST).exists():
        return None, {}  # progress/ is trusted only beside the manifest whose settings it was made with
    previous = read_manifest(out)
    # stores written before `precision` existed were computed in fp32; those written before `max_aspect` resume under
    # whatever limit is given now: their shards' bytes do not depend on it, and a thin image not yet extracted is
    # skipped and listed like any image the limit refuses
    old = {"precision": "fp32", "max_aspect": settings["max_aspect"], **previous.get("settings", {})}
    if old != settings:
        diff = sorted(k for k in settings if old.get(k) != settings[k])
        raise ValueError(
            f"{out} already holds a store made with different settings ({', '.join(diff)}). "
            "Use another --out folder, or delete this one to start again."
        )
    done = {int(s["index"]): s for s in previous["shards"]}
    done.update(_progress_entries(out))
    return previous, done


def _open_manifest(backbone, settings: dict, previous: dict | None, done: dict) -> dict:
    """manifest.json of a store being written: not complete, listing the intact shards `done` (kept on a resume)."""
    created = previous["created"] if previous else _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "complete": False, "created": created,
            "settings": settings, "n_tokens": backbone.n_tokens, "d_model": backbone.embed_dim, "grid": backbone.grid,
            "shards": [done[i] for i in sorted(done)]}


def extract(manifest: pd.DataFrame, backbone, out_dir: str | Path, config: ExtractConfig | None = None) -> ExtractResult:
    """Write the tokens of every decodable image in `manifest` to `out_dir`, resuming if possible.

    The forward pass runs on the backbone's device (`load_backbone(..., device=)`). Inside a
    torch.distributed process group (e.g. under torchrun) every process computes the shards i with
    i % world_size == rank of those still missing and writes them to the same folder; rank 0 lists
    them all in manifest.json at the end, so the store is the one a single process would write.
    """
    cfg = config or ExtractConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if len(manifest) == 0:
        raise ValueError("the data manifest is empty: no images to extract")
    layer_index = _resolve_layer(cfg.layer, backbone.n_blocks)
    settings = _settings(backbone, manifest, cfg, layer_index)
    rank, world = rank_and_world()
    previous, done = _previous(out, settings)  # every rank checks, so a mismatch stops them all before any barrier
    if previous is not None and previous.get("complete"):
        log.info("store %s is already complete", out)
        n_shards = len(previous["shards"])
        return ExtractResult(out, previous["n_images"], previous["n_skipped"], n_shards, n_shards, 0.0, 0.0)
    done = _intact(out, done)  # a damaged or missing shard is computed again
    reused = len(done)

    meta = _open_manifest(backbone, settings, previous, done)
    if backbone.random_weights and rank == 0:
        log.warning("extracting with RANDOM backbone weights (seed %s): these activations describe no trained model",
                    settings["random_weights_seed"])
    if world > 1:
        _check_same_weights(backbone, world)
    if rank == 0:
        write_manifest(out, meta)
    _barrier(world)

    n = len(manifest)
    n_shards = -(-n // cfg.shard_size)
    todo = [i for i in range(n_shards) if i not in done]
    mine = todo[rank::world]  # = shards i % world == rank on a fresh run; spreads what is left on a resume
    run = _compute_shards(manifest, backbone, out, cfg, mine, meta if world == 1 else None,
                          desc=f"extract {backbone.name} block {layer_index}" + (f" rank {rank}/{world}" if world > 1 else ""),
                          show=cfg.progress and rank == 0)
    _barrier(world)
    if rank == 0:
        _merge(out, meta, manifest, n_shards)
    _barrier(world)
    final = read_manifest(out)
    listed = final["shards"]
    return ExtractResult(
        out, final.get("n_images", sum(s["n_images"] for s in listed)),
        final.get("n_skipped", sum(len(s["skipped"]) for s in listed)), len(listed), reused, run["seconds"],
        run["images"] / run["seconds"] if run["seconds"] > 0 else 0.0, bool(final.get("complete")),
        run["wait"], run["compute"], run["write"])


def _compute_shards(manifest: pd.DataFrame, backbone, out: Path, cfg: ExtractConfig, shards: list[int],
                    meta: dict | None, desc: str, show: bool) -> dict:
    """Compute and write `shards`; list each in manifest.json (`meta`, one process) or in PROGRESS/ (several)."""
    from tqdm.auto import tqdm

    n = len(manifest)
    loader = _loader(manifest, backbone, cfg, shards)
    dtype = getattr(torch, cfg.dtype)
    ids = manifest["image_id"].tolist()
    todo = sum(min(cfg.shard_size, n - s * cfg.shard_size) for s in shards)
    bar = tqdm(total=todo, unit="img", desc=desc, disable=not show)
    run = {"images": 0, "wait": 0.0, "compute": 0.0, "write": 0.0}
    t0 = time.perf_counter()
    current = _ShardBuffer(shards[0]) if shards else None
    batches = iter(loader)
    while True:
        t = time.perf_counter()
        item = next(batches, None)
        run["wait"] += time.perf_counter() - t
        if item is None:
            break
        indices, images, skipped = item
        shard_index = int((indices[0] if len(indices) else skipped[0][0]) // cfg.shard_size)
        if shard_index != current.index:
            raise AssertionError("batches crossed a shard boundary")  # _batches_per_shard guarantees this
        if len(indices):
            t = time.perf_counter()
            # cast on the device, then one copy back: half the bytes over PCIe for float16 stores
            tokens = backbone.tokens(images, layer=cfg.layer, precision=cfg.precision).to(dtype).cpu()
            run["compute"] += time.perf_counter() - t
            current.add(indices.tolist(), tokens)
        current.skipped += [(ids[i], printable_name(manifest.iloc[i]["path"]), reason) for i, reason in skipped]
        bar.update(len(indices) + len(skipped))
        run["images"] += len(indices) + len(skipped)
        last_in_shard = min((shard_index + 1) * cfg.shard_size, n) - 1
        if max(list(indices.tolist()) + [i for i, _ in skipped]) == last_in_shard:
            t = time.perf_counter()
            _list_shard(out, meta, current.write(out, ids))  # the shard is durable before it is listed
            run["write"] += time.perf_counter() - t
            position = shards.index(shard_index) + 1
            if cfg.max_seconds is not None and time.perf_counter() - t0 > cfg.max_seconds and position < len(shards):
                log.info("stopping after %d of %d shards (max_seconds %s); rerun to resume", position, len(shards),
                         cfg.max_seconds)
                break
            current = _ShardBuffer(shards[position]) if position < len(shards) else None
    bar.close()
    run["seconds"] = time.perf_counter() - t0
    return run


def _loader(manifest: pd.DataFrame, backbone, cfg: ExtractConfig, shards: list[int]) -> DataLoader:
    """Decoded, preprocessed batches of `shards`' images; no batch crosses a shard boundary."""
    from cytosae.data import ImageDataset, collate_skipping

    workers = default_workers() if cfg.num_workers is None else cfg.num_workers
    on_gpu = backbone.device.type == "cuda"
    return DataLoader(
        ImageDataset(manifest, backbone.preprocess_config, max_pixels=cfg.max_pixels, max_aspect=cfg.max_aspect),
        batch_sampler=_batches_per_shard(len(manifest), cfg.shard_size, cfg.batch_size, shards),
        num_workers=workers,
        collate_fn=collate_skipping,
        pin_memory=on_gpu,  # page-locked batches: the host-to-GPU copy runs asynchronously
        prefetch_factor=4 if workers and on_gpu else None,
        persistent_workers=False,
    )


def _list_shard(out: Path, meta: dict | None, entry: dict) -> None:
    """A written shard listed in manifest.json (`meta`: one process) or in PROGRESS/ (one of several ranks)."""
    if meta is not None:
        meta["shards"] = sorted(meta["shards"] + [entry], key=lambda s: s["index"])
        write_manifest(out, meta)
    else:
        (out / PROGRESS).mkdir(exist_ok=True)
        atomic_write_json(out / PROGRESS / f"shard_{entry['index']:05d}.json", entry)


def _merge(out: Path, meta: dict, manifest: pd.DataFrame, n_shards: int) -> None:
    """Rank 0: list every finished shard in manifest.json; finalise once all are there."""
    done = {int(s["index"]): s for s in read_manifest(out)["shards"]}
    done.update(_progress_entries(out))
    meta["shards"] = [done[i] for i in sorted(done)]
    if len(done) == n_shards:
        _finalise(out, meta, manifest)
    else:
        write_manifest(out, meta)
    if (out / PROGRESS).is_dir():  # merged into manifest.json, which is durable now
        shutil.rmtree(out / PROGRESS)


def _intact(out: Path, done: dict[int, dict]) -> dict[int, dict]:
    """The finished shards whose files are intact; a damaged or missing one is computed again."""
    kept = {}
    for i, s in done.items():
        if s.get("file"):
            try:
                verify_file(out / s["file"], s.get("checksum"), "computing it again")
            except (FileNotFoundError, DamagedFile) as exc:
                log.warning("%s", exc)
                continue
            if not s.get("checksum"):  # written before checksums existed: the current format requires one
                s = {**s, "checksum": file_checksum(out / s["file"])}
        kept[i] = s
    return kept


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
    skipped_df = pd.DataFrame(skipped, columns=["image_id", "path", "reason"])
    atomic_write_bytes(out / SKIPPED, skipped_df.to_csv(index=False).encode())
    if not rows:  # an empty store would only fail later, in training, with a message about tokens per epoch
        reasons = skipped_df["reason"].value_counts()
        raise EmptyStoreError(f"none of the {len(manifest)} images listed could be decoded (most often: "
                              f"{reasons.index[0]!r}, {reasons.iloc[0]} images); the reasons per file are in "
                              f"{out / SKIPPED}; no store was written")
    images, meta["data_root"] = relocatable_paths(manifest.iloc[rows].reset_index(drop=True))
    atomic_write_parquet(out / IMAGES, images)
    meta["n_images"] = len(rows)
    meta["n_skipped"] = len(skipped)
    meta["complete"] = True
    write_manifest(out, meta)
    if skipped:
        log.warning("%d of %d images could not be decoded and were skipped; see %s",
                    len(skipped), len(manifest), out / SKIPPED)

