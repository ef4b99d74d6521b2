"""How long does describing every latent take at CytoSAE's width (49,152 latents), on real cells?

Data: --n real Acevedo cells (seed 0). Pipeline, through the package's own steps in one run directory (--work):
extract block -2 of --backbone (dinobloom-b, d = 768; RANDOM weights unless --weights: the timing does not
depend on them), an SAE at its random initialisation (TopK, --latents latents, k = --k, seed 0: timing only,
its descriptions mean nothing), then `cytosae describe --run` (run_describe) timed as a whole. To say where the
time goes, the same images are also timed through each part alone: the SAE encoding of every token (the
store read + SAE.encode, no accumulation) and the images the model saw (decode, resize, segment_cell,
patch_regions, patch_colours). Peak resident memory is that of the whole process.

    CYTOSAE_SHARED_DATA=/work/shared/data nice python bench/describe.py [--n 64] [--latents 49152]

Writes bench/results/describe.json (or --out).
"""
from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch

from _report import ACEVEDO, acevedo_sample, write_result

REPO = Path(__file__).resolve().parents[1]


def _random_sae(run: Path, d_in: int, n_latents: int, k: int) -> None:
    from cytosae.sae import SAE, SAEConfig

    SAE(SAEConfig(arch="topk", d_in=d_in, n_latents=n_latents, k=k), seed=0).save(run / "sae")


def _parts(run: Path, dataset: str, device: str) -> dict:
    """Seconds of the encoding alone and of the images alone, over the same store."""
    from cytosae.analysis.describe import ImageViews
    from cytosae.sae import SAE
    from cytosae.store import ActivationStore

    store = ActivationStore(run / "stores" / dataset)
    sae = SAE.load(run / "sae").to(device)
    t = time.time()
    with torch.inference_mode():
        for _, tokens in store.iter_images(8):
            sae.encode(tokens.to(device).reshape(-1, tokens.shape[-1]))
    encode = time.time() - t
    views = ImageViews(store, 16)
    t = time.time()
    for image_id in store.image_ids:
        views(image_id)
    return {"encode_only": round(encode, 1), "images_only": round(time.time() - t, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--latents", type=int, default=49_152)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--backbone", default="dinobloom-b")
    ap.add_argument("--weights", type=Path, default=None)
    ap.add_argument("--work", type=Path, default=Path("/tmp/cytosae-bench-describe"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "describe.json")
    args = ap.parse_args()
    cells = acevedo_sample(args.n)  # exits saying where the images are expected when absent
    from cytosae.steps import DescribeSettings, ExtractSettings, run_describe, run_extract

    run = args.work / "run"
    csv = args.work / "acevedo.csv"
    csv.parent.mkdir(parents=True, exist_ok=True)
    cells.drop(columns=["image_id"]).to_csv(csv, index=False)
    t, extracted = time.time(), not (run / "stores" / "acevedo" / "manifest.json").is_file()
    if extracted:  # a store of the same --work is reused: its extraction is no part of the timing
        run_extract(ExtractSettings(data=csv, name="acevedo", backbone=args.backbone, weights=args.weights,
                                    batch_size=16, device=args.device), run=run)
    extract = time.time() - t
    store = json.loads((run / "stores" / "acevedo" / "manifest.json").read_text())
    _random_sae(run, int(store["d_model"]), args.latents, args.k)
    t = time.time()
    res = run_describe(DescribeSettings(device=args.device), run=run)
    seconds = time.time() - t
    print("\n".join(res.lines()))
    parts = _parts(run, "acevedo", args.device)
    n = int(store["n_images"])
    write_result(args.out, {
        "what": f"`cytosae describe` (run_describe: one pass, every latent's region shares, extent, colour, edge "
                f"ring, class AP) of a random-init TopK SAE with {args.latents} latents (k={args.k}) on d="
                f"{store['d_model']} block -2 tokens of {args.backbone} "
                f"({'weights ' + args.weights.name if args.weights else 'RANDOM weights'}) of {n} real Acevedo "
                f"cells (seed 0), on {args.device}",
        "n_images": n, "n_latents": args.latents, "d_in": int(store["d_model"]), "k": args.k,
        "n_tokens": int(store["n_tokens"]), "device": args.device,
        "seconds": {"describe": round(seconds, 1), **parts, "extract (not part of describe)": round(extract, 1) if extracted else "reused"},
        "images_per_second": round(n / seconds, 2),
        "seconds_per_image": {"describe": round(seconds / n, 3), "encode_only": round(parts["encode_only"] / n, 3),
                              "images_only": round(parts["images_only"] / n, 3)},
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2),
        "lines": res.lines()})


if __name__ == "__main__":
    main()
