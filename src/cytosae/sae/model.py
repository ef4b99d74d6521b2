"""The SAE base: what every architecture shares (encode/decode in raw units, save/load, checks); sae/archs/ adds each
architecture's activation, loss and options. `SAE(cfg)` and `SAE.load(dir)` build the class registered for
cfg.arch (sae/archs/__init__.py).

Parameters live in the *normalised* space (x * input_scale); encode() takes raw store units and decode() returns
raw units, so users never see the scale.
Layout follows CytoSAE: W_enc (d_in, n_latents), W_dec (n_latents, d_in), unit-norm decoder rows.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from safetensors.torch import save as st_save

from .config import FORMAT_VERSION, READABLE_VERSIONS, SAEConfig
from .kernels import EncoderLinear
from .options import CommonOptions, ConfigError, FileChecksum, TrainingProgress, validate

WEIGHTS_FILE = "sae.safetensors"
SELF_CHECKSUM = "config_sha256"  # config.json's sha256 of its own canonical content (format_version 2)
# Devices where a training step may branch on a value it computed. On the CPU that is free and lets a step skip
# work (no dead latent: no AuxK pass; BatchTopK from per-token candidates, checked). On a GPU reading a value back
# stalls the queue of kernels every step, so the same results are computed branch-free there (tests/test_sae_sync.py).
HOST_BRANCH_DEVICES = {"cpu"}


def _host_branch(t: torch.Tensor) -> bool:
    return t.device.type in HOST_BRANCH_DEVICES


class UnfinishedSAE(ValueError):
    """The SAE was written at an intermediate checkpoint of a training run that has not finished."""


class UncheckedSAE(UserWarning):
    """The SAE's config.json records no checksums (written before cytosae recorded them): damage can go unseen."""


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
    """Base of the architectures. A subclass sets `arch`, `Options` and implements `_activate` and
    `_forward_normalised`; the trainer asks it (`dead_limit`, `counts_dead_in_tokens`), never tests its name."""
    arch: ClassVar[str] = ""
    Options: ClassVar[type[CommonOptions]] = CommonOptions
    counts_dead_in_tokens: ClassVar[bool] = True  # dead-latent clock: tokens (cfg.dead_tokens), else steps

    def __new__(cls, cfg: SAEConfig | None = None, *args, **kwargs):
        if cls is SAE and cfg is not None:  # SAE(cfg): the registered architecture
            from .archs import arch_class
            cls = arch_class(cfg.arch)
        return super().__new__(cls)

    def __init__(self, cfg: SAEConfig, seed: int | None = 0) -> None:
        if cfg.arch != self.arch:
            raise ValueError(f"{type(self).__name__} is the {self.arch!r} SAE, the config says {cfg.arch!r}")
        super().__init__()
        self.cfg = cfg
        self.training_progress: dict | None = None  # set by load(): how far the run that saved it got
        d, n = cfg.d_in, cfg.n_latents
        gen = torch.Generator().manual_seed(seed if seed is not None else 0)
        # HugoFry/CytoSAE init: kaiming-uniform decoder, rows scaled to unit norm; the encoder per architecture
        w_dec = torch.empty(n, d)
        bound_dec = 1.0 / math.sqrt(d)
        w_dec.uniform_(-bound_dec, bound_dec, generator=gen)
        w_dec /= w_dec.norm(dim=1, keepdim=True)
        # the encoder is stored as its transpose (n_latents, d_in), contiguous: its gradients are built latent by
        # latent (kernels.in_layout_of), and fused Adam copies a non-contiguous parameter in and out every step;
        # `W_enc` is its (d_in, n_latents) view, as CytoSAE lays it out and as sae.safetensors stores it
        self.W_enc_T = nn.Parameter(self._init_encoder(w_dec, gen).t().clone(memory_format=torch.contiguous_format))
        self.b_enc = nn.Parameter(torch.zeros(n))
        self.W_dec = nn.Parameter(w_dec)
        self.b_dec = nn.Parameter(torch.zeros(d))
        self.register_buffer("input_scale", torch.ones(()))
        self._init_state()

    @property
    def W_enc(self) -> torch.Tensor:
        """(d_in, n_latents) view of the encoder parameter `W_enc_T`: in-place edits reach the parameter, its
        gradient is `W_enc_T.grad` (transposed)."""
        return self.W_enc_T.t()

    # ------------------------------------------------------------------ what an architecture defines
    @classmethod
    def resolve_options(cls, values: dict, d_in: int, n_latents: int) -> dict:
        """Checks and defaults that need the SAE's size (values: every SAEConfig field, already typed)."""
        return values

    def _init_encoder(self, w_dec: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return w_dec.t()  # Gao et al.: encoder initialised as the decoder transpose

    def _init_state(self) -> None:
        """Register the architecture's own parameters and buffers."""

    def _activate(self, pre: torch.Tensor) -> torch.Tensor:
        """(N, n_latents) pre-activations -> latents, inference semantics. `pre` is encode()'s own fresh product:
        an architecture may write the latents into it when no gradient is wanted (one (N, n) tensor fewer)."""
        raise NotImplementedError

    def _forward_normalised(self, x: torch.Tensor, dead: torch.Tensor | None,
                            momentum: float | None) -> SAEOutput:
        """Reconstruction and loss terms on normalised inputs (dead: checked mask, None outside training)."""
        raise NotImplementedError

    @classmethod
    def _state_shapes(cls, cfg: SAEConfig) -> dict[str, tuple[int, ...]]:
        """Shapes of the tensors the architecture saves beyond the shared five."""
        return {}

    def _state_tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def _state_target(self, name: str, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(where a saved tensor goes, the value to copy there)."""
        return getattr(self, name), value

    @property
    def dead_limit(self) -> int:
        """Since-fired count past which the trainer calls a latent dead (in tokens or steps, see above)."""
        return self.cfg.dead_tokens

    def to_jumprelu(self) -> "SAE":
        raise ValueError(f"to_jumprelu needs a batchtopk or matryoshka SAE, this one is {self.cfg.arch!r}")

    # ------------------------------------------------------------------ raw-unit interface
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(N, d_in) raw store units -> (N, n_latents) latent activations (inference semantics)."""
        self._check_input(x)
        return self._activate(self._pre(x.float() * self.input_scale))

    def encode_sparse(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(N, d_in) raw units -> (values, latent indices), each (N, w): the activations an architecture with a
        fixed number of active latents per token keeps (every other latent is 0), without the dense (N, n_latents)
        result; None where the activation has no fixed width (relu-l1, jumprelu, BatchTopK's threshold): use
        encode(). Analyses accumulate from the pairs (cytosae.analysis.encoded)."""
        return None

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
        dead = dead_mask
        if dead is not None and (dead.dtype != torch.bool or tuple(dead.shape) != (self.cfg.n_latents,)):
            raise ValueError(f"dead_mask must be a ({self.cfg.n_latents},) bool tensor, got {dead.dtype} "
                             f"{tuple(dead.shape)}")
        out = self._forward_normalised(x.float() * self.input_scale, dead if self.training else None,
                                       threshold_momentum)
        out.recon = out.recon / self.input_scale
        return out

    def loss(self, x: torch.Tensor, dead_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward(x, dead_mask).loss

    # ------------------------------------------------------------------ shared internals
    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 2 or x.shape[1] != self.cfg.d_in:
            raise ValueError(f"SAE expects (N, {self.cfg.d_in}) inputs, got shape {tuple(x.shape)}")

    def _pre(self, xn: torch.Tensor) -> torch.Tensor:
        if xn.requires_grad or not torch.is_grad_enabled():
            return torch.addmm(self.b_enc, xn - self.b_dec, self.W_enc)
        return EncoderLinear.apply(xn, self.b_dec, self.W_enc, self.b_enc)

    @staticmethod
    def _fvu(x, x_hat):
        with torch.no_grad():
            return (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)

    # ------------------------------------------------------------------ decoder constraint
    @torch.no_grad()
    def remove_parallel_decoder_grad(self) -> None:
        """Drop the gradient component along each decoder row, so the step keeps rows near unit norm."""
        g = self.W_dec.grad
        if g is not None:  # in place: (g * W).sum(1) then g - dot * W built two (n, d) temporaries
            g.addcmul_(torch.linalg.vecdot(g, self.W_dec).unsqueeze(1), self.W_dec, value=-1)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))

    # ------------------------------------------------------------------ save / load
    def tensors(self) -> dict[str, torch.Tensor]:
        t = {"W_enc": self.W_enc, "b_enc": self.b_enc, "W_dec": self.W_dec, "b_dec": self.b_dec,
             "input_scale": self.input_scale, **self._state_tensors()}
        return {k: v.detach().float().contiguous() for k, v in t.items()}

    def load_tensors(self, t: dict[str, torch.Tensor], source: str = "tensors") -> None:
        expected = set(self.tensors())
        if set(t) != expected:
            raise ValueError(f"{source}: tensors {sorted(t)} do not match arch {self.cfg.arch!r} "
                             f"(expects {sorted(expected)})")
        with torch.no_grad():
            for k, v in t.items():
                dst, v = self._state_target(k, v)
                if tuple(dst.shape) != tuple(v.shape):
                    raise ValueError(f"{source}: tensor {k} has shape {tuple(v.shape)}, config implies {tuple(dst.shape)}")
                dst.copy_(v)

    def save(self, out_dir: str | Path, training: dict | None = None) -> Path:
        """Write sae.safetensors + config.json (each atomically, weights first) into out_dir.

        config.json records the weights file's size and sha256, and `training`: how far the run that wrote it
        got ({"finished", "step", "total_steps", "tokens_seen", "total_tokens"}), so an SAE saved at an
        intermediate checkpoint is never mistaken for a finished one. It ends with `config_sha256`, the sha256 of
        its own content (as the store manifest's `manifest_sha256`), so an edit to it is found on load.
        """
        from cytosae.store.format import atomic_write_bytes, atomic_write_json, bytes_checksum

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        data = st_save({k: v.detach().contiguous().cpu() for k, v in self.tensors().items()})
        atomic_write_bytes(out / WEIGHTS_FILE, data)
        meta = {"format_version": FORMAT_VERSION, **self.cfg.to_dict(),
                "checksums": {WEIGHTS_FILE: bytes_checksum(data)}}
        if training is not None:
            meta["training"] = dict(training)
        atomic_write_json(out / "config.json", seal(meta))
        return out

    @classmethod
    def _expected_shapes(cls, cfg: SAEConfig) -> dict[str, tuple[int, ...]]:
        """Shapes of the tensors `tensors()` writes for `cfg`, known without allocating them."""
        from .archs import arch_class

        d, n = cfg.d_in, cfg.n_latents
        shapes = {"W_enc": (d, n), "b_enc": (n,), "W_dec": (n, d), "b_dec": (d,), "input_scale": ()}
        return {**shapes, **arch_class(cfg.arch)._state_shapes(cfg)}

    @classmethod
    def load(cls, sae_dir: str | Path, device: str = "cpu", require_finished: bool = False) -> "SAE":
        """The SAE in `sae_dir`, as the class its config.json's `arch` names, checked before use: config.json
        against typed schemas and its own checksum (config_sha256), weights file size and sha256, tensor
        names and shapes (read from the header, before allocating), finite values; with `require_finished`, an
        SAE saved mid-training raises UnfinishedSAE saying how far it got.
        `.training_progress` holds the recorded progress (None for SAEs saved outside training)."""
        d = Path(sae_dir)
        cfg_path, w_path = d / "config.json", d / WEIGHTS_FILE
        for p in (cfg_path, w_path):
            if not p.is_file():
                raise FileNotFoundError(f"{p} does not exist: not an SAE directory written by cytosae (sae.save)")
        cfg, checksums, training, content = _read_config(cfg_path)
        from cytosae.store.format import verify_file

        if checksums is None:  # SAEs saved before checksums existed must still open; say what is not checked
            warnings.warn(f"{cfg_path} records no checksums: damage to {w_path} cannot be detected; save the SAE "
                          f"again (SAE.load(dir).save(dir)) to record them", UncheckedSAE, stacklevel=2)
        verify_file(w_path, (checksums or {}).get(WEIGHTS_FILE),
                    "write it again (rerun `cytosae train`, or sae.save())")
        # tensor names and shapes before the seal: a config.json edited to a huge n_latents says so, unallocated
        _check_header(w_path, cls._expected_shapes(cfg), cfg_path)
        _check_seal(content, cfg_path)
        if cls is not SAE and cfg.arch != cls.arch:
            raise ValueError(f"{cfg_path}: holds a {cfg.arch!r} SAE, not {cls.arch!r}; load it with SAE.load")
        if require_finished:
            check_finished(d, training)
        tensors = load_file(str(w_path))
        for k, v in tensors.items():
            if not bool(torch.isfinite(v).all()):
                n_bad = int((~torch.isfinite(v)).sum())
                raise ValueError(f"{w_path}: tensor {k} holds {n_bad:,} NaN or inf values; this SAE is unusable "
                                 f"(train it again, with a lower learning rate if training diverged)")
        sae = SAE(cfg)
        sae.load_tensors(tensors, source=str(w_path))
        sae.training_progress = training
        return sae.to(device).eval()


_REMEDY = "restore it, or write the SAE again (rerun `cytosae train`, or sae.save())"


def _field_error(cfg_path: Path, exc: ConfigError, prefix: str = "") -> ValueError:
    return ValueError(f"{cfg_path}: field {prefix + exc.field!r} {exc.problem}; {_REMEDY}")


def seal(meta: dict) -> dict:
    """config.json's content as save() writes it: `meta` plus the sha256 of its canonical JSON."""
    from cytosae.store.format import self_checksum

    return {**meta, SELF_CHECKSUM: self_checksum(meta, SELF_CHECKSUM)}


def _read_config(cfg_path: Path) -> tuple[SAEConfig, dict | None, dict | None, dict]:
    """(config, checksums or None, training progress or None, the file's content), each checked against its
    typed schema: a bad field raises one line naming the file and the field. `_check_seal(content)` then checks
    the file against its own checksum."""
    from cytosae.store.format import read_json_object

    raw = read_json_object(cfg_path, "rewrite it with sae.save()")
    version = raw.get("format_version")
    if type(version) is not int or version not in READABLE_VERSIONS:
        raise ValueError(f"{cfg_path}: expected format_version {FORMAT_VERSION}, got {version!r}; "
                         f"written by another tool or cytosae version (import it, or upgrade cytosae)")
    fields = {k: v for k, v in raw.items() if k not in ("format_version", "checksums", "training", SELF_CHECKSUM)}
    checksums, training, recorded = raw.get("checksums"), raw.get("training"), raw.get(SELF_CHECKSUM)
    if version >= 2:  # written by code that always records them: a missing one was removed
        for key, value in (("checksums", checksums), (SELF_CHECKSUM, recorded)):
            if value is None:
                raise ValueError(f"{cfg_path}: field {key!r} is missing, and format_version {version} always "
                                 f"records it; {_REMEDY}")
    elif recorded is not None:
        raise ValueError(f"{cfg_path}: field {SELF_CHECKSUM!r} is not part of format_version {version}; {_REMEDY}")
    if checksums is not None:
        if not isinstance(checksums, dict) or set(checksums) != {WEIGHTS_FILE}:
            raise ValueError(f"{cfg_path}: field 'checksums' must map {WEIGHTS_FILE} (only) to its size and "
                             f"sha256, got {checksums!r}; {_REMEDY}")
        _validate_field(cfg_path, FileChecksum, checksums[WEIGHTS_FILE], f"checksums.{WEIGHTS_FILE}")
    if training is not None:
        training = _validate_field(cfg_path, TrainingProgress, training, "training").model_dump()
    cfg = SAEConfig.from_dict(fields, source=str(cfg_path))
    return cfg, checksums, training, raw


def _check_seal(content: dict, cfg_path: Path) -> None:
    """From format_version 2, config.json against its own checksum: an edit that keeps every field valid (arch, a
    removed `training` block, ...) is refused too. Format 1 files carry none; their edits cannot be told."""
    from cytosae.store.format import self_checksum

    recorded = content.get(SELF_CHECKSUM)
    if recorded is not None and (not isinstance(recorded, str) or self_checksum(content, SELF_CHECKSUM) != recorded):
        raise ValueError(f"{cfg_path}: its content differs from the {SELF_CHECKSUM} recorded when it was written "
                         f"(config.json was edited); {_REMEDY}")


def _validate_field(cfg_path: Path, model, value, name: str):
    if not isinstance(value, dict):
        raise ValueError(f"{cfg_path}: field {name!r} must be an object, got {value!r}; {_REMEDY}")
    try:
        return validate(model, value)
    except ConfigError as exc:
        raise _field_error(cfg_path, exc, name + ".") from None


def read_config(sae_dir: str | Path) -> dict:
    """config.json's content, checked as SAE.load checks it (typed schemas, format version, its own checksum) but
    without reading the weights: for readers that need the config alone (the explorer's decoder rows)."""
    cfg_path = Path(sae_dir) / "config.json"
    _, _, _, content = _read_config(cfg_path)
    _check_seal(content, cfg_path)
    return content


def training_progress(sae_dir: str | Path) -> dict | None:
    """How far the training run that wrote `sae_dir` got, from its config.json alone (None: not recorded)."""
    cfg_path = Path(sae_dir) / "config.json"
    _, _, training, content = _read_config(cfg_path)
    _check_seal(content, cfg_path)
    return training


def check_finished(sae_dir: str | Path, training: dict | None = None) -> None:
    """Raise UnfinishedSAE when the SAE in `sae_dir` was saved before its training run finished."""
    t = training if training is not None else training_progress(sae_dir)
    if t is None or t["finished"]:
        return
    total, seen = t["total_tokens"], t["tokens_seen"]
    raise UnfinishedSAE(
        f"{sae_dir} holds an unfinished SAE: its training stopped at step {t['step']} of {t['total_steps']} "
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
