"""cytosae.open_run: a run in a notebook, read through the explorer's readers, on a run made end to end by the package.

Every value is checked against the explorer's API on the same run (or the run's files), so the notebook and the
explorer cannot drift apart; HTML is checked for escaping with an annotation that is itself markup."""
import base64
import io
import re
import shutil

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient
from PIL import Image

import cytosae
from cytosae.explorer import create_app
from cytosae.notebook import DamagedData, ImageView, LatentView, MissingData, PatientView, RunView
from explorer_fixtures import LOCAL, make_pipeline_run

DATA_PNG = re.compile(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"')
EVIL = "<script>alert('x')</script> & <b>blast</b>"


@pytest.fixture(scope="module")
def run_path(tmp_path_factory):
    return make_pipeline_run(tmp_path_factory.mktemp("notebook"))


@pytest.fixture(scope="module")
def client(run_path):
    with TestClient(create_app(run_path), base_url=LOCAL) as c:
        yield c


@pytest.fixture(scope="module")
def run(run_path, client):  # after the explorer, which creates annotations.sqlite
    return cytosae.open_run(run_path)


def _firing_latent(run) -> int:
    s = run.stats
    s = s[s["dataset"] == "sample"]
    return int(s.sort_values(["freq_image", "latent"], ascending=[False, True])["latent"].iloc[0])


def _thumbnails(html_text: str) -> list[Image.Image]:
    out = []
    for b64 in DATA_PNG.findall(html_text):
        img = Image.open(io.BytesIO(base64.b64decode(b64)))
        img.load()
        assert img.format == "PNG"
        out.append(img)
    return out


def test_open_run_reports_what_the_explorer_reports(run, client):
    info = client.get("/api/run").json()
    assert isinstance(run, RunView) and cytosae.RunView is RunView
    assert run.datasets == [d["name"] for d in info["datasets"]] == ["sample"]
    assert run.n_latents == info["n_latents"] > 0
    assert len(run.images("sample")) == info["datasets"][0]["n_images"] == 16
    assert run.sae.cfg.n_latents == run.n_latents == run.sae_config["n_latents"]
    text = repr(run)
    assert "\n" not in text and "sample" in text and str(run.n_latents) in text
    assert "<script" not in run._repr_html_()


def test_stats_equal_the_explorers_overview_table(run, client, run_path):
    stats = run.stats
    ov = client.get("/api/latents", params={"dataset": "sample"}).json()
    mine = stats[stats["dataset"] == "sample"].reset_index(drop=True)
    assert ov["n"] == len(mine) == run.n_latents
    for col in ("latent", "freq_image", "freq_token", "mean_act", "max_act", "label_entropy"):
        theirs = np.array([np.nan if v is None else v for v in ov["columns"][col]], dtype=float)
        np.testing.assert_array_equal(mine[col].to_numpy(dtype=float), theirs, err_msg=col)
    assert [None if pd.isna(v) else v for v in mine["top_label"]] == ov["columns"]["top_label"]
    on_disk = pd.read_parquet(run_path / "stats" / "latents.parquet").sort_values(["dataset", "latent"])
    pd.testing.assert_frame_equal(stats, on_disk.reset_index(drop=True))
    stats.loc[:, "freq_image"] = -1.0  # a notebook's edits stay in its copy
    assert (run.stats["freq_image"] >= 0).all()
    tops = run.top_images
    assert set(tops.columns) >= {"dataset", "latent", "by", "rank", "image_id", "value"}
    assert set(run.barcodes.columns) >= {"patient_id", "diagnosis", "latent", "frac"}
    cls = run.classify
    res = client.get("/api/classify").json()
    assert list(cls["name"]) == list(res["models"])
    row = cls.iloc[0]
    assert row["macro_f1"] == pytest.approx(res["models"][row["name"]]["macro_f1"])
    assert row["macro_f1_ci_lo"] == pytest.approx(res["models"][row["name"]]["macro_f1_ci"][0])


def test_latent_card_has_thumbnails_with_the_explorers_heatmaps(run, client):
    j = _firing_latent(run)
    lat = run.latent(j)
    assert isinstance(lat, LatentView)
    page = client.get(f"/api/latents/{j}", params={"k": lat.k}).json()
    expected = [r["image_id"] for r in page["top_images"]["sample"]["image"]]
    assert list(lat.top_images["image_id"]) == expected and expected
    assert lat.stats["freq_image"].iloc[0] == pytest.approx(page["stats"][0]["freq_image"])
    html_text = lat._repr_html_()
    assert f"<b>latent {j}</b>" in html_text and "<script" not in html_text
    thumbs = _thumbnails(html_text)
    assert len(thumbs) == len(expected)
    assert all(max(t.size) <= 128 and t.mode == "RGB" for t in thumbs)
    # the overlay is the explorer's per-patch map, drawn onto the image: the thumbnail differs from the bare image
    hm = client.get(f"/api/latents/{j}/heatmaps", params={"dataset": "sample", "k": len(expected)}).json()["items"][0]
    amap = lat.heatmap(hm["image_id"])
    np.testing.assert_allclose(amap.ravel(), hm["values"], rtol=1e-6)
    assert amap.shape == (hm["grid"], hm["grid"]) and amap.max() > 0
    bare = run.picture("sample", hm["image_id"])
    bare.thumbnail((128, 128))
    assert np.abs(np.asarray(thumbs[0], float) - np.asarray(bare, float)).max() > 10
    text = repr(lat)
    assert "\n" not in text and f"latent {j} of {run.n_latents}" in text


def test_annotation_written_by_the_explorer_shows_escaped(run, client):
    j = _firing_latent(run)
    assert run.annotation(j) is None or run.annotation(j)["name"] != EVIL
    r = client.put(f"/api/annotations/{j}", json={"name": EVIL, "tags": ["a&b", "<i>"], "note": "</div>note",
                                                  "status": "validated", "author": "tester"})
    assert r.status_code == 200, r.text
    ann = run.annotations
    row = ann[ann["latent"] == j].iloc[0]
    assert row["name"] == EVIL and row["status"] == "validated" and list(row["tags"]) == ["a&b", "<i>"]
    html_text = run.latent(j)._repr_html_()
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; &lt;b&gt;blast&lt;/b&gt;" in html_text
    assert "validated" in html_text and "a&amp;b" in html_text and "&lt;/div&gt;note" in html_text
    assert "<script" not in html_text and "<b>blast" not in html_text and "<i>" not in html_text
    assert EVIL in repr(run.latent(j)) and "\n" not in repr(run.latent(j))
    # the same name where the image and patient views list the latent
    image_id = run.latent(j).top_images["image_id"].iloc[0]
    img = run.image("sample", image_id)
    if j in set(img.top_latents["latent"]):
        assert EVIL in set(img.top_latents["name"])
    for html_view in (img._repr_html_(), run.patient(run.barcodes["patient_id"].iloc[0])._repr_html_()):
        assert "<script" not in html_view


def test_image_view_matches_the_explorers_image_page(run, client):
    image_id = client.get("/api/images", params={"dataset": "sample", "limit": 1}).json()["images"][0]["image_id"]
    view = run.image("sample", image_id, k=5)
    assert isinstance(view, ImageView)
    page = client.get("/api/image", params={"dataset": "sample", "image_id": image_id, "k": 5}).json()
    top = view.top_latents
    assert list(top["latent"]) == [t["latent"] for t in page["top_patch_max"]] and len(top) == 5
    np.testing.assert_allclose(top["value"], [t["value"] for t in page["top_patch_max"]], rtol=1e-6)
    png = Image.open(io.BytesIO(view._repr_png_()))
    served = Image.open(io.BytesIO(client.get("/api/image/file", params={"dataset": "sample",
                                                                         "image_id": image_id}).content))
    assert png.size == served.size == (224, 224)
    np.testing.assert_array_equal(np.asarray(png.convert("RGB")), np.asarray(served.convert("RGB")))
    html_text = view._repr_html_()
    assert len(_thumbnails(html_text)) == 1 + min(3, len(top)) and "<script" not in html_text
    assert f"<b>{image_id}</b>" in html_text
    assert "\n" not in repr(view) and image_id in repr(view)
    with pytest.raises(KeyError, match="not in dataset 'sample'"):
        run.image("sample", "no/such.png")


def test_patient_view_shows_barcode_and_diagnosis(run, run_path):
    bc = pd.read_parquet(run_path / "patients" / "barcodes.parquet")
    pid = str(bc["patient_id"].iloc[0])
    view = run.patient(pid, k=5)
    assert isinstance(view, PatientView)
    mine = bc[bc["patient_id"] == pid]
    assert view.diagnosis == mine["diagnosis"].iloc[0] and view.n_cells == int(mine["n_cells"].iloc[0])
    barcode = view.barcode
    assert len(barcode) == len(mine) and barcode["frac"].is_monotonic_decreasing
    expect = mine.set_index("latent")["frac"]
    np.testing.assert_array_equal(barcode["frac"], expect.loc[barcode["latent"]].to_numpy())
    cohort = bc.groupby("latent")["frac"].mean()
    np.testing.assert_allclose(barcode["cohort_frac"], cohort.loc[barcode["latent"]].to_numpy())
    html_text = view._repr_html_()
    assert f"patient {pid}" in html_text and str(view.diagnosis) in html_text and "<script" not in html_text
    assert html_text.count("<tr>") >= 5
    if (run_path / "classify" / "predictions.parquet").is_file():
        assert set(view.predictions["patient_id"]) == {pid}
    assert "\n" not in repr(view) and pid in repr(view)
    with pytest.raises(KeyError, match="patients/barcodes.parquet"):
        run.patient("nobody")


def test_missing_tables_are_one_line_errors_naming_the_file(run_path, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_path, copy, ignore=shutil.ignore_patterns("annotations.sqlite*"))
    (copy / "stats" / "top_images.parquet").unlink()
    shutil.rmtree(copy / "classify")
    run = cytosae.open_run(copy)
    for get, rel, command in ((lambda: run.top_images, "stats/top_images.parquet", "cytosae stats"),
                              (lambda: run.classify, "classify/results.json", "cytosae classify"),
                              (lambda: run.predictions, "classify/predictions.parquet", "cytosae classify")):
        with pytest.raises(MissingData) as err:
            get()
        assert rel in str(err.value) and command in str(err.value) and "\n" not in str(err.value)
    j = _firing_latent(run)
    with pytest.raises(MissingData, match="stats/top_images.parquet"):
        run.latent(j).top_images
    card = run.latent(j)._repr_html_()  # the card stands without the table, and says which file is missing
    assert "stats/top_images.parquet is missing" in card and "data:image/png" not in card
    with pytest.raises(IndexError, match=f"latents 0..{run.n_latents - 1}"):
        run.latent(run.n_latents)
    assert run.annotations.empty and not (copy / "annotations.sqlite").exists()  # reading creates nothing


def test_a_damaged_table_is_a_one_line_error_naming_it(run_path, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_path, copy, ignore=shutil.ignore_patterns("annotations.sqlite*"))
    (copy / "patients" / "barcodes.parquet").write_bytes(b"PAR1 not really")
    run = cytosae.open_run(copy)
    for get in (lambda: run.barcodes, lambda: run.patient("P000")):
        with pytest.raises(DamagedData) as err:
            get()
        assert "patients/barcodes.parquet" in str(err.value) and "cytosae patients" in str(err.value)
        assert "\n" not in str(err.value)
    assert len(run.stats) == run.n_latents  # the other tables are still read
