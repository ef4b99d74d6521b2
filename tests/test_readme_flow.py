"""The README's "Using it, step by step" commands, run as written, then the run opened by the explorer (API and
Chromium) and the static report; the same after the run is copied elsewhere and its data moved."""
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
from fastapi.testclient import TestClient

from cytosae.explorer import create_app

REPO = Path(__file__).resolve().parents[1]
CYTOSAE = str(Path(sys.executable).parent / "cytosae")
pytestmark = pytest.mark.slow


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    block = re.search(r"## Using it, step by step.*?```bash\n(.*?)```", text, re.S).group(1)
    return [line.split("#")[0].strip() for line in block.splitlines() if line.startswith("cytosae ")]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _explore(argv: list[str], cwd: Path) -> tuple[subprocess.Popen, str]:
    """`cytosae explore ...` as a user starts it (on a free port), up and answering."""
    port = _port()
    proc = subprocess.Popen([CYTOSAE, *argv, "--port", str(port)], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    for _ in range(600):
        try:
            urllib.request.urlopen(url + "api/run", timeout=1).read()
            return proc, url
        except OSError:
            if proc.poll() is not None:
                raise AssertionError(f"explore exited: {proc.stdout.read()}")
            time.sleep(0.1)
    raise AssertionError("explore did not answer within 60 s")


def _stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def readme_run(tmp_path_factory):
    """The README's commands run one by one in an empty folder, exactly as printed (explore is served below)."""
    cwd = tmp_path_factory.mktemp("readme")
    commands = readme_commands()
    assert [c.split()[1] for c in commands] == ["sample", "extract", "train", "evaluate", "stats", "patients",
                                                "align", "classify", "report", "explore"]
    for line in commands[:-1]:
        r = subprocess.run([CYTOSAE, *shlex.split(line)[1:]], cwd=cwd, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, (line, r.stdout[-2000:], r.stderr[-3000:])
        assert "Traceback" not in r.stderr, line
    return cwd, shlex.split(commands[-1])[1:]


def _a_shown_image(run: Path) -> tuple[int, str]:
    tops = pd.read_parquet(run / "stats" / "top_images.parquet")
    row = tops[(tops.by == "image") & (tops["rank"] == 0)].iloc[0]
    return int(row.latent), str(row.image_id)


def _check_api(run: Path, data_roots=()) -> None:
    latent, image_id = _a_shown_image(run)
    with TestClient(create_app(run, data_roots=list(data_roots)), base_url="http://127.0.0.1") as c:
        info = c.get("/api/run").json()
        assert str(run.parent) not in str(info)  # no absolute server paths
        assert c.get(f"/api/latents/{latent}").status_code == 200
        r = c.get("/api/image/file", params={"dataset": "sample", "image_id": image_id})
        assert r.status_code == 200 and r.headers["content-type"] == "image/png", r.text
        assert c.get("/api/patients/barcodes").status_code == 200
        assert c.get("/api/classify").json()["models"]


def _check_browser(url: str, run: Path, shots: str) -> None:
    pytest.importorskip("playwright")
    from test_explorer_browser import ARTIFACTS, CHROMIUM, LAUNCH

    if not CHROMIUM.exists():
        pytest.skip("needs /usr/bin/chromium")
    from playwright.sync_api import sync_playwright

    latent, image_id = _a_shown_image(run)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(**LAUNCH)
        page = browser.new_page(viewport={"width": 1300, "height": 900})
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url)
        page.wait_for_selector("#scatter")
        page.goto(url + f"#/latent/{latent}")
        page.wait_for_function("() => document.querySelectorAll('#top-images img').length && [...document."
                               "querySelectorAll('#top-images img')].every(i => i.complete && i.naturalWidth === 224)")
        page.screenshot(path=str(ARTIFACTS / f"{shots}_latent.png"), full_page=True)
        page.goto(url + f"#/image?dataset=sample&id={image_id}")
        page.wait_for_selector("#image-canvas")
        page.wait_for_selector("#top-cls button")
        page.goto(url + "#/patients")
        page.wait_for_selector("#barcodes canvas")
        page.wait_for_selector("#classify-table")
        page.screenshot(path=str(ARTIFACTS / f"{shots}_patients.png"), full_page=True)
        browser.close()
    assert not errors, errors


def test_readme_commands_make_a_run_the_explorer_and_report_open(readme_run):
    cwd, explore_argv = readme_run
    run = cwd / "run"
    meta = (run / "run.json").read_text()
    for step in ("extract:sample", "train", "evaluate", "stats", "patients", "align", "classify"):
        assert f'"{step}"' in meta
    assert (cwd / "site" / "index.html").is_file() and len(list((cwd / "site").rglob("*"))) > 20
    _check_api(run)
    proc, url = _explore(explore_argv, cwd)
    try:
        assert urllib.request.urlopen(url).status == 200
        _check_browser(url, run, "readme")
    finally:
        _stop(proc)


def test_a_copied_run_with_moved_data_still_shows_its_cells(readme_run, tmp_path):
    cwd, _ = readme_run
    shutil.copytree(cwd / "run", tmp_path / "elsewhere" / "run")
    moved = tmp_path / "elsewhere" / "images"
    shutil.copytree(cwd / "data" / "sample", moved)
    run = tmp_path / "elsewhere" / "run"
    _check_api(run)  # the data is still where it was: found through the recorded data root
    hidden = cwd / "data" / "sample.hidden"
    os.rename(cwd / "data" / "sample", hidden)  # now the original data is gone
    try:
        latent, image_id = _a_shown_image(run)
        with TestClient(create_app(run), base_url="http://127.0.0.1") as c:
            r = c.get("/api/image/file", params={"dataset": "sample", "image_id": image_id})
            assert r.status_code == 404 and "--data-root" in r.json()["detail"]
        _check_api(run, data_roots=[str(moved)])
        _check_api(run, data_roots=[f"sample={moved}"])
        r = subprocess.run([CYTOSAE, "report", str(run), "--out", str(tmp_path / "site"), "--data-root", str(moved)],
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        assert len(list((tmp_path / "site").rglob("*.png"))) == len(list((cwd / "site").rglob("*.png")))
        proc, url = _explore(["explore", str(run), "--data-root", str(moved)], tmp_path)
        try:
            _check_browser(url, run, "copied")
        finally:
            _stop(proc)
    finally:
        os.rename(hidden, cwd / "data" / "sample")
