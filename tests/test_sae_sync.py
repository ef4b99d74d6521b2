"""A training step never waits for the device (issue #9): checked on the CPU by watching the aten ops it runs.

On a GPU, reading a value back (`.item()`, `bool(t)`, `int(t)`) or an op whose output size depends on the data
(`nonzero`, boolean indexing, `bincount`, `unique`) makes the host wait for every queued kernel. The CPU runs the
same ops, so a dispatch mode sees them here. Steps take the branch-free path a GPU takes
(`model.HOST_BRANCH_DEVICES` emptied), which must also give the CPU path's numbers.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import cytosae.sae.model as model_mod
from cytosae.sae import SAE, SAEConfig, Trainer
from cytosae.sae.kernels import sparse_decode

SYNCING = {"_local_scalar_dense", "nonzero", "masked_select", "bincount", "_unique2", "unique_dim",
           "unique_consecutive", "repeat_interleave.Tensor"}


class SyncWatch(TorchDispatchMode):
    """Records every op that would make the host wait for a GPU."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name().split("::")[1]
        bool_index = name.startswith("index") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else ()) or ())
        if name.split(".")[0] in SYNCING or name in SYNCING or bool_index:
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


ARCHS = {"relu-l1": {"use_ghost_grads": False}, "topk": {"k": 8}, "batchtopk": {"k": 8}, "matryoshka": {"k": 8},
         "jumprelu": {}}


def _trainer(arch: str) -> tuple[Trainer, list[torch.Tensor]]:
    torch.manual_seed(0)
    cfg = SAEConfig(arch=arch, d_in=32, n_latents=128, **ARCHS[arch])
    tr = Trainer(cfg, 10**6, batch_size=256, device="cpu", progress=False, log_every=10**9)
    data = [torch.randn(256, 32, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    tr._initialise(torch.cat(data))
    return tr, data


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("dead", [False, True], ids=["none-dead", "some-may-be-dead"])
def test_a_training_step_has_no_host_device_sync(arch, dead, monkeypatch):
    monkeypatch.setattr(model_mod, "HOST_BRANCH_DEVICES", set())
    tr, data = _trainer(arch)
    if dead:  # past the bound: the trainer hands the model a dead-latent mask every step
        tr.since_fired[::3] = tr.dead_limit + 1
        tr._since_fired_bound = tr.dead_limit + 1
    tr.train_step(data[0], 256)  # the first step may set things up
    watch = SyncWatch()
    with watch:
        out, _ = tr.train_step(data[1], 256)
    assert watch.seen == [], f"{arch}: ops that wait for the device in a step: {sorted(set(watch.seen))}"
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "matryoshka"])
@pytest.mark.parametrize("n_dead", [0, 5, 128])
def test_branch_free_step_equals_the_cpu_step(arch, n_dead, monkeypatch):
    """Same loss, AuxK term and gradients whichever form the step takes (AuxK with 0, some and all latents dead)."""
    torch.manual_seed(1)
    sae = SAE(SAEConfig(arch=arch, d_in=32, n_latents=128, k=8, aux_k=16)).train()
    x = torch.randn(256, 32)
    dead = torch.zeros(128, dtype=torch.bool)
    dead[torch.randperm(128)[:n_dead]] = True

    def step():
        sae.zero_grad(set_to_none=True)
        out = sae(x, dead_mask=dead)
        out.loss.backward()
        return out, {k: p.grad.clone() for k, p in sae.named_parameters() if p.grad is not None}

    host_out, host_grads = step()
    monkeypatch.setattr(model_mod, "HOST_BRANCH_DEVICES", set())
    free_out, free_grads = step()
    assert (float(host_out.aux) > 0) == (n_dead > 0)
    torch.testing.assert_close(free_out.loss, host_out.loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(free_out.aux, host_out.aux, rtol=1e-6, atol=1e-7)
    assert free_grads.keys() == host_grads.keys()
    for k in host_grads:
        torch.testing.assert_close(free_grads[k], host_grads[k], rtol=1e-5, atol=1e-6, msg=k)


def test_sparse_decode_with_empty_rows_equals_the_dense_product():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(50, 6, generator=g)
    rows = torch.tensor([1, 1, 1, 3, 3, 4])  # rows 0, 2, 5 and 6 have no pairs
    cols = torch.tensor([0, 7, 49, 2, 3, 10])
    vals = torch.rand(6, generator=g)
    z = torch.zeros(7, 50).index_put((rows, cols), vals)
    torch.testing.assert_close(sparse_decode(rows, cols, vals, w, 7), z @ w)
