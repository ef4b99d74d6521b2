"""Run summary (`run_router`), overview table and search (`overview_router`), latent page and its heatmaps
(`latent_router`)."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
from fastapi import APIRouter, Query
from fastapi import Path as PathParam

from .annotations import STATUSES, Status
from .routes_quality import latent_class_ap
from .rundir import DamagedData, MissingData, RunDir
from .state import MAX_K, MAX_LATENT_QUERY, Explorer, ExplorerDep, FastJSON, nan_none, search_latents
from .tables import LatentIndexed, records, to_json

run_router = APIRouter()
overview_router = APIRouter()
latent_router = APIRouter()

OVERVIEW_COLUMNS = ("latent", "freq_image", "freq_token", "mean_act", "max_act", "label_entropy", "top_label", "noisy")
OVERVIEW_MEASURED = ("per latent on this dataset's images: freq_image = fraction of images where the latent fires "
                     "on any token, mean_act = mean image activation (mean over patch tokens) where it fires, "
                     "label_entropy = entropy (nats) of the labels of its top-k images (stats/summary.json)")
LATENT_MEASURED = {
    "top_images": "images with the highest activation of this latent: by=image = mean over the patch tokens, "
                  "by=patch on the best patch token",
    "class_profile": "per class: mean image activation (mean over patch tokens) and fraction of images where the latent fires",
    "histogram": "distribution of non-zero image activations (mean over patch tokens) over the dataset's images",
    "patients": "patients with the largest fraction of cells where the latent fires (barcodes)",
    "neighbours": "latents whose decoder direction has the highest cosine similarity",
}


# ------------------------------------------------------------------ run
@run_router.get("/api/run", summary="What this run holds: datasets, SAE, which analyses exist")
def run_info(ex: ExplorerDep):
    run = ex.run
    datasets, has = _dataset_entries(run), _analyses(run)
    try:
        sae = run.sae_config
    except MissingData:
        sae = None
    backbone = _backbone(run)
    return ex.redact_deep(to_json({
        "run": str(run.path.name), "created": run.meta.get("created"),
        "cytosae_version": run.meta.get("cytosae_version"),
        "datasets": datasets, "n_latents": run.n_latents, "sae": sae, "shown_sae": run.shown_sae(),
        "preprocessing": run.preprocessing(), "backbone": backbone,
        "stats_summary": run.summary("stats"), "patients_summary": run.summary("patients"),
        "has": has,
        "statuses": list(STATUSES),
        "neighbours_precomputed": ex.neighbours.precomputed,
        "annotations_error": ex.annotations.error,  # the page shows it as a banner: read-only, and why
    }))


# ------------------------------------------------------------------ overview
@overview_router.get("/api/latents",
                     summary="All latents of one dataset as columns (overview scatter), optionally filtered")
def latents(ex: ExplorerDep, dataset: str | None = None,
            cls: str | None = Query(None, description="top_label equals this class"),
            entropy_min: float | None = None, entropy_max: float | None = None,
            freq_min: float | None = Query(None, ge=0, le=1), freq_max: float | None = Query(None, ge=0, le=1),
            annotated: bool | None = None, status: Status | None = None, q: str | None = Query(None, max_length=200)):
    dataset = ex.dataset(dataset)
    lat = ex.run.latents
    if lat is None:
        raise ex.run.missing("stats/latents.parquet")
    ann = ex.annotation_names()
    df = _filter_latents(lat[lat["dataset"] == dataset], ann, cls, annotated, status,
                         {"label_entropy": (entropy_min, entropy_max), "freq_image": (freq_min, freq_max)})
    if q:
        df = df[df["latent"].isin([m["latent"] for m in search_latents(ex, q, len(df) + 1)])]
    # returned as a Response: FastAPI's jsonable_encoder would walk 400k values one by one (~0.7 s at 49k latents)
    return FastJSON({"dataset": dataset, "sae": ex.run.shown_sae(), "n": len(df), "n_latents": ex.run.n_latents,
                     "columns": _overview_columns(df, ann), "measured": OVERVIEW_MEASURED})


@overview_router.get("/api/search", summary="Find latents by id or by annotation name/tag/note")
def search(ex: ExplorerDep, q: str = Query(..., min_length=1, max_length=200), limit: int = Query(50, ge=1, le=1000)):
    return {"q": q, "results": search_latents(ex, q, limit)}


# ------------------------------------------------------------------ latent
@latent_router.get("/api/latents/{latent}", summary="Everything about one latent: stats, top images, class profile, "
                                                    "histogram, enriched patients, neighbours, annotation")
def latent_page(ex: ExplorerDep, latent: int = PathParam(..., ge=0, le=MAX_LATENT_QUERY),
                k: int = Query(12, ge=1, le=MAX_K), n_neighbours: int = Query(10, ge=1, le=100)):
    latent = ex.latent(latent)
    run = ex.run
    a = ex.annotations.get(latent)
    # every table is sliced by binary search and turned into rows without pandas: this page is the one people
    # click through fastest (bench/explorer.py --concurrency)
    li = run.latents_indexed()
    out: dict = {"latent": latent, "n_latents": run.n_latents, "annotation": a.to_dict() if a else None,
                 "stats": li.records(latent) if li is not None else [],
                 "top_images": _top_images(run.table("stats/top_images"), latent, k),
                 "class_profile": _class_profile(run.table("stats/class_profile"), latent),
                 "histogram": _histograms(run.table("stats/histograms"), latent),
                 **_enriched_patients(run.table("patients/barcodes"), latent)}
    cmp_ = run.table("patients/compare")
    out["compare"] = cmp_.records(latent) if cmp_ is not None else []
    out.update(_neighbours(ex, latent, n_neighbours))
    out["description"] = _description(run, latent)  # None until `cytosae describe` wrote RUN/concepts
    out["class_ap"] = latent_class_ap(run, latent)  # None until `cytosae align` wrote quality/latent_classes.parquet
    out["measured"] = LATENT_MEASURED
    return FastJSON(out)  # already JSON-ready: skip FastAPI's per-value encoder


@latent_router.get("/api/latents/{latent}/heatmaps", summary="Per-patch activation of a latent on its top images")
def latent_heatmaps(ex: ExplorerDep, latent: int = PathParam(..., ge=0, le=MAX_LATENT_QUERY), dataset: str | None = None,
                    by: str = Query("image", pattern="^(image|patch)$"), k: int = Query(12, ge=1, le=50)):
    latent = ex.latent(latent)
    dataset = ex.dataset(dataset)
    top = ex.run.table("stats/top_images")
    if top is None:
        raise ex.run.missing("stats/top_images.parquet")
    rows = top.rows(latent)
    rows = rows[(rows["dataset"] == dataset) & (rows["by"] == by)].head(k)
    items = []
    for r in records(rows):
        image_id = str(r["image_id"])
        cls, values, grid = ex.latent_map(dataset, image_id, latent)
        items.append({"image_id": image_id, "rank": r["rank"], "value": r["value"], "label": r.get("label"),
                      "patch": r.get("patch"), "grid": grid, "cls": cls, "values": values})
    return {"latent": latent, "dataset": dataset, "by": by, "items": to_json(items)}


# ------------------------------------------------------------------ helpers: /api/run
def _dataset_entries(run: RunDir) -> list[dict]:
    """Name, image count and labels of each dataset (None and [] when its images table is missing)."""
    datasets = []
    for name in run.datasets:
        entry = {"name": name, "n_images": None, "labels": []}
        try:
            imgs = run.images(name)
            entry["n_images"] = len(imgs)
            if "label" in imgs:
                entry["labels"] = sorted(str(x) for x in imgs["label"].dropna().unique())
        except MissingData:
            pass
        datasets.append(entry)
    return datasets


def _backbone(run: RunDir) -> dict:
    backbone = run.backbone_spec()
    if backbone.get("weights"):  # a server path: only its name (relative to the run when inside it) is shown
        w = Path(backbone["weights"])
        backbone["weights"] = run.rel(w if w.is_absolute() else run.path / w)
    return backbone


def _analyses(run: RunDir) -> dict[str, bool]:
    # file checks, not loads: the first page should not wait for every table to be read
    return {"stats": run.latents is not None, "top_images": run.file("stats/top_images.parquet").is_file(),
            "patients": run.file("patients/barcodes.parquet").is_file(),
            "compare": run.file("patients/compare.parquet").is_file(),
            "classify": run.file("classify/results.json").is_file()}


# ------------------------------------------------------------------ helpers: /api/latents
def _description(run, latent: int) -> dict | None:
    """The latent's automatic description: its one line and the measured facts behind it."""
    table = run.descriptions()
    if table is None or latent not in table.index:
        return None
    return {"latent": latent, **records(table.loc[[latent]].reset_index().drop(columns="latent"))[0]}


def _filter_latents(df: pd.DataFrame, ann: dict[int, dict], cls: str | None, annotated: bool | None,
                    status: str | None, ranges: dict[str, tuple[float | None, float | None]]) -> pd.DataFrame:
    """The overview rows that pass every filter given; `ranges`: column -> (min, max), inclusive, None = open."""
    if cls is not None:
        df = df[df["top_label"].astype(str) == cls]
    for col, (lo, hi) in ranges.items():
        if lo is not None:
            df = df[df[col] >= lo]
        if hi is not None:
            df = df[df[col] <= hi]
    if annotated is not None:
        has = df["latent"].isin(list(ann))
        df = df[has if annotated else ~has]
    if status is not None:
        st = df["latent"].map(lambda j: ann.get(j, {}).get("status", "unreviewed"))
        df = df[st == status]
    return df


def _overview_columns(df: pd.DataFrame, ann: dict[int, dict]) -> dict[str, list]:
    cols = {c: nan_none(df[c]) for c in OVERVIEW_COLUMNS if c in df}
    cols["name"] = [ann.get(j, {}).get("name", "") for j in cols.get("latent", [])]
    cols["status"] = [ann.get(j, {}).get("status", "") for j in cols.get("latent", [])]
    return cols


# ------------------------------------------------------------------ helpers: /api/latents/{latent}
def _top_images(top: LatentIndexed | None, latent: int, k: int) -> dict[str, dict[str, list]]:
    """dataset -> by (image | patch) -> the latent's first k top images."""
    out: dict = {}
    if top is not None:
        for r in top.records(latent, ["dataset", "by", "rank", "image_id", "value", "patch", "label"]):
            group = out.setdefault(str(r.pop("dataset")), {}).setdefault(str(r.pop("by")), [])
            if len(group) < k:
                group.append(r)
    return out


def _class_profile(cp: LatentIndexed | None, latent: int) -> dict[str, list]:
    out: dict = {}
    if cp is not None:
        for r in cp.records(latent, ["dataset", "class", "mean_act", "freq"]):
            out.setdefault(str(r.pop("dataset")), []).append(r)
    return out


def _histograms(hist: LatentIndexed | None, latent: int) -> dict[str, dict]:
    if hist is None:
        return {}
    return {str(r["dataset"]): {"bin_edges": r["bin_edges"], "counts": r["counts"]}
            for r in hist.records(latent, ["dataset", "bin_edges", "counts"])}


def _enriched_patients(bc: LatentIndexed | None, latent: int) -> dict:
    """The 20 patients whose cells fire most often, each with its fraction over the mean over all patients."""
    pts = bc.records(latent, ["patient_id", "diagnosis", "frac", "count", "n_cells"]) if bc is not None else []
    if not pts:
        return {"patients": []}
    fracs = [p["frac"] for p in pts if p["frac"] is not None]
    mean = sum(fracs) / len(fracs) if fracs else float("nan")
    pts.sort(key=lambda p: -(p["frac"] if p["frac"] is not None else -1.0))  # stable, like pandas'
    pts = pts[:20]
    for p in pts:
        p["enrichment"] = (p["frac"] / mean) if mean > 0 and p["frac"] is not None else None
    return {"patients": pts, "patients_mean_frac": to_json(mean)}


def _neighbours(ex: Explorer, latent: int, n: int) -> dict:
    try:
        nb = ex.neighbours.get()
    except (MissingData, DamagedData) as exc:  # the rest of the page stands without the decoder
        return {"neighbours": [], "neighbours_error": str(exc)}
    out = []
    for j, s in nb.query(latent, n):
        a_j = ex.annotations.get(j)
        out.append({"latent": j, "cosine": s, "name": a_j.name if a_j else ""})
    return {"neighbours": out}
