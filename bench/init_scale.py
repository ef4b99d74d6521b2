"""The TopK family's encoder init scale (issue #21): W_enc = s x W_dec^T, s = 1 (Gao et al., cytosae's default so
far) against s = 1/sqrt(3) (the row norm of sparsify's kaiming-uniform nn.Linear init, where bench/compare_sparsify.py
--diagnose located the whole FVU gap to sparsify on synthetic tokens), on real tokens too.

    python bench/init_scale.py --store bench/runs/deepapl/stores/deepapl [--archs topk,batchtopk] [--threads 1]

Per data set and architecture, ours is trained twice with everything else equal (train_sae's defaults, the
warm-up included, same tokens and order): held-out FVU, L0 and dead fraction from bench/compare.py's evaluate().
Data: bench/compare.py's synthetic tokens (its default run: d=768, 16x, k=32, 65,536 tokens x 3 epochs) and,
with --store, real tokens with whole folders (patients) held out (compare.py's store_data; 6,144 latents,
k=32, 600,000 tokens, one epoch, as compare.py's real-token setting). Writes bench/results/init_scale.json.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import write_result  # noqa: E402
from compare import evaluate, make_data, store_data  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SCALES = {"1": 1.0, "1/sqrt(3)": 1.0 / math.sqrt(3.0)}


def train(x: torch.Tensor, epochs: int, arch: str, n_latents: int, k: int, scale: float, batch: int):
    from cytosae.sae import train_sae

    def stream():
        for _ in range(epochs):
            yield from x.split(batch)

    t0 = time.perf_counter()
    sae = train_sae(stream(), x.shape[1], arch, n_latents, epochs * x.shape[0], seed=0, batch_size=batch, k=k,
                    progress=False, encoder_init_scale=scale)
    return sae, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", type=Path, default=None)
    ap.add_argument("--archs", default="topk")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-synthetic", action="store_true")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "init_scale.json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    sets = {}
    if not a.skip_synthetic:
        tr, te = make_data(65_536, 8_192, 768, 0)
        sets["synthetic (compare.py default)"] = (tr, te, 3, 16, {})
    if a.store is not None:
        tr, te, split = store_data(a.store, 600_000, 65_536, 0)
        sets[f"store {a.store.name}"] = (tr, te, 1, 16, split)
    rows = []
    for name, (tr, te, epochs, expansion, split) in sets.items():
        n = expansion * tr.shape[1]
        for arch in a.archs.split(","):
            for label, scale in SCALES.items():
                sae, secs = train(tr, epochs, arch, n, 32, scale, 4096)
                ev = {k: round(v, 4) for k, v in evaluate(sae.encode, sae.decode, te, n).items()}
                rows.append({"data": name, "arch": arch, "encoder_init_scale": label, "n_latents": n,
                             "train_tokens": epochs * tr.shape[0], "heldout_tokens": te.shape[0],
                             "train_seconds": round(secs, 1), **ev})
                print(rows[-1], flush=True)
    write_result(a.out, {"what": "held-out FVU / L0 / dead fraction of ours with W_enc initialised at s x W_dec^T, "
                                 "everything else train_sae's defaults (k=32, batch 4096, lr 4e-4, warm-up)",
                         "rows": rows})


if __name__ == "__main__":
    main()
