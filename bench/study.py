"""A whole study at MLL23 scale, timed step by step: ViT-B extraction, one relu-l1 SAE epoch, statistics.

MLL23 has 41,906 single-cell images of 360 x 360 px; when no real data is given (--data), as many
synthetic 360 px JPEG cells are drawn first (not timed as part of the study). The steps:

  extract  dinobloom-b block -2, every token (257 per image), float16 store
  train    relu-l1 SAE, 64 x 768 = 49,152 latents, one pass over all tokens (cytosae.sae.train_sae)
  stats    every token encoded through the SAE; per-latent tables (cytosae stats without galleries)

Every step resumes (extraction by shard, training from its checkpoint, stats as a whole), so the
study runs in slices: --max-minutes bounds one invocation (extraction stops after the shard that
crosses it, training after the checkpoint slice that does; stats starts only with time left), and
the same command run again carries on. Goal on one H200-class GPU: the whole study in under 10 minutes.
On a machine that cannot run it at full scale, --n-images scales it down and the JSON extrapolates
each step linearly to 41,906 images (saying so).

    python bench/study.py --work /scratch/study [--n-images 41906] [--device auto] [--precision fp32]
                          [--expansion 64] [--max-minutes 9] [--data MANIFEST_OR_FOLDER]

Writes WORK/study.json (state and figures) and bench/results/study.json (or --out).
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import time
from multiprocessing import Pool
from pathlib import Path

import torch

from _report import write_result

REPO = Path(__file__).resolve().parents[1]
MLL23_IMAGES = 41_906


def _draw(job: tuple[str, int, int]) -> dict:
    from cytosae.data.synthetic import CLASSES, _draw_cell
    import numpy as np

    root, index, size = job
    rng = np.random.default_rng([7, index])
    cls = CLASSES[int(rng.integers(len(CLASSES)))]
    rel = f"{index // 1000:03d}/cell_{index:06d}.jpg"
    path = Path(root) / rel
    if not path.is_file():  # resumable: a killed generation keeps what it drew
        img, _ = _draw_cell(cls, rng, size)
        tmp = path.with_suffix(".tmp.jpg")
        img.save(tmp, quality=90)
        os.replace(tmp, path)
    return {"path": rel, "label": cls.name}


def synthetic_cells(root: Path, n: int, size: int = 360) -> Path:
    """n synthetic JPEG cells of size x size px under root, with root/manifest.csv."""
    import pandas as pd

    from cytosae.store.format import atomic_write_bytes

    manifest = root / "manifest.csv"
    if manifest.is_file() and len(pd.read_csv(manifest)) == n:
        return manifest
    for folder in {i // 1000 for i in range(n)}:
        (root / f"{folder:03d}").mkdir(parents=True, exist_ok=True)
    with Pool(max(1, os.cpu_count() or 1)) as pool:
        rows = pool.map(_draw, [(str(root), i, size) for i in range(n)], chunksize=64)
    atomic_write_bytes(manifest, pd.DataFrame(rows).to_csv(index=False).encode())
    return manifest


class Study:
    """State in WORK/study.json: per step whether it is done and the seconds spent on it so far."""

    def __init__(self, work: Path, deadline: float) -> None:
        self.work, self.deadline = work, deadline
        self.path = work / "study.json"
        self.state = json.loads(self.path.read_text()) if self.path.is_file() else {"steps": {}}

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def step(self, name: str) -> dict:
        return self.state["steps"].setdefault(name, {"done": False, "seconds": 0.0})

    def save(self) -> None:
        from cytosae.store.format import atomic_write_json

        atomic_write_json(self.path, self.state)


def run_extract(study: Study, manifest, device, precision: str) -> None:
    from cytosae import load_backbone
    from cytosae.store import ExtractConfig, extract

    s = study.step("extract")
    if s["done"] or study.left() <= 0:
        return
    torch.manual_seed(0)  # random weights (no DinoBloom weights here), the same in every slice
    bb = load_backbone("dinobloom-b", device=device)
    t0 = time.perf_counter()
    res = extract(manifest, bb, study.work / "store", ExtractConfig(precision=precision, max_seconds=study.left(),
                                                                    progress=False))
    s["seconds"] += time.perf_counter() - t0
    s.update(done=res.complete, n_images=res.n_images, decode_wait_s=res.decode_wait_seconds,
             forward_s=res.compute_seconds, write_s=res.write_seconds)
    study.save()


def run_train(study: Study, device, expansion: int, slice_tokens: int) -> None:
    from cytosae.sae import ShuffleBuffer, train_sae
    from cytosae.store import ActivationStore

    s = study.step("train")
    if s["done"] or not study.step("extract")["done"]:
        return
    store = ActivationStore(study.work / "store")
    total = store.n_images * store.n_tokens
    extra = {"device": device} if "device" in inspect.signature(train_sae).parameters else {}
    s["sae_device"] = str(device) if extra else "cpu (train_sae takes no device in this checkout)"
    while study.left() > 0 and not s["done"]:
        t0 = time.perf_counter()
        batches = ShuffleBuffer(262_144, 0)(store.iter_tokens(batch_size=4096), batch_size=4096)
        sae = train_sae(batches, store.d_model, "relu-l1", expansion * store.d_model, total, seed=0,
                        batch_size=4096, checkpoint_dir=study.work / "sae", checkpoint_every=slice_tokens,
                        max_tokens_this_run=slice_tokens, progress=False, **extra)
        s["seconds"] += time.perf_counter() - t0
        summary = sae.training_summary
        s.update(done=bool(summary["finished"]), tokens=summary["tokens_seen"], total_tokens=total,
                 n_latents=sae.cfg.n_latents)
        study.save()


def run_stats(study: Study, device) -> None:
    from cytosae.analysis import compute_latent_stats, write_stats
    from cytosae.sae import SAE
    from cytosae.store import ActivationStore

    s = study.step("stats")
    if s["done"] or not study.step("train")["done"] or study.left() <= 0:
        return
    t0 = time.perf_counter()
    store = ActivationStore(study.work / "store")
    sae = SAE.load(study.work / "sae", device=device)
    res = compute_latent_stats(sae.encode, store.iter_images(32 if device.type == "cuda" else 8), store.images,
                               sae.cfg.n_latents, device=device, dataset="study")
    s["encode_s"] = time.perf_counter() - t0
    write_stats([res], study.work / "stats")
    s["seconds"] += time.perf_counter() - t0
    s.update(done=True, n_images=res.summary["n_images"], n_tokens=res.summary["n_tokens"])
    study.save()


def report(study: Study, n_images: int, device, precision: str, args) -> dict:
    steps = study.state["steps"]
    done = all(steps.get(k, {}).get("done") for k in ("extract", "train", "stats"))
    scale = MLL23_IMAGES / n_images
    out = {
        "what": f"whole study (dinobloom-b extraction, relu-l1 {args.expansion * 768:,}-latent SAE epoch over all "
                f"tokens, stats) on {n_images:,} {'synthetic 360 px JPEG cells' if args.data is None else 'images of ' + str(args.data)}, "
                f"device {device}, precision {precision}",
        "complete": done,
        "seconds": {k: round(v["seconds"], 1) for k, v in steps.items()},
        "steps": steps,
        "total_s": round(sum(v["seconds"] for v in steps.values()), 1),
        "goal": "whole study at MLL23 scale (41,906 images) under 600 s on one H200-class GPU",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }
    if done and n_images != MLL23_IMAGES:
        per_step = {k: round(v["seconds"] * scale, 0) for k, v in steps.items()}
        out["extrapolated_to_mll23_s"] = {
            "how": f"each step's seconds x {scale:.1f} (41,906 / {n_images} images): linear in images, "
                   "ignoring fixed start-up costs (which makes it pessimistic) and cache effects",
            **per_step, "total": sum(per_step.values())}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True, help="folder for data, store, SAE, stats and state")
    ap.add_argument("--n-images", type=int, default=MLL23_IMAGES)
    ap.add_argument("--data", type=Path, default=None, help="real manifest CSV or class folder instead of synthetic cells")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="fp32", help="extraction forward pass: fp32 | bf16 | fp16")
    ap.add_argument("--expansion", type=int, default=64, help="n_latents = expansion x 768")
    ap.add_argument("--slice-tokens", type=int, default=2_000_000, help="SAE tokens between checkpoints / time checks")
    ap.add_argument("--max-minutes", type=float, default=9.0, help="stop this invocation after the step slice crossing it")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "study.json")
    args = ap.parse_args()

    from cytosae.data import load_manifest
    from cytosae.devices import resolve_device

    device = resolve_device(args.device)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.data is None:
        t0 = time.perf_counter()
        source = synthetic_cells(args.work / "data", args.n_images)
        print(f"synthetic data ready in {time.perf_counter() - t0:.0f} s (not part of the study's time)")
    else:
        source = args.data
    manifest = load_manifest(source).head(args.n_images).reset_index(drop=True)
    study = Study(args.work, time.perf_counter() + 60 * args.max_minutes)
    run_extract(study, manifest, device, args.precision)
    run_train(study, device, args.expansion, args.slice_tokens)
    run_stats(study, device)
    result = report(study, len(manifest), device, args.precision, args)
    write_result(args.out, result)
    if not result["complete"]:
        print("not finished within --max-minutes: run the same command again to carry on")


if __name__ == "__main__":
    main()
