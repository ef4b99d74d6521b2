"""The stats pass against the one product it cannot avoid: (N*257 x 768) @ (768 x 49,152), timed in the same run.

N synthetic images (CLS + 16 x 16 patches, d = 768, imported with the project's writer) through a randomly
initialised SAE of 49,152 latents, for topk (k = 64) and relu-l1. Per architecture:

- ceiling_s: the encoder's addmm alone, over the same batches (what every encoding pass must compute);
- old_s: today's pass before EncodedStore: the SAE's dense encode (TopK: zeros + scatter) and the statistics
  reduced over (b x 257 x 49,152) — the EncodedStore's dense form, the same tensor operations;
- new_s: compute_latent_stats over EncodedStore(store, sae): the TopK family's sparse pairs (one top-k, no dense
  scatter), reduced per image from (latent, value) pairs; relu-l1 stays dense (its activation has no fixed width).
Each timing is the best of --repeats, old and new alternating (ABAB), at --threads torch threads, in CPU seconds
of the process (time.process_time; equal to wall time on an idle core at 1 thread).

    taskset -c 1 python bench/encode.py [--n-images 16] [--batch 8] [--threads 1] [--archs topk,relu-l1]

Writes bench/results/encode.json (or --out).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from _report import write_result

REPO = Path(__file__).resolve().parents[1]
TOKENS, D, N_LATENTS, K = 257, 768, 49_152, 64
# CPU seconds of this process, not wall time: on a shared 2-core machine other work takes the core for seconds at
# a time, and with one torch thread the process's CPU time is what the pass itself costs
CLOCK = time.process_time


def _store(root: Path, n: int):
    from cytosae.store import ActivationStore, import_embeddings

    rng = np.random.default_rng(0)
    np.save(root / "tokens.npy", rng.normal(size=(n, TOKENS, D)).astype(np.float32))
    manifest = pd.DataFrame({"image_id": [f"cell_{i:05d}" for i in range(n)],
                             "label": [f"class_{i % 8}" for i in range(n)]})
    import_embeddings(root / "tokens.npy", manifest, root / "store", dtype="float32", shard_size=64)
    return ActivationStore(root / "store")


def _ceiling(sae, store, batch: int) -> float:
    """CPU seconds of the encoder product alone over the pass's batches (store reads not counted)."""
    total = 0.0
    with torch.inference_mode():
        for _, tokens in store.iter_images(batch):
            x = tokens.reshape(-1, D).float()
            t0 = CLOCK()
            torch.addmm(sae.b_enc, x, sae.W_enc)
            total += CLOCK() - t0
    return total


def _timed(encoded, store) -> float:
    from cytosae.analysis import compute_latent_stats

    t0 = CLOCK()
    compute_latent_stats(encoded, store.images, k=16, dataset="bench")
    return CLOCK() - t0


def measure(arch: str, store, batch: int, repeats: int) -> dict:
    from cytosae.analysis.encoded import EncodedStore
    from cytosae.sae import SAE, SAEConfig

    extra = {"k": K} if arch != "relu-l1" else {}
    sae = SAE(SAEConfig(arch=arch, d_in=D, n_latents=N_LATENTS, **extra), seed=0).eval()
    new = EncodedStore(store, sae, torch.device("cpu"), batch)
    old = EncodedStore.of_function(sae.encode, N_LATENTS, store=store, batch_size=batch)
    ceiling, old_s, new_s = [], [], []
    for _ in range(repeats):
        ceiling.append(_ceiling(sae, store, batch))
        old_s.append(_timed(old, store))
        new_s.append(_timed(new, store))
    c = min(ceiling)
    n_tok = store.n_images * TOKENS
    return {"arch": arch, "k": extra.get("k"), "ceiling_s": round(c, 3), "old_s": round(min(old_s), 3),
            "new_s": round(min(new_s), 3), "old_over_ceiling": round(min(old_s) / c, 2),
            "new_over_ceiling": round(min(new_s) / c, 2), "speedup": round(min(old_s) / min(new_s), 2),
            "ceiling_gflops": round(2 * n_tok * D * N_LATENTS / c / 1e9, 1),
            "all_s": {"ceiling": [round(v, 3) for v in ceiling], "old": [round(v, 3) for v in old_s],
                      "new": [round(v, 3) for v in new_s]}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-images", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8, help="images per encoding batch (steps.common.analysis_batch)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--archs", default="topk,relu-l1")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "encode.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        store = _store(Path(tmp), args.n_images)
        rows = [measure(a, store, args.batch, args.repeats) for a in args.archs.split(",")]
    write_result(args.out, {"what": "stats pass vs its encoder product (addmm) in the same run, CPU seconds; old = "
                                    "dense encode + dense reductions, new = EncodedStore (sparse pairs for topk)",
                            "n_images": args.n_images, "tokens": TOKENS, "d_in": D, "n_latents": N_LATENTS,
                            "batch_images": args.batch, "results": rows})


if __name__ == "__main__":
    main()
