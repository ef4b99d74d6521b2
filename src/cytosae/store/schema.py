"""The typed schema of a store's manifest.json, checked every time a store is opened.

Types, ranges and the rules between fields: shards listed in order and, in a complete store, all of them; each
shard's ids as many as its rows and unique across the store; rows in store order; checksums where the format
requires them. From format_version 2 the manifest carries `manifest_sha256`, the sha256 of its own canonical JSON
without that key, so an edit (a removed checksum, a renamed id, a duplicated shard) is detected as such.

Stores written before version 2 (no `manifest_sha256`, shards possibly without checksums) still open: every rule
that their writer already kept is checked, the checksums they lack are not required.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .checksum import self_checksum

FORMAT = "cytosae-activation-store"
FORMAT_VERSION = 2  # 2: manifest_sha256, and a checksum on every shard with a file
SELF_CHECKSUM = "manifest_sha256"
REMEDY = "the manifest was edited or damaged; extract the store again (the same `cytosae extract` command)"

Count = Annotated[int, Field(ge=0)]
Hex64 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class Checksum(_Strict):
    size: Count
    sha256: Hex64


class Shard(_Strict):
    index: Count
    file: Optional[str]
    n_images: Count
    image_ids: list[str]
    rows: Optional[list[Count]] = None  # stores from before rows were recorded
    skipped: list[list[Any]] = []
    checksum: Optional[Checksum] = None

    @model_validator(mode="after")
    def _consistent(self) -> "Shard":
        if len(self.image_ids) != self.n_images:
            raise ValueError(f"shard {self.index} lists {len(self.image_ids)} image ids for n_images {self.n_images}")
        if self.rows is not None and len(self.rows) != self.n_images:
            raise ValueError(f"shard {self.index} lists {len(self.rows)} rows for n_images {self.n_images}")
        if self.rows is not None and any(b <= a for a, b in zip(self.rows, self.rows[1:])):
            raise ValueError(f"shard {self.index}: rows are not in increasing order")
        if (self.file is None) != (self.n_images == 0):
            raise ValueError(f"shard {self.index}: a file must be listed exactly when it holds images")
        if self.file is not None and self.file != f"shard_{self.index:05d}.safetensors":
            raise ValueError(f"shard {self.index}: file {self.file!r} is not this shard's name")
        return self


class StoreManifest(_Strict):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, populate_by_name=True)

    format: Literal[FORMAT]
    format_version: Annotated[int, Field(ge=1, le=FORMAT_VERSION)] = 1
    complete: bool
    created: str
    settings: dict[str, Any]
    n_tokens: Annotated[int, Field(ge=1)]
    d_model: Annotated[int, Field(ge=1)]
    grid: Optional[Annotated[int, Field(ge=1)]] = None
    has_cls: bool = True
    n_images: Optional[Count] = None
    n_skipped: Optional[Count] = None
    data_root: Optional[str] = None
    shards: list[Shard]
    manifest_sha256: Optional[Hex64] = None

    @model_validator(mode="after")
    def _consistent(self) -> "StoreManifest":
        indices = [s.index for s in self.shards]
        if any(b <= a for a, b in zip(indices, indices[1:])):
            raise ValueError(f"shards are not listed once each in index order (indices {indices[:20]})")
        if self.grid is not None and self.grid * self.grid + int(self.has_cls) > self.n_tokens:
            raise ValueError(f"grid {self.grid} x {self.grid} patches do not fit in n_tokens {self.n_tokens}")
        if "backbone" not in self.settings:
            raise ValueError("settings lack 'backbone' (what extracted these tokens)")
        if self.format_version >= 2:
            if self.manifest_sha256 is None:
                raise ValueError(f"format_version {self.format_version} requires {SELF_CHECKSUM}")
            unsummed = [s.index for s in self.shards if s.file is not None and s.checksum is None]
            if unsummed:
                raise ValueError(f"shards {unsummed[:10]} have a file but no checksum")
        if self.complete:
            self._complete_store(indices)
        return self

    def _complete_store(self, indices: list[int]) -> None:
        if indices != list(range(len(indices))):
            raise ValueError(f"a complete store lists shards 0..{len(indices) - 1} with none missing; got {indices[:20]}")
        total = sum(s.n_images for s in self.shards)
        if self.n_images is not None and self.n_images != total:
            raise ValueError(f"n_images is {self.n_images} but the shards hold {total}")
        if total == 0:
            raise ValueError("the store holds no image (none could be decoded)")
        ids = [i for s in self.shards for i in s.image_ids]
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise ValueError(f"image id {dup!r} is listed more than once")
        rows = [r for s in self.shards for r in (s.rows or [])]
        if any(b <= a for a, b in zip(rows, rows[1:])):
            raise ValueError("rows are not in store order across shards")


def seal(meta: dict) -> dict:
    """`meta` as the writer stores it: the current format version and its own checksum."""

    meta = {**meta, "format_version": FORMAT_VERSION}
    meta[SELF_CHECKSUM] = self_checksum(meta, SELF_CHECKSUM)
    return meta


def validate(meta: Any, path: Path) -> dict:
    """`meta` (parsed manifest.json) checked against the schema and its own checksum; a one-line ValueError naming
    the file and field otherwise. Returns meta unchanged (readers keep using the plain dict)."""
    if not isinstance(meta, dict):
        raise ValueError(f"{path} does not hold a JSON object; {REMEDY}")
    if meta.get("format") == FORMAT and isinstance(meta.get("format_version"), int) and \
            meta["format_version"] > FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {meta['format_version']} is newer than this cytosae understands "
                         f"({FORMAT_VERSION}); upgrade cytosae")
    try:
        StoreManifest.model_validate(meta)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "(the manifest)"
        raise ValueError(f"{path}: field {where}: {err['msg']}; {REMEDY}") from None

    recorded = meta.get(SELF_CHECKSUM)
    if recorded is not None and self_checksum(meta, SELF_CHECKSUM) != recorded:
        raise ValueError(f"{path}: its content differs from the {SELF_CHECKSUM} recorded when it was written; {REMEDY}")
    return meta
