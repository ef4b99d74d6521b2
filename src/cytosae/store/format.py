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

from pydantic import BaseModel, ConfigDict

from .checksum import canonical_json, self_checksum  # noqa: F401  (re-exported: the files' one checksum)
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


class InvalidFile(ValueError):
    """A file holds what its writer never writes: not JSON, a field missing or of the wrong type, a table without a
    column its readers need. str() is one line, `FILE: FIELD: PROBLEM; FIX`; `file`, `field`, `problem` and `fix`
    let a caller name the file its own way (the explorer: relative to the run, never an absolute server path)."""

    def __init__(self, file: str | Path, field: str, problem: str, fix: str = "") -> None:
        self.file, self.field, self.problem, self.fix = str(file), field, problem, fix
        super().__init__(f"{self.file}: " + (f"{field}: " if field else "") + problem + (f"; {fix}" if fix else ""))


def read_json_object(path: Path, fix: str, shown: str | Path | None = None) -> dict:
    """A JSON object from `path`, or a one-line InvalidFile naming the file (`shown`, default the path) and saying
    what to do (`fix`)."""
    shown = path if shown is None else shown
    try:
        obj = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidFile(shown, "", f"is not valid JSON ({exc})", fix) from None
    if not isinstance(obj, dict):
        raise InvalidFile(shown, "", f"does not hold a JSON object (it holds a JSON {type(obj).__name__})", fix)
    return obj


def validation_problem(exc) -> tuple[str, str]:
    """(field, problem) of a pydantic ValidationError's first error, in words: `steps.train.finished`, `must be a
    string, got 5`. Messages of the schemas' own validators are kept as they are."""
    err = exc.errors()[0]
    field = ".".join(str(p) for p in err.get("loc", ()) if not str(p).startswith("function-")) or "(the file)"
    kind, msg, got = err.get("type", ""), err.get("msg", "is invalid"), repr(err.get("input"))
    got = got if len(got) <= 60 else got[:57] + "..."
    if kind == "value_error":  # a validator's own words; "FIELD: problem" names a field below this one
        msg = msg.removeprefix("Value error, ")
        head, sep, rest = msg.partition(": ")
        if sep and head and " " not in head:
            return (head if field == "(the file)" else f"{field}.{head}"), rest
        return field, msg
    if kind == "missing":
        return field, "is missing"
    if kind == "extra_forbidden":
        return field, "is not a field of this file (written by another tool or version, or edited)"
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return field, f"must be an object, got {got}"
    if kind == "list_type":
        return field, f"must be a list, got {got}"
    if msg.startswith("Input should be "):  # "Input should be a valid integer" -> "must be an integer"
        msg = "must be " + msg[len("Input should be "):].replace("a valid integer", "an integer").replace("valid ", "")
    return field, f"{msg}, got {got}"


class Written(BaseModel):
    """Base of a result file's schema: the fields its readers need, typed strictly ("n_images": "12" is refused,
    never coerced); other fields are kept, so a file from a newer writer that only adds fields still reads."""
    model_config = ConfigDict(strict=True, extra="allow")


def read_json_model(path: Path, model, fix: str, shown: str | Path | None = None) -> dict:
    """The JSON object in `path` checked against the pydantic `model` (its required fields and their types), as
    the plain dict the file holds (fields the model does not declare are kept); a one-line InvalidFile naming the
    file and the first bad field otherwise."""
    from pydantic import ValidationError

    obj = read_json_object(path, fix, shown)
    try:
        model.model_validate(obj)
    except ValidationError as exc:
        raise InvalidFile(path if shown is None else shown, *validation_problem(exc), fix) from None
    return obj


def read_table(path: Path, columns: tuple[str, ...], fix: str, shown: str | Path | None = None,
               kinds: dict[str, str] | None = None):
    """The Parquet table in `path` with at least `columns`, each column named in `kinds` of its kind (see
    check_columns), or a one-line InvalidFile naming the file: unreadable (truncated, not Parquet), lacking a
    column its readers use, or a column of another type."""
    import pandas as pd

    shown = path if shown is None else shown
    try:
        df = pd.read_parquet(path)
    except FileNotFoundError:
        raise
    except Exception as exc:  # pyarrow raises its own types (ArrowInvalid, OSError) for a damaged file
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InvalidFile(shown, "", f"is not a readable Parquet table ({first})", fix) from None
    return check_columns(df, columns, fix, shown, kinds)


# what a reader may ask of a column: the pandas test, and the words of the error
_KINDS = {"number": ("numbers", lambda s, t: t.is_numeric_dtype(s) and not t.is_bool_dtype(s)),
          "integer": ("integers", lambda s, t: t.is_integer_dtype(s)),
          "text": ("text", lambda s, t: t.is_string_dtype(s) or bool(s.isna().all()))}  # str values (nulls allowed)


def check_columns(df, columns: tuple[str, ...], fix: str, shown: str | Path, kinds: dict[str, str] | None = None):
    """`df` (a table read from `shown`) when it has `columns` and every column matched by a `kinds` key (a name, or
    a pattern such as `p_*` for one column per class) holds that kind: "number", "integer" or "text"; else
    InvalidFile naming the file and the column. Returns `df`."""
    from fnmatch import fnmatchcase

    from pandas.api import types

    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise InvalidFile(shown, "columns", f"lacks {missing} (it has {list(df.columns)})", fix)
    for pattern, kind in (kinds or {}).items():
        words, ok = _KINDS[kind]
        for col in (c for c in df.columns if fnmatchcase(str(c), pattern)):
            if not ok(df[col], types):
                sample = df[col].dropna().head(1).tolist()
                raise InvalidFile(shown, str(col), f"must hold {words}, it holds {df[col].dtype}"
                                  + (f" values ({sample[0]!r}, ...)" if sample else ""), fix)
    return df


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
