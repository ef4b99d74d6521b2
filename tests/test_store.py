"""Activation store: extract (skips, resume, exactness), reader, import."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from cytosae import load_backbone
from cytosae.data import load_manifest
from cytosae.store import ActivationStore, ExtractConfig, extract, import_embeddings

from kill_helpers import kill_after_first_shard

REPO = Path(__file__).resolve().parents[1]
TINY = dict(depth=3)  # a 3-block DinoBloom-S: same tokens and width, a quarter of the compute


def _write_images(root: Path, n: int, corrupt: tuple[int, ...] = ()) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        cls = ["neutrophil", "lymphocyte"][i % 2]
        (root / cls).mkdir(parents=True, exist_ok=True)
        path = root / cls / f"cell_{i:03d}.png"
        if i in corrupt:
            path.write_bytes(b"this is not an image")
        else:
            Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(path)
    return root


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """Random but fixed weights on disk, so separate processes load the same backbone."""
    torch.manual_seed(0)
    bb = load_backbone("dinobloom-s", **TINY)
    path = tmp_path_factory.mktemp("w") / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in bb.model.state_dict().items()}, path)
    return path


@pytest.fixture(scope="module")
def backbone(weights):
    return load_backbone("dinobloom-s", weights=weights, **TINY)


def test_extract_writes_tokens_manifest_and_skips_corrupt(tmp_path, backbone):
    data = _write_images(tmp_path / "data", 7, corrupt=(3,))
    manifest = load_manifest(data)
    res = extract(manifest, backbone, tmp_path / "store", ExtractConfig(dtype="float32", batch_size=2, shard_size=4, progress=False))
    assert (res.n_images, res.n_skipped, res.n_shards) == (6, 1, 2)

    meta = json.loads((tmp_path / "store" / "manifest.json").read_text())
    assert meta["complete"] and meta["n_tokens"] == 257 and meta["d_model"] == 384 and meta["grid"] == 16
    s = meta["settings"]
    assert s["backbone"] == "dinobloom-s" and s["layer"] == -2 and s["layer_index"] == 1 and s["dtype"] == "float32"
    assert len(s["weights_sha256"]) == 64 and s["preprocessing"]["resize"] == "squash"

    skipped = pd.read_csv(tmp_path / "store" / "skipped.csv")
    assert len(skipped) == 1 and skipped.path[0].endswith("cell_003.png") and skipped.reason[0]

    store = ActivationStore(tmp_path / "store")
    expected_ids = [i for i in manifest.image_id if not i.endswith("cell_003.png")]
    assert store.image_ids == expected_ids and list(store.images.image_id) == expected_ids
    assert store.images.label.tolist() == [i.split("/")[0] for i in expected_ids]

    # Stored tokens are exactly what the backbone computes for that image.
    row = manifest.set_index("image_id").loc[expected_ids[4]]
    x = backbone.preprocess(Image.open(row.path).convert("RGB"))[None]
    torch.testing.assert_close(store.get_image(expected_ids[4]), backbone.tokens(x, layer=-2)[0], atol=1e-5, rtol=0)


def test_reader_token_selections_and_batches(tmp_path):
    arr = np.arange(5 * 5 * 3, dtype=np.float32).reshape(5, 5, 3)  # 5 images, CLS + 2x2 patches, d=3
    manifest = pd.DataFrame({"image_id": [f"img{i}" for i in range(5)], "label": list("aabba")})
    np.save(tmp_path / "a.npy", arr)
    store = ActivationStore(import_embeddings(tmp_path / "a.npy", manifest, tmp_path / "s", dtype="float32", shard_size=2))
    assert (store.n_images, store.n_tokens, store.d_model, store.grid) == (5, 5, 3, 2)
    all_rows = torch.cat(list(store.iter_tokens("all", batch_size=7)))
    assert all_rows.shape == (25, 3) and torch.equal(all_rows, torch.from_numpy(arr.reshape(-1, 3)))
    assert [b.shape[0] for b in store.iter_tokens("all", batch_size=7)] == [7, 7, 7, 4]
    cls = torch.cat(list(store.iter_tokens("cls", batch_size=2)))
    assert torch.equal(cls, torch.from_numpy(arr[:, 0]))
    patch = torch.cat(list(store.iter_tokens("patch", batch_size=3)))
    assert torch.equal(patch, torch.from_numpy(arr[:, 1:].reshape(-1, 3)))
    ids, block = next(store.iter_images(batch_size=10))
    assert ids == ["img0", "img1"] and block.shape == (2, 5, 3)  # batches stop at shard ends
    assert torch.equal(store.get_image("img3"), torch.from_numpy(arr[3]))
    with pytest.raises(KeyError, match="nope"):
        store.get_image("nope")
    with pytest.raises(ValueError, match="tokens must be"):
        next(store.iter_tokens("cls+patch"))


def test_import_validates_inputs(tmp_path):
    manifest = pd.DataFrame({"image_id": ["a", "b"]})
    np.save(tmp_path / "bad.npy", np.zeros((3, 4), np.float32))
    with pytest.raises(ValueError, match="3 rows but the manifest lists 2"):
        import_embeddings(tmp_path / "bad.npy", manifest, tmp_path / "s")
    save_file({"x": torch.zeros(2, 4), "y": torch.zeros(2, 4)}, tmp_path / "two.safetensors")
    with pytest.raises(ValueError, match="say which one with --key"):
        import_embeddings(tmp_path / "two.safetensors", manifest, tmp_path / "s")
    out = import_embeddings(tmp_path / "two.safetensors", manifest, tmp_path / "s", key="y")
    store = ActivationStore(out)
    assert (store.n_tokens, store.grid, store.has_cls) == (1, None, True)
    with pytest.raises(FileNotFoundError, match="is not an activation store"):
        ActivationStore(tmp_path)


def test_resume_after_interruption_is_identical(tmp_path, backbone):
    data = _write_images(tmp_path / "data", 10, corrupt=(5,))
    manifest = load_manifest(data)
    cfg = ExtractConfig(batch_size=2, shard_size=4, progress=False, num_workers=0)
    extract(manifest, backbone, tmp_path / "full", cfg)

    calls = {"n": 0}
    real_tokens = backbone.tokens

    def dying_tokens(x, layer, **kw):
        calls["n"] += 1
        if calls["n"] == 4:  # in the middle of the second shard
            raise KeyboardInterrupt
        return real_tokens(x, layer=layer, **kw)

    backbone.tokens = dying_tokens
    try:
        with pytest.raises(KeyboardInterrupt):
            extract(manifest, backbone, tmp_path / "resumed", cfg)
    finally:
        backbone.tokens = real_tokens
    with pytest.raises(ValueError, match="incomplete"):
        ActivationStore(tmp_path / "resumed")
    res = extract(manifest, backbone, tmp_path / "resumed", cfg)
    assert res.shards_reused == 1
    for name in ["shard_00000.safetensors", "shard_00001.safetensors", "shard_00002.safetensors", "skipped.csv"]:
        assert (tmp_path / "full" / name).read_bytes() == (tmp_path / "resumed" / name).read_bytes(), name
    assert ActivationStore(tmp_path / "resumed").image_ids == ActivationStore(tmp_path / "full").image_ids

    with pytest.raises(ValueError, match="different settings.*layer"):
        extract(manifest, backbone, tmp_path / "full", ExtractConfig(layer=-1, batch_size=2, shard_size=4, progress=False))


KILL_SCRIPT = """
import sys, time
from cytosae import load_backbone
from cytosae.data import load_manifest
from cytosae.store import ExtractConfig, extract
bb = load_backbone("dinobloom-s", weights=sys.argv[1], depth=3)
real = bb.tokens
def slow(x, layer, **kw):
    time.sleep(float(sys.argv[4]))  # give the test time to kill us mid-run
    return real(x, layer=layer, **kw)
bb.tokens = slow
extract(load_manifest(sys.argv[2]), bb, sys.argv[3], ExtractConfig(batch_size=2, shard_size=4, progress=False, num_workers=1))
"""


@pytest.mark.slow
def test_sigkill_then_rerun_matches_uninterrupted(tmp_path, weights):
    data = _write_images(tmp_path / "data", 12)
    script = tmp_path / "run.py"
    script.write_text(KILL_SCRIPT)
    subprocess.run([sys.executable, str(script), str(weights), str(data), str(tmp_path / "full"), "0"], check=True)

    kill_after_first_shard([sys.executable, str(script), str(weights), str(data), str(tmp_path / "killed"), "0.3"], tmp_path / "killed")

    subprocess.run([sys.executable, str(script), str(weights), str(data), str(tmp_path / "killed"), "0"], check=True)
    for name in ["shard_00000.safetensors", "shard_00001.safetensors", "shard_00002.safetensors", "images.parquet"]:
        assert (tmp_path / "full" / name).read_bytes() == (tmp_path / "killed" / name).read_bytes(), name
