"""The explorer, the static report and open_run show any SAE of a run's sweep (issue #18 item 4): `--sae NAME` reads
that SAE's own folders (saes/NAME/stats, quality, annotations), every page says which SAE it shows and that it is
one of N, an unknown name is one line listing the sweep's SAEs, and a sweep SAE without stats says so."""
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from cytosae.analysis.stats import LATENTS, TOP_IMAGES, read_stats_table
from cytosae.cli import app as cli
from cytosae.explorer import build_report, create_app
from cytosae.explorer.report import canonical_url, fnv1a
from cytosae.notebook import open_run
from cytosae.run import Run
from cytosae.study import run_study

STUDY = """[run]
dir = "run"

[backbone]
name = "dinobloom-s"
batch_size = 8
seed = 0

[datasets.sample]
data = "data/manifest.csv"

[sae]
arch = "topk"
expansion = 2
batch_size = 512
k = [4, 2, 1]

[align]
fit_tokens = 500
max_clusters = 8

[stats]
galleries = 0
every_sae = false
"""
CHROMIUM = Path("/usr/bin/chromium")
NAMES = ["k4-x2", "k2-x2", "k1-x2"]  # the primary (sae/), one with its own stats, one without


@pytest.fixture(scope="module")
def sweep_run(tmp_path_factory):
    """A 3-SAE sweep made by `cytosae run` on the synthetic sample, stats for its primary SAE only
    (`every_sae = false`); k2-x2's written by `cytosae stats --run RUN --sae k2-x2` into its own folder."""
    from cytosae.data.synthetic import make_sample

    root = tmp_path_factory.mktemp("sweep_explorer")
    make_sample(root / "data", seed=0, n_patients=4, cells_per_patient=3)
    (root / "study.toml").write_text(STUDY)
    status = run_study(str(root / "study.toml"), say=lambda s: None)
    assert set(status.values()) == {"done"} and "stats" in status and "stats:k2-x2" not in status
    r = CliRunner().invoke(cli, ["stats", "--run", str(root / "run"), "--sae", "k2-x2", "--galleries", "0",
                                 "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert f"tables and figures -> {root / 'run' / 'saes' / 'k2-x2' / 'stats'}" in r.output
    assert "stats:k2-x2" in Run.open(root / "run").steps  # recorded apart from the primary's stats step
    return root / "run"


def _client(run_dir, sae=None) -> TestClient:
    return TestClient(create_app(run_dir, static=False, sae_name=sae), base_url="http://127.0.0.1")


def test_a_sweep_sae_shows_its_own_latents_and_says_which_it_is(sweep_run):
    main, other = _client(sweep_run), _client(sweep_run, "k2-x2")
    info = other.get("/api/run").json()
    config = json.loads((sweep_run / "saes" / "k2-x2" / "config.json").read_text())
    shown = info["shown_sae"]
    assert {k: shown[k] for k in ("name", "default", "dir", "arch", "k", "expansion", "layer", "n_latents", "stats")} \
        == {"name": "k2-x2", "default": False, "dir": "saes/k2-x2", "arch": "topk", "k": 2, "expansion": 2,
            "layer": -2, "n_latents": config["n_latents"], "stats": True}
    assert shown["sweep"] == {"n": 3, "names": NAMES, "primary": "k4-x2"} and shown["note"] is None
    assert shown["title"] == (f"SAE k2-x2 (topk, k=2, expansion 2, layer -2, {config['n_latents']} latents), "
                              f"one of 3 in this run's sweep (not the primary k4-x2)")
    assert info["sae"]["k"] == 2 and info["has"]["stats"] and not info["has"]["patients"]

    ov, ov_main = (c.get("/api/latents", params={"dataset": "sample"}).json() for c in (other, main))
    assert ov["sae"]["name"] == "k2-x2" and ov_main["sae"]["name"] == "k4-x2"
    own = read_stats_table(sweep_run / "saes" / "k2-x2" / "stats", LATENTS)
    primary = read_stats_table(sweep_run / "stats", LATENTS)
    assert ov["columns"]["latent"] == own.latent.tolist()
    assert ov["columns"]["freq_image"] == pytest.approx(own.freq_image.tolist())
    # k=2 fires half as many latents per token as k=4: the frequencies are the member's, not the primary's
    assert not np.allclose(own.freq_image, primary.freq_image) and ov_main["columns"]["freq_image"] == pytest.approx(
        primary.freq_image.tolist())

    top = read_stats_table(sweep_run / "saes" / "k2-x2" / "stats", TOP_IMAGES)
    j = int(own.sort_values("freq_image").latent.iloc[-1])
    page = other.get(f"/api/latents/{j}").json()
    mine = top[(top.latent == j) & (top.by == "image")].sort_values("rank")
    assert [it["image_id"] for it in page["top_images"]["sample"]["image"]] == mine.image_id.tolist()
    assert [it["value"] for it in page["top_images"]["sample"]["image"]] == pytest.approx(mine.value.tolist())

    # the quality page and the latent's class AP come from saes/k2-x2/quality, written by its align step
    q, q_main = other.get("/api/quality").json(), main.get("/api/quality").json()
    own_align = pd.read_parquet(sweep_run / "saes" / "k2-x2" / "quality" / "alignment.parquet")
    sae_ap = [r["mean_best_ap"] for r in q["alignment"]["table"] if r["method"] == "sae"]
    assert sae_ap == pytest.approx(own_align[own_align.method == "sae"].mean_best_ap.tolist())
    assert q["evaluate"]["all"]["l0"] == pytest.approx(2.0) and q_main["evaluate"]["all"]["l0"] == pytest.approx(4.0)


def test_an_image_is_encoded_by_the_sae_shown(sweep_run):
    main, other = _client(sweep_run), _client(sweep_run, "k2-x2")
    image_id = main.get("/api/images", params={"dataset": "sample", "limit": 1}).json()["images"][0]["image_id"]
    a, b = (c.get("/api/image/patch", params={"dataset": "sample", "image_id": image_id, "patch": 0}).json()
            for c in (main, other))
    assert len(a["top"]) == 4 and len(b["top"]) == 2  # TopK: exactly k latents fire on a patch token


def test_the_default_is_the_runs_own_sae_and_the_page_says_it_is_one_of_a_sweep(sweep_run):
    shown = _client(sweep_run).get("/api/run").json()["shown_sae"]
    assert shown["name"] == "k4-x2" and shown["default"] and shown["dir"] == "sae" and shown["k"] == 4
    assert shown["title"].endswith("one of 3 in this run's sweep (the primary one, shown by default; open another "
                                   "with --sae NAME)")
    # naming the primary is the default
    assert _client(sweep_run, "k4-x2").get("/api/run").json()["shown_sae"] == shown


def test_a_sweep_sae_without_stats_says_so_instead_of_showing_the_primarys(sweep_run):
    c = _client(sweep_run, "k1-x2")
    shown = c.get("/api/run").json()["shown_sae"]
    write = "cytosae stats --run RUN --sae k1-x2"
    assert not shown["stats"] and shown["note"] == (
        f"saes/k1-x2/stats/latents.parquet is missing: write it with `{write}` (RUN = this run directory)")
    r = c.get("/api/latents", params={"dataset": "sample"})
    assert r.status_code == 404 and r.json()["detail"] == shown["note"]
    page = c.get("/api/latents/0").json()  # the page stands on what this SAE has: no top images, its own class AP
    assert page["top_images"] == {} and page["class_profile"] == {} and page["stats"] == []
    own = pd.read_parquet(sweep_run / "saes" / "k1-x2" / "quality" / "latent_classes.parquet")
    assert [r["ap"] for r in page["class_ap"]["classes"]] == pytest.approx(own[own.latent == 0].ap.tolist())
    r = c.get("/api/latents/0/heatmaps", params={"dataset": "sample"})
    assert r.status_code == 404 and r.json()["detail"].startswith("saes/k1-x2/stats/top_images.parquet is missing")
    assert not c.get("/api/run").json()["has"]["stats"]


def test_annotations_of_a_sweep_sae_are_its_own(sweep_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(sweep_run, run_dir)
    other = _client(run_dir, "k2-x2")
    r = other.put("/api/annotations/3", json={"name": "k2 thing", "tags": [], "note": "", "status": "unreviewed"})
    assert r.status_code == 200, r.text
    assert (run_dir / "saes" / "k2-x2" / "annotations.sqlite").is_file()
    # latent 3 of k2-x2 is not latent 3 of the run's SAE: the run's annotations do not have it
    assert _client(run_dir).get("/api/annotations").json()["annotations"] == []
    assert _client(run_dir).get("/api/annotations/3").status_code == 404
    assert [a["name"] for a in other.get("/api/annotations").json()["annotations"]] == ["k2 thing"]


def test_an_unknown_sae_name_is_one_line_listing_the_sweeps(sweep_run, tmp_path):
    message = f"{sweep_run}: no SAE named 'k9-x2' in this run (its sweep has ['k1-x2', 'k2-x2', 'k4-x2']); omit --sae"
    with pytest.raises(ValueError, match=re.escape(message)):
        create_app(sweep_run, sae_name="k9-x2")
    for command in (["report", str(sweep_run), "--out", str(tmp_path / "site"), "--sae", "k9-x2"],
                    ["explore", str(sweep_run), "--sae", "k9-x2"]):
        r = CliRunner().invoke(cli, command)
        text = " ".join(r.output.split())
        assert r.exit_code == 2 and "no SAE named 'k9-x2'" in text and "['k1-x2', 'k2-x2', 'k4-x2']" in text
        assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "site").exists()


@pytest.fixture(scope="module")
def reports(sweep_run, tmp_path_factory):
    """Static reports of k2-x2 (through the CLI), of k1-x2 (no stats) and of the default SAE."""
    root = tmp_path_factory.mktemp("sweep_reports")
    r = CliRunner().invoke(cli, ["report", str(sweep_run), "--out", str(root / "k2"), "--sae", "k2-x2",
                                 "--latents", "2", "--images", "1"])
    assert r.exit_code == 0, r.output
    k1 = build_report(sweep_run, root / "k1", n_latents=1, n_images=0, sae_name="k1-x2")
    main = build_report(sweep_run, root / "main", n_latents=1, n_images=0)
    return root, " ".join(r.output.split()), k1, main


def test_the_report_of_a_sweep_sae_names_it(sweep_run, reports):
    root, said, k1, main = reports
    assert "(SAE k2-x2 (topk, k=2, expansion 2, layer -2," in said
    title = re.search(r"<title>(.*)</title>", (root / "k2" / "index.html").read_text()).group(1)
    assert title.startswith("cytosae report: SAE k2-x2 (topk, k=2, expansion 2, layer -2, ") and \
        title.endswith("one of 3 in this run&#x27;s sweep (not the primary k4-x2)")
    data = (root / "k2" / "data" / f"{fnv1a(canonical_url('run'))}.js").read_text()
    assert '"name":"k2-x2"' in data
    own = read_stats_table(sweep_run / "saes" / "k2-x2" / "stats", LATENTS)
    ov = (root / "k2" / "data" / f"{fnv1a(canonical_url('latents', {'dataset': 'sample'}))}.js").read_text()
    assert f'"n":{len(own)},' in ov and '"sae":{"name":"k2-x2"' in ov

    assert k1["latent_pages"] == 0 and k1["sae"]["note"].startswith("saes/k1-x2/stats/latents.parquet is missing")
    assert "<title>cytosae report: SAE k1-x2 (topk, k=1," in (root / "k1" / "index.html").read_text()
    assert main["sae"]["name"] == "k4-x2" and main["sae"]["default"] and main["latent_pages"] == 1


@pytest.mark.browser
@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium (apt-get install chromium)")
def test_the_report_pages_say_which_sae_they_show(reports):
    from playwright.sync_api import sync_playwright

    root = reports[0]
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-gpu",
                              "--disable-background-networking", "--disable-component-update", "--no-first-run"])
        try:
            pg = b.new_page()
            errors = []
            pg.on("pageerror", lambda e: errors.append(str(e)))
            pg.goto((root / "k2" / "index.html").as_uri())
            pg.wait_for_selector("#scatter")
            assert pg.locator("#sae-banner").inner_text().startswith("Showing SAE k2-x2 (topk, k=2, expansion 2,")
            assert "one of 3 in this run's sweep" in pg.locator("#sae-banner").inner_text()
            assert " · SAE k2-x2 · " in pg.locator("#run-name").inner_text()
            pg.goto((root / "k1" / "index.html").as_uri())
            pg.wait_for_selector("#sae-banner")
            assert "saes/k1-x2/stats/latents.parquet is missing" in pg.locator("#sae-banner").inner_text()
            pg.goto((root / "main" / "index.html").as_uri())
            pg.wait_for_selector("#sae-banner")
            assert "the primary one, shown by default" in pg.locator("#sae-banner").inner_text()
            assert not errors, errors
        finally:
            b.close()


def test_open_run_reads_the_sweep_sae_named(sweep_run):
    view = open_run(sweep_run, sae="k2-x2")
    own = read_stats_table(sweep_run / "saes" / "k2-x2" / "stats", LATENTS)
    assert view.shown_sae["name"] == "k2-x2" and view.sae.cfg.k == 2 and view.n_latents == len(own)
    assert view.stats.freq_image.tolist() == pytest.approx(own.freq_image.tolist())
    assert "SAE k2-x2 (topk, k=2" in repr(view)
    assert open_run(sweep_run).sae.cfg.k == 4
    with pytest.raises(ValueError, match="no SAE named 'nope'"):
        open_run(sweep_run, sae="nope")
