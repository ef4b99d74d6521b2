"""Data-parallel training (gloo, 2 processes) equals one process on the same global batches."""
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cytosae.sae import train_sae

KW = dict(d_in=32, arch="topk", n_latents=64, total_tokens=3072, seed=5, k=4, progress=False,
          lr_warmup_steps=2, init_b_dec="zeros", normalize_inputs=False, dead_tokens=256)


def _data():
    g = torch.Generator().manual_seed(2)
    return list((torch.randn(3072, 32, generator=g) * 2).split(500))


# data-dependent initialisation: input scale and b_dec (geometric median) from every rank's first batches
INIT_KW = {**KW, "init_b_dec": "geometric_median", "normalize_inputs": True}


def _worker(rank, world, init_file, out_dir, kw, interrupt):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        if interrupt:  # every rank stops after 1,536 tokens (all ranks together), then every rank resumes
            part = train_sae(_data(), batch_size=128, checkpoint_dir=f"{out_dir}/ddp", max_tokens_this_run=1536, **kw)
            assert part.training_summary == {"steps": 6, "tokens_seen": 1536, "finished": False}
        sae = train_sae(_data(), batch_size=128, checkpoint_dir=f"{out_dir}/ddp" if rank == 0 or interrupt else None,
                        **kw)
        if rank == 0:
            torch.save({k: v.detach() for k, v in sae.state_dict().items()}, f"{out_dir}/ddp.pt")
    finally:
        dist.barrier()  # no rank tears the group down while another still uses it
        dist.destroy_process_group()


def _spawn_retrying_an_abort(tmp_path, kw, interrupt):
    """Run the two ranks; once more if a rank died of SIGABRT. About 1 run in 20 on the loaded 2-core machine
    (never seen alone) ended with "terminate called without an active exception" in a rank; training is
    deterministic, so a second run is compared exactly like the first. Cause not found yet (see the note of
    2026-11-25); any other failure, or a second abort, fails the test."""
    import shutil

    for attempt in range(2):
        try:
            mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path), kw, interrupt), nprocs=2, join=True)
            return
        except mp.ProcessExitedException as exc:
            if attempt or exc.signal_name != "SIGABRT":
                raise
            for leftover in ("init", "ddp", "ddp.pt"):
                p = tmp_path / leftover
                shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
            import warnings

            warnings.warn(f"DDP test: a rank aborted ({exc}); ran the two ranks again")


@pytest.mark.parametrize("kw,interrupt", [(KW, False), (INIT_KW, False), (INIT_KW, True)],
                         ids=["fixed-init", "data-init", "data-init-resumed"])
def test_two_processes_equal_one(tmp_path, kw, interrupt):
    _spawn_retrying_an_abort(tmp_path, kw, interrupt)
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)
    single = train_sae(_data(), batch_size=256, **kw)  # one global batch = the two ranks' batches
    for k, v in single.state_dict().items():
        assert torch.allclose(v, ddp[k], atol=1e-5), k
    assert (tmp_path / "ddp" / "sae.safetensors").is_file()
