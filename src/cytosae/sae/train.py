"""train_sae: the training loop shared by all architectures (resumable, NaN-safe, optionally data-parallel)."""
from __future__ import annotations

import itertools
import math
import time
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.distributed as dist

from .checkpoint import load_training_state, save_training_state
from .config import SAEConfig
from .data import rechunk
from .init import geometric_median, unit_mean_square_scale
from .model import SAE

DEFAULT_LR = {"relu-l1": 4e-4, "topk": 4e-4, "batchtopk": 4e-4, "jumprelu": 7e-5, "matryoshka": 4e-4}


class TrainingDiverged(RuntimeError):
    """Loss or weights became NaN/inf; the last good checkpoint on disk is left untouched."""


def _lr_factor(step: int, total_steps: int, warmup: int, decay: int) -> float:
    f = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    if decay > 0 and step >= total_steps - decay:
        f *= max(0.0, (total_steps - step) / decay)
    return f


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _state_tensors(sae: SAE, opt: torch.optim.Adam, counters: torch.Tensor) -> dict[str, torch.Tensor]:
    t = {f"model.{k}": v for k, v in sae.state_dict().items()}
    for name, p in sae.named_parameters():
        st = opt.state.get(p, {})
        for key, v in st.items():
            t[f"adam.{name}.{key}"] = v if isinstance(v, torch.Tensor) else torch.tensor(v)
    t["counters.since_fired"] = counters
    t["rng.torch"] = torch.get_rng_state()
    return t


def _restore(sae: SAE, opt: torch.optim.Adam, tensors: dict[str, torch.Tensor], source: str) -> torch.Tensor:
    model = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    missing = sorted(set(sae.state_dict()) - set(model))
    if missing:
        raise ValueError(f"{source}: checkpoint lacks model tensors {missing}; delete it to restart training")
    sae.load_state_dict(model)
    for name, p in sae.named_parameters():
        st = {k.split(".")[-1]: v for k, v in tensors.items() if k.startswith(f"adam.{name}.")}
        if st:
            opt.state[p] = {k: v.clone() for k, v in st.items()}
    torch.set_rng_state(tensors["rng.torch"])
    return tensors["counters.since_fired"].clone()


def _finite_weights(sae: SAE) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in sae.parameters())


def train_sae(
    batches: Iterable[torch.Tensor],
    d_in: int,
    arch: str,
    n_latents: int,
    total_tokens: int,
    seed: int = 0,
    batch_size: int = 4096,
    lr: float | None = None,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int | None = None,
    log_every: int = 50,
    logger: Callable[[int, dict], None] | None = None,
    max_tokens_this_run: int | None = None,
    progress: bool = True,
    threads: int | None = None,
    **arch_options,
) -> SAE:
    """Train an SAE on a deterministic stream of (batch, d_in) float tensors.

    total_tokens: tokens to train on (not images; x257 per image when training on all tokens).
    checkpoint_dir: if it holds a training_state/ from the same arguments, training resumes there,
      skipping the tokens already consumed; the final SAE is written there too (sae.safetensors + config.json).
    checkpoint_every: tokens between checkpoints (needs checkpoint_dir).
    max_tokens_this_run: stop (after checkpointing) once this run has trained on this many tokens.
    logger: called as logger(step, metrics) every log_every steps.
    arch_options: any SAEConfig field (k, l1_coeff, sparse_kernels, ...).
    """
    if threads:
        torch.set_num_threads(threads)
    cfg = SAEConfig(arch=arch, d_in=d_in, n_latents=n_latents, lr=lr if lr is not None else DEFAULT_LR.get(arch, 4e-4),
                    **arch_options)
    if total_tokens <= 0:
        raise ValueError(f"total_tokens must be positive, got {total_tokens}")
    if checkpoint_every is not None and checkpoint_dir is None:
        raise ValueError("checkpoint_every needs checkpoint_dir")
    rank, world = _world()
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    torch.manual_seed(seed)
    sae = SAE(cfg, seed=seed).train()
    # fused: one kernel over all parameters (0.41 s -> 0.06 s per step for 75 M parameters on 2 CPU cores)
    opt = torch.optim.Adam(sae.parameters(), lr=cfg.lr, betas=cfg.adam_betas, fused=True)
    total_steps = math.ceil(total_tokens / (batch_size * world))
    since_fired = torch.zeros(n_latents, dtype=torch.long)  # steps (relu-l1) or tokens (others) since last firing
    step = tokens_seen = 0
    run_args = {"d_in": d_in, "arch": arch, "n_latents": n_latents, "total_tokens": total_tokens, "seed": seed,
                "batch_size": batch_size, "world_size": world, "config": cfg.to_dict()}

    resumed = load_training_state(ckpt) if ckpt is not None else None  # every rank reads the same state
    if resumed is not None:
        tensors, meta = resumed
        if meta.get("run_args") != run_args:
            diff = sorted(k for k in run_args if meta.get("run_args", {}).get(k) != run_args[k])
            raise ValueError(f"{ckpt / 'training_state'} was written by a run with different arguments ({diff}); "
                             f"use another checkpoint_dir or delete it to restart")
        since_fired = _restore(sae, opt, tensors, str(ckpt / "training_state"))
        step, tokens_seen = int(meta["step"]), int(meta["tokens_seen"])

    data_ended = False  # the batches ran out before total_tokens: no rerun can train further

    def checkpoint() -> None:
        if ckpt is None or rank != 0:
            return
        if not _finite_weights(sae):
            raise TrainingDiverged(f"weights are NaN/inf at step {step} ({tokens_seen} tokens); "
                                   f"the last good checkpoint in {ckpt} is kept")
        save_training_state(ckpt, _state_tensors(sae, opt, since_fired),
                            {"step": step, "tokens_seen": tokens_seen, "run_args": run_args})
        # "finished": nothing is left to train (the SAE from a killed or paused run is not, and says how far it got)
        sae.save(ckpt, training={"finished": tokens_seen >= total_tokens or data_ended, "step": step,
                                 "total_steps": total_steps, "tokens_seen": tokens_seen, "total_tokens": total_tokens,
                                 "data_ended": data_ended})

    # Each rank consumes the chunks j with j % world == rank: disjoint slices of one global stream.
    stream = rechunk(batches, batch_size, d_in=d_in, skip_tokens=tokens_seen)
    if world > 1:
        stream = itertools.islice(stream, rank, None, world)
    if resumed is None:
        first = list(itertools.islice(stream, cfg.init_batches))
        if not first:
            raise ValueError("train_sae: the batch iterator is empty")
        sample = torch.cat(first)
        with torch.no_grad():
            if cfg.normalize_inputs:
                sae.input_scale.fill_(unit_mean_square_scale(sample))
            xs = sample * sae.input_scale
            if cfg.init_b_dec == "geometric_median":
                sae.b_dec.copy_(geometric_median(xs[:4096]))
            elif cfg.init_b_dec == "mean":
                sae.b_dec.copy_(xs.mean(0))
            if world > 1:
                for t in (sae.input_scale, sae.b_dec):
                    dist.broadcast(t, 0)
        stream = itertools.chain(first, stream)

    bar = None
    if progress and rank == 0:
        from tqdm import tqdm
        bar = tqdm(total=total_tokens, initial=tokens_seen, unit="tok", unit_scale=True, desc=f"SAE {arch}")
    run_tokens, t0, last_ckpt = 0, time.perf_counter(), tokens_seen
    try:
        stream = iter(stream)
        while tokens_seen < total_tokens:
            x = next(stream, None)
            if world > 1:  # stop together when any rank runs out, or all_reduce would wait forever
                have = torch.tensor([0 if x is None else 1])
                dist.all_reduce(have, op=dist.ReduceOp.MIN)
                if not int(have):
                    data_ended = True
                    break
            if x is None:
                data_ended = True
                break
            if world == 1 and x.shape[0] > total_tokens - tokens_seen:
                x = x[: total_tokens - tokens_seen]  # train on exactly total_tokens
            topk_family = arch in ("topk", "batchtopk", "matryoshka")
            sae._dead_mask = (since_fired > (cfg.dead_tokens if topk_family else cfg.dead_feature_window))
            opt.zero_grad(set_to_none=True)
            out = sae(x)
            if not bool(torch.isfinite(out.loss)):
                raise TrainingDiverged(f"loss is {float(out.loss.detach())} at step {step} ({tokens_seen} tokens seen); "
                                       f"lower the learning rate or check the inputs; the last good checkpoint "
                                       f"in {ckpt} is kept" if ckpt else f"loss is {float(out.loss.detach())} at step {step} "
                                       f"({tokens_seen} tokens seen); lower the learning rate or check the inputs")
            out.loss.backward()
            fired = out.fired
            n_tok = x.shape[0]
            if world > 1:
                for p in sae.parameters():
                    if p.grad is not None:
                        dist.all_reduce(p.grad)
                        p.grad.div_(world)
                f = fired.to(torch.uint8)
                dist.all_reduce(f, op=dist.ReduceOp.MAX)
                fired = f.bool()
                nt = torch.tensor([n_tok])
                dist.all_reduce(nt)
                n_tok = int(nt)
            sae.remove_parallel_decoder_grad()
            lr_now = cfg.lr * _lr_factor(step, total_steps, cfg.lr_warmup_steps, cfg.lr_decay_steps)
            for group in opt.param_groups:  # the schedule is a pure function of the step: nothing to restore
                group["lr"] = lr_now
            opt.step()
            sae.normalize_decoder()
            since_fired += n_tok if topk_family or arch == "jumprelu" else 1
            since_fired[fired] = 0
            step += 1
            tokens_seen += n_tok
            run_tokens += n_tok
            if step % log_every == 0 or bar is not None and step == 1:
                if not _finite_weights(sae):
                    raise TrainingDiverged(f"weights are NaN/inf after step {step} ({tokens_seen} tokens seen)")
                dead_limit = cfg.dead_tokens if (topk_family or arch == "jumprelu") else cfg.dead_feature_window
                metrics = {"loss": float(out.loss.detach()), "mse": float(out.mse), "fvu": float(out.fvu), "l0": float(out.l0),
                           "dead_fraction": float((since_fired > dead_limit).float().mean()),
                           "lr": lr_now,
                           "tokens_per_s": run_tokens / max(time.perf_counter() - t0, 1e-9), "tokens": tokens_seen}
                if bar is not None:
                    bar.set_postfix(fvu=f"{metrics['fvu']:.3f}", l0=f"{metrics['l0']:.1f}",
                                    dead=f"{metrics['dead_fraction']:.3f}", refresh=False)
                if logger is not None and rank == 0:
                    logger(step, metrics)
            if bar is not None:
                bar.update(n_tok)
            if checkpoint_every and tokens_seen - last_ckpt >= checkpoint_every:
                checkpoint()
                last_ckpt = tokens_seen
            if max_tokens_this_run is not None and run_tokens >= max_tokens_this_run:
                break
    finally:
        if bar is not None:
            bar.close()
    if not _finite_weights(sae):
        raise TrainingDiverged(f"weights are NaN/inf at the end ({step} steps, {tokens_seen} tokens seen)")
    checkpoint()
    sae._dead_mask = None
    sae.training_summary = {"steps": step, "tokens_seen": tokens_seen, "finished": tokens_seen >= total_tokens}
    return sae.eval()
