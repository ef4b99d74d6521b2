"""Freed CPU memory stays in the process for the next training step (glibc's malloc), instead of going back to the
system, while an SAE trains; glibc's own policy again afterwards.

glibc serves every block above 32 MB (an SAE step's pre-activations, gradients and their temporaries: 150-200 MB
each at 49,152 latents) with a fresh mmap and unmaps it when freed, so each step pays the kernel for zeroing and
mapping ~40,000 new pages per block: 0.7 s of a 2.5 s TopK step on one core (bench/train_step.py). With mmap
off and trimming at its maximum, a freed block is reused by the next step as it is: training steps allocate the
same blocks step after step. Passes that allocate blocks of changing sizes fragment such a heap instead: an
alignment at 49,152 latents run after another in one process peaked at 14.3 GB with it, 2.6 GB without
(650 Acevedo cells, /proc VmHWM), so only the Trainer asks for it, on the CPU, and `Trainer.fit` ends with
`return_freed_memory` (glibc's defaults, the free heap trimmed) before the next step of a study runs in the same
process. CYTOSAE_RETURN_FREED_MEMORY=1 turns it off.
"""
from __future__ import annotations

import ctypes
import os
import sys

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc malloc.h
_MAX_TRIM = 2**31 - 1  # mallopt takes an int: the top of the heap is given back only beyond 2 GB free
_DEFAULT_TRIM, _DEFAULT_MMAP_MAX = 128 * 1024, 65536  # glibc's DEFAULT_TRIM_THRESHOLD, DEFAULT_MMAP_MAX
OPT_OUT = "CYTOSAE_RETURN_FREED_MEMORY"
_state: dict[str, bool] = {"kept": False}


def _libc():
    """glibc's handle, or None (not Linux, not glibc: musl and others keep their own allocator's behaviour)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
        return libc
    except (OSError, AttributeError):
        return None


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory for reuse; True when it is in effect (False off Linux/glibc, or opted out)."""
    if _state["kept"]:
        return True
    libc = None if os.environ.get(OPT_OUT, "") in ("1", "true", "yes") else _libc()
    if libc is not None:
        _state["kept"] = bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _MAX_TRIM))
    return _state["kept"]


def return_freed_memory() -> None:
    """Undo keep_freed_memory: blocks above the mmap threshold mapped and unmapped again, and the heap's free memory
    given back to the system now (malloc_trim). Nothing where it was not in effect."""
    if not _state["kept"]:
        return
    libc = _libc()
    libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
    libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM)
    libc.malloc_trim(0)
    _state["kept"] = False
