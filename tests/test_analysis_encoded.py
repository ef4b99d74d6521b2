"""EncodedStore: one store + SAE on one device; the TopK family's sparse batches reduce to what the dense ones do."""
import numpy as np
import pandas as pd
import pytest
import torch

from cytosae.analysis import compute_latent_stats, patient_barcodes
from cytosae.analysis.encoded import EncodedBatch, EncodedStore
from cytosae.analysis.heatmaps import cell_activations
from cytosae.sae import SAE, SAEConfig
from cytosae.store import ActivationStore, import_embeddings

N_LATENTS = 96


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("enc")
    rng = np.random.default_rng(0)
    n = 14
    np.save(root / "t.npy", rng.normal(size=(n, 1 + 16, 32)).astype(np.float32))  # CLS + a 4 x 4 grid
    manifest = pd.DataFrame({"image_id": [f"cell_{i:02d}" for i in range(n)], "label": [["a", "b", "c"][i % 3] for i in range(n)],
                             "patient_id": [f"p{i % 4}" for i in range(n)], "diagnosis": [["x", "y"][i % 2] for i in range(n)]})
    import_embeddings(root / "t.npy", manifest, root / "store", dtype="float32", shard_size=5)
    return ActivationStore(root / "store")


def _sae(arch: str) -> SAE:
    extra = {} if arch in ("relu-l1", "jumprelu") else {"k": 6}
    sae = SAE(SAEConfig(arch=arch, d_in=32, n_latents=N_LATENTS, **extra), seed=1).eval()
    if arch == "batchtopk":
        sae.threshold.fill_(0.5)
    return sae


def _pair(store, arch: str, batch_size: int = 3):
    """The same SAE through the EncodedStore (sparse where the architecture is) and as a plain dense function."""
    sae = _sae(arch)
    return (EncodedStore(store, sae, torch.device("cpu"), batch_size),
            EncodedStore.of_function(sae.encode, N_LATENTS, store=store, batch_size=batch_size))


def test_topk_encodes_sparse_pairs_that_are_its_dense_encoding():
    x = torch.randn(40, 32)
    sae = _sae("topk")
    vals, idx = sae.encode_sparse(x)
    assert vals.shape == idx.shape == (40, 6) and bool((vals >= 0).all())
    assert torch.equal(torch.zeros(40, N_LATENTS).scatter_(1, idx, vals), sae.encode(x))
    for arch in ("relu-l1", "jumprelu", "batchtopk", "matryoshka"):  # no fixed width at inference: dense
        assert _sae(arch).encode_sparse(x) is None, arch


def test_sparse_batch_reductions_equal_the_dense_ones(store):
    sparse, dense = _pair(store, "topk", batch_size=5)
    for s, d in zip(sparse.batches(), dense.batches()):
        assert s.sparse and not d.sparse and s.ids == d.ids and s.shape == d.shape == (len(s.ids), 17)
        assert torch.equal(s.to_dense(), d.dense)
        for name in ("fires_any", "fire_counts", "max_over_tokens"):
            assert torch.equal(getattr(s, name)(), getattr(d, name)()), name
        (sv, sp), (dv, dp) = s.patch_max(), d.patch_max()
        assert torch.equal(sv, dv) and torch.equal(sp[dv > 0], dp[dv > 0])  # the patch only where one fires
        assert torch.equal(s.token(0), d.token(0))
        # float64 sums of the kept pairs: the correctly rounded mean, within one float32 step of torch's
        torch.testing.assert_close(s.patch_mean(), d.patch_mean(), rtol=1e-6, atol=1e-7)
        assert torch.equal(s.patch_mean(), d.dense[:, 1:].double().mean(1).float())


def test_stats_and_barcodes_of_a_topk_sae_match_the_dense_pass(store):
    sparse, dense = _pair(store, "topk")
    a = compute_latent_stats(sparse, store.images, k=4)
    b = compute_latent_stats(dense, store.images, k=4)
    assert a.latents.freq_image.sum() > 0 and a.summary == b.summary
    exact = ["latent", "freq_image", "freq_token", "max_act", "label_entropy", "top_label"]
    pd.testing.assert_frame_equal(a.latents[exact], b.latents[exact])
    pd.testing.assert_frame_equal(a.latents, b.latents, rtol=1e-6)
    pd.testing.assert_frame_equal(a.top_images.drop(columns="value"), b.top_images.drop(columns="value"))
    pd.testing.assert_frame_equal(a.top_images, b.top_images, rtol=1e-6)
    pd.testing.assert_frame_equal(a.class_profile, b.class_profile, rtol=1e-6)
    for policy in ("cls", "any_patch", "mean"):
        x = patient_barcodes(sparse, store.images, token_policy=policy)
        assert x["count"].sum() > 0 and x.equals(patient_barcodes(dense, store.images, token_policy=policy)), policy
    np.testing.assert_allclose(cell_activations(sparse, [0, 5]).to_numpy(), cell_activations(dense, [0, 5]).to_numpy(),
                               rtol=1e-6)


@pytest.mark.parametrize("arch", ["relu-l1", "batchtopk"])
def test_dense_architectures_give_todays_tables_exactly(store, arch):
    sparse, dense = _pair(store, arch)
    a, b = compute_latent_stats(sparse, store.images, k=4), compute_latent_stats(dense, store.images, k=4)
    for name in ("latents", "top_images", "class_profile", "histograms"):
        assert getattr(a, name).equals(getattr(b, name)), name


def test_an_sae_on_another_device_is_refused_in_one_line(store):
    with pytest.raises(ValueError, match=r"the SAE is on cpu but its batches go to cuda.*SAE.load\(dir, device="):
        EncodedStore(store, _sae("topk"), torch.device("cuda"))


def test_a_one_vector_store_is_its_own_patch():
    vals = torch.tensor([[[2.0, 0.5]], [[0.0, 1.0]]])  # 2 images, 1 token, width 2
    idx = torch.tensor([[[3, 1]], [[0, 2]]])
    b = EncodedBatch(["a", "b"], 4, vals=vals, idx=idx)
    assert b.patch_mean().tolist() == [[0.0, 0.5, 0.0, 2.0], [0.0, 0.0, 1.0, 0.0]]
    assert b.fires_any().tolist() == [[False, True, False, True], [False, False, True, False]]
    assert b.fire_counts().tolist() == [0.0, 1.0, 1.0, 1.0]


@pytest.mark.parametrize("arch", ["topk", "relu-l1"])
def test_nonzero_pairs_of_one_image_are_its_dense_nonzeros(store, arch):
    sparse, dense = _pair(store, arch, batch_size=2)
    s, d = next(iter(sparse.batches())), next(iter(dense.batches()))
    for image in (0, 1):
        tok, lat, val = s.nonzero(image)
        z = torch.zeros(17, N_LATENTS)
        z[tok, lat] = val
        assert torch.equal(z, d.dense[image]) and bool((val > 0).all()) and bool((tok[1:] >= tok[:-1]).all())


def test_a_pass_left_early_leaves_autograd_on():
    """batches() must not hold a grad mode across its yields: a caller that stops after one batch (a gallery that
    has its images) found autograd off in every later computation of its thread (MIL training failed)."""
    enc = EncodedStore.of_function(torch.relu, 4, batches=[(["a"], torch.randn(1, 3, 4)), (["b"], torch.randn(1, 3, 4))])
    it = enc.batches()
    first = next(it)
    assert torch.is_grad_enabled() and not first.dense.requires_grad  # the generator is suspended, not closed


def test_dense_patch_max_is_torch_max_with_the_first_patch_among_ties():
    z = torch.relu(torch.randn(3, 9, 40, generator=torch.Generator().manual_seed(4)))
    z[0, 3:6, 7] = 5.0  # tied maxima: the first patch is said
    got_v, got_i = EncodedBatch(["a", "b", "c"], 40, dense=z).patch_max()
    want_v, want_i = z[:, 1:].max(1)
    assert torch.equal(got_v, want_v) and got_i[0, 7] == 2  # patch 2 is token 3
    fires = want_v > 0
    assert torch.equal(got_i[fires], want_i[fires]) and bool((got_i[~fires] == 0).all())


@pytest.mark.parametrize("arch", ["topk", "relu-l1"])
def test_a_patch_only_store_keeps_its_first_patch_and_its_grid(tmp_path, arch):
    """Tokens imported with has_cls=False (a 4 x 4 grid, no CLS): token 0 is a patch, counted in the patch mean
    and the strongest patch, and the grid is 4, not isqrt(15)."""
    rng = np.random.default_rng(1)
    np.save(tmp_path / "t.npy", rng.normal(size=(6, 16, 32)).astype(np.float32))
    manifest = pd.DataFrame({"image_id": [f"c{i}" for i in range(6)], "label": ["a", "b"] * 3})
    import_embeddings(tmp_path / "t.npy", manifest, tmp_path / "store", dtype="float32", has_cls=False)
    st = ActivationStore(tmp_path / "store")
    sae = _sae(arch)
    batch = next(iter(EncodedStore(st, sae, torch.device("cpu"), 6).batches()))
    z = sae.encode(torch.from_numpy(np.load(tmp_path / "t.npy")).reshape(-1, 32)).reshape(6, 16, -1)
    assert not batch.has_cls and batch.n_patches == 16
    torch.testing.assert_close(batch.patch_mean(), z.mean(1), rtol=1e-6, atol=1e-7)
    best, patch = batch.patch_max()
    assert torch.equal(best, z.amax(1)) and bool((patch == 0).any())
    assert torch.equal(batch.fires_any(), z.amax(1) > 0)
    stats = compute_latent_stats(EncodedStore(st, sae, torch.device("cpu"), 4), st.images, k=3)
    assert stats.summary["grid"] == 4
    first = stats.top_images[(stats.top_images.by == "patch") & (stats.top_images.patch == 0)]
    assert len(first) > 0  # some latent is strongest on token 0, which a CLS-first reading dropped
