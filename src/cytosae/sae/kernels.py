"""Sparse kernels for the TopK family: only the selected latents cost anything.

The encoder pre-activations must be computed densely (to pick the top k), but
the backward pass through the encoder and the whole decoder only involve the
M = N*k selected (token, latent) pairs. Dense autograd would instead run two
more (N, n_latents) x (n_latents, d) matmuls and materialise (N, n) gradients.

Every tensor is created on its inputs' device. Under bf16 autocast the pre-activations (and so the
incoming gradients) are bf16; gradients are accumulated in the parameters' own dtype (float32).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

def topk_rows(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`pre.topk(k, dim=1)` (values descending, their columns) of an (N, n) matrix, through blocks on the CPU: a row's
    k largest values all lie in the k blocks of largest maximum (any other block has k blocks of larger maxima
    beside it), so one pass of block maxima, a top-k over them and a top-k over those k blocks replace the top-k
    over all n (202 vs 460 ms at 4,112 x 49,152, k = 32, one thread). Equal values where several are tied may come
    in another order, as torch.topk's own order among ties is unspecified. On a GPU, and where the blocks would not
    cut the work (n < 4k blocks of 32, or n not a multiple of the block), torch.topk itself."""
    n_rows, n = pre.shape
    block = next((b for b in (64, 32) if n % b == 0 and n // b >= 4 * k), None)
    if pre.device.type != "cpu" or block is None:
        return pre.topk(k, dim=1)
    blocks = pre.view(n_rows, n // block, block)
    top_blocks = blocks.amax(2).topk(k, dim=1).indices  # (N, k)
    candidates = blocks.gather(1, top_blocks[:, :, None].expand(n_rows, k, block)).view(n_rows, k * block)
    vals, at = candidates.topk(k, dim=1)
    return vals, top_blocks.gather(1, at // block) * block + at % block


def positive_counts(z: torch.Tensor) -> torch.Tensor:
    """(n,) float64: how many rows of `z` (N, n), activations >= 0, are > 0 in each column. sign() and a float32
    sum, exact while N < 2^24: `(z > 0).sum(0)` widens the bools to an (N, n) int64 copy first, three times
    as long (a 400 MB batch of 8 images x 49,152 latents, one thread)."""
    rows = z.shape[0]
    if rows >= 2 ** 24:
        return sum(positive_counts(z[i:i + 2 ** 23]) for i in range(0, rows, 2 ** 23))
    return torch.sign(z).sum(0).double()


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
