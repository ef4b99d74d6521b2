"""Stability (cytosae.analysis.stability, `cytosae compare-saes`): an SAE matches itself and a permuted copy of itself
exactly, two independent random SAEs share almost nothing, the candidate-graph assignment equals the full one where
the best partners are among the candidates, and the command writes the figures."""
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cytosae.analysis.stability import match_latents
from cytosae.cli import app
from cytosae.sae import SAE
from cytosae.sae.config import SAEConfig
from cytosae.steps import CompareSaesSettings, StepError, run_compare_saes

D, N = 16, 64


def _sae(tmp_path, name, seed=0, n=N, d=D):
    sae = SAE(SAEConfig(arch="topk", d_in=d, n_latents=n, k=4), seed=seed)
    return sae, sae.save(tmp_path / name)


def _permuted(sae, perm, out):
    """A copy of `sae` with its latents reordered: latent i of the copy is latent perm[i] of the original."""
    n = sae.cfg.n_latents
    tensors = {k: (v.index_select(v.shape.index(n), torch.as_tensor(perm)) if n in v.shape else v)
               for k, v in sae.tensors().items()}
    copy = SAE(sae.cfg)
    copy.load_tensors(tensors)
    return copy.save(out)


@pytest.mark.parametrize("method", ["dense", "candidates"])
def test_an_sae_against_itself_matches_every_latent_at_cosine_one(tmp_path, method):
    _, d = _sae(tmp_path, "a")
    res = run_compare_saes(CompareSaesSettings(a=d, b=d, method=method, device="cpu"))
    f = res.figures
    assert f["method"] == method and f["n_latents_a"] == N and f["n_matched"] == N
    assert f["share_above_0.9"] == 1.0 and f["share_above_0.7"] == 1.0
    assert f["median_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert f["top_images"] is None  # plain SAE directories: no runs, no stats


@pytest.mark.parametrize("method", ["dense", "candidates"])
def test_a_permuted_copy_is_recovered_exactly(tmp_path, method):
    sae, _ = _sae(tmp_path, "a", seed=3)
    perm = np.random.default_rng(0).permutation(N)
    copy_dir = _permuted(sae, perm, tmp_path / "b")
    reread = SAE.load(copy_dir)
    assert torch.equal(reread.W_dec, sae.W_dec[perm])  # the copy really is permuted, through save and load
    m = match_latents(sae.W_dec, reread.W_dec, c=8, method=method)
    # A's latent perm[i] is B's latent i
    expected = np.empty(N, dtype=np.int64)
    expected[perm] = np.arange(N)
    np.testing.assert_array_equal(m.match, expected)
    np.testing.assert_allclose(m.cosine, 1.0, atol=1e-6)


def test_independent_random_saes_share_almost_nothing(tmp_path):
    _, a = _sae(tmp_path, "a", seed=1, n=256, d=64)
    _, b = _sae(tmp_path, "b", seed=2, n=256, d=64)
    f = run_compare_saes(CompareSaesSettings(a=a, b=b, device="cpu")).figures
    assert f["share_above_0.9"] <= 0.01
    assert f["share_above_0.7"] <= 0.01
    assert 0.05 < f["median_cosine"] < 0.6  # the best of 256 random directions in 64 dims: clearly above 0


def test_candidate_assignment_equals_the_full_one(tmp_path):
    """B = A permuted plus noise: every latent's best partner is among its top 8, so the candidate graph gives the
    dense assignment, latent for latent; with a single candidate it may not, and never beats it."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(200, 24, generator=g)
    perm = torch.randperm(200, generator=g)
    b = a[perm] + 0.6 * torch.randn(200, 24, generator=g)
    b = torch.cat([b, torch.randn(40, 24, generator=g)])  # B larger than A: rectangular
    dense = match_latents(a, b, method="dense")
    cand = match_latents(a, b, c=8, method="candidates")
    assert dense.method == "dense" and cand.method == "candidates" and cand.candidates == 8
    np.testing.assert_array_equal(cand.match, dense.match)
    np.testing.assert_allclose(cand.cosine, dense.cosine, atol=1e-6)
    one = match_latents(a, b, c=1, method="candidates")
    assert one.cosine.sum() <= dense.cosine.sum() + 1e-9
    # the auto method picks the dense assignment at this size, the candidate graph past the limit
    assert match_latents(a, b).method == "dense"
    assert match_latents(a, b, dense_max_cells=100).method == "candidates"


def test_unmatched_latents_count_as_zero():
    """More latents in A than in B: the surplus is unmatched, cosine 0, and lowers the shares."""
    g = torch.Generator().manual_seed(1)
    b = torch.randn(10, 8, generator=g)
    a = torch.cat([b, torch.randn(5, 8, generator=g)])
    for method in ("dense", "candidates"):
        m = match_latents(a, b, c=4, method=method)
        assert (m.match >= 0).sum() == 10 and (m.cosine[m.match < 0] == 0).all()
        np.testing.assert_array_equal(m.match[:10], np.arange(10))


def test_different_widths_are_refused_in_one_line(tmp_path):
    _, a = _sae(tmp_path, "a")
    _, b = _sae(tmp_path, "b", d=8)
    with pytest.raises(StepError, match="same d_in"):
        run_compare_saes(CompareSaesSettings(a=a, b=b, device="cpu"))
    with pytest.raises(StepError, match="neither an SAE directory"):
        run_compare_saes(CompareSaesSettings(a=a, b=tmp_path / "nothing", device="cpu"))


def test_the_cli_writes_the_json(tmp_path):
    sae, a = _sae(tmp_path, "a", seed=5)
    perm = np.random.default_rng(1).permutation(N)
    b = _permuted(sae, perm, tmp_path / "b")
    out = tmp_path / "stability.json"
    res = CliRunner().invoke(app, ["compare-saes", str(a), str(b), "--out", str(out), "--device", "cpu",
                                   "--method", "candidates", "--candidates", "4"])
    assert res.exit_code == 0, res.output
    f = json.loads(out.read_text())
    assert f["share_above_0.9"] == 1.0 and f["n_matched"] == N and f["candidates"] == 4 and f["device"] == "cpu"
    assert f["a"]["sae_dir"] == str(a) and f["b"]["n_latents"] == N and "share_above_0.9" in f["definitions"]
    assert f"of A's {N} latents, {N} matched" in res.output and "top 4 candidates" in res.output
    assert str(out) in res.output and f["matches"] == "stability.matches.parquet"
    import pandas as pd

    matches = pd.read_parquet(tmp_path / f["matches"])
    assert list(matches.columns) == ["latent_a", "latent_b", "cosine"] and len(matches) == N
    np.testing.assert_array_equal(matches.latent_b.to_numpy()[perm], np.arange(N))  # A's perm[i] is B's i
    bad = CliRunner().invoke(app, ["compare-saes", str(a), str(b), "--method", "greedy"])
    assert bad.exit_code == 2 and "--method must be one of" in bad.output


def _run_with_stats(tmp_path, name, sae_dir_of, tokens_npy, manifest):
    """A run made by the project's writers: RUN/sae from `sae_dir_of(RUN/sae)`, the store imported from
    `tokens_npy`, and `cytosae stats`' tables (run_stats)."""
    from cytosae.steps import StatsSettings, run_stats
    from cytosae.store import import_embeddings

    run = tmp_path / name
    sae_dir_of(run / "sae")
    import_embeddings(tokens_npy, manifest, run / "stores" / "cells", dtype="float32", shard_size=16)
    run_stats(StatsSettings(k=4, galleries=0, device="cpu"), run=run)
    return run


def test_matched_latents_of_runs_with_stats_share_their_top_images(tmp_path):
    """Two runs over the same cells whose SAEs are permutations of each other: every matched pair's top images are
    the same (Jaccard 1); against a run with an independent SAE they are not."""
    import pandas as pd

    rng = np.random.default_rng(0)
    np.save(tmp_path / "tokens.npy", rng.normal(size=(40, 5, D)).astype(np.float32))
    manifest = pd.DataFrame({"image_id": [f"cell_{i:03d}.png" for i in range(40)], "label": ["a", "b"] * 20})
    sae = SAE(SAEConfig(arch="topk", d_in=D, n_latents=N, k=4), seed=7)
    run_a = _run_with_stats(tmp_path, "run_a", sae.save, tmp_path / "tokens.npy", manifest)
    perm = rng.permutation(N)
    run_b = _run_with_stats(tmp_path, "run_b", lambda out: _permuted(sae, perm, out), tmp_path / "tokens.npy", manifest)
    other = SAE(SAEConfig(arch="topk", d_in=D, n_latents=N, k=4), seed=8)
    run_c = _run_with_stats(tmp_path, "run_c", other.save, tmp_path / "tokens.npy", manifest)

    same = run_compare_saes(CompareSaesSettings(a=run_a, b=run_b / "sae", device="cpu"))  # a run, or its RUN/sae
    ov = same.figures["top_images"]
    tops = pd.read_parquet(run_a / "stats" / "top_images.parquet")
    fired = tops[tops.by == "image"].latent.nunique()
    assert ov["datasets"] == ["cells"] and ov["k"] == 4 and ov["n_pairs"] == fired > 0
    assert ov["mean_jaccard"] == 1.0 and ov["mean_jaccard_above_0.7"] == 1.0
    assert any("mean Jaccard 1.000" in line and "top 4 images" in line for line in same.lines())

    diff = run_compare_saes(CompareSaesSettings(a=run_a, b=run_c, device="cpu")).figures["top_images"]
    assert diff["n_pairs"] > 0 and diff["mean_jaccard"] < 0.6
