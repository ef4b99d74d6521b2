"""Sparse kernels for the TopK family: only the selected latents cost anything.

The encoder pre-activations must be computed densely (to pick the top k), but
the backward pass through the encoder and the whole decoder only involve the
M = N*k selected (token, latent) pairs. Dense autograd would instead run two
more (N, n_latents) x (n_latents, d) matmuls and materialise (N, n) gradients.

Every tensor is created on its inputs' device. Under bf16 autocast the pre-activations (and so the
incoming gradients) are bf16; gradients are accumulated in the parameters' own dtype (float32).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

def topk_rows(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`pre.topk(k, dim=1)` (values descending, their columns) of an (N, n) matrix, through blocks on the CPU: a row's
    k largest values all lie in the k blocks of largest maximum (any other block has k blocks of larger maxima
    beside it), so a pass of block maxima and a top-k over them leave k blocks to search. Done twice (blocks of
    32 columns, then of 8 among the candidates), a top-k over 4k values per row remains: 83 vs 143 ms for one
    stage and 460 for torch.topk at 4,096 x 12,288, k = 64, one thread. Equal values where several are tied
    may come in another order, as torch.topk's own order among ties is unspecified. On a GPU, and where the
    blocks would not cut the work (n not a multiple of 32 or under 4k blocks), torch.topk itself."""
    n_rows, n = pre.shape
    if pre.device.type != "cpu" or n % 32 or n // 32 < 4 * k:
        return pre.topk(k, dim=1)
    stages = []
    for block in (32, 8):
        pre, top_blocks = _top_blocks(pre, k, block)
        stages.append((top_blocks, block))
    vals, at = pre.topk(k, dim=1)
    for top_blocks, block in reversed(stages):  # position among a stage's candidates -> column of its input
        at = top_blocks.gather(1, at // block) * block + at % block
    return vals, at


def _top_blocks(pre: torch.Tensor, k: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The values of each row's k blocks of largest maximum, (N, k x block), and those blocks' numbers (N, k).
    index_select of whole blocks: gather with an expanded index took 3x as long."""
    n_rows, n = pre.shape
    per_row = n // block
    top = pre.reshape(n_rows, per_row, block).amax(2).topk(k, dim=1, sorted=False).indices
    rows = torch.arange(n_rows, device=pre.device)[:, None] * per_row
    return pre.reshape(n_rows * per_row, block).index_select(0, (top + rows).view(-1)).view(n_rows, k * block), top


def batch_topk_flat(pre: torch.Tensor, n_keep: int, block: int = 32, samples: int = 2 ** 20,
                    margin: float = 1.3) -> torch.Tensor:
    """Flat indices (in no set order) of the `n_keep` largest values of an (N, n) matrix: BatchTopK's selection,
    `pre.flatten().topk(n_keep).indices` up to the order of tied values. On the CPU a threshold t is read off an
    evenly strided sample (about `margin` x n_keep values of the batch reach it), then only the blocks of
    `block` columns whose maximum reaches t are looked into; if at least n_keep values reach t, the winners are
    all among them (exact), else (a sample that misjudged the batch) the full top-k runs. 114 vs 1,337 ms at
    4,096 x 49,152, k = 64, one thread, where the per-token candidate search it replaces stalled on tokens of
    large norm. On a GPU, or where the matrix is small or the blocks do not divide it, torch.topk itself."""
    flat = pre.reshape(-1)
    if pre.device.type != "cpu" or pre.shape[1] % block or flat.numel() < 8 * samples or n_keep * 8 > flat.numel():
        return flat.topk(n_keep).indices
    sample = flat[::max(1, flat.numel() // samples) | 1]  # odd stride: the sample does not stay on even columns
    t = sample.topk(math.ceil(margin * n_keep * sample.numel() / flat.numel()) + 16).values[-1]
    by_block = flat.view(-1, block)  # blocks never cross rows: the width is a multiple of the block
    blocks = torch.nonzero(by_block.amax(1) >= t).squeeze(1)
    vals = by_block[blocks]  # (blocks reaching t, block)
    hit = torch.nonzero(vals >= t)
    if hit.shape[0] < n_keep:
        return flat.topk(n_keep).indices
    winners = vals[hit[:, 0], hit[:, 1]].topk(n_keep).indices
    return blocks[hit[winners, 0]] * block + hit[winners, 1]


def positive_counts(z: torch.Tensor, rows: int = 32) -> torch.Tensor:
    """(n,) float64: how many rows of `z` (N, n), activations >= 0, are > 0 in each column. sign() and a sum over
    `rows` rows at a time, whose (rows, n) signs stay in the cache: one sign() of the whole batch wrote a fresh
    (N, n) tensor first (26 vs 202 ms for 2,056 x 49,152, one thread), and `(z > 0).sum(0)` widens the bools to
    an int64 copy. Each chunk's float32 sum of at most `rows` ones is exact. A GPU sums 2^23 rows at a time."""
    step = rows if z.device.type == "cpu" else 2 ** 23
    out = torch.zeros(z.shape[1], dtype=torch.float64, device=z.device)
    for start in range(0, z.shape[0], step):
        out += torch.sign(z[start:start + step]).sum(0)
    return out


class SparseEncoderGather(torch.autograd.Function):
    """vals[m] = ((x - b_dec) @ W_enc + b_enc)[rows[m], cols[m]], with sparse gradients.

    `pre_vals` are the already computed values (the dense pre-activations were
    needed to select the pairs), so forward does no work. `x_c` = x - b_dec is taken
    as data: the SAE input needs no gradient, and b_dec's gradient is -W_enc @ (summed
    gradient per latent), one matrix-vector product instead of an (N, d) gradient for x_c
    that would only be summed over tokens.
    """

    @staticmethod
    def forward(ctx, x_c, b_dec, w_enc, b_enc, rows, cols, pre_vals):
        ctx.save_for_backward(x_c, w_enc, rows, cols)
        ctx.n_latents = b_enc.shape[0]
        return pre_vals.clone()

    @staticmethod
    def backward(ctx, g):
        x_c, w_enc, rows, cols = ctx.saved_tensors
        g = g.to(w_enc.dtype)
        n = ctx.n_latents
        grad_b_dec = grad_w = grad_b = None
        per_latent = torch.zeros(n, dtype=g.dtype, device=g.device).index_add_(0, cols, g)
        if ctx.needs_input_grad[3]:
            grad_b = per_latent
        if ctx.needs_input_grad[2]:
            # row c of W_enc^T's gradient is the g-weighted sum of the tokens that kept latent c: an embedding bag
            # over x_c with the pairs grouped by latent. It writes (n, d) once; gathering an (M, d) product and
            # index_add-ing it cost 4x as long (89 vs 22 ms at 65,536 pairs, 49,152 x 768, one thread)
            by_latent, order = cols.sort()
            offsets = torch.searchsorted(by_latent, torch.arange(n, device=cols.device, dtype=cols.dtype))
            grad_wt = F.embedding_bag(rows[order], x_c.to(g.dtype), offsets, mode="sum", per_sample_weights=g[order])
            grad_w = in_layout_of(w_enc, grad_wt)
        if ctx.needs_input_grad[1]:
            grad_b_dec = -(w_enc @ per_latent)
        if ctx.needs_input_grad[0]:
            raise RuntimeError("SparseEncoderGather does not propagate gradients to the SAE input")
        return None, grad_b_dec, grad_w, grad_b, None, None, None


def in_layout_of(w_enc: torch.Tensor, grad_t: torch.Tensor) -> torch.Tensor:
    """W_enc's gradient from its transpose `grad_t` (n_latents, d_in), in W_enc's own memory layout: autograd copies
    a gradient whose strides differ from the parameter's (a 150 MB transposed copy per step at 49,152 x 768)."""
    grad = grad_t.t()
    return grad if grad.stride() == w_enc.stride() else grad.contiguous()


def sparse_decode(rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor, w_dec: torch.Tensor,
                  n_rows: int) -> torch.Tensor:
    """sum_m vals[m] * W_dec[cols[m]] into row rows[m]; `rows` must be sorted ascending."""
    # each row's first pair by binary search: bincount would size its output from rows.max(), a wait for the GPU
    offsets = torch.searchsorted(rows, torch.arange(n_rows, device=rows.device, dtype=rows.dtype))
    return F.embedding_bag(cols, w_dec, offsets, mode="sum", per_sample_weights=vals.to(w_dec.dtype),
                           include_last_offset=False)


class JumpReLUFn(torch.autograd.Function):
    """z * H(z - theta); d/dtheta by a rectangle-kernel straight-through estimator (Rajamanoharan et al. 2024)."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx, g):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_pre = g * (pre > threshold)
        kernel = ((pre - threshold).abs() < eps / 2).to(g.dtype) / eps
        grad_thr = (-(threshold / 1.0) * kernel * g).sum(0)
        return grad_pre, grad_thr, None


class StepFn(torch.autograd.Function):
    """H(z - theta) with the same estimator; used for the L0 penalty."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, g):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        kernel = ((pre - threshold).abs() < eps / 2).to(g.dtype) / eps
        return torch.zeros_like(pre), (-kernel * g).sum(0), None


class EncoderLinear(torch.autograd.Function):
    """(x - b_dec) @ W_enc + b_enc without a gradient for x.

    Autograd would compute d/d(x - b_dec) = g @ W_enc^T, a full (N, n) x (n, d) matmul, only
    to sum it over tokens for b_dec. Summing g first makes that a vector-matrix product:
    one of the six big matmuls of a dense step disappears.
    """

    @staticmethod
    def forward(ctx, x, b_dec, w_enc, b_enc):
        x_c = x - b_dec
        ctx.save_for_backward(x_c, w_enc)
        return torch.addmm(b_enc, x_c, w_enc)

    @staticmethod
    def backward(ctx, g):
        x_c, w_enc = ctx.saved_tensors
        g_sum = g.sum(0, dtype=w_enc.dtype)
        # the big matmul runs in the gradient's precision (bf16 under autocast), its result in float32
        grad_w = in_layout_of(w_enc, (g.t() @ x_c.to(g.dtype)).to(w_enc.dtype)) if ctx.needs_input_grad[2] else None
        grad_b_dec = -(w_enc @ g_sum) if ctx.needs_input_grad[1] else None
        if ctx.needs_input_grad[0]:
            raise RuntimeError("EncoderLinear does not propagate gradients to the SAE input")
        return None, grad_b_dec, grad_w, g_sum
