"""Issue #12: inputs and damaged files that used to give 500s, DNS rebinding, paths in responses, blocking uploads."""
import asyncio
import io
import json
import re
import sqlite3

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

from cytosae.explorer import create_app
from explorer_fixtures import LOCAL, copy_of, session_run

IMG0 = "neutrophil/cell_00.png"


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return copy_of(session_run(tmp_path_factory), tmp_path_factory.mktemp("hardening"))


@pytest.fixture(scope="module")
def client(fx):
    with TestClient(create_app(fx.path), base_url=LOCAL) as c:
        yield c


# ------------------------------------------------------------------ 1: Unicode digits
@pytest.mark.parametrize("q", ["²", "①", "#²", "٣", "𝟘"])
def test_unicode_digits_in_search_are_text_not_ids(client, q):
    r = client.get("/api/search", params={"q": q})
    assert r.status_code == 200, r.text
    assert [m for m in r.json()["results"] if m["match"] == "id"] == []
    assert client.get("/api/latents", params={"dataset": "acevedo", "q": q}).status_code == 200


def test_ascii_ids_still_found(client):
    assert client.get("/api/search", params={"q": "#7"}).json()["results"][0] == {"latent": 7, "name": "", "match": "id"}


# ------------------------------------------------------------------ 2, 3: unencodable text
def test_lone_surrogate_in_annotation_is_a_clean_4xx(client):
    for body in ('{"author": "a\\ud83d"}', '{"tags": ["\\udfff"]}', '{"name": "\\udc00x"}', '{"note": "ok \\ud800"}'):
        r = client.put("/api/annotations/9", content=body.encode(), headers={"content-type": "application/json"})
        assert r.status_code in (400, 422), (body, r.status_code)
        detail = json.loads(r.content.decode("utf-8"))["detail"]  # the answer itself is valid UTF-8 JSON
        assert detail
    assert client.get("/api/annotations/9").status_code == 404  # nothing stored
    # a real pair of surrogate escapes is one emoji, and is accepted
    r = client.put("/api/annotations/9", content='{"name": "blast \\ud83d\\ude00"}'.encode(),
                   headers={"content-type": "application/json"})
    assert r.status_code == 200 and r.json()["name"] == "blast \U0001F600"
    client.delete("/api/annotations/9")


def test_export_survives_a_row_with_unencodable_text(fx, tmp_path):
    """A row stored before the check (tags are JSON text, so '\\udfff' got in) must not stop the export."""
    run = copy_of(fx, tmp_path).path
    from cytosae.explorer.annotations import AnnotationStore
    AnnotationStore(run / "annotations.sqlite").put(3, name="fine")
    con = sqlite3.connect(run / "annotations.sqlite")
    con.execute("INSERT INTO annotations (latent, name, tags, note, status, author, updated) "
                "VALUES (4, 'bad', '[\"\\udfff\"]', '', 'unreviewed', '', '2026-01-01')")
    con.commit()
    con.close()
    from cytosae.cli import app as cli
    for fmt in ("csv", "json"):
        out = tmp_path / f"a.{fmt}"
        res = CliRunner().invoke(cli, ["annotations", "export", str(run), "--format", fmt, "--out", str(out)])
        assert res.exit_code == 0, res.output
        text = out.read_text(encoding="utf-8")
        assert "fine" in text and "bad" in text and ("\ufffd" in text or "\\ufffd" in text)
    with TestClient(create_app(run), base_url=LOCAL) as c:
        r = c.get("/api/annotations")
        assert r.status_code == 200 and r.json()["annotations"][1]["tags"] == ["\ufffd"]


# ------------------------------------------------------------------ 8: damaged run files
def _damage(run, rel):
    (run / rel).write_bytes(b"this is not a parquet or safetensors file \x00\x01")


@pytest.mark.parametrize("rel,url,params,command", [
    ("stats/top_images.parquet", "/api/latents/0", {}, "cytosae stats"),
    ("stats/top_images.parquet", "/api/latents/0/heatmaps", {"dataset": "acevedo"}, "cytosae stats"),
    ("stats/latents.parquet", "/api/latents", {"dataset": "acevedo"}, "cytosae stats"),
    ("sae/sae.safetensors", "/api/image", {"dataset": "acevedo", "image_id": IMG0}, "cytosae train"),
    ("sae/sae.safetensors", "/api/latents/0/heatmaps", {"dataset": "acevedo"}, "cytosae train"),
    ("sae/config.json", "/api/run", {}, "cytosae train"),
    ("patients/barcodes.parquet", "/api/patients/barcodes", {}, "cytosae patients"),
    ("classify/results.json", "/api/classify", {}, "cytosae classify"),
    ("stores/acevedo/images.parquet", "/api/images", {"dataset": "acevedo"}, "cytosae extract"),
])
def test_damaged_run_files_name_the_file_and_the_command(fx, tmp_path, rel, url, params, command):
    run = copy_of(fx, tmp_path).path
    _damage(run, rel)
    with TestClient(create_app(run), base_url=LOCAL) as c:
        r = c.get(url, params=params)
    assert r.status_code in (404, 409, 422, 503), (url, r.status_code, r.text)
    detail = r.json()["detail"]
    assert rel in detail and command in detail, detail
    assert str(tmp_path) not in r.text


# ------------------------------------------------------------------ 9: Host / Origin, tokens, paths
def test_foreign_host_or_origin_is_refused(client):
    r = client.put("/api/annotations/2", json={"name": "x"}, headers={"host": "attacker.example:8799"})
    assert r.status_code == 403 and "host" in r.json()["detail"].lower()
    r = client.get("/api/run", headers={"host": "attacker.example"})
    assert r.status_code == 403
    r = client.put("/api/annotations/2", json={"name": "x"}, headers={"origin": "http://attacker.example"})
    assert r.status_code == 403 and "origin" in r.json()["detail"].lower()
    for host in ("localhost:8000", "127.0.0.1", "[::1]:8000"):
        assert client.get("/api/run", headers={"host": host}).status_code == 200, host
    r = client.put("/api/annotations/2", json={"name": "x"}, headers={"origin": "http://localhost:8000"})
    assert r.status_code == 200
    client.delete("/api/annotations/2")


def test_non_loopback_host_needs_the_token(fx):
    app = create_app(fx.path, host="0.0.0.0", token="s3cret-token")
    with TestClient(app, base_url="http://0.0.0.0:8000") as c:
        assert c.get("/api/run").status_code == 401
        assert c.get("/api/run", headers={"x-cytosae-token": "wrong"}).status_code == 401
        assert c.get("/api/run", headers={"x-cytosae-token": "s3cret-token"}).status_code == 200
        r = c.get("/", params={"token": "s3cret-token"}, follow_redirects=False)
        assert r.status_code in (200, 303) and "cytosae_token" in r.headers.get("set-cookie", "")
        assert "httponly" in r.headers["set-cookie"].lower() and "samesite=strict" in r.headers["set-cookie"].lower()
        assert c.get("/api/run").status_code == 200  # the cookie now comes with every request, images included


def test_cli_prints_warning_and_token_for_non_loopback_host():
    from cytosae.explorer.api import startup_lines
    lines, token = startup_lines("/some/run", "0.0.0.0", 8799)
    assert token and len(token) >= 20 and any(token in ln and "?token=" in ln for ln in lines)
    assert any("warning" in ln.lower() for ln in lines)
    lines, token = startup_lines("/some/run", "127.0.0.1", 8799)
    assert token is None and not any("warning" in ln.lower() for ln in lines)


ABS = re.compile(r"(?<![\w.])/(?:tmp|root|home|work|usr|etc|var)/")


def test_no_absolute_paths_in_responses(fx, client, tmp_path):
    bodies = [client.get("/api/run").text,
              client.get("/api/image/file", params={"dataset": "acevedo", "image_id": "nope"}).text]
    run = copy_of(fx, tmp_path).path
    meta = json.loads((run / "run.json").read_text())
    meta["backbone"] = {"name": "dinobloom-s", "weights": str(tmp_path / "w" / "dinobloom.safetensors"), "layer": -2}
    (run / "run.json").write_text(json.dumps(meta))
    (run / "classify" / "results.json").unlink()
    import pandas as pd
    p = run / "stores" / "acevedo" / "images.parquet"
    df = pd.read_parquet(p)
    df.loc[0, "path"] = "/etc/passwd"
    df.to_parquet(p, index=False)
    with TestClient(create_app(run), base_url=LOCAL) as c:
        info = c.get("/api/run")
        assert info.json()["backbone"]["weights"] == "dinobloom.safetensors"
        bodies += [info.text, c.get("/api/classify").text,
                   c.get("/api/image/file", params={"dataset": "acevedo", "image_id": IMG0}).text,
                   c.post("/api/uploads", files={"file": ("a.png", _png(), "image/png")}).text]
    for b in bodies:
        assert not ABS.search(b), b


# ------------------------------------------------------------------ 10: uploads off the event loop
def _png(size=(64, 48)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 100, 120)).save(buf, format="PNG")
    return buf.getvalue()


def test_upload_decoding_and_encoding_run_off_the_event_loop(fx, monkeypatch):
    import cytosae.explorer.routes_images as ri
    on_loop = {}

    def spy(name, fn):
        def wrapped(*a, **k):
            try:
                asyncio.get_running_loop()
                on_loop[name] = True
            except RuntimeError:
                on_loop[name] = False
            return fn(*a, **k)
        return wrapped

    for name in ("decode_upload", "model_view", "png_bytes"):
        monkeypatch.setattr(ri, name, spy(name, getattr(ri, name)))
    with TestClient(create_app(fx.path), base_url=LOCAL) as c:
        r = c.post("/api/uploads", files={"file": ("a.png", _png(), "image/png")})
    assert r.status_code == 503  # the fixture's store was imported: no backbone; decoding happened first
    assert on_loop.get("decode_upload") is False, on_loop


def test_a_thin_upload_is_refused_before_decoding_or_resizing(fx, monkeypatch):
    """Issue #20, item 7: the aspect-ratio limit of extraction applies to uploads, from the header (before decoding and
    before the model's view is resized): a 400 that says the size and the limit."""
    import cytosae.explorer.routes_images as ri
    from cytosae.explorer.imaging import InvalidImage, decode_upload

    thin = _png((8, 400_000))
    with pytest.raises(InvalidImage, match=r"8 x 400000 px has an aspect ratio of 50,000:1, above the limit of 20:1"):
        decode_upload(thin)
    assert decode_upload(thin, max_aspect=None).size == (8, 400_000)  # the limit is what refuses it
    resized = []
    monkeypatch.setattr(ri, "model_view", lambda img, pre=None: resized.append(img.size))
    with TestClient(create_app(fx.path), base_url=LOCAL) as c:
        r = c.post("/api/uploads", files={"file": ("strip.png", thin, "image/png")})
    detail = r.json()["detail"]
    assert r.status_code == 400 and resized == [], (r.status_code, detail)
    assert "aspect ratio of 50,000:1, above the limit of 20:1" in detail and "crop it to the cell" in detail


# ------------------------------------------------------------------ 12: OPTIONS and declared responses
def test_options_lists_every_method_of_the_path(client):
    r = client.options("/api/annotations/3")
    assert r.status_code in (200, 204)
    allowed = {m.strip() for m in r.headers["allow"].split(",")}
    assert {"GET", "PUT", "DELETE", "OPTIONS"} <= allowed
    r = client.post("/api/annotations/3", json={})
    assert r.status_code == 405 and {"GET", "PUT", "DELETE"} <= {m.strip() for m in r.headers["allow"].split(",")}
    assert client.options("/api/nothing-here").status_code == 404


def test_every_operation_declares_its_error_answers(client):
    spec = client.get("/openapi.json").json()
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            codes = set(op["responses"])
            assert {"403", "404"} <= codes, (method, path, codes)
            if op.get("parameters") or op.get("requestBody"):
                assert "422" in codes or "400" in codes, (method, path, codes)


def test_cross_site_page_at_an_ip_is_refused(client):
    r = client.put("/api/annotations/2", json={"name": "x"}, headers={"origin": "http://203.0.113.9"})
    assert r.status_code == 403
    # the page itself served at an IP address (Host = Origin) works
    r = client.get("/api/run", headers={"host": "192.0.2.4:8000", "origin": "http://192.0.2.4:8000"})
    assert r.status_code == 200
