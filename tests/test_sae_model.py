"""SAE architectures: shapes, save/load, normalisation folding, sparse kernels == dense."""
import json

import pytest
import torch

from cytosae.sae import SAE, SAEConfig, geometric_median
from cytosae.sae.init import unit_mean_square_scale

ARCHS = ["relu-l1", "topk", "batchtopk", "jumprelu", "matryoshka"]


def _sae(arch, d=16, n=64, **kw):
    torch.manual_seed(0)
    s = SAE(SAEConfig(arch=arch, d_in=d, n_latents=n, k=4, **kw), seed=0)
    with torch.no_grad():
        s.b_enc.normal_(0, 0.1)
        s.input_scale.fill_(0.37)
        if arch in ("batchtopk", "matryoshka"):
            s.threshold.fill_(0.05)
    return s


@pytest.mark.parametrize("arch", ARCHS)
def test_interface_shapes_and_save_load_roundtrip(arch, tmp_path):
    s = _sae(arch)
    x = torch.randn(50, 16) * 3
    s.train()
    out = s(x)
    assert out.recon.shape == (50, 16) and out.latents.shape == (50, 64)
    assert torch.isfinite(out.loss) and out.loss.ndim == 0
    if arch == "topk":
        assert torch.all((out.latents > 0).sum(1) <= 4)
    if arch in ("batchtopk", "matryoshka"):
        assert int((out.latents > 0).sum()) <= 4 * 50
    s.eval()
    s.save(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["format_version"] == 2 and cfg["arch"] == arch and cfg["n_latents"] == 64
    t = SAE.load(tmp_path)
    assert torch.equal(s.encode(x), t.encode(x))
    assert torch.allclose(s.decode(s.encode(x)), t.decode(t.encode(x)))


@pytest.mark.parametrize("arch", ARCHS)
def test_raw_units_equal_normalised_path(arch):
    s = _sae(arch).eval()
    x = torch.randn(40, 16) * 5 + 2
    xn = x * 0.37
    pre = (xn - s.b_dec) @ s.W_enc + s.b_enc
    z = s.encode(x)
    if arch == "relu-l1":
        assert torch.allclose(z, torch.relu(pre), atol=1e-5)
    manual_recon = (z @ s.W_dec + s.b_dec)  # normalised units
    assert torch.allclose(s.decode(z) * 0.37, manual_recon, atol=1e-5)
    assert torch.allclose(s(x).recon, s.decode(z), atol=1e-5)


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "matryoshka"])
def test_sparse_kernels_match_dense_gradients(arch):
    x = torch.randn(64, 16)
    grads = []
    for sparse in (True, False):
        s = _sae(arch, sparse_kernels=sparse).train()
        dead = torch.zeros(64, dtype=torch.bool)
        dead[:20] = True  # exercise AuxK too
        out = s(x, dead_mask=dead)
        out.loss.backward()
        grads.append((out.loss.detach(), out.recon.detach(), {k: p.grad.clone() for k, p in s.named_parameters()}))
    (l1, r1, g1), (l2, r2, g2) = grads
    assert torch.allclose(l1, l2, atol=1e-5) and torch.allclose(r1, r2, atol=1e-5)
    for k in g1:
        assert torch.allclose(g1[k], g2[k], atol=1e-5), k


@pytest.mark.parametrize("arch", ARCHS)
def test_encoder_gradient_lands_in_the_encoders_own_layout(arch):
    """The encoder is stored as its transpose and every architecture's backward builds its gradient in that layout:
    a gradient with other strides is copied by autograd (150 MB a step at 49,152 x 768). Values are unchanged."""
    s = _sae(arch).train()
    assert s.W_enc_T.is_contiguous() and s.W_enc_T.data_ptr() != s.W_dec.data_ptr()
    assert torch.equal(s.W_enc, s.W_enc_T.t()) and s.tensors()["W_enc"].shape == (16, 64)
    torch.manual_seed(1)
    ref = SAE(SAEConfig(arch=arch, d_in=16, n_latents=64, k=4), seed=0)
    assert torch.equal(ref.W_enc, SAE(SAEConfig(arch=arch, d_in=16, n_latents=64, k=4), seed=0).W_enc)
    if arch != "relu-l1":  # Gao et al.: the decoder transpose, as before the layout change
        assert torch.equal(ref.W_enc, ref.W_dec.t())
    dead = torch.zeros(64, dtype=torch.bool)
    dead[:20] = True
    s(torch.randn(64, 16), dead_mask=dead).loss.backward()
    assert s.W_enc_T.grad.is_contiguous()  # autograd kept the gradient the backward built: no copy


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "matryoshka"])
def test_encoder_init_scale_scales_the_decoder_transpose(arch, tmp_path):
    s = SAE(SAEConfig(arch=arch, d_in=16, n_latents=64, k=4, encoder_init_scale=0.5), seed=0)
    torch.testing.assert_close(s.W_enc, 0.5 * s.W_dec.t())
    assert SAE(SAEConfig(arch=arch, d_in=16, n_latents=64, k=4)).cfg.encoder_init_scale == 1.0
    s.save(tmp_path)
    assert SAE.load(tmp_path).cfg.encoder_init_scale == 0.5
    with pytest.raises(ValueError, match="encoder_init_scale"):
        SAEConfig(arch=arch, d_in=16, n_latents=64, k=4, encoder_init_scale=0.0)


def test_batchtopk_exports_as_jumprelu():
    s = _sae("batchtopk").eval()
    j = s.to_jumprelu()
    x = torch.randn(30, 16)
    assert j.cfg.arch == "jumprelu"
    assert torch.allclose(j.encode(x), s.encode(x), atol=1e-6)
    with pytest.raises(ValueError, match="batchtopk or matryoshka"):
        _sae("topk").to_jumprelu()


def test_decoder_constraint():
    s = _sae("relu-l1")
    s.W_dec.grad = torch.randn_like(s.W_dec)
    s.remove_parallel_decoder_grad()
    assert torch.allclose((s.W_dec.grad * s.W_dec).sum(1), torch.zeros(64), atol=1e-5)
    with torch.no_grad():
        s.W_dec.mul_(3)
    s.normalize_decoder()
    assert torch.allclose(s.W_dec.norm(dim=1), torch.ones(64), atol=1e-6)


def test_geometric_median_robust_to_outliers():
    torch.manual_seed(0)
    pts = torch.randn(200, 8) * 0.1 + 1.0
    pts[:20] = 1000.0  # 10% outliers drag the mean, not the median
    gm = geometric_median(pts)
    assert (gm - 1.0).abs().max() < 0.1
    assert (pts.mean(0) - 1.0).abs().max() > 50
    # collinear check: median of 3 points on a line is the middle one
    line = torch.tensor([[0.0, 0.0], [1.0, 0.0], [5.0, 0.0]])
    assert torch.allclose(geometric_median(line), torch.tensor([1.0, 0.0]), atol=1e-3)
    with pytest.raises(ValueError):
        geometric_median(torch.zeros(0, 3))


def test_unit_mean_square_scale():
    x = torch.randn(1000, 32) * 7
    s = unit_mean_square_scale(x)
    assert abs(float((x * s).pow(2).sum(1).mean()) - 1.0) < 1e-5


def test_config_and_load_errors(tmp_path):
    with pytest.raises(ValueError, match="arch"):
        SAEConfig(arch="gated", d_in=8, n_latents=16)
    with pytest.raises(ValueError, match="k must be"):
        SAEConfig(arch="topk", d_in=8, n_latents=16, k=0)
    s = _sae("topk")
    s.save(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["wibble"] = 1
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unknown SAEConfig fields.*wibble"):
        SAE.load(tmp_path)
    del cfg["wibble"], cfg["d_in"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="missing required.*d_in"):
        SAE.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="sae.safetensors|config.json"):
        SAE.load(tmp_path / "nope")
    with pytest.raises(ValueError, match=r"\(N, 16\)"):
        s.encode(torch.zeros(3, 15))


def test_top_level_lazy_exports():
    import cytosae
    assert cytosae.SAE is SAE and cytosae.SAEConfig is SAEConfig
    from cytosae.sae import train_sae
    assert cytosae.train_sae is train_sae


def test_encoder_linear_gradients_match_autograd():
    from cytosae.sae.kernels import EncoderLinear
    torch.manual_seed(0)
    x = torch.randn(20, 8)
    ps = [torch.randn(8, requires_grad=True), torch.randn(8, 12, requires_grad=True), torch.randn(12, requires_grad=True)]
    w = torch.randn(20, 12)
    (EncoderLinear.apply(x, *ps).relu() * w).sum().backward()
    fast = [p.grad.clone() for p in ps]
    for p in ps:
        p.grad = None
    (torch.addmm(ps[2], x - ps[0], ps[1]).relu() * w).sum().backward()
    for a, p in zip(fast, ps):
        assert torch.allclose(a, p.grad, atol=1e-5)


def test_ghost_grads_reach_dead_latents_only_when_dead():
    s = _sae("relu-l1").train()
    with torch.no_grad():
        s.input_scale.fill_(1.0)
        s.b_enc[:10] = -100.0  # latents 0..9 never fire
    x = torch.randn(64, 16)
    out = s(x)
    out.loss.backward()
    assert float(out.aux) == 0.0 and torch.all(s.W_enc_T.grad.t()[:, :10] == 0)  # no dead mask yet
    s.zero_grad()
    dead = torch.zeros(64, dtype=torch.bool)
    dead[:10] = True
    out = s(x, dead_mask=dead)
    out.loss.backward()
    assert float(out.aux) > 0 and float(s.W_enc_T.grad.t()[:, :10].abs().sum()) > 0


def test_jumprelu_threshold_gradient_is_rectangle_ste():
    from cytosae.sae.kernels import JumpReLUFn, StepFn
    pre = torch.tensor([[0.50, 0.1004, 0.30]], requires_grad=True)
    thr = torch.tensor([0.2, 0.1, 0.1], requires_grad=True)
    JumpReLUFn.apply(pre, thr, 1e-3).sum().backward()
    # only latent 1 lies within bandwidth/2 of its threshold: d/dtheta = -theta / eps
    assert torch.allclose(thr.grad, torch.tensor([0.0, -100.0, 0.0]))
    assert torch.allclose(pre.grad, torch.tensor([[1.0, 1.0, 1.0]]))
    thr.grad = None
    StepFn.apply(pre, thr, 1e-3).sum().backward()
    assert torch.allclose(thr.grad, torch.tensor([0.0, -1000.0, 0.0]))
