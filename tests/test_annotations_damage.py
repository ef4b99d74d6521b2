"""Issue #20 items 8-10: a damaged annotations.sqlite, formula cells in the CSV export, upload errors without reprs."""
import csv
import os
import re
import sqlite3

import pandas as pd
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from cytosae.explorer import create_app
from cytosae.explorer.annotations import AnnotationStore
from explorer_fixtures import LOCAL, copy_of, session_run


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return copy_of(session_run(tmp_path_factory), tmp_path_factory.mktemp("annot-damage"))


def _random_bytes(db):
    db.write_bytes(os.urandom(8192))


def _truncated(db):
    """A real store, written by AnnotationStore and closed, then cut in half (an interrupted copy, a full disk)."""
    store = AnnotationStore(db)
    for j in range(20):
        store.put(j, name=f"latent {j}", note="x" * 3000)
    del store
    con = sqlite3.connect(db)  # fold the WAL into the main file, as the last connection closing does
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    data = db.read_bytes()
    assert len(data) > 16384
    db.write_bytes(data[: len(data) // 2])


DAMAGES = {"random-bytes": _random_bytes, "truncated": _truncated}


@pytest.fixture(params=list(DAMAGES))
def damaged(request, fx, tmp_path):
    run = copy_of(fx, tmp_path).path
    db = run / "annotations.sqlite"
    DAMAGES[request.param](db)
    for side in ("-wal", "-shm"):
        db.with_name(db.name + side).unlink(missing_ok=True)
    return run, db, db.read_bytes()


def _one_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, text
    return lines[0]


# ------------------------------------------------------------------ 8: damaged annotations.sqlite
def test_explorer_starts_read_only_on_a_damaged_annotations_file(damaged, capfd, tmp_path):
    run, db, before = damaged
    with TestClient(create_app(run), base_url=LOCAL) as c:
        warning = _one_line(capfd.readouterr().err)
        assert "annotations.sqlite" in warning and "read-only" in warning and "backup" in warning, warning

        info = c.get("/api/run")
        assert info.status_code == 200
        banner = info.json()["annotations_error"]
        assert "annotations.sqlite" in banner and "read-only" in banner and str(tmp_path) not in banner

        # the rest of the explorer works, with no annotations shown
        assert c.get("/api/annotations").json()["annotations"] == []
        assert c.get("/api/latents/0").status_code == 200
        assert c.get("/api/latents", params={"dataset": "acevedo"}).status_code == 200
        assert c.get("/api/search", params={"q": "latent"}).json()["results"] == []

        for r in (c.put("/api/annotations/1", json={"name": "blast"}), c.delete("/api/annotations/1")):
            assert r.status_code in (409, 503), r.text
            detail = _one_line(r.json()["detail"])
            assert "annotations.sqlite" in detail and str(tmp_path) not in detail
    assert db.read_bytes() == before  # nothing already written is overwritten


def test_healthy_annotations_have_no_banner(fx, tmp_path, capfd):
    run = copy_of(fx, tmp_path).path
    AnnotationStore(run / "annotations.sqlite").put(2, name="kept")
    with TestClient(create_app(run), base_url=LOCAL) as c:
        assert c.get("/api/run").json()["annotations_error"] is None
        assert c.get("/api/annotations/2").json()["name"] == "kept"
        assert c.put("/api/annotations/3", json={"name": "new"}).status_code == 200
    assert "annotations" not in capfd.readouterr().err


def test_explore_command_starts_on_a_damaged_annotations_file(damaged, monkeypatch):
    import uvicorn

    from cytosae.cli import app as cli

    run, db, before = damaged
    served = []
    monkeypatch.setattr(uvicorn, "run", lambda web, **kw: served.append(web))
    res = CliRunner().invoke(cli, ["explore", str(run), "--device", "cpu"])
    assert res.exit_code == 0, (res.stdout, res.stderr, res.exception)
    assert len(served) == 1
    warning = _one_line(res.stderr)
    assert str(db) in warning or "annotations.sqlite" in warning
    assert db.read_bytes() == before


def test_export_of_a_damaged_annotations_file_exits_2_naming_it(damaged, tmp_path):
    from cytosae.cli import app as cli

    run, db, before = damaged
    out = tmp_path / "out" / "a.csv"
    res = CliRunner().invoke(cli, ["annotations", "export", str(run), "--out", str(out)])
    assert res.exit_code == 2, (res.stdout, res.stderr, res.exception)
    line = _one_line(res.stderr)
    assert str(db) in line and "Traceback" not in line, line
    assert not out.exists()
    assert db.read_bytes() == before


def test_annotations_damaged_while_the_explorer_runs_answer_503(fx, tmp_path):
    run = copy_of(fx, tmp_path).path
    db = run / "annotations.sqlite"
    with TestClient(create_app(run), base_url=LOCAL) as c:
        assert c.put("/api/annotations/1", json={"name": "blast"}).status_code == 200
        for side in ("-wal", "-shm"):
            db.with_name(db.name + side).unlink(missing_ok=True)
        db.write_bytes(os.urandom(8192))
        before = db.read_bytes()
        r = c.get("/api/annotations")
        assert r.status_code == 503 and "annotations.sqlite" in r.json()["detail"], r.text
        r = c.put("/api/annotations/2", json={"name": "x"})
        assert r.status_code == 503 and "annotations.sqlite" in _one_line(r.json()["detail"]), r.text
    assert db.read_bytes() == before


# ------------------------------------------------------------------ 9: CSV injection
FORMULAS = {1: "=HYPERLINK(\"http://x.example\",\"click\")", 2: "+1+2", 3: "-2+3", 4: "@SUM(A1:A2)"}


def test_csv_export_neutralises_formula_starts(fx, tmp_path):
    from cytosae.cli import app as cli

    run = copy_of(fx, tmp_path).path
    db = run / "annotations.sqlite"
    store = AnnotationStore(db)
    for j, text in FORMULAS.items():
        store.put(j, name=text, note=text, author=text, tags=[text, "ok"])
    store.put(10, name="blast cell", tags=["granular", "a=b"], note="ratio 2-3 @ 40x", author="ann")
    # validate() trims leading tab/CR, so such cells only come from rows stored before it did: insert one directly
    con = sqlite3.connect(db)
    con.execute("INSERT INTO annotations (latent, name, tags, note, status, author, updated) "
                "VALUES (11, '\t=1+1', '[\"\\r=2\"]', '\r=3', 'unreviewed', '', '2026-01-01')")
    con.commit()
    con.close()

    out = tmp_path / "a.csv"
    res = CliRunner().invoke(cli, ["annotations", "export", str(run), "--format", "csv", "--out", str(out)])
    assert res.exit_code == 0, res.output
    df = pd.read_csv(out, dtype=str, keep_default_na=False).set_index("latent")
    df.index = df.index.astype(int)
    with open(out, newline="", encoding="utf-8") as f:
        rows = {r["latent"]: r for r in csv.DictReader(f)}
    for table in (df.to_dict("index"), {int(k): v for k, v in rows.items()}):
        for j, text in FORMULAS.items():
            for col in ("name", "note", "author", "tags"):
                cell = table[j][col]
                assert cell.startswith("'" + text[0]), (j, col, cell)
                assert cell == "'" + (text if col != "tags" else f"{text};ok"), (j, col, cell)
        ordinary = table[10]
        assert (ordinary["name"], ordinary["tags"], ordinary["note"], ordinary["author"]) == \
            ("blast cell", "granular;a=b", "ratio 2-3 @ 40x", "ann")
        assert ordinary["status"] == "unreviewed" and re.fullmatch(r"\d{4}-\d\d-\d\dT.*", ordinary["updated"])
        legacy = table[11]
        assert (legacy["name"], legacy["tags"], legacy["note"]) == ("'\t=1+1", "'\r=2", "'\r=3")

    # JSON keeps the exact text: it is data for programs, not a sheet
    res = CliRunner().invoke(cli, ["annotations", "export", str(run), "--format", "json", "--out", str(tmp_path / "a.json")])
    assert res.exit_code == 0, res.output
    import json
    got = {a["latent"]: a for a in json.loads((tmp_path / "a.json").read_text())["annotations"]}
    assert got[1]["name"] == FORMULAS[1] and got[3]["tags"] == [FORMULAS[3], "ok"]


# ------------------------------------------------------------------ 10: upload errors
def _truncated_png() -> bytes:
    import io

    import numpy as np
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 300, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()[: len(buf.getvalue()) // 2]


@pytest.mark.parametrize("data", [b"#!/bin/sh\necho not an image\n", os.urandom(4096), b"\x89PNG\r\n\x1a\n" + b"\x00" * 40,
                                  b"GIF89a" + b"\x00" * 30, _truncated_png()], ids=["script", "random", "png-header",
                                                                                     "gif-header", "truncated-png"])
def test_unreadable_upload_is_415_without_python_reprs(fx, tmp_path, data):
    run = copy_of(fx, tmp_path).path
    with TestClient(create_app(run), base_url=LOCAL) as c:
        r = c.post("/api/uploads", files={"file": ("cell.png", data, "image/png")})
    assert r.status_code == 415, r.text
    detail = _one_line(r.json()["detail"])
    assert not re.search(r"<[^>]*object at 0x|0x[0-9a-f]{6,}|BytesIO", detail), detail
    assert "PNG" in detail and "JPEG" in detail and "TIFF" in detail and "BMP" in detail and "WebP" in detail, detail


# ------------------------------------------------------------------ 8, in a browser: the banner and the Save button
@pytest.mark.browser
def test_page_shows_the_read_only_banner(damaged):
    from test_explorer_browser import CHROMIUM, LAUNCH, _serve
    if not CHROMIUM.exists():
        pytest.skip("needs /usr/bin/chromium (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    run, db, before = damaged
    with _serve(run) as url, sync_playwright() as p:
        browser = p.chromium.launch(**LAUNCH)
        try:
            page = browser.new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url + "#/latent/1")
            page.wait_for_selector("#annotations-banner")
            banner = page.inner_text("#annotations-banner")
            assert "read-only" in banner and "annotations.sqlite" in banner, banner
            page.wait_for_selector("#annotation-form")
            assert page.is_disabled("#a-save")
            assert "read-only" in page.inner_text("#a-msg")
            assert not errors, errors
        finally:
            browser.close()
    assert db.read_bytes() == before
