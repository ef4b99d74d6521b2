"""Every bad input of issue #12 through the real CLI: exit != 0, one `error:` line naming the file, no traceback."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cytosae.cli import app
from cytosae.sae import SAE, SAEConfig, train_sae
from cytosae.store import import_embeddings

D = 8


def _one_error(result, names: str) -> str:
    """The CLI failed cleanly: non-zero exit, no exception escaped, exactly one `error:` line naming `names`."""
    assert result.exit_code != 0, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert names in errors[0], (names, errors[0])
    return errors[0]


def _run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """A small store written by the real importer: 6 images x 5 tokens x 8 dims, with labels and patients."""
    root = tmp_path_factory.mktemp("store")
    arr = np.random.default_rng(0).normal(size=(6, 5, D)).astype(np.float32)
    np.save(root / "emb.npy", arr)
    manifest = pd.DataFrame({"image_id": [f"img{i}" for i in range(6)], "label": list("ababab"),
                             "patient_id": ["P1", "P1", "P2", "P2", "P3", "P4"],
                             "diagnosis": ["APL", "APL", "AML", "AML", "APL", "AML"]})
    return import_embeddings(root / "emb.npy", manifest, root / "store", dtype="float32", shard_size=2)


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="module")
def saes(tmp_path_factory) -> dict[str, Path]:
    """A finished SAE and one from a training run stopped at step 3 of 8 (as a killed `cytosae train` leaves it)."""
    root = tmp_path_factory.mktemp("saes")
    x = torch.randn(400, D, generator=torch.Generator().manual_seed(0))
    kw = dict(d_in=D, arch="topk", n_latents=16, total_tokens=400, batch_size=50, k=2, progress=False,
              checkpoint_every=150)
    train_sae(list(x.split(100)), checkpoint_dir=root / "finished", **kw)
    train_sae(list(x.split(100)), checkpoint_dir=root / "unfinished", max_tokens_this_run=150, **kw)
    return {"finished": root / "finished", "unfinished": root / "unfinished"}


# ---------------------------------------------------------------- extract: data in


def _png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(path)


BAD_CSVS = {
    "empty.csv": b"",
    "quote.csv": b'path,label\nimgs/a.png,"blast\n',
    "latin1.csv": "path,label\nimgs/a.png,myélocyte\n".encode("latin-1"),
    "header.csv": b"path,label\n",
    "nopath.csv": b"file\nimgs/a.png\n",
    "twice.csv": b"path\nimgs/a.png\nimgs/../imgs/a.png\n",
}


@pytest.mark.parametrize("name", sorted(BAD_CSVS))
def test_extract_bad_manifest(tmp_path, name):
    _png(tmp_path / "imgs" / "a.png")
    (tmp_path / name).write_bytes(BAD_CSVS[name])
    _one_error(_run("extract", tmp_path / name, "--out", tmp_path / "s", "--backbone", "dinobloom-s"), name)
    assert not (tmp_path / "s").exists()


def test_extract_missing_data_folder_and_weights(tmp_path):
    _one_error(_run("extract", tmp_path / "nowhere", "--out", tmp_path / "s"), "nowhere")
    _png(tmp_path / "data" / "a" / "x.png")
    _one_error(_run("extract", tmp_path / "data", "--out", tmp_path / "s", "--weights", tmp_path / "w.pth"), "w.pth")


def test_extract_resume_with_another_seed(tmp_path):
    _png(tmp_path / "data" / "a" / "x.png")
    args = ["extract", tmp_path / "data", "--out", tmp_path / "s", "--backbone", "vit_small_patch16_224",
            "--layer", "0"]
    ok = _run(*args)
    assert ok.exit_code == 0, ok.output
    line = _one_error(_run(*args, "--seed", "1"), str(tmp_path / "s"))
    assert "random_weights_seed" in line


# ---------------------------------------------------------------- train: damaged stores


@pytest.mark.parametrize("damage", ["truncated", "bit-flip"])
def test_train_on_a_damaged_shard(tmp_path, store, damage):
    s = _copy(store, tmp_path / "store")
    shard = s / "shard_00001.safetensors"
    data = bytearray(shard.read_bytes())
    if damage == "truncated":
        data = data[:-64]
    else:
        data[-5] ^= 0x10
    shard.write_bytes(bytes(data))
    _one_error(_run("train", s, "--out", tmp_path / "sae", "--expansion", "2", "--k", "2", "--batch-size", "10"),
               "shard_00001.safetensors")
    assert not (tmp_path / "sae" / "sae.safetensors").exists()


# ---------------------------------------------------------------- evaluate / stats / patients / explore: damaged SAEs


def _damage_sae(d: Path, how: str) -> Path:
    w, cfg_path = d / "sae.safetensors", d / "config.json"
    if how == "truncated":
        w.write_bytes(w.read_bytes()[:200])
    elif how == "empty":
        w.write_bytes(b"")
    elif how == "bit-flip":
        data = bytearray(w.read_bytes())
        data[-7] ^= 0x04
        w.write_bytes(bytes(data))
    elif how == "n_latents":
        cfg = json.loads(cfg_path.read_text())
        cfg["n_latents"] = 1_000_000
        cfg_path.write_text(json.dumps(cfg))
    elif how == "nan":
        sae = SAE.load(d)
        with torch.no_grad():
            sae.W_enc[0, 0] = float("nan")
        sae.save(d)
    return d


SAE_DAMAGE = {"truncated": "sae.safetensors", "empty": "sae.safetensors", "bit-flip": "sae.safetensors",
              "n_latents": "config.json", "nan": "sae.safetensors"}


def _command(name: str, sae: Path, store: Path, out: Path) -> list:
    return {"evaluate": ["evaluate", sae, store],
            "stats": ["stats", sae, store, "--out", out, "--galleries", "0"],
            "patients": ["patients", sae, store, "--out", out, "--examples", "0"]}[name]


@pytest.mark.parametrize("how", sorted(SAE_DAMAGE))
@pytest.mark.parametrize("command", ["evaluate", "stats", "patients"])
def test_damaged_sae(tmp_path, store, saes, how, command):
    d = _damage_sae(_copy(saes["finished"], tmp_path / "sae"), how)
    _one_error(_run(*_command(command, d, store, tmp_path / "out")), SAE_DAMAGE[how])


@pytest.mark.parametrize("command", ["evaluate", "stats", "patients"])
def test_unfinished_sae_refused_unless_allowed(tmp_path, store, saes, command):
    line = _one_error(_run(*_command(command, saes["unfinished"], store, tmp_path / "out")), str(saes["unfinished"]))
    assert "step 3 of 8 (150 of 400 tokens, 38%)" in line and "--allow-unfinished" in line
    ok = _run(*_command(command, saes["unfinished"], store, tmp_path / "out"), "--allow-unfinished")
    assert ok.exit_code == 0, ok.output
    assert "warning:" in ok.stderr and "step 3 of 8" in ok.stderr


def test_explore_and_report_refuse_an_unfinished_or_damaged_sae(tmp_path, saes):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"datasets": {}, "sae": "sae"}))
    _copy(saes["unfinished"], run / "sae")
    line = _one_error(_run("explore", run), "sae")
    assert "step 3 of 8" in line
    assert "step 3 of 8" in _one_error(_run("report", run, "--out", tmp_path / "site"), "sae")
    _damage_sae(run / "sae", "bit-flip")
    _one_error(_run("explore", run, "--allow-unfinished"), "sae.safetensors")


def test_real_process_prints_one_line_and_no_traceback(tmp_path):
    """The same through a real interpreter: what a user's terminal shows."""
    (tmp_path / "m.csv").write_bytes(b"")
    p = subprocess.run([sys.executable, "-m", "cytosae.cli", "extract", str(tmp_path / "m.csv"), "--out",
                        str(tmp_path / "s")], capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert [line for line in p.stderr.splitlines() if line.strip()] == [f"error: {tmp_path / 'm.csv'} is empty: expected "
                                                                       "a header row naming the columns (path, ...) and "
                                                                       "one row per entry"]
