"""Freed CPU memory stays in the process for the next batch (glibc's malloc), instead of going back to the system.

glibc serves every block above 32 MB (an SAE step's pre-activations, gradients and their temporaries: 150-200 MB
each at 49,152 latents) with a fresh mmap and unmaps it when freed, so each step pays the kernel for zeroing and
mapping ~40,000 new pages per block: 0.7 s of a 2.5 s TopK step on one core (bench/train_step.py). With mmap
off and trimming at its maximum, a freed block is reused by the next step as it is. The price is that the process
keeps its peak memory until it ends, which suits a training or encoding command, and is why only those commands
ask for it (`Trainer` on the CPU, `steps.common.device`). CYTOSAE_RETURN_FREED_MEMORY=1 turns it off.
"""
from __future__ import annotations

import ctypes
import os
import sys

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc malloc.h
_MAX_TRIM = 2**31 - 1  # mallopt takes an int: the top of the heap is given back only beyond 2 GB free
OPT_OUT = "CYTOSAE_RETURN_FREED_MEMORY"
_state: dict[str, bool] = {}


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory for reuse; True when it is in effect (False off Linux/glibc, or opted out)."""
    if "kept" in _state:
        return _state["kept"]
    kept = False
    if os.environ.get(OPT_OUT, "") not in ("1", "true", "yes") and sys.platform.startswith("linux"):
        try:
            mallopt = ctypes.CDLL("libc.so.6").mallopt
        except (OSError, AttributeError):  # not glibc (musl, ...): its allocator is left as it is
            mallopt = None
        if mallopt is not None:
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            kept = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _MAX_TRIM))
    _state["kept"] = kept
    return kept
