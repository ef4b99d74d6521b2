"""The encoding kernels every TopK step and every encoding pass runs: the blocked top-k and the positive counts."""
import pytest
import torch

from cytosae.sae.kernels import positive_counts, topk_rows


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
