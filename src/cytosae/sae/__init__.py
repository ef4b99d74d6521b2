"""Sparse autoencoders: architectures, training, evaluation, CytoSAE checkpoint import."""
from .config import SAEConfig
from .data import EpochSource, ShuffleBuffer, rechunk, store_epochs
from .init import geometric_median
from .model import SAE, SAEOutput
from .train import train_sae
from .trainer import Trainer, TrainingDiverged

__all__ = ["SAE", "SAEConfig", "SAEOutput", "EpochSource", "ShuffleBuffer", "Trainer", "TrainingDiverged",
           "geometric_median", "rechunk", "store_epochs", "train_sae", "evaluate_sae", "import_cytosae_checkpoint"]


def __getattr__(name):  # heavier optional parts load on first use
    if name == "evaluate_sae":
        from .evaluate import evaluate_sae
        return evaluate_sae
    if name == "import_cytosae_checkpoint":
        from .cytosae_import import import_cytosae_checkpoint
        return import_cytosae_checkpoint
    raise AttributeError(f"module 'cytosae.sae' has no attribute {name!r}")
