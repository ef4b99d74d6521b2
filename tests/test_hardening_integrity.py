"""Hardening of stores and SAEs on disk (issue #12): checksums, header checks, NaN weights, unfinished training."""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from cytosae.sae import SAE, SAEConfig, train_sae
from cytosae.sae.model import UnfinishedSAE
from cytosae.store import ActivationStore, import_embeddings
from cytosae.store.format import DamagedFile, file_checksum


def _store(tmp_path: Path, n=6, shard_size=2) -> Path:
    arr = np.random.default_rng(0).normal(size=(n, 5, 8)).astype(np.float32)
    manifest = pd.DataFrame({"image_id": [f"img{i}" for i in range(n)]})
    np.save(tmp_path / "emb.npy", arr)
    return import_embeddings(tmp_path / "emb.npy", manifest, tmp_path / "store", dtype="float32", shard_size=shard_size)


def _flip_byte(path: Path, offset_from_end: int = 10) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x01
    path.write_bytes(bytes(data))


def _strip_checksums(store: Path) -> None:
    """The store as a writer from before checksums wrote it: format_version 1, no shard or manifest checksum."""
    meta = json.loads((store / "manifest.json").read_text())
    for s in meta["shards"]:
        s.pop("checksum", None)
    meta.pop("manifest_sha256")
    meta["format_version"] = 1
    (store / "manifest.json").write_text(json.dumps(meta))


def test_shards_record_size_and_sha256(tmp_path):
    store = _store(tmp_path)
    meta = json.loads((store / "manifest.json").read_text())
    for s in meta["shards"]:
        assert s["checksum"] == file_checksum(store / s["file"])
    assert ActivationStore(store).n_images == 6


def test_truncated_shard_is_named_on_open(tmp_path):
    store = _store(tmp_path)
    shard = store / "shard_00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-40])
    with pytest.raises(DamagedFile, match=r"shard_00001.safetensors is damaged: .* bytes where .* were written"):
        ActivationStore(store)
    _strip_checksums(store)  # a store written before checksums: the header check still names the file
    with pytest.raises(DamagedFile, match="shard_00001.safetensors is damaged"):
        ActivationStore(store)


def test_bit_flipped_shard_is_refused_and_old_stores_still_open(tmp_path):
    store = _store(tmp_path)
    _flip_byte(store / "shard_00002.safetensors")
    with pytest.raises(DamagedFile, match="shard_00002.safetensors is damaged: its sha256 differs"):
        ActivationStore(store)
    ActivationStore(store, verify=False)  # size only: the flip is not seen without reading the data
    _strip_checksums(store)
    assert ActivationStore(store).n_images == 6  # no checksums recorded: opens as before


def test_resume_recomputes_a_damaged_shard(tmp_path):
    from cytosae import load_backbone
    from cytosae.data import load_manifest
    from cytosae.store import ExtractConfig, extract
    from cytosae.store.format import write_manifest
    from PIL import Image

    rng = np.random.default_rng(0)
    (tmp_path / "data" / "a").mkdir(parents=True)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (30, 30, 3), dtype=np.uint8)).save(tmp_path / "data" / "a" / f"{i}.png")
    manifest = load_manifest(tmp_path / "data")
    bb = load_backbone("dinobloom-s", depth=1)
    cfg = ExtractConfig(layer=-1, batch_size=2, shard_size=2, progress=False, num_workers=0)
    extract(manifest, bb, tmp_path / "full", cfg)
    meta = json.loads((tmp_path / "full" / "manifest.json").read_text())
    # a run killed after three shards whose second shard was then damaged
    out = tmp_path / "resumed"
    out.mkdir()
    for s in meta["shards"]:
        (out / s["file"]).write_bytes((tmp_path / "full" / s["file"]).read_bytes())
    meta["complete"] = False
    write_manifest(out, meta)  # as the writer leaves it after a kill
    _flip_byte(out / "shard_00001.safetensors")
    res = extract(manifest, bb, out, cfg)
    assert res.shards_reused == 2  # shards 0 and 2 kept; only the damaged shard 1 is computed again
    for s in meta["shards"]:
        assert (out / s["file"]).read_bytes() == (tmp_path / "full" / s["file"]).read_bytes()
    assert ActivationStore(out).n_images == 6


def _sae(tmp_path: Path, arch="topk") -> Path:
    s = SAE(SAEConfig(arch=arch, d_in=8, n_latents=16, k=2))
    return s.save(tmp_path / "sae")


@pytest.mark.parametrize("damage", ["truncated", "empty", "bit-flip"])
def test_damaged_sae_file_is_named(tmp_path, damage):
    d = _sae(tmp_path)
    w = d / "sae.safetensors"
    if damage == "truncated":
        w.write_bytes(w.read_bytes()[:100])
    elif damage == "empty":
        w.write_bytes(b"")
    else:
        _flip_byte(w)
    with pytest.raises(ValueError, match=r"sae.safetensors is damaged"):
        SAE.load(d)
    cfg = json.loads((d / "config.json").read_text())
    # an SAE saved before checksums (format_version 1, no config_sha256): the header check still names the file
    # unless only bits flipped
    del cfg["checksums"], cfg["config_sha256"]
    cfg["format_version"] = 1
    (d / "config.json").write_text(json.dumps(cfg))
    if damage == "bit-flip":
        SAE.load(d)
    else:
        with pytest.raises(ValueError, match=r"sae.safetensors is damaged: not a readable safetensors file"):
            SAE.load(d)


def test_config_checked_against_the_header_before_allocating(tmp_path, monkeypatch):
    d = _sae(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["n_latents"] = 1_000_000
    (d / "config.json").write_text(json.dumps(cfg))

    def no_allocation(*args, **kwargs):
        raise AssertionError("the SAE was allocated before its config was checked against the weights")

    monkeypatch.setattr(SAE, "__init__", no_allocation)
    with pytest.raises(ValueError, match=r"tensor W_enc has shape \(8, 16\) but .*config.json implies \(8, 1000000\)"):
        SAE.load(d)


def test_nan_or_inf_weights_are_refused(tmp_path):
    s = SAE(SAEConfig(arch="relu-l1", d_in=8, n_latents=16))
    with torch.no_grad():
        s.W_dec[3, 2] = float("nan")
        s.b_enc[0] = float("inf")
    s.save(tmp_path / "sae")
    with pytest.raises(ValueError, match=r"tensor (W_dec|b_enc) holds 1 NaN or inf"):
        SAE.load(tmp_path / "sae")


def test_unfinished_training_is_recorded_and_refused_on_request(tmp_path):
    x = torch.randn(2000, 8, generator=torch.Generator().manual_seed(0))
    kw = dict(d_in=8, arch="topk", n_latents=16, total_tokens=2000, batch_size=100, k=2, progress=False,
              checkpoint_dir=tmp_path, checkpoint_every=300)
    train_sae(list(x.split(250)), max_tokens_this_run=900, **kw)
    progress = json.loads((tmp_path / "config.json").read_text())["training"]
    assert progress == {"finished": False, "step": 9, "total_steps": 20, "tokens_seen": 900, "total_tokens": 2000,
                        "data_ended": False}
    assert SAE.load(tmp_path).training_progress["finished"] is False  # the Python API loads it on request ...
    with pytest.raises(UnfinishedSAE, match=r"step 9 of 20 \(900 of 2,000 tokens, 45%\).*--allow-unfinished"):
        SAE.load(tmp_path, require_finished=True)  # ... and refuses it when asked to
    train_sae(list(x.split(250)), **kw)  # resumed to the end
    assert SAE.load(tmp_path, require_finished=True).training_progress["finished"] is True


def test_a_run_whose_data_ran_out_is_an_error_and_its_sae_unfinished(tmp_path):
    """Asking for more tokens than the data holds is an error (train more epochs), and what was saved says so."""
    x = torch.randn(500, 8, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="ran out after 500 of the 2,000 tokens"):
        train_sae(list(x.split(250)), 8, "topk", 16, total_tokens=2000, batch_size=100, k=2, progress=False,
                  checkpoint_dir=tmp_path)
    t = SAE.load(tmp_path).training_progress
    assert (t["finished"], t["data_ended"], t["tokens_seen"], t["total_tokens"]) == (False, True, 500, 2000)
    with pytest.raises(UnfinishedSAE):
        SAE.load(tmp_path, require_finished=True)


def test_damaged_training_state_is_named(tmp_path):
    x = torch.randn(1000, 8, generator=torch.Generator().manual_seed(0))
    kw = dict(d_in=8, arch="topk", n_latents=16, total_tokens=1000, batch_size=100, k=2, progress=False,
              checkpoint_dir=tmp_path, checkpoint_every=300)
    train_sae(list(x.split(250)), max_tokens_this_run=300, **kw)
    _flip_byte(tmp_path / "training_state" / "state.safetensors")
    with pytest.raises(DamagedFile, match=r"training_state/state.safetensors is damaged.*delete .* to restart"):
        train_sae(list(x.split(250)), **kw)


# ---------------------------------------------------------------- manifest.json: schema and its own checksum
def _edits():
    def dup_shard(m): m["shards"].insert(1, m["shards"][0])
    def rename_id(m): m["shards"][0]["image_ids"][0] = "a/not-there.png"
    def dup_id(m): m["shards"][1]["image_ids"][0] = m["shards"][0]["image_ids"][0]
    def short_ids(m): m["shards"][0]["image_ids"].pop()
    def swap_shards(m): m["shards"][0], m["shards"][1] = m["shards"][1], m["shards"][0]
    def grid0(m): m["grid"] = 0
    def no_settings(m): del m["settings"]
    def no_checksum(m): del m["shards"][0]["checksum"]
    def no_shards(m): m["shards"] = []
    def null_shards(m): m["shards"] = None
    def finished_string(m): m["complete"] = "true"
    def n_images_wrong(m): m["n_images"] += 1
    return [dup_shard, rename_id, dup_id, short_ids, swap_shards, grid0, no_settings, no_checksum, no_shards,
            null_shards, finished_string, n_images_wrong]


@pytest.mark.parametrize("edit", _edits(), ids=lambda f: f.__name__)
def test_an_edited_manifest_is_refused_with_one_line_naming_the_file(tmp_path, edit):
    from cytosae.store.schema import seal
    store = _store(tmp_path)
    meta = json.loads((store / "manifest.json").read_text())
    edit(meta)
    (store / "manifest.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"manifest.json: its content differs|manifest.json: field") as raw:
        ActivationStore(store)
    assert "\n" not in str(raw.value)
    # the same edit with a recomputed checksum (or in a store from before checksums) is refused by the schema,
    # or by the images table that no longer matches
    if edit.__name__ != "no_checksum":
        (store / "manifest.json").write_text(json.dumps(seal(meta)))
        with pytest.raises(ValueError, match=r"manifest.json: field|images.parquet does not match") as sealed:
            ActivationStore(store)
        assert "\n" not in str(sealed.value)


def test_a_manifest_that_is_not_an_object_or_not_json_is_one_line(tmp_path):
    store = _store(tmp_path)
    for text in ("[1, 2]", "null", "{", '"store"'):
        (store / "manifest.json").write_text(text)
        with pytest.raises(ValueError, match="manifest.json") as exc:
            ActivationStore(store)
        assert "\n" not in str(exc.value)


def test_a_fresh_store_is_sealed_and_an_old_one_still_opens(tmp_path):
    from cytosae.store.schema import FORMAT_VERSION
    store = _store(tmp_path)
    meta = json.loads((store / "manifest.json").read_text())
    assert meta["format_version"] == FORMAT_VERSION == 2 and len(meta["manifest_sha256"]) == 64
    _strip_checksums(store)
    assert ActivationStore(store).n_images == 6
