"""Tables keyed by latent, sliced in O(log n) so a latent page never scans 49k-latent tables."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd


class LatentIndexed:
    """A DataFrame sorted by `latent` (then `order`), with binary search for one latent's rows."""

    def __init__(self, df: pd.DataFrame, order: list[str] | None = None) -> None:
        if "latent" not in df.columns:
            raise ValueError(f"table has no 'latent' column (columns: {list(df.columns)})")
        keys = ["latent"] + [c for c in (order or []) if c in df.columns]
        self.df = df.sort_values(keys, kind="stable").reset_index(drop=True)
        self._latents = self.df["latent"].to_numpy(dtype=np.int64)
        # plain numpy columns: a page's rows become dicts without pandas (indexing a DataFrame costs ~0.1 ms a call)
        self._cols = {c: _column(self.df[c]) for c in self.df.columns}

    @classmethod
    def read(cls, path: Path, order: list[str] | None = None) -> "LatentIndexed | None":
        return cls(pd.read_parquet(path), order) if path.is_file() else None

    def _span(self, latent: int) -> tuple[int, int]:
        return (int(np.searchsorted(self._latents, latent, side="left")),
                int(np.searchsorted(self._latents, latent, side="right")))

    def rows(self, latent: int) -> pd.DataFrame:
        lo, hi = self._span(latent)
        return self.df.iloc[lo:hi]

    def records(self, latent: int, columns: list[str] | None = None) -> list[dict]:
        """JSON-ready rows of one latent (same values as records(rows(latent)))."""
        lo, hi = self._span(latent)
        cols = [c for c in (columns or list(self._cols)) if c in self._cols]
        values = [[to_json(v) for v in self._cols[c][lo:hi].tolist()] for c in cols]
        return [dict(zip(cols, row)) for row in zip(*values)] if cols else [{} for _ in range(hi - lo)]

    def __len__(self) -> int:
        return len(self.df)


def _column(s: pd.Series) -> np.ndarray:
    if pd.api.types.is_bool_dtype(s.dtype) or pd.api.types.is_integer_dtype(s.dtype) or pd.api.types.is_float_dtype(s.dtype):
        if s.isna().any() and not pd.api.types.is_float_dtype(s.dtype):
            return s.astype(object).where(s.notna(), None).to_numpy()
        return s.to_numpy()
    return s.astype(object).where(s.notna(), None).to_numpy() if s.dtype != object else s.to_numpy()


def records(df: pd.DataFrame) -> list[dict]:
    """JSON-ready rows: numpy scalars and arrays become Python values, NaN becomes None."""
    out = []
    cols = list(df.columns)
    for row in df.itertuples(index=False, name=None):
        out.append({c: to_json(v) for c, v in zip(cols, row)})
    return out


def to_json(v):
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating, float)):
        f = float(v)
        return None if not np.isfinite(f) else f
    if isinstance(v, np.bool_):
        return bool(v)
    if isinstance(v, np.ndarray):
        return [to_json(x) for x in v.tolist()]
    if isinstance(v, (list, tuple)):
        return [to_json(x) for x in v]
    if v is pd.NA or v is pd.NaT:
        return None
    return v
