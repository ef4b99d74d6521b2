"""The SAE: five architectures behind one interface (encode, decode, forward, save, load).

Parameters live in the *normalised* space (x * input_scale); encode() takes raw
store units and decode() returns raw units, so users never see the scale.
Layout follows CytoSAE: W_enc (d_in, n_latents), W_dec (n_latents, d_in), unit-norm decoder rows.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from safetensors.torch import save as st_save

from .config import FORMAT_VERSION, SAEConfig
from .kernels import EncoderLinear, JumpReLUFn, SparseEncoderGather, StepFn, sparse_decode

TOPK_FAMILY = ("topk", "batchtopk", "matryoshka")
WEIGHTS_FILE = "sae.safetensors"
# Devices where a training step may branch on a value it computed. On the CPU that is free and lets a step skip
# work (no dead latent: no AuxK pass; BatchTopK from per-token candidates, checked). On a GPU reading a value back
# stalls the queue of kernels every step, so the same results are computed branch-free there (tests/test_sae_sync.py).
HOST_BRANCH_DEVICES = {"cpu"}


def _host_branch(t: torch.Tensor) -> bool:
    return t.device.type in HOST_BRANCH_DEVICES


class UnfinishedSAE(ValueError):
    """The SAE was written at an intermediate checkpoint of a training run that has not finished."""


@dataclass
class SAEOutput:
    """Result of SAE.forward on raw inputs. Loss terms are in normalised units."""
    recon: torch.Tensor             # (N, d_in), raw units
    loss: torch.Tensor              # scalar total training loss
    mse: torch.Tensor               # reconstruction term as optimised (see docs/sae.md per architecture)
    sparsity: torch.Tensor          # l1 (relu-l1) or l0 (jumprelu) penalty term, already multiplied by its coefficient
    aux: torch.Tensor               # ghost-grad (relu-l1) or AuxK (topk family) term, weighted
    fvu: torch.Tensor               # ||x - x_hat||^2 / ||x - mean(x)||^2 over the batch (detached)
    fired: torch.Tensor             # (n_latents,) bool: latent fired on this batch
    _dense: torch.Tensor | None = None
    _sparse: tuple | None = None    # (rows, cols, vals, n_rows)
    _l0: torch.Tensor | None = None

    @property
    def l0(self) -> torch.Tensor:
        """Mean active latents per token (detached). Counted on first use: counting 201 M dense activations
        costs ~0.6 s, and training reads it only every log_every steps."""
        if self._l0 is None:
            with torch.no_grad():
                self._l0 = torch.count_nonzero(self._dense).float() / self._dense.shape[0]
        return self._l0

    @property
    def latents(self) -> torch.Tensor:
        """(N, n_latents) activations; built on demand from the sparse form for the TopK family."""
        if self._dense is None:
            rows, cols, vals, n_rows, n = self._sparse
            z = torch.zeros(n_rows, n, dtype=vals.dtype, device=vals.device)
            z[rows, cols] = vals
            self._dense = z
        return self._dense


class SAE(nn.Module):
    def __init__(self, cfg: SAEConfig, seed: int | None = 0) -> None:
        super().__init__()
        self.cfg = cfg
        self.training_progress: dict | None = None  # set by load(): how far the run that saved it got
        d, n = cfg.d_in, cfg.n_latents
        gen = torch.Generator().manual_seed(seed if seed is not None else 0)
        # HugoFry/CytoSAE init: kaiming-uniform encoder and decoder, decoder rows scaled to unit norm.
        w_dec = torch.empty(n, d)
        w_enc = torch.empty(d, n)
        bound_dec = 1.0 / math.sqrt(d)
        w_dec.uniform_(-bound_dec, bound_dec, generator=gen)
        w_dec /= w_dec.norm(dim=1, keepdim=True)
        if cfg.arch == "relu-l1":
            w_enc.uniform_(-1.0 / math.sqrt(n), 1.0 / math.sqrt(n), generator=gen)
            w_enc.mul_(math.sqrt(n / d))  # kaiming-uniform on fan_in = d_in
        else:
            w_enc.copy_(w_dec.t())  # Gao et al.: encoder initialised as the decoder transpose
        self.W_enc = nn.Parameter(w_enc)
        self.b_enc = nn.Parameter(torch.zeros(n))
        self.W_dec = nn.Parameter(w_dec)
        self.b_dec = nn.Parameter(torch.zeros(d))
        self.register_buffer("input_scale", torch.ones(()))
        if cfg.arch == "jumprelu":
            self.log_threshold = nn.Parameter(torch.full((n,), math.log(cfg.jumprelu_init_threshold)))
        if cfg.arch in ("batchtopk", "matryoshka"):
            # running estimate of the smallest activation BatchTopK keeps: the inference (JumpReLU) threshold
            self.register_buffer("threshold", torch.zeros(()))

    # ------------------------------------------------------------------ raw-unit interface
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(N, d_in) raw store units -> (N, n_latents) latent activations (inference semantics)."""
        self._check_input(x)
        pre = self._pre(x.float() * self.input_scale)
        arch = self.cfg.arch
        if arch == "relu-l1":
            return F.relu(pre)
        if arch == "topk":
            vals, idx = pre.topk(self.cfg.k, dim=1)
            return torch.zeros_like(pre).scatter_(1, idx, F.relu(vals))
        if arch == "jumprelu":
            return pre * (pre > self.log_threshold.exp())
        if self.training:  # batchtopk / matryoshka during training: top k*N over the batch
            return self._batch_topk_dense(pre)
        return pre * (pre > self.threshold)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(N, n_latents) -> (N, d_in) reconstruction in raw store units."""
        return (z @ self.W_dec + self.b_dec) / self.input_scale

    def forward(self, x: torch.Tensor, dead_mask: torch.Tensor | None = None,
                threshold_momentum: float | None = None) -> SAEOutput:
        """Reconstruct raw inputs and compute the training loss terms.

        dead_mask: (n_latents,) bool, the latents the trainer counts as dead; they get the ghost-grad
        (relu-l1) or AuxK (topk family) term in training mode. The model keeps no training statistics.
        threshold_momentum: the trainer's run-scaled EMA momentum for batchtopk/matryoshka's inference threshold
        (default: cfg.threshold_momentum, or 0.99 when that is None).
        """
        self._check_input(x)
        xn = x.float() * self.input_scale
        if threshold_momentum is None:
            threshold_momentum = 0.99 if self.cfg.threshold_momentum is None else self.cfg.threshold_momentum
        out = self._forward_normalised(xn, dead_mask, threshold_momentum)
        out.recon = out.recon / self.input_scale
        return out

    def loss(self, x: torch.Tensor, dead_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward(x, dead_mask).loss

    # ------------------------------------------------------------------ internals
    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 2 or x.shape[1] != self.cfg.d_in:
            raise ValueError(f"SAE expects (N, {self.cfg.d_in}) inputs, got shape {tuple(x.shape)}")

    def _pre(self, xn: torch.Tensor) -> torch.Tensor:
        if xn.requires_grad or not torch.is_grad_enabled():
            return torch.addmm(self.b_enc, xn - self.b_dec, self.W_enc)
        return EncoderLinear.apply(xn, self.b_dec, self.W_enc, self.b_enc)

    def _batch_topk_dense(self, pre: torch.Tensor) -> torch.Tensor:
        flat = F.relu(pre).flatten()
        vals, idx = flat.topk(min(self.cfg.k * pre.shape[0], flat.numel()))
        return torch.zeros_like(flat).scatter_(0, idx, vals).view_as(pre)

    def _forward_normalised(self, x: torch.Tensor, dead: torch.Tensor | None, momentum: float) -> SAEOutput:
        arch = self.cfg.arch
        if dead is not None and (dead.dtype != torch.bool or tuple(dead.shape) != (self.cfg.n_latents,)):
            raise ValueError(f"dead_mask must be a ({self.cfg.n_latents},) bool tensor, got {dead.dtype} "
                             f"{tuple(dead.shape)}")
        if not self.training:
            dead = None
        if arch == "relu-l1":
            return self._forward_relu_l1(x, dead)
        if arch == "jumprelu":
            return self._forward_jumprelu(x)
        return self._forward_topk_family(x, dead, momentum)

    @staticmethod
    def _fvu(x, x_hat):
        with torch.no_grad():
            return (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)

    def _forward_relu_l1(self, x: torch.Tensor, dead: torch.Tensor | None) -> SAEOutput:
        # HugoFry sae_training / CytoSAE loss, term by term (docs/sae.md).
        pre = self._pre(x)
        z = F.relu(pre)
        x_hat = torch.addmm(self.b_dec, z, self.W_dec)
        x_norm = (x - x.mean(0, keepdim=True)).pow(2).sum(-1, keepdim=True).sqrt()
        mse_el = (x_hat - x).pow(2) / x_norm
        mse = mse_el.mean()
        # z >= 0: the L1 norm is a plain sum, and a latent fired in the batch iff its column sum is > 0; one pass
        # over the (N, n_latents) activations serves both (a boolean mask and its .sum() cost ~2 s a step at 64x)
        col_sums = z.sum(0)
        l1 = self.cfg.l1_coeff * col_sums.sum() / z.shape[0]
        aux = torch.zeros((), device=x.device)
        # the trainer passes a mask only when some latent may be dead; indexing by it needs its count anyway
        if self.cfg.use_ghost_grads and dead is not None and bool(dead.any()):
            resid = x - x_hat
            ghost_acts = torch.exp(pre[:, dead])
            ghost_out = ghost_acts @ self.W_dec[dead]
            scale = resid.norm(dim=-1) / (1e-6 + ghost_out.norm(dim=-1) * 2)
            ghost_out = ghost_out * scale[:, None].detach()
            r = resid.detach()
            ghost_el = (ghost_out - r).pow(2) / r.pow(2).sum(-1, keepdim=True).sqrt()
            ghost_el = (mse_el / (ghost_el + 1e-6)).detach() * ghost_el
            aux = ghost_el.mean()
        fired = col_sums.detach() > 0
        return SAEOutput(recon=x_hat, loss=mse + l1 + aux, mse=mse.detach(), sparsity=l1.detach(), aux=aux.detach(),
                         fvu=self._fvu(x, x_hat), fired=fired, _dense=z)

    def _forward_jumprelu(self, x: torch.Tensor) -> SAEOutput:
        pre = self._pre(x)
        thr = self.log_threshold.exp()
        bw = self.cfg.jumprelu_bandwidth
        z = JumpReLUFn.apply(pre, thr, bw)
        x_hat = torch.addmm(self.b_dec, z, self.W_dec)
        mse = (x_hat - x).pow(2).sum(-1).mean()
        l0_term = self.cfg.l0_coeff * StepFn.apply(pre, thr, bw).sum(1).mean()
        with torch.no_grad():  # z >= 0: a latent fired iff its column maximum is > 0; no boolean (N, n) mask
            fired = z.amax(0) > 0
        return SAEOutput(recon=x_hat, loss=mse + l0_term, mse=mse.detach(), sparsity=l0_term.detach(),
                         aux=torch.zeros((), device=x.device), fvu=self._fvu(x, x_hat), fired=fired, _dense=z)

    def _select(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, cols) of the kept (token, latent) pairs, rows ascending."""
        n_rows, n = pre.shape
        if self.cfg.arch == "topk":
            idx = pre.topk(self.cfg.k, dim=1).indices
            rows = torch.arange(n_rows, device=pre.device).repeat_interleave(self.cfg.k)
            return rows, idx.flatten()
        if self.training:
            n_keep = min(self.cfg.k * n_rows, pre.numel())
            flat_idx = (self._batch_topk_indices(pre, n_keep) if _host_branch(pre)
                        else pre.flatten().topk(n_keep).indices).sort().values
        else:
            flat_idx = (pre.flatten() > self.threshold).nonzero().squeeze(1)
        return flat_idx // n, flat_idx % n

    def _batch_topk_indices(self, pre: torch.Tensor, n_keep: int) -> torch.Tensor:
        """Flat indices of the n_keep largest pre-activations of the batch (exact).

        A top-k over all N x n_latents values (201 M at 64x, batch 4096) is ~70% of a step. Each token's share
        of the batch's top n_keep is k on average, so the winners are looked for among each token's top 4k
        candidates; t, the n_keep-th largest candidate, is at most the true threshold. A token whose 4k-th
        candidate still reaches t ("overflowing": real tokens of very large norm do) may have more winners, so
        all its values join the search; any other token's values beyond its candidates are below t, so the
        top n_keep of that union is the exact answer. Each overflowing token holds 4k of the N*k candidates
        reaching t, so at most a quarter of the tokens overflow: the search never exceeds a quarter of the
        batch's values plus the candidates."""
        n_rows, n = pre.shape
        per_row = min(n, 4 * self.cfg.k)
        if per_row * n_rows <= n_keep or per_row == n:
            return pre.flatten().topk(n_keep).indices
        cand_vals, cand_idx = pre.topk(per_row, dim=1)
        top_vals, top_pos = cand_vals.flatten().topk(n_keep)
        over = cand_vals[:, -1] >= top_vals[-1]
        if not bool(over.any()):
            rows = torch.div(top_pos, per_row, rounding_mode="floor")
            return rows * n + cand_idx.flatten()[top_pos]
        over_rows = over.nonzero().squeeze(1)
        rest = (~over).nonzero().squeeze(1)
        vals = torch.cat([cand_vals[rest].flatten(), pre[over_rows].flatten()])
        flat = torch.cat([(rest[:, None] * n + cand_idx[rest]).flatten(),
                          (over_rows[:, None] * n + torch.arange(n, device=pre.device)).flatten()])
        return flat[vals.topk(n_keep).indices]

    def _forward_topk_family(self, x: torch.Tensor, dead: torch.Tensor | None, momentum: float) -> SAEOutput:
        cfg, n_rows, n = self.cfg, x.shape[0], self.cfg.n_latents
        x_c = x - self.b_dec
        if cfg.sparse_kernels:
            with torch.no_grad():
                pre = torch.addmm(self.b_enc, x_c, self.W_enc)
                rows, cols = self._select(pre)
            vals = F.relu(SparseEncoderGather.apply(x_c.detach(), self.b_dec, self.W_enc, self.b_enc, rows, cols,
                                                     pre[rows, cols]))
            recon_of = lambda v: sparse_decode(rows, cols, v, self.W_dec, n_rows) + self.b_dec  # noqa: E731
            gather = lambda r, c: SparseEncoderGather.apply(x_c.detach(), self.b_dec, self.W_enc, self.b_enc, r, c,  # noqa: E731
                                                            pre[r, c])
        else:
            pre = torch.addmm(self.b_enc, x_c, self.W_enc)
            with torch.no_grad():
                rows, cols = self._select(pre)
            vals = F.relu(pre[rows, cols])

            def recon_of(v):
                z = torch.zeros(n_rows, n, dtype=v.dtype, device=v.device).index_put((rows, cols), v)
                return torch.addmm(self.b_dec, z, self.W_dec)
            gather = lambda r, c: pre[r, c]  # noqa: E731
        x_hat = recon_of(vals)
        if cfg.arch == "matryoshka":
            # nested prefixes: each prefix of the dictionary must reconstruct on its own
            mse = x.new_zeros(())
            for m in cfg.matryoshka_prefixes:
                xm = x_hat if m == n else recon_of(vals * (cols < m))
                mse = mse + (xm - x).pow(2).sum(-1).mean()
        else:
            mse = (x_hat - x).pow(2).sum(-1).mean()
        active = vals > 0
        # counts, not `fired[cols[active]] = True`: boolean indexing would wait for the device every step
        fired = torch.zeros(n, dtype=torch.int32, device=x.device).index_add_(0, cols, active.int()) > 0
        aux = x.new_zeros(())
        if dead is not None and not _host_branch(x):
            aux = cfg.aux_coeff * torch.where(dead.any(), self._auxk(x, x_hat, pre, dead, gather), 0.0)
        elif dead is not None and bool(dead.any()):
            aux = cfg.aux_coeff * self._auxk(x, x_hat, pre, dead, gather)
        if self.training and cfg.arch in ("batchtopk", "matryoshka"):
            with torch.no_grad():  # written with where(): no host round trip per step
                kept_min = vals.detach().masked_fill(~active, float("inf")).min()
                m = torch.where(self.threshold > 0, momentum, 0.0)  # first batch: no zero bias
                updated = self.threshold * m + (1 - m) * kept_min
                self.threshold.copy_(torch.where(torch.isfinite(kept_min), updated, self.threshold))
        return SAEOutput(recon=x_hat, loss=mse + aux, mse=mse.detach(), sparsity=x.new_zeros(()), aux=aux.detach(),
                         fvu=self._fvu(x, x_hat), _l0=active.sum().float().detach() / n_rows, fired=fired,
                         _sparse=(rows, cols, vals.detach(), n_rows, n))

    def _auxk(self, x, x_hat, pre, dead, gather) -> torch.Tensor:
        """Gao et al. AuxK: the top k_aux dead latents reconstruct the residual (normalised MSE).

        k_aux does not depend on how many latents are dead (counting them would wait for the device): where fewer
        are dead, the picks beyond them are live latents, zeroed by the mask, so the sum is the same."""
        k_aux = min(self.cfg.aux_k_effective, self.cfg.n_latents)
        with torch.no_grad():
            masked = pre.masked_fill(~dead, float("-inf"))
            idx = masked.topk(k_aux, dim=1).indices
            rows = torch.arange(x.shape[0], device=x.device).repeat_interleave(k_aux)
            cols = idx.flatten()
        v = F.relu(gather(rows, cols)) * dead[cols]
        e = (x - x_hat).detach()
        e_hat = sparse_decode(rows, cols, v, self.W_dec, x.shape[0])
        return (e_hat - e).pow(2).sum(-1).mean() / e.pow(2).sum(-1).mean().clamp_min(1e-12)

    # ------------------------------------------------------------------ decoder constraint
    @torch.no_grad()
    def remove_parallel_decoder_grad(self) -> None:
        """Drop the gradient component along each decoder row, so the step keeps rows near unit norm."""
        g = self.W_dec.grad
        if g is not None:
            g.sub_((g * self.W_dec).sum(1, keepdim=True) * self.W_dec)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))

    # ------------------------------------------------------------------ export
    def to_jumprelu(self) -> "SAE":
        """BatchTopK/Matryoshka -> an equivalent JumpReLU SAE using the learned running threshold."""
        if self.cfg.arch not in ("batchtopk", "matryoshka"):
            raise ValueError(f"to_jumprelu needs a batchtopk or matryoshka SAE, this one is {self.cfg.arch!r}")
        d = self.cfg.to_dict()
        d.update(arch="jumprelu", matryoshka_prefixes=[])
        out = SAE(SAEConfig(**d))
        with torch.no_grad():
            for name in ("W_enc", "b_enc", "W_dec", "b_dec", "input_scale"):
                getattr(out, name).copy_(getattr(self, name))
            out.log_threshold.fill_(math.log(max(float(self.threshold), 1e-30)))
        return out.eval()

    def tensors(self) -> dict[str, torch.Tensor]:
        t = {"W_enc": self.W_enc, "b_enc": self.b_enc, "W_dec": self.W_dec, "b_dec": self.b_dec,
             "input_scale": self.input_scale}
        if self.cfg.arch == "jumprelu":
            t["threshold"] = self.log_threshold.exp()
        elif self.cfg.arch in ("batchtopk", "matryoshka"):
            t["threshold"] = self.threshold
        return {k: v.detach().float().contiguous() for k, v in t.items()}

    def load_tensors(self, t: dict[str, torch.Tensor], source: str = "tensors") -> None:
        expected = set(self.tensors())
        if set(t) != expected:
            raise ValueError(f"{source}: tensors {sorted(t)} do not match arch {self.cfg.arch!r} "
                             f"(expects {sorted(expected)})")
        with torch.no_grad():
            for k, v in t.items():
                if k == "threshold" and self.cfg.arch == "jumprelu":
                    dst = self.log_threshold
                    v = v.clamp_min(1e-30).log()
                else:
                    dst = getattr(self, k)
                if tuple(dst.shape) != tuple(v.shape):
                    raise ValueError(f"{source}: tensor {k} has shape {tuple(v.shape)}, config implies {tuple(dst.shape)}")
                dst.copy_(v)

    def save(self, out_dir: str | Path, training: dict | None = None) -> Path:
        """Write sae.safetensors + config.json (each atomically, weights first) into out_dir.

        config.json records the weights file's size and sha256, and `training`: how far the run that wrote it
        got ({"finished", "step", "total_steps", "tokens_seen", "total_tokens"}), so an SAE saved at an
        intermediate checkpoint is never mistaken for a finished one.
        """
        from cytosae.store.format import atomic_write_bytes, atomic_write_json, bytes_checksum

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        data = st_save({k: v.detach().contiguous().cpu() for k, v in self.tensors().items()})
        atomic_write_bytes(out / WEIGHTS_FILE, data)
        meta = {"format_version": FORMAT_VERSION, **self.cfg.to_dict(), "checksums": {WEIGHTS_FILE: bytes_checksum(data)}}
        if training is not None:
            meta["training"] = training
        atomic_write_json(out / "config.json", meta)
        return out

    @staticmethod
    def _expected_shapes(cfg: SAEConfig) -> dict[str, tuple[int, ...]]:
        """Shapes of the tensors `tensors()` writes for `cfg`, known without allocating them."""
        d, n = cfg.d_in, cfg.n_latents
        shapes = {"W_enc": (d, n), "b_enc": (n,), "W_dec": (n, d), "b_dec": (d,), "input_scale": ()}
        if cfg.arch == "jumprelu":
            shapes["threshold"] = (n,)
        elif cfg.arch in ("batchtopk", "matryoshka"):
            shapes["threshold"] = ()
        return shapes

    @classmethod
    def load(cls, sae_dir: str | Path, device: str = "cpu", require_finished: bool = False) -> "SAE":
        """The SAE in `sae_dir`, checked before use: weights file size and sha256 (when recorded), tensor names
        and shapes against config.json (read from the header, before allocating), finite values; with
        `require_finished`, an SAE saved mid-training raises UnfinishedSAE saying how far it got.
        `.training_progress` holds the recorded progress (None for SAEs saved outside training)."""
        d = Path(sae_dir)
        cfg_path, w_path = d / "config.json", d / WEIGHTS_FILE
        for p in (cfg_path, w_path):
            if not p.is_file():
                raise FileNotFoundError(f"{p} does not exist: not an SAE directory written by cytosae (sae.save)")
        cfg, checksums, training = _read_config(cfg_path)
        if require_finished:
            check_finished(d, training)
        from cytosae.store.format import verify_file

        verify_file(w_path, checksums.get(WEIGHTS_FILE), "write it again (rerun `cytosae train`, or sae.save())")
        _check_header(w_path, cls._expected_shapes(cfg), cfg_path)
        tensors = load_file(str(w_path))
        for k, v in tensors.items():
            if not bool(torch.isfinite(v).all()):
                n_bad = int((~torch.isfinite(v)).sum())
                raise ValueError(f"{w_path}: tensor {k} holds {n_bad:,} NaN or inf values; this SAE is unusable "
                                 f"(train it again, with a lower learning rate if training diverged)")
        sae = cls(cfg)
        sae.load_tensors(tensors, source=str(w_path))
        sae.training_progress = training
        return sae.to(device).eval()


def _read_config(cfg_path: Path) -> tuple[SAEConfig, dict, dict | None]:
    from cytosae.store.format import read_json_object

    raw = read_json_object(cfg_path, "rewrite it with sae.save()")
    version = raw.pop("format_version", None)
    if version != FORMAT_VERSION:
        raise ValueError(f"{cfg_path}: expected format_version {FORMAT_VERSION}, got {version!r}; "
                         f"written by another tool or cytosae version (import it, or upgrade cytosae)")
    checksums = raw.pop("checksums", None) or {}
    training = raw.pop("training", None)
    try:
        cfg = SAEConfig.from_dict(raw, source=str(cfg_path))
    except TypeError as exc:  # a field of the wrong JSON type
        raise ValueError(f"{cfg_path}: {exc}") from None
    return cfg, checksums, training


def training_progress(sae_dir: str | Path) -> dict | None:
    """How far the training run that wrote `sae_dir` got, from its config.json alone (None: not recorded)."""
    return _read_config(Path(sae_dir) / "config.json")[2]


def check_finished(sae_dir: str | Path, training: dict | None = None) -> None:
    """Raise UnfinishedSAE when the SAE in `sae_dir` was saved before its training run finished."""
    t = training if training is not None else training_progress(sae_dir)
    if t is None or t.get("finished", True):
        return
    total, seen = int(t.get("total_tokens") or 0), int(t.get("tokens_seen") or 0)
    raise UnfinishedSAE(
        f"{sae_dir} holds an unfinished SAE: its training stopped at step {t.get('step')} of {t.get('total_steps')} "
        f"({seen:,} of {total:,} tokens, {seen / max(total, 1):.0%}); rerun the same `cytosae train` command to "
        f"finish it, or pass --allow-unfinished to use it as it is")


def _check_header(w_path: Path, expected: dict[str, tuple[int, ...]], cfg_path: Path) -> None:
    """Tensor names, shapes and dtypes from the safetensors header: a config.json edited to a huge n_latents is
    refused here, before the SAE's parameters are allocated."""
    try:
        with safe_open(str(w_path), framework="pt") as fh:
            shapes = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
            dtypes = {k: fh.get_slice(k).get_dtype() for k in fh.keys()}
    except (SafetensorError, OSError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"{w_path} is damaged: not a readable safetensors file ({msg}); "
                         f"write it again (rerun `cytosae train`, or sae.save())") from None
    if set(shapes) != set(expected):
        raise ValueError(f"{w_path}: tensors {sorted(shapes)} do not match {cfg_path} (expects {sorted(expected)})")
    for k, shape in expected.items():
        if shapes[k] != shape:
            raise ValueError(f"{w_path}: tensor {k} has shape {shapes[k]} but {cfg_path} implies {shape}; "
                             f"the config and the weights do not belong together")
        if dtypes[k] not in ("F32", "F16", "BF16", "F64"):
            raise ValueError(f"{w_path}: tensor {k} has dtype {dtypes[k]}, expected floating point")
