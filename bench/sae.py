"""SAE training speed against this machine's float32 matmul ceiling, and sparse vs dense TopK kernels.

    python bench/sae.py [--d 768 --expansion 64 --batch 4096 --steps 4] [--quick]

FLOPs per token of one dense training step = 10 * d * n_latents: five (batch x d x n) matmuls of
2 FLOPs per multiply-add (encoder forward, decoder forward, decoder weight gradient, gradient into
the latents, encoder weight gradient; no gradient flows into the inputs). The ceiling is the best
torch.mm rate over the same shapes. Steps 2..steps are timed (the first includes initialisation) at the default logging interval.
Writes bench/results/sae.json.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from _report import write_result

REPO = Path(__file__).resolve().parents[1]


def matmul_ceiling(batch: int, d: int, n: int, repeats: int = 3) -> float:
    """Best GFLOP/s of torch.mm over the three shapes an SAE step multiplies."""
    a, w = torch.randn(batch, d), torch.randn(d, n)
    z, wt = torch.randn(batch, n), torch.randn(n, d)
    best = 0.0
    for fn in (lambda: a @ w, lambda: z @ wt, lambda: a.T @ z):
        fn()
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            best = max(best, 2 * batch * d * n / (time.perf_counter() - t0) / 1e9)
    return best


def train_rate(arch: str, d: int, n: int, batch: int, steps: int, **options) -> float:
    """Tokens/s of cytosae's own training loop, steps 2..steps."""
    from cytosae.sae import train_sae

    g = torch.Generator().manual_seed(0)
    data = [torch.randn(batch, d, generator=g) for _ in range(2)]
    stamps: list[float] = []

    def batches():
        # With init_batches=1 the trainer reads batch 1 for initialisation and asks for batch i + 1 right after
        # step i, so a stamp per request times whole steps while the trainer logs at its default interval
        # (logging every step would add metric computations, e.g. counting L0 over N x n_latents, to each step).
        for i in range(steps + 1):
            stamps.append(time.perf_counter())
            yield data[i % 2]

    train_sae(batches(), d, arch, n, (steps + 1) * batch, seed=0, batch_size=batch, progress=False,
              init_b_dec="zeros", init_batches=1, **options)
    timed = stamps[1:steps + 1]  # end of step 1 (initialisation included) .. end of step `steps`
    return batch * (len(timed) - 1) / (timed[-1] - timed[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--expansion", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--quick", action="store_true", help="d=256, 16x, batch 1024: a smoke run in seconds")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "sae.json")
    args = ap.parse_args()
    if args.quick:
        args.d, args.expansion, args.batch = 256, 16, 1024
    d, n, b = args.d, args.d * args.expansion, args.batch

    ceiling = matmul_ceiling(b, d, n)
    flops_per_token = 10 * d * n
    rows = {}
    for name, arch, opts in [("relu-l1", "relu-l1", {}),
                             ("topk sparse", "topk", {"k": args.k, "sparse_kernels": True}),
                             ("topk dense", "topk", {"k": args.k, "sparse_kernels": False}),
                             ("batchtopk sparse", "batchtopk", {"k": args.k, "sparse_kernels": True}),
                             ("batchtopk dense", "batchtopk", {"k": args.k, "sparse_kernels": False})]:
        rate = train_rate(arch, d, n, b, args.steps, **opts)
        rows[name] = {"tokens_per_s": round(rate, 1),
                      "fraction_of_dense_ceiling": round(rate * flops_per_token / 1e9 / ceiling, 3)}
        print(f"{name:>17}: {rate:8.1f} tokens/s  ({rows[name]['fraction_of_dense_ceiling']:.2f} of the matmul ceiling "
              f"at dense FLOPs)", flush=True)
    result = {
        "what": f"SAE training tokens/s at d={d}, {n} latents ({args.expansion}x), batch {b}, k={args.k}, "
                f"random inputs, steps 2..{args.steps}",
        "matmul_ceiling_gflops": round(ceiling, 1),
        "dense_flops_per_token": flops_per_token,
        "archs": rows,
        "speedup_sparse_vs_dense": {
            a: round(rows[f"{a} sparse"]["tokens_per_s"] / rows[f"{a} dense"]["tokens_per_s"], 2) for a in ("topk", "batchtopk")},
        "targets": {"relu-l1 fraction": 0.6, "sparse vs dense": 2.0},
    }
    write_result(args.out, result)


if __name__ == "__main__":
    main()
