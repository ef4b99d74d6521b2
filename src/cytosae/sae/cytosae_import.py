"""Import a published CytoSAE checkpoint (.pt) without running any of its code.

The file is torch.save({"cfg": ViTSAERunnerConfig, "state_dict": {...}}). Its config is a
pickled object of class src.sae_training.config.ViTSAERunnerConfig; we never import that
module. torch.load(weights_only=True) only rebuilds tensors and allow-listed classes; we
allow-list a local stand-in class under that exact name, which just keeps the pickled fields.
Anything else in the pickle (os.system, other classes) is refused by torch's restricted unpickler.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import torch

from .config import SAEConfig
from .model import SAE

FOREIGN_CONFIG_CLASSES = ("src.sae_training.config.ViTSAERunnerConfig", "src.sae_training.config.RunnerConfig",
                          "sae_training.config.ViTSAERunnerConfig")


class ForeignConfig:
    """Inert stand-in for a pickled config object: only holds its attributes."""

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2:  # (dict, slots) form
            state = {**(state[0] or {}), **(state[1] or {})}
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"config state is a {type(state).__name__}, expected a dict")
        self.__dict__.update(state)


def _stand_ins() -> list:
    return [(type(name.rsplit(".", 1)[1], (ForeignConfig,), {}), name) for name in FOREIGN_CONFIG_CLASSES]


def read_cytosae_checkpoint(pt_path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config fields, state_dict) from a CytoSAE .pt file, safely."""
    p = Path(pt_path)
    if not p.is_file():
        raise FileNotFoundError(f"{p} does not exist")
    # torch.dtype / torch.device fields in the config are allowed by weights_only already.
    with torch.serialization.safe_globals(_stand_ins()):
        try:
            obj = torch.load(str(p), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise ValueError(f"{p}: refused to load: the pickle asks for something other than tensors and the "
                             f"CytoSAE config class ({str(exc).splitlines()[0]}). Not a CytoSAE checkpoint, or "
                             f"tampered with; cytosae never executes code from checkpoint files.") from exc
        except Exception as exc:  # noqa: BLE001 - corrupt zip etc.
            raise ValueError(f"{p}: not a readable torch checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(obj, dict):
        raise ValueError(f"{p}: expected a dict with a config and a state_dict, got {type(obj).__name__}")
    sd = next((obj[k] for k in ("state_dict", "model_state_dict", "sae_state_dict", "model") if k in obj), None)
    if sd is None and {"W_enc", "W_dec"} <= set(obj):
        sd = obj
    cfg = next((obj[k] for k in ("cfg", "config", "sae_config", "cfg_dict") if k in obj), None)
    if not isinstance(sd, dict):
        raise ValueError(f"{p}: no state_dict found (top-level keys {sorted(map(str, obj))})")
    if isinstance(cfg, ForeignConfig):
        cfg = dict(cfg.__dict__)
    elif cfg is None:
        cfg = {}
    elif not isinstance(cfg, dict):
        raise ValueError(f"{p}: config is a {type(cfg).__name__}, expected a CytoSAE config object or dict")
    return cfg, sd


def import_cytosae_checkpoint(pt_path: str | Path, out_dir: str | Path) -> SAE:
    """Convert a CytoSAE (PatchSAE / HugoFry sae_training) checkpoint to cytosae's format in out_dir."""
    cfg, sd = read_cytosae_checkpoint(pt_path)
    need = ("W_enc", "b_enc", "W_dec", "b_dec")
    missing = [k for k in need if k not in sd]
    if missing:
        raise ValueError(f"{pt_path}: state_dict lacks {missing} (has {sorted(sd)})")
    w_enc = sd["W_enc"].float()
    if w_enc.ndim != 2:
        raise ValueError(f"{pt_path}: W_enc must be 2-D (d_in, d_sae), got {tuple(w_enc.shape)}")
    d_in, n = w_enc.shape
    if "d_in" in cfg and int(cfg["d_in"]) != d_in:
        raise ValueError(f"{pt_path}: config d_in={cfg['d_in']} but W_enc is {tuple(w_enc.shape)}")
    if tuple(sd["W_dec"].shape) != (n, d_in) or tuple(sd["b_enc"].shape) != (n,) or tuple(sd["b_dec"].shape) != (d_in,):
        raise ValueError(f"{pt_path}: inconsistent shapes W_enc {tuple(w_enc.shape)}, W_dec {tuple(sd['W_dec'].shape)}, "
                         f"b_enc {tuple(sd['b_enc'].shape)}, b_dec {tuple(sd['b_dec'].shape)}")
    opts = {}
    if "l1_coefficient" in cfg:
        opts["l1_coeff"] = float(cfg["l1_coefficient"])
    if "lr" in cfg:
        opts["lr"] = float(cfg["lr"])
    if "lr_warm_up_steps" in cfg:
        opts["lr_warmup_steps"] = int(cfg["lr_warm_up_steps"])
    if "dead_feature_window" in cfg:
        opts["dead_feature_window"] = int(cfg["dead_feature_window"])
    if "use_ghost_grads" in cfg:
        opts["use_ghost_grads"] = bool(cfg["use_ghost_grads"])
    sae = SAE(SAEConfig(arch="relu-l1", d_in=d_in, n_latents=n, normalize_inputs=False, init_b_dec="zeros", **opts))
    sae.load_tensors({"W_enc": w_enc, "b_enc": sd["b_enc"].float(), "W_dec": sd["W_dec"].float(),
                      "b_dec": sd["b_dec"].float(), "input_scale": torch.ones(())}, source=str(pt_path))
    sae.save(out_dir)
    return sae.eval()
