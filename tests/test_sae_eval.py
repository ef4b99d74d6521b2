"""evaluate_sae figures (checked against direct computation) and the train/evaluate CLI on a store."""
import json

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from cytosae.cli import app
from cytosae.sae import SAE, SAEConfig
from cytosae.sae.evaluate import evaluate_sae


def _relu_sae(d=16, n=48):
    s = SAE(SAEConfig(arch="relu-l1", d_in=d, n_latents=n), seed=0)
    with torch.no_grad():
        s.b_enc.fill_(-0.05)
        s.b_enc[:5] = -1e6  # 5 latents that can never fire
        s.b_enc[5] = 1e6    # one that always fires
    return s.eval()


def test_figures_match_direct_computation():
    torch.manual_seed(0)
    s = _relu_sae()
    x = torch.randn(900, 16) * 2 + 0.5
    res = evaluate_sae(s, x.split(128))["all"]
    with torch.no_grad():
        z = s.encode(x)
        xh = s.decode(z)
    fvu = float((x - xh).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    assert res["tokens"] == 900
    assert res["fvu"] == pytest.approx(fvu, rel=1e-5) and res["explained_variance"] == pytest.approx(1 - fvu, rel=1e-5)
    assert res["mse"] == pytest.approx(float((x - xh).pow(2).mean()), rel=1e-5)
    assert res["l0"] == pytest.approx(float((z > 0).sum(1).float().mean()), rel=1e-6)
    assert res["cosine_similarity"] == pytest.approx(float(torch.cosine_similarity(x, xh).mean()), rel=1e-5)
    assert res["shrinkage"] == pytest.approx(float((xh.norm(dim=1) / x.norm(dim=1)).mean()), rel=1e-5)
    rate = (z > 0).float().mean(0)
    assert res["dead_fraction"] == pytest.approx(float((rate == 0).float().mean())) and res["dead_fraction"] >= 5 / 48
    assert res["dense_fraction"] == pytest.approx(float((rate > 0.1).float().mean())) and res["dense_fraction"] >= 1 / 48


def test_empty_and_bad_input():
    s = _relu_sae()
    with pytest.raises(ValueError, match="no tokens"):
        evaluate_sae(s, [])
    with pytest.raises(ValueError, match=r"batch 0.*\(N, 16\)"):
        evaluate_sae(s, [torch.zeros(4, 8)])


@pytest.fixture()
def store(tmp_path):
    from cytosae.store import import_embeddings
    rng = np.random.default_rng(0)
    arr = rng.normal(size=(24, 5, 16)).astype(np.float32)
    arr[:, 0] += 3.0  # CLS tokens differ from patches
    np.save(tmp_path / "emb.npy", arr)
    table = pd.DataFrame({"image_id": [f"img{i}.png" for i in range(24)]})
    return import_embeddings(tmp_path / "emb.npy", table, tmp_path / "store", dtype="float32"), arr


def test_store_split_cls_patch(store):
    from cytosae.store import ActivationStore
    path, arr = store
    s = _relu_sae()
    res = evaluate_sae(s, ActivationStore(path), batch_size=40)
    assert res["all"]["tokens"] == 120 and res["cls"]["tokens"] == 24 and res["patch"]["tokens"] == 96
    cls = torch.from_numpy(arr[:, 0])
    direct = evaluate_sae(s, [cls])["all"]
    assert res["cls"]["fvu"] == pytest.approx(direct["fvu"], rel=1e-6)


def test_cli_train_then_evaluate(store, tmp_path):
    path, _ = store
    runner = CliRunner()
    r = runner.invoke(app, ["train", str(path), "--out", str(tmp_path / "sae"), "--arch", "topk", "--expansion", "4",
                            "--k", "4", "--batch-size", "32", "--shuffle", "64", "--checkpoint-every", "64",
                            "--log-every", "1"])
    assert r.exit_code == 0, r.output
    assert "trained on 120 all tokens" in r.output
    logged = [json.loads(line) for line in (tmp_path / "sae" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logged] == [1, 2, 3, 4] and all(m["l0"] == pytest.approx(4.0) for m in logged)
    assert logged[-1]["tokens"] == 120 and {"fvu", "dead_fraction", "tokens_per_s", "lr"} <= set(logged[0])
    sae = SAE.load(tmp_path / "sae")
    assert sae.cfg.n_latents == 64 and sae.cfg.arch == "topk"
    r = runner.invoke(app, ["evaluate", str(tmp_path / "sae"), str(path), "--out", str(tmp_path / "ev.json")])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "ev.json").read_text())
    assert res["cls"]["tokens"] == 24 and res["all"]["l0"] == pytest.approx(4.0)
    assert "measured on store" in r.output and "patch" in r.output
    # a group reconstructed worse than its mean token is said in one line, and only then
    for group in ("cls", "patch"):
        said = f"warning: the SAE does not represent the {'CLS token' if group == 'cls' else 'patch tokens'} (FVU"
        assert (said in r.output) == (res[group]["fvu"] > 1), (group, res[group]["fvu"], r.output)
    from cytosae.sae.evaluate import fvu_warnings

    assert fvu_warnings({"all": 3.0, "cls": 49.8, "patch": 0.2}, "16 images of s") == [
        "warning: the SAE does not represent the CLS token (FVU 49.8 > 1 on 16 images of s: worse than the "
        "dataset-mean token)"]
    r = runner.invoke(app, ["evaluate", str(tmp_path / "nope"), str(path)])
    assert r.exit_code == 2 and "config.json" in r.output


def test_cli_train_logs_to_tensorboard_and_refuses_unknown_loggers(store, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    path, _ = store
    args = ["train", str(path), "--arch", "topk", "--expansion", "2", "--k", "2", "--batch-size", "40", "--shuffle", "0",
            "--log-every", "1"]
    r = CliRunner().invoke(app, args + ["--out", str(tmp_path / "tb"), "--log", "tensorboard"])
    assert r.exit_code == 0, r.output
    events = EventAccumulator(str(tmp_path / "tb" / "tensorboard")).Reload()
    assert [e.step for e in events.Scalars("train/fvu")] == [1, 2, 3]
    assert all(e.value == pytest.approx(2.0) for e in events.Scalars("train/l0"))
    r = CliRunner().invoke(app, args + ["--out", str(tmp_path / "x"), "--log", "mlflow"])
    assert r.exit_code == 2 and "--log must be one of" in r.output
