"""Label alignment: exact AP/AUROC equal sklearn's, a planted class-indicator latent scores 1.0, the table holds the
SAE and its three baselines, and `cytosae align` writes and records it."""
import json

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score
from typer.testing import CliRunner

from cytosae.analysis.alignment import class_alignment, compute_alignment, latent_class_metrics, write_alignment
from cytosae.cli import app
from cytosae.run import Run
from cytosae.sae import SAE
from cytosae.sae.config import SAEConfig
from cytosae.store import ActivationStore, import_embeddings
from cytosae.analysis.encoded import EncodedStore

CLASSES = ["a", "b", "c"]
D, N_LATENTS, N_PATCHES = 8, 6, 4


@pytest.mark.parametrize("ties", [False, True])
def test_ap_and_auroc_equal_sklearn_for_every_latent_and_class(ties):
    rng = np.random.default_rng(0)
    n = 97
    labels = rng.choice(CLASSES, size=n)
    scores = rng.normal(size=(n, 7))
    scores[:, 3] = 0.0  # a dead latent: every image tied
    scores[:, 4] = (labels == "b") + rng.normal(scale=0.5, size=n)
    if ties:
        scores = np.round(scores, 1)
        scores[rng.random((n, 7)) < 0.5] = 0.0  # sparse, as SAE latents are
    positive = np.stack([labels == c for c in CLASSES])
    ap, auc = latent_class_metrics(scores, positive, chunk=3)  # chunks smaller than the width: the seams too
    for c in range(len(CLASSES)):
        for j in range(scores.shape[1]):
            assert ap[c, j] == pytest.approx(average_precision_score(positive[c], scores[:, j]), abs=1e-12)
            assert auc[c, j] == pytest.approx(roc_auc_score(positive[c], scores[:, j]), abs=1e-12)
    assert auc[0, 3] == 0.5


def test_purity_and_coverage_by_definition():
    labels = np.array(["a"] * 20 + ["b"] * 20, dtype=object)
    s = np.zeros((40, 1))
    s[:20, 0] = np.linspace(1.0, 10.0, 20)  # a-images from 1 to 10: exactly those above 0.3 x 10 = 3 are covered
    s[20:24, 0] = 9.5  # four b-images among the top 16
    got = class_alignment(s, labels, ["a", "b"], "m").set_index("class")
    assert got.loc["a", "purity@16"] == pytest.approx(12 / 16)
    assert got.loc["a", "coverage@0.3"] == pytest.approx(float((s[:20, 0] > 3.0).mean()))
    assert got.loc["a", "ap"] == pytest.approx(average_precision_score(labels == "a", s[:, 0]))


def _planted_store(tmp_path, n_per_class=20, seed=0) -> tuple[ActivationStore, pd.DataFrame]:
    """Tokens (CLS + 4 patches, D=8) whose dimension i is 1 on every patch of a class-i cell (i < 3), plus noise in
    the other dimensions; written by import_embeddings, the project's writer of stores."""
    rng = np.random.default_rng(seed)
    labels = [c for c in CLASSES for _ in range(n_per_class)]
    rng.shuffle(labels)
    tokens = rng.normal(scale=0.3, size=(len(labels), 1 + N_PATCHES, D)).astype(np.float32)
    tokens[:, :, :3] = 0.0
    for i, lab in enumerate(labels):
        tokens[i, :, CLASSES.index(lab)] = 1.0
    manifest = pd.DataFrame({"image_id": [f"cell_{i:03d}.png" for i in range(len(labels))], "label": labels})
    np.save(tmp_path / "tokens.npy", tokens)
    path = import_embeddings(tmp_path / "tokens.npy", manifest, tmp_path / "run" / "stores" / "cells",
                             dtype="float32", shard_size=16)
    return ActivationStore(path), manifest


def _planted_sae(out):
    """relu-l1 with an identity encoder on the first D latents: latent i is dimension i, so latent 0 is class a."""
    sae = SAE(SAEConfig(arch="relu-l1", d_in=D, n_latents=N_LATENTS), seed=0)
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.W_enc[:, :D].copy_(torch.eye(D)[:, :N_LATENTS] if N_LATENTS < D else torch.eye(D))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    sae.save(out, training={"finished": True, "step": 1, "total_steps": 1, "tokens_seen": 1, "total_tokens": 1})
    return SAE.load(out)


def test_a_latent_equal_to_a_class_indicator_scores_one_and_every_method_is_in_the_table(tmp_path):
    store, _ = _planted_store(tmp_path)
    sae = _planted_sae(tmp_path / "run" / "sae")
    res = compute_alignment(EncodedStore(store, sae, "cpu"), token_policy="any_patch", seed=0, max_clusters=8)
    sae_rows = res.per_class[res.per_class.method == "sae"].set_index("class")
    for i, c in enumerate(CLASSES):
        assert sae_rows.loc[c, "best_latent"] == i
        assert sae_rows.loc[c, "ap"] == 1.0 and sae_rows.loc[c, "auroc"] == 1.0
        assert sae_rows.loc[c, "purity@16"] == 1.0 and sae_rows.loc[c, "coverage@0.3"] == 1.0
    assert res.table.method.tolist() == ["sae", "pca", "kmeans", "untrained_sae"]
    table = res.table.set_index("method")
    assert table.loc["sae", "mean_best_ap"] == 1.0 and table.loc["sae", "n_classes"] == 3
    # the budgets: PCA min(n_latents, D) components in both signs, k-means capped at max_clusters
    assert table.loc["pca", "n_scores"] == 2 * min(N_LATENTS, D) and table.loc["kmeans", "n_scores"] == min(N_LATENTS, 8)
    assert table.loc["untrained_sae", "n_scores"] == N_LATENTS
    assert ((table[["mean_best_ap", "mean_purity@16", "mean_coverage@0.3"]] >= 0)
            & (table[["mean_best_ap", "mean_purity@16", "mean_coverage@0.3"]] <= 1)).all().all()
    # the untrained SAE is the same config at its seeded initial weights, not the trained ones
    assert table.loc["untrained_sae", "mean_best_ap"] < 1.0
    assert res.summary["n_images"] == 60 and res.summary["token_policy"] == "any_patch"
    assert res.summary["n_labelled"] == 60 and res.summary["classes"] == CLASSES
    paths = write_alignment(res, tmp_path / "q")
    back = pd.read_parquet(paths[0])
    assert back.method.tolist() == list(table.index)


def test_missing_label_column_is_one_line(tmp_path):
    store, _ = _planted_store(tmp_path)
    sae = _planted_sae(tmp_path / "run" / "sae")
    with pytest.raises(ValueError, match="has no 'cell_type' column"):
        compute_alignment(EncodedStore(store, sae, "cpu"), label_column="cell_type")


def test_cli_align_writes_the_tables_under_run_quality_and_records_the_step(tmp_path):
    _planted_store(tmp_path)
    _planted_sae(tmp_path / "run" / "sae")
    run = tmp_path / "run"
    res = CliRunner().invoke(app, ["align", "--run", str(run), "--device", "cpu", "--token-policy", "cls",
                                   "--max-clusters", "4"])
    assert res.exit_code == 0, res.output
    assert "label alignment on cells: 60 images, 3 classes" in res.output and "untrained_sae" in res.output
    table = pd.read_parquet(run / "quality" / "alignment.parquet")
    assert table.method.tolist() == ["sae", "pca", "kmeans", "untrained_sae"]
    assert table.set_index("method").loc["sae", "mean_best_ap"] == 1.0  # the CLS token carries the class too
    summary = json.loads((run / "quality" / "alignment.json").read_text())
    assert summary["dataset"] == "cells" and summary["token_policy"] == "cls" and summary["n_images"] == 60
    assert {r["method"] for r in summary["per_class"]} == {"sae", "pca", "kmeans", "untrained_sae"}
    assert "Coverage@0.3" in summary["definitions"]
    assert (run / "quality" / "alignment_classes.parquet").is_file()
    assert Run.open(run).steps["align"]["settings"]["token_policy"] == "cls"

    bad = CliRunner().invoke(app, ["align", "--run", str(run), "--token-policy", "max"])
    assert bad.exit_code == 2 and "--token-policy must be one of" in bad.output


def test_too_many_scores_for_memory_is_refused_in_one_line_naming_the_flag(tmp_path):
    _planted_store(tmp_path)
    _planted_sae(tmp_path / "run" / "sae")
    res = CliRunner().invoke(app, ["align", "--run", str(tmp_path / "run"), "--device", "cpu", "--max-cells", "100"])
    assert res.exit_code == 2 and "exceed max_cells=100" in res.output and "--max-cells" in res.output
    assert not (tmp_path / "run" / "quality" / "alignment.parquet").exists()


def test_a_label_column_without_labels_is_refused_before_the_pass(tmp_path):
    store, manifest = _planted_store(tmp_path)
    sae = _planted_sae(tmp_path / "run" / "sae")

    def no_pass(*a, **k):
        raise AssertionError("the store was read before the labels were checked")
    store.iter_images = no_pass
    store.images["empty"] = None
    with pytest.raises(ValueError, match="column 'empty' holds no labels"):
        compute_alignment(EncodedStore(store, sae, "cpu"), label_column="empty")


def test_unlabelled_cells_are_left_out_not_counted_as_negatives(tmp_path):
    store, _ = _planted_store(tmp_path)
    sae = _planted_sae(tmp_path / "run" / "sae")
    store.images.loc[store.images.label == "a", "label"] = None  # class a's cells lose their label
    res = compute_alignment(EncodedStore(store, sae, "cpu"), token_policy="cls", max_clusters=4)
    assert res.summary["n_labelled"] == 40 and res.summary["classes"] == ["b", "c"]
    rows = res.per_class[res.per_class.method == "sae"].set_index("class")
    assert rows.n_images.tolist() == [20, 20] and (rows.ap == 1.0).all()
    assert (rows.prevalence == 0.5).all()  # 20 of the 40 labelled cells, not of all 60


def test_cli_align_on_explicit_paths_without_a_run(tmp_path):
    store, _ = _planted_store(tmp_path)
    _planted_sae(tmp_path / "sae")
    res = CliRunner().invoke(app, ["align", str(tmp_path / "sae"), str(store.path), "--out", str(tmp_path / "q"),
                                   "--device", "cpu", "--max-clusters", "4", "--seed", "3"])
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "q" / "alignment.json").read_text())
    assert summary["seed"] == 3 and summary["dataset"] == "cells"
    missing = CliRunner().invoke(app, ["align", str(tmp_path / "sae")])
    assert missing.exit_code == 2 and "STORE is missing" in missing.output


# ---------------------------------------------------------------- sparse probing (SAEBench), issue #18 item 2


def test_top_by_mean_difference_picks_the_columns_most_higher_in_the_class():
    from cytosae.analysis.probing import top_by_mean_difference

    positive = np.array([True, True, False, False])
    s = np.array([[1.0, 5.0, 0.0, 2.0], [1.0, 5.0, 0.0, 2.0], [0.0, 0.0, 3.0, 2.0], [0.0, 0.0, 3.0, 2.0]])
    # mean differences 1, 5, -3, 0: the class-high columns first, a class-low one last
    assert top_by_mean_difference(s, positive, 2).tolist() == [1, 0]
    assert top_by_mean_difference(s, positive, 10).tolist() == [1, 0, 3, 2]


def test_sparse_probing_on_planted_latents_is_perfect_and_equals_a_direct_computation(tmp_path):
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from cytosae.analysis.probing import sparse_probing, top_by_mean_difference
    from cytosae.analysis.spliced import cell_folds

    store, _ = _planted_store(tmp_path)
    sae = _planted_sae(tmp_path / "run" / "sae")
    res = compute_alignment(EncodedStore(store, sae, "cpu"), token_policy="any_patch", seed=0, max_clusters=8)
    table = pd.DataFrame(res.summary["probing"]["table"]).set_index(["method", "m"])
    assert set(table.index.get_level_values("method")) == {"sae", "pca", "kmeans", "untrained_sae", "raw"}
    assert sorted(table.loc["sae"].index) == [1, 2, 5, N_LATENTS]  # m capped at the SAE's width
    assert sorted(table.loc["raw"].index) == [1, 2, 5, D]  # and the raw embedding's every dimension
    assert table.loc[("sae", 1), "balanced_accuracy"] == 1.0 and table.loc[("sae", 1), "auroc"] == 1.0
    assert table.loc[("raw", D), "balanced_accuracy"] == 1.0
    assert (table.n_classes == 3).all()
    assert "stratified" in res.summary["probing"]["folds"] and "balanced accuracy" in res.summary["probing"]["definitions"]
    assert set(res.probing.columns) == {"method", "m", "class", "balanced_accuracy", "auroc", "n_folds"}

    # the same figure by hand for one method, m and class: selection on the training rows only, then the probe
    rng = np.random.default_rng(1)
    labels = np.array(rng.choice(CLASSES, size=90), dtype=object)
    scores = rng.normal(size=(90, 12))
    scores[:, 7] += 0.8 * (labels == "b")
    got, _ = sparse_probing({"m": scores}, labels, CLASSES, ms=(2,))
    folds, _ = cell_folds(labels, None)
    want = []
    for train, test in folds:
        cols = top_by_mean_difference(scores[train], labels[train] == "b", 2)
        model = make_pipeline(StandardScaler(), LogisticRegression(class_weight="balanced", max_iter=2000))
        model.fit(scores[train][:, cols], labels[train] == "b")
        want.append(balanced_accuracy_score(labels[test] == "b", model.predict_proba(scores[test][:, cols])[:, 1] >= 0.5))
    row = got.set_index(["method", "m", "class"]).loc[("m", 2, "b")]
    assert row.balanced_accuracy == pytest.approx(np.mean(want), abs=1e-12) and row.n_folds == len(folds)


def test_sparse_probing_folds_are_grouped_by_patient_when_the_store_has_patients(tmp_path):
    store, _ = _planted_store(tmp_path)
    sae = _planted_sae(tmp_path / "run" / "sae")
    store.images["patient_id"] = [f"p{i % 6}" for i in range(len(store.images))]
    res = compute_alignment(EncodedStore(store, sae, "cpu"), token_policy="cls", max_clusters=4)
    assert "grouped by patient_id" in res.summary["probing"]["folds"]
    paths = write_alignment(res, tmp_path / "q")
    assert pd.read_parquet(tmp_path / "q" / "probing.parquet").equals(res.probing.reset_index(drop=True))
    assert paths[-1].name == "probing.parquet"


# ---------------------------------------------------------------- per latent x class AP (issue #18 item 5)


def test_latent_classes_hold_every_sae_latent_and_class_equal_to_sklearn(tmp_path):
    store, _ = _planted_store(tmp_path)
    sae = _planted_sae(tmp_path / "run" / "sae")
    res = compute_alignment(EncodedStore(store, sae, "cpu"), token_policy="any_patch", seed=0, max_clusters=8)
    lc = res.latent_classes
    assert list(lc.columns) == ["latent", "class", "ap", "auroc", "prevalence", "best"]
    assert len(lc) == N_LATENTS * len(CLASSES) and lc.latent.is_monotonic_increasing
    # the same figures straight from sklearn on the SAE's any_patch scores (max over patch tokens)
    ids, labels = store.images.image_id.tolist(), store.images.label.to_numpy()
    tokens = torch.stack([torch.as_tensor(store.get_image(i)) for i in ids])
    with torch.no_grad():
        z = sae.encode(tokens.reshape(-1, D)).reshape(len(ids), 1 + N_PATCHES, N_LATENTS)[:, 1:].amax(1).numpy()
    for r in lc.itertuples():
        y = labels == r[2]
        assert r.ap == pytest.approx(average_precision_score(y, z[:, r.latent]), abs=1e-12)
        assert r.auroc == pytest.approx(roc_auc_score(y, z[:, r.latent]), abs=1e-12)
        assert r.prevalence == pytest.approx(y.mean())
    best = lc[lc.best].set_index("latent")
    assert best.index.tolist() == list(range(N_LATENTS))  # exactly one best class per latent
    for j in range(N_LATENTS):
        assert best.loc[j, "ap"] == lc[lc.latent == j].ap.max()
    assert best.loc[:2, "class"].tolist() == CLASSES and (best.loc[:2, "ap"] == 1.0).all()  # the planted latents
    # the per-class table's best latents are these same numbers
    sae_rows = res.per_class[res.per_class.method == "sae"]
    for r in sae_rows.itertuples():
        row = lc[(lc.latent == r.best_latent) & (lc["class"] == r[2])]
        assert row.ap.item() == r.ap and row.auroc.item() == r.auroc
    paths = write_alignment(res, tmp_path / "q")
    assert pd.read_parquet(tmp_path / "q" / "latent_classes.parquet").equals(lc)
    assert paths[-1].name == "probing.parquet" and tmp_path / "q" / "latent_classes.parquet" in paths
