"""Patient barcodes and disease comparison.

A patient's barcode is, per latent, the FRACTION of the patient's cells in which the
latent fires above a threshold. CytoSAE divided the firing counts by the number of
latents instead of the number of cells, which makes barcodes depend on the SAE's size
and not on the patient; here the denominator is the patient's cell count, and the raw
counts and cell counts are kept beside the fractions.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Optional

import numpy as np
import pandas as pd
import torch
from pydantic import Field
from scipy import stats as sps

from cytosae.store.format import Written

if TYPE_CHECKING:
    from cytosae.analysis.encoded import EncodedStore

TOKEN_POLICIES = ("cls", "any_patch", "mean")


def cell_activation(z, policy: str) -> torch.Tensor:
    """Token activations -> (b, n_latents) per cell, CLS at token 0: `z` (b, T, n_latents) or an EncodedBatch
    (analysis.encoded), whose sparse form is pooled without building (b, T, n_latents).

    A store with one vector per image (T = 1, imported embeddings) has no patch tokens: every policy then uses
    that vector, the only view of the cell there is."""
    from cytosae.analysis.encoded import EncodedBatch

    if policy not in TOKEN_POLICIES:
        raise ValueError(f"token policy must be one of {TOKEN_POLICIES}, got {policy!r}")
    batch = z if isinstance(z, EncodedBatch) else EncodedBatch([], z.shape[2], dense=z)
    if policy == "cls" or batch.shape[1] == 1:
        return batch.token(0)
    if policy == "any_patch":
        return batch.patch_max()[0]
    return batch.patch_mean()


def patient_barcodes(encoded: "EncodedStore", manifest: pd.DataFrame, threshold: float = 0.0,
                     token_policy: str = "cls", target: str = "diagnosis") -> pd.DataFrame:
    """Long table: patient_id, <target>, latent, frac, count, n_cells.

    One pass over `encoded` (analysis.encoded.EncodedStore), counted on its device; the table is on the CPU."""
    dev, n_latents = encoded.device, encoded.n_latents
    if "patient_id" not in manifest or manifest["patient_id"].isna().all():
        raise ValueError("the data manifest has no patient_id column: barcodes need patients "
                         "(a patient-per-folder tree with --patients, or a CSV with patient_id)")
    if token_policy not in TOKEN_POLICIES:
        raise ValueError(f"token policy must be one of {TOKEN_POLICIES}, got {token_policy!r}")
    patient_of = dict(zip(manifest["image_id"], manifest["patient_id"]))
    patients = sorted({p for p in patient_of.values() if p is not None})
    index = {p: i for i, p in enumerate(patients)}
    counts = torch.zeros(len(patients), n_latents, dtype=torch.long, device=dev)
    n_cells = torch.zeros(len(patients), dtype=torch.long, device=dev)
    for batch in encoded.batches():
        fires = cell_activation(batch, token_policy) > threshold
        rows = torch.tensor([index.get(patient_of.get(i), -1) for i in batch.ids], device=dev)
        keep = rows >= 0
        counts.index_add_(0, rows[keep], fires[keep].long())
        n_cells.index_add_(0, rows[keep], torch.ones(int(keep.sum()), dtype=torch.long, device=dev))
    counts, n_cells = counts.cpu(), n_cells.cpu()
    if int(n_cells.sum()) == 0:
        raise ValueError("no stored cell belongs to a patient in the manifest")
    diagnosis = manifest.drop_duplicates("patient_id").set_index("patient_id")[target] if target in manifest else None
    frac = counts.double() / n_cells.clamp(min=1)[:, None]
    return pd.DataFrame({
        "patient_id": np.repeat(patients, n_latents),
        target: np.repeat([diagnosis.get(p) if diagnosis is not None else None for p in patients], n_latents),
        "latent": np.tile(np.arange(n_latents), len(patients)),
        "frac": frac.flatten().numpy(),
        "count": counts.flatten().numpy(),
        "n_cells": np.repeat(n_cells.numpy(), n_latents),
    })


def disease_barcodes(barcodes: pd.DataFrame, target: str = "diagnosis") -> pd.DataFrame:
    """Mean barcode over the patients of each group (each patient weighs the same, whatever its cell count)."""
    return barcodes.groupby([target, "latent"], as_index=False)["frac"].mean().rename(columns={"frac": "frac_mean"})


def compare_groups(barcodes: pd.DataFrame, target: str = "diagnosis") -> pd.DataFrame:
    """Per latent, rank tests of the patients' firing fractions between the groups of `target`.

    Two groups: Mann-Whitney U, effect = mean(a) - mean(b). More than two: each group against the rest
    (Mann-Whitney, effect = mean(group) - mean(rest)) and one Kruskal-Wallis test over all groups
    (group_a "all", group_b "kruskal_wallis", effect = largest minus smallest group mean).
    q = Benjamini-Hochberg within each comparison (one (group_a, group_b) pair = one family of tests).
    """
    wide = barcodes.pivot(index="patient_id", columns="latent", values="frac")
    groups = barcodes.drop_duplicates("patient_id").set_index("patient_id")[target].reindex(wide.index)
    labels = sorted(groups.dropna().unique())
    if len(labels) < 2:
        raise ValueError(f"column {target!r} has {len(labels)} group(s) among the patients; a comparison needs two or more")
    x = wide.to_numpy()
    rows = []
    pairs = [(labels[0], labels[1])] if len(labels) == 2 else [(g, "rest") for g in labels]
    for a, b in pairs:
        in_a = (groups == a).to_numpy()
        in_b = (groups == b).to_numpy() if b != "rest" else ~in_a & groups.notna().to_numpy()
        test = sps.mannwhitneyu(x[in_a], x[in_b], axis=0, alternative="two-sided")
        rows.append(_family(wide.columns, a, b, test.statistic, test.pvalue, x[in_a].mean(0) - x[in_b].mean(0)))
    if len(labels) > 2:
        samples = [x[(groups == g).to_numpy()] for g in labels]
        means = np.stack([s.mean(0) for s in samples])
        varying = np.ptp(x, axis=0) > 0  # scipy refuses all-identical values; such a latent shows no difference
        stat, p = np.zeros(x.shape[1]), np.ones(x.shape[1])
        if varying.any():
            kw = sps.kruskal(*[s[:, varying] for s in samples], axis=0)
            stat[varying], p[varying] = kw.statistic, kw.pvalue
        rows.append(_family(wide.columns, "all", "kruskal_wallis", stat, p, means.max(0) - means.min(0)))
    table = pd.concat(rows, ignore_index=True)
    return table[["latent", "group_a", "group_b", "statistic", "p", "q", "effect"]].sort_values(
        ["group_a", "group_b", "q", "p"], kind="stable").reset_index(drop=True)


def _family(latents, a, b, statistic, p, effect) -> pd.DataFrame:
    p = np.where(np.isnan(p), 1.0, p)  # a latent constant in both groups shows no difference
    return pd.DataFrame({"latent": np.asarray(latents), "group_a": str(a), "group_b": str(b), "statistic": statistic,
                         "p": p, "q": sps.false_discovery_control(p, method="bh"), "effect": effect})


def write_patients(barcodes: pd.DataFrame, out_dir: str | Path, target: str = "diagnosis", summary: dict | None = None,
                   q_max: float = 0.05, top_barcode_latents: int = 48) -> Path:
    """Tables, figures (barcodes, patient correlation, one volcano per comparison) and summary.json."""
    from cytosae.analysis import figures
    from cytosae.store.format import atomic_write_json, atomic_write_parquet

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tables = {BARCODES: barcodes, DISEASE_BARCODES: disease_barcodes(barcodes, target)}
    n_groups = barcodes.drop_duplicates("patient_id")[target].nunique()
    if n_groups >= 2:
        tables[COMPARE] = compare_groups(barcodes, target)
    for file, table in tables.items():
        atomic_write_parquet(out / file, table)

    variable = barcodes.groupby("latent")["frac"].var().fillna(0).sort_values(ascending=False, kind="stable")
    shown = [int(j) for j in variable.index[:top_barcode_latents]]
    figures.save_figure(figures.barcode_figure(barcodes, target, shown), out / "figures" / "barcodes.png")
    figures.save_figure(figures.patient_correlation_heatmap(barcodes, target), out / "figures" / "patient_correlation.png")
    comparisons = []
    if COMPARE in tables:
        cmp = tables[COMPARE]
        for (a, b), fam in cmp.groupby(["group_a", "group_b"], sort=True):
            fig_path = out / "figures" / f"volcano_{_slug(a)}_vs_{_slug(b)}.png"
            figures.save_figure(figures.volcano(cmp, a, b, q_max=q_max), fig_path)
            top = fam.nsmallest(10, ["q", "p"])
            comparisons.append({
                "group_a": a, "group_b": b, "n_latents": int(len(fam)), f"n_q_below_{q_max}": int((fam.q < q_max).sum()),
                "figure": str(fig_path.relative_to(out)),
                "top_latents": [{"latent": int(r.latent), "effect": float(r.effect), "p": float(r.p), "q": float(r.q)}
                                for r in top.itertuples()]})
    atomic_write_json(out / SUMMARY, {
        "n_patients": int(barcodes.patient_id.nunique()), "target": target,
        "groups": barcodes.drop_duplicates("patient_id")[target].astype(str).value_counts().sort_index().to_dict(),
        "definition": "frac = cells of the patient where the latent fires above threshold / cells of the patient",
        "compare": ("per latent, rank test of the patients' firing fractions between groups (Mann-Whitney U; "
                    "Kruskal-Wallis over all groups when more than two); q = Benjamini-Hochberg within each comparison; "
                    "effect = difference of mean fractions"),
        "comparisons": comparisons,
        "figures": {"barcodes": "figures/barcodes.png (the most variable latents between patients)",
                    "patient_correlation": "figures/patient_correlation.png (Pearson r of barcodes, ordered by "
                                           f"{target})"},
        **(summary or {})})
    return out


def _slug(name) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in str(name))


def write_disease_examples(encoded: "EncodedStore", out_dir: str | Path, target: str = "diagnosis",
                           per_comparison: int = 5, k: int = 8, label_column: str = "label") -> list[dict]:
    """For each comparison in OUT/compare.parquet: its top latents enriched in group_a (smallest q, effect > 0)
    and, for two named groups, in group_b (effect < 0), each shown on the k cells of that group's patients where
    it is strongest, with patch overlays.
    Galleries go to OUT/figures/examples/; the list of what was drawn is returned (and added to summary.json)."""
    from cytosae.analysis.heatmaps import CellViewer, cell_activations, top_cells, write_latent_galleries
    from cytosae.store.format import atomic_write_json

    out = Path(out_dir)
    compare = read_patients_table(out, COMPARE)
    images = encoded.store.images
    viewer = CellViewer(encoded)
    sides = []  # (group, other, its enriched latents, sign of their effect)
    for (a, b), fam in compare[compare.group_b != "kruskal_wallis"].groupby(["group_a", "group_b"], sort=True):
        # effect = mean(a) - mean(b): positive effects are a's concepts; for two named groups, negative ones are b's
        for group, other, enriched, sign in [(a, b, fam[fam.effect > 0], 1.0)] + (
                [(b, a, fam[fam.effect < 0], -1.0)] if b != "rest" else []):
            chosen = enriched.sort_values(["q", "p"], kind="stable").head(per_comparison)
            if not chosen.empty:
                sides.append((group, other, chosen, sign))
    # one encoding pass over the store serves every side's latents
    acts = cell_activations(encoded, sorted({int(j) for _, _, chosen, _ in sides for j in chosen.latent}))
    drawn = []
    for group, other, chosen, sign in sides:
        keep = set(images.loc[images[target].astype(str) == str(group), "image_id"])
        latents = [int(j) for j in chosen.latent]
        cells = top_cells(acts, latents, k=k, keep=keep)
        caption = {int(r.latent): f"{group} vs {other}: +{sign * r.effect:.2f} of cells, q={r.q:.2g}"
                   for r in chosen.itertuples()}
        paths = write_latent_galleries(viewer, cells, latents,
                                       out / "figures" / "examples" / f"{_slug(group)}_vs_{_slug(other)}",
                                       k=k, label_column=label_column, caption=caption)
        drawn.append({"group": group, "versus": other, "latents": latents,
                      "figures": [str(p.relative_to(out)) for p in paths]})
    summary_path = out / SUMMARY
    if summary_path.is_file():
        summary = read_patients_summary(out)
        summary["examples"] = {"what": f"top {per_comparison} latents enriched in each group (smallest q, effect > 0), "
                                       f"on the {k} cells of that group where each is strongest (mean patch activation)",
                               "galleries": drawn}
        atomic_write_json(summary_path, summary)
    return drawn


# ---------------------------------------------------------------- patients/ as its readers read it
SUMMARY = "summary.json"
BARCODES, DISEASE_BARCODES, COMPARE = "barcodes.parquet", "disease_barcodes.parquet", "compare.parquet"
# the columns some reader uses without checking (classify, the explorer's patient pages, notebook PatientView); the
# group column (`diagnosis` by default) is the target's, checked by whoever groups by it
COLUMNS = {BARCODES: ("patient_id", "latent", "frac"), DISEASE_BARCODES: ("latent", "frac_mean"),
           COMPARE: ("latent", "group_a", "group_b", "statistic", "p", "q", "effect")}
FIX = "rebuild it with `cytosae patients` (--run RUN: the same command)"


class TopLatent(Written):
    latent: Annotated[int, Field(ge=0)]
    effect: float
    p: float
    q: float


class Comparison(Written):
    group_a: str
    group_b: str
    n_latents: Annotated[int, Field(ge=0)]
    figure: str
    top_latents: list[TopLatent]


class PatientsSummary(Written):
    n_patients: Annotated[int, Field(ge=0)]
    target: str
    groups: dict[str, Annotated[int, Field(ge=0)]]
    comparisons: list[Comparison]
    definition: Optional[str] = None
    compare: Optional[str] = None
    figures: dict[str, str] = {}
    threshold: Optional[float] = None
    token_policy: Optional[Literal["cls", "any_patch", "mean"]] = None
    store: Optional[str] = None
    dataset: Optional[str] = None
    examples: Optional[dict[str, Any]] = None


def read_patients_summary(patients_dir: str | Path, shown: str | None = None) -> dict:
    """patients/summary.json checked against PatientsSummary; InvalidFile naming the file (`shown`) and field
    otherwise."""
    from cytosae.store.format import read_json_model

    return read_json_model(Path(patients_dir) / SUMMARY, PatientsSummary, FIX, shown)


def read_patients_table(patients_dir: str | Path, file: str, shown: str | None = None) -> pd.DataFrame:
    """One of patients/'s tables (a COLUMNS key) with the columns its readers use, or InvalidFile naming it."""
    from cytosae.store.format import read_table

    return read_table(Path(patients_dir) / file, COLUMNS[file], FIX, shown)


def read_barcodes(path: str | Path, shown: str | None = None) -> pd.DataFrame:
    """The barcodes of folder `path` (its BARCODES), or the barcodes table `path` itself, with the columns their
    readers use; InvalidFile naming it otherwise."""
    from cytosae.store.format import read_table

    path = Path(path)
    return read_table(path / BARCODES if path.is_dir() else path, COLUMNS[BARCODES], FIX, shown)
