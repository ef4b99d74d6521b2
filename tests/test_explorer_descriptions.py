"""Automatic descriptions in the explorer (issue #19 item 2): searchable by their words, on the latent page (and so
in the static report), exported with the annotations. Built by the real `cytosae describe` on a pipeline run."""
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from cytosae.analysis.describe import CONCEPTS, DESCRIPTIONS
from cytosae.cli import app
from cytosae.explorer import create_app
from cytosae.steps import DescribeSettings, run_describe
from explorer_fixtures import make_pipeline_run


@pytest.fixture(scope="module")
def described(tmp_path_factory):
    run = make_pipeline_run(tmp_path_factory.mktemp("explorer-describe"))
    run_describe(DescribeSettings(device="cpu"), run=run)
    table = pd.read_parquet(run / CONCEPTS / DESCRIPTIONS)
    return run, table[table.share_nucleus.notna()].reset_index(drop=True)  # latents that fire: facts to check


def test_latent_page_carries_the_description_line_and_its_facts(described):
    run, table = described
    client = TestClient(create_app(run), base_url="http://127.0.0.1")
    row = table.iloc[0]
    page = client.get(f"/api/latents/{int(row.latent)}").json()
    assert page["description"]["text"] == row.text
    assert page["description"]["share_nucleus"] == pytest.approx(float(row.share_nucleus))


def test_search_finds_latents_by_every_word_of_their_description(described):
    run, table = described
    client = TestClient(create_app(run), base_url="http://127.0.0.1")
    words = table.text.iloc[0].split(",")[0].split()[:2]  # e.g. "nucleus" or "background" and what follows
    q = " ".join(w.upper() for w in words)  # any case
    got = client.get("/api/search", params={"q": q, "limit": 1000}).json()["results"]
    hits = {r["latent"] for r in got if r["match"] == "description"}
    want = {int(j) for j, t in zip(table.latent, table.text) if all(w.lower() in t.lower() for w in words)}
    assert hits == want and int(table.latent.iloc[0]) in hits
    nothing = client.get("/api/search", params={"q": "zebra-unicorn"}).json()["results"]
    assert nothing == []


def test_export_carries_each_annotated_latents_description(described, tmp_path):
    src, table = described
    run = tmp_path / "run"
    shutil.copytree(src, run)
    latent = int(table.latent.iloc[1])
    TestClient(create_app(run), base_url="http://127.0.0.1").put(f"/api/annotations/{latent}", json={"name": "=cmd|x", "author": "ann"})
    res = CliRunner().invoke(app, ["annotations", "export", str(run), "--format", "json", "--out", str(tmp_path / "a.json")])
    assert res.exit_code == 0, res.output
    n_all = len(pd.read_parquet(run / CONCEPTS / DESCRIPTIONS))  # every latent has a line, dead ones too
    assert f"with the descriptions of {n_all} latents" in res.output
    doc = json.loads((tmp_path / "a.json").read_text())
    assert doc["annotations"][0]["description"] == table.text.iloc[1]
    assert len(doc["descriptions"]) == n_all
    res = CliRunner().invoke(app, ["annotations", "export", str(run), "--out", str(tmp_path / "a.csv")])
    assert res.exit_code == 0, res.output
    back = pd.read_csv(tmp_path / "a.csv", keep_default_na=False)
    assert back.description.tolist() == [table.text.iloc[1]] and back.name.tolist() == ["'=cmd|x"]


CHROMIUM = Path("/usr/bin/chromium")


@pytest.mark.browser
@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium (apt-get install chromium)")
def test_the_report_shows_the_description_on_the_latent_page_in_chromium(described, tmp_path):
    from playwright.sync_api import sync_playwright

    from cytosae.explorer.report import build_report

    run, table = described
    res = build_report(run, tmp_path / "site", n_latents=4, n_images=1)
    j = res["latents"][0]
    text = pd.read_parquet(run / CONCEPTS / DESCRIPTIONS).set_index("latent").loc[j, "text"]
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--no-first-run"])
        try:
            pg = b.new_page()
            pg.goto((tmp_path / "site" / "index.html").as_uri() + f"#/latent/{j}")
            pg.wait_for_selector("#latent-description")
            assert text in pg.locator("#latent-description").inner_text()
        finally:
            b.close()
