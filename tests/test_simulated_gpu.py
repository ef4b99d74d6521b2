"""The README's steps (the cytosae.steps functions the CLI calls) on a simulated GPU (tests/fake_cuda.py): every
tensor the code puts on `cuda` is checked as CUDA checks it, so a CPU tensor meeting a GPU one, a `.numpy()` of a
GPU tensor or a CPU generator on a GPU factory fails here as it would on the cluster, without one."""
import json

import numpy as np
import pandas as pd
import pytest
import torch

from fake_cuda import simulated_cuda
from cytosae.steps import (ClassifySettings, EvaluateSettings, ExtractSettings, PatientsSettings, StatsSettings,
                           TrainSettings, run_classify, run_evaluate, run_extract, run_patients, run_stats, run_train)

BACKBONE = "vit_tiny_patch16_224"  # a timm ViT with random weights: 192 dims, 1 + 14x14 tokens, fast on one core
pytestmark = pytest.mark.filterwarnings("ignore:.*RANDOM weights:UserWarning")


@pytest.fixture(scope="module")
def gpu_run(tmp_path_factory):
    """A sample of 4 patients x 3 cells (the project's synthetic writer), extracted and an SAE trained on it, both
    with --device cuda on the simulated GPU."""
    from cytosae.data.synthetic import make_sample

    root = tmp_path_factory.mktemp("gpu")
    manifest = make_sample(root / "data", seed=0, n_patients=4, cells_per_patient=3)
    run = root / "run"
    # a weights file (random ViT weights, saved as a published checkpoint is read): the explorer encodes uploads
    from safetensors.torch import save_file

    from cytosae.backbones import load_backbone

    with pytest.warns(UserWarning, match="RANDOM"):
        save_file(load_backbone(BACKBONE, seed=1).model.state_dict(), root / "vit.safetensors")
    with pytest.MonkeyPatch.context() as mp, simulated_cuda(mp):
        ext = run_extract(ExtractSettings(data=manifest, backbone=BACKBONE, weights=root / "vit.safetensors",
                                          batch_size=4, shard_size=8, workers=0, device="cuda"), run=run)
        tr = run_train(TrainSettings(arch="topk", expansion=2, k=8, batch_size=256, shuffle=1024, log="none",
                                     device="cuda"), run=run)
    return run, ext, tr


def test_extract_and_train_run_on_the_gpu(gpu_run):
    run, ext, tr = gpu_run
    assert ext.device.startswith("cuda") and ext.complete and ext.n_images == 12 and ext.n_skipped == 0
    assert ext.n_tokens == 197 and ext.embed_dim == 192
    assert tr.device.startswith("cuda")
    steps = json.loads((run / "run.json").read_text())["steps"]
    assert {"extract:data", "train"} <= set(steps)
    from cytosae.store import ActivationStore

    ids, tokens = zip(*ActivationStore(run / "stores" / "data").iter_images(12))
    tokens = torch.cat(tokens)
    assert tokens.shape == (12, 197, 192) and type(tokens) is torch.Tensor and torch.isfinite(tokens).all()
    assert (run / "sae").is_dir() and tr.out.is_dir()


def test_extract_auto_picks_the_gpu_and_matches_cpu(fake_cuda, gpu_run, tmp_path):
    """`--device auto` resolves to the GPU, and what it writes equals the CPU's (same kernels underneath)."""
    run, _, _ = gpu_run
    data = run.parent / "data" / "manifest.csv"
    kw = dict(data=data, backbone=BACKBONE, batch_size=4, shard_size=8, workers=0, layer=1)
    gpu = run_extract(ExtractSettings(**kw, out=tmp_path / "gpu", device="auto"), warn=lambda _: None)
    assert gpu.device.startswith("cuda")
    cpu = run_extract(ExtractSettings(**kw, out=tmp_path / "cpu", device="cpu"), warn=lambda _: None)
    assert cpu.device == "cpu"
    from cytosae.store import ActivationStore

    a, b = ActivationStore(tmp_path / "gpu"), ActivationStore(tmp_path / "cpu")
    for (ia, x), (ib, y) in zip(a.iter_images(12), b.iter_images(12), strict=True):
        assert ia == ib
        torch.testing.assert_close(x, y)


def test_evaluate_on_the_gpu_measures_what_the_cpu_does(fake_cuda, gpu_run, tmp_path):
    run, _, _ = gpu_run
    gpu = run_evaluate(EvaluateSettings(device="cuda", out=tmp_path / "gpu.json"), run=run)
    cpu = run_evaluate(EvaluateSettings(device="cpu", out=tmp_path / "cpu.json"), run=run)
    assert set(gpu.figures) >= {"all", "cls", "patch"}
    for group in ("all", "cls", "patch"):
        figs = cpu.figures[group]
        for name, value in figs.items():
            if isinstance(value, float):
                assert gpu.figures[group][name] == pytest.approx(value, rel=1e-4, abs=1e-6), (group, name)
    assert json.loads((tmp_path / "gpu.json").read_text())


def test_the_cli_takes_device_cuda_and_refuses_a_second_gpu(fake_cuda, gpu_run, tmp_path):
    from typer.testing import CliRunner

    from cytosae.cli import app

    run, _, _ = gpu_run
    r = CliRunner().invoke(app, ["evaluate", "--run", str(run), "--device", "cuda", "--out", str(tmp_path / "e.json")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "e.json").is_file()
    r = CliRunner().invoke(app, ["evaluate", "--run", str(run), "--device", "cuda:1"])
    assert r.exit_code != 0 and "only 1 CUDA device" in r.output and "Traceback" not in r.output


def test_stats_with_factors_on_the_gpu(fake_cuda, gpu_run):
    """--factors draws galleries through a CellViewer: it must encode on the SAE's device (it was built without
    one, so the GPU SAE met CPU tokens)."""
    run, _, _ = gpu_run
    res = run_stats(StatsSettings(device="cuda", galleries=2, k=4, factors="nucleus_shape,lobes"), run=run)
    purity = pd.read_csv(run / "stats" / "factor_purity.csv")
    assert set(purity.factor) == {"nucleus_shape", "lobes"} and purity.purity.between(0, 1).all()
    assert list((run / "stats" / "figures" / "galleries").rglob("*.png"))
    assert any("purity" in line for line in res.lines())


def test_patients_and_classify_with_mil_on_the_gpu(fake_cuda, gpu_run, tmp_path):
    run, _, _ = gpu_run
    pat = run_patients(PatientsSettings(device="cuda", token_policy="any_patch", examples=1), run=run)
    barcodes = pd.read_parquet(run / "patients" / "barcodes.parquet")
    assert barcodes.patient_id.nunique() == 4 and len(barcodes) == 4 * 384 and pat.lines()
    run_patients(PatientsSettings(device="cpu", token_policy="any_patch", examples=0, out=tmp_path / "p"), run=run)
    on_cpu = pd.read_parquet(tmp_path / "p" / "barcodes.parquet")
    pd.testing.assert_frame_equal(barcodes[on_cpu.columns], on_cpu)  # the GPU's barcodes are the CPU's
    res = run_classify(ClassifySettings(device="cuda", folds=2, repeats=1, mil="embedding,concepts", mil_epochs=3,
                                        mil_repeats=1), run=run)
    assert {"mil_embedding", "mil_concepts"} <= set(res.results["models"])
    assert all(0 <= res.results["models"][m]["auroc"] <= 1 for m in ("mil_embedding", "mil_concepts"))
    assert (run / "classify" / "attention.parquet").is_file()


@pytest.mark.parametrize("arch", ["batchtopk", "jumprelu", "matryoshka", "relu-l1"])
def test_every_sae_architecture_trains_in_bf16_on_the_gpu(fake_cuda, gpu_run, tmp_path, arch):
    """bf16 autocast and each architecture's own kernels and buffers (thresholds, prefix losses) on the GPU."""
    from cytosae.sae import SAE

    run, _, _ = gpu_run
    res = run_train(TrainSettings(store=run / "stores" / "data", out=tmp_path / arch, arch=arch, expansion=2, k=8,
                                  batch_size=256, shuffle=1024, log="none", device="cuda", precision="bf16"))
    assert res.device.startswith("cuda") and res.tokens_seen == 12 * 197
    sae = SAE.load(tmp_path / arch)
    assert all(torch.isfinite(p).all() for p in sae.state_dict().values())


def test_extract_in_bf16_with_a_decoding_process_and_pinned_batches_on_the_gpu(fake_cuda, gpu_run, tmp_path):
    run, _, _ = gpu_run
    res = run_extract(ExtractSettings(data=run.parent / "data" / "manifest.csv", out=tmp_path / "s", backbone=BACKBONE,
                                      layer=0, batch_size=6, workers=1, device="cuda", precision="bf16"),
                      warn=lambda _: None)
    assert res.complete and res.device.startswith("cuda")


def test_the_explorer_encodes_stored_and_uploaded_cells_on_the_gpu(fake_cuda, gpu_run):
    """The explorer's encoder with --device cuda (called in this thread: the simulation does not reach the web
    server's threads) gives the CPU's activations, for a stored image and for an upload through the backbone."""
    from PIL import Image

    from cytosae.explorer.state import Explorer

    run, _, _ = gpu_run
    image_id = pd.read_parquet(run / "stores" / "data" / "images.parquet").image_id.iloc[0]
    cell = Image.open(next((run.parent / "data").rglob("*.png"))).convert("RGB")
    gpu, cpu = Explorer(run, device="cuda").encoder, Explorer(run, device="cpu").encoder
    assert next(gpu.sae.parameters()).device.type == "cuda"
    for a, b in ((gpu.for_store_image("data", image_id), cpu.for_store_image("data", image_id)),
                 (gpu.for_upload("u", cell), cpu.for_upload("u", cell))):
        assert a.acts.shape == b.acts.shape == (197, 384) and a.acts.nnz > 0
        np.testing.assert_allclose(a.acts.toarray(), b.acts.toarray(), rtol=1e-4, atol=1e-5)
    value, heat, grid = gpu.latent_map("data", image_id, int(cpu.for_store_image("data", image_id).acts[0].indices[0]))
    assert grid == 14 and len(heat) == 196 and value > 0


def test_the_explorer_app_serves_heatmaps_and_uploads_from_the_gpu(fake_cuda, gpu_run):
    """`cytosae explore --device cuda`: its routes run in the web server's threads, encoding on the GPU."""
    from fastapi.testclient import TestClient

    from cytosae.explorer import create_app

    run, _, _ = gpu_run
    image_id = str(pd.read_parquet(run / "stores" / "data" / "images.parquet").image_id.iloc[0])
    png = next((run.parent / "data").rglob("*.png")).read_bytes()
    with TestClient(create_app(run, device="cuda"), base_url="http://127.0.0.1") as c:
        r = c.get("/api/image", params={"dataset": "data", "image_id": image_id})
        assert r.status_code == 200, r.text
        latent = int(c.get("/api/image/patch", params={"dataset": "data", "image_id": image_id, "patch": 0,
                                                        "k": 1}).json()["top"][0]["latent"])
        r = c.get("/api/image/heatmap", params={"dataset": "data", "image_id": image_id, "latent": latent})
        assert r.status_code == 200 and len(r.json()["values"]) == 196, r.text
        r = c.post("/api/uploads", files={"file": ("cell.png", png, "image/png")})
        assert r.status_code == 201 and r.json()["top_cls"] and r.json()["grid"] == 14, r.text


def test_a_gpu_failure_loading_the_explorers_sae_is_not_called_a_damaged_file(fake_cuda, gpu_run, monkeypatch):
    """The explorer read the SAE straight onto the GPU inside its 'file damaged' handler: a GPU out of memory was
    reported as `sae.safetensors could not be read ... the file is damaged`."""
    import fake_cuda as fc

    from cytosae.explorer.state import Explorer

    def out_of_memory(t):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate (simulated)")

    monkeypatch.setattr(fc, "to_cuda", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError, match="out of memory"):
        Explorer(gpu_run[0], device="cuda").encoder.sae


@pytest.mark.parametrize("script,args", [
    ("sae.py", ["--d", "32", "--expansion", "2", "--batch", "64", "--steps", "1", "--k", "4"]),
    ("precision.py", ["--backbones", BACKBONE, "--n-images", "2"]),
    ("extract.py", ["--backbones", BACKBONE, "--n-images", "4", "--batch-size", "2", "--workers", "0",
                    "--precision", "bf16"]),
])
def test_the_gpu_session_benches_run_on_the_gpu(fake_cuda, gpu_run, monkeypatch, tmp_path, script, args):
    """bench/gpu_session.sh's benches with --device cuda, at toy sizes: a crash found here costs no device time.
    The cells they read from acevedo/ are the run's synthetic ones (CYTOSAE_SHARED_DATA points at a copy)."""
    import runpy
    import shutil
    import sys
    from pathlib import Path

    shutil.copytree(gpu_run[0].parent / "data", tmp_path / "shared" / "acevedo")
    monkeypatch.setenv("CYTOSAE_SHARED_DATA", str(tmp_path / "shared"))
    monkeypatch.delitem(sys.modules, "_report", raising=False)  # it reads the variable when imported
    bench = Path(__file__).resolve().parents[1] / "bench"
    monkeypatch.syspath_prepend(str(bench))
    monkeypatch.setattr(sys, "argv", [script, "--device", "cuda", *args, "--out", str(tmp_path / "r.json")])
    runpy.run_path(str(bench / script), run_name="__main__")
    result = json.loads((tmp_path / "r.json").read_text())
    assert "Simulated CUDA device" in json.dumps(result["device"])


def test_an_external_cohort_on_the_gpu(fake_cuda, gpu_run, tmp_path):
    """A second cohort extracted into the run, its barcodes (--external) and the MIL models tested on it."""
    import shutil

    from cytosae.data.synthetic import make_sample

    run, _, _ = gpu_run
    shutil.copytree(run.parent, tmp_path / "copy")
    run = tmp_path / "copy" / "run"
    ext = make_sample(tmp_path / "copy" / "ext", seed=1, n_patients=4, cells_per_patient=2)
    run_extract(ExtractSettings(data=ext, name="ext", backbone=BACKBONE, weights=tmp_path / "copy" / "vit.safetensors",
                                batch_size=4, workers=0, device="cuda"), run=run)
    run_patients(PatientsSettings(device="cuda", dataset="data", token_policy="any_patch", examples=0), run=run)
    run_patients(PatientsSettings(device="cuda", dataset="ext", external=True, token_policy="any_patch",
                                  examples=0), run=run)
    res = run_classify(ClassifySettings(device="cuda", folds=2, repeats=1, mil="embedding,concepts", mil_epochs=3,
                                        mil_repeats=1, external=run / "external" / "ext"), run=run)
    external = res.results["external"]
    assert {"mil_embedding", "mil_concepts"} <= set(external), list(external)
    assert all(external[m]["n_test"] == 4 for m in ("mil_embedding", "mil_concepts"))


def test_an_sae_too_big_for_the_gpu_is_refused_before_anything_is_read(fake_cuda, gpu_run, tmp_path):
    from cytosae.steps import StepError

    run, _, _ = gpu_run
    with pytest.raises(StepError, match=r"more than the 80\.0 GiB of memory here; lower --expansion"):
        run_train(TrainSettings(store=run / "stores" / "data", out=tmp_path / "big", expansion=400_000, log="none",
                                device="cuda"))
    assert not (tmp_path / "big").exists()


def test_a_whole_study_runs_on_the_gpu_with_device_auto(fake_cuda, tmp_path):
    """`cytosae run study.toml`: every step in one process, each with its default --device auto (the GPU here)."""
    from cytosae.data.synthetic import make_sample
    from cytosae.study import run_study

    make_sample(tmp_path / "data", seed=2, n_patients=4, cells_per_patient=2)
    (tmp_path / "study.toml").write_text(f"""
[run]
dir = "{tmp_path / 'run'}"
[backbone]
name = "{BACKBONE}"
batch_size = 4
[datasets.cells]
data = "{tmp_path / 'data' / 'manifest.csv'}"
[sae]
arch = "topk"
expansion = 2
k = 4
batch_size = 256
[stats]
galleries = 1
[patients]
token_policy = "any_patch"
examples = 0
[classify]
folds = 2
repeats = 1
mil_epochs = 2
mil_repeats = 1
device = "cuda"
""")
    lines: list[str] = []
    status = run_study(tmp_path / "study.toml", say=lines.append)
    assert set(status.values()) == {"done"} and len(status) >= 6, status
    text = "\n".join(lines)
    assert "on cuda" in text and "mil_embedding" in text, text


def test_imported_embeddings_train_and_stats_on_the_gpu(fake_cuda, gpu_run, tmp_path):
    """One vector per image (`cytosae import-embeddings`): the t == 1 branches of training and statistics."""
    from cytosae.store import ActivationStore, import_embeddings

    run, _, _ = gpu_run
    st = ActivationStore(run / "stores" / "data")
    ids, tokens = zip(*st.iter_images(12))
    table = pd.read_csv(run.parent / "data" / "manifest.csv")
    table.insert(0, "image_id", table["path"].astype(str))
    cls = torch.cat(tokens)[:, 0].numpy()  # the store's CLS tokens as "another model's" embeddings
    np.save(tmp_path / "emb.npy", cls)
    store = import_embeddings(tmp_path / "emb.npy", table, tmp_path / "imported")
    res = run_train(TrainSettings(store=store, out=tmp_path / "sae", expansion=2, k=4, batch_size=8, shuffle=64,
                                  log="none", device="cuda"))
    assert res.device.startswith("cuda") and res.tokens_seen == 12
    out = run_stats(StatsSettings(sae_dir=tmp_path / "sae", stores=[store], out=tmp_path / "stats", device="cuda",
                                  k=3))
    assert out.lines() and len(pd.read_parquet(tmp_path / "stats" / "latents.parquet")) == 384
    assert len(pd.read_parquet(tmp_path / "stats" / "top_images.parquet"))


def test_spliced_evaluate_and_alignment_on_the_gpu_measure_what_the_cpu_does(fake_cuda, gpu_run, tmp_path):
    """Issue #18's figures on `--device cuda`: the SAE spliced into the backbone and the label alignment."""
    from cytosae.steps import AlignSettings, run_align
    run, _, _ = gpu_run
    figures = {}
    for dev in ("cuda", "cpu"):
        (tmp_path / dev).mkdir()
        ev = run_evaluate(EvaluateSettings(device=dev, spliced=True, out=tmp_path / dev / "eval.json"), run=run)
        assert any("spliced" in line for line in ev.lines()), ev.lines()
        spliced, = (tmp_path / dev).glob("*spliced*.json")
        run_align(AlignSettings(device=dev, out=tmp_path / dev / "quality"), run=run)
        figures[dev] = (json.loads(spliced.read_text()), pd.read_parquet(tmp_path / dev / "quality" / "alignment.parquet"))
    (gpu_spliced, gpu_align), (cpu_spliced, cpu_align) = figures["cuda"], figures["cpu"]
    assert gpu_spliced.keys() == cpu_spliced.keys()

    def numbers(d, at=""):  # every number of the JSON, by its path
        if isinstance(d, dict):
            return {k: v for key, val in d.items() for k, v in numbers(val, f"{at}/{key}").items()}
        return {at: d} if isinstance(d, (int, float)) and not isinstance(d, bool) else {}
    gpu_n, cpu_n = numbers({k: gpu_spliced[k] for k in ("fvu", "output", "downstream")}), \
        numbers({k: cpu_spliced[k] for k in ("fvu", "output", "downstream")})
    assert gpu_n.keys() == cpu_n.keys() and len(cpu_n) > 10
    assert all(gpu_n[k] == pytest.approx(cpu_n[k], rel=1e-3, abs=1e-5) for k in cpu_n), \
        {k: (gpu_n[k], cpu_n[k]) for k in cpu_n if gpu_n[k] != pytest.approx(cpu_n[k], rel=1e-3, abs=1e-5)}
    numeric = cpu_align.select_dtypes("number").columns
    assert list(gpu_align.method) == list(cpu_align.method) == ["sae", "pca", "kmeans", "untrained_sae"]
    assert np.allclose(gpu_align[numeric].to_numpy(float), cpu_align[numeric].to_numpy(float), atol=1e-4)
