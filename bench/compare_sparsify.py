"""cytosae's TopK SAE against EleutherAI sparsify's SparseCoder: same data, same settings, one process per run.

    SPARSIFY_DISABLE_TRITON=1 .venv-sparsify/bin/python bench/compare_sparsify.py [--quick] [--tokens N]
        [--epochs E] [--threads T] [--store STORE]

Run from the repository root in the sparsify venv (bench/requirements-sparsify.txt, `make bench-sparsify`);
sparsify is never installed into the project venv. Data, held-out split and evaluation are bench/compare.py's
(one owner): synthetic ViT-like tokens by default, or --store for real tokens held out by whole folders.

Each library keeps its own model, loss and training step:
  ours   cytosae.sae.train_sae(arch="topk", lr_warmup_steps=0), defaults otherwise (as in bench/compare.py).
  theirs sparsify.SparseCoder(d_in, SaeConfig(activation="topk", k, num_latents)) (Linear + ReLU encoder,
         top-k, its FusedEncoder backward, embedding-bag decoder, unit-norm decoder rows, b_dec). Its Trainer
         only trains on a Hugging Face model's hooked activations, so its SAE step is replayed in a plain loop
         over the same batches, line for line as sparsify/trainer.py does it for loss_fn="fvu": b_dec = first
         batch's mean, decoder rows renormalised before each forward, loss = out.fvu (auxk_alpha 0, its
         default), remove_gradient_parallel_to_decoder_directions(), optimizer step, zero_grad.
         Optimizer: torch Adam, constant lr (its Trainer's Adam path would add a linear warm-up + decay, its
         default is Signum + schedule-free; both differ from ours, so both sides use constant-lr Adam).
Timing, peak memory and the dense ceiling are bench/compare.py's (timed_abba, measure, side_summary): every
measured run in its own child process (one untimed warm-up step there), each side at E and 2E epochs, --repeats
times in ABBA order, best counts, all recorded; tokens/s with start-up removed from the two lengths; peak RSS
(VmHWM) of each run's process; the encoder's dense (batch x d) @ (d x n_latents) rate timed in the same run.
Evaluation: bench/compare.py's
evaluate() on the held-out tokens through each model's own encode/decode (theirs: SparseCoder.encode's top-k
scattered into a dense code, decoded by SparseCoder.decode).
--diagnose: also train ours untimed with one default changed at a time (init_b_dec="mean"; normalize_inputs
off; the encoder initialised at 1/sqrt(3) of its unit-norm W_dec^T, the row norm of sparsify's kaiming-uniform
nn.Linear init) and record each held-out FVU, to locate an FVU gap.
Writes bench/results/compare-sparsify.json and prints it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import (REPO, add_shared_args, evaluate, finish_args, load_split, loadavg, make_batches,  # noqa: E402
                     measure, peer_verdict, run_settings, side_summary, train_ours)  # noqa: E402


def import_sparsify():
    """sparsify picks its decoder at import: Triton's kernels are GPU-only, so on CPU its eager
    embedding-bag path must be chosen (SPARSIFY_DISABLE_TRITON=1) before the import."""
    os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
    try:
        import sparsify
    except ImportError as e:
        raise SystemExit(f"sparsify is not importable ({e}); run in .venv-sparsify (`make bench-sparsify`, "
                         "bench/requirements-sparsify.txt)") from e
    return sparsify


def train_theirs(batches: list[torch.Tensor], epochs: int, a) -> tuple[object, float]:
    sp = import_sparsify()
    t0 = time.perf_counter()
    torch.manual_seed(a.seed)
    cfg = sp.SaeConfig(activation="topk", k=a.k, num_latents=a.n_latents, normalize_decoder=True)
    sae = sp.SparseCoder(a.d, cfg, device="cpu", dtype=torch.float32)
    opt = torch.optim.Adam(sae.parameters(), lr=a.lr)
    step = 0
    for _ in range(epochs):
        for x in batches:
            if step == 0:  # its Trainer: "initialize the decoder bias" to the first batch's mean
                sae.b_dec.data = x.mean(0).to(sae.dtype)
            sae.set_decoder_norm_to_unit_norm()
            out = sae(x)
            out.fvu.backward()
            sae.remove_gradient_parallel_to_decoder_directions()
            opt.step()
            opt.zero_grad()
            step += 1
    return sae, time.perf_counter() - t0


def theirs_codec(sae, k: int):
    """(encode, decode) of a SparseCoder over dense (N, n_latents) codes, for the shared evaluate()."""
    def encode(x):
        acts, idx, _ = sae.encode(x)
        return torch.zeros(x.shape[0], sae.num_latents, dtype=acts.dtype).scatter_(1, idx, acts)

    def decode(z):
        acts, idx = z.topk(k, dim=1, sorted=False)  # the same k (value, index) pairs encode scattered
        return sae.decode(acts, idx)
    return encode, decode


def diagnose(batches: list[torch.Tensor], x_test: torch.Tensor, a) -> dict:
    """Held-out FVU/L0 of ours with one default changed at a time (untimed)."""
    import math
    from cytosae.sae.model import SAE

    variants = {"init_b_dec=mean": {"init_b_dec": "mean"}, "normalize_inputs=False": {"normalize_inputs": False},
                "encoder_init_scale=1/sqrt(3)": {}}
    out = {}
    for name, opts in variants.items():
        orig = SAE._init_encoder
        if name.startswith("encoder_init"):  # the one knob train_sae has no option for: scale its init for this run
            SAE._init_encoder = lambda self, w, g: orig(self, w, g) / math.sqrt(3.0)
        try:
            model, _ = train_ours(batches, a.epochs, a, **opts)
        finally:
            SAE._init_encoder = orig
        ev = evaluate(model.encode, model.decode, x_test, a.n_latents)
        out[name] = {k: round(v, 4) for k, v in ev.items()}
        print(f"ours, {name}: {out[name]}", flush=True)
    return out


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shared_args(ap, REPO / "bench" / "results" / "compare-sparsify.json")
    ap.add_argument("--diagnose", action="store_true", help="untimed arms of ours with one default changed each")
    a = ap.parse_args()
    a.arch = "topk"  # train_ours reads it
    return finish_args(a)


def evaluate_side(name: str, model, x_test: torch.Tensor, a) -> dict:
    with torch.inference_mode():
        codec = (model.encode, model.decode) if name == "ours" else theirs_codec(model, a.k)
        return evaluate(*codec, x_test, a.n_latents)


def main() -> None:
    a = parse()
    torch.set_num_threads(a.threads)
    os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # the children inherit it; the JSON records it
    measured = measure(a, {"ours": train_ours, "theirs": train_theirs}, evaluate_side)
    if measured is None:  # a measured child: done
        return
    diag = None
    if a.diagnose:
        x_train, x_test, _ = load_split(a)
        diag = diagnose(make_batches(x_train, a.batch), x_test, a)
    write_result(a, measured["runs"], measured["dense"], diag)


def write_result(a, runs: dict, dense: dict, diag) -> None:
    sides = {name: side_summary(runs[name], a, dense) for name in ("ours", "theirs")}
    ours, theirs = sides["ours"], sides["theirs"]
    verdict, speed = peer_verdict(ours, theirs, dense, "sparsify")
    result = {
        "what": "TopK SAE training throughput (tokens/s) and held-out FVU at equal L0, cytosae vs EleutherAI "
                f"sparsify, same {'real' if a.store else 'synthetic'} tokens/order/settings, one process per run, CPU",
        "library": {"name": "eai-sparsify", "version": metadata.version("eai-sparsify"),
                    "decoder": "eager embedding_bag (SPARSIFY_DISABLE_TRITON="
                               f"{os.environ.get('SPARSIFY_DISABLE_TRITON')})"},
        "cytosae_version": metadata.version("cytosae"),
        "torch": torch.__version__,
        "settings": run_settings(a, runs["ours"]["data"], "Adam (torch)",
                                 ours_options="train_sae(arch='topk', lr_warmup_steps=0); defaults otherwise",
                                 theirs_options="SparseCoder(SaeConfig(activation='topk', k, num_latents, "
                                                "normalize_decoder=True)), its Trainer's fvu step replayed in a "
                                                "plain loop (b_dec = first batch mean, unit-norm decoder each step, "
                                                "loss = fvu, auxk_alpha 0, parallel-gradient removal), torch Adam "
                                                "constant lr"),
        "dense_encoder_product": dense,
        "ours": ours,
        "theirs": theirs,
        "speed_ratio_ours_over_theirs": round(speed, 3),
        **({"ours_one_default_changed_untimed": diag} if diag else {}),
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "loadavg_1_5_15": loadavg(),
                    "python": platform.python_version(), "processor": platform.processor() or platform.machine()},
        "verdict": verdict,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = a.out.with_name(a.out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(a.out)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
