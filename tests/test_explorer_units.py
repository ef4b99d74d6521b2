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
from cytosae.explorer.sae_adapter import _MinimalSAE, read_decoder
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


def test_sae_adapter_topk_and_decoder_orientation(tmp_path):
    rng = np.random.default_rng(1)
    d, n = 8, 20
    w_enc = rng.normal(size=(d, n)).astype(np.float32)
    save_file({"W_enc": w_enc, "b_enc": np.zeros(n, np.float32), "W_dec": w_enc.copy(), "b_dec": np.zeros(d, np.float32)},
              str(tmp_path / "sae.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"arch": "topk", "d_in": d, "n_latents": n, "k": 3}))
    sae = _MinimalSAE(tmp_path)
    x = torch.from_numpy(rng.normal(size=(5, d)).astype(np.float32))
    z = sae.encode(x)
    assert ((z > 0).sum(1) <= 3).all()
    pre = np.maximum(x.numpy() @ w_enc, 0)
    for r in range(5):
        top = np.argsort(-pre[r])[:3]
        assert np.allclose(z[r, top].numpy(), pre[r, top], atol=1e-5)
    assert torch.allclose(sae.encode_latent(x, 4), z[:, 4])
    assert read_decoder(tmp_path).shape == (n, d)  # W_dec saved as (d, n): transposed to rows


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


def test_explore_command_serves_and_prints_url(tmp_path):
    from explorer_fixtures import make_run
    import socket
    import httpx
    fx = make_run(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "cytosae.cli", "explore", str(fx.path), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = proc.stdout.readline()
        assert f"http://127.0.0.1:{port}/" in line
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


def test_preload_fills_the_caches(tmp_path):
    from cytosae.explorer.state import Explorer
    from explorer_fixtures import make_run
    fx = make_run(tmp_path)
    ex = Explorer(fx.path)
    ex.preload().join(timeout=30)
    assert {"latents_idx", "stats/top_images", "patients/barcodes"} <= set(ex.run._cache)
    assert ex.neighbours._n is not None and ex.neighbours._n.n_latents == fx.n_latents
