"""Trainer: the one owner of SAE training state.

Optimizer, learning-rate schedule, dead-latent statistics, logging, checkpoints, device, precision and
the distributed state live here; the SAE module holds only its parameters. `train_sae` (train.py) is a
thin wrapper over `Trainer(...).fit(batches)`.

Host-device synchronisation: a step waits for the device only (a) on log and checkpoint steps,
(b) once latents can be dead at all, to count them (ghost grads / AuxK pick them by data-dependent shape),
(c) in BatchTopK's exactness check of its candidate shortcut, and (d) with several processes, where all
ranks agree each step on whether every one of them still has data.
"""
from __future__ import annotations

import itertools
import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
import torch.distributed as dist

from ..allocator import keep_freed_memory, return_freed_memory
from ..devices import resolve_device
from ..distributed import rank_and_world
from .checkpoint import load_training_state, save_training_state
from .config import SAEConfig
from .data import EpochSource, prefetch, rechunk
from .init import geometric_median, unit_mean_square_scale
from .model import SAE

PRECISIONS = ("fp32", "bf16")


class TrainingDiverged(RuntimeError):
    """Loss or weights became NaN/inf; the last good checkpoint on disk is left untouched."""


def warmup_steps(cfg: SAEConfig, total_steps: int) -> int:
    """Warm-up length for a run of total_steps: lr_warmup_steps, but never more than lr_warmup_fraction of the run.

    A fixed 500 steps made a 146-step run all warm-up (held-out FVU 0.232 vs 0.052 without warm-up)."""
    return min(cfg.lr_warmup_steps, math.ceil(cfg.lr_warmup_fraction * total_steps))


def threshold_momentum(cfg: SAEConfig, total_steps: int) -> float:
    """EMA momentum of batchtopk/matryoshka's inference threshold for a run of total_steps: cfg.threshold_momentum,
    or (None) 1 - 1/w with w = 5% of the steps, 1 to 100: the threshold of the model as it ends the run, not of
    its first batches (a fixed 0.99 on a 147-step real run: held-out L0 18.3 for k=32, FVU 0.136; scaled: 32.3, 0.058)."""
    if cfg.threshold_momentum is not None:
        return cfg.threshold_momentum
    return 1.0 - 1.0 / min(100, max(1, math.ceil(0.05 * total_steps)))


def lr_factor(step: int, total_steps: int, warmup: int, decay: int) -> float:
    """Multiplier of the base lr at `step`: linear warm-up, constant, optional linear decay to 0 at the end."""
    f = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    decay = min(decay, total_steps)
    if decay > 0 and step >= total_steps - decay:
        f *= max(0.0, (total_steps - step) / decay)
    return f


def _with_encoder_transposed(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A training state written before the encoder was stored as its transpose (model.W_enc, adam.W_enc.*) in
    today's names (model.W_enc_T, adam.W_enc_T.*), so that such a run resumes."""
    out = {}
    for key, v in tensors.items():
        if key == "model.W_enc" or key.startswith("adam.W_enc."):
            key = key.replace("W_enc", "W_enc_T", 1)
            v = v.t().contiguous() if v.ndim == 2 else v
        out[key] = v
    return out


class Trainer:
    """Trains one SAE on a deterministic stream of (N, d_in) tensors; resumable; data-parallel under torch.distributed.

    total_tokens: tokens to train on (None: all of an EpochSource's epochs).
    checkpoint_dir: a training_state/ written there by the same arguments is resumed; the final SAE is saved there.
    device: "cpu", "cuda", "cuda:N" or "auto" (see cytosae.devices.resolve_device).
    precision: "fp32" or "bf16" (autocast for the forward matmuls; parameters and optimizer stay float32).
    """

    def __init__(self, cfg: SAEConfig, total_tokens: int | None = None, *, seed: int = 0, batch_size: int = 4096,
                 device: str | torch.device = "cpu", precision: str = "fp32",
                 checkpoint_dir: str | Path | None = None, checkpoint_every: int | None = None,
                 log_every: int = 50, logger: Callable[[int, dict], None] | None = None, progress: bool = True,
                 prefetch_batches: int = 2) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if checkpoint_every is not None and checkpoint_dir is None:
            raise ValueError("checkpoint_every needs checkpoint_dir")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.cfg, self.total_tokens, self.seed, self.batch_size = cfg, total_tokens, seed, batch_size
        self.device = resolve_device(device)
        if self.device.type == "cpu":
            keep_freed_memory()  # each step's 150 MB blocks reused, not mapped afresh (cytosae/allocator.py)
        self.precision, self.log_every, self.logger, self.progress = precision, log_every, logger, progress
        self.ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.checkpoint_every, self.prefetch_batches = checkpoint_every, prefetch_batches
        self.rank, self.world = rank_and_world()
        torch.manual_seed(seed)
        self.sae = SAE(cfg, seed=seed).to(self.device).train()
        # fused: one kernel over all parameters (0.41 s -> 0.06 s per step for 75 M parameters on 2 CPU cores)
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=cfg.lr, betas=cfg.adam_betas, fused=True)
        # steps (relu-l1 ghost grads) or tokens (others) since each latent last fired
        self.since_fired = torch.zeros(cfg.n_latents, dtype=torch.long, device=self.device)
        self._since_fired_bound = 0  # host-side upper bound of since_fired.max(): no latent can be dead below the limit
        self._bad = torch.zeros((), dtype=torch.bool, device=self.device)  # a non-finite loss since the last check
        self.step = self.tokens_seen = 0
        self.data_ended = False  # the batches ran out before total_tokens
        self.data_wait_s = self.compute_s = 0.0

    # ------------------------------------------------------------------ facts
    @property
    def dead_limit(self) -> int:
        return self.sae.dead_limit

    @property
    def total_steps(self) -> int:
        return math.ceil(self.total_tokens / (self.batch_size * self.world))

    def _run_args(self, epochs: int | None) -> dict:
        args = {"d_in": self.cfg.d_in, "arch": self.cfg.arch, "n_latents": self.cfg.n_latents,
                "total_tokens": self.total_tokens, "seed": self.seed, "batch_size": self.batch_size,
                "world_size": self.world, "config": self.cfg.to_dict()}
        if epochs is not None:
            args["epochs"] = epochs
        return args

    # ------------------------------------------------------------------ checkpoints
    def _state_tensors(self) -> dict[str, torch.Tensor]:
        t = {f"model.{k}": v for k, v in self.sae.state_dict().items()}
        for name, p in self.sae.named_parameters():
            for key, v in self.opt.state.get(p, {}).items():
                t[f"adam.{name}.{key}"] = v if isinstance(v, torch.Tensor) else torch.tensor(v)
        t["counters.since_fired"] = self.since_fired
        t["rng.torch"] = torch.get_rng_state()
        return t

    def _resume(self, run_args: dict) -> bool:
        if self.world > 1:
            dist.barrier()  # rank 0 may still be writing the state an earlier run in this process group left
        resumed = load_training_state(self.ckpt) if self.ckpt is not None else None  # every rank reads the same state
        if resumed is None:
            return False
        tensors, meta = resumed
        source = self.ckpt / "training_state"
        if meta.get("run_args") != run_args:
            diff = sorted(k for k in set(run_args) | set(meta.get("run_args", {}))
                          if meta.get("run_args", {}).get(k) != run_args.get(k))
            raise ValueError(f"{source} was written by a run with different arguments ({diff}); "
                             f"use another checkpoint_dir or delete it to restart")
        tensors = _with_encoder_transposed(tensors)
        model = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        missing = sorted(set(self.sae.state_dict()) - set(model))
        if missing:
            raise ValueError(f"{source}: checkpoint lacks model tensors {missing}; delete it to restart training")
        self.sae.load_state_dict(model)
        for name, p in self.sae.named_parameters():
            st = {k.split(".")[-1]: v for k, v in tensors.items() if k.startswith(f"adam.{name}.")}
            if st:  # fused Adam keeps its step counter on the parameter's device
                self.opt.state[p] = {k: v.clone().to(p.device) for k, v in st.items()}
        torch.set_rng_state(tensors["rng.torch"])
        self.since_fired = tensors["counters.since_fired"].clone().to(self.device)
        self._since_fired_bound = int(self.since_fired.max())
        self.step, self.tokens_seen = int(meta["step"]), int(meta["tokens_seen"])
        return True

    def _finite_weights(self) -> bool:
        return all(bool(torch.isfinite(p).all()) for p in self.sae.parameters())

    def _check_finite(self, where: str) -> None:
        if bool(self._bad):
            kept = f"; the last good checkpoint in {self.ckpt} is kept" if self.ckpt else ""
            raise TrainingDiverged(f"loss became NaN/inf by step {self.step} ({self.tokens_seen} tokens seen); "
                                   f"lower the learning rate or check the inputs{kept}")
        if not self._finite_weights():
            kept = f"; the last good checkpoint in {self.ckpt} is kept" if self.ckpt else ""
            raise TrainingDiverged(f"weights are NaN/inf {where} step {self.step} ({self.tokens_seen} tokens){kept}")

    def checkpoint(self, run_args: dict) -> None:
        if self.ckpt is None or self.rank != 0:
            return
        self._check_finite("at")
        save_training_state(self.ckpt, self._state_tensors(),
                            {"step": self.step, "tokens_seen": self.tokens_seen, "run_args": run_args})
        # an SAE saved mid-run says how far it got, so evaluate/stats/explore never take it for a finished one
        self.sae.save(self.ckpt, training={"finished": self.finished, "step": self.step,
                                           "total_steps": self.total_steps, "tokens_seen": self.tokens_seen,
                                           "total_tokens": self.total_tokens, "data_ended": self.data_ended})

    @property
    def finished(self) -> bool:
        """Every token asked for was trained on (several ranks may leave less than one global batch unread)."""
        short = self.total_tokens - self.tokens_seen
        return short <= 0 or (self.data_ended and self.world > 1 and short < self.batch_size * self.world)

    # ------------------------------------------------------------------ data
    @torch.no_grad()
    def _initialise(self, sample: torch.Tensor) -> None:
        """input_scale and b_dec from the first batches of the *global* stream (every rank's first batches)."""
        sae, cfg = self.sae, self.cfg
        if cfg.normalize_inputs:
            sae.input_scale.fill_(unit_mean_square_scale(sample))
        xs = sample * sae.input_scale.cpu()
        if cfg.init_b_dec == "geometric_median":
            sae.b_dec.copy_(geometric_median(xs[:4096]))
        elif cfg.init_b_dec == "mean":
            sae.b_dec.copy_(xs.mean(0))
        if self.world > 1:  # identical on every rank already; the broadcast makes it bitwise so
            for t in (sae.input_scale, sae.b_dec):
                dist.broadcast(t, 0)

    def _batches(self, data, fresh: bool) -> Iterator[torch.Tensor]:
        """This rank's (batch_size, d_in) CPU batches, from the token where the run stands on."""
        if isinstance(data, EpochSource):
            raw, skip = data.stream(self.tokens_seen)
        else:
            raw, skip = data, self.tokens_seen
        # one global stream of chunks; rank r trains on chunks j with j % world == r
        chunks = rechunk(raw, self.batch_size, d_in=self.cfg.d_in, skip_tokens=skip)
        if fresh:
            first = list(itertools.islice(chunks, self.cfg.init_batches * self.world))
            if not first:
                raise ValueError("train_sae: the batch iterator is empty")
            self._initialise(torch.cat(first))
            chunks = itertools.chain(first, chunks)
        if self.world > 1:
            chunks = itertools.islice(chunks, self.rank, None, self.world)
        if not self.prefetch_batches:
            return iter(chunks)
        return prefetch(chunks, self.prefetch_batches, pin=self.device.type == "cuda")

    def _next(self, stream: Iterator[torch.Tensor]) -> tuple[torch.Tensor | None, int]:
        """(this rank's next batch on the device or None, tokens in this step over all ranks)."""
        t0 = time.perf_counter()
        x = next(stream, None)
        if x is not None and self.world == 1 and x.shape[0] > self.total_tokens - self.tokens_seen:
            x = x[: self.total_tokens - self.tokens_seen]  # train on exactly total_tokens
        self.data_wait_s += time.perf_counter() - t0
        n_tok = 0 if x is None else x.shape[0]
        if self.world > 1:  # stop together when any rank runs out, or the gradient all_reduce would wait forever
            comm = self.device if dist.get_backend() == "nccl" else torch.device("cpu")
            have = torch.tensor([0 if x is None else 1, n_tok], device=comm)
            dist.all_reduce(have)
            if int(have[0]) < self.world:
                return None, 0
            n_tok = int(have[1])
        if x is None:
            return None, 0
        return x.to(self.device, non_blocking=True), n_tok

    # ------------------------------------------------------------------ one step
    def _dead_mask(self) -> torch.Tensor | None:
        if self._since_fired_bound <= self.dead_limit:
            return None  # no latent can be dead yet: nothing to count, no wait for the device
        return self.since_fired > self.dead_limit

    def _autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def _allreduce(self, fired: torch.Tensor) -> torch.Tensor:
        for p in self.sae.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
            p.grad.div_(self.world)
        f = fired.to(torch.uint8)
        dist.all_reduce(f, op=dist.ReduceOp.MAX)
        return f.bool()

    def train_step(self, x: torch.Tensor, n_tok: int):
        """One optimizer step on x (already on the device); n_tok = tokens of this step over all ranks."""
        self.opt.zero_grad(set_to_none=True)
        with self._autocast():
            out = self.sae(x, dead_mask=self._dead_mask(),
                           threshold_momentum=threshold_momentum(self.cfg, self.total_steps))
        self._bad |= ~torch.isfinite(out.loss.detach())  # checked on log and checkpoint steps
        out.loss.backward()
        fired = self._allreduce(out.fired) if self.world > 1 else out.fired
        self.sae.remove_parallel_decoder_grad()
        lr_now = self.cfg.lr * lr_factor(self.step, self.total_steps, warmup_steps(self.cfg, self.total_steps),
                                         self.cfg.lr_decay_steps)
        for group in self.opt.param_groups:  # the schedule is a pure function of the step: nothing to restore
            group["lr"] = lr_now
        self.opt.step()
        self.sae.normalize_decoder()
        inc = n_tok if self.sae.counts_dead_in_tokens else 1
        self.since_fired += inc
        self.since_fired.masked_fill_(fired, 0)
        self._since_fired_bound += inc
        self.step += 1
        self.tokens_seen += n_tok
        return out, lr_now

    def _log(self, out, lr_now: float, run_tokens: int, t_start: float, bar) -> None:
        self._check_finite("after")
        # a host copy we pay for anyway: it also tightens the bound that lets steps skip the dead-latent count
        self._since_fired_bound = int(self.since_fired.max())
        steps = max(self.step - self._log_step0, 1)
        metrics = {"loss": float(out.loss.detach()), "mse": float(out.mse), "fvu": float(out.fvu), "l0": float(out.l0),
                   "dead_fraction": float((self.since_fired > self.dead_limit).float().mean()), "lr": lr_now,
                   "tokens_per_s": run_tokens / max(time.perf_counter() - t_start, 1e-9), "tokens": self.tokens_seen,
                   "data_wait_s_per_step": (self.data_wait_s - self._log_wait0) / steps}
        self._log_step0, self._log_wait0 = self.step, self.data_wait_s
        if bar is not None:
            bar.set_postfix(fvu=f"{metrics['fvu']:.3f}", l0=f"{metrics['l0']:.1f}",
                            dead=f"{metrics['dead_fraction']:.3f}", refresh=False)
        if self.logger is not None and self.rank == 0:
            self.logger(self.step, metrics)

    # ------------------------------------------------------------------ the loop
    def fit(self, data: Iterable[torch.Tensor] | EpochSource, max_tokens_this_run: int | None = None) -> SAE:
        """Train on `data` (an iterable of (N, d_in) tensors, or an EpochSource) until total_tokens; returns the SAE."""
        epochs = data.epochs if isinstance(data, EpochSource) else None
        if isinstance(data, EpochSource):
            if self.total_tokens is None:
                self.total_tokens = data.total_tokens
            if self.total_tokens > data.total_tokens:
                raise ValueError(f"asked for {self.total_tokens:,} tokens but {data.epochs} epoch(s) of the data hold "
                                 f"{data.total_tokens:,}; train more epochs or on fewer tokens")
        if self.total_tokens is None or self.total_tokens <= 0:
            raise ValueError(f"total_tokens must be positive, got {self.total_tokens}")
        if self.device.type == "cpu":
            keep_freed_memory()  # until this fit ends (a Trainer may fit again, after return_freed_memory)
        run_args = self._run_args(epochs)
        fresh = not self._resume(run_args)
        stream = self._batches(data, fresh)
        bar = None
        if self.progress and self.rank == 0:
            from tqdm import tqdm
            bar = tqdm(total=self.total_tokens, initial=self.tokens_seen, unit="tok", unit_scale=True,
                       desc=f"SAE {self.cfg.arch}")
        run_tokens, t_start, last_ckpt = 0, time.perf_counter(), self.tokens_seen
        self._log_step0, self._log_wait0 = self.step, self.data_wait_s
        try:
            while self.tokens_seen < self.total_tokens:
                x, n_tok = self._next(stream)
                if x is None:
                    self.data_ended = True
                    break
                out, lr_now = self.train_step(x, n_tok)
                run_tokens += n_tok
                if self.step % self.log_every == 0 or bar is not None and self.step == 1:
                    self._log(out, lr_now, run_tokens, t_start, bar)
                if bar is not None:
                    bar.update(n_tok)
                if self.checkpoint_every and self.tokens_seen - last_ckpt >= self.checkpoint_every:
                    self.checkpoint(run_args)
                    last_ckpt = self.tokens_seen
                if max_tokens_this_run is not None and run_tokens >= max_tokens_this_run:
                    break
        finally:
            if bar is not None:
                bar.close()
            if hasattr(stream, "close"):
                stream.close()  # stops the prefetch thread
            return_freed_memory()  # the next step of a study runs in this process (cytosae/allocator.py)
        self.compute_s = time.perf_counter() - t_start - self.data_wait_s
        self._check_finite("at the end,")
        self.checkpoint(run_args)
        if self.world > 1:  # leave together: a rank that exits while rank 0 still writes can abort in gloo
            dist.barrier()
        self._check_ran_out(max_tokens_this_run, run_tokens)
        self.sae.training_summary = {"steps": self.step, "tokens_seen": self.tokens_seen, "finished": self.finished}
        return self.sae.eval()

    def _check_ran_out(self, max_tokens_this_run: int | None, run_tokens: int) -> None:
        if max_tokens_this_run is not None and run_tokens >= max_tokens_this_run:
            return
        short = self.total_tokens - self.tokens_seen
        # with several ranks the last round may leave fewer than one global batch unread
        if short > 0 and (self.world == 1 or short >= self.batch_size * self.world):
            raise ValueError(f"the data ran out after {self.tokens_seen:,} of the {self.total_tokens:,} tokens asked "
                             f"for (saved so far: {self.ckpt or 'nothing, no checkpoint_dir'}); ask for fewer tokens "
                             f"or train several epochs")
