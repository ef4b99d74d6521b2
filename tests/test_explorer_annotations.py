"""Annotations: validation, persistence across explorer restarts, search, export (API and CLI)."""
import csv
import json
import shutil

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from cytosae.cli import app as cli
from cytosae.explorer import create_app
from explorer_fixtures import LOCAL, copy_of, session_run


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return copy_of(session_run(tmp_path_factory), tmp_path_factory.mktemp("annot"))


@pytest.fixture
def run(base, tmp_path):
    """A fresh copy of the run per test, so annotations do not leak between tests."""
    dst = tmp_path / "run"
    shutil.copytree(base.path, dst)
    return dst


def test_annotations_persist_across_restarts_and_export(run, tmp_path):
    body = {"name": "granular cytoplasm", "tags": ["granules", " neutrophil ", "granules"], "note": "fires on granules",
            "status": "validated", "author": "hem1"}
    with TestClient(create_app(run), base_url=LOCAL) as c:
        r = c.put("/api/annotations/7", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["tags"] == ["granules", "neutrophil"]  # trimmed, de-duplicated
        assert c.put("/api/annotations/2", json={"name": "monocyte-ish", "status": "rejected"}).status_code == 200
        assert c.put("/api/annotations/7", json={**body, "note": "edited"}).status_code == 200
    # a brand-new app (explorer restarted) reads the same sqlite file
    with TestClient(create_app(run), base_url=LOCAL) as c:
        a = c.get("/api/annotations/7").json()
        assert (a["name"], a["note"], a["status"], a["author"]) == ("granular cytoplasm", "edited", "validated", "hem1")
        assert [x["latent"] for x in c.get("/api/annotations").json()["annotations"]] == [2, 7]
        assert c.get("/api/latents/7").json()["annotation"]["name"] == "granular cytoplasm"
        ov = c.get("/api/latents", params={"dataset": "acevedo"}).json()["columns"]
        assert ov["name"][7] == "granular cytoplasm" and ov["status"][2] == "rejected" and ov["status"][0] == ""
        ann = c.get("/api/latents", params={"dataset": "acevedo", "annotated": True}).json()
        assert ann["columns"]["latent"] == [2, 7]
        assert c.get("/api/latents", params={"dataset": "acevedo", "annotated": False}).json()["n"] == 46
        assert c.get("/api/latents", params={"dataset": "acevedo", "status": "validated"}).json()["columns"]["latent"] == [7]
        s = c.get("/api/search", params={"q": "GRANUL"}).json()["results"]
        assert [x["latent"] for x in s] == [7] and s[0]["match"] == "annotation"
        assert c.get("/api/search", params={"q": "2"}).json()["results"][0] == {"latent": 2, "name": "monocyte-ish", "match": "id"}
        assert c.get("/api/latents", params={"dataset": "acevedo", "q": "granul"}).json()["columns"]["latent"] == [7]

    runner = CliRunner()
    out_csv, out_json = tmp_path / "ann.csv", tmp_path / "ann.json"
    res = runner.invoke(cli, ["annotations", "export", str(run), "--format", "csv", "--out", str(out_csv)])
    assert res.exit_code == 0, res.output
    assert "2 annotations" in res.output
    rows = list(csv.DictReader(out_csv.open()))
    assert [r["latent"] for r in rows] == ["2", "7"] and rows[1]["tags"] == "granules;neutrophil"
    res = runner.invoke(cli, ["annotations", "export", str(run), "--format", "json", "--out", str(out_json)])
    assert res.exit_code == 0, res.output
    data = json.loads(out_json.read_text())
    assert data["annotations"][1]["note"] == "edited" and data["annotations"][0]["status"] == "rejected"
    bad = runner.invoke(cli, ["annotations", "export", str(run), "--format", "xml", "--out", str(tmp_path / "x")])
    assert bad.exit_code != 0 and "csv or json" in bad.output
    assert not (tmp_path / "x").exists()


def test_delete_and_bad_annotations(run):
    with TestClient(create_app(run), base_url=LOCAL) as c:
        assert c.put("/api/annotations/3", json={"name": "x"}).status_code == 200
        assert c.delete("/api/annotations/3").json() == {"deleted": 3}
        assert c.get("/api/annotations/3").status_code == 404
        assert c.delete("/api/annotations/3").status_code == 404
        cases = [
            (48, {"name": "x"}, 404),                     # latent out of range
            (-1, {"name": "x"}, 422),
            (1, {"status": "maybe"}, 422),              # limits are declared in the schema: 422 from validation
            (1, {"name": "n" * 201}, 422),
            (1, {"tags": ["t" * 65]}, 422),
            (1, {"tags": "not-a-list"}, 422),
            (1, {"note": "a\x00b"}, 422),
        ]
        for latent, body, status in cases:
            r = c.put(f"/api/annotations/{latent}", json=body)
            assert r.status_code == status, (latent, body, r.text)
            assert r.json()["detail"]
        r = c.put("/api/annotations/1", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 422
        assert c.get("/api/annotations").json()["annotations"] == []


def test_export_without_annotations_fails_clearly(run, tmp_path):
    res = CliRunner().invoke(cli, ["annotations", "export", str(run), "--out", str(tmp_path / "a.csv")])
    assert res.exit_code == 2 and "no annotations" in res.output
