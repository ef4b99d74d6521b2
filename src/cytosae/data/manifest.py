"""One manifest for every input layout.

An image's id is its POSIX path relative to the data root (for a CSV, its folder or the folder common to the
files it lists: `csv_data_root`), so results stay attached to the same cell whatever order images are read in.
Paths are normalised (`a/../a/x.jpg` is `a/x.jpg`) but symlinks are not resolved:
a link is listed, and reported if unreadable, under its own name.
CSV tables are validated before use; a bad one is a one-line ManifestError naming
the file, line and column.
"""
from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import pandas as pd

from .decode import printable_name

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp"}
CORE_COLUMNS = ["image_id", "path", "label", "patient_id", "diagnosis"]


class ManifestError(ValueError):
    """A data manifest or patients table that cannot be used; the message names the file, line and column."""


def _images_under(folder: Path) -> list[Path]:
    """Every non-hidden entry named like an image, symlinks unresolved. Entries that are not readable regular
    files (dangling or looping links, FIFOs) are listed too, so that decoding reports them in skipped.csv."""
    found = []
    for p in folder.rglob("*"):
        if p.suffix.lower() not in IMAGE_SUFFIXES or any(part.startswith(".") for part in p.relative_to(folder).parts):
            continue
        if p.is_dir() and not p.is_symlink():  # a folder named like an image: rglob lists what is inside
            continue
        found.append(p)
    return sorted(found)


def _decode_utf8(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ManifestError(f"{path} cannot be read ({exc.strerror})") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise ManifestError(f"{path}: line {line} is not UTF-8 text (byte 0x{raw[exc.start]:02x}); "
                            "save the file as UTF-8 (CSV UTF-8 in spreadsheet programs)") from None


def read_table(path: str | Path, required: tuple[str, ...]) -> tuple[pd.DataFrame, list[int]]:
    """A CSV's rows as strings (empty -> None) and each row's line number in the file, checked on the way:
    UTF-8, a header with the `required` columns and no duplicate names, every row no wider than the header,
    no unterminated quote, at least one row, no empty required value. Errors are ManifestError."""
    path = Path(path)
    text = _decode_utf8(path)
    if not text.strip():
        raise ManifestError(f"{path} is empty: expected a header row naming the columns ({', '.join(required)}, ...) "
                            "and one row per entry")
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    header, rows, lines = None, [], []
    while True:
        start = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            raise ManifestError(f"{path}: line {start}: malformed CSV ({exc}); a quoted value that never ends?") from None
        if not row:
            continue  # blank line
        if header is None:
            header = [h.strip() for h in row]
            continue
        if len(row) > len(header):
            raise ManifestError(f"{path}: line {start} has {len(row)} values but the header has {len(header)} columns; "
                                "quote values that contain commas")
        nul = next((header[i] if i < len(header) else i for i, v in enumerate(row) if "\x00" in v), None)
        if nul is not None:  # NUL ends strings in C libraries, SQLite text and most viewers: the value would change
            raise ManifestError(f"{path}: line {start}, column '{nul}' holds a NUL byte; remove it")
        rows.append(row + [""] * (len(header) - len(row)))
        lines.append(start)
    dup = sorted({h for h in header if header.count(h) > 1})
    if dup:
        raise ManifestError(f"{path}: the header names column(s) {dup} more than once")
    for col in required:
        if col not in header:
            raise ManifestError(f"{path} has no '{col}' column (it has {header}); add one")
    if not rows:
        raise ManifestError(f"{path} has a header but no rows: list one entry per row")
    table = pd.DataFrame(rows, columns=header, dtype=object)
    for col in required:
        empty = [line for line, v in zip(lines, table[col]) if not v.strip()]
        if empty:
            raise ManifestError(f"{path}: line {empty[0]}, column '{col}' is empty")
    return table.replace({"": None}), lines


def _check_unique(path: Path, values: list[str], lines: list[int], what: str) -> None:
    first: dict[str, int] = {}
    for v, line in zip(values, lines):
        if v in first:
            raise ManifestError(f"{path}: duplicate {what}: lines {first[v]} and {line} both name {v!r}; "
                                "every one must appear once")
        first[v] = line


def csv_data_root(csv_path: Path, paths: list[Path]) -> Path:
    """The folder a CSV's image ids are relative to: the CSV's own folder when it holds every listed file, else
    the deepest folder holding them all (a CSV picking cells from a larger collection by absolute path). The
    store records it as its data root, so the explorer serves these files and `--data-root` can remap them."""
    here = csv_path.parent.resolve()
    if all(p.is_relative_to(here) for p in paths):
        return here
    common = Path(os.path.commonpath([str(p.parent) for p in paths]))
    if common == Path(common.anchor):
        outside = next(p for p in paths if not p.is_relative_to(here))
        raise ManifestError(f"{csv_path}: the listed images share no folder but {common} (e.g. {paths[0]} and "
                            f"{outside}); list images of one collection per CSV, or copy them under one folder")
    return common


def _from_csv(csv_path: Path) -> pd.DataFrame:
    table, lines = read_table(csv_path, ("path",))
    here = csv_path.parent.resolve()
    # lexical normalisation: a/../a/x.jpg and a/x.jpg are one image; symlinks keep their own names
    paths = [Path(os.path.normpath(p if os.path.isabs(p) else here / p)) for p in table["path"]]
    root = csv_data_root(csv_path, paths)
    ids = [p.relative_to(root).as_posix() for p in paths]
    _check_unique(csv_path, ids, lines, "image ids (paths compared after normalisation)")
    table = table.drop(columns=["path"])
    table.insert(0, "path", [str(p) for p in paths])
    table.insert(0, "image_id", ids)
    return table


def _from_class_tree(root: Path) -> pd.DataFrame:
    rows = []
    for p in _images_under(root):
        rel = p.relative_to(root)
        # ids are text (tables, pages); a non-UTF-8 name keeps its real path and is skipped, listed, at decoding
        rows.append({"image_id": printable_name(rel.as_posix()), "path": str(p),
                     "label": printable_name(rel.parts[0]) if len(rel.parts) > 1 else None})
    return pd.DataFrame(rows, dtype=object)  # object: an arrow string column cannot hold a non-UTF-8 path


def _from_patient_tree(root: Path, patients_csv: Path) -> pd.DataFrame:
    if not Path(patients_csv).is_file():
        raise FileNotFoundError(f"patients table {patients_csv} not found")
    patients, lines = read_table(patients_csv, ("patient_id",))
    _check_unique(patients_csv, list(patients.patient_id), lines, "patient ids")
    rows = []
    for p in _images_under(root):
        rel = p.relative_to(root)
        if len(rel.parts) < 2:
            raise ManifestError(f"{p} is not inside a patient folder; expected ROOT/<patient>/[<class>/]image")
        rows.append({"image_id": printable_name(rel.as_posix()), "path": str(p), "patient_id": printable_name(rel.parts[0]),
                     "label": printable_name(rel.parts[1]) if len(rel.parts) > 2 else None})
    cells = pd.DataFrame(rows, dtype=object)  # object: an arrow string column cannot hold a non-UTF-8 path
    if len(cells):
        missing = sorted(set(cells.patient_id) - set(patients.patient_id))
        if missing:
            raise ManifestError(f"patient folders {missing[:10]} have no row in {patients_csv}; add them to the table")
    return cells.merge(patients, on="patient_id", how="left", suffixes=("", "_patient"))


def load_manifest(source: str | Path, patients: str | Path | None = None) -> pd.DataFrame:
    """Manifest of a class-per-folder tree, a patient-per-folder tree (when `patients` is given) or a CSV."""
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"data source {source} does not exist")
    if source.is_file():
        if source.suffix.lower() != ".csv":
            raise ManifestError(f"{source}: a data source file must be a manifest .csv with a 'path' column")
        table = _from_csv(source)
    elif patients is not None:
        table = _from_patient_tree(source.resolve(), Path(patients))
    else:
        table = _from_class_tree(source.resolve())
    if len(table) == 0:
        raise ManifestError(f"no images found in {source} (looked for {sorted(IMAGE_SUFFIXES)})")
    dup = table["image_id"][table["image_id"].duplicated()]
    if len(dup):
        raise ManifestError(f"{source}: duplicate image ids {list(dup[:5])}; every image must appear once")
    for col in CORE_COLUMNS:
        if col not in table.columns:
            table[col] = None
    extra = [c for c in table.columns if c not in CORE_COLUMNS]
    table = table[CORE_COLUMNS + extra].astype({c: object for c in CORE_COLUMNS})
    table = table.where(table.notna(), None)
    return table.sort_values("image_id", kind="stable").reset_index(drop=True)
