"""Attention MIL over a patient's cells: finds the few diagnostic cells, runs in the classify folds, external cohorts."""
import numpy as np
import pandas as pd
import pytest
import torch

from cytosae.analysis.classify import ClassifyConfig, cross_validate_mil, external_validation_mil
from cytosae.analysis.mil import MILConfig, cell_features, concept_weights, fit_mil
from cytosae.store import ActivationStore, import_embeddings

FAST = ClassifyConfig(n_splits=3, n_repeats=1, n_bootstrap=100, inner_folds=0)
MIL = MILConfig(seed=0)


def _cohort(tmp_path, name, n_patients=24, cells=40, d=16, marker_frac=0.1, seed=0, tokens=1):
    """An imported store: APL patients have `marker_frac` of their cells shifted along one direction (the
    diagnostic cells); every other cell, of every patient, is noise. Returns the store and the planted cell ids."""
    rng = np.random.default_rng(seed)
    rows, x, planted = [], [], set()
    marker = np.zeros(d)
    marker[0] = 6.0
    for p in range(n_patients):
        dx = "APL" if p % 2 == 0 else "AML"
        for c in range(cells):
            v = rng.normal(size=(tokens, d))
            image_id = f"{name}{p:02d}/{c:02d}"
            if dx == "APL" and c < int(marker_frac * cells):
                v += marker
                planted.add(image_id)
            rows.append({"image_id": image_id, "patient_id": f"{name}{p:02d}", "diagnosis": dx})
            x.append(v if tokens > 1 else v[0])
    np.save(tmp_path / f"{name}.npy", np.array(x, dtype=np.float32))
    out = import_embeddings(tmp_path / f"{name}.npy", pd.DataFrame(rows), tmp_path / name)
    return ActivationStore(out), planted


def _y(store):
    return store.images.drop_duplicates("patient_id").set_index("patient_id").diagnosis.sort_index().astype(str)


def test_attention_ranks_the_planted_diagnostic_cells_first(tmp_path):
    store, planted = _cohort(tmp_path, "A", n_patients=48, cells=20)
    bags = cell_features(store, "embedding")
    assert bags.x.shape == (48 * 20, 16) and len(bags.patients) == 48
    y = _y(store)
    fitted = fit_mil(bags.subset(list(y.index)), y.to_numpy(), ["AML", "APL"], "embedding", MIL)
    assert 0 < len(fitted.val_patients) < 48 and fitted.val_proba.shape == (len(fitted.val_patients), 2)
    cv = cross_validate_mil(bags, y, "embedding", FAST, MIL)
    s = cv["scores"]
    assert s["model"] == "mil_embedding" and s["auroc"] > 0.95 and s["macro_f1"] > 0.85
    att = cv["attention"]
    assert len(att) == 48 * 20 and set(att.patient_id) == set(y.index)  # every cell, out of fold, once
    apl = att[att.patient_id.map(y) == "APL"].copy()
    apl["apl_rank"] = apl.groupby("patient_id").attention_APL.rank(ascending=False, method="first") - 1
    top = apl[apl.apl_rank < 0.1 * 20]  # the top 10% of each APL patient's cells by the APL branch's attention
    recall = top.image_id.isin(planted).sum() / len(planted)
    assert recall >= 0.8, recall


def test_concept_mil_weights_name_the_diagnostic_latent(tmp_path):
    store, planted = _cohort(tmp_path, "C", d=8)
    # a hand-made "SAE": latent j = relu(x_j); latent 0 is the marker's concept
    bags = cell_features(store, "concepts", encode=torch.relu, token_policy="cls")
    y = _y(store)
    fitted = fit_mil(bags.subset(list(y.index)), y.to_numpy(), ["AML", "APL"], "concepts", MIL)
    w = concept_weights(fitted, bags, top=3)
    apl = w[w["class"] == "APL"].sort_values("abs_weight", ascending=False)
    assert int(apl.iloc[0].latent) == 0 and apl.iloc[0].weight > 0
    with pytest.raises(ValueError, match="needs the SAE"):
        cell_features(store, "concepts")


def test_external_cohort_and_mismatched_stores(tmp_path):
    a, _ = _cohort(tmp_path, "A", seed=0)
    b, _ = _cohort(tmp_path, "B", n_patients=12, seed=1)
    ext = external_validation_mil(cell_features(a, "embedding"), _y(a), cell_features(b, "embedding"), _y(b),
                                  "embedding", ClassifyConfig(n_bootstrap=100), MIL)
    assert ext["n_train"] == 24 and ext["n_test"] == 12 and ext["auroc"] > 0.9 and ext["auroc_ci"][0] > 0.7
    assert 0 < ext["threshold"] < 1
    c, _ = _cohort(tmp_path, "W", n_patients=6, d=8, seed=2)
    with pytest.raises(ValueError, match="differ in size"):
        external_validation_mil(cell_features(a, "embedding"), _y(a), cell_features(c, "embedding"), _y(c),
                                "embedding", ClassifyConfig(n_bootstrap=10), MIL)


def test_mil_runs_on_the_gpu_like_on_the_cpu(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    store, _ = _cohort(tmp_path, "G", n_patients=8, cells=10)
    bags = cell_features(store, "embedding")
    y = _y(store)
    probs = [fit_mil(bags.subset(list(y.index)), y.to_numpy(), ["AML", "APL"], "embedding",
                     MILConfig(max_epochs=3, device=dev)).predict(bags)[0] for dev in ("cpu", "cuda")]
    np.testing.assert_allclose(probs[0], probs[1], atol=1e-3)


def _colour_histograms(root, manifest):
    """A transparent stand-in for a feature extractor: per image, the z-scored sqrt of its 64-bin RGB histogram.
    (A RANDOM-weight ViT does not see the rods: measured best-latent AUROC 0.74-0.81, MIL recall 0.17-0.24.)"""
    from PIL import Image

    def hist(path):
        a = np.asarray(Image.open(root / path).convert("RGB")) // 64
        return np.sqrt(np.bincount((a[..., 0] * 16 + a[..., 1] * 4 + a[..., 2]).ravel(), minlength=64) / a[..., 0].size)
    x = np.stack([hist(p) for p in manifest.path])
    return ((x - x.mean(0)) / (x.std(0) + 1e-3)).astype(np.float32)


def test_synthetic_diagnostic_cells_are_found_by_mil_attention_and_by_a_concept(tmp_path):
    from cytosae.analysis.classify import _auc
    from cytosae.data.synthetic import DIAGNOSES, make_sample
    from cytosae.sae import train_sae

    # one class mix for both diagnoses: the rods (6% of APL cells) are the only difference between patients
    same = {d: DIAGNOSES["AML"] for d in DIAGNOSES}
    manifest = pd.read_csv(make_sample(tmp_path / "s", n_patients=24, cells_per_patient=40, size=64,
                                       diagnostic={"APL": 0.06}, mixes=same))
    rods = manifest.inclusion == "auer_rods"
    assert rods.sum() > 20 and set(manifest.diagnosis[rods]) == {"APL"}
    plain = pd.read_csv(make_sample(tmp_path / "plain", n_patients=2, cells_per_patient=40, size=64, diagnostic={},
                                    mixes=same))
    assert (plain.inclusion == "none").all()
    from PIL import Image
    for path in plain.path[~rods[:80].to_numpy()][:5]:  # cells without rods are the same pixels with or without them
        assert np.array_equal(np.asarray(Image.open(tmp_path / "s" / path)), np.asarray(Image.open(tmp_path / "plain" / path)))

    np.save(tmp_path / "h.npy", _colour_histograms(tmp_path / "s", manifest))
    store = ActivationStore(import_embeddings(tmp_path / "h.npy", manifest.assign(image_id=manifest.path), tmp_path / "st"))
    planted = set(store.images.image_id[rods])
    y = _y(store)
    cv = cross_validate_mil(cell_features(store, "embedding"), y, "embedding",
                            ClassifyConfig(n_splits=4, n_repeats=1, n_bootstrap=50, inner_folds=0), MIL)
    att = cv["attention"]
    apl = att[att.patient_id.map(y) == "APL"].copy()
    apl["apl_rank"] = apl.groupby("patient_id").attention_APL.rank(ascending=False, method="first") - 1
    recall = apl[apl.apl_rank < 0.1 * 40].image_id.isin(planted).sum() / len(planted)
    assert recall >= 0.8, recall  # out-of-fold attention: the rods are in each APL patient's top 10% of cells

    x = torch.from_numpy(np.load(tmp_path / "h.npy"))
    sae = train_sae((x[torch.randperm(len(x))] for _ in range(30)), 64, "topk", 128, 30 * len(x), seed=0,
                    batch_size=len(x), k=4, progress=False)
    bags = cell_features(store, "concepts", encode=sae.encode)
    is_rod = np.array([i in planted for i in bags.image_ids])
    fires = (bags.x > 0).numpy()
    precision = (fires & is_rod[:, None]).sum(0) / np.maximum(fires.sum(0), 1)
    coverage = (fires & is_rod[:, None]).sum(0) / is_rod.sum()
    best = int(np.argmax(np.where(precision >= 0.8, coverage, 0)))
    assert precision[best] >= 0.8 and coverage[best] >= 0.5, (precision[best], coverage[best])
    assert _auc(is_rod, bags.x[:, best].numpy()) > 0.75


@pytest.fixture(scope="module")
def mil_run(tmp_path_factory):
    """A fixture run whose classify/ holds MIL attention, written by classify_patients + write_classify."""
    from cytosae.analysis.classify import classify_patients, write_classify
    from explorer_fixtures import make_run

    tmp_path = tmp_path_factory.mktemp("mil-run")
    fx = make_run(tmp_path / "fx")
    store, _ = _cohort(tmp_path, "A", n_patients=12, cells=10)
    pats = store.images.drop_duplicates("patient_id")
    bc = pd.DataFrame([(p, d, j, float(d == "APL") * 0.5 + 0.1 * j, 1, 10) for p, d in zip(pats.patient_id, pats.diagnosis)
                       for j in range(3)], columns=["patient_id", "diagnosis", "latent", "frac", "count", "n_cells"])
    cfg = ClassifyConfig(n_splits=3, n_repeats=1, n_bootstrap=20, ablate=(), mil=("embedding",))
    res = classify_patients(bc, cfg, bags={"embedding": cell_features(store, "embedding")}, dataset="A",
                            mil_cfg=MILConfig(max_epochs=5))
    write_classify(res, fx.path / "classify")
    return fx


def test_explorer_lists_a_clicked_patients_cells_by_attention(mil_run):
    from fastapi.testclient import TestClient

    from cytosae.explorer import create_app

    fx = mil_run
    att = pd.read_parquet(fx.path / "classify" / "attention.parquet")
    with TestClient(create_app(fx.path), base_url="http://127.0.0.1") as client:
        r = client.get("/api/patients/A00/cells")
        assert r.status_code == 200, r.text
        d = r.json()
        want = att[att.patient_id == "A00"].sort_values("attention", ascending=False).image_id.tolist()
        assert d["model"] == "mil_embedding" and [c["image_id"] for c in d["cells"]] == want and d["n_cells"] == 10
        assert [c["rank"] for c in d["cells"]] == list(range(10)) and d["dataset"] == "A"
        assert client.get("/api/patients/nobody/cells").status_code == 404
        assert client.get("/api/patients/A00/cells", params={"model": "mil_x"}).status_code == 404


@pytest.mark.parametrize("change, message", [
    (lambda df: df.drop(columns=["rank"]), "columns: lacks ['rank']"),
    (lambda df: df.assign(rank=df["rank"].astype(float)), "rank: must hold integers, it holds float64"),
    (lambda df: df.assign(attention=df.attention.round(3).astype(str)), "attention: must hold numbers, it holds str"),
])
def test_an_edited_attention_table_is_named_with_its_column(mil_run, tmp_path, change, message):
    """classify/attention.parquet is read through its writer's reader (columns and kinds): the patient-cells page
    answers 503 naming the file and the column, not a traceback or cells in a wrong order."""
    from fastapi.testclient import TestClient

    from cytosae.analysis.classify_results import ATTENTION, read_classify_table
    from cytosae.explorer import create_app
    from explorer_fixtures import copy_of

    run = copy_of(mil_run, tmp_path).path
    path = run / "classify" / ATTENTION
    assert read_classify_table(run / "classify", ATTENTION).equals(pd.read_parquet(path))
    change(pd.read_parquet(path)).to_parquet(path, index=False)
    with TestClient(create_app(run), base_url="http://127.0.0.1") as client:
        r = client.get("/api/patients/A00/cells")
    detail = r.json()["detail"]
    assert r.status_code == 503 and detail.startswith(f"classify/{ATTENTION}: {message}"), detail
    assert "cytosae classify --run RUN" in detail and str(tmp_path) not in r.text
