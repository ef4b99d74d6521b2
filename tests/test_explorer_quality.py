"""The quality page (issue #18 item 5): /api/quality serves what `cytosae evaluate` and `cytosae align` wrote, with
their definitions; absent parts name their command, damaged files are 503 naming the file; the latent page carries
the latent's AP per class; the static report holds the same; and the page draws the tables in a browser."""
import json
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
from fastapi.testclient import TestClient

from cytosae.explorer import create_app
from cytosae.explorer.report import build_report, canonical_url, fnv1a
from cytosae.steps import AlignSettings, EvaluateSettings, run_align, run_evaluate
from explorer_fixtures import CLASSES, copy_of, session_run

CHROMIUM = Path("/usr/bin/chromium")


def _measured(run: Path, align: bool = True, evaluate: bool = True) -> Path:
    """The run after the real steps: `cytosae evaluate` (sae/eval.json) and `cytosae align` (quality/)."""
    if evaluate:
        run_evaluate(EvaluateSettings(device="cpu", dataset="acevedo"), run=run)
    if align:
        run_align(AlignSettings(device="cpu", dataset="acevedo", max_clusters=4, fit_tokens=500), run=run)
    return run


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    fx = copy_of(session_run(tmp_path_factory), tmp_path_factory.mktemp("quality"))
    return fx, _measured(fx.path)


def _copy(measured, tmp_path) -> Path:
    shutil.copytree(measured[1], tmp_path / "run", ignore=shutil.ignore_patterns("annotations.sqlite*"))
    return tmp_path / "run"


def _client(run: Path) -> TestClient:
    return TestClient(create_app(run), base_url="http://127.0.0.1")


def test_quality_serves_every_figure_the_steps_wrote_with_definitions(measured):
    _, run = measured
    r = _client(run).get("/api/quality")
    assert r.status_code == 200, r.text
    q = r.json()
    written = json.loads((run / "sae" / "eval.json").read_text())
    assert q["evaluate"]["all"]["fvu"] == written["all"]["fvu"] and q["evaluate"]["patch"]["l0"] == written["patch"]["l0"]
    assert q["evaluate"]["cls"]["dead_fraction"] == written["cls"]["dead_fraction"]
    assert "fvu" in q["evaluate"]["definitions"] and q["spliced"] is None
    a = q["alignment"]
    table = pd.read_parquet(run / "quality" / "alignment.parquet")
    assert [t["method"] for t in a["table"]] == ["sae", "pca", "kmeans", "untrained_sae"]
    assert [t["mean_best_ap"] for t in a["table"]] == pytest.approx(table.mean_best_ap.tolist())
    per_class = pd.read_parquet(run / "quality" / "alignment_classes.parquet")
    assert len(a["per_class"]) == len(per_class) == 4 * 3
    assert {r["best_latent"] for r in a["per_class"] if r["method"] == "sae"} == {0, 1, 2}  # the fixture's class latents
    assert "Coverage@0.3" in a["definitions"] and a["dataset"] == "acevedo" and a["classes"] == sorted(CLASSES)
    assert a["n_images"] == 12 and a["token_policy"] == "any_patch"
    probing = a["probing"]
    assert "balanced accuracy" in probing["definitions"] and probing["folds"]
    if (run / "quality" / "probing.parquet").is_file():
        assert len(probing["per_class"]) == len(pd.read_parquet(run / "quality" / "probing.parquet"))
    assert q["missing"] == ["sae/eval.spliced.json is missing: write it with `cytosae evaluate --run RUN --spliced` "
                            "(RUN = this run directory)"]
    assert str(run) not in r.text  # no server path: eval.json's are relative already, and redacted anyway


def test_quality_of_a_run_without_evaluate_or_align_is_404_naming_both_commands(tmp_path_factory):
    fx = copy_of(session_run(tmp_path_factory), tmp_path_factory.mktemp("no-quality"))
    r = _client(fx.path).get("/api/quality")
    assert r.status_code == 404
    detail = r.json()["detail"]
    assert "cytosae evaluate --run RUN" in detail and "quality/alignment.json is missing" in detail
    assert "cytosae align --run RUN" in detail
    assert _client(fx.path).get("/api/latents/0").json()["class_ap"] is None  # the latent page stands without it


def test_quality_with_evaluate_only_lists_the_align_files_as_missing(tmp_path_factory):
    fx = copy_of(session_run(tmp_path_factory), tmp_path_factory.mktemp("eval-only"))
    _measured(fx.path, align=False)
    q = _client(fx.path).get("/api/quality").json()
    assert q["alignment"] is None and q["evaluate"]["all"]["tokens"] > 0
    assert [m.split(" ")[0] for m in q["missing"]] == ["sae/eval.spliced.json", "quality/alignment.json",
                                                        "quality/alignment.parquet", "quality/alignment_classes.parquet"]
    assert all("cytosae align --run RUN" in m for m in q["missing"][1:])


@pytest.mark.parametrize("rel, command", [("quality/alignment_classes.parquet", "cytosae align --run RUN"),
                                          ("quality/alignment.json", "cytosae align --run RUN"),
                                          ("quality/probing.parquet", "cytosae align --run RUN"),
                                          ("sae/eval.json", "cytosae evaluate --run RUN")])
def test_a_damaged_quality_file_is_503_naming_it_and_its_command(measured, tmp_path, rel, command):
    run = _copy(measured, tmp_path)
    if not (run / rel).is_file():
        pytest.skip(f"{rel} not written on this fixture")
    (run / rel).write_bytes(b"\x00 not a table")
    r = _client(run).get("/api/quality")
    assert r.status_code == 503
    assert r.json()["detail"].startswith(rel) and command in r.json()["detail"]  # the typed reader's line or "could not be read"


def test_a_json_that_is_not_an_object_is_damaged(measured, tmp_path):
    run = _copy(measured, tmp_path)
    (run / "sae" / "eval.json").write_text("[1, 2]")
    r = _client(run).get("/api/quality")
    assert r.status_code == 503 and r.json()["detail"].startswith("sae/eval.json") and "cytosae evaluate" in r.json()["detail"]


def test_latent_page_carries_the_latents_ap_per_class_and_best_class(measured):
    _, run = measured
    lc = pd.read_parquet(run / "quality" / "latent_classes.parquet")
    client = _client(run)
    for j in (0, 1, 5):
        c = client.get(f"/api/latents/{j}").json()["class_ap"]
        want = lc[lc.latent == j].sort_values("class")
        assert [r["class"] for r in c["classes"]] == want["class"].tolist()
        assert [r["ap"] for r in c["classes"]] == pytest.approx(want.ap.tolist())
        assert [r["auroc"] for r in c["classes"]] == pytest.approx(want.auroc.tolist())
        assert c["best_class"] == want[want.best]["class"].item()
        assert c["dataset"] == "acevedo" and "prevalence" in c["measured"]
    assert client.get("/api/latents/0").json()["class_ap"]["best_class"] == CLASSES[0]  # latent 0 is class 0's


def test_a_damaged_latent_classes_table_is_503_on_the_latent_page(measured, tmp_path):
    run = _copy(measured, tmp_path)
    (run / "quality" / "latent_classes.parquet").write_bytes(b"PAR1 broken")
    r = _client(run).get("/api/latents/0")
    assert r.status_code == 503 and "quality/latent_classes.parquet could not be read" in r.json()["detail"]


def _data(site_dir: Path, path: str, params=None):
    f = site_dir / "data" / f"{fnv1a(canonical_url(path, params))}.js"
    assert f.is_file(), f
    m = re.fullmatch(r'CYTOSAE_DATA\["([0-9a-f]{8})"\]=(.*);\n', f.read_text(), re.S)
    return json.loads(m.group(2))


@pytest.fixture(scope="module")
def site(measured, tmp_path_factory):
    out = tmp_path_factory.mktemp("quality-report") / "site"
    res = build_report(measured[1], out, n_latents=4, n_images=1)
    return res, out


def test_the_report_holds_the_quality_tables_and_the_per_latent_ap(measured, site):
    _, run = measured
    res, out = site
    q = _data(out, "quality")
    assert q == _client(run).get("/api/quality").json()
    assert [t["method"] for t in q["alignment"]["table"]] == ["sae", "pca", "kmeans", "untrained_sae"]
    assert q["evaluate"]["all"]["fvu"] == json.loads((run / "sae" / "eval.json").read_text())["all"]["fvu"]
    for j in res["latents"]:
        assert len(_data(out, f"latents/{j}")["class_ap"]["classes"]) == 3
    assert 'data-nav="quality"' in (out / "index.html").read_text()


def _chromium():
    from playwright.sync_api import sync_playwright
    p = sync_playwright().start()
    b = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-gpu",
                          "--disable-background-networking", "--disable-component-update", "--no-first-run"])
    return p, b


@pytest.mark.browser
@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium (apt-get install chromium)")
def test_the_quality_page_draws_the_tables_in_a_browser(measured, site):
    """From the static report (the same app.js as the live explorer, no server thread to manage)."""
    res, out = site
    j = res["latents"][0]
    lc = pd.read_parquet(measured[1] / "quality" / "latent_classes.parquet")
    p, b = _chromium()
    try:
        pg = b.new_page(viewport={"width": 1300, "height": 900})
        errors = []
        pg.on("pageerror", lambda e: errors.append(str(e)))
        pg.goto((out / "index.html").as_uri() + "#/quality")
        pg.wait_for_selector("#alignment-table")
        rows = pg.locator("#alignment-table tr")
        assert rows.count() == 5  # header + sae, pca, kmeans, untrained_sae
        assert rows.nth(1).locator("td").first.inner_text() == "sae"
        assert pg.locator("#eval-table tr").count() == 4  # header + all, cls, patch
        assert pg.locator("#eval-table tr").nth(1).locator("td").first.inner_text() == "all"
        head = pg.locator("#eval-table th").all_inner_texts()
        assert head[:3] == ["token group", "tokens", "fvu"] and "l0" in head and "dead_fraction" in head
        assert pg.locator("#alignment-classes tr").count() == 1 + 12
        assert "Coverage@0.3" in pg.locator("pre.definitions").first.inner_text()
        assert "eval.spliced.json is missing" in pg.locator("#quality-missing").inner_text()
        pg.goto((out / "index.html").as_uri() + f"#/latent/{j}")
        pg.wait_for_selector("#class-ap")
        assert pg.locator("#best-class").inner_text() == lc[(lc.latent == j) & lc.best]["class"].item()
        assert pg.locator("#class-ap tr").count() == 4
        assert not errors, errors
    finally:
        b.close()
        p.stop()


@pytest.fixture(scope="module")
def spliced_run(tmp_path_factory):
    """A run made end to end by the package, then `cytosae evaluate --spliced` (the SAE through the backbone)."""
    from explorer_fixtures import make_pipeline_run

    run = make_pipeline_run(tmp_path_factory.mktemp("spliced-run"))
    run_evaluate(EvaluateSettings(device="cpu", spliced=True), run=run)
    return run


def test_quality_serves_the_spliced_figures_when_evaluate_wrote_them(spliced_run):
    written = json.loads((spliced_run / "sae" / "eval.spliced.json").read_text())
    q = _client(spliced_run).get("/api/quality").json()
    assert q["spliced"]["output"] == written["output"] and q["spliced"]["fvu"] == written["fvu"]
    assert q["spliced"]["definitions"] == written["definitions"] and q["evaluate"]["all"]["tokens"] > 0
    assert q["alignment"] is None and not any("eval.spliced.json" in m for m in q["missing"])


def _edit_json(path, change):
    content = json.loads(path.read_text())
    change(content)
    path.write_text(json.dumps(content))


@pytest.mark.parametrize("change, message", [
    (lambda c: c["output"]["spliced"]["cls"].update(cosine="0.9"),
     "output.spliced.cls.cosine: must be a number, got '0.9'"),
    (lambda c: c["downstream"]["label"].pop("probe"),
     "downstream.label.folds: knn, probe and folds are recorded unless the column was skipped"),
    (lambda c: c["backbone"].pop("layer_index"), "backbone.layer_index: is missing"),
    (lambda c: c.update(n_images=0), "n_images: must be greater than or equal to 1, got 0"),
])
def test_an_edited_spliced_json_is_one_line_naming_file_and_field(spliced_run, tmp_path, change, message):
    """eval.spliced.json is read through SplicedFigures (beside its writer, steps/evaluate.py) by the explorer's
    quality page and the sweep: an edited one is refused naming the file and the field, never shown."""
    from cytosae.steps.evaluate import SPLICED, read_spliced
    from cytosae.store.format import InvalidFile

    run = tmp_path / "run"
    shutil.copytree(spliced_run, run)
    path = run / "sae" / SPLICED
    assert read_spliced(run / "sae") == json.loads(path.read_text())
    _edit_json(path, change)
    with pytest.raises(InvalidFile) as err:
        read_spliced(path)
    assert str(err.value).startswith(f"{path}: {message}") and "\n" not in str(err.value)
    r = _client(run).get("/api/quality")
    detail = r.json()["detail"]
    assert r.status_code == 503 and detail.startswith(f"sae/{SPLICED}: {message}"), detail
    assert "cytosae evaluate --run RUN --spliced" in detail and str(tmp_path) not in r.text


@pytest.mark.browser
@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium (apt-get install chromium)")
def test_the_live_quality_page_draws_the_spliced_table(spliced_run):
    from test_explorer_browser import _serve

    p, b = _chromium()
    try:
        with _serve(spliced_run) as url:
            pg = b.new_page(viewport={"width": 1300, "height": 900})
            errors = []
            pg.on("pageerror", lambda e: errors.append(str(e)))
            pg.goto(url + "#/quality")
            pg.wait_for_selector("#spliced-table")
            assert pg.locator("#spliced-table tr").count() == 5  # header + spliced/control x cls/patch
            assert pg.locator("#eval-table tr").count() == 4
            assert "quality/alignment.json is missing" in pg.locator("#quality-missing").inner_text()
            assert not errors, errors
    finally:
        b.close()
        p.stop()
