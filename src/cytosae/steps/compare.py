"""The compare-saes step: do two SAEs learn the same latents? (cytosae.analysis.stability)"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from cytosae.run import NotARun, Run
from cytosae.steps.common import Warn, device, one_line, open_sae
from cytosae.steps.config import CompareSaesSettings, StepError



@dataclass
class CompareSaesResult:
    figures: dict  # what the JSON holds (cytosae.analysis.stability)
    out: Optional[Path]

    def lines(self) -> list[str]:
        from cytosae.analysis.stability import lines

        return lines(self.figures) + ([f"JSON -> {self.out}; per-latent matches (latent_a, latent_b = -1 unmatched, "
                                       f"cosine) -> {matches_path(self.out)}"] if self.out else [])


def _locate(path: Path) -> tuple[Path, Run | None]:
    """(the SAE directory, its run or None): `path` is an SAE directory (a run's RUN/sae too) or a run."""
    if (path / "config.json").is_file():
        try:
            rd = Run.open(path.parent)
        except (NotARun, ValueError):
            return path, None
        return path, rd if rd.sae_dir.resolve() == path.resolve() else None
    try:
        rd = Run.open(path)
    except (NotARun, ValueError) as exc:
        raise StepError(f"{path}: neither an SAE directory (config.json + sae.safetensors) nor a run ({exc})") from None
    return rd.sae_dir, rd


def _top_images(rd: Run | None):
    """The run's stats/top_images.parquet (None: no run, or no stats yet)."""
    from cytosae.analysis.stats import TOP_IMAGES, read_stats_table

    if rd is None or not (rd.stats_dir / TOP_IMAGES).is_file():
        return None
    with one_line():
        return read_stats_table(rd.stats_dir, TOP_IMAGES)


def run_compare_saes(cfg: CompareSaesSettings, run: None = None, warn: Warn = None) -> CompareSaesResult:
    """Match A's latents to B's by decoder cosine and report how many are shared; with both runs' stats, how far
    matched latents' top images overlap. Writes the figures to cfg.out when given. It reads two SAEs and records
    in no run (`run` must be None)."""
    from cytosae.analysis.stability import matching_figures, match_latents, sae_summary, top_image_overlap
    from cytosae.analysis.stability import DEFINITIONS
    from cytosae.store.format import atomic_write_json, atomic_write_parquet

    if run is not None:
        raise StepError("compare-saes reads two SAEs (or runs) and writes into neither: give A and B, not --run")
    (dir_a, rd_a), (dir_b, rd_b) = _locate(cfg.a), _locate(cfg.b)
    sae_a, sae_b = open_sae(dir_a, cfg.allow_unfinished, warn), open_sae(dir_b, cfg.allow_unfinished, warn)
    dev = device(cfg.device)
    with one_line():
        m = match_latents(sae_a.W_dec, sae_b.W_dec, c=cfg.candidates, device=dev, method=cfg.method)
    figures = {"a": sae_summary(sae_a, dir_a), "b": sae_summary(sae_b, dir_b), "method": m.method,
               "candidates": m.candidates, "device": str(dev), **matching_figures(m), "top_images": None}
    tops_a, tops_b = _top_images(rd_a), _top_images(rd_b)
    if tops_a is not None and tops_b is not None:
        figures["top_images"] = top_image_overlap(m, tops_a, tops_b)
    figures["definitions"] = DEFINITIONS
    if cfg.out is not None:
        import pandas as pd

        matches = matches_path(cfg.out)  # which latents are the stable ones: per latent of A, its partner in B
        atomic_write_parquet(matches, pd.DataFrame({"latent_a": range(m.match.size), "latent_b": m.match,
                                                    "cosine": m.cosine}))
        figures["matches"] = matches.name
        atomic_write_json(cfg.out, figures)
    return CompareSaesResult(figures, cfg.out)


def matches_path(out: Path) -> Path:
    """Where the per-latent matches go: next to the JSON (stability.json -> stability.matches.parquet)."""
    return out.with_name(f"{out.stem}.matches.parquet")
