"""Expert validation of latents, as in the CytoSAE paper: each expert judges latents one at a time
(coherent / not coherent / unsure, plus an optional name of the concept), blinded to the other experts.

Stored in the run's annotations.sqlite, in two tables of its own (the `annotations` table is never touched):
`validation_sessions` (one row per expert: the latents they judge, in their order) and `validation_answers`
(one row per expert and latent, replaced when the expert changes their answer). The latents judged are a sample
of the latents that have top images, the same set for every expert who asks for the same number (so that their
answers can be compared), shown to each expert in an order of their own (a permutation seeded by their name, so
that no position effect is shared). The order is stored when the session starts, so a reload, a restart or a
later `cytosae stats` never reshuffles a session under way. A damaged database is never opened for writing:
`open_validation` gives a stand-in whose writes are refused with the reason, as for annotations.
"""
from __future__ import annotations

import csv
import datetime as _dt
import hashlib
import io
import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from cytosae.analysis.agreement import ANSWERS
from cytosae.store.format import atomic_write_bytes

from .annotations import (MAX_AUTHOR, MAX_NAME, DamagedAnnotations, InvalidAnnotation, _check_encodable,
                          _damage_is_named, check_readable, clean_text, connect, spreadsheet_safe)

Answer = Literal["coherent", "not_coherent", "unsure"]
MAX_EXPERT = MAX_AUTHOR
SAMPLE_SEED = 0  # the shared sample: the same latents for every expert, whatever their name
ANSWER_FIELDS = ("expert", "latent", "answer", "name", "saw_description", "updated")
DESCRIPTIONS = "concepts/descriptions.parquet"
NO_DESCRIPTION = "no description: run cytosae describe"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS validation_sessions (
    expert  TEXT PRIMARY KEY CHECK (length(expert) > 0),
    latents TEXT NOT NULL,
    created TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS validation_answers (
    expert  TEXT NOT NULL,
    latent  INTEGER NOT NULL CHECK (latent >= 0),
    answer  TEXT NOT NULL CHECK (answer IN ('coherent', 'not_coherent', 'unsure')),
    name    TEXT NOT NULL DEFAULT '',
    saw_description INTEGER NOT NULL DEFAULT 0 CHECK (saw_description IN (0, 1)),
    updated TEXT NOT NULL,
    PRIMARY KEY (expert, latent)
);
"""


class NotInSession(LookupError):
    """The latent is not one of those this expert's session shows."""


def check_expert(expert: str) -> str:
    """The expert's name, trimmed; InvalidAnnotation when it is empty, too long or not text."""
    expert = (expert or "").strip()
    _check_encodable("expert", expert)
    if not expert:
        raise InvalidAnnotation("expert: give your name (it keeps your answers and your order of latents apart)")
    if len(expert) > MAX_EXPERT or "\x00" in expert:
        raise InvalidAnnotation(f"expert: at most {MAX_EXPERT} characters of text")
    return expert


def sample_latents(pool, n: int | None) -> list[int]:
    """`n` latents of `pool` (all when n is None or larger), the same for every expert: a prefix of one fixed
    permutation, so that a smaller sample is part of a larger one."""
    pool = np.unique(np.asarray(list(pool), dtype=np.int64))
    perm = np.random.default_rng(SAMPLE_SEED).permutation(pool)
    return [int(j) for j in (perm if n is None else perm[:n])]


def expert_order(expert: str, latents: list[int]) -> list[int]:
    """`latents` in the order `expert` sees them: a permutation seeded by the name (SHA-256, not Python's salted
    hash), so it is the same on every reload, restart and machine."""
    seed = int.from_bytes(hashlib.sha256(expert.encode("utf-8")).digest()[:8], "big")
    return [int(j) for j in np.random.default_rng(seed).permutation(np.asarray(sorted(latents), dtype=np.int64))]


@dataclass
class Session:
    expert: str
    latents: list[int]  # in the order shown
    created: str

    def progress(self, answered: dict[int, dict]) -> dict:
        """How far the expert is: answers given and the first position without one (None when all are done)."""
        nxt = next((i for i, j in enumerate(self.latents) if j not in answered), None)
        return {"expert": clean_text(self.expert), "n": len(self.latents), "answered": len(answered),
                "next": nxt, "created": self.created}


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class ValidationStore:
    """Sessions and answers of the experts. Every write is one transaction; reads open their own connection
    (answers are read one expert at a time, a few rows, so there is no snapshot cache as for annotations)."""

    error: str | None = None

    def __init__(self, path: str | Path) -> None:
        """Raises DamagedAnnotations (before writing anything) when `path` holds something that is not a database."""
        self.path = Path(path)
        check_readable(self.path)
        self._lock = threading.Lock()
        with _damage_is_named(self.path):
            con = connect(self.path)
            try:
                con.executescript(_SCHEMA)  # IF NOT EXISTS: an older file gains the tables, the rest stays as it is
            finally:
                con.close()

    def _read(self, sql: str, params: tuple = ()) -> list[tuple]:
        with _damage_is_named(self.path):
            con = connect(self.path)
            try:
                return con.execute(sql, params).fetchall()
            finally:
                con.close()

    def _write(self, sql: str, params: tuple) -> None:
        with _damage_is_named(self.path):
            con = connect(self.path)
            try:
                with con:
                    con.execute("BEGIN IMMEDIATE")
                    con.execute(sql, params)
            finally:
                con.close()

    def session(self, expert: str) -> Session | None:
        rows = self._read("SELECT expert, latents, created FROM validation_sessions WHERE expert = ?", (expert,))
        return Session(rows[0][0], json.loads(rows[0][1]), rows[0][2]) if rows else None

    def start(self, expert: str, latents: list[int]) -> tuple[Session, bool]:
        """The expert's session, created with `latents` in their order unless it exists; (session, created)."""
        expert = check_expert(expert)
        with self._lock:  # one explorer process: the lock keeps two first clicks from both inserting
            existing = self.session(expert)
            if existing is not None:
                return existing, False
            order = expert_order(expert, latents)
            self._write("INSERT OR IGNORE INTO validation_sessions (expert, latents, created) VALUES (?, ?, ?)",
                        (expert, json.dumps(order), _now()))
        return self.session(expert), True

    def answers(self, expert: str) -> dict[int, dict]:
        rows = self._read(f"SELECT {', '.join(ANSWER_FIELDS)} FROM validation_answers WHERE expert = ?", (expert,))
        return {r[1]: _answer_row(r) for r in rows}

    def all_answers(self) -> list[dict]:
        rows = self._read(f"SELECT {', '.join(ANSWER_FIELDS)} FROM validation_answers ORDER BY latent, expert")
        return [_answer_row(r) for r in rows]

    def answer(self, expert: str, latent: int, answer: str, name: str = "", saw_description: bool = False) -> dict:
        """Save (or replace) one answer of an expert who has a session and was shown `latent`."""
        expert = check_expert(expert)
        name = (name or "").strip()
        _check_encodable("name", name)
        if len(name) > MAX_NAME or "\x00" in name:
            raise InvalidAnnotation(f"name: at most {MAX_NAME} characters of text")
        if answer not in ANSWERS:
            raise InvalidAnnotation(f"answer must be one of {', '.join(ANSWERS)}, got {answer!r}")
        session = self.session(expert)
        if session is None:
            raise LookupError(f"expert {expert!r} has not started a validation session; start one first")
        if latent not in session.latents:
            raise NotInSession(f"latent {latent} is not among the {len(session.latents)} latents of this session")
        updated = _now()
        self._write("INSERT INTO validation_answers (expert, latent, answer, name, saw_description, updated) "
                    "VALUES (?,?,?,?,?,?) ON CONFLICT(expert, latent) DO UPDATE SET answer=excluded.answer, "
                    "name=excluded.name, saw_description=excluded.saw_description, updated=excluded.updated",
                    (expert, latent, answer, name, int(bool(saw_description)), updated))
        return _answer_row((expert, latent, answer, name, int(bool(saw_description)), updated))


def _answer_row(r) -> dict:
    return {"expert": clean_text(r[0]), "latent": int(r[1]), "answer": r[2], "name": clean_text(r[3]),
            "saw_description": bool(r[4]), "updated": r[5]}


class UnavailableValidation:
    """Stands in for the validation tables of a damaged annotations.sqlite: nothing to read, every write refused
    with the reason; the file is never opened."""

    def __init__(self, damage: DamagedAnnotations) -> None:
        self.path, self.damage = damage.path, damage
        self.error = f"{damage}. Until then no validation answers are shown and none can be saved"

    def session(self, expert: str) -> Session | None:
        return None

    def answers(self, expert: str) -> dict[int, dict]:
        return {}

    def all_answers(self) -> list[dict]:
        return []

    def start(self, expert: str, latents: list[int]):
        raise self.damage

    def answer(self, *args, **kwargs) -> dict:
        raise self.damage


def open_validation(path: str | Path) -> ValidationStore | UnavailableValidation:
    try:
        return ValidationStore(path)
    except DamagedAnnotations as damage:
        return UnavailableValidation(damage)


def read_descriptions(run_path: Path) -> pd.DataFrame | None:
    """RUN/concepts/descriptions.parquet (written by `cytosae describe`, read by its own reader) indexed by latent;
    None when absent. ValueError naming the file and column when it is not the table that step writes."""
    from cytosae.analysis.describe import read_descriptions as read

    df = read(run_path)
    if df is None:
        return None
    if not pd.api.types.is_integer_dtype(df["latent"]):
        raise ValueError(f"{DESCRIPTIONS}: column 'latent' must hold integers, not {df['latent'].dtype}; "
                         "rerun `cytosae describe`")
    return df.drop_duplicates("latent", keep="last").set_index("latent")


def export_answers_csv(rows: list[dict], out: Path) -> None:
    """The validation answers as CSV (atomic), cells a spreadsheet would run as formulas neutralised."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(ANSWER_FIELDS))
    w.writeheader()
    for r in rows:
        w.writerow({k: spreadsheet_safe(v) for k, v in r.items()})
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, buf.getvalue().encode())


def answers_csv_path(out: Path) -> Path:
    """Where the CSV export puts the validation answers: next to the annotations' CSV (a second table, other columns)."""
    return out.with_name(out.stem + ".validation.csv")
