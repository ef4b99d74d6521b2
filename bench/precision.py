"""How far bf16 / fp16 autocast tokens are from fp32 ones, on real cell images.

Block -2 tokens (CLS + 256 patches) of seeded random-weight DinoBloom backbones (no trained weights
are available here; trained DINOv2 models have a few very large activations that random ones lack,
so check again with real weights) for the first --n-images Acevedo images. Reported per backbone
and precision: max |fp32 - x|, relative error ||fp32 - x|| / ||fp32|| over all tokens, and the
per-token cosine similarity (mean and minimum).

    python bench/precision.py [--device auto] [--n-images 32] [--backbones dinobloom-s,dinobloom-b]

Writes bench/results/precision.json (or --out).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from _report import acevedo_sample, write_result

REPO = Path(__file__).resolve().parents[1]


def compare(a: torch.Tensor, b: torch.Tensor) -> dict:
    a, b = a.double(), b.double()
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    return {"max_abs_diff": float((a - b).abs().max()), "max_abs_fp32": float(a.abs().max()),
            "relative_error": float((a - b).norm() / a.norm()),
            "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbones", default="dinobloom-s,dinobloom-b")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--n-images", type=int, default=32)
    ap.add_argument("--precisions", default="bf16,fp16")
    ap.add_argument("--weights", type=Path, default=None, help="checkpoint for the (single) backbone; default random")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "precision.json")
    args = ap.parse_args()

    from cytosae import load_backbone
    from cytosae.data import open_rgb
    from cytosae.devices import resolve_device

    device = resolve_device(args.device)
    manifest = acevedo_sample(args.n_images)
    weights = f"weights {args.weights}" if args.weights else "seeded random weights (torch.manual_seed(0))"
    result = {"what": f"block -2 tokens under autocast vs fp32, {args.n_images} real Acevedo images, {weights}, on {device}"}
    for name in args.backbones.split(","):
        torch.manual_seed(0)
        bb = load_backbone(name, weights=args.weights, device=device)
        x = torch.stack([bb.preprocess(open_rgb(p)) for p in manifest.path])
        ref = torch.cat([bb.tokens(c, precision="fp32").cpu() for c in x.split(8)])
        result[name] = {}
        for precision in args.precisions.split(","):
            got = torch.cat([bb.tokens(c, precision=precision).cpu() for c in x.split(8)])
            result[name][precision] = compare(ref, got)
        # for scale: what the store's default float16 dtype alone does to fp32 tokens
        result[name]["fp32_stored_as_float16"] = compare(ref, ref.half().float())
    result["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    write_result(args.out, result)


if __name__ == "__main__":
    main()
