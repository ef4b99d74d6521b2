"""Latent annotations (name, tags, note, review status) in the run's annotations.sqlite.

One row per latent. Each write is one SQLite transaction, so a crash never leaves a
half-written annotation, and the file survives explorer restarts. A file that is not a readable SQLite database
(overwritten, truncated) is never opened for writing: `open_store` gives a read-only stand-in that says why.
"""
from __future__ import annotations

import csv
import datetime as _dt
import io
import json
import sqlite3
import threading
import urllib.parse
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cytosae.store.format import atomic_write_bytes

STATUSES = ("unreviewed", "validated", "rejected")
Status = Literal["unreviewed", "validated", "rejected"]
MAX_NAME, MAX_NOTE, MAX_TAGS, MAX_TAG, MAX_AUTHOR = 200, 10_000, 32, 64, 100
FIELDS = ("latent", "name", "tags", "note", "status", "author", "updated")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS annotations (
    latent  INTEGER PRIMARY KEY CHECK (latent >= 0),
    name    TEXT NOT NULL DEFAULT '',
    tags    TEXT NOT NULL DEFAULT '[]',
    note    TEXT NOT NULL DEFAULT '',
    status  TEXT NOT NULL DEFAULT 'unreviewed' CHECK (status IN ('unreviewed', 'validated', 'rejected')),
    author  TEXT NOT NULL DEFAULT '',
    updated TEXT NOT NULL
);
"""


class InvalidAnnotation(ValueError):
    pass


class DamagedAnnotations(RuntimeError):
    """annotations.sqlite exists but is not a readable SQLite database; the message names it and what to do."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path = path
        super().__init__(f"{path} is not a readable annotations database ({reason}); it is left unchanged: restore it "
                         "from a backup, or move it aside to start an empty one")


# SQLite's own words for "these bytes are not (all of) a database"; locked or unwritable files are other errors
_DAMAGE_CODES = ("SQLITE_NOTADB", "SQLITE_CORRUPT")


@contextmanager
def _damage_is_named(path: Path):
    try:
        yield
    except sqlite3.DatabaseError as exc:
        if getattr(exc, "sqlite_errorname", None) in _DAMAGE_CODES:
            raise DamagedAnnotations(path, str(exc)) from None
        raise


def check_readable(path: Path) -> None:
    """Raise DamagedAnnotations unless `path` is absent, empty, or a SQLite database that passes quick_check.
    Read-only: a damaged file must reach the person who can restore it with its bytes as they were."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    uri = "file:" + urllib.parse.quote(str(path.resolve())) + "?mode=ro"
    with _damage_is_named(path):
        con = sqlite3.connect(uri, uri=True, timeout=10)
        try:
            problems = [r[0] for r in con.execute("PRAGMA quick_check").fetchall()]
        finally:
            con.close()
    if problems != ["ok"]:
        raise DamagedAnnotations(path, f"quick_check: {problems[0]}")


def connect(path: Path) -> sqlite3.Connection:
    """A connection to annotations.sqlite in autocommit mode (transactions are explicit), WAL, fully synced."""
    # A connection per call: FastAPI runs handlers on a thread pool and sqlite3 connections are per-thread.
    con = sqlite3.connect(path, timeout=10, isolation_level=None)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=FULL")
    return con


def clean_text(text: str) -> str:
    """`text` as valid Unicode: surrogate pairs joined, lone surrogates (not encodable as UTF-8) replaced by U+FFFD."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _check_encodable(field: str, text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidAnnotation(f"{field} contains a lone surrogate (U+{ord(text[exc.start]):04X} at character "
                                f"{exc.start}), which is not text; send valid Unicode") from None


@dataclass
class Annotation:
    latent: int
    name: str = ""
    tags: list[str] | None = None
    note: str = ""
    status: str = "unreviewed"
    author: str = ""
    updated: str = ""

    def to_dict(self) -> dict:
        """JSON-ready, and always encodable: rows stored before text was checked are cleaned here."""
        return {"latent": self.latent, "name": clean_text(self.name), "tags": [clean_text(t) for t in self.tags or []],
                "note": clean_text(self.note), "status": self.status, "author": clean_text(self.author),
                "updated": self.updated}


def validate(name: str, tags: list[str], note: str, status: str, author: str) -> tuple[str, list[str], str, str, str]:
    """Trimmed, checked values; raises InvalidAnnotation with a message a person can act on."""
    name, note, author = (name or "").strip(), (note or "").strip(), (author or "").strip()
    for field, text in (("name", name), ("note", note), ("author", author)):
        _check_encodable(field, text)
    if len(name) > MAX_NAME:
        raise InvalidAnnotation(f"name is {len(name)} characters; at most {MAX_NAME}")
    if len(note) > MAX_NOTE:
        raise InvalidAnnotation(f"note is {len(note)} characters; at most {MAX_NOTE}")
    if len(author) > MAX_AUTHOR:
        raise InvalidAnnotation(f"author is {len(author)} characters; at most {MAX_AUTHOR}")
    if status not in STATUSES:
        raise InvalidAnnotation(f"status must be one of {', '.join(STATUSES)}, got {status!r}")
    clean: list[str] = []
    for t in tags or []:
        if not isinstance(t, str):
            raise InvalidAnnotation("tags must be strings")
        t = t.strip()
        _check_encodable("tag", t)
        if len(t) > MAX_TAG:
            raise InvalidAnnotation(f"tag {t[:20]!r}... is {len(t)} characters; at most {MAX_TAG}")
        if t and t not in clean:
            clean.append(t)
    if len(clean) > MAX_TAGS:
        raise InvalidAnnotation(f"{len(clean)} tags; at most {MAX_TAGS}")
    for text in (name, note, author, *clean):
        if "\x00" in text:
            raise InvalidAnnotation("text must not contain NUL characters")
    return name, clean, note, status, author


class AnnotationStore:
    """Reads come from an in-memory snapshot, reloaded when this store writes or the files change on disk (another
    process): a latent page asks for a dozen annotations, and a SQLite connection per read cost ~1 ms each."""

    error: str | None = None  # the stand-in for a damaged file says why it is read-only

    def __init__(self, path: str | Path) -> None:
        """Raises DamagedAnnotations (before writing anything) when `path` holds something that is not a database."""
        self.path = Path(path)
        check_readable(self.path)
        with _damage_is_named(self.path):
            con = self._connect()
            try:
                con.executescript(_SCHEMA)
            finally:
                con.close()
        self._lock = threading.Lock()
        self._snap: tuple[tuple, dict[int, Annotation]] | None = None

    def _signature(self) -> tuple:
        sig = []
        for p in (self.path, self.path.with_name(self.path.name + "-wal")):
            try:
                st = p.stat()
                sig.append((st.st_mtime_ns, st.st_size))
            except FileNotFoundError:
                sig.append(None)
        return tuple(sig)

    def _snapshot(self) -> dict[int, Annotation]:
        sig = self._signature()
        with self._lock:
            if self._snap is not None and self._snap[0] == sig:
                return self._snap[1]
        with _damage_is_named(self.path):  # damaged while the explorer runs: a 503 that names the file, not a 500
            con = self._connect()
            try:
                rows = con.execute(f"SELECT {', '.join(FIELDS)} FROM annotations ORDER BY latent").fetchall()
            finally:
                con.close()
        snap = {r[0]: self._row(r) for r in rows}
        with self._lock:
            self._snap = (sig, snap)
        return snap

    def _invalidate(self) -> None:
        with self._lock:
            self._snap = None

    def _connect(self) -> sqlite3.Connection:
        return connect(self.path)

    @staticmethod
    def _row(r) -> Annotation:
        return Annotation(latent=r[0], name=r[1], tags=json.loads(r[2]), note=r[3], status=r[4], author=r[5], updated=r[6])

    def get(self, latent: int) -> Annotation | None:
        return self._snapshot().get(latent)

    def all(self) -> list[Annotation]:
        return list(self._snapshot().values())

    def put(self, latent: int, name: str = "", tags: list[str] | None = None, note: str = "",
            status: str = "unreviewed", author: str = "") -> Annotation:
        if latent < 0:
            raise InvalidAnnotation("latent must be >= 0")
        name, tags, note, status, author = validate(name, tags or [], note, status, author)
        updated = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        self._write(
            "INSERT INTO annotations (latent, name, tags, note, status, author, updated) VALUES (?,?,?,?,?,?,?) "
            "ON CONFLICT(latent) DO UPDATE SET name=excluded.name, tags=excluded.tags, note=excluded.note, "
            "status=excluded.status, author=excluded.author, updated=excluded.updated",
            (latent, name, json.dumps(tags), note, status, author, updated))
        return Annotation(latent, name, tags, note, status, author, updated)

    def delete(self, latent: int) -> bool:
        return self._write("DELETE FROM annotations WHERE latent = ?", (latent,)) > 0

    def _write(self, sql: str, params: tuple) -> int:
        """One statement in one transaction; returns the number of rows changed."""
        with _damage_is_named(self.path):
            con = self._connect()
            try:
                with con:  # one transaction
                    con.execute("BEGIN IMMEDIATE")
                    n = con.execute(sql, params).rowcount
            finally:
                con.close()
                self._invalidate()
        return n

    def search(self, text: str) -> list[Annotation]:
        """Annotations whose name, tags or note contain `text` (case-insensitive)."""
        needle = text.strip().lower()
        return [a for a in self.all() if needle in a.name.lower() or needle in a.note.lower()
                or any(needle in t.lower() for t in a.tags or [])]


class UnavailableAnnotations:
    """Stands in for the store of a damaged annotations.sqlite: no annotations to read, every write refused with the
    reason. The file itself is never opened, so its bytes stay as they were for whoever restores it."""

    def __init__(self, damage: DamagedAnnotations) -> None:
        self.path = damage.path
        self.damage = damage
        self.error = (f"{damage}. Until then the explorer is read-only: no annotations are shown and none can be "
                      "saved")

    def get(self, latent: int) -> Annotation | None:
        return None

    def all(self) -> list[Annotation]:
        return []

    def search(self, text: str) -> list[Annotation]:
        return []

    def put(self, latent: int, *args, **kwargs) -> Annotation:
        raise self.damage

    def delete(self, latent: int) -> bool:
        raise self.damage


def open_store(path: str | Path) -> AnnotationStore | UnavailableAnnotations:
    """The run's annotations; the read-only stand-in (its `error` says why) when the file is damaged."""
    try:
        return AnnotationStore(path)
    except DamagedAnnotations as damage:
        return UnavailableAnnotations(damage)


# OWASP "CSV injection": a spreadsheet runs a cell that starts with one of these as a formula
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(value):
    """`value` with a leading single quote when it is text a spreadsheet would run as a formula; otherwise as is."""
    return "'" + value if isinstance(value, str) and value.startswith(FORMULA_STARTS) else value


def export(store: AnnotationStore, out: str | Path, fmt: str = "csv", validation: list[dict] | None = None,
           descriptions: dict[int, str] | None = None) -> int:
    """Write every annotation to `out` (atomic) as csv or json; returns the number written. CSV cells that a
    spreadsheet would run as formulas get a leading ' (see spreadsheet_safe); JSON keeps the exact text.
    `validation`: the experts' answers (explorer/validation.py), added to the JSON as a list of their own; a CSV
    has one table's columns, so the caller writes them to a second file. `descriptions`: latent -> the automatic
    description's line (`cytosae describe`), a `description` column beside each annotation (and in JSON a
    `descriptions` list of every described latent)."""
    rows = [a.to_dict() for a in store.all()]
    if descriptions is not None:
        rows = [{**r, "description": descriptions.get(r["latent"], "")} for r in rows]
    if fmt == "json":
        doc = {"annotations": rows, "statuses": list(STATUSES)}
        if validation is not None:
            doc["validation"] = validation
        if descriptions is not None:
            doc["descriptions"] = [{"latent": j, "text": t} for j, t in sorted(descriptions.items())]
        data = (json.dumps(doc, indent=1) + "\n").encode()
    elif fmt == "csv":
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(FIELDS) + (["description"] if descriptions is not None else []))
        w.writeheader()
        for r in rows:
            w.writerow({k: spreadsheet_safe(v) for k, v in {**r, "tags": ";".join(r["tags"])}.items()})
        data = buf.getvalue().encode()
    else:
        raise ValueError(f"format must be csv or json, got {fmt!r}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, data)
    return len(rows)
