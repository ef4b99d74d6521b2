"""Patient-level classification: cross-validation over patients, baselines, importance, external cohorts."""
import json

import numpy as np
import pandas as pd
import pytest
import torch

from cytosae.analysis.classify import (ClassifyConfig, ablation, barcode_features, classify_patients,
                                       composition_features, concept_importance, cross_validate, external_validation,
                                       mean_embedding_features, write_classify)


def _barcodes(n_apl=10, n_aml=20, n_latents=10, signal=(3,), seed=0, prefix="P"):
    """Long barcode table where the `signal` latents fire in more APL cells."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_apl + n_aml):
        dx = "APL" if p < n_apl else "AML"
        for j in range(n_latents):
            frac = rng.uniform(0, 0.4) + (0.5 if j in signal and dx == "APL" else 0.0)
            rows.append((f"{prefix}{p:02d}", dx, j, frac, int(frac * 20), 20))
    return pd.DataFrame(rows, columns=["patient_id", "diagnosis", "latent", "frac", "count", "n_cells"])


FAST = ClassifyConfig(n_splits=5, n_repeats=3, n_bootstrap=200, ablation_repeats=2, ablate=(1, 5), n_trees=40)


def test_cross_validation_separates_signal_from_noise():
    x, y = barcode_features(_barcodes())
    assert x.shape == (30, 10) and set(y) == {"APL", "AML"}
    good = cross_validate(x, y, "logreg_l2", FAST)["scores"]
    assert good["auroc"] > 0.95 and good["macro_f1"] > 0.85 and good["positive"] == "APL"  # the rarer class
    assert good["folds"] == 5 and good["repeats"] == 3 and set(good["per_class_f1"]) == {"APL", "AML"}
    lo, hi = good["auroc_ci"]
    assert 0.5 < lo <= hi <= 1.0
    noise = cross_validate(x.drop(columns=[3]), y, "logreg_l2", FAST)["scores"]
    assert 0.15 < noise["auroc"] < 0.85  # no information: near chance, never the signal's score
    rf = cross_validate(x, y, "random_forest", FAST)["scores"]
    assert rf["auroc"] > 0.9


def test_every_patient_gets_exactly_one_prediction_per_repeat_and_duplicates_are_refused():
    x, y = barcode_features(_barcodes())
    cv = cross_validate(x, y, "logreg_l1", FAST)
    assert cv["oof_proba"].shape == (30, 2) and np.allclose(cv["oof_proba"].sum(1), 1.0)
    assert cv["patients"] == list(x.index)
    with pytest.raises(ValueError, match="one row per patient"):
        cross_validate(pd.concat([x, x.iloc[:1]]), y, "logreg_l2", FAST)
    with pytest.raises(ValueError, match="at least 2 patients"):
        cross_validate(x.iloc[[0, 10, 11, 12, 13]], y, "logreg_l2", FAST)


def test_importance_finds_the_signal_latent_and_ablation_costs_score():
    x, y = barcode_features(_barcodes())
    imp = concept_importance(x, y, FAST, kind="logreg_l2")
    assert imp.iloc[0].feature == 3 and imp.iloc[0].coef > 0 and imp.iloc[0]["class"] == "APL"
    rows = {r["removed_top"]: r for r in ablation(x, y, FAST)}
    assert rows[0]["auroc"] > 0.95 and rows[1]["auroc_drop"] > 0.2  # the one informative concept is gone


def test_external_cohort_and_mismatched_features():
    x, y = barcode_features(_barcodes(seed=0))
    xe, ye = barcode_features(_barcodes(seed=1, prefix="Q"))
    res = external_validation(x, y, xe, ye, "logreg_l2", FAST)
    assert res["n_train"] == 30 and res["n_test"] == 30 and res["auroc"] > 0.95 and res["auroc_ci"][0] > 0.8
    with pytest.raises(ValueError, match="lacks 1 feature"):
        external_validation(x, y, xe.drop(columns=[5]), ye, "logreg_l2", FAST)


class _FakeStore:
    """The two things the baselines read from an activation store: the image table and CLS tokens."""

    def __init__(self, n_patients=12, cells=6, seed=0):
        rng = np.random.default_rng(seed)
        rows, cls = [], []
        for p in range(n_patients):
            dx = "APL" if p % 3 == 0 else "AML"
            for c in range(cells):
                t = "promyelocyte" if (dx == "APL" and c < 4) or (dx == "AML" and c == 0) else "blast"
                rows.append({"image_id": f"P{p:02d}/{c}", "patient_id": f"P{p:02d}", "diagnosis": dx, "cell_type": t})
                cls.append(rng.normal(size=8) + (2.0 if dx == "APL" else 0.0))
        self.images = pd.DataFrame(rows)
        self._cls = torch.tensor(np.array(cls), dtype=torch.float32)

    def iter_images(self, batch_size, tokens="all"):
        ids = self.images.image_id.tolist()
        for s in range(0, len(ids), batch_size):
            yield ids[s:s + batch_size], self._cls[s:s + batch_size, None, :]


def test_baselines_from_the_same_cells_and_results_json_for_the_explorer(tmp_path):
    store = _FakeStore()
    emb = mean_embedding_features(store)
    assert emb.shape == (12, 8)
    first = store.images.patient_id == "P00"
    np.testing.assert_allclose(emb.loc["P00"].to_numpy(), store._cls[torch.from_numpy(first.to_numpy().copy())].double().mean(0).numpy(), atol=1e-6)
    comp = composition_features(store.images, "cell_type")
    assert comp.loc["P00", "promyelocyte"] == pytest.approx(4 / 6) and comp.loc["P01", "promyelocyte"] == pytest.approx(1 / 6)
    with pytest.raises(ValueError, match="no cell-type column 'stage'"):
        composition_features(store.images, "stage")

    pats = store.images.drop_duplicates("patient_id")
    rng = np.random.default_rng(3)
    bc = pd.DataFrame([(p, d, j, rng.uniform(0, 1), 1, 6) for p, d in zip(pats.patient_id, pats.diagnosis)
                       for j in range(10)], columns=["patient_id", "diagnosis", "latent", "frac", "count", "n_cells"])
    cfg = ClassifyConfig(n_splits=3, n_repeats=2, n_bootstrap=100, ablate=(1,), ablation_repeats=1, n_trees=40)
    res = classify_patients(bc, cfg, store=store, proportion="Promyelocyte", dataset="toy")
    models = res["models"]
    assert set(models) == {"concepts_logreg_l1", "concepts_logreg_l2", "concepts_random_forest",
                           "baseline_mean_embedding_logreg_l2", "baseline_cell_type_composition_logreg_l2",
                           "baseline_promyelocyte_proportion"}
    assert models["baseline_promyelocyte_proportion"]["auroc"] == 1.0  # 4/6 vs 1/6: a perfect single feature
    assert models["baseline_promyelocyte_proportion"]["auroc_raw_feature"] == 1.0
    assert models["concepts_logreg_l2"]["auroc"] < 0.95  # random barcodes carry nothing
    out = write_classify(res, tmp_path / "classify")
    saved = json.loads((out / "results.json").read_text())
    for v in saved["models"].values():  # what the explorer's table reads
        assert {"macro_f1", "auroc", "auroc_ci", "per_class_f1", "folds", "repeats"} <= set(v)
    assert saved["task"] == "diagnosis" and saved["dataset"] == "toy" and saved["protocol"]["folds"] == 3
    assert (out / "figures" / "roc.png").stat().st_size > 5000
    preds = pd.read_parquet(out / "predictions.parquet")
    assert len(preds) == 6 * 12 and set(preds.patient_id) == set(pats.patient_id)
    with pytest.raises(ValueError, match="not in column"):
        classify_patients(bc, cfg, store=store, proportion="myeloblast")


def test_three_classes_use_one_vs_rest_auroc():
    rng = np.random.default_rng(0)
    rows = []
    for p in range(24):
        dx = ["APL", "AML-NPM1", "AML-other"][p % 3]
        for j in range(12):
            frac = rng.uniform(0, 0.3) + (0.6 if j == p % 3 else 0.0)
            rows.append((f"P{p}", dx, j, frac, 0, 10))
    x, y = barcode_features(pd.DataFrame(rows, columns=["patient_id", "diagnosis", "latent", "frac", "count", "n_cells"]))
    s = cross_validate(x, y, "logreg_l2", FAST)["scores"]
    assert s["positive"] is None and s["auroc"] > 0.9 and len(s["per_class_f1"]) == 3
    assert set(s["per_class_auroc"]) == {"APL", "AML-NPM1", "AML-other"} and min(s["per_class_auroc"].values()) > 0.8
    assert 0.7 < s["weighted_f1"] <= 1 and "threshold_mean" not in s
    m = np.array(s["confusion"]["matrix"])
    assert m.sum() == 24 and np.trace(m) >= 18 and s["confusion"]["classes"] == ["AML-NPM1", "AML-other", "APL"]


@pytest.mark.parametrize("n_classes", [2, 3])
def test_bootstrap_scores_equal_scikit_learns(n_classes):
    from cytosae.analysis.classify import _fast_scores, _scores

    rng = np.random.default_rng(n_classes)
    classes = ["A", "B", "C"][:n_classes]
    for _ in range(20):
        y = rng.choice(classes, 25)
        proba = rng.dirichlet(np.ones(n_classes), 25)
        proba[:5] = proba[5:10]  # ties in the scores
        y[:n_classes] = classes  # every class present
        positive = "B" if n_classes == 2 else None
        ref = _scores(y, proba, classes, positive)
        f1, auc = _fast_scores(np.searchsorted(classes, y), proba, classes.index(positive) if positive else None)
        assert f1 == pytest.approx(ref["macro_f1"], abs=1e-12) and auc == pytest.approx(ref["auroc"], abs=1e-12)


@pytest.mark.realdata
def test_deepapl_cell_type_composition_predicts_apl_in_patient_level_cv(shared_data):
    """Real patients (DeepAPL Discovery, 82): the technologists' cell-type counts carry the diagnosis."""
    from cytosae.data import load_manifest

    manifest = load_manifest(shared_data / "deepapl" / "manifest.csv")
    comp = composition_features(manifest, "cell_type")
    y = manifest.drop_duplicates("patient_id").set_index("patient_id").diagnosis.reindex(comp.index).astype(str)
    assert comp.shape[0] == 82 and (y == "APL").sum() == 22 and np.allclose(comp.sum(axis=1), 1.0)
    s = cross_validate(comp, y, "logreg_l2", ClassifyConfig(n_repeats=3, n_bootstrap=200))["scores"]
    assert s["positive"] == "APL" and s["auroc"] > 0.75 and s["auroc_ci"][0] > 0.6


def test_cli_classify_with_an_external_cohort(tmp_path):
    from typer.testing import CliRunner

    from cytosae.cli import app

    (tmp_path / "a").mkdir()
    _barcodes(seed=0).to_parquet(tmp_path / "a" / "barcodes.parquet")
    _barcodes(seed=1, prefix="Q").to_parquet(tmp_path / "b.parquet")
    r = CliRunner().invoke(app, ["classify", str(tmp_path / "a"), "--out", str(tmp_path / "cls"), "--repeats", "2",
                                 "--external", str(tmp_path / "b.parquet")])
    assert r.exit_code == 0, r.output
    assert "2 x 5-fold CV over patients" in r.output and "external cohort, concepts_logreg_l2" in r.output
    res = json.loads((tmp_path / "cls" / "results.json").read_text())
    assert res["external"]["concepts_logreg_l2"]["n_test"] == 30 and res["external"]["concepts_logreg_l2"]["auroc"] > 0.9
    assert res["importance"]["logreg_l1"][0]["feature"] == 3
    r = CliRunner().invoke(app, ["classify", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "nowhere not found: give the folder written by `cytosae patients`" in r.output
    r = CliRunner().invoke(app, ["classify", str(tmp_path / "a"), "--out", str(tmp_path / "x"), "--target", "sex"])
    assert r.exit_code == 2 and "no column 'sex'" in r.output


def test_cli_analysis_commands_name_a_missing_store(tmp_path):
    from typer.testing import CliRunner

    from cytosae.cli import app

    (tmp_path / "images").mkdir()
    for args in (["stats", str(tmp_path / "sae"), str(tmp_path / "images"), "--out", str(tmp_path / "o")],
                 ["classify", str(tmp_path), "--store", str(tmp_path / "images"), "--out", str(tmp_path / "o")]):
        if args[0] == "classify":
            _barcodes().to_parquet(tmp_path / "barcodes.parquet")
        r = CliRunner().invoke(app, args)
        assert r.exit_code == 2 and "error:" in r.output and "Traceback" not in r.output, r.output
    r = CliRunner().invoke(app, ["classify", str(tmp_path), "--store", str(tmp_path / "images"), "--out", str(tmp_path / "o")])
    assert "images is not an activation store" in r.output.replace("\n", " ") and "cytosae extract" in r.output


def test_calibration_sets_the_threshold_on_training_predictions_only():
    from cytosae.analysis.classify import Calibration

    rng = np.random.default_rng(0)
    y = np.array(["APL"] * 20 + ["AML"] * 40)
    # a model whose probabilities rank well but sit on the wrong side of 0.5 (e.g. trained on another prevalence)
    p_apl = np.clip(0.15 + 0.2 * (y == "APL") + rng.normal(0, 0.05, len(y)), 0.01, 0.99)
    proba = np.stack([1 - p_apl, p_apl], 1)
    cal = Calibration(["AML", "APL"], "APL").fit(y, proba)
    decided = cal.decide(cal.apply(proba))
    assert (np.array(["AML", "APL"])[proba.argmax(1)] == "AML").all()  # argmax never says APL
    assert (decided == y).mean() > 0.9 and 0 < cal.threshold < 1
    calibrated = cal.apply(proba)[:, 1]
    assert abs(calibrated.mean() - (y == "APL").mean()) < 0.05  # calibrated: mean probability = prevalence
    ident = Calibration(["AML", "APL"], "APL").fit(y[:5], proba[:5])  # too few held-out patients: identity
    assert ident.threshold == 0.5 and np.array_equal(ident.apply(proba), proba)


def test_every_model_is_validated_externally_with_its_drop_from_cv(tmp_path):
    store, ext_store = _FakeStore(seed=0), _FakeStore(n_patients=9, seed=1)

    def barcodes(s, seed):
        pats = s.images.drop_duplicates("patient_id")
        rng = np.random.default_rng(seed)
        return pd.DataFrame([(p, d, j, rng.uniform(0, 1) + (1.5 if d == "APL" and j == 2 else 0), 1, 6)
                             for p, d in zip(pats.patient_id, pats.diagnosis) for j in range(6)],
                            columns=["patient_id", "diagnosis", "latent", "frac", "count", "n_cells"])
    ext_store.images["cell_type"] = ext_store.images.cell_type.replace("blast", "myeloblast")  # a type unseen here
    cfg = ClassifyConfig(n_splits=3, n_repeats=2, n_bootstrap=50, ablate=(), n_trees=20)
    res = classify_patients(barcodes(store, 0), cfg, store=store, external=barcodes(ext_store, 1),
                            external_store=ext_store, proportion="promyelocyte")
    ext = res["external"]
    assert set(ext) == set(res["models"])  # baselines included
    for name, e in ext.items():
        assert e["n_test"] == 9 and e["auroc_drop_from_cv"] == pytest.approx(res["models"][name]["auroc"] - e["auroc"])
        assert sum(map(sum, e["confusion"]["matrix"])) == 9
    assert ext["baseline_promyelocyte_proportion"]["auroc"] == 1.0
    out = write_classify(res, tmp_path / "c")
    expl = pd.read_parquet(out / "explanations.parquet")
    assert set(expl.patient_id) == set(store.images.patient_id) and (expl.groupby("patient_id").size() <= 10).all()
    top = expl[(expl["rank"] == 0) & (expl.predicted == "APL")]
    assert (top.latent == 2).mean() > 0.5  # the planted concept pushed most APL predictions
    assert (out / "figures" / "confusion.png").stat().st_size > 3000


def test_confidence_interval_belongs_to_the_reported_statistic():
    """Each repeat is noisy, their average nearly perfect: the reported AUROC is the mean over repeats, and its
    interval must be of that statistic, not of the AUROC of averaged probabilities (an ensemble, found on DeepAPL
    where a point of 0.797 came with [0.774, 0.963])."""
    from cytosae.analysis.classify import _bootstrap_ci, _scores

    rng = np.random.default_rng(0)
    y = np.array(["A"] * 40 + ["B"] * 40)
    signal = (y == "B").astype(float)
    p_b = np.clip(0.5 + 0.1 * (signal - 0.5)[None] + rng.normal(0, 0.25, (20, len(y))), 0.01, 0.99)
    proba = np.stack([1 - p_b, p_b], axis=2)  # (repeats, patients, classes)
    point = np.mean([_scores(y, proba[r], ["A", "B"], "B")["auroc"] for r in range(20)])
    ensemble = _scores(y, proba.mean(0), ["A", "B"], "B")["auroc"]
    ci = _bootstrap_ci(y, proba, ["A", "B"], "B", 300, 0)["auroc_ci"]
    assert ensemble - point > 0.15  # the two statistics really differ here
    assert ci[0] <= point <= ci[1] and ci[1] < ensemble


@pytest.mark.parametrize("n_classes, with_pred", [(2, False), (3, False), (3, True)])
def test_bootstrap_ci_equals_scoring_each_resampled_array(n_classes, with_pred):
    """The CI's draws are scored all at once from how often each patient was drawn; they equal `_fast_scores` of
    each resampled array (itself tested equal to scikit-learn), ties and resamples missing a class included."""
    from cytosae.analysis.classify import _bootstrap_ci, _fast_scores

    rng = np.random.default_rng(n_classes)
    classes = [f"c{i}" for i in range(n_classes)]
    y = np.array(classes)[rng.integers(0, n_classes, 14)]
    proba = rng.dirichlet(np.ones(n_classes), (3, len(y))).round(1)  # rounded: tied scores
    pred = np.array(classes)[rng.integers(0, n_classes, (3, len(y)))] if with_pred else None
    positive = "c1" if n_classes == 2 else None
    got = _bootstrap_ci(y, proba, classes, positive, 200, 7, pred)
    draws = []
    codes = np.searchsorted(classes, y)
    for idx in np.random.default_rng(7).integers(0, len(y), (200, len(y))):
        draws.append(np.mean([_fast_scores(codes[idx], proba[r][idx], None if positive is None else 1,
                                           None if pred is None else np.searchsorted(classes, pred[r])[idx])
                              for r in range(3)], axis=0))
    draws = np.array(draws)
    for key, column in (("macro_f1_ci", 0), ("auroc_ci", 1)):
        finite = draws[np.isfinite(draws[:, column]), column]
        np.testing.assert_allclose(got[key], np.percentile(finite, [2.5, 97.5]), rtol=0, atol=1e-12)
