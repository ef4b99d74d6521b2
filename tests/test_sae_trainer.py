"""Trainer: devices, bf16, run-length schedules, whole-dataset epochs in shuffled order, resume mid-epoch, errors."""
import json

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from cytosae.cli import app
from cytosae.devices import resolve_device
from cytosae.sae import SAEConfig, ShuffleBuffer, store_epochs, train_sae
from cytosae.sae.evaluate import evaluate_sae
from cytosae.sae.trainer import lr_factor, warmup_steps
from cytosae.store import ActivationStore, import_embeddings

CUDA = torch.cuda.is_available()
N_CLASSES, PER_CLASS, T, D = 8, 64, 5, 16


@pytest.fixture()
def sorted_store(tmp_path):
    """A class-per-folder store: manifest sorted by path puts class 0's images first, then class 1's, ...
    Feature 0 of every token holds its image's class, so each batch's class mix can be read off."""
    rng = np.random.default_rng(0)
    n = N_CLASSES * PER_CLASS
    labels = np.repeat(np.arange(N_CLASSES), PER_CLASS)
    arr = rng.normal(size=(n, T, D)).astype(np.float32)
    arr[:, :, 0] = labels[:, None]
    np.save(tmp_path / "emb.npy", arr)
    table = pd.DataFrame({"image_id": [f"class{c}/img{i:03d}.png" for i, c in enumerate(labels)]})
    path = import_embeddings(tmp_path / "emb.npy", table, tmp_path / "store", dtype="float32", shard_size=PER_CLASS)
    return ActivationStore(path), arr


def _class_mix(batches, n_batches):
    """(distinct classes in each of the first n batches, distinct classes over all of them)."""
    first = list(batches)[:n_batches]
    return [len(torch.unique(b[:, 0])) for b in first], len(torch.unique(torch.cat(first)[:, 0]))


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if CUDA else "cpu")
    with pytest.raises(ValueError, match="not understood.*auto\\|cpu\\|cuda"):
        resolve_device("gpu0")
    if not CUDA:
        with pytest.raises(ValueError, match="no CUDA GPU"):
            resolve_device("cuda:1")


def test_warmup_scales_with_the_run():
    cfg = SAEConfig(arch="topk", d_in=8, n_latents=64)
    assert warmup_steps(cfg, 146) == 8            # the 600,000-token real run: 8 warm-up steps, not 500
    assert warmup_steps(cfg, 1_000_000) == 500    # long runs keep the configured warm-up
    assert warmup_steps(SAEConfig(arch="topk", d_in=8, n_latents=64, lr_warmup_steps=0), 146) == 0
    assert lr_factor(0, 146, 8, 0) == pytest.approx(1 / 8) and lr_factor(7, 146, 8, 0) == 1.0
    assert lr_factor(145, 146, 8, 10) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="lr_warmup_fraction"):
        SAEConfig(arch="topk", d_in=8, n_latents=64, lr_warmup_fraction=2.0)


def test_shuffled_epochs_read_every_token_in_a_new_order(sorted_store):
    st, arr = sorted_store
    a0 = torch.cat(list(st.iter_tokens_shuffled(0, seed=1, batch_size=64)))
    again = torch.cat(list(st.iter_tokens_shuffled(0, seed=1, batch_size=64)))
    a1 = torch.cat(list(st.iter_tokens_shuffled(1, seed=1, batch_size=64)))
    every = torch.from_numpy(arr.reshape(-1, D))
    assert torch.equal(a0, again)                                   # deterministic for (seed, epoch)
    assert not torch.equal(a0, a1)                                  # a new order each epoch
    for got in (a0, a1):                                            # every token exactly once
        assert torch.equal(got[torch.argsort(got[:, 1])], every[torch.argsort(every[:, 1])])
    cls = torch.cat(list(st.iter_tokens_shuffled(0, seed=1, tokens="cls", batch_size=64)))
    assert cls.shape == (N_CLASSES * PER_CLASS, D)


def test_shuffled_order_mixes_a_class_sorted_store(sorted_store):
    st, _ = sorted_store
    # the old stream: store order, then a token shuffle buffer of 10% of the data (262,144 tokens of millions)
    buffer = N_CLASSES * PER_CLASS * T // 10
    old = ShuffleBuffer(buffer, seed=0)(st.iter_tokens(batch_size=64), batch_size=64)
    new = store_epochs(st, 1, batch_size=64, seed=0, shuffle_tokens=buffer).make(0)
    (old_mix, old_cover), (new_mix, new_cover) = _class_mix(old, 10), _class_mix(new, 10)
    # figures (8 classes, batches of 64 tokens, first 10 batches): store order sees 3 classes in all, 1-3 per
    # batch (mean 2.1); shuffled order sees all 8 in every batch
    assert old_cover <= 3 and max(old_mix) <= 3, (old_mix, old_cover)
    assert new_cover == N_CLASSES and min(new_mix) >= 6 and sum(new_mix) / 10 >= 7, (new_mix, new_cover)


def test_epochs_train_and_resume_mid_epoch_equals_uninterrupted(sorted_store, tmp_path):
    st, _ = sorted_store
    src = store_epochs(st, 2, batch_size=64, seed=4, shuffle_tokens=320)
    assert src.total_tokens == 2 * N_CLASSES * PER_CLASS * T == 5120
    kw = dict(d_in=D, arch="topk", n_latents=32, seed=4, batch_size=64, k=4, progress=False, lr_warmup_steps=2,
              dead_tokens=256, checkpoint_every=640)
    full = train_sae(src, checkpoint_dir=tmp_path / "full", **kw)
    assert full.training_summary == {"steps": 80, "tokens_seen": 5120, "finished": True}
    cut = train_sae(src, checkpoint_dir=tmp_path / "cut", max_tokens_this_run=3200, **kw)  # stops inside epoch 2
    assert cut.training_summary["tokens_seen"] == 3200 and not cut.training_summary["finished"]
    resumed = train_sae(src, checkpoint_dir=tmp_path / "cut", **kw)
    assert resumed.training_summary["tokens_seen"] == 5120
    for name, p in full.named_parameters():
        assert torch.allclose(p, dict(resumed.named_parameters())[name], atol=1e-6), name


def test_a_state_saved_before_the_encoder_was_stored_transposed_resumes(sorted_store, tmp_path):
    """Training states written with the encoder as model.W_enc / adam.W_enc.* (d_in, n_latents) resume as today's
    (model.W_enc_T, its transpose): rewritten in the old names with the real writer, the run ends where it would."""
    from cytosae.sae.checkpoint import load_training_state, save_training_state

    st, _ = sorted_store
    src = store_epochs(st, 1, batch_size=64, seed=4, shuffle_tokens=320)
    kw = dict(d_in=D, arch="topk", n_latents=32, seed=4, batch_size=64, k=4, progress=False, lr_warmup_steps=2,
              checkpoint_every=640)
    for name in ("new", "old"):
        train_sae(src, checkpoint_dir=tmp_path / name, max_tokens_this_run=1280, **kw)
    tensors, meta = load_training_state(tmp_path / "old")
    assert "model.W_enc_T" in tensors and "adam.W_enc_T.exp_avg" in tensors
    old = {k.replace("W_enc_T", "W_enc"): (v.t() if k.split(".")[-1] in ("W_enc_T", "exp_avg", "exp_avg_sq")
                                           and "W_enc_T" in k else v) for k, v in tensors.items()}
    meta.pop("checksum", None)
    save_training_state(tmp_path / "old", old, meta)
    a, b = (train_sae(src, checkpoint_dir=tmp_path / name, **kw) for name in ("new", "old"))
    for name, p in a.named_parameters():
        assert torch.equal(p, dict(b.named_parameters())[name]), name


def test_more_tokens_than_the_data_is_an_error(sorted_store, tmp_path):
    st, _ = sorted_store
    with pytest.raises(ValueError, match="asked for 3,000 tokens but 1 epoch.*2,560"):
        train_sae(store_epochs(st, 1, batch_size=64), D, "topk", 32, 3000, batch_size=64, k=4, progress=False)
    plain = list(torch.randn(1000, D).split(100))
    with pytest.raises(ValueError, match="data ran out after 1,000 of the 3,000 tokens"):
        train_sae(plain, D, "topk", 32, 3000, batch_size=64, k=4, progress=False)
    r = CliRunner().invoke(app, ["train", str(st.path), "--out", str(tmp_path / "sae"), "--expansion", "2",
                                 "--k", "2", "--batch-size", "64", "--total-tokens", "3000", "--device", "cpu"])
    assert r.exit_code == 2 and "pass --epochs 2" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "sae" / "sae.safetensors").exists()
    r = CliRunner().invoke(app, ["train", str(st.path), "--out", str(tmp_path / "sae"), "--expansion", "2",
                                 "--k", "2", "--batch-size", "64", "--total-tokens", "3000", "--epochs", "2",
                                 "--shuffle", "320", "--device", "cpu", "--log", "none"])
    assert r.exit_code == 0, r.output
    assert "trained on 3,000 all tokens" in r.output and "2 epoch(s)" in r.output


@pytest.mark.skipif(CUDA, reason="checks the error on a machine without CUDA")
def test_cli_cuda_without_gpu_is_a_one_line_error(sorted_store, tmp_path):
    st, _ = sorted_store
    for cmd in (["train", str(st.path), "--out", str(tmp_path / "s")], ["evaluate", str(tmp_path / "s"), str(st.path)]):
        r = CliRunner().invoke(app, cmd + ["--device", "cuda"])
        assert r.exit_code == 2 and "no CUDA GPU is available" in r.output and "Traceback" not in r.output


def _sparse(n=6000, d=32, n_dirs=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    dirs = torch.nn.functional.normalize(torch.randn(n_dirs, d, generator=g), dim=1)
    idx = torch.stack([torch.randperm(n_dirs, generator=g)[:4] for _ in range(n)])
    return torch.zeros(n, n_dirs).scatter_(1, idx, torch.rand(n, 4, generator=g) + 0.5) @ dirs


ARCH_OPTS = {"relu-l1": dict(l1_coeff=1e-3, lr=2e-3), "jumprelu": dict(l0_coeff=1e-3, lr=2e-3),
             "topk": dict(k=4, lr=5e-3), "batchtopk": dict(k=4, lr=5e-3, threshold_momentum=0.9),
             "matryoshka": dict(k=4, lr=5e-3, threshold_momentum=0.9)}


def _train_and_measure(arch, device, precision):
    x = _sparse()
    sae = train_sae(list(x.split(1000)) * 3, 32, arch, 128, 18000, batch_size=256, progress=False,
                    lr_warmup_steps=10, dead_tokens=2000, dead_feature_window=8, device=device, precision=precision,
                    **ARCH_OPTS[arch])
    assert all(p.dtype == torch.float32 and p.device.type == torch.device(device).type for p in sae.parameters())
    return sae, evaluate_sae(sae, x[:2000].split(1000))["all"]


@pytest.mark.parametrize("arch", ["relu-l1", "topk", "batchtopk"])
def test_bf16_autocast_trains_on_cpu(arch):
    _, fp32 = _train_and_measure(arch, "cpu", "fp32")
    _, bf16 = _train_and_measure(arch, "cpu", "bf16")
    assert bf16["fvu"] < 0.5 and bf16["fvu"] < fp32["fvu"] + 0.1, (fp32, bf16)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("arch", ["relu-l1", "topk", "batchtopk", "jumprelu", "matryoshka"])
def test_cuda_training_each_architecture(arch, precision):
    sae, ev = _train_and_measure(arch, "cuda", precision)
    assert ev["fvu"] < 0.5, ev
    if precision == "fp32" and arch != "jumprelu":  # same numbers as the CPU run, up to float reassociation
        _, cpu = _train_and_measure(arch, "cpu", "fp32")
        assert abs(cpu["fvu"] - ev["fvu"]) < 0.05, (cpu, ev)


# Fingerprints of the same runs by train_sae before the Trainer (commit acab2b4, CPU, 2 threads): device="cpu"
# must keep giving today's results.
BEFORE_TRAINER = {"relu-l1": [-8.92099, 32.00708, 39.22595, -0.50525], "topk": [4.3245, 1.38232, 39.22965, -0.71747],
                  "jumprelu": [4.31967, 1.36951, 39.23408, -0.1169]}


@pytest.mark.parametrize("arch", sorted(BEFORE_TRAINER))
def test_cpu_results_equal_the_pre_trainer_code(arch):
    g = torch.Generator().manual_seed(1)
    x = list((torch.randn(6000, 32, generator=g) * 4 + 1).split(700))
    s = train_sae(x, 32, arch, 96, 5000, seed=3, batch_size=256, lr_warmup_steps=1, progress=False, k=4,
                  dead_feature_window=2, dead_tokens=512, device="cpu")
    with torch.no_grad():
        got = [float(s.W_enc.sum()), float(s.b_dec.sum()), float(s.W_dec[:8].abs().sum()), float(s.b_enc.sum())]
    assert got == pytest.approx(BEFORE_TRAINER[arch], abs=2e-4), got


@pytest.mark.parametrize("momentum, follows", [(None, True), (0.99, False)])
def test_batchtopk_threshold_is_that_of_the_end_of_a_short_run(momentum, follows):
    """The inference threshold must be the trained model's: on a 40-step run a fixed 0.99 EMA still weighs the
    first batches' (larger) thresholds by 0.67; the default scales the average with the run (the last 2 steps)."""
    from cytosae.sae.trainer import threshold_momentum

    g = torch.Generator().manual_seed(0)
    centres = torch.randn(32, 24, generator=g) * 3
    x = centres[torch.randint(0, 32, (40 * 256,), generator=g)] + torch.randn(40 * 256, 24, generator=g)
    batches = list(x.split(256))
    sae = train_sae(iter(batches), 24, "batchtopk", 192, x.shape[0], seed=0, batch_size=256, lr=5e-3, k=4,
                    progress=False, threshold_momentum=momentum)
    assert threshold_momentum(sae.cfg, 40) == (0.5 if momentum is None else 0.99)
    with torch.no_grad():  # the trained model's own batch threshold: the k*N-th largest activation of a batch
        pre = torch.relu((batches[-1] * sae.input_scale - sae.b_dec) @ sae.W_enc + sae.b_enc)
        final = float(pre.flatten().topk(4 * 256).values[-1])
    close = abs(float(sae.threshold) - final) / final < 0.1
    assert close == follows, (float(sae.threshold), final)
    l0 = float((sae.encode(x[-2048:]) > 0).sum(1).float().mean())
    assert (abs(l0 - 4) < 1) == follows, l0
