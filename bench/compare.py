"""cytosae's TopK/BatchTopK SAE against overcomplete's: same data, same settings, same process.

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
excluded); one untimed warm-up step per side runs first, then --repeats timed trainings per side
in ABBA order, the best of which counts (the machine may be shared; all times are recorded). Both are then evaluated by the same
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


# ---------------------------------------------------------------------------- main
def loadavg() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def timed_abba(trainers: dict, evaluate_side, batches, a, n_train_tokens: int) -> tuple[dict, dict, dict]:
    """Train both sides `a.repeats` times in ABBA order (ours, theirs, theirs, ours, ...) so drift in the machine's
    load hits both alike; the best time of each side is its figure, all times and the load averages before each
    repeat are recorded. Runs are seeded, so every repeat trains the same model; the first of each side is
    evaluated with `evaluate_side(name, model)`. Returns (times, loads, evals) by side."""
    order = [("ours", "theirs") if r % 2 == 0 else ("theirs", "ours") for r in range(a.repeats)]
    times: dict[str, list[float]] = {"ours": [], "theirs": []}
    loads: dict[str, list[list[float]]] = {"ours": [], "theirs": []}
    evals: dict[str, dict] = {}
    for pair in order:
        for name in pair:
            loads[name].append(loadavg())
            model, secs = trainers[name](batches, a.epochs, a)
            times[name].append(round(secs, 2))
            print(f"{name}: {secs:.1f} s ({n_train_tokens / secs:.0f} tokens/s), load {loadavg()}", flush=True)
            if name not in evals:
                evals[name] = evaluate_side(name, model)
                print(f"{name}: {evals[name]}", flush=True)
            del model
    return times, loads, evals


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


def finish_args(a: argparse.Namespace) -> argparse.Namespace:
    if a.quick:
        a.tokens = 8_192
    if a.store is not None:
        from cytosae.store import ActivationStore
        a.d = ActivationStore(a.store).d_model
    a.n_latents = a.expansion * a.d
    return a


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", choices=("topk", "batchtopk"), default="topk",
                    help="both sides' TopK or BatchTopK SAE (overcomplete's TopKSAE / BatchTopKSAE)")
    add_shared_args(ap, REPO / "bench" / "results" / "compare.json")
    a = finish_args(ap.parse_args())
    torch.set_num_threads(a.threads)
    import_overcomplete()  # imports outside the timed region for both sides
    import cytosae.sae  # noqa: F401

    if a.store is not None:
        x_train, x_test, split = store_data(a.store, a.tokens, a.test_tokens, a.seed)
    else:
        (x_train, x_test), split = make_data(a.tokens, a.test_tokens, a.d, a.seed), None
    batches = [x_train[s:s + a.batch] for s in range(0, a.tokens, a.batch)]
    n_train_tokens = a.epochs * a.tokens

    # untimed warm-up (allocator, BLAS threads, lazy imports) on one batch each
    train_ours(batches[:1], 1, a)
    train_theirs(batches[:1], 1, a)

    def evaluate_side(name, model):
        if name == "ours":
            return evaluate(model.encode, model.decode, x_test, a.n_latents)
        return evaluate(lambda x, m=model: m.encode(x)[1], model.decode, x_test, a.n_latents)

    times, loads, evals = timed_abba({"ours": train_ours, "theirs": train_theirs}, evaluate_side, batches, a,
                                     n_train_tokens)
    sides = {}
    for name in ("ours", "theirs"):
        best = min(times[name])
        ev = evals[name]
        sides[name] = {"train_seconds": best, "tokens_per_second": round(n_train_tokens / best, 1),
                       "train_seconds_all_repeats": times[name],
                       "fvu": round(ev["fvu"], 4), "l0": round(ev["l0"], 2),
                       "dead_fraction": round(ev["dead_fraction"], 4),
                       "loadavg_1_5_15_before_each_repeat": loads[name]}

    model, _ = train_ours(batches, a.epochs, a, default_schedule=True)
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
               + ("Claim holds: ours is faster at equal-or-better FVU and L0, also with default settings."
                  if faster and fvu_ok and l0_ok and defaults_ok
                  else "Claim does NOT hold on this run."))

    result = {
        "what": f"{a.arch} SAE training, cytosae vs overcomplete, same {'real tokens of ' + str(a.store) if a.store else 'synthetic'} "
                f"data/order/settings, one process",
        "library": {"name": "overcomplete", "version": metadata.version("overcomplete")},
        "cytosae_version": metadata.version("cytosae"),
        "torch": torch.__version__,
        "settings": {"arch": a.arch, "d_in": a.d, "n_latents": a.n_latents, "expansion": a.expansion, "k": a.k,
                     "batch_size": a.batch, "optimizer": "Adam", "lr": a.lr, "lr_schedule": "constant",
                     "epochs": a.epochs, "train_tokens": a.tokens, "tokens_trained": n_train_tokens,
                     "steps": a.epochs * len(batches), "heldout_tokens": x_test.shape[0], "dtype": "float32",
                     "device": "cpu", "torch_threads": a.threads, "seed": a.seed, "quick": a.quick,
                     "timing": f"wall-clock, best of {a.repeats} per side in ABBA order, after one untimed "
                               f"warm-up step each; includes model construction and each trainer's own init",
                     "data": f"store {a.store}: held out whole folders (patients) in a seeded order: {split}"
                             if a.store else
                             f"{N_ATOMS} random unit directions, {ACTIVE} active per token (Zipf-like frequency, "
                             f"exponential x lognormal coefficients, non-negative) + N(0, {NOISE}^2) noise",
                     "ours_options": f"train_sae(arch='{a.arch}', lr_warmup_steps=0); defaults otherwise "
                                     "(sparse_kernels=True, normalize_inputs, geometric-median b_dec, AuxK after "
                                     "10M dead tokens, so inactive in this run)",
                     "theirs_options": ("TopKSAE" if a.arch == "topk" else f"BatchTopKSAE(top_k=k x batch = "
                                        f"{a.k * a.batch}, running threshold at evaluation)")
                                       + " default encoder (Linear+ReLU), train_sae with "
                                       "MSE criterion (README), clip_grad=1.0 (default), monitoring=0"},
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
