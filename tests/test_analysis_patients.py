"""Patient barcodes (fractions of cells, not of latents) and the disease comparison."""
import json

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats as sps

from cytosae.analysis import compare_groups, disease_barcodes, patient_barcodes, write_patients
from cytosae.analysis.encoded import EncodedStore


def _cells():
    # 3 patients: P1 (2 cells, APL), P2 (3 cells, APL), P3 (1 cell, AML); 3 latents; tokens = CLS + 4 patches
    acts = torch.zeros(6, 5, 3)
    acts[0, 0, 0] = acts[1, 0, 0] = 1.0  # latent 0 on the CLS of both P1 cells
    acts[2, 0, 0] = 1.0  # and of one P2 cell
    acts[3, 2, 1] = 0.5  # latent 1 on a patch of a P2 cell only
    acts[5, 0, 2] = 0.2  # latent 2 on P3's cell, below a 0.3 threshold
    ids = [f"c{i}" for i in range(6)]
    manifest = pd.DataFrame({"image_id": ids, "patient_id": ["P1", "P1", "P2", "P2", "P2", "P3"],
                             "diagnosis": ["APL"] * 5 + ["AML"]})
    return [(ids[:4], acts[:4]), (ids[4:], acts[4:])], manifest


def test_barcodes_are_fractions_of_the_patients_cells():
    batches, manifest = _cells()
    bc = patient_barcodes(EncodedStore.of_function(torch.relu, 3, batches), manifest, threshold=0.0, token_policy="cls").set_index(["patient_id", "latent"])
    assert bc.loc[("P1", 0), "frac"] == 1.0 and bc.loc[("P2", 0), "frac"] == pytest.approx(1 / 3)
    assert bc.loc[("P2", 0), "count"] == 1 and bc.loc[("P2", 0), "n_cells"] == 3
    assert bc.loc[("P2", 1), "frac"] == 0.0  # fires on a patch, not on CLS
    assert bc.loc[("P3", 2), "frac"] == 1.0 and bc.loc[("P3", 0), "diagnosis"] == "AML"
    batches, _ = _cells()
    anyp = patient_barcodes(EncodedStore.of_function(torch.relu, 3, batches), manifest, threshold=0.3, token_policy="any_patch").set_index(["patient_id", "latent"])
    assert anyp.loc[("P2", 1), "frac"] == pytest.approx(1 / 3) and anyp.loc[("P3", 2), "frac"] == 0.0
    dis = disease_barcodes(bc.reset_index()).set_index(["diagnosis", "latent"])
    assert dis.loc[("APL", 0), "frac_mean"] == pytest.approx((1 + 1 / 3) / 2)  # mean over patients, not cells
    with pytest.raises(ValueError, match="no patient_id"):
        patient_barcodes(EncodedStore.of_function(torch.relu, 3, batches), manifest.drop(columns="patient_id"))
    with pytest.raises(ValueError, match="token policy"):
        patient_barcodes(EncodedStore.of_function(torch.relu, 3, batches), manifest, token_policy="max")


def test_comparison_finds_the_separating_latent_with_bh_q(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for p in range(20):
        dx = "APL" if p < 10 else "AML"
        for latent in range(30):
            frac = rng.uniform(0, 0.3) + (0.6 if latent == 7 and dx == "APL" else 0.0)
            rows.append((f"P{p}", dx, latent, frac, 0, 10))
    bc = pd.DataFrame(rows, columns=["patient_id", "diagnosis", "latent", "frac", "count", "n_cells"])
    cmp = compare_groups(bc)
    top = cmp.iloc[0]  # groups in sorted order: effect = mean(AML) - mean(APL)
    assert (top.latent, top.group_a, top.group_b) == (7, "AML", "APL") and top.q < 0.01 and top.effect < -0.5
    np.testing.assert_allclose(np.sort(cmp.q), np.sort(sps.false_discovery_control(cmp.p, method="bh")))
    assert (cmp.q >= cmp.p - 1e-12).all() and (cmp[cmp.latent != 7].q > 0.05).all()
    out = write_patients(bc, tmp_path / "patients")
    assert {p.name for p in out.iterdir()} >= {"barcodes.parquet", "disease_barcodes.parquet", "compare.parquet", "summary.json"}
    figs = {p.name for p in (out / "figures").iterdir()}
    assert figs == {"barcodes.png", "patient_correlation.png", "volcano_AML_vs_APL.png"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["comparisons"][0]["top_latents"][0]["latent"] == 7 and summary["groups"] == {"AML": 10, "APL": 10}
    with pytest.raises(ValueError, match="needs two or more"):
        compare_groups(bc[bc.diagnosis == "APL"])


def test_three_groups_get_one_vs_rest_and_kruskal_wallis(tmp_path):
    rng = np.random.default_rng(1)
    groups = ["APL", "AML-NPM1", "AML-CBF"]
    rows = [(f"P{p}", groups[p % 3], j, rng.uniform(0, 0.2) + (0.7 if j == 4 and p % 3 == 1 else 0.0), 0, 10)
            for p in range(18) for j in range(12)]
    bc = pd.DataFrame(rows, columns=["patient_id", "diagnosis", "latent", "frac", "count", "n_cells"])
    cmp = compare_groups(bc)
    assert set(zip(cmp.group_a, cmp.group_b)) == {(g, "rest") for g in groups} | {("all", "kruskal_wallis")}
    kw = cmp[cmp.group_b == "kruskal_wallis"].set_index("latent")
    x = bc.pivot(index="patient_id", columns="latent", values="frac")
    g = bc.drop_duplicates("patient_id").set_index("patient_id").diagnosis.reindex(x.index)
    ref = sps.kruskal(*[x[4][g == name] for name in groups])
    assert kw.loc[4, "p"] == pytest.approx(ref.pvalue) and kw.loc[4, "q"] < 0.05 and kw.loc[4, "effect"] > 0.5
    assert (kw.drop(index=4).q > 0.05).all()
    np.testing.assert_allclose(kw.q.sort_values(), np.sort(sps.false_discovery_control(kw.p, method="bh")))
    out = write_patients(bc, tmp_path / "p")
    assert (out / "figures" / "volcano_all_vs_kruskal_wallis.png").is_file()
    assert len(list((out / "figures").glob("volcano_*.png"))) == 4
