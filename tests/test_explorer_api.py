"""Explorer JSON API: shapes and values against the fixture run, 4xx on bad input, path safety, uploads."""
import io
import os

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from cytosae.explorer import create_app
from explorer_fixtures import GRID, LOCAL, copy_of, session_run

IMG0 = "neutrophil/cell_00.png"


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return copy_of(session_run(tmp_path_factory), tmp_path_factory.mktemp("explorer"))


@pytest.fixture(scope="module")
def client(fx):
    with TestClient(create_app(fx.path), base_url=LOCAL) as c:
        yield c


def test_openapi_lists_the_routes(client):
    r = client.get("/openapi.json")
    assert r.status_code == 200
    paths = set(r.json()["paths"])
    for p in ["/api/run", "/api/latents", "/api/latents/{latent}", "/api/latents/{latent}/heatmaps", "/api/search",
              "/api/images", "/api/image", "/api/image/patch", "/api/image/heatmap", "/api/image/file", "/api/uploads",
              "/api/uploads/{upload_id}/patch", "/api/uploads/{upload_id}/heatmap", "/api/patients/barcodes",
              "/api/patients/compare", "/api/classify", "/api/annotations", "/api/annotations/{latent}"]:
        assert p in paths, p


def test_no_cdn_docs_and_security_headers(client):
    assert client.get("/docs").status_code == 404  # Swagger UI would pull JS from a CDN
    r = client.get("/")
    assert r.status_code == 200 and "static/app.js" in r.text
    assert "default-src 'self'" in r.headers["content-security-policy"]
    assert r.headers["x-content-type-options"] == "nosniff"
    for asset in ("app.js", "style.css"):
        text = client.get(f"/static/{asset}").text
        assert "http://" not in text and "https://" not in text


def test_run_info(client, fx):
    r = client.get("/api/run").json()
    assert r["n_latents"] == fx.n_latents
    assert [d["name"] for d in r["datasets"]] == ["acevedo", "mll"]
    assert r["datasets"][0]["n_images"] == 12 and r["datasets"][1]["n_images"] == 6
    assert r["datasets"][0]["labels"] == ["lymphocyte", "monocyte", "neutrophil"]
    assert r["has"] == {"stats": True, "top_images": True, "patients": True, "compare": True, "classify": True}


def test_overview_columns_and_filters(client, fx):
    r = client.get("/api/latents", params={"dataset": "acevedo"}).json()
    cols = r["columns"]
    assert r["n"] == fx.n_latents and cols["latent"] == list(range(fx.n_latents))
    lat = pd.read_parquet(fx.path / "stats/latents.parquet")
    lat = lat[lat.dataset == "acevedo"].sort_values("latent")
    assert np.allclose(cols["freq_image"], lat["freq_image"])
    assert cols["top_label"][1] == "lymphocyte"
    only = client.get("/api/latents", params={"dataset": "acevedo", "cls": "monocyte", "entropy_max": 0.01}).json()
    expected = lat[(lat.top_label == "monocyte") & (lat.label_entropy <= 0.01)]["latent"].tolist()
    assert only["columns"]["latent"] == expected and 2 in expected
    freq = client.get("/api/latents", params={"dataset": "mll", "freq_min": 0.3}).json()
    lat_m = pd.read_parquet(fx.path / "stats/latents.parquet").query("dataset == 'mll' and freq_image >= 0.3")
    assert freq["columns"]["latent"] == sorted(lat_m["latent"].tolist())


def test_latent_page_values(client, fx):
    r = client.get("/api/latents/1").json()
    assert r["latent"] == 1 and [s["dataset"] for s in r["stats"]] == ["acevedo", "mll"]
    top = r["top_images"]["acevedo"]["image"]
    assert top[0]["label"] == "lymphocyte"  # latent 1 is the lymphocyte latent in the fixture
    # image-level activation as stats.py defines it: mean over the patch tokens
    img_acts = {i: a[1:, 1].mean() for i, a in fx.acts["acevedo"].items()}
    best = max(img_acts, key=img_acts.get)
    assert top[0]["image_id"] == best and top[0]["value"] == pytest.approx(img_acts[best], rel=1e-5)
    assert {c["class"] for c in r["class_profile"]["acevedo"]} == {"neutrophil", "lymphocyte", "monocyte"}
    assert sum(r["histogram"]["acevedo"]["counts"]) == sum(v > 0 for v in img_acts.values())
    assert r["patients"] and all(p["patient_id"].startswith("acevedo_p") for p in r["patients"])
    assert r["compare"][0]["group_a"] == "AML"


def test_neighbours_are_decoder_cosines(client, fx):
    r = client.get("/api/latents/0", params={"n_neighbours": 3}).json()
    got = [n["latent"] for n in r["neighbours"]]
    w = fx.w_dec / np.linalg.norm(fx.w_dec, axis=1, keepdims=True)
    sims = w @ w[0]
    sims[0] = -np.inf
    assert got == list(np.argsort(-sims)[:3]) and got[:2] == [3, 4]
    assert r["neighbours"][0]["cosine"] == pytest.approx(sims[3], abs=1e-5)


def test_heatmaps_match_independent_encoder(client, fx):
    r = client.get("/api/latents/0/heatmaps", params={"dataset": "acevedo", "by": "patch", "k": 3}).json()
    assert len(r["items"]) == 3
    for it in r["items"]:
        exp = fx.acts["acevedo"][it["image_id"]][1:, 0]
        assert len(it["values"]) == GRID * GRID
        assert np.allclose(it["values"], exp, atol=1e-4)
        assert int(np.argmax(it["values"])) == it["patch"]


def test_image_top_latents_patch_and_heatmap(client, fx):
    acts = fx.acts["acevedo"]["neutrophil/cell_09.png"]
    r = client.get("/api/image", params={"dataset": "acevedo", "image_id": "neutrophil/cell_09.png", "k": 5}).json()
    assert r["grid"] == GRID and r["top_cls"][0]["latent"] == int(np.argmax(acts[0]))
    assert r["top_cls"][0]["value"] == pytest.approx(float(acts[0].max()), rel=1e-5)
    assert "path" not in r["meta"] and r["meta"]["label"] == "neutrophil"
    p = int(np.argmax(acts[1:, 0]))
    rp = client.get("/api/image/patch", params={"dataset": "acevedo", "image_id": "neutrophil/cell_09.png", "patch": p}).json()
    assert rp["top"][0]["latent"] == int(np.argmax(acts[1 + p])) and (rp["row"], rp["col"]) == (p // GRID, p % GRID)
    hm = client.get("/api/image/heatmap", params={"dataset": "acevedo", "image_id": "neutrophil/cell_09.png", "latent": 0}).json()
    assert np.allclose(hm["values"], acts[1:, 0], atol=1e-4)


def test_image_file_is_model_view_png(client):
    r = client.get("/api/image/file", params={"dataset": "acevedo", "image_id": IMG0})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(r.content)).size == (224, 224)


@pytest.mark.parametrize("url,params,status", [
    ("/api/latents/999", {}, 404),
    ("/api/latents/-1", {}, 422),
    ("/api/latents/99999999999999999999999", {}, 422),
    ("/api/latents/abc", {}, 422),
    ("/api/latents/0", {"k": 0}, 422),
    ("/api/latents", {"dataset": "nope"}, 404),
    ("/api/latents", {"dataset": "../stats"}, 404),
    ("/api/latents", {"freq_min": 2}, 422),
    ("/api/latents/0/heatmaps", {"dataset": "acevedo", "by": "pixel"}, 422),
    ("/api/image", {"dataset": "acevedo", "image_id": "nope.png"}, 404),
    ("/api/image", {"dataset": "acevedo", "image_id": "../../../etc/passwd"}, 404),
    ("/api/image/file", {"dataset": "acevedo", "image_id": "/etc/passwd"}, 404),
    ("/api/image/file", {"dataset": "..", "image_id": IMG0}, 404),
    ("/api/image/patch", {"dataset": "acevedo", "image_id": IMG0, "patch": 256}, 400),
    ("/api/image/patch", {"dataset": "acevedo", "image_id": IMG0, "patch": -1}, 400),
    ("/api/image/patch", {"dataset": "acevedo", "image_id": IMG0, "patch": "x"}, 422),
    ("/api/image/heatmap", {"dataset": "acevedo", "image_id": IMG0, "latent": 48}, 404),
    ("/api/uploads/0123456789abcdef/patch", {"patch": 0}, 404),
    ("/api/uploads/..%2f..%2fetc/file", {}, 404),
    ("/api/patients/barcodes", {"latents": "1,x"}, 422),
    ("/api/patients/barcodes", {"latents": "1,4000"}, 404),
    ("/api/patients/compare", {"group_a": "AML", "group_b": "nope"}, 404),
    ("/api/annotations/5", {}, 404),
    ("/static/../run.json", {}, 404),
])
def test_bad_requests_are_4xx_with_message(client, url, params, status):
    r = client.get(url, params=params)
    assert r.status_code == status, (url, r.status_code, r.text)
    assert r.json()["detail"]


def _run_with_rows(fx, tmp_path, rows: dict[str, tuple[str, str]]):
    """A copy of the fixture run whose images.parquet renames image ids and points them at the given paths."""
    import shutil
    run = tmp_path / "run"
    shutil.copytree(fx.path, run, symlinks=True)
    p = run / "stores" / "acevedo" / "images.parquet"
    df = pd.read_parquet(p)
    for image_id, (new_id, path) in rows.items():
        df.loc[df.image_id == image_id, ["image_id", "path"]] = [new_id, path]
    df.to_parquet(p, index=False)
    return run


def test_paths_outside_run_and_data_are_refused(fx, tmp_path):
    """Images are found as ROOT/image_id, else by their recorded path; neither may lead out of the run and data."""
    outside = tmp_path / "secret"
    outside.mkdir()
    Image.new("RGB", (32, 32), "red").save(outside / "s.png")
    link = fx.data["acevedo"] / "neutrophil" / "link.png"
    if not link.exists():
        os.symlink(outside / "s.png", link)
    rows = {  # (new image id, recorded path) for existing rows; the new ids are not files under the data root
        "neutrophil/cell_00.png": ("neutrophil/gone_00.png", str(outside / "s.png")),          # absolute path outside
        "neutrophil/cell_03.png": ("neutrophil/gone_03.png",
                                   str(fx.data["acevedo"] / ".." / ".." / "secret" / "s.png")),  # ../ traversal
        "neutrophil/cell_06.png": ("neutrophil/link.png", str(link)),                           # symlink out of the data
        "lymphocyte/cell_01.png": ("lymphocyte/gone_01.png", "../../../../../../etc/passwd"),   # relative traversal
        "lymphocyte/cell_04.png": (os.path.relpath(outside / "s.png", fx.data["acevedo"]), "x.png"),  # traversal in the id
    }
    run = _run_with_rows(fx, tmp_path, rows)
    with TestClient(create_app(run), base_url=LOCAL) as c:
        for image_id, _ in rows.values():
            r = c.get("/api/image/file", params={"dataset": "acevedo", "image_id": image_id})
            assert r.status_code in (403, 404), (image_id, r.status_code)
            if r.status_code == 403:
                assert "outside the run and data folders" in r.json()["detail"]
            if image_id in ("neutrophil/gone_00.png", "neutrophil/link.png") or image_id.startswith(".."):
                assert r.status_code == 403, image_id  # these files exist: refused, not merely missing
        assert c.get("/api/image/file", params={"dataset": "acevedo", "image_id": "neutrophil/cell_09.png"}).status_code == 200
    link.unlink()


def _png(size=(64, 48), color=(200, 100, 120)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def test_upload_validation(fx):
    with TestClient(create_app(fx.path, max_upload_bytes=20_000), base_url=LOCAL) as c:
        big = np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(big).save(buf, format="PNG")
        assert len(buf.getvalue()) > 20_000
        r = c.post("/api/uploads", files={"file": ("cell.png", buf.getvalue(), "image/png")})
        assert r.status_code == 413 and "limit" in r.json()["detail"]
        r = c.post("/api/uploads", files={"file": ("cell.png", b"#!/bin/sh\necho not an image\n", "image/png")})
        assert r.status_code == 415 and "not a readable image" in r.json()["detail"]
        r = c.post("/api/uploads", files={"file": ("cell.png", b"", "image/png")})
        assert r.status_code in (400, 415) and "empty" in r.json()["detail"]
        r = c.post("/api/uploads", files={"file": ("tiny.png", _png((4, 4)), "image/png")})
        assert r.status_code == 400 and "too small" in r.json()["detail"]
        # a valid image named .txt is accepted as far as validation goes (type by decoding): the run's store was
        # imported, so there is no backbone to encode it with -> a clear 503
        r = c.post("/api/uploads", files={"file": ("cell.txt", _png(), "text/plain")})
        assert r.status_code == 503 and "imported" in r.json()["detail"]
        assert c.post("/api/uploads").status_code == 422


def test_decompression_bomb_is_refused():
    from cytosae.explorer.imaging import InvalidImage, decode_upload
    buf = io.BytesIO()
    Image.new("1", (6000, 6000)).save(buf, format="PNG")  # tiny file, 36 Mpixel canvas
    with pytest.raises(InvalidImage, match="pixels"):
        decode_upload(buf.getvalue())


def test_upload_encodes_like_the_store(tmp_path, tmp_path_factory):
    """(b) uploads: the run's backbone + SAE; an uploaded copy of a stored image gets the stored image's latents."""
    cytosae = pytest.importorskip("cytosae")
    if not hasattr(cytosae, "load_backbone"):
        pytest.skip("cytosae.load_backbone is not available yet (src/cytosae/backbones)")
    import json

    import torch
    from safetensors.torch import save_file as save_pt

    from cytosae.data import load_manifest
    from cytosae.store import ExtractConfig, extract

    fx = copy_of(session_run(tmp_path_factory), tmp_path)
    torch.manual_seed(0)
    bb = cytosae.load_backbone("dinobloom-s", depth=2)
    weights = tmp_path / "tiny.safetensors"
    save_pt({k: v.contiguous() for k, v in bb.model.state_dict().items()}, weights)
    bb = cytosae.load_backbone("dinobloom-s", weights=weights, depth=2)
    run = fx.path
    import shutil
    shutil.rmtree(run / "stores" / "acevedo")
    extract(load_manifest(fx.data["acevedo"]), bb, run / "stores" / "acevedo",
            ExtractConfig(dtype="float32", batch_size=4, progress=False, layer=-1))
    # an SAE with the backbone's width, so the store's tokens can be encoded
    from cytosae.sae import SAE, SAEConfig
    shutil.rmtree(run / "sae")
    SAE(SAEConfig(arch="relu-l1", d_in=bb.embed_dim, n_latents=40)).save(run / "sae")
    meta = json.loads((run / "run.json").read_text())
    meta["backbone"] = {"name": "dinobloom-s", "weights": str(weights), "layer": -1, "options": {"depth": 2}}
    (run / "run.json").write_text(json.dumps(meta))
    with TestClient(create_app(run), base_url=LOCAL) as c:
        image_id = "neutrophil/cell_03.png"
        stored = c.get("/api/image", params={"dataset": "acevedo", "image_id": image_id, "k": 5}).json()
        up = c.post("/api/uploads", files={"file": ("x.bin", (fx.data["acevedo"] / image_id).read_bytes(), "application/octet-stream")})
        assert up.status_code == 201, up.text
        got = up.json()
        top = got["top_cls"][: len(stored["top_cls"])]  # the upload lists more latents than the k=5 asked of the store
        assert len(stored["top_cls"]) == 5
        assert [t["latent"] for t in top] == [t["latent"] for t in stored["top_cls"]]
        assert np.allclose([t["value"] for t in top], [t["value"] for t in stored["top_cls"]], atol=1e-3)
        uid = got["upload_id"]
        j = got["top_patch_max"][0]["latent"]
        hm = c.get(f"/api/uploads/{uid}/heatmap", params={"latent": j}).json()
        hs = c.get("/api/image/heatmap", params={"dataset": "acevedo", "image_id": image_id, "latent": j}).json()
        assert np.allclose(hm["values"], hs["values"], atol=1e-3)
        assert c.get(f"/api/uploads/{uid}/patch", params={"patch": 300}).status_code == 400
        assert c.get(f"/api/uploads/{uid}/file").headers["content-type"] == "image/png"


def test_missing_analyses_and_broken_store_are_4xx_or_503(fx, tmp_path):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(fx.path, run)
    shutil.rmtree(run / "patients")
    (run / "classify" / "results.json").unlink()
    (run / "stores" / "mll" / "shard_00000.safetensors").unlink()
    with TestClient(create_app(run), base_url=LOCAL) as c:
        for url in ["/api/patients/barcodes", "/api/patients/compare", "/api/classify"]:
            r = c.get(url)
            assert r.status_code == 404 and "cytosae" in r.json()["detail"], url
        page = c.get("/api/latents/1").json()
        assert page["patients"] == [] and page["compare"] == [] and page["top_images"]["acevedo"]
        r = c.get("/api/image", params={"dataset": "mll", "image_id": IMG0})
        assert r.status_code == 503 and "missing" in r.json()["detail"]
        r = c.get("/api/latents/0/heatmaps", params={"dataset": "mll"})
        assert r.status_code == 503
        assert c.get("/api/run").json()["has"]["patients"] is False


def test_compare_pairs(client, fx):
    r = client.get("/api/patients/compare").json()
    assert r["pairs"] == [["AML", "control"]] and (r["group_a"], r["group_b"]) == ("AML", "control")
    cmp = pd.read_parquet(fx.path / "patients" / "compare.parquet")  # as write_patients wrote it
    assert r["n"] == 48 and np.allclose(r["columns"]["q"], cmp["q"]) and r["columns"]["latent"] == cmp["latent"].tolist()
    assert client.get("/api/patients/compare", params={"group_a": "AML", "group_b": "rest"}).status_code == 404


def test_oversized_bodies_are_refused_before_parsing(fx):
    with TestClient(create_app(fx.path, max_upload_bytes=100_000), base_url=LOCAL) as c:
        blob = b"x" * 300_000
        r = c.post("/api/uploads", files={"file": ("a.png", blob, "image/png")})
        assert r.status_code == 413 and "limit" in r.json()["detail"]

        def chunks():  # no Content-Length: the middleware counts bytes as they arrive
            for _ in range(40):
                yield b"y" * 10_000
        r = c.post("/api/uploads", content=chunks(), headers={"content-type": "multipart/form-data; boundary=zz"})
        assert r.status_code == 413
        big_json = {"name": "n", "note": "z" * 300_000}
        assert c.put("/api/annotations/1", json=big_json).status_code == 413


def test_store_without_patch_tokens(fx, tmp_path):
    """Imported (N, D) embeddings: image-level latents work, patch requests say why they cannot."""
    import shutil
    from cytosae.store import import_embeddings
    run = tmp_path / "run"
    shutil.copytree(fx.path, run)
    shutil.rmtree(run / "stores" / "mll")
    man = pd.read_parquet(fx.path / "stores" / "mll" / "images.parquet")
    cls = np.stack([np.load(fx.data["mll"].parent.parent / "mll.npy")[i, 0] for i in range(len(man))])
    np.save(tmp_path / "cls.npy", cls)
    import_embeddings(tmp_path / "cls.npy", man, run / "stores" / "mll", dtype="float32")
    with TestClient(create_app(run), base_url=LOCAL) as c:
        r = c.get("/api/image", params={"dataset": "mll", "image_id": IMG0})
        assert r.status_code == 200 and r.json()["grid"] == 0 and r.json()["top_patch_max"] == []
        exp = fx.acts["mll"][IMG0][0]
        assert r.json()["top_cls"][0]["latent"] == int(np.argmax(exp))
        r = c.get("/api/image/patch", params={"dataset": "mll", "image_id": IMG0, "patch": 0})
        assert r.status_code == 400 and "no patch tokens" in r.json()["detail"]
        hm = c.get("/api/latents/0/heatmaps", params={"dataset": "mll"}).json()
        assert hm["items"] and hm["items"][0]["values"] == [] and hm["items"][0]["grid"] == 0


def test_barcodes_values(client, fx):
    bc = pd.read_parquet(fx.path / "patients" / "barcodes.parquet")
    r = client.get("/api/patients/barcodes", params={"latents": "1,0"}).json()
    assert r["latents"] == [1, 0]
    assert [p["patient_id"] for p in r["patients"]] == ["acevedo_p0", "acevedo_p2", "acevedo_p1", "acevedo_p3"]  # by diagnosis
    for i, p in enumerate(r["patients"]):
        for j, lat in enumerate(r["latents"]):
            exp = bc[(bc.patient_id == p["patient_id"]) & (bc.latent == lat)]["frac"].item()
            assert r["frac"][i][j] == pytest.approx(exp, abs=1e-5)
    top = client.get("/api/patients/barcodes", params={"top": 3}).json()
    var = bc.groupby("latent")["frac"].var().fillna(0)
    assert len(top["latents"]) == 3 and var[top["latents"][0]] == pytest.approx(var.max())


def test_image_list_filters(client):
    r = client.get("/api/images", params={"dataset": "acevedo", "label": "monocyte"}).json()
    assert r["total"] == 4 and all(i["label"] == "monocyte" for i in r["images"])
    r = client.get("/api/images", params={"dataset": "acevedo", "q": "CELL_1", "limit": 2, "offset": 1}).json()
    assert r["total"] == 2 and [i["image_id"] for i in r["images"]] == ["monocyte/cell_11.png"]
