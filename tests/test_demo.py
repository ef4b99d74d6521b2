"""End to end: the demo pipeline writes a run the explorer can serve."""
import json

import pandas as pd
import pytest
from fastapi.testclient import TestClient

from cytosae.demo import run_demo
from cytosae.explorer.api import create_app


def test_demo_writes_a_complete_run_the_explorer_serves(tmp_path):
    lines = []
    ev = run_demo(tmp_path / "run", n_patients=2, cells_per_patient=4, expansion=2, k=4, say=lines.append)
    run = tmp_path / "run"
    assert ev["all"]["l0"] <= 4.0 + 1e-6 and 0 <= ev["all"]["fvu"] < 2
    meta = json.loads((run / "run.json").read_text())
    assert meta["datasets"]["sample"]["store"] == "stores/sample"
    latents = pd.read_parquet(run / "stats" / "latents.parquet")
    assert len(latents) == 2 * 384 and latents.freq_image.between(0, 1).all()
    assert (run / "stats" / "factor_purity.csv").is_file() and (run / "sae" / "eval.json").is_file()
    assert any("RANDOM weights" in l for l in lines) and lines[-1].endswith(f"cytosae explore {run}")
    assert pd.read_parquet(run / "patients" / "barcodes.parquet").frac.between(0, 1).all()
    with TestClient(create_app(run), base_url="http://127.0.0.1") as c:
        assert c.get("/api/patients/barcodes").status_code == 200
        assert c.get("/api/latents/0").status_code == 200
        assert c.get("/api/image", params={"dataset": "sample", "image_id": "P000/cell_000.png"}).status_code == 200


def test_demo_is_reproducible(tmp_path):
    evs = [run_demo(tmp_path / f"run{i}", n_patients=2, cells_per_patient=3, expansion=2, k=4, say=lambda s: None)
           for i in range(2)]
    shard = "stores/sample/shard_00000.safetensors"
    assert (tmp_path / "run0" / shard).read_bytes() == (tmp_path / "run1" / shard).read_bytes()
    assert evs[0]["all"]["fvu"] == evs[1]["all"]["fvu"]


@pytest.mark.slow
def test_full_demo_finds_the_generating_factors_and_writes_every_analysis(demo_run):
    """`make demo` as shipped: on the synthetic sample the factors are ground truth (issue "Concepts")."""
    run, lines = demo_run
    purity = pd.read_csv(run / "stats" / "factor_purity.csv")
    assert (purity.purity >= 0.9).sum() >= 3
    independent = purity[purity.factor.isin(["cytoplasm_colour", "background"])]  # drawn independently of the class
    assert (independent.purity >= 0.9).sum() >= 2, independent
    figs = {p.name for p in (run / "stats" / "figures").glob("*.png")}
    assert figs == {"frequency_vs_activation_sample.png", "class_profile_sample.png"}
    assert len(list((run / "stats" / "figures" / "galleries" / "sample").glob("latent_*.png"))) >= 3
    assert {"barcodes.png", "patient_correlation.png", "volcano_AML_vs_APL.png"} <= {
        p.name for p in (run / "patients" / "figures").glob("*.png")}
    examples = run / "patients" / "figures" / "examples"
    assert {d.name for d in examples.iterdir()} == {"AML_vs_APL", "APL_vs_AML"}  # both directions of the comparison
    assert all(len(list(d.glob("latent_*.png"))) == 3 for d in examples.iterdir())
    res = json.loads((run / "classify" / "results.json").read_text())
    assert {"concepts_logreg_l1", "baseline_mean_embedding_logreg_l2", "baseline_promyelocyte_proportion"} <= set(res["models"])
    assert all(0 <= m["auroc"] <= 1 and 0 <= m["macro_f1"] <= 1 for m in res["models"].values())
    assert (run / "classify" / "figures" / "roc.png").is_file()
    assert any(l.startswith("[6/6] classify") for l in lines) and lines[-1].endswith(f"cytosae explore {run}")
    assert json.loads((run / "run.json").read_text())["steps"]["classify"]["command"] == "cytosae classify"
    with TestClient(create_app(run), base_url="http://127.0.0.1") as c:
        r = c.get("/api/classify")
        assert r.status_code == 200 and r.json()["models"]["concepts_logreg_l2"]["folds"] == 5
        cmp = c.get("/api/patients/compare").json()
        assert cmp["group_a"] == "AML" and cmp["group_b"] == "APL" and cmp["n"] == 8 * 384
