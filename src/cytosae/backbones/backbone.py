"""A ViT backbone that returns the residual stream after a chosen block."""
from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path

import timm
import torch

from .loading import load_into, read_state_dict, sha256_file, to_timm_keys

log = logging.getLogger(__name__)

# DinoBloom = DINOv2 ViT/14 fine-tuned on blood cells at 224 px (1 CLS + 16x16 patch tokens).
DINOBLOOM = {
    "dinobloom-s": "vit_small_patch14_dinov2",
    "dinobloom-b": "vit_base_patch14_dinov2",
    "dinobloom-l": "vit_large_patch14_dinov2",
    "dinobloom-g": "vit_giant_patch14_dinov2",
}

# Compute precision of the forward pass (tokens are returned as float32 whatever it is). fp32 is the
# reference: it matches the published model to 1e-5; bf16/fp16 autocast trade that for speed on GPUs.
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _precision_context(device: torch.device, precision: str):
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if PRECISIONS[precision] is not None:
        return torch.autocast(device_type=device.type, dtype=PRECISIONS[precision])
    if device.type != "cuda":
        return contextlib.nullcontext()
    return _no_tf32()


@contextlib.contextmanager
def _no_tf32():
    """fp32 on a GPU means fp32: cuDNN convolutions (the patch embedding) default to TF32, 10-bit mantissas.
    Only torch's newer fp32_precision flags are touched: mixing them with the legacy allow_tf32 ones is an error."""
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    saved = matmul.fp32_precision, conv.fp32_precision
    matmul.fp32_precision = conv.fp32_precision = "ieee"
    try:
        yield
    finally:
        matmul.fp32_precision, conv.fp32_precision = saved


class Backbone:
    def __init__(self, name: str, model: torch.nn.Module, weights_sha256: str | None, resize: str = "squash",
                 seed: int | None = None) -> None:
        from cytosae.data import Preprocess

        self.name = name
        self.model = model.eval()
        self.weights_sha256 = weights_sha256
        self.random_weights = weights_sha256 is None
        self.seed = seed if self.random_weights else None  # what the random weights were drawn with
        self.embed_dim = int(model.embed_dim)
        self.n_blocks = len(model.blocks)
        size = model.patch_embed.img_size[0]
        self.grid = model.patch_embed.grid_size[0]
        self.n_prefix = int(getattr(model, "num_prefix_tokens", 1))
        self.n_tokens = self.n_prefix + self.grid * self.grid
        self.preprocess_config = Preprocess(size=size, resize=resize)

    def preprocess(self, pil_image) -> torch.Tensor:
        return self.preprocess_config(pil_image)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def tokens(self, x: torch.Tensor, layer: int = -2, precision: str = "fp32") -> torch.Tensor:
        """(B, n_tokens, D) float32 residual stream after block `layer` (before the final norm), CLS first,
        on the backbone's device (`x` is moved there; pinned CPU memory makes that copy asynchronous)."""
        if not -self.n_blocks <= layer < self.n_blocks:
            raise ValueError(f"layer {layer} out of range for {self.name} with {self.n_blocks} blocks "
                             f"(valid {-self.n_blocks}..{self.n_blocks - 1})")
        last = layer % self.n_blocks
        m = self.model
        device = self.device
        x = x.to(device, non_blocking=True)
        with torch.inference_mode(), _precision_context(device, precision):
            h = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))
            for blk in m.blocks[: last + 1]:  # later blocks would be wasted compute
                h = blk(h)
        return h.float()

    def finish(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        """(B, n_tokens, D) float32 final output (after the final norm) from the residual stream `h` after block
        `layer`: the rest of the forward pass `tokens` stops before, blocks layer+1.. and the norm, in fp32."""
        if not -self.n_blocks <= layer < self.n_blocks:
            raise ValueError(f"layer {layer} out of range for {self.name} with {self.n_blocks} blocks "
                             f"(valid {-self.n_blocks}..{self.n_blocks - 1})")
        m = self.model
        h = h.to(self.device, dtype=torch.float32, non_blocking=True)
        with torch.inference_mode(), _precision_context(self.device, "fp32"):
            for blk in m.blocks[layer % self.n_blocks + 1:]:
                h = blk(h)
            return m.norm(h).float()

    def __repr__(self) -> str:
        w = f"RANDOM weights (seed {self.seed})" if self.random_weights else f"weights sha256 {self.weights_sha256[:12]}"
        return f"Backbone({self.name}, {self.n_blocks} blocks, d={self.embed_dim}, {self.n_tokens} tokens, {w})"


def load_backbone(name: str, weights: str | Path | None = None, device: str = "cpu", resize: str = "squash",
                  seed: int = 0, **timm_kwargs) -> Backbone:
    """`dinobloom-s|b|l|g` or any timm ViT name, with weights from a file (or random, with a warning).

    Random weights are a pure function of `seed`: a killed extraction resumed in another process must compute
    its remaining shards with the same backbone as the first ones. The caller's global RNG is left untouched.
    """
    arch = DINOBLOOM.get(name, name)
    kwargs = {"img_size": 224, "num_classes": 0, **timm_kwargs}
    if name in DINOBLOOM:
        kwargs.setdefault("init_values", 1.0)  # LayerScale is present in every DINOv2 checkpoint
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = timm.create_model(arch, pretrained=False, **kwargs)
    except RuntimeError as exc:
        raise ValueError(f"unknown backbone {name!r}: use dinobloom-s|b|l|g or a timm ViT name ({exc})") from exc
    if not hasattr(model, "blocks") or not hasattr(model, "_pos_embed"):
        raise ValueError(f"{name!r} is not a timm VisionTransformer; cytosae reads tokens from ViT blocks")
    sha = None
    if weights is not None:
        path = Path(weights)
        sd = to_timm_keys(read_state_dict(path), model.patch_embed.grid_size[0])
        load_into(model, sd, path, arch)
        sha = sha256_file(path)
    else:
        msg = (f"{name}: no weights given, using RANDOM weights (seed {seed}); activations and concepts will mean nothing "
               "about blood cells. Pass weights=PATH.")
        warnings.warn(msg, stacklevel=2)
        log.warning(msg)
    from cytosae.devices import resolve_device

    return Backbone(name, model.to(resolve_device(device)), sha, resize=resize, seed=seed)
