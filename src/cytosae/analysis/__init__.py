"""Concepts: what each latent responds to, over datasets."""
from .stats import LatentStats, compute_latent_stats, entropy, factor_purity, write_stats

__all__ = ["LatentStats", "compute_latent_stats", "entropy", "factor_purity", "write_stats"]
from .patients import compare_groups, disease_barcodes, patient_barcodes, write_patients

__all__ += ["compare_groups", "disease_barcodes", "patient_barcodes", "write_patients"]
