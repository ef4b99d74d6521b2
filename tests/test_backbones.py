"""Backbones: exactness against Meta's reference DINOv2, checkpoint layouts, errors, download."""
import hashlib
import http.server
import threading
from functools import partial
from pathlib import Path

import pytest
import torch

from cytosae.backbones import download_weights, load_backbone
from cytosae.backbones import download as dl
from cytosae.data import Preprocess, load_manifest, open_rgb

dinov2_vit = pytest.importorskip("dinov2.models.vision_transformer", reason="test dependency dinov2 not installed")


def _reference(block_chunks=0, img_size=224):
    torch.manual_seed(0)
    ref = dinov2_vit.vit_small(patch_size=14, img_size=img_size, init_values=1.0, block_chunks=block_chunks).eval()
    with torch.no_grad():  # every tensor random, so a wrongly mapped key cannot hide behind default init
        for name, p in ref.named_parameters():
            p.copy_(torch.randn_like(p) * (0.02 if p.ndim > 1 else 0.1) + (1.0 if "norm" in name and "weight" in name else 0.0))
    return ref


def _reference_tokens(ref, x, layer_index):
    h = ref.prepare_tokens_with_masks(x)
    # chunked models hold BlockChunk lists padded with Identity; flatten to the real blocks
    blocks = [b for chunk in ref.blocks for b in (chunk if ref.chunked_blocks else [chunk])
              if not isinstance(b, torch.nn.Identity)]
    with torch.no_grad():
        for blk in blocks[: layer_index + 1]:
            h = blk(h)
    return h


def _images(shared_root: Path, n=3):
    acevedo = shared_root / "acevedo" / "manifest.csv"
    if acevedo.is_file():
        m = load_manifest(acevedo).iloc[::400][:n]
        return torch.stack([Preprocess()(open_rgb(p)) for p in m.path]), "real Acevedo images"
    torch.manual_seed(1)
    return torch.randn(n, 3, 224, 224), "random tensors"


SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


@pytest.mark.parametrize("block_chunks", [0, 4])
def test_dinobloom_layout_matches_reference_dinov2(tmp_path, block_chunks):
    ref = _reference(block_chunks)
    sd = {"backbone." + k: v for k, v in ref.state_dict().items()}
    sd["dino_head.mlp.0.weight"] = torch.zeros(8, 384)
    sd["ibot_head.mlp.0.weight"] = torch.zeros(8, 384)
    path = tmp_path / "dinobloom-s.pth"
    torch.save({"teacher": sd, "iteration": 1}, path)

    bb = load_backbone("dinobloom-s", weights=path)
    x, what = _images(SHARED)
    ours = bb.tokens(x, layer=-2)
    theirs = _reference_tokens(ref, x, 10)
    assert ours.shape == (len(x), 257, 384)
    diff = (ours - theirs).abs().max().item()
    print(f"max |diff| block -2 tokens vs reference DINOv2 on {len(x)} {what}: {diff:.2e}")
    assert diff < 1e-4
    assert bb.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest() and not bb.random_weights


def test_meta_pretrain_layout_518_pos_embed_is_resampled_like_dinov2(tmp_path):
    ref = _reference(0, img_size=518)
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(ref.state_dict(), path)
    bb = load_backbone("dinobloom-s", weights=path)
    x, _ = _images(SHARED, n=2)
    diff = (bb.tokens(x, layer=-2) - _reference_tokens(ref, x, 10)).abs().max().item()
    assert diff < 1e-4, diff


def test_wrong_checkpoint_names_missing_keys_and_shapes(tmp_path):
    ref = _reference()
    path = tmp_path / "small.pth"
    torch.save(ref.state_dict(), path)
    with pytest.raises(ValueError, match=r"(?s)does not fit vit_base_patch14_dinov2.*shape mismatches"):
        load_backbone("dinobloom-b", weights=path)
    sd = ref.state_dict()
    del sd["norm.weight"]
    torch.save(sd, path)
    with pytest.raises(ValueError, match=r"missing keys \(1\): \['norm.weight'\]"):
        load_backbone("dinobloom-s", weights=path)


def test_tokens_layer_and_random_warning():
    with pytest.warns(UserWarning, match="RANDOM weights"):
        bb = load_backbone("dinobloom-s", depth=3)
    assert (bb.n_blocks, bb.n_tokens, bb.grid, bb.embed_dim) == (3, 257, 16, 384) and bb.random_weights
    x = torch.randn(1, 3, 224, 224)
    assert not torch.equal(bb.tokens(x, layer=-2), bb.tokens(x, layer=-1))
    assert torch.equal(bb.tokens(x, layer=-2), bb.tokens(x, layer=1))
    with pytest.raises(ValueError, match="out of range.*valid -3..2"):
        bb.tokens(x, layer=3)
    with pytest.raises(ValueError, match="unknown backbone"):
        load_backbone("no-such-vit")


def test_download_verifies_caches_and_explains_failures(tmp_path, monkeypatch):
    served = tmp_path / "served"
    served.mkdir()
    payload = b"fake weights " * 1000
    (served / "DinoBloom-S.pth").write_bytes(payload)
    requests = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **k):
            super().__init__(*a, directory=str(served), **k)

        def log_message(self, *args):
            pass

        def do_GET(self):
            requests.append(self.path)
            super().do_GET()

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        cache = tmp_path / "cache"
        good = hashlib.sha256(payload).hexdigest()
        monkeypatch.setitem(dl.WEIGHT_FILES, "dinobloom-s", ("DinoBloom-S.pth", "0" * 64))
        with pytest.raises(ValueError, match="does not match"):
            download_weights("dinobloom-s", cache=cache, base_url=url)
        assert not any(cache.iterdir())  # nothing half-written left in the cache

        monkeypatch.setitem(dl.WEIGHT_FILES, "dinobloom-s", ("DinoBloom-S.pth", good))
        path = download_weights("dinobloom-s", cache=cache, base_url=url)
        assert path.read_bytes() == payload and len(requests) == 2
        assert download_weights("dinobloom-s", cache=cache, base_url=url) == path and len(requests) == 2  # cache hit

        monkeypatch.setitem(dl.WEIGHT_FILES, "dinobloom-b", ("DinoBloom-B.pth", None))
        with pytest.raises(ConnectionError, match=r"place it at .*DinoBloom-B.pth"):
            download_weights("dinobloom-b", cache=cache, base_url=url)  # 404
        assert sorted(p.name for p in cache.iterdir()) == ["DinoBloom-S.pth"]
    finally:
        httpd.shutdown()
