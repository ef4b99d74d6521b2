"""Extraction throughput: `cytosae extract` against a bare timm forward loop (the ceiling).

The ceiling runs the same blocks of the same timm model over tensors decoded and
preprocessed beforehand, so it measures pure model compute. `cytosae extract`
additionally decodes JPEGs, preprocesses, converts to fp16 and writes shards; the
target is >= 0.85 of the ceiling's images/s on the real Acevedo images.

    python bench/extract.py [--backbone dinobloom-b] [--n-images 256] [--batch-size 32]

Writes bench/results/extract.json.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from _report import write_result

REPO = Path(__file__).resolve().parents[1]
ACEVEDO = (REPO / ".." / "shared" / "data" / "acevedo").resolve()


def bare_timm_loop(bb, images: torch.Tensor, layer: int, batch_size: int) -> float:
    """Images/s of timm's own modules up to the same block, no decoding, no writing."""
    model = bb.model
    last = layer % len(model.blocks)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            x = model.patch_embed(images[start:start + batch_size])
            x = model.norm_pre(model._pos_embed(x))
            for blk in model.blocks[: last + 1]:
                x = blk(x)
    return len(images) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="dinobloom-b")
    ap.add_argument("--n-images", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--layer", type=int, default=-2)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "extract.json")
    args = ap.parse_args()

    from cytosae import load_backbone
    from cytosae.data import load_manifest, open_rgb
    from cytosae.store import ExtractConfig, extract

    if not (ACEVEDO / "manifest.csv").is_file():
        sys.exit(f"real images not found at {ACEVEDO}; this benchmark needs ../shared/data/acevedo")
    manifest = load_manifest(ACEVEDO / "manifest.csv").sample(n=args.n_images, random_state=0).sort_values("image_id")
    manifest = manifest.reset_index(drop=True)
    torch.manual_seed(0)
    bb = load_backbone(args.backbone)  # random weights: speed does not depend on their values

    images = torch.stack([bb.preprocess(open_rgb(p)) for p in manifest.path])
    bare_timm_loop(bb, images[: args.batch_size], args.layer, args.batch_size)  # warm-up
    ceiling = bare_timm_loop(bb, images, args.layer, args.batch_size)

    tmp = Path(tempfile.mkdtemp(prefix="cytosae-bench-"))
    try:
        t0 = time.perf_counter()
        res = extract(manifest, bb, tmp / "store", ExtractConfig(layer=args.layer, batch_size=args.batch_size,
                                                                 num_workers=args.workers, progress=False))
        wall = time.perf_counter() - t0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ours = res.n_images / wall

    result = {
        "what": f"images/s extracting block {args.layer} tokens of {args.backbone} (random weights) from "
                f"{res.n_images} real Acevedo JPEGs, batch {args.batch_size}",
        "cytosae_extract_images_per_s": round(ours, 2),
        "cytosae_extract_wall_s": round(wall, 2),
        "bare_timm_loop_images_per_s": round(ceiling, 2),
        "fraction_of_ceiling": round(ours / ceiling, 3),
        "target_fraction": 0.85,
        "workers": args.workers,
    }
    write_result(args.out, result)


if __name__ == "__main__":
    main()
