"""--device / precision: CPU runs equal today's, errors are one line, CUDA paths (marked gpu) agree with CPU."""
import json

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from cytosae import load_backbone
from cytosae.analysis import compute_latent_stats, patient_barcodes
from cytosae.analysis.heatmaps import cell_activations
from cytosae.cli import app
from cytosae.data import load_manifest
from cytosae.devices import resolve_device
from cytosae.sae import SAE, SAEConfig
from cytosae.store import ActivationStore, ExtractConfig, extract
from cytosae.analysis.encoded import EncodedStore

from test_store import TINY, _write_images

HAS_CUDA = torch.cuda.is_available()



@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return load_backbone("dinobloom-s", **TINY)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = _write_images(tmp_path_factory.mktemp("dev") / "data", 6)
    manifest = load_manifest(root)
    manifest["patient_id"] = ["P1", "P1", "P2", "P2", "P3", "P3"]
    manifest["diagnosis"] = ["APL", "APL", "AML", "AML", "APL", "APL"]
    return manifest


@pytest.fixture(scope="module")
def store(tmp_path_factory, backbone, data):
    out = tmp_path_factory.mktemp("dev") / "store"
    extract(data, backbone, out, ExtractConfig(dtype="float32", batch_size=3, shard_size=4, progress=False, num_workers=0))
    return ActivationStore(out)


@pytest.fixture(scope="module")
def sae_dir(tmp_path_factory):
    sae = SAE(SAEConfig(arch="relu-l1", d_in=384, n_latents=48), seed=3)
    with torch.no_grad():
        sae.b_enc.fill_(0.05)  # some latents fire on random tokens
    return sae.save(tmp_path_factory.mktemp("dev") / "sae")


def test_resolve_device_and_one_line_errors(tmp_path):
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if HAS_CUDA else "cpu")
    with pytest.raises(ValueError, match="not understood"):
        resolve_device("gpu")
    if not HAS_CUDA:
        with pytest.raises(ValueError, match="no CUDA GPU"):
            resolve_device("cuda:1")
        res = CliRunner().invoke(app, ["extract", str(tmp_path), "--out", str(tmp_path / "s"), "--device", "cuda"])
        assert res.exit_code == 2 and "no CUDA GPU" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(app, ["extract", str(tmp_path), "--out", str(tmp_path / "s"), "--precision", "fp8"])
    assert res.exit_code == 2 and "precision must be one of fp32, bf16, fp16" in res.output


def test_cli_stats_on_cpu_equal_the_api(tmp_path, store, sae_dir):
    res = CliRunner().invoke(app, ["stats", str(sae_dir), str(store.path), "--out", str(tmp_path / "stats"),
                                   "--k", "3", "--galleries", "0", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    sae = SAE.load(sae_dir)
    ref = compute_latent_stats(EncodedStore(store, sae, "cpu"), store.images, k=3, dataset=store.path.name)
    got = pd.read_parquet(tmp_path / "stats" / "latents.parquet")
    assert ref.latents.freq_image.sum() > 0  # the SAE does fire, so the comparison means something
    pd.testing.assert_frame_equal(got, ref.latents.reset_index(drop=True), check_dtype=False)
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "stats" / "top_images.parquet"),
                                  ref.top_images.reset_index(drop=True), check_dtype=False)


def test_cli_patients_on_cpu_equal_the_api(tmp_path, store, sae_dir):
    res = CliRunner().invoke(app, ["patients", str(sae_dir), str(store.path), "--out", str(tmp_path / "p"),
                                   "--token-policy", "any_patch", "--examples", "0", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    sae = SAE.load(sae_dir)
    ref = patient_barcodes(EncodedStore(store, sae, "cpu"), store.images, token_policy="any_patch")
    got = pd.read_parquet(tmp_path / "p" / "barcodes.parquet")
    assert ref["count"].sum() > 0
    pd.testing.assert_frame_equal(got, ref, check_dtype=False)


def test_bf16_is_recorded_close_to_fp32_and_never_mixed_with_it(tmp_path, backbone, data):
    cfg = dict(dtype="float32", batch_size=3, shard_size=4, progress=False, num_workers=0)
    fp32 = ActivationStore(extract(data, backbone, tmp_path / "fp32", ExtractConfig(**cfg)).out_dir)
    bf16 = ActivationStore(extract(data, backbone, tmp_path / "bf16", ExtractConfig(precision="bf16", **cfg)).out_dir)
    assert fp32.meta["settings"]["precision"] == "fp32" and bf16.meta["settings"]["precision"] == "bf16"
    a, b = fp32.get_image(fp32.image_ids[0]), bf16.get_image(fp32.image_ids[0])
    assert not torch.equal(a, b)  # autocast really ran
    assert torch.nn.functional.cosine_similarity(a, b, dim=-1).min() > 0.99
    with pytest.raises(ValueError, match="different settings.*precision"):
        extract(data, backbone, tmp_path / "fp32", ExtractConfig(precision="bf16", **{**cfg, "dtype": "float32"}))


def test_store_from_before_precision_existed_resumes(tmp_path, backbone, data):
    cfg = ExtractConfig(batch_size=3, shard_size=2, progress=False, num_workers=0)
    ref = extract(data, backbone, tmp_path / "ref", cfg)
    part = extract(data, backbone, tmp_path / "old", ExtractConfig(max_seconds=0, **{
        k: getattr(cfg, k) for k in ("batch_size", "shard_size", "progress", "num_workers")}))
    assert not part.complete and part.n_shards == 1
    meta = json.loads((tmp_path / "old" / "manifest.json").read_text())
    del meta["settings"]["precision"]  # as written by cytosae before --precision (format_version 1, unsealed)
    meta.pop("manifest_sha256")
    meta["format_version"] = 1
    (tmp_path / "old" / "manifest.json").write_text(json.dumps(meta))
    res = extract(data, backbone, tmp_path / "old", cfg)
    assert res.complete and res.shards_reused == 1 and res.n_images == ref.n_images == 6
    for name in ("shard_00000.safetensors", "shard_00001.safetensors", "shard_00002.safetensors"):
        assert (tmp_path / "ref" / name).read_bytes() == (tmp_path / "old" / name).read_bytes()


# ---------------------------------------------------------------- CUDA (skipped without a GPU)


@pytest.mark.parametrize("precision,tol", [("fp32", 1e-3), ("bf16", 0.1)])
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_gpu_extraction_matches_cpu(tmp_path, data, precision, tol):
    torch.manual_seed(0)
    cpu = load_backbone("dinobloom-s", **TINY)
    gpu = load_backbone("dinobloom-s", device="cuda", **TINY)
    gpu.model.load_state_dict(cpu.model.state_dict())
    cfg = dict(dtype="float32", batch_size=3, shard_size=4, progress=False, num_workers=2)
    a = ActivationStore(extract(data, cpu, tmp_path / "cpu", ExtractConfig(**cfg)).out_dir)
    b = ActivationStore(extract(data, gpu, tmp_path / "gpu", ExtractConfig(precision=precision, **cfg)).out_dir)
    assert a.image_ids == b.image_ids
    for i in a.image_ids:
        x, y = a.get_image(i), b.get_image(i)
        assert y.device.type == "cpu" and ((x - y).norm() / x.norm()) < tol, i


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_gpu_analysis_matches_cpu(store, sae_dir):
    cpu, gpu = SAE.load(sae_dir), SAE.load(sae_dir, device="cuda")
    on_cpu, on_gpu = EncodedStore(store, cpu, torch.device("cpu")), EncodedStore(store, gpu, resolve_device("cuda"))
    s_cpu = compute_latent_stats(on_cpu, store.images, k=3)
    s_gpu = compute_latent_stats(on_gpu, store.images, k=3)
    np.testing.assert_allclose(s_gpu.latents.mean_act, s_cpu.latents.mean_act, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(s_gpu.latents.freq_image, s_cpu.latents.freq_image)
    b_cpu = patient_barcodes(on_cpu, store.images, token_policy="cls")
    b_gpu = patient_barcodes(on_gpu, store.images, token_policy="cls")
    pd.testing.assert_frame_equal(b_gpu, b_cpu)
    a_cpu = cell_activations(on_cpu, [0, 5, 7])
    a_gpu = cell_activations(on_gpu, [0, 5, 7])
    np.testing.assert_allclose(a_gpu.to_numpy(), a_cpu.to_numpy(), rtol=1e-4, atol=1e-6)


def test_python_dash_m_cytosae_runs_the_cli():
    """torchrun -m cytosae needs the package to be runnable as a module."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    res = subprocess.run([sys.executable, "-m", "cytosae", "extract", "--help"], capture_output=True, text=True, env=env)
    assert res.returncode == 0 and "--precision" in res.stdout and "--device" in res.stdout


def test_fp32_on_gpu_switches_tf32_off_and_restores_the_flags():
    from cytosae.backbones.backbone import _no_tf32

    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    before = matmul.fp32_precision, conv.fp32_precision
    try:
        matmul.fp32_precision = "tf32"  # a user's own global choice
        with _no_tf32():
            assert (matmul.fp32_precision, conv.fp32_precision) == ("ieee", "ieee")
        assert matmul.fp32_precision == "tf32" and conv.fp32_precision == before[1]
    finally:
        matmul.fp32_precision, conv.fp32_precision = before


def test_cli_extract_refuses_to_resume_in_another_precision(tmp_path, data):
    root = _write_images(tmp_path / "imgs", 3)
    args = ["extract", str(root), "--out", str(tmp_path / "s"), "--backbone", "dinobloom-s", "--device", "cpu",
            "--shard-size", "2", "--batch-size", "2", "--workers", "0"]
    first = CliRunner().invoke(app, args + ["--max-minutes", "0"])
    assert first.exit_code == 0 and "unfinished" in first.output, first.output
    res = CliRunner().invoke(app, args + ["--precision", "bf16"])
    assert res.exit_code == 2 and "different settings (precision)" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(app, ["extract", str(tmp_path / "missing"), "--out", str(tmp_path / "t"), "--device", "cpu"])
    assert res.exit_code == 2 and "does not exist" in res.output
