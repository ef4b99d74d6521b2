"""Expert validation in a real browser (Debian chromium via Playwright): two experts, each blinded to the other,
one resuming after a reload; the agreement the CLI then reports equals Cohen's kappa computed by hand."""
import json
import re

import pandas as pd
import pytest
from typer.testing import CliRunner

from test_explorer_browser import ARTIFACTS, CHROMIUM, LAUNCH, _serve

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium (apt-get install chromium)")]
C, N = "coherent", "not_coherent"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from explorer_fixtures import copy_of, session_run

    fx = copy_of(session_run(tmp_path_factory), tmp_path_factory.mktemp("validate-browser"))
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


def _context(browser):
    """A fresh browser profile (its own localStorage: another expert's machine) that records every API answer."""
    ctx = browser.new_context(viewport={"width": 1300, "height": 900})
    pg = ctx.new_page()
    errors, bodies = [], []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.on("console", lambda m: errors.append(m.text) if m.type == "error" and "status of 404" not in m.text else None)
    pg.on("response", lambda r: bodies.append(r.text()) if "/api/" in r.url and "/image/file" not in r.url else None)
    return ctx, pg, errors, bodies


def _current_latent(pg) -> int:
    pg.wait_for_selector("#v-progress")
    return int(re.search(r"\(#(\d+)\)", pg.inner_text("#v-progress")).group(1))


def _answer(pg, value: str, name: str = "") -> None:
    """Answer the latent on screen and wait for the page to move on (the progress line changes)."""
    before = pg.inner_text("#v-progress") if pg.locator("#v-progress").count() else ""
    if name:
        pg.fill("#v-name", name)
    pg.click("#v-" + value.replace("_", "-"))
    pg.wait_for_function("b => { const p = document.getElementById('v-progress'); return document.getElementById('v-done')"
                         " || (p && p.innerText !== b); }", arg=before)


def test_two_blinded_experts_resume_and_agree(server, browser):
    url, fx = server
    plan = {"Ana": [C, C, N, N], "Bea": [C, N, N, N]}  # by latent id, ascending; kappa by hand below
    names = {"Ana": "ana-concept", "Bea": "bea-concept"}
    seen_orders = {}

    # ---- Ana: starts, answers two latents, reloads, resumes, finishes
    ctx, pg, errors, _ = _context(browser)
    pg.goto(url + "validate")
    pg.fill("#v-expert", "Ana")
    pg.fill("#v-n", "4")
    pg.click("#v-begin")
    first = _current_latent(pg)
    assert pg.inner_text("#v-progress").startswith("Latent 1 of 4")
    # the galleries: the top images load and their overlays are drawn
    pg.wait_for_function("() => [...document.querySelectorAll('#v-images img')].length > 0 && "
                         "[...document.querySelectorAll('#v-images img')].every(i => i.complete && i.naturalWidth === 224)")
    pg.wait_for_function("""() => [...document.querySelectorAll('#v-images canvas.heat')].some(c =>
        c.getContext('2d').getImageData(0, 0, c.width, c.height).data.some((v, i) => i % 4 === 3 && v > 0))""")
    assert "/" not in pg.inner_text("#v-images")  # no image ids (class folders) under the images
    pg.check("#v-desc-toggle")
    pg.wait_for_function("() => document.getElementById('v-desc').innerText.length > 0")
    assert pg.inner_text("#v-desc") == "no description: run cytosae describe"
    pg.screenshot(path=str(ARTIFACTS / "validate.png"), full_page=True)

    order = [first]
    from cytosae.explorer.validation import sample_latents
    pool = pd.read_parquet(fx.path / "stats" / "top_images.parquet")["latent"].unique()
    latents = sorted(sample_latents(pool, 4))
    want = {e: dict(zip(latents, plan[e])) for e in plan}
    _answer(pg, want["Ana"][first], names["Ana"])
    order.append(_current_latent(pg))
    _answer(pg, want["Ana"][order[1]])
    pg.reload()
    assert pg.inner_text("#v-who").startswith("Expert: Ana")  # the name is asked once
    assert pg.inner_text("#v-progress").startswith("Latent 3 of 4") and "2 judged" in pg.inner_text("#v-progress")
    for _ in range(2):
        order.append(_current_latent(pg))
        _answer(pg, want["Ana"][order[-1]])
    pg.wait_for_selector("#v-done")
    assert "All 4 latents judged" in pg.inner_text("#v-done")
    seen_orders["Ana"] = order
    pg.click("#v-review")  # going back shows Ana's own answer
    pg.wait_for_selector("#v-saved")
    assert pg.inner_text("#v-saved") == f"your answer: {want['Ana'][order[-1]].replace('_', ' ')}"
    ctx.close()
    assert not errors, errors

    # ---- descriptions appear (another step writes them); Bea sees them only when she switches them on
    from explorer_fixtures import write_descriptions_for
    write_descriptions_for(fx.path, latents, "granular cytoplasm", "neutrophil")
    ctx, pg, errors, bodies = _context(browser)
    pg.goto(url + "validate")
    pg.fill("#v-expert", "Bea")
    pg.fill("#v-n", "4")
    pg.click("#v-begin")
    order = [_current_latent(pg)]
    assert pg.locator("#v-desc").is_hidden() and "granular" not in pg.inner_text("#app")
    pg.check("#v-desc-toggle")
    pg.wait_for_function("() => document.getElementById('v-desc').innerText.includes('granular')")
    assert pg.inner_text("#v-desc") == "granular cytoplasm (best class: neutrophil)"
    assert pg.locator("#v-saved").count() == 0  # Ana's answer to this latent is not Bea's
    _answer(pg, want["Bea"][order[0]], names["Bea"])
    assert pg.locator("#v-desc").is_hidden()  # blind again on the next latent
    while pg.locator("#v-done").count() == 0:
        order.append(_current_latent(pg))
        _answer(pg, want["Bea"][order[-1]])
    seen_orders["Bea"] = order
    text = pg.inner_text("body") + "".join(bodies)
    for secret in ("Ana", names["Ana"]):
        assert secret not in text, secret  # neither on the page nor in any API answer Bea's browser received
    # the same name on another machine resumes the session (here: a finished one)
    pg.click("#v-switch")
    pg.fill("#v-expert", "Ana")
    pg.fill("#v-n", "2")
    pg.click("#v-begin")
    pg.wait_for_selector("#v-done")
    assert pg.inner_text("#v-msg") == "Welcome back: your session of 4 latents resumes here."
    ctx.close()
    assert not errors, errors

    assert sorted(seen_orders["Ana"]) == sorted(seen_orders["Bea"]) == latents  # one sample, two orders
    from cytosae.cli import app as cli
    res = CliRunner().invoke(cli, ["annotations", "agreement", str(fx.path), "--json"])
    assert res.exit_code == 0, res.output
    s = json.loads(res.output)
    # Ana C C N N, Bea C N N N: p_o = 3/4, p_e = 1/2 * 1/4 + 1/2 * 3/4 = 1/2, kappa = (3/4 - 1/2) / (1 - 1/2) = 1/2
    assert s["kappa"]["method"] == "cohen" and s["kappa"]["value"] == pytest.approx(0.5)
    assert s["experts"] == ["Ana", "Bea"] and s["n_answers"] == 8
    assert s["names_vs_best_class"] == {"compared": 2, "matching": 0, "share": 0.0, "note": None}
