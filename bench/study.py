"""A whole study at MLL23 scale, as a user runs it: a study file, `cytosae run`, timed step by step.

MLL23 has 41,906 single-cell images of 360 x 360 px; when no real data is given (--data), as many
synthetic 360 px JPEG cells are drawn first (not timed as part of the study). The study file
(WORK/study.toml, written here) holds three steps of the CLI, composed by `cytosae run`:

  extract  dinobloom-b (seeded random weights: none ship here) block -2, every token, float16 store
  train    relu-l1 SAE, 64 x 768 = 49,152 latents, one epoch over all tokens (images in a seeded random
           order, tokens through the shuffle buffer), checkpointed every --checkpoint-tokens
  stats    every token encoded through the SAE; per-latent tables (no galleries)

The study runs in slices of at most --max-minutes: `cytosae run` is started in its own process group and
killed (SIGKILL) when the slice is up; the same command run again resumes it (extraction by shard,
training from its checkpoint, finished steps skipped), so every slice fits a 10-minute limit. A step's
seconds are those of the slices it ran in (run.json's own record for the slice that finished it).
Goal on one H200-class GPU: the whole study in under 10 minutes. On a machine that cannot run it at full
scale, --n-images scales it down and the JSON extrapolates each step linearly to 41,906 images (saying so).

    python bench/study.py --work /scratch/study [--n-images 41906] [--device auto] [--precision fp32]
                          [--expansion 64] [--max-minutes 9] [--data MANIFEST_OR_FOLDER]

Writes WORK/bench_state.json (slices) and bench/results/study.json (or --out).
"""
from __future__ import annotations

import argparse
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


STEPS = ("extract:mll23", "train", "stats")


def write_study(work: Path, manifest: Path, a) -> Path:
    """WORK/study.toml: the three steps, with this bench's settings."""
    path = work / "study.toml"
    path.write_text(f"""# written by bench/study.py: a CytoSAE-scale study (MLL23-sized), one relu-l1 epoch
[run]
dir = "run"

[backbone]
name = "dinobloom-b"
seed = 0
precision = "{a.precision}"
device = "{a.device}"
shard_size = {a.shard_size}

[datasets.mll23]
data = "{manifest}"

[sae]
arch = "relu-l1"
expansion = {a.expansion}
epochs = 1
batch_size = 4096
checkpoint_every = {a.checkpoint_tokens}
device = "{a.device}"
seed = 0

[evaluate]
enabled = false

[stats]
galleries = 0
device = "{a.device}"
""")
    return path


def finished(work: Path) -> dict:
    """The steps the study's run has recorded as done (none before its first step)."""
    from cytosae.run import NotARun, Run

    try:
        return Run.open(work / "run").steps
    except NotARun:
        return {}


def run_slices(work: Path, study_file: Path, max_minutes: float) -> dict:
    """One slice of `cytosae run`: killed with its process group when the time is up. State in bench_state.json."""
    import signal
    import subprocess
    import sys

    from cytosae.store.format import atomic_write_json

    state_path = work / "bench_state.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else {"slices": [], "seconds": {}}
    before = set(finished(work))
    if all(s in before for s in STEPS):
        return state
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "cytosae", "run", str(study_file)], start_new_session=True)
    try:
        rc = proc.wait(timeout=60 * max_minutes)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        rc = proc.wait()
    wall = time.perf_counter() - t0
    steps = finished(work)
    done_now = [s for s in STEPS if s in steps and s not in before]
    for s in done_now:  # run.json's own figure for the slice that finished the step
        state["seconds"][s] = state["seconds"].get(s, 0.0) + steps[s]["seconds"]
    rest = wall - sum(steps[s]["seconds"] for s in done_now)
    running = next((s for s in STEPS if s not in steps), None)
    if running is not None:  # killed mid-step: the slice's remaining time went to it
        state["seconds"][running] = state["seconds"].get(running, 0.0) + rest
    state["slices"].append({"wall_s": round(wall, 1), "exit": rc, "finished": done_now,
                            "killed_in": running if rc != 0 else None})
    atomic_write_json(state_path, state)
    if rc != 0 and running is None:
        raise SystemExit(f"cytosae run exited with {rc}")
    return state


def report(work: Path, state: dict, n_images: int, a) -> dict:
    from cytosae.devices import resolve_device

    steps = finished(work)
    done = all(s in steps for s in STEPS)
    device = resolve_device(a.device)
    scale = MLL23_IMAGES / n_images
    train = steps.get("train", {}).get("settings", {})
    out = {
        "what": f"whole study by `cytosae run` (dinobloom-b extraction, relu-l1 {a.expansion * 768:,}-latent SAE, "
                f"one epoch over all tokens, stats) on {n_images:,} "
                f"{'synthetic 360 px JPEG cells' if a.data is None else 'images of ' + str(a.data)}, "
                f"device {device}, extraction precision {a.precision}",
        "complete": done,
        "seconds": {s: round(v, 1) for s, v in state["seconds"].items()},
        "total_s": round(sum(state["seconds"].values()), 1),
        "wall_s": round(sum(sl["wall_s"] for sl in state["slices"]), 1),
        "wall_note": "wall_s adds each slice's start-up (interpreter, imports, study checks) to the steps' seconds",
        "slices": state["slices"],
        "max_minutes_per_slice": a.max_minutes,
        "sae_settings": {k: train.get(k) for k in ("arch", "expansion", "epochs", "batch_size", "device")},
        "goal": "whole study at MLL23 scale (41,906 images) under 600 s on one H200-class GPU",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "study_file": str(work / "study.toml"),
    }
    if "stats" in steps:  # finished: a slice killed inside the pass would give a part of its time
        out["stats_encoder_product"] = stats_product(n_images, a.expansion * 768, device, state["seconds"]["stats"])
    if done and n_images != MLL23_IMAGES:
        per_step = {k: round(v * scale, 0) for k, v in state["seconds"].items()}
        out["extrapolated_to_mll23_s"] = {
            "how": f"each step's seconds x {scale:.1f} (41,906 / {n_images} images): linear in images, "
                   "ignoring fixed start-up costs (which makes it pessimistic) and cache effects",
            **per_step, "total": sum(per_step.values())}
    return out


def stats_product(n_images: int, n_latents: int, device, stats_s: float) -> dict:
    """The one product the stats pass cannot avoid, measured here with the study's thread count: every token of
    every image through the encoder, in the analysis batches the step uses (bench/sae.py's timing, one owner)."""
    from sae import encoder_product_seconds

    from cytosae.steps.common import analysis_batch

    images = analysis_batch(device)
    batches = -(-n_images // images)
    one = encoder_product_seconds(images * 257, 768, n_latents, device, torch.float32)
    return {"what": f"addmm of ({images} images x 257 tokens, 768) by (768, {n_latents:,}) float32, best of 3, x "
                    f"{batches} batches, {torch.get_num_threads()} threads", "seconds": round(one * batches, 2),
            "stats_over_product": round(stats_s / (one * batches), 2), "target": 1.5}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True, help="folder for data, the study file and its run")
    ap.add_argument("--n-images", type=int, default=MLL23_IMAGES)
    ap.add_argument("--data", type=Path, default=None, help="real manifest CSV instead of synthetic cells")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="fp32", help="extraction forward pass: fp32 | bf16 | fp16")
    ap.add_argument("--expansion", type=int, default=64, help="n_latents = expansion x 768")
    ap.add_argument("--shard-size", type=int, default=256, help="images per store shard (extraction resumes by shard)")
    ap.add_argument("--checkpoint-tokens", type=int, default=2_000_000, help="SAE tokens between checkpoints")
    ap.add_argument("--max-minutes", type=float, default=9.0, help="length of one slice (then killed; rerun resumes)")
    ap.add_argument("--slices", type=int, default=1, help="slices to run in this invocation")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "study.json")
    args = ap.parse_args()

    import pandas as pd

    from cytosae.data import load_manifest
    from cytosae.store.format import atomic_write_bytes

    args.work.mkdir(parents=True, exist_ok=True)
    if args.data is None:
        t0 = time.perf_counter()
        source = synthetic_cells(args.work / "data", args.n_images)
        print(f"synthetic data ready in {time.perf_counter() - t0:.0f} s (not part of the study's time)")
    else:
        source = args.data
    manifest = args.work / "study_manifest.csv"
    if not manifest.is_file():
        table = load_manifest(source).head(args.n_images).reset_index(drop=True)
        atomic_write_bytes(manifest, pd.DataFrame({"path": table["path"].astype(str),
                                                   "label": table["label"]}).to_csv(index=False).encode())
    n_images = len(pd.read_csv(manifest))
    study_file = write_study(args.work, manifest, args)
    for _ in range(args.slices):
        state = run_slices(args.work, study_file, args.max_minutes)
    result = report(args.work, state, n_images, args)
    write_result(args.out, result)
    if not result["complete"]:
        print("not finished in this slice: run the same command again to carry on")


if __name__ == "__main__":
    main()
