"""Concepts: what each latent responds to, over datasets."""
from .stats import LatentStats, compute_latent_stats, entropy, factor_purity, write_stats

__all__ = ["LatentStats", "compute_latent_stats", "entropy", "factor_purity", "write_stats"]
