"""Extraction split over processes (gloo, as torchrun runs it) writes the store one process writes."""
import json

import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from cytosae import load_backbone
from cytosae.data import load_manifest
from cytosae.store import ActivationStore, ExtractConfig, extract

from test_store import TINY, _write_images

CFG = dict(batch_size=2, shard_size=2, progress=False, num_workers=0)


def _worker(rank, world, init_file, weights, data, out, max_seconds):
    torch.set_num_threads(1)  # the same kernels in every process, so the same bits
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        bb = load_backbone("dinobloom-s", weights=weights, **TINY)
        res = extract(load_manifest(data), bb, out, ExtractConfig(max_seconds=max_seconds, **CFG))
        (out.parent / f"{out.name}.rank{rank}.json").write_text(json.dumps({"complete": res.complete,
                                                                           "n_images": res.n_images}))
    finally:
        if world > 1:
            dist.destroy_process_group()


def _run(world, tmp_path, tag, weights, data, out, max_seconds=None):
    mp.spawn(_worker, args=(world, str(tmp_path / f"init-{tag}"), weights, data, out, max_seconds),
             nprocs=world, join=True)
    return [json.loads((out.parent / f"{out.name}.rank{r}.json").read_text()) for r in range(world)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    torch.manual_seed(0)
    bb = load_backbone("dinobloom-s", **TINY)
    weights = tmp / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in bb.model.state_dict().items()}, weights)
    data = _write_images(tmp / "data", 9, corrupt=(4,))  # 5 shards of 2; one image unreadable
    _run(1, tmp, "single", weights, data, tmp / "single")
    return tmp, weights, data


def _assert_same_store(a, b):
    sa, sb = ActivationStore(a), ActivationStore(b)
    assert sa.image_ids == sb.image_ids and len(sa.image_ids) == 8
    for image_id in sa.image_ids:  # byte-equal tokens per image
        assert torch.equal(sa.get_image(image_id), sb.get_image(image_id)), image_id
    pd.testing.assert_frame_equal(pd.read_parquet(a / "images.parquet"), pd.read_parquet(b / "images.parquet"))
    assert (a / "skipped.csv").read_bytes() == (b / "skipped.csv").read_bytes()
    ma, mb = (json.loads((p / "manifest.json").read_text()) for p in (a, b))
    for key in ("settings", "shards", "n_images", "n_skipped", "complete"):
        assert ma[key] == mb[key], key
    for s in ma["shards"]:
        if s["file"]:
            assert load_file(a / s["file"])["tokens"].equal(load_file(b / s["file"])["tokens"]), s["file"]
    assert not (b / "progress").exists()


def test_two_processes_write_the_store_of_one(setup):
    tmp, weights, data = setup
    ranks = _run(2, tmp, "two", weights, data, tmp / "two")
    assert ranks == [{"complete": True, "n_images": 8}] * 2  # every rank reports the whole store
    _assert_same_store(tmp / "single", tmp / "two")


def test_interrupted_multi_process_run_resumes_with_any_number_of_processes(setup):
    tmp, weights, data = setup
    out = tmp / "sliced"
    ranks = _run(2, tmp, "slice1", weights, data, out, max_seconds=0)  # each rank stops after its first shard
    assert [r["complete"] for r in ranks] == [False, False]
    meta = json.loads((out / "manifest.json").read_text())
    assert [s["index"] for s in meta["shards"]] == [0, 1] and not meta["complete"]
    with pytest.raises(ValueError, match="incomplete"):
        ActivationStore(out)
    ranks = _run(2, tmp, "slice2", weights, data, out, max_seconds=0)  # shards 2 and 3
    assert [s["index"] for s in json.loads((out / "manifest.json").read_text())["shards"]] == [0, 1, 2, 3]
    _run(1, tmp, "slice3", weights, data, out)  # the last one, by a single process
    _assert_same_store(tmp / "single", out)


def _random_worker(rank, world, init_file, data, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        bb = load_backbone("dinobloom-s", seed=rank, **TINY)  # each process draws its own random weights
        try:
            extract(load_manifest(data), bb, out, ExtractConfig(**CFG))
        except ValueError as exc:
            (out.parent / f"{out.name}.rank{rank}.err").write_text(str(exc))
    finally:
        dist.destroy_process_group()


def test_processes_with_different_weights_are_refused(setup, tmp_path):
    _, _, data = setup
    mp.spawn(_random_worker, args=(2, str(tmp_path / "init"), data, tmp_path / "bad"), nprocs=2, join=True)
    for rank in range(2):
        assert "different backbone weights" in (tmp_path / f"bad.rank{rank}.err").read_text()
    assert not list((tmp_path / "bad").glob("shard_*"))
