"""Which files the explorer may read: only those inside the run and the data folders.

Paths come from tables (images.parquet) and run.json, never from the request, but a
table can still name `../../etc/passwd` or a symlink out of the data folder; we resolve
every path (following symlinks) and refuse anything outside the allowed roots.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable


class OutsideRoots(PermissionError):
    """A path resolves outside every allowed root."""


def resolve_inside(path: str | os.PathLike, roots: Iterable[Path]) -> Path:
    """The real path of `path` if it lies inside one of `roots` (also resolved), else raise OutsideRoots."""
    real = Path(os.path.realpath(path))
    for root in roots:
        root_real = Path(os.path.realpath(root))
        if real == root_real or root_real in real.parents:
            return real
    raise OutsideRoots(f"{path} is outside the run and data folders the run records; if the images are kept there "
                       "on purpose, start the explorer (or report) with --data-root FOLDER naming their folder")


def is_safe_name(name: str, max_len: int = 200) -> bool:
    """A single path component safe to use in a URL or file name (dataset names, upload ids)."""
    return (0 < len(name) <= max_len and name not in (".", "..") and "/" not in name and "\\" not in name
            and "\x00" not in name)
