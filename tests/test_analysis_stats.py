"""Latent statistics: exact values on hand-made activations, streaming equals brute force."""
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from cytosae.analysis import compute_latent_stats, entropy, factor_purity, write_stats
from cytosae.analysis.encoded import EncodedStore


def _identity_batches(acts: torch.Tensor, ids, batch):
    """Tokens are the activations themselves (encode = ReLU identity), so every statistic is hand-checkable."""
    for s in range(0, len(ids), batch):
        yield ids[s:s + batch], acts[s:s + batch]


def _data(seed=0, n=23, grid=3, n_latents=5):
    g = torch.Generator().manual_seed(seed)
    acts = torch.relu(torch.randn(n, 1 + grid * grid, n_latents, generator=g) - 0.5)
    acts[:, :, 4] = 0  # latent 4 never fires
    ids = [f"img{i:02d}" for i in range(n)]
    labels = ["a", "b", "a|b"] * (n // 3) + ["a"] * (n % 3)
    return acts, ids, pd.DataFrame({"image_id": ids, "label": labels})


@pytest.mark.parametrize("batch", [1, 4, 23])
def test_stats_match_brute_force_for_any_batch_size(batch):
    acts, ids, manifest = _data()
    s = compute_latent_stats(EncodedStore.of_function(torch.relu, 5, _identity_batches(acts, ids, batch)), manifest, k=4, dataset="d")
    img = acts[:, 1:].mean(1)
    fires = (acts > 0).any(1)
    lat = s.latents.set_index("latent")
    np.testing.assert_allclose(lat.freq_image, fires.float().mean(0).numpy(), rtol=1e-6)
    np.testing.assert_allclose(lat.freq_token, (acts > 0).float().mean((0, 1)).numpy(), rtol=1e-6)
    expected_mean = [(img[:, j][fires[:, j]].mean().item() if fires[:, j].any() else 0.0) for j in range(5)]
    np.testing.assert_allclose(lat.mean_act, expected_mean, rtol=1e-5)
    assert lat.loc[4, "mean_act"] == 0.0 and lat.loc[4, "freq_image"] == 0.0 and math.isnan(lat.loc[4, "label_entropy"])
    for j in range(4):
        top = s.top_images[(s.top_images.latent == j) & (s.top_images.by == "image")].sort_values("rank")
        want = torch.argsort(img[:, j], descending=True)[:4]
        assert top.image_id.tolist() == [ids[i] for i in want]
        labs = [c for l in top.label for c in l.split("|")]
        assert lat.loc[j, "label_entropy"] == pytest.approx(entropy(labs))
        ptop = s.top_images[(s.top_images.latent == j) & (s.top_images.by == "patch")].sort_values("rank").iloc[0]
        flat = acts[:, 1:, j]
        best = int(flat.flatten().argmax())
        assert (ptop.image_id, ptop.patch) == (ids[best // 9], best % 9)
    prof = s.class_profile.set_index(["latent", "class"])
    is_a = torch.tensor(["a" in l.split("|") for l in manifest.label])
    assert prof.loc[(0, "a"), "mean_act"] == pytest.approx(img[is_a, 0].mean().item(), rel=1e-5)


def test_patch_index_is_row_major_and_skips_cls():
    acts = torch.zeros(2, 1 + 16 * 16, 2)
    acts[1, 0, 0] = 100.0  # CLS must not count as a patch
    acts[1, 1 + 3 * 16 + 5, 0] = 2.0  # row 3, col 5
    acts[0, 1, 1] = 1.0
    s = compute_latent_stats(EncodedStore.of_function(torch.relu, 2, [(["x", "y"], acts)]), pd.DataFrame({"image_id": ["x", "y"], "label": ["p", "q"]}), k=2)
    row = s.top_images[(s.top_images.latent == 0) & (s.top_images.by == "patch")].iloc[0]
    assert (row.image_id, row.patch) == ("y", 3 * 16 + 5)
    assert len(s.top_images[(s.top_images.latent == 1) & (s.top_images.by == "image")]) == 1  # non-firing images are not "top"


def test_entropy_and_noisy_flag_and_writing(tmp_path):
    assert entropy(["a", "a"]) == 0.0 and entropy(["a", "b"]) == pytest.approx(math.log(2))
    acts, ids, manifest = _data()
    acts[:, 1:, 0] += 1.0  # latent 0 always strongly on: noisy by CytoSAE's rule
    s = compute_latent_stats(EncodedStore.of_function(torch.relu, 5, _identity_batches(acts, ids, 5)), manifest, noisy_threshold=0.5, dataset="d")
    assert s.latents.noisy.tolist()[0] and not s.latents.noisy.tolist()[4]
    out = write_stats([s], tmp_path / "stats")
    for name in ["latents", "top_images", "class_profile", "histograms"]:
        assert len(pd.read_parquet(out / f"{name}.parquet")) > 0
    ds = s.summary["dataset"]
    for fig in (f"frequency_vs_activation_{ds}.png", f"class_profile_{ds}.png"):
        assert (out / "figures" / fig).stat().st_size > 3000
    assert json.loads((out / "summary.json").read_text())["figures"] == sorted(p.name for p in (out / "figures").iterdir())
    with pytest.raises(ValueError, match="no images"):
        compute_latent_stats(EncodedStore.of_function(torch.relu, 5, []), manifest)


def test_factor_purity_counts_missing_top_images_against_purity():
    tops = pd.DataFrame({"by": "image", "rank": [0, 1, 0], "latent": [0, 0, 1], "image_id": ["a", "b", "c"]})
    manifest = pd.DataFrame({"image_id": ["a", "b", "c"], "colour": ["red", "red", "blue"]})
    p = factor_purity(tops, manifest, "colour", k=2).set_index("value")
    assert p.loc["red", "purity"] == 1.0 and p.loc["blue", "purity"] == 0.5
    assert p.loc["red", "n_tied"] == 1 and p.loc["blue", "n_tied"] == 1


def test_factor_purity_says_how_many_latents_tie_for_best():
    """Latents 1 and 2 both see only red images: equally pure, the lowest-numbered is named, and 2 tie."""
    tops = pd.DataFrame({"by": "image", "rank": [0, 1] * 3, "latent": [0, 0, 1, 1, 2, 2],
                         "image_id": ["a", "c", "a", "b", "b", "a"]})
    manifest = pd.DataFrame({"image_id": ["a", "b", "c"], "colour": ["red", "red", "blue"]})
    p = factor_purity(tops, manifest, "colour", k=2).set_index("value")
    assert p.loc["red", "best_latent"] == 1 and p.loc["red", "n_tied"] == 2
    assert p.loc["blue", "best_latent"] == 0 and p.loc["blue", "purity"] == 0.5 and p.loc["blue", "n_tied"] == 1


def test_histogram_of_a_latent_with_a_range_of_a_few_ulps():
    """Found by the README flow: float32 values 1 ulp apart made np.histogram raise 'Too many bins'."""
    one = torch.tensor(1.0)
    vals = torch.stack([one, torch.nextafter(one, torch.tensor(2.0))])
    acts = vals.reshape(2, 1, 1).expand(2, 3, 1).clone()  # 2 images x 3 tokens x 1 latent
    s = compute_latent_stats(EncodedStore.of_function(torch.relu, 1, [(["x", "y"], acts)]),
                             pd.DataFrame({"image_id": ["x", "y"], "label": ["p", "q"]}), k=2)
    assert sum(s.histograms.counts[0]) == 2


def test_a_store_of_one_vector_per_image_goes_through_stats_patients_and_classify(tmp_path):
    """Imported embeddings (N, D): no patch tokens. Every token policy uses the one vector; no patch tops."""
    from typer.testing import CliRunner

    from cytosae.cli import app
    from cytosae.sae import SAE, SAEConfig
    from cytosae.store import import_embeddings

    rng = np.random.default_rng(0)
    rows = [{"image_id": f"P{p:02d}/{c}", "patient_id": f"P{p:02d}", "diagnosis": "A" if p % 2 else "B",
             "label": "x" if c % 2 else "y"} for p in range(12) for c in range(5)]
    x = rng.normal(size=(len(rows), 8)).astype(np.float32)
    x[[i for i, r in enumerate(rows) if r["diagnosis"] == "A"], 0] += 3.0
    np.save(tmp_path / "emb.npy", x)
    store = import_embeddings(tmp_path / "emb.npy", pd.DataFrame(rows), tmp_path / "store")
    SAE(SAEConfig(arch="relu-l1", d_in=8, n_latents=16), seed=0).save(tmp_path / "sae")
    run = CliRunner()
    r = run.invoke(app, ["stats", str(tmp_path / "sae"), str(store), "--out", str(tmp_path / "stats")])
    assert r.exit_code == 0, r.output
    assert "no galleries: a store of imported embeddings" in r.output
    tops = pd.read_parquet(tmp_path / "stats" / "top_images.parquet")
    assert set(tops.by) == {"image"} and len(tops) > 0
    lat = pd.read_parquet(tmp_path / "stats" / "latents.parquet")
    assert lat.freq_image.between(0, 1).all() and lat.mean_act.notna().all()
    for policy in ("cls", "any_patch", "mean"):
        r = run.invoke(app, ["patients", str(tmp_path / "sae"), str(store), "--out", str(tmp_path / policy),
                             "--token-policy", policy])
        assert r.exit_code == 0, r.output
    frac = [pd.read_parquet(tmp_path / p / "barcodes.parquet").frac.to_numpy() for p in ("cls", "any_patch", "mean")]
    np.testing.assert_array_equal(frac[0], frac[1])  # the one vector is every policy's view of the cell
    np.testing.assert_array_equal(frac[0], frac[2])
    r = run.invoke(app, ["classify", str(tmp_path / "cls"), "--store", str(store), "--out", str(tmp_path / "cl"),
                         "--repeats", "1", "--folds", "3", "--sae", str(tmp_path / "sae"), "--mil-epochs", "5"])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "cl" / "results.json").read_text())
    assert {"mil_embedding", "mil_concepts", "baseline_mean_embedding_logreg_l2"} <= set(res["models"])
    assert {w["class"] for w in res["mil_concept_weights"]["weights"]} == {"A", "B"}
    att = pd.read_parquet(tmp_path / "cl" / "attention.parquet")
    assert len(att) == 2 * 60 and set(att.model) == {"mil_embedding", "mil_concepts"}
    assert (att.groupby(["model", "patient_id"]).attention.sum() <= 1 + 1e-5).all()  # attention sums to 1 per class


def test_histograms_of_all_latents_at_once_equal_numpy_per_latent():
    """_histograms bins every latent in one pass; each row must be np.histogram's (edges and counts), including
    never-firing latents, constant ones (+-0.5 edges) and values a float32 ulp apart."""
    from cytosae.analysis.stats import _histograms

    rng = np.random.default_rng(0)
    for m, n in [(1, 3), (37, 50), (300, 9)]:
        s = (rng.exponential(size=(m, n)) * (rng.random((m, n)) < 0.4)).astype(np.float32)
        s[:, 0], s[:, 1] = 0.0, 1.0
        s[:, 2] = np.float32(1.0) + (np.arange(m) % 2) * np.float32(1.1920929e-07)
        for n_bins in (20, 7):
            got = _histograms(s, "d", n_bins)
            for j in range(n):
                vals = s[:, j][s[:, j] > 0].astype(np.float64)
                counts, edges = np.histogram(vals, bins=n_bins) if len(vals) else (np.zeros(n_bins, int),
                                                                                  np.zeros(n_bins + 1))
                assert got.bin_edges[j] == edges.tolist() and got.counts[j] == counts.tolist(), (m, j, n_bins)
            assert got.latent.tolist() == list(range(n)) and set(got.dataset) == {"d"}


def test_top_label_and_entropy_follow_rank_order_and_multi_labels():
    from collections import Counter

    from cytosae.analysis.stats import _labels_of, _top_label_columns

    top = pd.DataFrame({"latent": [2, 0, 0, 0, 2, 2, 1], "by": ["image"] * 6 + ["patch"],
                        "rank": [0, 0, 1, 2, 1, 2, 0], "label": ["b|a", "x", "y", "y", "a", None, "z"]})
    ent, best = _top_label_columns(top, 4)
    for j, labs in {0: ["x", "y", "y"], 2: ["b", "a", "a"]}.items():
        assert ent[j] == entropy(labs) and best[j] == Counter(labs).most_common(1)[0][0]
    assert best[:3] == ["y", None, "a"] and math.isnan(ent[1]) and math.isnan(ent[3]) and best[3] is None
    assert _labels_of("b|a") == ["b", "a"]
    # a tie goes to the label seen first in rank order
    assert _top_label_columns(top.assign(label=["p", "x", "y", "x", "q", None, "z"]), 3)[1] == ["x", None, "p"]
