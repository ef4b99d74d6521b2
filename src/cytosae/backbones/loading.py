"""Reading weights in the layouts they are published in, mapped onto timm's ViT.

Layouts: DinoBloom training checkpoints ({"teacher": {"backbone.<key>": ...}}),
Meta's DINOv2 `*_pretrain.pth` (518 px position embedding), timm state dicts
(possibly under "state_dict"/"model"), and `.safetensors` files.
"""
from __future__ import annotations

import hashlib
import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)  # never unpickle arbitrary objects
    except Exception as exc:
        raise ValueError(f"{path} could not be read as a weights-only PyTorch checkpoint ({exc}). "
                         "Checkpoints holding Python objects are refused for safety; export a state dict.") from exc
    if isinstance(obj, dict) and "teacher" in obj:  # DinoBloom / DINOv2 training checkpoint
        teacher = obj["teacher"]
        obj = {k[len("backbone."):]: v for k, v in teacher.items() if k.startswith("backbone.")}
        if not obj:
            raise ValueError(f"{path}: 'teacher' holds no 'backbone.*' tensors (keys like {list(teacher)[:3]})")
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return obj


def resample_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """Resample a (1, 1+M*M, D) position embedding to (1, 1+grid*grid, D) exactly as DINOv2 does at run time
    (bicubic with scale factor (grid+0.1)/M, no antialias), so our 224 px model equals theirs on 224 px input."""
    n = pos_embed.shape[1] - 1
    m = math.isqrt(n)
    if m * m != n:
        raise ValueError(f"position embedding with {n} patch positions is not a square grid")
    if m == grid:
        return pos_embed
    dim = pos_embed.shape[-1]
    patch = pos_embed[:, 1:].float().reshape(1, m, m, dim).permute(0, 3, 1, 2)
    scale = (grid + 0.1) / math.sqrt(n)
    patch = F.interpolate(patch, scale_factor=(scale, scale), mode="bicubic")
    patch = patch.permute(0, 2, 3, 1).reshape(1, grid * grid, dim).to(pos_embed.dtype)
    return torch.cat([pos_embed[:, :1], patch], dim=1)


_CHUNKED = re.compile(r"^blocks\.\d+\.(\d+)\.")


def to_timm_keys(sd: dict[str, torch.Tensor], grid: int) -> dict[str, torch.Tensor]:
    """DINOv2 names -> timm names: un-chunk blocks, SwiGLU w12/w3 -> fc1/fc2, drop the mask token."""
    out = {}
    for k, v in sd.items():
        if k == "mask_token":  # used only for iBOT masking during training
            continue
        k = _CHUNKED.sub(r"blocks.\1.", k)
        k = k.replace(".mlp.w12.", ".mlp.fc1.").replace(".mlp.w3.", ".mlp.fc2.")
        out[k] = v
    if "pos_embed" in out:
        out["pos_embed"] = resample_pos_embed(out["pos_embed"], grid)
    return out


def load_into(model: torch.nn.Module, sd: dict[str, torch.Tensor], path: Path, arch: str) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(sd) & set(own)) if sd[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        lines = [f"{path} does not fit {arch}:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {missing[:12]}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {unexpected[:12]}")
        if shapes:
            lines.append(f"  shape mismatches ({len(shapes)}): {shapes[:12]}")
        lines.append("  Check --backbone (s/b/l/g differ in width and depth) and that the file is a backbone checkpoint.")
        raise ValueError("\n".join(lines))
    model.load_state_dict(sd, strict=True)
