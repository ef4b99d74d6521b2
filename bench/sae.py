"""SAE training speed against the device's dense matmul ceiling, sparse vs dense TopK kernels, peak memory.

    python bench/sae.py [--device auto|cpu|cuda|cuda:N] [--d 768 --expansion 64 --batch 4096 --steps 4] [--quick]

Architectures: relu-l1, topk (k=64) and batchtopk (k=64), each with the sparse kernels and densely.
FLOPs per token of one dense training step = 10 * d * n_latents: five (batch x d x n) matmuls of
2 FLOPs per multiply-add (encoder forward, decoder forward, decoder weight gradient, gradient into
the latents, encoder weight gradient; no gradient flows into the inputs). The ceiling is the best
torch.mm rate over the same shapes on the same device, in float32 and (on CUDA) bfloat16; fp32 training
is compared with the fp32 ceiling, bf16 training (CUDA only) with the bf16 one. Steps are driven through
Trainer.train_step on a batch already on the device, so the figure is the trainer's, not the reader's
(bench/scale.py measures the reader). One untimed step first; the device is synchronised before each clock.
Peak memory: torch.cuda.max_memory_allocated per run on CUDA, the process's peak RSS on CPU.
The TopK family is also compared with the one dense product its step cannot avoid, the encoder's, timed
alone at the step's shape (fraction_of_encoder_product; issue #21's ceiling, target 0.85); relu-l1 with all five
(target 0.7).
The ceiling's products write into preallocated outputs, so that it times the arithmetic, not page faults.
On the CPU the Trainer keeps freed blocks for reuse (cytosae/allocator.py); CYTOSAE_RETURN_FREED_MEMORY=1 runs
the same bench with glibc's default, to measure what that is worth. --profile adds, per row, the operators that
took the time (torch.profiler, self CPU time of one step).
Writes bench/results/sae.json (sae-<device type>.json for a non-CPU device).
"""
from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import torch

from _report import write_result

REPO = Path(__file__).resolve().parents[1]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def encoder_product_seconds(batch: int, d: int, n: int, device: torch.device, dtype: torch.dtype,
                            repeats: int = 3) -> float:
    """Best time of the TopK step's one unavoidable product, addmm(b_enc, x (batch x d), W_enc (d x n)), with
    W_enc laid out as the SAE keeps it (the view of its transpose) and a preallocated output."""
    x = torch.randn(batch, d, device=device, dtype=dtype)
    w, b = torch.randn(n, d, device=device, dtype=dtype).t(), torch.zeros(n, device=device, dtype=dtype)
    out = torch.empty(batch, n, device=device, dtype=dtype)
    torch.addmm(b, x, w, out=out)
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        torch.addmm(b, x, w, out=out)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def matmul_ceiling(batch: int, d: int, n: int, device: torch.device, dtype: torch.dtype, repeats: int = 3) -> float:
    """Best GFLOP/s of torch.mm over the three shapes an SAE step multiplies."""
    a, w = torch.randn(batch, d, device=device, dtype=dtype), torch.randn(d, n, device=device, dtype=dtype)
    z, wt = torch.randn(batch, n, device=device, dtype=dtype), torch.randn(n, d, device=device, dtype=dtype)
    out_z, out_x, out_w = (torch.empty(*shape, device=device, dtype=dtype) for shape in ((batch, n), (batch, d), (d, n)))
    best = 0.0
    for fn in (lambda: torch.mm(a, w, out=out_z), lambda: torch.mm(z, wt, out=out_x), lambda: torch.mm(a.T, z, out=out_w)):
        fn()
        for _ in range(repeats):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            best = max(best, 2 * batch * d * n / (time.perf_counter() - t0) / 1e9)
    return best


def train_rate(arch: str, d: int, n: int, batch: int, steps: int, device: torch.device, precision: str,
               profile_ops: int = 0, **options) -> tuple[float, float, dict]:
    """(tokens/s of Trainer.train_step over `steps` steps after one untimed step, peak memory in GiB, and with
    `profile_ops` the self CPU ms of that many operators that took most of one more step)."""
    from cytosae.sae import SAEConfig, Trainer

    cfg = SAEConfig(arch=arch, d_in=d, n_latents=n, init_b_dec="zeros", **options)
    trainer = Trainer(cfg, (steps + 1) * batch, batch_size=batch, device=device, precision=precision, progress=False)
    x = torch.randn(batch, d, generator=torch.Generator().manual_seed(0)).to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trainer.train_step(x, batch)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(x, batch)
    _sync(device)
    rate = batch * steps / (time.perf_counter() - t0)
    ops = {}
    if profile_ops:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            trainer.train_step(x, batch)
        top = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:profile_ops]
        ops = {e.key: round(e.self_cpu_time_total / 1e3, 1) for e in top}
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    del trainer
    return rate, peak, ops


def main() -> None:
    from cytosae.devices import resolve_device

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--expansion", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--no-dense", action="store_true", help="skip the dense-kernel TopK/BatchTopK rows")
    ap.add_argument("--quick", action="store_true", help="d=256, 16x, batch 1024: a smoke run in seconds")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--profile", action="store_true", help="record the 8 operators that took most of one step")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:  # absent in cytosae before it existed: the bench then measures glibc's default, and says so
        from cytosae.allocator import keep_freed_memory
        allocator = "freed blocks kept (cytosae/allocator.py)" if device.type == "cpu" and keep_freed_memory() \
            else "system default"
    except ImportError:
        allocator = "system default (this cytosae has no allocator.py)"
    if args.quick:
        args.d, args.expansion, args.batch = 256, 16, 1024
    d, n, b = args.d, args.d * args.expansion, args.batch
    out = args.out or REPO / "bench" / "results" / ("sae.json" if device.type == "cpu" else f"sae-{device.type}.json")

    precisions = ["fp32", "bf16"] if device.type == "cuda" else ["fp32"]
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    ceilings = {p: matmul_ceiling(b, d, n, device, dtypes[p]) for p in precisions}
    encoder_s = {p: encoder_product_seconds(b, d, n, device, dtypes[p]) for p in precisions}
    flops_per_token = 10 * d * n
    runs = [("relu-l1", "relu-l1", {}),
            ("topk sparse", "topk", {"k": args.k, "sparse_kernels": True}),
            ("topk dense", "topk", {"k": args.k, "sparse_kernels": False}),
            ("batchtopk sparse", "batchtopk", {"k": args.k, "sparse_kernels": True}),
            ("batchtopk dense", "batchtopk", {"k": args.k, "sparse_kernels": False})]
    if args.no_dense:
        runs = [r for r in runs if "dense" not in r[0]]
    rows = {}
    for precision in precisions:
        for name, arch, opts in runs:
            rate, peak, ops = train_rate(arch, d, n, b, args.steps, device, precision, 8 if args.profile else 0, **opts)
            key = f"{name} {precision}"
            rows[key] = {"tokens_per_s": round(rate, 1), "peak_memory_gib": round(peak, 2),
                         "fraction_of_dense_ceiling": round(rate * flops_per_token / 1e9 / ceilings[precision], 3)}
            if arch != "relu-l1":  # the one product a TopK step cannot avoid: the dense encoder
                rows[key]["fraction_of_encoder_product"] = round(encoder_s[precision] * rate / b, 3)
            if ops:
                rows[key]["self_cpu_ms_of_one_step"] = ops
            print(f"{key:>22}: {rate:10.1f} tokens/s  ({rows[key]['fraction_of_dense_ceiling']:.2f} of the {precision} "
                  f"matmul ceiling at dense FLOPs), peak {'GPU memory' if device.type == 'cuda' else 'RSS'} "
                  f"{peak:.2f} GiB", flush=True)
    speedups = {f"{a} {p}": round(rows[f"{a} sparse {p}"]["tokens_per_s"] / rows[f"{a} dense {p}"]["tokens_per_s"], 2)
                for a in ("topk", "batchtopk") for p in precisions if f"{a} dense {p}" in rows}
    result = {
        "what": f"SAE training tokens/s (Trainer.train_step, batch on the device) at d={d}, {n} latents "
                f"({args.expansion}x), batch {b}, k={args.k}, random inputs, {args.steps} timed steps after one untimed",
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "matmul_ceiling_gflops": {p: round(c, 1) for p, c in ceilings.items()},
        "encoder_product_seconds": {p: round(t, 4) for p, t in encoder_s.items()},
        "fraction_of_encoder_product": "encoder_product_seconds x tokens/s / batch: the step's share spent in "
                                       "the one dense product a TopK step cannot avoid (1.0 = nothing else)",
        "dense_flops_per_token": flops_per_token,
        "peak_memory": "torch.cuda.max_memory_allocated per run" if device.type == "cuda" else
                       "peak RSS of the whole process so far (monotone across rows)",
        "archs": rows,
        "speedup_sparse_vs_dense": speedups,
        "allocator": allocator,
        "ceiling": "best torch.mm rate over the step's three shapes, into preallocated outputs",
        "targets": {"relu-l1 fraction_of_dense_ceiling": 0.7, "topk/batchtopk fraction_of_encoder_product": 0.85,
                    "sparse vs dense": 2.0},
    }
    write_result(out, result)


if __name__ == "__main__":
    main()
