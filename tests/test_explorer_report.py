"""Static report: files exist, hold the latents' data, and the pages work from file:// without a server."""
import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cytosae.cli import app as cli
from cytosae.explorer.annotations import AnnotationStore
from cytosae.explorer.report import canonical_url, fnv1a
from explorer_fixtures import copy_of, session_run

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "explorer"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    fx = copy_of(session_run(tmp_path_factory), root)
    AnnotationStore(fx.path / "annotations.sqlite").put(40, name="rare thing", status="validated")
    res = CliRunner().invoke(cli, ["report", str(fx.path), "--out", str(root / "site"), "--latents", "6", "--images", "2"])
    assert res.exit_code == 0, res.output
    assert "6 latent pages, 2 image pages" in res.output
    return fx, root / "site"


def _data(site_dir: Path, path: str, params=None):
    f = site_dir / "data" / f"{fnv1a(canonical_url(path, params))}.js"
    assert f.is_file(), f
    m = re.fullmatch(r'CYTOSAE_DATA\["([0-9a-f]{8})"\]=(.*);\n', f.read_text(), re.S)
    return json.loads(m.group(2))


def test_canonical_url_matches_js_rules():
    assert canonical_url("image", {"image_id": "a b/c(1).png", "dataset": "x", "k": None}) == \
        "/api/image?dataset=x&image_id=a%20b%2Fc(1).png"
    assert fnv1a("") == "811c9dc5" and fnv1a("a") == "e40c292c"  # FNV-1a 32-bit reference values


def test_report_files_hold_the_latents(site):
    fx, out = site
    assert (out / "index.html").is_file() and (out / "static" / "app.js").is_file() and (out / "static" / "style.css").is_file()
    assert 'src="data/static.js"' in (out / "index.html").read_text()
    flag = json.loads((out / "data" / "static.js").read_text().split("= ", 1)[1].split(";\n")[0])
    assert flag["latents"][0] == 40 and len(flag["latents"]) == 6  # annotated first
    for j in flag["latents"]:
        page = _data(out, f"latents/{j}")
        assert page["latent"] == j
    assert _data(out, "latents/40")["annotation"]["name"] == "rare thing"
    ov = _data(out, "latents", {"dataset": "acevedo"})
    assert ov["columns"]["latent"] == list(range(fx.n_latents))
    written = json.loads((fx.path / "classify" / "results.json").read_text())
    assert _data(out, "classify")["models"]["concepts_logreg_l2"]["macro_f1"] == written["models"]["concepts_logreg_l2"]["macro_f1"]
    ds, image_id = flag["images"][0]
    assert len(_data(out, "image/patch", {"dataset": ds, "image_id": image_id, "patch": 255})["top"]) >= 0
    tile = out / "data" / f"{fnv1a(canonical_url('image/file', {'dataset': ds, 'image_id': image_id}))}.jpg"
    from PIL import Image
    assert Image.open(tile).size == (224, 224)


@pytest.mark.browser
@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium (apt-get install chromium)")
def test_static_report_opens_from_file(site):
    from playwright.sync_api import sync_playwright
    fx, out = site
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-gpu",
                              "--disable-background-networking", "--disable-component-update", "--no-first-run"])
        try:
            pg = b.new_page(viewport={"width": 1300, "height": 900})
            errors = []
            pg.on("pageerror", lambda e: errors.append(str(e)))
            pg.goto((out / "index.html").as_uri())
            pg.wait_for_selector("#scatter")
            assert pg.locator("#count").inner_text().endswith(f"of {fx.n_latents} latents shown")
            pg.goto((out / "index.html").as_uri() + "#/latent/40")
            pg.wait_for_selector("#latent-title")
            assert "rare thing" in pg.locator("#latent-title").inner_text()
            assert pg.locator("#a-save").is_disabled()
            pg.goto((out / "index.html").as_uri() + "#/latent/0")
            pg.wait_for_function("() => [...document.querySelectorAll('#top-images img')].some(i => i.complete && i.naturalWidth === 224)")
            pg.screenshot(path=str(ARTIFACTS / "static_latent.png"), full_page=True)
            pg.goto((out / "index.html").as_uri() + "#/latent/47")
            pg.wait_for_selector("#app .error")
            assert "not included in this static report" in pg.locator("#app .error").inner_text()
            assert not errors, errors
        finally:
            b.close()
