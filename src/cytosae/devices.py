"""Device selection shared by every command that runs a model (one owner for `--device`)."""

from __future__ import annotations

import re

import torch

DEVICE_CHOICES_HELP = "auto|cpu|cuda|cuda:N"


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """Turn a `--device` value into a torch.device; unusable requests raise a one-line ValueError.

    `auto` (or None) picks CUDA when a GPU is visible, else CPU. Asking for CUDA on a machine
    without one fails here rather than deep inside the first `.to(...)`.
    """
    if isinstance(spec, torch.device):
        spec = str(spec)
    text = "auto" if spec is None else str(spec).strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", text)
    if match is None:
        raise ValueError(f"device {spec!r} not understood: use one of {DEVICE_CHOICES_HELP}")
    if not torch.cuda.is_available():
        raise ValueError(f"device {spec!r} asked for but no CUDA GPU is available here: use --device cpu or auto")
    index = int(match.group(1)) if match.group(1) is not None else torch.cuda.current_device()
    count = torch.cuda.device_count()
    if index >= count:
        raise ValueError(f"device {spec!r} asked for but only {count} CUDA device(s) are visible (cuda:0..cuda:{count - 1})")
    return torch.device("cuda", index)
