"""The encoding kernels every TopK step and every encoding pass runs: the blocked top-k and the positive counts."""
import pytest
import torch

from cytosae.sae.kernels import batch_topk_flat, positive_counts, topk_rows


@pytest.mark.parametrize("n_rows, n, k", [(64, 12288, 32), (33, 49152, 64), (50, 4096, 16), (7, 6144, 128),
                                          (5, 1000, 8), (4, 256, 64)])
def test_topk_rows_equals_torch_topk(n_rows, n, k):
    """Blocked where the shape allows it (the first three), torch.topk otherwise: the same values in the same order,
    and columns holding them."""
    pre = torch.randn(n_rows, n, generator=torch.Generator().manual_seed(n + k))
    got_v, got_i = topk_rows(pre, k)
    want_v, want_i = pre.topk(k, dim=1)
    assert got_v.shape == got_i.shape == (n_rows, k) and got_i.dtype == torch.long
    assert torch.equal(got_v, want_v)
    assert torch.equal(pre.gather(1, got_i), got_v)
    assert torch.equal(got_i.sort(1).values, want_i.sort(1).values)  # distinct random values: the same columns


def test_topk_rows_with_ties_keeps_the_values_and_distinct_columns():
    """Many equal values (rounded activations): the k values are torch.topk's, each column is taken once."""
    g = torch.Generator().manual_seed(0)
    pre = torch.randint(0, 5, (40, 12288), generator=g).float()
    pre[:, 100] = 9.0  # a clear winner in one block, ties everywhere else
    vals, cols = topk_rows(pre, 32)
    assert torch.equal(vals, pre.topk(32, dim=1).values)
    assert torch.equal(pre.gather(1, cols), vals) and (cols[:, 0] == 100).all()
    assert all(len(set(r.tolist())) == 32 for r in cols)


def test_positive_counts_count_rows_above_zero_per_column():
    z = torch.relu(torch.randn(300, 70, generator=torch.Generator().manual_seed(1)))
    z[:, 5] = 0.0
    z[0, 6] = 1e-30  # tiny but positive: it counts
    got = positive_counts(z)
    assert got.dtype == torch.float64 and torch.equal(got, (z > 0).sum(0).double())
    assert got[5] == 0


def _batch_cases() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    pre = torch.randn(512, 4096, generator=g)
    one = pre.clone()
    one[3] += 100.0  # one token owns every winner
    spread = pre * torch.linspace(0.1, 10.0, 512)[:, None]  # token norms over two decades
    fooled = pre.clone()
    fooled.view(-1)[::(pre.numel() // 2 ** 16) | 1] += 50.0  # every sampled value huge: the threshold is too high
    return {"random": pre, "one token": one, "norms spread": spread, "sample misled": fooled}


@pytest.mark.parametrize("case", ["random", "one token", "norms spread", "sample misled"])
def test_batch_topk_flat_equals_the_full_topk(case):
    """BatchTopK's selection through the sampled threshold (small `samples` so these shapes take that path): the
    same set as the full top-k, whoever owns the winners, and also where the sample misjudges the batch."""
    pre = _batch_cases()[case]
    n_keep = 8 * pre.shape[0]
    got = batch_topk_flat(pre, n_keep, samples=2 ** 16)
    assert got.shape == (n_keep,) and got.dtype == torch.long
    assert set(got.tolist()) == set(pre.flatten().topk(n_keep).indices.tolist())


def test_batch_topk_flat_with_ties_keeps_the_values_once():
    pre = torch.randint(0, 50, (512, 4096), generator=torch.Generator().manual_seed(3)).float()
    n_keep = 8 * 512
    got = batch_topk_flat(pre, n_keep, samples=2 ** 16)
    assert len(set(got.tolist())) == n_keep
    assert torch.equal(pre.flatten()[got].sort().values, pre.flatten().topk(n_keep).values.sort().values)
