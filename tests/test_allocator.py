"""cytosae.allocator: a CPU training step reuses the blocks the step before freed, instead of mapping them afresh
(counted in page faults, in a fresh process per mode: the setting is process-wide)."""
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import resource, torch
    from cytosae.sae import SAEConfig
    from cytosae.sae.trainer import Trainer
    torch.set_num_threads(1)
    # 512 x 32,768 float pre-activations: 64 MB blocks, above glibc's largest mmap threshold (32 MB)
    tr = Trainer(SAEConfig(d_in=64, n_latents=32768, arch="topk", k=8), total_tokens=10**9, batch_size=512,
                 progress=False)
    from cytosae.allocator import keep_freed_memory
    x = torch.randn(512, 64)
    faults = []
    for _ in range(10):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        tr.train_step(x, 512)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(keep_freed_memory(), min(faults[-3:]))
""")


def _run(opt_out: bool) -> tuple[str, int]:
    env = {**os.environ, "CYTOSAE_RETURN_FREED_MEMORY": "1" if opt_out else "0"}
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, check=True)
    kept, faults = out.stdout.split()
    return kept, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_training_steps_reuse_freed_blocks_unless_opted_out():
    block_pages = (64 << 20) // 4096
    kept, faults_kept = _run(opt_out=False)
    off, faults_default = _run(opt_out=True)
    assert (kept, off) == ("True", "False")
    assert faults_default > block_pages, faults_default  # glibc maps each freed 64 MB block in again, every step
    assert faults_kept < 0.05 * faults_default, (faults_kept, faults_default)


AFTER_FIT = textwrap.dedent("""
    import resource, torch
    from cytosae import allocator
    from cytosae.sae import SAEConfig
    from cytosae.sae.trainer import Trainer
    torch.set_num_threads(1)
    tr = Trainer(SAEConfig(d_in=64, n_latents=32768, arch="topk", k=8), total_tokens=2048, batch_size=512,
                 progress=False)
    tr.fit([torch.randn(512, 64) for _ in range(4)])
    faults = []
    for _ in range(4):  # a 64 MB block allocated, written and freed, as an encoding pass's batches are
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.ones(16 << 20)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(allocator._state["kept"], min(faults))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_fit_gives_glibc_its_own_policy_back_for_the_steps_after_it():
    """After training, a block is mapped afresh and unmapped again (glibc's default), so a later pass of other block
    sizes in the same process (`cytosae run`) cannot grow a heap fragmented around the training's blocks."""
    env = {**os.environ, "CYTOSAE_RETURN_FREED_MEMORY": "0"}
    out = subprocess.run([sys.executable, "-c", AFTER_FIT], capture_output=True, text=True, env=env, check=True)
    kept, faults = out.stdout.split()
    assert kept == "False" and int(faults) > 0.9 * (64 << 20) // 4096, out.stdout
