"""Whole-dataset training on a store larger than memory: bounded RSS and a reader that keeps the trainer busy.

    python bench/scale.py --gb 10.5 [--device auto] [--epochs 2]     # the full check (> 10 GB store)
    python bench/scale.py --gb 0.5 --device cpu                     # a small version (minutes on 2 cores)

1. Writes a synthetic (N, 257, d) float16 token array in chunks (np.lib.format.open_memmap), imports it with
   cytosae.store.import_embeddings (the project's own writer) and deletes the array.
2. Times the reader alone: one epoch of store_epochs (random image order over all shards + the 262,144-token
   shuffle buffer) without training.
3. Trains a TopK SAE for --epochs epochs on the store in a child process and reports its peak RSS
   (VmHWM of that process: ru_maxrss is no use here, as Linux carries the parent's high-water mark across
   fork/vfork + exec, and the parent has just written the store through a memory map; the first 10.5 GB run
   reported 11.2 GiB that way), tokens/s, and the time the trainer waited for the reader per step
   (Trainer.data_wait_s / steps; the reader runs one thread ahead of the trainer).
Writes bench/results/scale.json. The store lives in --work (default bench/runs/scale, git-ignored).
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from _report import peak_rss_gib, write_result

REPO = Path(__file__).resolve().parents[1]
RSS_LIMIT_GIB = 4.0


def make_store(work: Path, gb: float, d: int, tokens: int, seed: int) -> Path:
    import pandas as pd

    from cytosae.store import import_embeddings

    store = work / "store"
    if (store / "manifest.json").is_file():
        return store
    bytes_per_image = tokens * d * 2
    n = max(1, math.ceil(gb * 1e9 / bytes_per_image))
    arr_path = work / "tokens.npy"
    arr = np.lib.format.open_memmap(arr_path, mode="w+", dtype=np.float16, shape=(n, tokens, d))
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(64, d)).astype(np.float32) * 2  # some structure: 64 "cell types"
    for s in range(0, n, 256):
        e = min(n, s + 256)
        kind = rng.integers(0, 64, size=e - s)
        arr[s:e] = (centres[kind][:, None, :] + rng.normal(size=(e - s, tokens, d)).astype(np.float32)).astype(np.float16)
    arr.flush()
    del arr
    table = pd.DataFrame({"image_id": [f"img{i:07d}.png" for i in range(n)]})
    import_embeddings(arr_path, table, store, source="bench/scale.py synthetic")
    arr_path.unlink()
    return store


def reader_rate(store_path: Path, batch: int, seconds: float) -> dict:
    from cytosae.sae import store_epochs
    from cytosae.store import ActivationStore

    st = ActivationStore(store_path)
    src = store_epochs(st, 1, batch_size=batch, seed=0)
    t0, n = time.perf_counter(), 0
    for b in src.make(0):
        n += b.shape[0]
        if time.perf_counter() - t0 > seconds:
            break
    dt = time.perf_counter() - t0
    return {"tokens": n, "seconds": round(dt, 2), "tokens_per_s": round(n / dt, 1)}


def worker(args) -> None:
    """Runs in its own process so ru_maxrss is the training's alone."""
    import torch

    from cytosae.sae import SAEConfig, Trainer, store_epochs
    from cytosae.store import ActivationStore

    torch.set_num_threads(args.threads) if args.threads else None
    st = ActivationStore(args.store)
    src = store_epochs(st, args.epochs, batch_size=args.batch, seed=0)
    total = args.max_tokens or src.total_tokens
    cfg = SAEConfig(arch="topk", d_in=st.d_model, n_latents=st.d_model * args.expansion, k=args.k)
    trainer = Trainer(cfg, src.total_tokens, batch_size=args.batch, device=args.device, precision=args.precision,
                      progress=False, log_every=10**9)
    t0 = time.perf_counter()
    trainer.fit(src, max_tokens_this_run=total)
    wall = time.perf_counter() - t0
    json.dump({"steps": trainer.step, "tokens": trainer.tokens_seen, "wall_s": round(wall, 1),
               "tokens_per_s": round(trainer.tokens_seen / wall, 1),
               "reader_wait_s_per_step": round(trainer.data_wait_s / max(trainer.step, 1), 4),
               "reader_wait_fraction": round(trainer.data_wait_s / wall, 4),
               "peak_rss_gib": round(peak_rss_gib(), 3), "peak_rss_source": "VmHWM of the training process",
               "device": str(trainer.device)}, sys.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=10.5, help="store size in GB (float16 tokens)")
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--tokens", type=int, default=257, help="tokens per image")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--expansion", type=int, default=8)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--max-tokens", type=int, default=0, help="stop training after this many tokens (0 = all epochs)")
    ap.add_argument("--reader-seconds", type=float, default=20.0)
    ap.add_argument("--work", type=Path, default=REPO / "bench" / "runs" / "scale")
    ap.add_argument("--keep", action="store_true", help="keep the store afterwards")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "scale.json")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--store", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    store = make_store(args.work, args.gb, args.d, args.tokens, seed=0)
    build_s = time.perf_counter() - t0
    store_bytes = sum(f.stat().st_size for f in store.glob("*.safetensors"))
    reader = reader_rate(store, args.batch, args.reader_seconds)
    cmd = [sys.executable, __file__, "--worker", "--store", str(store)] + [
        f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
        if k in ("epochs", "expansion", "k", "batch", "device", "precision", "threads", "max_tokens")]
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0:
        sys.exit(f"training worker failed:\n{run.stderr[-3000:]}")
    train = json.loads(run.stdout.strip().splitlines()[-1])
    result = {
        "what": f"TopK SAE ({args.expansion}x, k={args.k}, batch {args.batch}) trained for {args.epochs} epoch(s) on a "
                f"synthetic {store_bytes / 1e9:.2f} GB float16 store (d={args.d}, {args.tokens} tokens/image), images "
                f"read in a new random order each epoch",
        "store_gb": round(store_bytes / 1e9, 3), "store_build_s": round(build_s, 1),
        "reader_alone": reader, "training": train,
        "rss_limit_gib": RSS_LIMIT_GIB, "rss_within_limit": train["peak_rss_gib"] < RSS_LIMIT_GIB,
        "command": " ".join(["python bench/scale.py"] + sys.argv[1:]),
    }
    if not args.keep:
        shutil.rmtree(store)
    write_result(args.out, result)


if __name__ == "__main__":
    main()
