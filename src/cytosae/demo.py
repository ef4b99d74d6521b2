"""`make demo`: a study (docs/run-layout.md) over the built-in synthetic sample, run like any user's study.

The run directory holds the sample (data/sample), the study file (study.toml) and every
output, so `cytosae run RUN/study.toml` reruns it and `cytosae explore RUN` browses it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

# The sample's generating factors: ground truth the concepts are checked against (stats/factor_purity.csv).
FACTORS = ["label", "nucleus_shape", "granule_colour", "size_px", "cytoplasm_colour", "background"]


def demo_study(weights: str | Path | None, seed: int, backbone: str, expansion: int, k: int,
               classify: bool) -> str:
    """The demo's study file: what `make demo` runs, written out so users can copy it for their own data."""
    lines = ['# The demo: the synthetic sample through every step. Rerun: cytosae run study.toml',
             '[run]', 'dir = "."', '',
             '[backbone]', f'name = "{backbone}"', 'layer = -2', f'seed = {seed}', 'batch_size = 16', 'shard_size = 128']
    if weights:
        lines.append(f"weights = {json.dumps(str(Path(weights).absolute()))}")
    lines += ['', '[datasets.sample]', 'data = "data/sample/manifest.csv"', '',
              '[sae]', 'arch = "topk"', f'expansion = {expansion}', f'k = {k}', 'batch_size = 2048', 'shuffle = 65536',
              f'seed = {seed}', '',
              '[stats]', 'k = 16', 'galleries = 0', f'factors = {json.dumps(FACTORS)}', '',
              '[patients]', 'token_policy = "any_patch"', 'examples = 3', '']
    if classify:
        lines += ['[classify]', 'repeats = 5', f'seed = {seed}', 'cell_type_column = "label"',
                  'proportion = "promyelocyte"', '']
    return "\n".join(lines)


def run_demo(out: str | Path, seed: int = 0, n_patients: int = 12, cells_per_patient: int = 24,
             backbone: str = "dinobloom-s", weights: str | Path | None = None, expansion: int = 8, k: int = 16,
             say: Callable[[str], None] = print) -> dict:
    """Sample -> store -> TopK SAE -> evaluation -> concepts, factor purity, barcodes, disease comparison and
    diagnosis (when every diagnosis has 2 patients or more); returns the SAE's evaluation (sae/eval.json)."""
    import pandas as pd

    from cytosae.data.synthetic import make_sample
    from cytosae.store.format import atomic_write_bytes
    from cytosae.study import run_study

    run = Path(out)
    run.mkdir(parents=True, exist_ok=True)
    manifest_csv = make_sample(run / "data" / "sample", seed=seed, n_patients=n_patients,
                               cells_per_patient=cells_per_patient)
    cells = pd.read_csv(manifest_csv)
    say(f"synthetic sample: {len(cells)} cells of {cells.label.nunique()} classes from {cells.patient_id.nunique()} "
        f"patients ({', '.join(sorted(cells.diagnosis.unique()))}) -> {manifest_csv.parent}")
    if weights is None:
        say("!!! the backbone has RANDOM weights (none given): the demo shows the machinery, not biology !!!")
    per_diagnosis = cells.drop_duplicates("patient_id").diagnosis.value_counts().min()
    study = run / "study.toml"
    atomic_write_bytes(study, demo_study(weights, seed, backbone, expansion, k, classify=per_diagnosis >= 2).encode())
    run_study(study, say=say)
    if per_diagnosis < 2:
        say("diagnosis: skipped, cross-validation needs at least 2 patients per diagnosis")
    say(f"run written to {run} (study file {study}; layout: docs/run-layout.md). Browse it: cytosae explore {run}")
    from cytosae.run import Run
    from cytosae.steps.evaluate import read_eval

    return read_eval(Run.open(run).sae_dir)
