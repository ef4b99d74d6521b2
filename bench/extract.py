"""Extraction throughput: `cytosae extract` against a bare forward loop (the ceiling), per backbone and device.

The ceiling runs the same blocks of the same timm model, on the same device and in the same
precision, over tensors decoded, preprocessed and moved to the device beforehand, so it measures
pure model compute. `cytosae extract` additionally decodes JPEGs (in DataLoader workers),
preprocesses, copies to the device, casts to fp16 and writes shards; the target is >= 0.85 of
the ceiling's images/s on the real Acevedo images. Where extraction's time goes is reported from
its own counters: waiting for decoded batches, forward pass with the copies, shard writes.

    python bench/extract.py [--device auto] [--backbones dinobloom-b,dinobloom-s] [--n-images 256]
                            [--batch-size 32] [--precision fp32] [--workers N]

Writes bench/results/extract.json (or --out).
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from _report import acevedo_sample, write_result

REPO = Path(__file__).resolve().parents[1]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_forward_loop(bb, images: torch.Tensor, layer: int, batch_size: int, precision: str) -> float:
    """Images/s of timm's own modules up to the same block over tensors already on the device."""
    from cytosae.backbones.backbone import _precision_context

    model, device = bb.model, bb.device
    last = layer % len(model.blocks)
    _sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode(), _precision_context(device, precision):
        for start in range(0, len(images), batch_size):
            x = model.patch_embed(images[start:start + batch_size])
            x = model.norm_pre(model._pos_embed(x))
            for blk in model.blocks[: last + 1]:
                x = blk(x)
    _sync(device)
    return len(images) / (time.perf_counter() - t0)


def bench_backbone(name: str, manifest, args, device: torch.device) -> dict:
    from cytosae import load_backbone
    from cytosae.data import open_rgb
    from cytosae.store import ExtractConfig, extract
    from cytosae.store.writer import default_workers

    torch.manual_seed(0)
    bb = load_backbone(name, device=device)  # random weights: speed does not depend on their values
    for p in manifest.path:  # files in the page cache, as for the extraction run after this
        Path(p).read_bytes()
    t0 = time.perf_counter()
    images = torch.stack([bb.preprocess(open_rgb(p)) for p in manifest.path])
    decode_one_core = len(images) / (time.perf_counter() - t0)
    images = images.to(device)
    bare_forward_loop(bb, images[: args.batch_size], args.layer, args.batch_size, args.precision)  # warm-up
    ceiling = bare_forward_loop(bb, images, args.layer, args.batch_size, args.precision)
    del images

    workers = default_workers() if args.workers is None else args.workers
    tmp = Path(tempfile.mkdtemp(prefix="cytosae-bench-"))
    try:
        t0 = time.perf_counter()
        res = extract(manifest, bb, tmp / "store", ExtractConfig(layer=args.layer, batch_size=args.batch_size,
                                                                 num_workers=workers, precision=args.precision,
                                                                 progress=False))
        wall = time.perf_counter() - t0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ours = res.n_images / wall
    return {
        "what": f"images/s extracting block {args.layer} tokens of {name} (random weights) from {res.n_images} real "
                f"Acevedo JPEGs on {device}, batch {args.batch_size}, precision {args.precision}, {workers} decoding workers",
        "cytosae_extract_images_per_s": round(ours, 2),
        "cytosae_extract_wall_s": round(wall, 2),
        "bare_forward_loop_images_per_s": round(ceiling, 2),
        "fraction_of_ceiling": round(ours / ceiling, 3),
        "target_fraction": 0.85,
        "decode_images_per_s_one_core": round(decode_one_core, 1),
        "time_split_s": {"waiting_for_decoded_batches": round(res.decode_wait_seconds, 2),
                         "forward_and_copies": round(res.compute_seconds, 2),
                         "shard_writes": round(res.write_seconds, 2)},
        "workers": workers,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbones", default="dinobloom-b,dinobloom-s", help="comma-separated")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ap.add_argument("--precision", default="fp32", help="fp32 | bf16 | fp16")
    ap.add_argument("--n-images", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--layer", type=int, default=-2)
    ap.add_argument("--workers", type=int, default=None, help="decoding processes (default: min(8, CPUs - 1))")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "extract.json")
    args = ap.parse_args()

    from cytosae.devices import resolve_device

    device = resolve_device(args.device)
    manifest = acevedo_sample(args.n_images).sort_values("image_id")
    manifest = manifest.reset_index(drop=True)
    result = {name: bench_backbone(name, manifest, args, device) for name in args.backbones.split(",")}
    result["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    write_result(args.out, result)


if __name__ == "__main__":
    main()
