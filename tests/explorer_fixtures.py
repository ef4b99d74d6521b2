"""A small but complete run directory (docs/run-layout.md) for explorer tests, written by the package's own writers.

Tokens are designed so that each class lights up a known latent on a known block of patches, and the
SAE's weights are designed to match; everything on disk is then written by the real code paths:
`import_embeddings` (stores), `SAE.save` (sae/), `compute_latent_stats` + `write_stats` (stats/),
`patient_barcodes` + `write_patients` (patients/), `classify_patients` + `write_classify` (classify/),
and run.json the way `cytosae.demo` writes it. A change in what a writer writes therefore shows up
in the explorer tests. `acts` holds the activations from an independent numpy encoder, so tests can
check the API's values against numbers not computed by the code under test.

`session_run()` builds the run once per test session; tests that damage it work on a copy.
"""
from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

GRID = 16
N_TOKENS = 1 + GRID * GRID
CLASSES = ["neutrophil", "lymphocyte", "monocyte"]
INPUT_SCALE = 0.5  # != 1, so an encoder that ignores the SAE's input scale gives different numbers
STATS_K = 5
LOCAL = "http://127.0.0.1:8000"  # TestClient base URL: a loopback Host, as a browser on this machine sends


@dataclass
class FixtureRun:
    path: Path
    data: dict[str, Path]
    n_latents: int
    d: int
    acts: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # dataset -> image_id -> (257, n_latents)
    w_dec: np.ndarray | None = None


def encode(x: np.ndarray, w_enc, b_enc, b_dec) -> np.ndarray:
    """ReLU SAE encoder in numpy, independent of cytosae.sae: relu((x * s - b_dec) @ W_enc + b_enc)."""
    return np.maximum((x * INPUT_SCALE - b_dec) @ w_enc + b_enc, 0.0).astype(np.float32)


def _sae_weights(rng, n_latents: int, d: int):
    # decoder: unit rows; latent j < 3 is "class j", latents 3,4 are near-duplicates of latent 0 (neighbours)
    w_dec = rng.normal(size=(n_latents, d)).astype(np.float32)
    w_dec[3] = w_dec[0] + 0.05 * rng.normal(size=d)
    w_dec[4] = w_dec[0] + 0.20 * rng.normal(size=d)
    w_dec /= np.linalg.norm(w_dec, axis=1, keepdims=True)
    return w_dec.T.copy(), np.full(n_latents, -1.5, np.float32), w_dec, np.zeros(d, np.float32)


def _save_sae(sae_dir: Path, w_enc, b_enc, w_dec, b_dec):
    import torch

    from cytosae.sae import SAE, SAEConfig

    sae = SAE(SAEConfig(arch="relu-l1", d_in=w_enc.shape[0], n_latents=w_enc.shape[1]))
    sae.load_tensors({"W_enc": torch.from_numpy(w_enc), "b_enc": torch.from_numpy(b_enc), "W_dec": torch.from_numpy(w_dec),
                      "b_dec": torch.from_numpy(b_dec), "input_scale": torch.tensor(INPUT_SCALE)})
    sae.save(sae_dir)
    return SAE.load(sae_dir)


def _write_dataset(root: Path, run: Path, ds: str, n: int, w_dec, rng) -> tuple[pd.DataFrame, np.ndarray, Path]:
    """Cell images on disk, designed tokens, and the store (import_embeddings) for one dataset."""
    from cytosae.store import import_embeddings

    data = root / "data" / ds
    rows, tokens = [], np.zeros((n, N_TOKENS, w_dec.shape[1]), np.float32)
    for i in range(n):
        c = i % len(CLASSES)
        rel = f"{CLASSES[c]}/cell_{i:02d}.png"
        (data / CLASSES[c]).mkdir(parents=True, exist_ok=True)
        img = np.full((48, 64, 3), 200, np.uint8)
        img[10:38, 16:48] = (120 + 40 * c, 60, 150)
        Image.fromarray(img).save(data / rel)
        rows.append({"image_id": rel, "path": str(data / rel), "label": CLASSES[c],
                     "patient_id": f"{ds}_p{i % 4}", "diagnosis": ["AML", "control"][i % 4 % 2]})
        tok = 0.1 * rng.normal(size=(N_TOKENS, w_dec.shape[1])).astype(np.float32)
        # class latent c fires (strength grows with i) on a 4x4 block of patches whose position depends on i
        r0, c0 = (i * 3) % 12, (i * 5) % 12
        strength = 2.0 + 0.25 * i
        for r in range(r0, r0 + 4):
            for cc in range(c0, c0 + 4):
                tok[1 + r * GRID + cc] += strength * w_dec[c]
        tok[0] += (strength - 0.3) * w_dec[c]  # CLS carries the class latent too
        tokens[i] = tok / INPUT_SCALE  # raw store units; the SAE scales them back
    manifest = pd.DataFrame(rows)
    np.save(root / f"{ds}.npy", tokens)
    import_embeddings(root / f"{ds}.npy", manifest, run / "stores" / ds, dtype="float32", shard_size=5)
    return manifest, tokens, data


def make_run(root: Path, n_latents: int = 48, d: int = 32, n_per_dataset=(12, 6), seed: int = 0) -> FixtureRun:
    from cytosae import __version__
    from cytosae.analysis import compute_latent_stats, patient_barcodes, write_patients, write_stats
    from cytosae.analysis.encoded import EncodedStore
    from cytosae.analysis.classify import ClassifyConfig, classify_patients, write_classify
    from cytosae.store import ActivationStore
    from cytosae.store.format import atomic_write_json

    rng = np.random.default_rng(seed)
    root = Path(root)
    run = root / "run"
    run.mkdir(parents=True)
    w_enc, b_enc, w_dec, b_dec = _sae_weights(rng, n_latents, d)
    sae = _save_sae(run / "sae", w_enc, b_enc, w_dec, b_dec)

    fx = FixtureRun(run, {}, n_latents, d, w_dec=w_dec)
    datasets = {"acevedo": n_per_dataset[0], "mll": n_per_dataset[1]}
    stats = []
    for ds, n in datasets.items():
        manifest, tokens, fx.data[ds] = _write_dataset(root, run, ds, n, w_dec, rng)
        fx.acts[ds] = {manifest.image_id[i]: encode(tokens[i], w_enc, b_enc, b_dec) for i in range(n)}
        store = ActivationStore(run / "stores" / ds)
        stats.append(compute_latent_stats(EncodedStore(store, sae, "cpu", 4), store.images, k=STATS_K,
                                          dataset=ds, n_bins=8))
    write_stats(stats, run / "stats")

    ds = "acevedo"  # patients and diagnosis from the first dataset
    store = ActivationStore(run / "stores" / ds)
    bc = patient_barcodes(EncodedStore(store, sae, "cpu", 4), store.images, token_policy="any_patch")
    write_patients(bc, run / "patients", summary={"threshold": 0.0, "token_policy": "any_patch"})
    res = classify_patients(bc, ClassifyConfig(n_splits=2, n_repeats=1, n_bootstrap=20, ablate=(1,), ablation_repeats=1,
                                               n_trees=5, models=("logreg_l2",)), dataset=ds)
    write_classify(res, run / "classify")
    atomic_write_json(run / "run.json", {
        "datasets": {name: {"store": f"stores/{name}", "data": str(fx.data[name])} for name in datasets},
        "sae": "sae", "backbone": None,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "cytosae_version": __version__})
    return fx


_SESSION: dict[str, FixtureRun] = {}


def session_run(tmp_path_factory) -> FixtureRun:
    """One fixture run per test session (its tables take seconds to compute); do not modify it, copy it."""
    if "run" not in _SESSION:
        _SESSION["run"] = make_run(tmp_path_factory.mktemp("explorer-run"))
    return _SESSION["run"]


def copy_of(fx: FixtureRun, dest: Path) -> FixtureRun:
    """A private copy of the run directory (same data folders), for tests that write annotations or damage files."""
    import dataclasses
    import shutil

    # annotations are per test: an explorer opened on the shared run creates an empty annotations.sqlite there
    shutil.copytree(fx.path, Path(dest) / "run", ignore=shutil.ignore_patterns("annotations.sqlite*"))
    return dataclasses.replace(fx, path=Path(dest) / "run")


def make_pipeline_run(root: Path, seed: int = 0, picked: bool = False) -> Path:
    """A tiny run made end to end by the package, the way `cytosae.demo` makes one: synthetic cells, a 1-block
    dinobloom-s with random weights, `extract`, a small TopK SAE from `train_sae`, stats, patients, classify,
    run.json. Nothing is designed: it checks that the explorer reads whatever the writers write.
    `picked`: the cells lie in a collection outside the run, and the manifest is a CSV in the run naming 12 of
    them by absolute path (issue #16: the store's data root is then the collection's folder)."""
    import json

    import torch

    from cytosae import __version__
    from cytosae.analysis import compute_latent_stats, patient_barcodes, write_patients, write_stats
    from cytosae.analysis.encoded import EncodedStore
    from cytosae.analysis.classify import ClassifyConfig, classify_patients, write_classify
    from cytosae.backbones import load_backbone
    from cytosae.data import load_manifest
    from cytosae.data.synthetic import make_sample
    from cytosae.sae import ShuffleBuffer, train_sae
    from cytosae.store import ActivationStore, ExtractConfig, extract
    from cytosae.store.format import atomic_write_json

    run = Path(root) / "run"
    run.mkdir(parents=True)
    manifest_csv = make_sample(run / "data" / "sample" if not picked else Path(root) / "collection" / "cells",
                               seed=seed, n_patients=4, cells_per_patient=4, size=64)
    if picked:
        table = pd.read_csv(manifest_csv)
        table = table[table.index % 4 != 3].assign(path=lambda t: [str(manifest_csv.parent / p) for p in t["path"]])
        manifest_csv = run / "data" / "picked.csv"
        manifest_csv.parent.mkdir(parents=True)
        table.to_csv(manifest_csv, index=False)
    torch.manual_seed(seed)
    bb = load_backbone("dinobloom-s", depth=1)
    extract(load_manifest(manifest_csv), bb, run / "stores" / "sample",
            ExtractConfig(layer=-1, batch_size=8, shard_size=8, progress=False))
    store = ActivationStore(run / "stores" / "sample")
    total = store.n_images * store.n_tokens
    batches = ShuffleBuffer(8192, seed)(store.iter_tokens("all", batch_size=1024), batch_size=1024)
    sae = train_sae(batches, store.d_model, "topk", 2 * store.d_model, total, seed=seed, batch_size=1024, k=8,
                    checkpoint_dir=run / "sae", checkpoint_every=total)
    stats = compute_latent_stats(EncodedStore(store, sae, "cpu"), store.images, k=4, dataset="sample")
    write_stats([stats], run / "stats")
    bc = patient_barcodes(EncodedStore(store, sae, "cpu"), store.images, token_policy="any_patch")
    write_patients(bc, run / "patients", summary={"threshold": 0.0, "token_policy": "any_patch"})
    if int(bc.drop_duplicates("patient_id").diagnosis.value_counts().min()) >= 2:
        write_classify(classify_patients(bc, ClassifyConfig(n_splits=2, n_repeats=1, n_bootstrap=10, ablate=(1,),
                                                            ablation_repeats=1, n_trees=5, models=("logreg_l2",)),
                                         dataset="sample"), run / "classify")
    atomic_write_json(run / "run.json", {  # as cytosae.demo writes it
        "datasets": {"sample": {"store": "stores/sample", "data": str(manifest_csv)}}, "sae": "sae",
        "backbone": {"name": "dinobloom-s", "weights": None, "layer": -1, "options": {"depth": 1}},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "cytosae_version": __version__})
    json.loads((run / "run.json").read_text())
    return run


def write_descriptions_for(run: Path, latents, text, best_class) -> Path:
    """RUN/concepts/descriptions.parquet through `cytosae describe`'s writer, with the given lines and best classes
    and the other facts unmeasured (None): for tests of the readers that need chosen texts, not measured ones."""
    from cytosae.analysis.describe import CONCEPTS, REQUIRED_COLUMNS, Descriptions, write_descriptions

    latents = [int(j) for j in latents]
    table = pd.DataFrame({c: [None] * len(latents) for c in REQUIRED_COLUMNS})
    table["latent"], table["text"], table["best_class"] = latents, text, best_class
    write_descriptions(Descriptions(table, {"written_by": "tests"}), run / CONCEPTS)
    return run / CONCEPTS
