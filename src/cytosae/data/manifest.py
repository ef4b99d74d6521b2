"""One manifest for every input layout.

An image's id is its POSIX path relative to the data root, so results stay
attached to the same cell whatever order images are read or shuffled in.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp"}
CORE_COLUMNS = ["image_id", "path", "label", "patient_id", "diagnosis"]


def _images_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*")
                  if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _from_csv(csv_path: Path) -> pd.DataFrame:
    table = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    if "path" not in table.columns:
        raise ValueError(f"{csv_path} has no 'path' column (it has {list(table.columns)}); "
                         "add one with each image's path relative to the CSV's folder")
    root = csv_path.parent.resolve()
    paths = [Path(p) if Path(p).is_absolute() else root / p for p in table["path"]]
    table = table.drop(columns=["path"]).replace({"": None})
    table.insert(0, "path", [str(p) for p in paths])
    ids = [p.relative_to(root).as_posix() if p.is_relative_to(root) else p.as_posix() for p in paths]
    table.insert(0, "image_id", ids)
    return table


def _from_class_tree(root: Path) -> pd.DataFrame:
    rows = []
    for p in _images_under(root):
        rel = p.relative_to(root)
        rows.append({"image_id": rel.as_posix(), "path": str(p.resolve()),
                     "label": rel.parts[0] if len(rel.parts) > 1 else None})
    return pd.DataFrame(rows)


def _from_patient_tree(root: Path, patients_csv: Path) -> pd.DataFrame:
    if not Path(patients_csv).is_file():
        raise FileNotFoundError(f"patients table {patients_csv} not found")
    patients = pd.read_csv(patients_csv, dtype=str, keep_default_na=False).replace({"": None})
    if "patient_id" not in patients.columns:
        raise ValueError(f"{patients_csv} has no 'patient_id' column (it has {list(patients.columns)})")
    rows = []
    for p in _images_under(root):
        rel = p.relative_to(root)
        if len(rel.parts) < 2:
            raise ValueError(f"{p} is not inside a patient folder; expected ROOT/<patient>/[<class>/]image")
        rows.append({"image_id": rel.as_posix(), "path": str(p.resolve()), "patient_id": rel.parts[0],
                     "label": rel.parts[1] if len(rel.parts) > 2 else None})
    cells = pd.DataFrame(rows)
    if len(cells):
        missing = sorted(set(cells.patient_id) - set(patients.patient_id))
        if missing:
            raise ValueError(f"patient folders {missing[:10]} have no row in {patients_csv}; add them to the table")
    return cells.merge(patients, on="patient_id", how="left", suffixes=("", "_patient"))


def load_manifest(source: str | Path, patients: str | Path | None = None) -> pd.DataFrame:
    """Manifest of a class-per-folder tree, a patient-per-folder tree (when `patients` is given) or a CSV."""
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"data source {source} does not exist")
    if source.is_file():
        if source.suffix.lower() != ".csv":
            raise ValueError(f"{source}: a data source file must be a manifest .csv with a 'path' column")
        table = _from_csv(source)
    elif patients is not None:
        table = _from_patient_tree(source.resolve(), Path(patients))
    else:
        table = _from_class_tree(source.resolve())
    if len(table) == 0:
        raise ValueError(f"no images found in {source} (looked for {sorted(IMAGE_SUFFIXES)})")
    dup = table["image_id"][table["image_id"].duplicated()]
    if len(dup):
        raise ValueError(f"{source}: duplicate image ids {list(dup[:5])}; every image must appear once")
    for col in CORE_COLUMNS:
        if col not in table.columns:
            table[col] = None
    extra = [c for c in table.columns if c not in CORE_COLUMNS]
    table = table[CORE_COLUMNS + extra].astype({c: object for c in CORE_COLUMNS})
    table = table.where(table.notna(), None)
    return table.sort_values("image_id", kind="stable").reset_index(drop=True)
