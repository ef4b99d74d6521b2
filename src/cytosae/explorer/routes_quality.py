"""How good the SAE is (`quality_router`): reconstruction and sparsity (`cytosae evaluate`: sae/eval.json, and
eval.spliced.json with --spliced), label alignment against baselines and sparse probing (`cytosae align`:
quality/), each figure with its definition; and one latent's AP per class for the latent page."""
from __future__ import annotations

from fastapi import APIRouter, HTTPException

from cytosae.steps.evaluate import EVAL, SPLICED

from .rundir import RunDir
from .state import ExplorerDep
from .tables import records, to_json

quality_router = APIRouter()

# alignment parts and the files they are read from (all written by one `cytosae align`)
ALIGN_FILES = {"table": "alignment.parquet", "per_class": "alignment_classes.parquet"}
LATENT_CLASS_AP = ("per class: this SAE latent's average precision (AP) and AUROC as a ranking of the labelled images "
                   "(image score pooled by the align token policy); chance AP = the class's prevalence; best = the "
                   "class of highest AP (quality/latent_classes.parquet, `cytosae align`)")


@quality_router.get("/api/quality", summary="How good the SAE is: reconstruction and sparsity (eval.json), label "
                                            "alignment vs baselines and sparse probing (quality/), with definitions")
def quality(ex: ExplorerDep):
    """Every part the run has; `missing` names each absent file and the command that writes it (404 when the run has
    none of them: neither `cytosae evaluate` nor `cytosae align` ran)."""
    run = ex.run
    missing: list[str] = []
    evaluate = _eval_part(run, EVAL, missing)
    spliced = _eval_part(run, SPLICED, missing)
    alignment = _alignment_part(run, missing)
    if evaluate is None and alignment is None:
        raise HTTPException(404, "no quality figures in this run: " + "; ".join(missing))
    return ex.redact_deep(to_json({"evaluate": evaluate, "spliced": spliced, "alignment": alignment,
                                   "missing": missing}))


def latent_class_ap(run: RunDir, latent: int) -> dict | None:
    """The latent page's `class_ap`: the latent's AP and AUROC per class and its best class (None without align)."""
    lc = run.table("quality/latent_classes")
    if lc is None:
        return None
    rows = lc.records(latent, ["class", "ap", "auroc", "prevalence", "best"])
    best = next((r["class"] for r in rows if r["best"]), None)
    summary = run.quality_json("alignment.json") or {}
    return {"dataset": summary.get("dataset"), "token_policy": summary.get("token_policy"), "best_class": best,
            "classes": rows, "measured": LATENT_CLASS_AP}


def _eval_part(run: RunDir, name: str, missing: list[str]) -> dict | None:
    doc = run.quality_json(name)
    if doc is None:
        missing.append(str(run.missing(f"{run.rel(run.sae_dir)}/{name}")))
    return doc


def _alignment_part(run: RunDir, missing: list[str]) -> dict | None:
    """alignment.json's summary and definitions with the method, per-class and probing tables from their parquet
    files; None (and each absent file in `missing`) unless align wrote all three files."""
    summary = run.quality_json("alignment.json")
    tables = {key: run.raw_table(f"quality/{name[:-len('.parquet')]}") for key, name in ALIGN_FILES.items()}
    absent = ([] if summary is not None else ["alignment.json"]) + [ALIGN_FILES[k] for k, t in tables.items() if t is None]
    missing += [str(run.missing(f"quality/{name}")) for name in absent]
    if absent:
        return None
    probing = dict(summary.get("probing") or {})
    per_class = run.raw_table("quality/probing")
    probing["per_class"] = records(per_class) if per_class is not None else []
    keep = ("dataset", "n_images", "n_labelled", "classes", "label_column", "token_policy", "sae", "seed",
            "fit_tokens", "max_clusters", "definitions")
    return {**{k: summary.get(k) for k in keep}, "table": records(tables["table"]),
            "per_class": records(tables["per_class"]), "probing": probing}
