"""Sequential, bounded-memory reading of an activation store."""
from __future__ import annotations

import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property
from pathlib import Path
from typing import Iterable, Iterator, Literal

import pandas as pd
import torch
from safetensors import SafetensorError, safe_open

from .format import IMAGES, DamagedFile, read_manifest, verify_file

TokenSelection = Literal["all", "cls", "patch"]
_ST_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}


def find_image(image_id: str, recorded: str | None, roots: Iterable[Path]) -> Path | None:
    """The one place that finds an image file again: ROOT/image_id for each root in order (image ids are paths
    relative to the data root, so a moved data folder is found by naming its new place), then the recorded path
    (absolute, or relative to a root). None when the file is nowhere."""
    roots = list(roots)
    candidates = [Path(r) / image_id for r in roots]
    if recorded:
        rec = Path(recorded)
        candidates += [rec] if rec.is_absolute() else [Path(r) / rec for r in roots]
    return next((c for c in candidates if c.is_file()), None)


class ActivationStore:
    """Read-only view of a store written by `extract` or `import_embeddings`.

    Shards are memory-mapped by safetensors and read a slice at a time, so memory
    stays bounded by the batch size whatever the store's size.

    Opening checks every shard: present, its header holding tokens of the listed shape, and its size and
    sha256 equal to those recorded when it was written (`verify=False`: size only, no read of the data).
    """

    def __init__(self, path: str | Path, allow_incomplete: bool = False, verify: bool = True) -> None:
        self.path = Path(path)
        self.meta = read_manifest(self.path)
        if not self.meta.get("complete") and not allow_incomplete:
            raise ValueError(
                f"store {self.path} is incomplete (an extraction was interrupted). "
                "Run the same `cytosae extract` command again to finish it."
            )
        self._shards = [s for s in self.meta["shards"] if s.get("file")]
        self._verify_shards(full=verify)
        self._check_images_table()

    def _check_images_table(self) -> None:
        """images.parquet must describe the shards' images, in their order (an edit to either is otherwise silent)."""
        path = self.path / IMAGES
        if self.meta.get("complete") and path.is_file():
            ids = pd.read_parquet(path, columns=["image_id"])["image_id"].astype(str).tolist()
            if ids != self.image_ids:
                at = next((i for i, (a, b) in enumerate(zip(ids, self.image_ids)) if a != b), min(len(ids), len(self.image_ids)))
                raise DamagedFile(f"{path} does not match {self.path / 'manifest.json'}: {len(ids)} rows for "
                                  f"{len(self.image_ids)} stored images, first difference at row {at}; extract the store again")

    def _verify_shards(self, full: bool) -> None:
        remedy = (f"it is listed in {self.path / 'manifest.json'}; extract the store again "
                  "(or delete the shard and its entry and rerun `cytosae extract` into this folder)")
        expected_shape = lambda s: (s["n_images"], self.n_tokens, self.d_model)  # noqa: E731

        def check(s: dict) -> None:
            path = self.path / s["file"]
            verify_file(path, s.get("checksum"), remedy, full=full)
            try:  # the header alone: catches truncation in stores written before checksums existed
                with safe_open(path, framework="pt") as fh:
                    shape = tuple(fh.get_slice("tokens").get_shape())
            except (SafetensorError, OSError, KeyError) as exc:
                raise DamagedFile(f"{path} is damaged: not a readable safetensors file with 'tokens' "
                                  f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); {remedy}") from None
            if shape != expected_shape(s):
                raise DamagedFile(f"{path} holds tokens of shape {shape}, {expected_shape(s)} were written; {remedy}")

        # hashlib releases the GIL: shards hash in parallel, one per core
        with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
            list(pool.map(check, self._shards))

    # ------------------------------------------------------------------ shape facts
    @property
    def n_images(self) -> int:
        return sum(s["n_images"] for s in self._shards)

    @property
    def n_tokens(self) -> int:
        return int(self.meta["n_tokens"])

    @property
    def d_model(self) -> int:
        return int(self.meta["d_model"])

    @property
    def grid(self) -> int | None:
        return self.meta.get("grid")

    @property
    def has_cls(self) -> bool:
        return bool(self.meta.get("has_cls", True))

    @cached_property
    def image_ids(self) -> list[str]:
        return [i for s in self._shards for i in s["image_ids"]]

    @cached_property
    def images(self) -> pd.DataFrame:
        """The data manifest rows of the stored images, in store order."""
        path = self.path / IMAGES
        if path.is_file():
            return pd.read_parquet(path)
        return pd.DataFrame({"image_id": self.image_ids})

    @cached_property
    def _index(self) -> dict[str, tuple[str, int]]:
        return {img: (s["file"], j) for s in self._shards for j, img in enumerate(s["image_ids"])}

    def __len__(self) -> int:
        return self.n_images

    def __repr__(self) -> str:
        s = self.meta.get("settings", {})
        return (f"ActivationStore({str(self.path)!r}, images={self.n_images}, tokens={self.n_tokens}, "
                f"d_model={self.d_model}, backbone={s.get('backbone')!r}, layer={s.get('layer')})")

    # ------------------------------------------------------------------ reading
    def _token_slice(self, tokens: TokenSelection) -> slice:
        if tokens == "all":
            return slice(None)
        if tokens == "cls":
            if not self.has_cls:
                raise ValueError(f"store {self.path} has no CLS token; use tokens='all'")
            return slice(0, 1)
        if tokens == "patch":
            return slice(1 if self.has_cls else 0, None)
        raise ValueError(f"tokens must be 'all', 'cls' or 'patch', got {tokens!r}")

    def iter_images(self, batch_size: int = 32, tokens: TokenSelection = "all") -> Iterator[tuple[list[str], torch.Tensor]]:
        """Yield (image_ids, float32 tensor (b, n_selected_tokens, d_model)) in store order."""
        sel = self._token_slice(tokens)
        for s in self._shards:
            with safe_open(self.path / s["file"], framework="pt") as fh:
                view = fh.get_slice("tokens")
                for start in range(0, s["n_images"], batch_size):
                    stop = min(start + batch_size, s["n_images"])
                    block = view[start:stop][:, sel].to(torch.float32)
                    yield s["image_ids"][start:stop], block

    def iter_tokens(self, tokens: TokenSelection = "all", batch_size: int = 4096) -> Iterator[torch.Tensor]:
        """Yield float32 (batch_size, d_model) token rows in store order (the last batch may be smaller)."""
        per_image = len(range(self.n_tokens)[self._token_slice(tokens)])
        images_per_read = max(1, batch_size // per_image)
        pending: list[torch.Tensor] = []
        n_pending = 0
        for _, block in self.iter_images(batch_size=images_per_read, tokens=tokens):
            rows = block.reshape(-1, self.d_model)
            pending.append(rows)
            n_pending += rows.shape[0]
            while n_pending >= batch_size:
                flat = torch.cat(pending)
                yield flat[:batch_size]
                rest = flat[batch_size:]
                pending, n_pending = ([rest] if rest.shape[0] else []), rest.shape[0]
        if n_pending:
            yield torch.cat(pending)

    @property
    def data_root(self) -> str | None:
        """The data folder the images were read from at extraction (images.parquet paths are relative to it)."""
        return self.meta.get("data_root")

    def image_file(self, image_id: str, roots: Iterable[str | Path] = ()) -> Path | None:
        """Where the image file of `image_id` is now: under one of `roots`, else where it was extracted from."""
        return find_image(image_id, self._image_rows.get(image_id), [*map(Path, roots), *([Path(self.data_root)] if self.data_root else [])])

    @cached_property
    def _image_rows(self) -> dict[str, str]:
        images = self.images
        if "path" not in images.columns:
            return {}
        return {str(i): (None if p is None else str(p)) for i, p in zip(images["image_id"], images["path"])}

    def get_image(self, image_id: str) -> torch.Tensor:
        """(n_tokens, d_model) float32 tokens of one image."""
        try:
            file, row = self._index[image_id]
        except KeyError:
            raise KeyError(f"image {image_id!r} is not in store {self.path}") from None
        with safe_open(self.path / file, framework="pt") as fh:
            return fh.get_slice("tokens")[row:row + 1][0].to(torch.float32)

    # ------------------------------------------------------------------ whole-dataset training
    def _shard_layout(self, file: str) -> tuple[int, torch.dtype, tuple[int, ...]]:
        """(byte offset of the `tokens` data, dtype, shape) from a shard's safetensors header."""
        with open(self.path / file, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        info = header.get("tokens")
        if info is None or info.get("dtype") not in _ST_DTYPES:
            raise ValueError(f"{self.path / file}: no readable 'tokens' tensor in the safetensors header; "
                             f"re-extract the store")
        return 8 + n + int(info["data_offsets"][0]), _ST_DTYPES[info["dtype"]], tuple(info["shape"])

    def iter_tokens_shuffled(self, epoch: int, seed: int = 0, tokens: TokenSelection = "all",
                             batch_size: int = 4096) -> Iterator[torch.Tensor]:
        """Yield float32 (<= batch_size, d_model) token rows of every image, images in a random order.

        The order is a pure function of (seed, epoch): a new permutation of all images of all shards
        each epoch, the same one when a run is resumed. Images are read whole with positioned reads
        (os.pread) rather than a memory map, so the pages of a store larger than memory never count
        against the process. Tokens of one image stay together: mix them with a ShuffleBuffer.
        """
        sel = self._token_slice(tokens)
        gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
        layouts = [self._shard_layout(s["file"]) for s in self._shards]
        where = [(i, j) for i, s in enumerate(self._shards) for j in range(s["n_images"])]
        order = torch.randperm(len(where), generator=gen).tolist()
        per_image = len(range(self.n_tokens)[sel])
        images_per_read = max(1, batch_size // per_image)
        fds = [os.open(self.path / s["file"], os.O_RDONLY) for s in self._shards]
        try:
            for start in range(0, len(order), images_per_read):
                group = order[start:start + images_per_read]
                dtype, shape = layouts[where[group[0]][0]][1:]
                # read straight into one buffer (no per-image copies); a fresh one per block, as consumers keep slices
                buf = torch.empty((len(group), *shape[1:]), dtype=dtype)
                raw = memoryview(buf.view(torch.int16 if dtype.itemsize == 2 else torch.int32).numpy()).cast("B")
                row_bytes = raw.nbytes // len(group)
                for m, g in enumerate(group):
                    i, j = where[g]
                    offset, shard_dtype, shard_shape = layouts[i]
                    if (shard_dtype, shard_shape[1:]) != (dtype, shape[1:]):
                        raise ValueError(f"{self.path / self._shards[i]['file']}: tokens are {shard_dtype} "
                                         f"{shard_shape[1:]}, other shards {dtype} {shape[1:]}; re-extract the store")
                    got = os.preadv(fds[i], [raw[m * row_bytes:(m + 1) * row_bytes]], offset + j * row_bytes)
                    if got != row_bytes:
                        raise ValueError(f"{self.path / self._shards[i]['file']} is truncated (image {j}); "
                                         f"re-extract the store")
                yield buf[:, sel].reshape(-1, self.d_model).to(torch.float32)
        finally:
            for fd in fds:
                os.close(fd)
