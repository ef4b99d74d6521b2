"""The explorer on a run made end to end by the package (no designed values): every page's API answers, and
the fields app.js reads are the ones the writers write."""
import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from cytosae.explorer import create_app
from explorer_fixtures import LOCAL, make_pipeline_run

APP_JS = Path(__file__).resolve().parents[1] / "src" / "cytosae" / "explorer" / "static" / "app.js"


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    run = make_pipeline_run(tmp_path_factory.mktemp("pipeline"))
    with TestClient(create_app(run), base_url=LOCAL) as c:
        yield c


def test_pages_answer_on_a_real_run(client):
    info = client.get("/api/run").json()
    assert info["datasets"][0]["name"] == "sample" and info["n_latents"] > 0
    summary = next(d for d in info["stats_summary"]["datasets"] if d["dataset"] == "sample")
    assert summary["n_images"] == info["datasets"][0]["n_images"] == 16  # what the overview caption shows
    assert info["patients_summary"]["token_policy"] == "any_patch"  # what the patients captions show
    assert info["preprocessing"]["resize"] == "squash" and info["backbone"]["name"] == "dinobloom-s"
    ov = client.get("/api/latents", params={"dataset": "sample"}).json()
    assert ov["n"] == info["n_latents"]
    j = int(max(range(ov["n"]), key=lambda i: ov["columns"]["freq_image"][i] or 0))
    page = client.get(f"/api/latents/{j}").json()
    assert page["stats"][0]["freq_image"] == pytest.approx(ov["columns"]["freq_image"][j])
    top = page["top_images"]["sample"]["image"]
    assert top and page["histogram"]["sample"]["counts"] and page["neighbours"]
    hm = client.get(f"/api/latents/{j}/heatmaps", params={"dataset": "sample", "k": 2}).json()
    assert hm["items"][0]["grid"] == 16 and len(hm["items"][0]["values"]) == 256
    img = client.get("/api/image", params={"dataset": "sample", "image_id": top[0]["image_id"]})
    assert img.status_code == 200 and img.json()["top_patch_max"]
    f = client.get("/api/image/file", params={"dataset": "sample", "image_id": top[0]["image_id"]})
    assert f.status_code == 200 and f.headers["content-type"] == "image/png"
    assert client.get("/api/patients/barcodes").status_code == 200
    assert client.get("/api/patients/compare").status_code == 200


def test_app_js_reads_only_summary_fields_the_writers_write():
    js = APP_JS.read_text()
    # the fields of stats/patients summaries the page uses (a hand-made fixture once had others)
    assert not re.search(r"stats_summary \|\| \{\}\)\.n_images", js)
    assert "patients_summary || {}).dataset" not in js
    assert "bits" not in js  # label entropy is in nats (analysis/stats.py)


def test_uploads_rebuild_the_seeded_random_backbone_and_match_the_store(client):
    """Random weights are a pure function of the recorded seed, so an upload of a store's own cell is encoded as the
    store encoded it (fp16 store vs fp32 upload: close, not equal) and the page says which weights did it."""
    ex = client.app.state.explorer
    image_id = client.get("/api/images", params={"dataset": "sample", "limit": 1}).json()["images"][0]["image_id"]
    stored = client.get("/api/image", params={"dataset": "sample", "image_id": image_id, "k": 5}).json()
    original = ex.run.path / "data" / "sample" / image_id  # make_sample's folder, the manifest's root
    r = client.post("/api/uploads", files={"file": ("cell.png", Path(original).read_bytes(), "image/png")},
                    params={"k": 5})
    assert r.status_code == 201, r.text
    up = r.json()
    assert "RANDOM weights rebuilt from the run's seed 0" in up["encoded_with"] and "dinobloom-s" in up["encoded_with"]
    assert [t["latent"] for t in up["top_cls"]] == [t["latent"] for t in stored["top_cls"]]
    assert [t["value"] for t in up["top_cls"]] == pytest.approx([t["value"] for t in stored["top_cls"]], rel=0.02)
    assert "encoded_with" in APP_JS.read_text()  # the page shows it
