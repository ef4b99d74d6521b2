"""Training checkpoints: training_state/ (safetensors + JSON, no pickle), swapped in atomically."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from cytosae.store.format import DamagedFile, file_checksum, verify_file

STATE_DIR = "training_state"
STATE_VERSION = 1


def save_training_state(out_dir: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Write training_state/ as a whole: a crash leaves either the old or the new state, never a mix."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir, prefix=f".{STATE_DIR}."))
    # written straight to disk and hashed from there: the optimiser state is 3x the SAE, too big to double in memory
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / "state.safetensors"))
    (tmp / "state.json").write_text(json.dumps({"state_version": STATE_VERSION, **meta,
                                                "checksum": file_checksum(tmp / "state.safetensors")}, indent=2))
    final, old = out_dir / STATE_DIR, out_dir / f"{STATE_DIR}.old"
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


def load_training_state(out_dir: Path) -> tuple[dict[str, torch.Tensor], dict] | None:
    """The saved state, or None when there is none (fresh run)."""
    for name in (STATE_DIR, f"{STATE_DIR}.old"):  # .old survives a crash between the two renames
        d = out_dir / name
        if (d / "state.json").is_file() and (d / "state.safetensors").is_file():
            try:
                meta = json.loads((d / "state.json").read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise ValueError(f"{d / 'state.json'} is corrupt ({exc}); delete {d} to restart training") from exc
            if meta.get("state_version") != STATE_VERSION:
                raise ValueError(f"{d / 'state.json'}: state_version {meta.get('state_version')!r} is not "
                                 f"{STATE_VERSION}; delete {d} to restart training")
            remedy = f"delete {d} to restart training"
            try:
                verify_file(d / "state.safetensors", meta.pop("checksum", None), remedy)
                return load_file(str(d / "state.safetensors")), meta
            except SafetensorError as exc:
                raise DamagedFile(f"{d / 'state.safetensors'} is damaged ({str(exc).splitlines()[0]}); {remedy}") from None
    return None
