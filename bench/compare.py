"""cytosae's TopK/BatchTopK SAE against overcomplete's: same data, same settings, each run in its own process.

    .venv-bench/bin/python bench/compare.py [--arch topk|batchtopk] [--quick] [--tokens N] [--epochs E] [--store STORE]

Run from the repository root in the benchmark venv (bench/requirements-compare.txt); the
comparison library is never installed into the project venv.

Data: synthetic ViT-like activations, d=768: each token is a sparse non-negative combination of
~32 of 3,000 random unit directions (Zipf-like direction frequencies, exponential coefficients)
plus Gaussian noise; fixed seed. Both trainers see the same (4096, 768) batches in the same order
for the same number of epochs. Settings: n_latents = 16 x 768 = 12,288, k = 32, Adam lr 4e-4
constant, float32, CPU, torch.set_num_threads(2).

Each library keeps its own model, loss and training step:
  ours   cytosae.sae.train_sae(arch="topk") with its defaults (sparse kernels, input scaling,
         geometric-median b_dec, decoder-gradient projection + renormalisation), except
         lr_warmup_steps=0 so both run a constant lr 4e-4.
  theirs overcomplete.sae.TopKSAE (default encoder: Linear + ReLU, then top-k; unit-norm
         dictionary, no decoder bias) trained by overcomplete.sae.train_sae with the plain MSE
         criterion of its README, its default clip_grad=1.0 and monitoring=0 (no per-step metrics).
Training time is wall-clock from model construction to the trained model (data creation
excluded). Every measured training runs in its own child process of this script (`--child`, started by
timed_abba): it makes the data, runs one untimed warm-up step, then the timed training, and reports its peak
RSS (VmHWM, reset after the data was made). Each side trains --epochs E and 2E epochs, --repeats times, in
ABBA order; the best time of each length counts (the machine may be shared; all times are recorded).
tokens/s = E x tokens / t_E (start-up included); with start-up removed = E x tokens / (t_2E - t_E). The
dense encoder product (batch x d) @ (d x n_latents) is timed (torch.addmm) before and after the runs: its
best rate / (2 d n_latents) is the ceiling tokens/s, and every tokens/s is also given as a fraction of it.
The first run of each side is evaluated by the same
function on 8,192 held-out tokens through each model's own encode/decode (inference mode).
Quality with our *default* schedule is checked too: "ours_defaults" is the same cytosae training with the
default warm-up (min(500, 5% of the steps)), evaluated on the same held-out tokens, untimed. (A fixed
500-step warm-up once cost held-out FVU 0.232 vs overcomplete's 0.084 on a 146-step real run.)

--store STORE: real tokens instead of synthetic ones, from an activation store (`cytosae extract`, e.g. of
../shared/data/deepapl): whole folders (patients there) held out in a seeded order until >= --test-tokens
tokens, --tokens tokens of the other folders' images (seeded order, shuffled at token level) for training;
d is the store's. The issue's real-token setting (DeepAPL through random DinoBloom-S, 6,144 latents, k=32,
600,000 tokens, one epoch = 146 steps, held-out FVU on other patients' cells):
    .venv-bench/bin/python bench/compare.py --store STORE --tokens 600000 --test-tokens 65536 --epochs 1 --expansion 16
--arch batchtopk: overcomplete's BatchTopKSAE keeps k x batch activations per batch (its top_k), ours k per
token on average; both use a threshold at evaluation, so L0 there is measured, not set.
Writes bench/results/compare.json and prints it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
N_ATOMS = 3000
ACTIVE = 32
NOISE = 0.05


# ---------------------------------------------------------------------------- data
def make_data(n_train: int, n_test: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse non-negative combinations of random unit directions plus noise (train, held-out)."""
    g = torch.Generator().manual_seed(seed)
    atoms = torch.randn(N_ATOMS, d, generator=g)
    atoms /= atoms.norm(dim=1, keepdim=True)
    freq = (torch.arange(N_ATOMS, dtype=torch.float32) + 10.0).pow(-0.7)  # some directions far more common
    scale = torch.empty(N_ATOMS).log_normal_(0.0, 0.5, generator=g)       # per-direction typical magnitude
    n = n_train + n_test
    out = torch.empty(n, d)
    chunk = 8192
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        idx = torch.multinomial(freq.expand(m, N_ATOMS), ACTIVE, replacement=False, generator=g)
        coef = torch.empty(m, ACTIVE).exponential_(1.0, generator=g) * scale[idx]
        codes = torch.zeros(m, N_ATOMS).scatter_(1, idx, coef)
        out[s:s + m] = codes @ atoms + NOISE * torch.randn(m, d, generator=g)
    return out[:n_train].contiguous(), out[n_train:].contiguous()


def store_data(path: Path, n_train: int, n_test: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(train, held-out, split) tokens of a store. Held out: whole folders (patients, in a class-per-folder or
    patient-per-folder layout; whole images when ids have no folder) in a seeded order until >= n_test tokens;
    training: the other folders' images in a seeded order until n_train tokens, shuffled at token level."""
    from cytosae.store import ActivationStore

    st = ActivationStore(path)
    ids = st.image_ids
    group = [i.split("/", 1)[0] if "/" in i else i for i in ids]
    g = torch.Generator().manual_seed(seed)
    groups = sorted(set(group))
    held, held_tokens = set(), 0
    for j in torch.randperm(len(groups), generator=g).tolist():
        if held_tokens >= n_test:
            break
        held.add(groups[j])
        held_tokens += st.n_tokens * group.count(groups[j])
    train_ids = [ids[j] for j in torch.randperm(len(ids), generator=g).tolist() if group[j] not in held]
    train_ids = set(train_ids[:-(-n_train // st.n_tokens)])
    if len(train_ids) * st.n_tokens < n_train:
        raise SystemExit(f"{path}: {len(train_ids) * st.n_tokens:,} tokens outside the held-out folders; "
                         f"asked for {n_train:,}")
    train, test = [], []
    for batch_ids, block in st.iter_images(batch_size=64):
        for i, toks in zip(batch_ids, block):
            if i in train_ids:
                train.append(toks)
            elif (i.split("/", 1)[0] if "/" in i else i) in held:
                test.append(toks)
    x_train, x_test = torch.cat(train)[:n_train], torch.cat(test)
    x_train = x_train[torch.randperm(x_train.shape[0], generator=g)].contiguous()
    split = {"heldout_folders": len(held), "heldout_images": len(test), "heldout_tokens": x_test.shape[0],
             "train_images": len(train), "folders": len(groups)}
    return x_train, x_test, split


# ---------------------------------------------------------------------------- shared evaluation
@torch.no_grad()
def evaluate(encode, decode, x: torch.Tensor, n_latents: int, batch: int = 4096) -> dict:
    """FVU = sum||x - x_hat||^2 / sum||x - mean x||^2; L0 = mean non-zero latents per token;
    dead_fraction = latents that never fire on these tokens. encode/decode are the model's own."""
    mean = x.mean(0)
    sse = sst = 0.0
    nnz = 0
    fired = torch.zeros(n_latents, dtype=torch.bool)
    for s in range(0, x.shape[0], batch):
        xb = x[s:s + batch]
        z = encode(xb)
        assert z.shape == (xb.shape[0], n_latents), z.shape
        x_hat = decode(z)
        sse += float((xb - x_hat).double().pow(2).sum())
        sst += float((xb - mean).double().pow(2).sum())
        active = z != 0
        nnz += int(active.sum())
        fired |= active.any(0)
    return {"fvu": sse / sst, "l0": nnz / x.shape[0], "dead_fraction": 1.0 - float(fired.float().mean())}


# ---------------------------------------------------------------------------- the two trainers
def train_ours(batches: list[torch.Tensor], epochs: int, a, default_schedule: bool = False,
               **options) -> tuple[object, float]:
    from cytosae.sae import train_sae

    def stream():
        for _ in range(epochs):
            yield from batches

    total = epochs * sum(b.shape[0] for b in batches)
    t0 = time.perf_counter()
    schedule = {} if default_schedule else {"lr_warmup_steps": 0}
    sae = train_sae(stream(), a.d, a.arch, a.n_latents, total, seed=a.seed, batch_size=a.batch, lr=a.lr, k=a.k,
                    progress=False, **schedule, **options)
    return sae, time.perf_counter() - t0


def import_overcomplete():
    """overcomplete 0.3.0's package __init__ imports its visualization module, which calls
    matplotlib.cm.get_cmap (removed in matplotlib 3.9; cytosae pins 3.11). Restore that one name
    (as matplotlib.colormaps[name]) before importing; nothing in its SAE code touches matplotlib."""
    import matplotlib
    import matplotlib.cm
    if not hasattr(matplotlib.cm, "get_cmap"):
        matplotlib.cm.get_cmap = lambda name=None, lut=None: matplotlib.colormaps[name]
    import overcomplete.sae
    return overcomplete.sae


def train_theirs(batches: list[torch.Tensor], epochs: int, a) -> tuple[object, float]:
    oc = import_overcomplete()

    def criterion(x, x_hat, pre_codes, codes, dictionary):  # overcomplete README's TopK criterion
        return (x - x_hat).square().mean()

    t0 = time.perf_counter()
    torch.manual_seed(a.seed)
    if a.arch == "topk":
        model = oc.TopKSAE(a.d, nb_concepts=a.n_latents, top_k=a.k, device="cpu")
    else:  # its top_k counts the activations kept over the whole batch
        model = oc.BatchTopKSAE(a.d, nb_concepts=a.n_latents, top_k=a.k * a.batch, device="cpu")
    opt = torch.optim.Adam(model.parameters(), lr=a.lr)
    oc.train_sae(model, batches, criterion, opt, nb_epochs=epochs, monitoring=0, device="cpu")
    model.eval()  # fuses the (normalised) dictionary, as its inference uses
    return model, time.perf_counter() - t0


# ---------------------------------------------------------------------------- measuring (shared by every peer bench)
CHILD_TAG = "COMPARE_CHILD_RESULT "


def loadavg() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def load_split(a) -> tuple[torch.Tensor, torch.Tensor, dict | None]:
    """(train, held-out, split) tokens of the run: the store's (--store) or the synthetic ones."""
    if a.store is not None:
        return store_data(a.store, a.tokens, a.test_tokens, a.seed)
    return (*make_data(a.tokens, a.test_tokens, a.d, a.seed), None)


def make_batches(x_train: torch.Tensor, batch: int) -> list[torch.Tensor]:
    return [x_train[s:s + batch] for s in range(0, x_train.shape[0], batch)]


def dense_rate(a, repeats: int = 7) -> float:
    """GFLOP/s of the one dense product a TopK step cannot avoid, the encoder's (batch x d) @ (d x n_latents):
    torch.addmm into a preallocated output at the run's thread count, best of `repeats` after one warm-up."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(a.batch, a.d, generator=g), torch.randn(a.d, a.n_latents, generator=g)
    bias, out = torch.zeros(a.n_latents), torch.empty(a.batch, a.n_latents)
    torch.addmm(bias, x, w, out=out)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.addmm(bias, x, w, out=out)
        best = min(best, time.perf_counter() - t0)
    return 2 * a.batch * a.d * a.n_latents / best / 1e9


def child_main(a, trainers: dict, evaluate_side) -> None:
    """One measured training in a fresh process (`--child SIDE:EPOCHS:EVAL`, started by timed_abba), so that its
    peak memory is that side's alone: data made or read (untimed, before the peak is reset), one untimed warm-up
    step, the timed training, VmHWM, then the shared evaluation if asked; one tagged JSON line on stdout."""
    from _report import peak_rss_gib, reset_peak_rss

    name, epochs, want_eval = a.child.split(":")
    x_train, x_test, split = load_split(a)
    batches = make_batches(x_train, a.batch)
    base = reset_peak_rss()
    trainers[name](batches[:1], 1, a)  # warm-up: allocator, BLAS threads, lazy imports
    model, secs = trainers[name](batches, int(epochs), a)
    peak = peak_rss_gib()
    ev = evaluate_side(name, model, x_test, a) if want_eval == "1" else None
    print(CHILD_TAG + json.dumps({"seconds": secs, "peak_rss_gib": peak, "start_rss_gib": base, "eval": ev,
                                  "steps_per_epoch": len(batches), "heldout_tokens": x_test.shape[0],
                                  "split": split}), flush=True)


def run_child(a, name: str, epochs: int, want_eval: bool) -> dict:
    cmd = [sys.executable, sys.argv[0], *a.argv, "--child", f"{name}:{epochs}:{int(want_eval)}"]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    lines = proc.stdout.splitlines()
    tagged = [ln[len(CHILD_TAG):] for ln in lines if ln.startswith(CHILD_TAG)]
    for ln in lines:  # the child's own output, passed on
        if not ln.startswith(CHILD_TAG):
            print(ln, flush=True)
    if proc.returncode != 0 or not tagged:
        raise SystemExit(f"measured run {name} x {epochs} epochs failed (exit {proc.returncode}): {' '.join(cmd)}")
    return json.loads(tagged[-1])


def timed_abba(a) -> dict:
    """Each side trains `a.epochs` and 2 x `a.epochs` epochs, `a.repeats` times, in ABBA order (ours, theirs,
    theirs, ours, ...) so drift in the machine's load hits both alike, every run in its own child process. The best
    time of each length counts (all are recorded, with the load average before each run); the first run of each
    side is evaluated. Returns, by side: seconds by epochs, loads, peak and start RSS of every run, its evaluation."""
    lengths = (a.epochs, 2 * a.epochs)
    runs = {name: {"seconds": {e: [] for e in lengths}, "loads": [], "peak_rss_gib": [], "start_rss_gib": [],
                   "eval": None} for name in ("ours", "theirs")}
    for r in range(a.repeats):
        for name in (("ours", "theirs") if r % 2 == 0 else ("theirs", "ours")):
            side = runs[name]
            for e in lengths:
                side["loads"].append(loadavg())
                res = run_child(a, name, e, want_eval=side["eval"] is None)
                side["seconds"][e].append(round(res["seconds"], 3))
                side["peak_rss_gib"].append(round(res["peak_rss_gib"], 3))
                side["start_rss_gib"].append(None if res["start_rss_gib"] is None else round(res["start_rss_gib"], 3))
                side["eval"] = side["eval"] or res["eval"]
                side["data"] = {k: res[k] for k in ("steps_per_epoch", "heldout_tokens", "split")}
                print(f"{name} x {e} epochs: {res['seconds']:.1f} s ({e * a.tokens / res['seconds']:.0f} tokens/s), "
                      f"peak RSS {res['peak_rss_gib']:.2f} GiB, load {loadavg()}", flush=True)
    return runs


def measure(a, trainers: dict, evaluate_side) -> dict | None:
    """The measured part of every peer bench. In a child (--child): one training, reported on stdout; None.
    In the parent: the dense encoder-product rate, the ABBA children (timed_abba), the rate again;
    {"runs": by side, "dense": the rate and the tokens/s it allows}."""
    if a.child:
        child_main(a, trainers, evaluate_side)
        return None
    before = dense_rate(a)
    runs = timed_abba(a)
    after = dense_rate(a)
    best = max(before, after)
    dense = {"product": f"torch.addmm, ({a.batch} x {a.d}) @ ({a.d} x {a.n_latents}), float32, "
                        f"{torch.get_num_threads()} threads, best of 7",
             "gflops_before_runs": round(before, 1), "gflops_after_runs": round(after, 1),
             "gflops_best": round(best, 1),
             "ceiling_tokens_per_second": round(best * 1e9 / (2 * a.d * a.n_latents), 1),
             "what": "tokens/s if a step cost only the one dense product a TopK step cannot avoid (the encoder's, "
                     "forward); ceiling = rate / (2 x d x n_latents)"}
    return {"runs": runs, "dense": dense}


def side_summary(run: dict, a, dense: dict) -> dict:
    """One side's figures: best wall-clock tokens/s at `a.epochs` epochs (start-up included, as before);
    start-up removed = (t_2E - t_E) / (tokens_2E - tokens_E) over the best times; each also as a fraction of the
    dense ceiling; held-out FVU/L0/dead fraction; peak RSS of the training process, and above its start."""
    e1, e2 = a.epochs, 2 * a.epochs
    t1, t2 = min(run["seconds"][e1]), min(run["seconds"][e2])
    tps = e1 * a.tokens / t1
    steady = (e2 - e1) * a.tokens / (t2 - t1) if t2 > t1 else None
    ceiling = dense["ceiling_tokens_per_second"]
    ev = run["eval"]
    above = [p - s for p, s in zip(run["peak_rss_gib"], run["start_rss_gib"]) if s is not None]
    return {"train_seconds": t1, "tokens_per_second": round(tps, 1),
            "train_seconds_all_repeats": run["seconds"][e1],
            "train_seconds_2x_epochs_all_repeats": run["seconds"][e2],
            "tokens_per_second_startup_removed": None if steady is None else round(steady, 1),
            "fraction_of_dense_ceiling": round(tps / ceiling, 3),
            "fraction_of_dense_ceiling_startup_removed": None if steady is None else round(steady / ceiling, 3),
            "fvu": round(ev["fvu"], 4), "l0": round(ev["l0"], 2), "dead_fraction": round(ev["dead_fraction"], 4),
            "peak_rss_gib": max(run["peak_rss_gib"]),
            "training_rss_gib_above_start": round(max(above), 3) if above else None,
            "loadavg_1_5_15_before_each_run": run["loads"]}


def speed_sentence(ours: dict, theirs: dict, dense: dict) -> str:
    """The verdict's clause on start-up-free speed and the dense ceiling, the same words in every peer bench."""
    def f(v):
        return "n/a" if v is None else f"{v:.0f}"
    return (f"Start-up removed: {f(ours['tokens_per_second_startup_removed'])} vs "
            f"{f(theirs['tokens_per_second_startup_removed'])} tokens/s; dense encoder product "
            f"{dense['gflops_best']:.0f} GFLOP/s allows {dense['ceiling_tokens_per_second']:.0f} tokens/s, ours at "
            f"{ours['fraction_of_dense_ceiling_startup_removed']} of it, theirs at "
            f"{theirs['fraction_of_dense_ceiling_startup_removed']} (start-up removed). ")


def peer_verdict(ours: dict, theirs: dict, dense: dict, peer: str) -> tuple[str, float]:
    """(the verdict sentence, the speed ratio ours / theirs) in the same words for every peer: faster at
    equal-or-better held-out FVU (within 0.005) and L0 (within 0.5)?"""
    speed = ours["tokens_per_second"] / theirs["tokens_per_second"]
    fvu_ok = ours["fvu"] <= theirs["fvu"] + 0.005
    l0_ok = ours["l0"] <= theirs["l0"] + 0.5
    return ((f"ours is {speed:.2f}x {'faster' if speed > 1 else 'as fast or slower'} than {peer} "
             f"({ours['tokens_per_second']:.0f} vs {theirs['tokens_per_second']:.0f} tokens/s); "
             f"held-out FVU {ours['fvu']:.4f} vs {theirs['fvu']:.4f} "
             f"({'equal or better' if fvu_ok else 'WORSE'} within 0.005); "
             f"L0 {ours['l0']:.2f} vs {theirs['l0']:.2f} ({'ok' if l0_ok else 'HIGHER'} at <= theirs + 0.5). "
             + speed_sentence(ours, theirs, dense)
             + ("Claim holds: ours is faster at equal-or-better FVU and L0." if speed > 1 and fvu_ok and l0_ok
                else "Claim does NOT hold on this run.")), speed)


def run_settings(a, info: dict, optimizer: str, **options: str) -> dict:
    """The run's settings as every peer bench records them: shape, optimisation, tokens, timing and data (`info`:
    a measured child's data facts); `options`: how each side was set up (ours_options, theirs_options)."""
    data = (f"store {a.store}: held out whole folders (patients) in a seeded order: {info['split']}" if a.store
            else f"synthetic: {N_ATOMS} random unit directions, {ACTIVE} active per token (Zipf-like frequency, "
                 f"exponential x lognormal coefficients, non-negative) + N(0, {NOISE}^2) noise")
    return {"arch": a.arch, "d_in": a.d, "n_latents": a.n_latents, "expansion": a.expansion, "k": a.k,
            "batch_size": a.batch, "optimizer": optimizer, "lr": a.lr, "lr_schedule": "constant",
            "epochs": a.epochs, "train_tokens": a.tokens, "tokens_trained": a.epochs * a.tokens,
            "steps": a.epochs * info["steps_per_epoch"], "heldout_tokens": info["heldout_tokens"],
            "dtype": "float32", "device": "cpu", "torch_threads": a.threads, "seed": a.seed, "quick": a.quick,
            "data": data, "timing": TIMING.format(repeats=a.repeats, e1=a.epochs, e2=2 * a.epochs), **options}


TIMING = ("wall-clock, every measured run in its own process (started by the parent; data made and one untimed "
          "warm-up step there first); best of {repeats} per side and length in ABBA order, at {e1} and {e2} epochs; "
          "tokens/s includes model construction and each side's own init; start-up removed = "
          "(t_{e2} - t_{e1}) / (tokens_{e2} - tokens_{e1}); peak RSS = VmHWM of the run's process, reset after its "
          "data was made")


def add_shared_args(ap: argparse.ArgumentParser, out: Path) -> None:
    """The settings every peer comparison takes (compare.py, compare_sparsify.py): one definition of the run."""
    ap.add_argument("--tokens", type=int, default=65_536)
    ap.add_argument("--test-tokens", type=int, default=8_192)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--expansion", type=int, default=16)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--lr", type=float, default=4e-4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=2, help="timed trainings per side (ABBA order); best counts")
    ap.add_argument("--quick", action="store_true", help="8,192 training tokens: a smoke run")
    ap.add_argument("--store", type=Path, default=None, help="real tokens from this activation store")
    ap.add_argument("--out", type=Path, default=out)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)  # SIDE:EPOCHS:EVAL, set by timed_abba only


def finish_args(a: argparse.Namespace) -> argparse.Namespace:
    a.argv = [x for x in sys.argv[1:]]  # what each measured child is started with (plus --child)
    if a.quick:
        a.tokens = 8_192
    if a.store is not None:
        from cytosae.store import ActivationStore
        a.d = ActivationStore(a.store).d_model
    a.n_latents = a.expansion * a.d
    return a


def evaluate_side(name: str, model, x_test: torch.Tensor, a) -> dict:
    if name == "ours":
        return evaluate(model.encode, model.decode, x_test, a.n_latents)
    return evaluate(lambda x, m=model: m.encode(x)[1], model.decode, x_test, a.n_latents)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", choices=("topk", "batchtopk"), default="topk",
                    help="both sides' TopK or BatchTopK SAE (overcomplete's TopKSAE / BatchTopKSAE)")
    add_shared_args(ap, REPO / "bench" / "results" / "compare.json")
    a = finish_args(ap.parse_args())
    torch.set_num_threads(a.threads)
    measured = measure(a, {"ours": train_ours, "theirs": train_theirs}, evaluate_side)
    if measured is None:  # a measured child: done
        return
    runs, dense = measured["runs"], measured["dense"]
    sides = {name: side_summary(runs[name], a, dense) for name in ("ours", "theirs")}

    x_train, x_test, _ = load_split(a)  # the untimed run with our default schedule
    model, _ = train_ours(make_batches(x_train, a.batch), a.epochs, a, default_schedule=True)
    ev = evaluate(model.encode, model.decode, x_test, a.n_latents)
    print(f"ours_defaults: {ev}", flush=True)
    sides["ours_defaults"] = {"fvu": round(ev["fvu"], 4), "l0": round(ev["l0"], 2),
                              "dead_fraction": round(ev["dead_fraction"], 4),
                              "schedule": "default warm-up min(500, ceil(5% of steps)), untimed"}
    ours, theirs = sides["ours"], sides["theirs"]
    speed = ours["tokens_per_second"] / theirs["tokens_per_second"]
    faster = speed > 1.0
    fvu_ok = ours["fvu"] <= theirs["fvu"] + 0.005
    l0_ok = ours["l0"] <= theirs["l0"] + 0.5
    defaults_ok = sides["ours_defaults"]["fvu"] <= theirs["fvu"] + 0.005
    verdict = (f"ours is {speed:.2f}x {'faster' if faster else 'as fast or slower'} than overcomplete "
               f"({ours['tokens_per_second']:.0f} vs {theirs['tokens_per_second']:.0f} tokens/s); "
               f"FVU {ours['fvu']:.4f} vs {theirs['fvu']:.4f} ({'equal or better' if fvu_ok else 'WORSE'} within 0.005); "
               f"L0 {ours['l0']:.2f} vs {theirs['l0']:.2f} ({'ok' if l0_ok else 'HIGHER'} at <= theirs + 0.5); "
               f"with our default schedule FVU {sides['ours_defaults']['fvu']:.4f} "
               f"({'equal or better' if defaults_ok else 'WORSE'} within 0.005). "
               + speed_sentence(ours, theirs, dense)
               + ("Claim holds: ours is faster at equal-or-better FVU and L0, also with default settings."
                  if faster and fvu_ok and l0_ok and defaults_ok
                  else "Claim does NOT hold on this run."))

    result = {
        "what": f"{a.arch} SAE training, cytosae vs overcomplete, same {'real tokens of ' + str(a.store) if a.store else 'synthetic'} "
                f"data/order/settings, each measured run in its own process",
        "library": {"name": "overcomplete", "version": metadata.version("overcomplete")},
        "cytosae_version": metadata.version("cytosae"),
        "torch": torch.__version__,
        "settings": run_settings(a, runs["ours"]["data"], "Adam",
                                 ours_options=f"train_sae(arch='{a.arch}', lr_warmup_steps=0); defaults otherwise "
                                              "(sparse_kernels=True, normalize_inputs, geometric-median b_dec, "
                                              "AuxK after 10M dead tokens, so inactive in this run)",
                                 theirs_options=("TopKSAE" if a.arch == "topk" else f"BatchTopKSAE(top_k=k x batch "
                                                 f"= {a.k * a.batch}, running threshold at evaluation)")
                                 + " default encoder (Linear+ReLU), train_sae with MSE criterion (README), "
                                 "clip_grad=1.0 (default), monitoring=0"),
        "dense_encoder_product": dense,
        "ours": ours,
        "ours_defaults": sides["ours_defaults"],
        "theirs": theirs,
        "speed_ratio_ours_over_theirs": round(speed, 3),
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "loadavg_1_5_15": loadavg(),
                    "python": platform.python_version(), "processor": platform.processor() or platform.machine()},
        "verdict": verdict,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
