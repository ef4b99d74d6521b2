"""Explorer latency at CytoSAE scale: latent page API for a 49,152-latent SAE (d = 768 decoder).

Synthetic run tables of realistic size (one dataset, 13 classes, top-20 images per latent
ranked two ways, 20-bin histograms, barcodes of --patients patients, one disease comparison)
are written to a temp run; the explorer is served by uvicorn in this process and queried
over HTTP with httpx. Reported: cold first latent page (loads and indexes tables + decoder),
warm p50/p95 over --requests random latents (target p95 < 200 ms), and the overview table.

    python bench/explorer.py [--latents 49152] [--d 768] [--patients 40] [--requests 200]

Writes bench/results/explorer.json.

Concurrent mode (issue #12, item 11): the explorer runs in its own process (uvicorn, 127.0.0.1 only, as
`cytosae explore` serves it, tables and neighbours preloaded), and --concurrency clients request random latent
pages for --duration seconds (or --max-requests, whichever first); reported: p50/p95/p99 latency and requests/s.

    python bench/explorer.py --concurrency 16 --duration 30

Writes bench/results/explorer_concurrent.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil", "platelet",
           "blast", "promyelocyte", "myelocyte", "metamyelocyte", "smudge"]


def write_run(root: Path, n_latents: int, d: int, n_patients: int, k: int = 20, n_images: int = 48, seed: int = 0,
              arch: str = "topk") -> Path:
    import torch

    from cytosae.sae import SAE, SAEConfig
    from cytosae.store import import_embeddings

    rng = np.random.default_rng(seed)
    run = root / "run"
    (run / "sae").mkdir(parents=True)
    (run / "stats").mkdir()
    (run / "patients").mkdir()
    (run / "classify").mkdir()
    sae = SAE(SAEConfig(arch=arch, d_in=d, n_latents=n_latents, k=64))  # the package's writer, as `cytosae train`
    with torch.no_grad():
        sae.b_enc.fill_(-0.5)
    sae.save(run / "sae")
    del sae
    ids = np.array([f"{CLASSES[i % 13]}/img_{i:05d}.jpg" for i in range(n_images)])
    np.save(root / "tokens.npy", rng.normal(size=(n_images, 257, d)).astype(np.float32))
    import_embeddings(root / "tokens.npy", pd.DataFrame({"image_id": ids, "label": [CLASSES[i % 13] for i in range(n_images)]}),
                      run / "stores" / "mll", dtype="float16")
    lat = np.arange(n_latents)
    freq = 10 ** rng.uniform(-5, -0.5, n_latents)
    pd.DataFrame({"dataset": "mll", "latent": lat, "freq_image": freq, "freq_token": freq / 3,
                  "mean_act": 10 ** rng.uniform(-1, 1, n_latents), "max_act": 10 ** rng.uniform(0, 1.5, n_latents),
                  "label_entropy": rng.uniform(0, np.log2(13), n_latents), "top_label": rng.choice(CLASSES, n_latents),
                  "noisy": rng.random(n_latents) < 0.05}).to_parquet(run / "stats" / "latents.parquet", index=False)
    n_top = n_latents * 2 * k
    pd.DataFrame({"dataset": "mll", "latent": np.repeat(lat, 2 * k), "by": np.tile(np.repeat(["image", "patch"], k), n_latents),
                  "rank": np.tile(np.arange(k), 2 * n_latents), "image_id": ids[rng.integers(0, n_images, n_top)],
                  "value": rng.random(n_top), "patch": rng.integers(-1, 256, n_top),
                  "label": rng.choice(CLASSES, n_top)}).to_parquet(run / "stats" / "top_images.parquet", index=False)
    pd.DataFrame({"dataset": "mll", "latent": np.repeat(lat, 13), "class": np.tile(CLASSES, n_latents),
                  "mean_act": rng.random(13 * n_latents), "freq": rng.random(13 * n_latents)}).to_parquet(
        run / "stats" / "class_profile.parquet", index=False)
    edges = np.linspace(0, 10, 21)
    pd.DataFrame({"dataset": "mll", "latent": lat, "bin_edges": [edges] * n_latents,
                  "counts": list(rng.integers(0, 500, (n_latents, 20)))}).to_parquet(run / "stats" / "histograms.parquet", index=False)
    pats = np.array([f"P{i:03d}" for i in range(n_patients)])
    n_bc = n_patients * n_latents
    pd.DataFrame({"patient_id": np.repeat(pats, n_latents), "diagnosis": np.repeat(rng.choice(["AML", "APL", "CLL", "control"], n_patients), n_latents),
                  "latent": np.tile(lat, n_patients), "frac": rng.random(n_bc).astype(np.float32),
                  "count": rng.integers(0, 100, n_bc), "n_cells": 100}).to_parquet(run / "patients" / "barcodes.parquet", index=False)
    pd.DataFrame({"latent": lat, "group_a": "AML", "group_b": "control", "statistic": rng.normal(size=n_latents),
                  "p": rng.random(n_latents), "q": rng.random(n_latents), "effect": rng.normal(size=n_latents) / 10}).to_parquet(
        run / "patients" / "compare.parquet", index=False)
    (run / "classify" / "results.json").write_text(json.dumps({"models": {}}))
    (run / "run.json").write_text(json.dumps({"datasets": {"mll": {"store": "stores/mll", "data": None}}, "sae": "sae"}))
    return run


SERVER = """
import sys, uvicorn
from cytosae.explorer import create_app
uvicorn.run(create_app(sys.argv[1], preload=True), host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _load(base: str, n_latents: int, concurrency: int, duration: float, max_requests: int, seed: int = 1):
    """`concurrency` clients, each one request at a time, over one connection each; latencies in ms."""
    import asyncio

    import httpx

    rng = np.random.default_rng(seed)
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    deadline = time.perf_counter() + duration

    async def client():
        async with httpx.AsyncClient(base_url=base, timeout=60) as c:
            while time.perf_counter() < deadline and len(latencies) < max_requests:
                j = int(rng.integers(0, n_latents))
                t = time.perf_counter()
                r = await c.get(f"/api/latents/{j}")
                latencies.append((time.perf_counter() - t) * 1000)
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return np.array(latencies), statuses, time.perf_counter() - t0


def _big_jpeg(side: int = 5000) -> bytes:
    """A smooth side x side JPEG (25 Mpixel at 5000): small on the wire, a full decode for the server."""
    import io

    from PIL import Image

    x = np.linspace(0, 255, side, dtype=np.float32)
    rgb = np.stack([np.add.outer(x, x) / 2, np.add.outer(x, 255 - x) / 2, np.full((side, side), 200.0)], -1)
    buf = io.BytesIO()
    Image.fromarray(rgb.astype(np.uint8)).save(buf, format="JPEG", quality=70)
    return buf.getvalue()


async def _upload_interference(base: str, n_uploads: int, probes: int) -> dict:
    """Latency of a small request (GET /api/run) alone, then while `n_uploads` 25-Mpixel uploads are processed."""
    import asyncio

    import httpx

    jpeg = _big_jpeg()
    async with httpx.AsyncClient(base_url=base, timeout=120) as c:
        async def probe_series(stop=None):
            out = []
            while len(out) < probes and not (stop and stop.is_set() and len(out) >= 5):
                t = time.perf_counter()
                (await c.get("/api/run")).raise_for_status()
                out.append((time.perf_counter() - t) * 1000)
                await asyncio.sleep(0.01)
            return out

        alone = await probe_series()
        stop = asyncio.Event()

        async def upload():
            async with httpx.AsyncClient(base_url=base, timeout=300) as u:
                r = await u.post("/api/uploads", files={"file": ("big.jpg", jpeg, "image/jpeg")})
                return r.status_code

        async def uploads():
            codes = await asyncio.gather(*(upload() for _ in range(n_uploads)))
            stop.set()
            return codes

        codes, during = await asyncio.gather(uploads(), probe_series(stop))
    return {"upload_bytes": len(jpeg), "upload_statuses": codes,
            "probe_ms_alone": {"p50": round(float(np.median(alone)), 1), "max": round(float(np.max(alone)), 1)},
            "probe_ms_during_uploads": {"p50": round(float(np.median(during)), 1), "max": round(float(np.max(during)), 1),
                                        "n": len(during)}}


def concurrent(args) -> dict:
    import asyncio
    import subprocess

    import httpx

    tmp = Path(tempfile.mkdtemp(prefix="cytosae-bench-explorer-"))
    proc = None
    try:
        t0 = time.perf_counter()
        run = write_run(tmp, args.latents, args.d, args.patients)
        write_s = time.perf_counter() - t0
        port = _free_port()
        proc = subprocess.Popen([sys.executable, "-c", SERVER, str(run), str(port)], env={**os.environ})
        base = f"http://127.0.0.1:{port}"
        t0 = time.perf_counter()
        ready = False
        while time.perf_counter() - t0 < args.ready_timeout:  # tables indexed and every latent's neighbours known
            try:
                ready = httpx.get(base + "/api/run", timeout=10).json().get("neighbours_precomputed", False)
            except (httpx.HTTPError, ValueError):
                pass
            if ready:
                break
            time.sleep(0.5)
        ready_s = time.perf_counter() - t0
        httpx.get(base + "/api/latents/0", timeout=60).raise_for_status()
        lat, statuses, wall = asyncio.run(_load(base, args.latents, args.concurrency, min(args.duration, 120),
                                                args.max_requests))
        uploads = asyncio.run(_upload_interference(base, 2, 40))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)
    pct = {f"p{q}": round(float(np.percentile(lat, q)), 1) for q in (50, 95, 99)}
    return {
        "what": "GET /api/latents/{id} (latent page JSON) of random latents, --concurrency clients each with one "
                "connection and one request at a time, against `cytosae explore`'s server in its own process "
                "(127.0.0.1); the clients run in the bench process on the same machine",
        "command": "python bench/explorer.py " + " ".join(sys.argv[1:]),
        "n_latents": args.latents, "d_decoder": args.d, "n_patients": args.patients,
        "concurrency": args.concurrency, "requests": int(len(lat)), "seconds": round(wall, 1),
        "requests_per_s": round(len(lat) / wall, 1), "latency_ms": {**pct, "max": round(float(lat.max()), 1)},
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "uploads_25mpx": {"what": "GET /api/run latency alone, then while two 25-Mpixel JPEG uploads are decoded "
                                  "(this run's store is imported, so they end in 503 after decoding: no backbone)",
                          **uploads},
        "target": "p95 <= 200 ms at 16 concurrent connections", "meets_target": bool(pct["p95"] <= 200),
        "setup_s": {"write_synthetic_run": round(write_s, 1), "server_ready_with_neighbours_precomputed": round(ready_s, 1),
                    "ready": ready},
        "machine": {"platform": platform.platform(), "python": sys.version.split()[0], "cpus": os.cpu_count(),
                    "load_avg_1m_at_end": round(os.getloadavg()[0], 2),
                    "note": "shared machine: other jobs were running while this was measured"},
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--latents", type=int, default=49_152)
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--patients", type=int, default=40)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--concurrency", type=int, default=0, help="clients at once (0: the sequential latency run)")
    ap.add_argument("--duration", type=float, default=30, help="seconds of load in concurrent mode (at most 120)")
    ap.add_argument("--max-requests", type=int, default=20_000)
    ap.add_argument("--ready-timeout", type=float, default=300, help="seconds to wait for the server's preload")
    args = ap.parse_args()
    if args.concurrency > 0:
        result = concurrent(args)
        out = args.out or REPO / "bench" / "results" / "explorer_concurrent.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps(result, indent=1))
        return
    args.out = args.out or REPO / "bench" / "results" / "explorer.json"

    import httpx
    import uvicorn

    from cytosae.explorer import create_app

    tmp = Path(tempfile.mkdtemp(prefix="cytosae-bench-explorer-"))
    srv = None
    try:
        t0 = time.perf_counter()
        run = write_run(tmp, args.latents, args.d, args.patients)
        write_s = time.perf_counter() - t0
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        t0 = time.perf_counter()
        web = create_app(run)
        srv = uvicorn.Server(uvicorn.Config(web, host="127.0.0.1", port=port, log_level="warning"))
        threading.Thread(target=srv.run, daemon=True).start()
        while not srv.started:
            time.sleep(0.01)
        start_s = time.perf_counter() - t0
        rng = np.random.default_rng(1)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as c:
            def timed(url):
                t = time.perf_counter()
                r = c.get(url)
                r.raise_for_status()
                return (time.perf_counter() - t) * 1000, len(r.content)
            cold_ms, _ = timed("/api/latents/0")  # loads + sorts the tables and the decoder
            warm, sizes = [], []
            for j in rng.integers(0, args.latents, args.requests):
                ms, size = timed(f"/api/latents/{int(j)}")
                warm.append(ms)
                sizes.append(size)
            overview_cold, overview_bytes = timed("/api/latents?dataset=mll")
            overview = [timed("/api/latents?dataset=mll")[0] for _ in range(5)]
            barcodes_cold, _ = timed("/api/patients/barcodes")
            barcodes_warm = [timed("/api/patients/barcodes")[0] for _ in range(5)]
            # overlays of 12 top images: TopK needs the full encoder per image (then cached), ReLU one column
            heat = {}
            heat["topk_cold"], _ = timed("/api/latents/1/heatmaps?dataset=mll&by=image&k=12")
            heat["topk_cold_other_latent"], _ = timed("/api/latents/2/heatmaps?dataset=mll&by=image&k=12")
        cfg = json.loads((run / "sae" / "config.json").read_text())
        (run / "sae" / "config.json").write_text(json.dumps({**cfg, "arch": "relu-l1"}))
        srv.should_exit = True
        srv2 = uvicorn.Server(uvicorn.Config(create_app(run), host="127.0.0.1", port=port + 1 if port < 65535 else port - 1,
                                             log_level="warning"))
        threading.Thread(target=srv2.run, daemon=True).start()
        while not srv2.started:
            time.sleep(0.01)
        with httpx.Client(base_url=f"http://127.0.0.1:{srv2.config.port}", timeout=120) as c:
            def timed(url):
                t = time.perf_counter()
                c.get(url).raise_for_status()
                return (time.perf_counter() - t) * 1000, 0
            timed("/api/latents/0")
            heat["relu_cold"], _ = timed("/api/latents/3/heatmaps?dataset=mll&by=image&k=12")
            heat["relu_warm_other_latent"], _ = timed("/api/latents/4/heatmaps?dataset=mll&by=image&k=12")
        srv2.should_exit = True
        warm = np.array(warm)
        result = {
            "what": "GET /api/latents/{id} (latent page JSON: stats, top-20 images x2 rankings, class profile, histogram, "
                    "20 enriched patients, disease comparison, 10 decoder-cosine neighbours) over HTTP, random latents",
            "n_latents": args.latents, "d_decoder": args.d, "n_patients": args.patients, "requests": args.requests,
            "latent_page_ms": {"cold_first": round(cold_ms, 1), "p50": round(float(np.percentile(warm, 50)), 2),
                               "p95": round(float(np.percentile(warm, 95)), 2), "max": round(float(warm.max()), 2)},
            "latent_page_bytes_mean": int(np.mean(sizes)),
            "overview_ms": {"cold_first": round(overview_cold, 1), "warm_median": round(float(np.median(overview)), 1),
                            "bytes": overview_bytes},
            "patients_barcodes_ms": {"cold_first": round(barcodes_cold, 1), "warm_median": round(float(np.median(barcodes_warm)), 1)},
            "heatmaps_12_images_ms": {k2: round(v, 1) for k2, v in heat.items()},
            "target_p95_ms": 200, "meets_target": bool(np.percentile(warm, 95) < 200),
            "setup_s": {"write_synthetic_run": round(write_s, 1), "start_app": round(start_s, 2)},
            "machine": {"platform": platform.platform(), "python": sys.version.split()[0], "cpus": os.cpu_count(),
                        "load_avg_1m_at_end": round(os.getloadavg()[0], 2),
                        "note": "shared machine: other jobs were running while this was measured"},
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
    finally:
        if srv is not None:
            srv.should_exit = True
        shutil.rmtree(tmp, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
