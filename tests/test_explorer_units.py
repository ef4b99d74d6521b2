"""Explorer building blocks: path safety, latent-indexed tables, neighbours, SAE adapter, upload decoding, CLI."""
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors.numpy import save_file

from cytosae.explorer.imaging import InvalidImage, decode_upload, model_view
from cytosae.explorer.neighbours import Neighbours
from cytosae.explorer.safety import OutsideRoots, is_safe_name, resolve_inside
from cytosae.explorer.sae_adapter import read_decoder
from cytosae.explorer.tables import LatentIndexed

REPO = Path(__file__).resolve().parents[1]


def test_resolve_inside_refuses_traversal_absolute_and_symlinks(tmp_path):
    root = tmp_path / "data"
    (root / "a").mkdir(parents=True)
    (root / "a" / "x.png").write_bytes(b"x")
    (tmp_path / "secret.txt").write_text("s")
    os.symlink(tmp_path / "secret.txt", root / "a" / "link.png")
    os.symlink(root / "a" / "x.png", root / "inner_link.png")
    assert resolve_inside(root / "a" / "x.png", [root]) == (root / "a" / "x.png").resolve()
    assert resolve_inside(root / "inner_link.png", [root]) == (root / "a" / "x.png").resolve()  # symlink staying inside
    for bad in [root / ".." / "secret.txt", tmp_path / "secret.txt", root / "a" / "link.png", Path("/etc/passwd"),
                root.parent / "data_evil" / "x"]:
        with pytest.raises(OutsideRoots):
            resolve_inside(bad, [root])
    assert not is_safe_name("..") and not is_safe_name("a/b") and not is_safe_name("") and is_safe_name("mll_2024")


def test_latent_indexed_slices_one_latent():
    df = pd.DataFrame({"latent": [5, 1, 5, 3, 1], "dataset": ["b", "a", "a", "a", "b"], "v": [0, 1, 2, 3, 4]})
    t = LatentIndexed(df, ["dataset"])
    assert t.rows(5)["v"].tolist() == [2, 0] and t.rows(1)["dataset"].tolist() == ["a", "b"]
    assert t.rows(2).empty and t.rows(10**12).empty


def test_neighbours_match_brute_force_and_handle_dead_rows():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(300, 16)).astype(np.float32)
    w[7] = 0  # a dead latent has no direction: similarity 0 to everything, never NaN
    nb = Neighbours(w)
    unit = w / np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-12)
    sims = unit @ unit[3]
    sims[3] = -np.inf
    got = nb.query(3, 5)
    assert [j for j, _ in got] == list(np.argsort(-sims)[:5])
    assert np.allclose([s for _, s in got], np.sort(sims)[::-1][:5], atol=1e-5)
    assert all(np.isfinite(s) for _, s in nb.query(7, 3))
    assert nb.query(3, 5) is got  # memoised


def test_sae_adapter_is_the_package_sae_and_reads_decoder_rows(tmp_path):
    """The explorer encodes with cytosae.sae.SAE itself (input scale, thresholds), not a copy of the encoder."""
    from cytosae.explorer.sae_adapter import load_sae
    from cytosae.sae import SAE, SAEConfig

    torch.manual_seed(0)
    sae = SAE(SAEConfig(arch="jumprelu", d_in=8, n_latents=20))
    with torch.no_grad():
        sae.input_scale.fill_(0.25)
        sae.log_threshold.copy_(torch.rand(20).log())
        sae.b_enc.normal_()
    sae.save(tmp_path)
    got = load_sae(tmp_path)
    assert isinstance(got, SAE) and type(got).arch == "jumprelu" and not got.training
    x = torch.randn(5, 8) * 4
    assert torch.equal(got.encode(x), sae.eval().encode(x))
    assert read_decoder(tmp_path).shape == (20, 8)
    # SAE files from another tool are refused with the reason, not read by a second encoder
    save_file({"W_enc": np.zeros((8, 20), np.float32), "W_dec": np.zeros((20, 8), np.float32)},
              str(tmp_path / "sae.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"arch": "topk", "d_in": 8, "n_latents": 20, "k": 3}))
    with pytest.raises(ValueError, match="format_version"):
        load_sae(tmp_path)


@pytest.mark.parametrize("resize", ["squash", "pad", "crop"])
@pytest.mark.parametrize("size", [(300, 180), (90, 160)])
def test_model_view_is_the_model_input(resize, size):
    """What the explorer shows is exactly what the backbone got, de-normalised (one preprocessing, cytosae.data)."""
    from cytosae.data import Preprocess

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    pre = Preprocess(size=224, resize=resize)
    x = pre(img)
    model_input = (x * torch.tensor(pre.std)[:, None, None] + torch.tensor(pre.mean)[:, None, None]).permute(1, 2, 0)
    view = np.asarray(model_view(img, pre.to_dict()), dtype=np.float32) / 255.0
    assert view.shape == (224, 224, 3)
    assert np.abs(view - model_input.numpy()).max() < 1e-5


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "TIFF", "BMP", "WEBP"])
def test_decode_upload_accepts_image_formats(fmt):
    buf = io.BytesIO()
    Image.new("RGB", (60, 40), (10, 200, 30)).save(buf, format=fmt)
    img = decode_upload(buf.getvalue())
    assert img.mode == "RGB" and img.size == (60, 40)
    assert model_view(img, {"size": 224, "resize": "pad"}).size == (224, 224)


def test_decode_upload_refuses_other_formats_and_truncation():
    buf = io.BytesIO()
    Image.new("RGB", (60, 40)).save(buf, format="GIF")
    with pytest.raises(InvalidImage, match="format GIF"):
        decode_upload(buf.getvalue())
    png = io.BytesIO()
    Image.new("RGB", (300, 300), (1, 2, 3)).save(png, format="PNG")
    with pytest.raises(InvalidImage, match="not a readable image"):
        decode_upload(png.getvalue()[: len(png.getvalue()) // 2])


def test_explore_command_serves_and_prints_url(tmp_path_factory):
    from explorer_fixtures import session_run
    from server_helpers import wait_for_line
    import socket
    import httpx
    fx = session_run(tmp_path_factory)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "cytosae.cli", "explore", str(fx.path), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line, before = wait_for_line(proc, f"http://127.0.0.1:{port}/")
        assert line.startswith("cytosae explorer for ") and not before, before  # nothing (no warning) before it
        for _ in range(100):
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/api/run", timeout=2)
                break
            except httpx.ConnectError:
                time.sleep(0.1)
        assert r.status_code == 200 and r.json()["n_latents"] == fx.n_latents
        page = httpx.get(f"http://127.0.0.1:{port}/").text
        assert "static/app.js" in page and "https://" not in page  # no CDN
        assert httpx.get(f"http://127.0.0.1:{port}/static/app.js").status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_explore_command_rejects_non_run(tmp_path):
    r = subprocess.run([sys.executable, "-m", "cytosae.cli", "explore", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 2 and "no run.json" in r.stderr


def test_preload_fills_the_caches(tmp_path_factory):
    from cytosae.explorer.state import Explorer
    from explorer_fixtures import session_run
    fx = session_run(tmp_path_factory)
    ex = Explorer(fx.path)
    ex.preload().join(timeout=30)
    assert {"latents_idx", "stats/top_images", "patients/barcodes"} <= set(ex.run._cache)
    assert ex.neighbours._n is not None and ex.neighbours._n.n_latents == fx.n_latents


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_explore_device_cuda_without_cuda_is_one_line_error(tmp_path_factory):
    from explorer_fixtures import session_run
    fx = session_run(tmp_path_factory)
    r = subprocess.run([sys.executable, "-m", "cytosae.cli", "explore", str(fx.path), "--device", "cuda"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "no CUDA GPU is available" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_explorer_encodes_on_cuda_like_on_cpu(tmp_path_factory):
    from cytosae.explorer.state import Explorer
    from explorer_fixtures import session_run
    fx = session_run(tmp_path_factory)
    cpu, gpu = Explorer(fx.path, device="cpu"), Explorer(fx.path, device="cuda")
    image_id = "neutrophil/cell_03.png"
    a, b = cpu.encoder.for_store_image("acevedo", image_id), gpu.encoder.for_store_image("acevedo", image_id)
    assert next(gpu.encoder.sae.parameters()).is_cuda
    assert np.allclose(a.acts.toarray(), b.acts.toarray(), atol=1e-4)


def test_precomputed_neighbours_equal_the_query():
    rng = np.random.default_rng(2)
    w = rng.normal(size=(700, 24)).astype(np.float32)
    w[5] = 0
    direct = Neighbours(w)
    pre = Neighbours(w)
    pre.precompute(k=12, block=128)  # several blocks, last one partial
    for latent in (0, 5, 129, 699):
        a, b = direct.query(latent, 10), pre.query(latent, 10)
        assert [j for j, _ in a] == [j for j, _ in b] or latent == 5  # a dead row ties everything at 0
        assert np.allclose([s for _, s in a], [s for _, s in b], atol=1e-5)
    assert len(pre.query(3, 40)) == 40  # more than were precomputed: the direct product


def test_explore_and_report_read_the_sae_once(tmp_path_factory, tmp_path, monkeypatch):
    """The CLI checks the SAE (checksum, finished) and hands that object on: the weights are read and hashed once."""
    import uvicorn
    from typer.testing import CliRunner

    from cytosae.cli import app
    from cytosae.sae import SAE
    from explorer_fixtures import session_run

    fx = session_run(tmp_path_factory)
    loads, served = [], []
    load = SAE.load.__func__
    monkeypatch.setattr(SAE, "load", classmethod(lambda cls, d, *a, **k: loads.append(Path(d)) or load(cls, d, *a, **k)))
    monkeypatch.setattr(uvicorn, "run", lambda web, **_: served.append(web))
    r = CliRunner().invoke(app, ["explore", str(fx.path)])
    assert r.exit_code == 0, r.output
    assert not served[0].state.explorer._preloading.is_alive()  # stopped and waited for when the server returned
    encoder = served[0].state.explorer.encoder
    assert encoder.for_store_image("acevedo", "neutrophil/cell_03.png").acts.shape[1] == fx.n_latents
    assert len(loads) == 1 and encoder.sae.cfg.n_latents == fx.n_latents
    loads.clear()
    r = CliRunner().invoke(app, ["report", str(fx.path), "--out", str(tmp_path / "site"), "--latents", "2",
                                 "--images", "1"])
    assert r.exit_code == 0, r.output
    assert len(loads) == 1 and (tmp_path / "site" / "index.html").is_file()


def test_the_app_and_its_schema_build_without_a_single_warning(tmp_path_factory):
    """A warning from a model definition (pydantic's UnsupportedFieldAttributeWarning, once the first line
    `cytosae explore` printed) is fixed where the model is defined: here every warning is an error."""
    import warnings

    from cytosae.explorer import create_app
    from explorer_fixtures import session_run
    fx = session_run(tmp_path_factory)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        app = create_app(fx.path)
        schema = app.openapi()
        import cytosae.steps as steps  # the step settings are pydantic models too
        settings = [getattr(steps, n) for n in dir(steps) if n.endswith("Settings") and n != "StepSettings"]
        schemas = [cls.model_json_schema() for cls in settings]
    assert "/api/uploads" in schema["paths"] and len(schemas) >= 6 and all(s["properties"] for s in schemas)
