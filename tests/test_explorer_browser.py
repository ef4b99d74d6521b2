"""The pages in a real browser (Debian chromium via Playwright): overview, latent, image patch click, annotation."""
import contextlib
import socket
import threading
import time
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "explorer"
pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium (apt-get install chromium)")]
LAUNCH = dict(executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                                                   "--disable-component-update", "--no-first-run"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _serve(run_dir: Path):
    import uvicorn

    from cytosae.explorer import create_app

    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(run_dir), host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    for _ in range(200):
        if srv.started:
            break
        time.sleep(0.05)
    assert srv.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        srv.should_exit = True
        t.join(timeout=10)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from explorer_fixtures import copy_of, session_run

    fx = copy_of(session_run(tmp_path_factory), tmp_path_factory.mktemp("browser"))
    with _serve(fx.path) as url:
        yield url, fx


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        b = p.chromium.launch(**LAUNCH)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    ctx = browser.new_context(viewport={"width": 1300, "height": 900})
    pg = ctx.new_page()
    errors = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    # CSP violations and failed loads show up as console errors; expected 4xx API answers are filtered out
    pg.on("console", lambda m: errors.append(m.text) if m.type == "error" and "status of 4" not in m.text
          and "status of 503" not in m.text else None)
    yield pg
    ctx.close()
    assert not errors, errors


def test_overview_scatter_and_filters(server, page):
    url, fx = server
    page.goto(url)
    page.wait_for_selector("#scatter")
    assert page.locator("#count").inner_text().endswith(f"of {fx.n_latents} latents shown")
    # the scatter is a canvas with dots drawn on it (non-white pixels), not DOM nodes
    painted = page.evaluate("""() => { const c = document.getElementById('scatter');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; let n = 0;
        for (let i = 0; i < d.length; i += 4) if (d[i+3] > 0 && (d[i] < 200 || d[i+1] < 200)) n++; return n; }""")
    assert painted > 200
    page.select_option("#f-class", "monocyte")
    shown = int(page.locator("#count").inner_text().split()[0])
    assert 1 <= shown < fx.n_latents
    page.screenshot(path=str(ARTIFACTS / "overview.png"), full_page=True)
    page.fill("#f-q", "2")
    assert page.locator("#count").inner_text().startswith("1 of")


def test_latent_page_shows_images_overlays_and_neighbours(server, page):
    url, fx = server
    page.goto(url + "#/latent/0")
    page.wait_for_selector("#top-images img")
    page.wait_for_function("() => document.querySelectorAll('#top-images canvas.heat').length > 0")
    # overlays are drawn once the heatmaps arrive: some canvas pixels become non-transparent
    page.wait_for_function("""() => [...document.querySelectorAll('#top-images canvas.heat')].some(c =>
        c.getContext('2d').getImageData(0, 0, c.width, c.height).data.some((v, i) => i % 4 === 3 && v > 0))""")
    assert page.locator("#latent-title").inner_text().startswith("Latent #0")
    nb = page.locator("#neighbours a").all_inner_texts()
    assert nb[0].startswith("#3") and nb[1].startswith("#4")
    assert page.locator("#patients-table tr").count() > 1
    page.wait_for_function("() => document.querySelectorAll('#top-images img').length && [...document.querySelectorAll('#top-images img')].every(i => i.complete && i.naturalWidth === 224)")
    page.screenshot(path=str(ARTIFACTS / "latent.png"), full_page=True)


def test_image_page_patch_click_shows_overlay(server, page):
    url, fx = server
    import numpy as np
    image_id = "neutrophil/cell_09.png"
    acts = fx.acts["acevedo"][image_id]
    p = int(np.argmax(acts[1:, 0]))  # the patch where latent 0 fires most
    page.goto(url + f"#/image?dataset=acevedo&id={image_id}")
    page.wait_for_selector("#image-canvas")
    page.wait_for_selector("#top-cls button")
    box = page.locator("#image-canvas").bounding_box()
    cell = box["width"] / 16
    page.mouse.click(box["x"] + (p % 16 + 0.5) * cell, box["y"] + (p // 16 + 0.5) * cell)
    page.wait_for_selector(f"#patch-latents h3:has-text('Patch {p}')")
    first = page.locator("#patch-latents button").first.inner_text()
    assert first.startswith(f"#{int(np.argmax(acts[1 + p]))} ")
    page.wait_for_function("() => document.getElementById('overlay-label').innerText.startsWith('Overlay')")
    # the overlay paints the clicked patch's cell
    alpha = page.evaluate(f"""() => {{ const c = document.getElementById('image-canvas'); const s = c.width / 16;
        return c.getContext('2d').getImageData(({p % 16} + 0.5) * s, ({p // 16} + 0.5) * s, 1, 1).data[3]; }}""")
    assert alpha > 0
    page.screenshot(path=str(ARTIFACTS / "image_patch.png"), full_page=True)


def test_annotation_saved_and_shown_after_reload(server, page):
    url, fx = server
    page.goto(url + "#/latent/1")  # latent 1 fires, so it is drawn on the overview
    page.wait_for_selector("#annotation-form")
    page.fill("#a-name", "nuclear lobes")
    page.fill("#a-tags", "nucleus, segmented")
    page.select_option("#a-status", "validated")
    page.fill("#a-note", "segmented nuclei of neutrophils")
    page.click("#a-save")
    page.wait_for_selector("#a-msg.ok")
    page.reload()
    page.wait_for_selector("#annotation-form")
    assert page.input_value("#a-name") == "nuclear lobes"
    assert page.input_value("#a-tags") == "nucleus, segmented"
    assert page.input_value("#a-status") == "validated"
    assert "nuclear lobes" in page.locator("#latent-title").inner_text()
    page.screenshot(path=str(ARTIFACTS / "annotation.png"), full_page=True)
    page.goto(url + "#/")
    page.wait_for_selector("#scatter")
    page.select_option("#f-ann", "validated")
    assert page.locator("#count").inner_text().startswith("1 of")


def test_patients_page(server, page):
    url, fx = server
    page.goto(url + "#/patients")
    page.wait_for_selector("#barcodes canvas")
    page.wait_for_selector("#volcano-canvas")
    page.wait_for_selector("#classify-table")
    table = page.locator("#classify-table").inner_text()  # classify/results.json as write_classify writes it
    assert "concepts_logreg_l2" in table and "2 × 1" in table
    assert page.locator("#compare-pair").count() == 0  # write_patients: one comparison for two diagnoses, no picker
    page.wait_for_selector("#volcano p.muted:has-text('AML vs control')")
    caption = page.locator("#volcano p.caption").inner_text()
    assert "any_patch" in caption  # patients/summary.json's token policy, as write_patients records it
    page.screenshot(path=str(ARTIFACTS / "patients.png"), full_page=True)


@pytest.mark.slow
def test_patients_page_on_the_real_demo_outputs(demo_run, page):
    """What `cytosae patients` and `cytosae classify` really write, shown by the patients page."""
    run, _ = demo_run
    with _serve(run) as url:
        page.goto(url + "#/patients")
        page.wait_for_selector("#barcodes canvas")
        page.wait_for_selector("#volcano-canvas")
        page.wait_for_selector("#classify-table")
        table = page.locator("#classify-table").inner_text()
        for name in ("concepts_logreg_l1", "concepts_random_forest", "baseline_mean_embedding_logreg_l2",
                     "baseline_promyelocyte_proportion"):
            assert name in table
        assert page.locator("#classify-table tr").count() == 1 + 8  # header + every model, baseline and MIL model
        assert "mil_concepts" in table and "mil_embedding" in table
        page.wait_for_selector("#volcano p.muted:has-text('AML vs APL')")
        assert page.locator("#compare-pair").count() == 0  # one comparison: no selector to choose from
        page.screenshot(path=str(ARTIFACTS / "patients_demo_run.png"), full_page=True)


@pytest.fixture(scope="module")
def big_server(tmp_path_factory):
    """A run with only stats for 49,152 latents (CytoSAE size): the overview must stay responsive."""
    import json

    import numpy as np
    import pandas as pd

    from cytosae.sae import SAE, SAEConfig

    n = 49_152
    run = tmp_path_factory.mktemp("big") / "run"
    (run / "stats").mkdir(parents=True)
    # the SAE as sae.save writes it (the explorer checks config.json's schema and checksum); d_in 8 keeps it 3 MB
    SAE(SAEConfig(arch="relu-l1", d_in=8, n_latents=n)).save(run / "sae")
    rng = np.random.default_rng(0)
    pd.DataFrame({"dataset": "mll", "latent": np.arange(n), "freq_image": 10 ** rng.uniform(-5, -0.3, n),
                  "freq_token": 0.01, "mean_act": 10 ** rng.uniform(-1, 1, n), "max_act": 5.0,
                  "label_entropy": rng.uniform(0, 3.7, n), "top_label": rng.choice(["blast", "neutrophil", "lymphocyte"], n),
                  "noisy": False}).to_parquet(run / "stats" / "latents.parquet", index=False)
    (run / "run.json").write_text(json.dumps({"datasets": {"mll": {"store": "stores/mll", "data": None}}, "sae": "sae"}))
    with _serve(run) as url:
        yield url


def test_overview_with_49k_latents_stays_responsive(big_server, page):
    page.goto(big_server)
    page.wait_for_selector("#scatter")
    page.wait_for_function("() => document.getElementById('count').innerText.includes('49152 latents')")
    assert page.locator("canvas").count() == 1 and page.locator("#app *").count() < 200  # dots are pixels, not nodes
    # time a filter change end to end (filter 49k rows + redraw), in the page
    ms = page.evaluate("""() => { const sel = document.getElementById('f-class'); const t = performance.now();
        sel.value = 'blast'; sel.dispatchEvent(new Event('input', {bubbles: true})); return performance.now() - t; }""")
    shown = int(page.locator("#count").inner_text().split()[0])
    assert 10_000 < shown < 20_000
    page.screenshot(path=str(ARTIFACTS / "overview_49k.png"))
    print(f"49k overview: filter + redraw {ms:.0f} ms")
    assert ms < 250, f"filter + redraw took {ms:.0f} ms"
    # a latent without per-latent tables still opens, saying what is missing
    page.goto(big_server + "#/latent/49151")
    page.wait_for_selector("#latent-title")
    assert "No top-image table" in page.inner_text("#app")


def test_upload_errors_are_shown(server, page, tmp_path):
    url, fx = server
    page.goto(url + "#/image")
    page.wait_for_selector("#upload-file")
    bad = tmp_path / "notes.png"
    bad.write_text("not an image at all")
    page.set_input_files("#upload-file", str(bad))
    page.wait_for_selector("#upload-msg.error")
    assert "415" in page.inner_text("#upload-msg") and "not a readable image" in page.inner_text("#upload-msg")
    # a real image reaches the encoder; this run's store was imported, so there is no backbone: 503, said plainly
    page.set_input_files("#upload-file", str(fx.data["acevedo"] / "neutrophil" / "cell_00.png"))
    page.wait_for_function("() => document.getElementById('upload-msg').innerText.startsWith('503')")
    assert "imported" in page.inner_text("#upload-msg")


def test_image_picker_filters(server, page):
    url, fx = server
    page.goto(url + "#/image?dataset=acevedo")
    page.wait_for_selector("#image-list button")
    assert page.locator("#image-list button").count() == 12
    page.select_option("#img-label", "lymphocyte")
    page.wait_for_function("() => document.querySelectorAll('#image-list button').length === 4")
    page.fill("#img-q", "cell_10")
    page.wait_for_function("() => document.querySelectorAll('#image-list button').length === 1")
    page.click("#image-list button")
    page.wait_for_selector("#top-cls button")
    assert "lymphocyte/cell_10.png" in page.inner_text("#image-main h2")


@pytest.fixture(scope="module")
def picked_server(tmp_path_factory):
    """A run whose manifest is a CSV naming cells of a collection outside the run by absolute path (issue #16)."""
    from explorer_fixtures import make_pipeline_run

    run = make_pipeline_run(tmp_path_factory.mktemp("picked"), picked=True)
    with _serve(run) as url:
        yield url, run


def test_cells_picked_by_absolute_path_show_as_images_with_short_captions(picked_server, page):
    import pandas as pd

    url, run = picked_server
    ids = set(pd.read_parquet(run / "stores" / "sample" / "images.parquet")["image_id"])
    assert len(ids) == 12 and not any(i.startswith("/") for i in ids)
    top = pd.read_parquet(run / "stats" / "top_images.parquet")
    latent = int(top["latent"].value_counts().index[0])
    page.goto(url + f"#/latent/{latent}")
    page.wait_for_selector("#top-images .tile img")
    # every tile's image loads (before the fix each answered 403: outside the run and data folders)
    page.wait_for_function("() => [...document.querySelectorAll('#top-images img')].every(i => i.complete)")
    sizes = page.eval_on_selector_all("#top-images img", "els => els.map(i => i.naturalWidth)")
    assert sizes and all(w > 0 for w in sizes), sizes
    caps = page.eval_on_selector_all("#top-images .tile .id.muted", """els => els.map(e => ({text: e.innerText,
        title: e.title, right: e.getBoundingClientRect().right, tile: e.closest('.tile').getBoundingClientRect().right}))""")
    assert len(caps) == len(sizes)
    for c in caps:
        # the full id, relative to the collection, on hover; shown: its folder and file name (P001/cell_002.png)
        assert c["title"] in ids and c["title"].endswith(c["text"]) and c["text"].count("/") == 1, c
        assert c["right"] <= c["tile"] + 0.5, c  # stays inside its tile
    # a long id is shown by its file name
    assert page.evaluate("shortId('patient_0017_bone_marrow/neutrophil_segmented/cell_0001.png')") == "cell_0001.png"
    assert page.evaluate("shortId('P001/cell_002.png')") == "P001/cell_002.png"
    page.screenshot(path=str(ARTIFACTS / "latent_picked.png"), full_page=True)
    # the image page: picker lists short ids, the chosen cell's image loads
    page.goto(url + "#/image?dataset=sample")
    page.wait_for_selector("#image-list button")
    buttons = page.eval_on_selector_all("#image-list button", "els => els.map(b => [b.innerText, b.title])")
    assert len(buttons) == 12 and all(title in ids and title.endswith(text.split(" · ")[0]) for text, title in buttons)
    page.click("#image-list button")
    page.wait_for_selector("#top-cls button")
    page.wait_for_function("() => { const i = document.querySelector('#image-main .viewer img'); return i.complete && i.naturalWidth > 0; }")
