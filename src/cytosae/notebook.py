"""A run in a notebook: its tables as pandas DataFrames, and latents, images and patients that draw themselves.

    import cytosae
    run = cytosae.open_run("runs/demo")
    run.stats                   # one row per (dataset, latent), as the explorer's overview reads it
    run.latent(12)              # a card: statistics, annotation, top images with the heatmap overlaid

Everything is read through the explorer's own readers (`explorer.rundir.RunDir` for the layout and tables,
`explorer.activations.Encoder` for the SAE's per-patch activations, `explorer.annotations.AnnotationStore`
for annotations), lazily: opening a run reads run.json only, and each table is read once, on first use.
A table the run lacks raises `MissingData` in one line naming the file and the command that writes it.
Every string put in HTML is escaped: image ids, labels and annotations are data, never markup.
"""
from __future__ import annotations

import base64
import copy
import html
import math
import sqlite3
from pathlib import Path

import numpy as np
import pandas as pd

from .explorer.annotations import AnnotationStore
from .explorer.rundir import DamagedData, MissingData, RunDir

__all__ = ["open_run", "RunView", "LatentView", "ImageView", "PatientView", "MissingData", "DamagedData"]

THUMB = 128  # px of a card's thumbnails (the model saw 224): a card of 8 stays well under a megabyte
ALPHA = 0.55  # overlay opacity at the colour scale's top, as in the stats galleries
# what each figure measured, in the explorer's words (routes_latents.py), so a card and the explorer agree
MEASURED_STATS = ("per latent on the dataset's images: freq_image = fraction of images where the latent fires on any "
                  "token, freq_token = fraction of tokens, mean_act = mean image activation (mean over patch tokens) "
                  "where it fires, label_entropy = entropy (nats) of the labels of its top-k images")
MEASURED_TOP = ("images with the highest activation of this latent (mean over the patch tokens); overlay: activation "
                "of the latent on each patch, transparent at 0, full colour at the largest patch value of these images")
_ERRORS = (MissingData, DamagedData, OSError, ValueError, KeyError, IndexError)  # what one thumbnail may meet


def open_run(path: str | Path, data_roots: list | None = None, device: str = "cpu",
             sae: str | None = None) -> "RunView":
    """The run at `path` (docs/run-layout.md). `data_roots`: folders the images are in now, when they moved
    (PATH, or NAME=PATH for one dataset), as `cytosae explore --data-root`; `device`: where the SAE encodes;
    `sae`: the SAE of the run's sweep to read (its own stats, quality, annotations), as `cytosae explore --sae`;
    None: the run's own SAE."""
    return RunView(path, data_roots, device, sae)


# ---------------------------------------------------------------------- small HTML pieces
def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value) -> str:
    """A table value as text: floats to 4 significant digits, missing values as a dash."""
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.4g}"
    return str(value)


def _table_html(df: pd.DataFrame, columns: list[str] | None = None) -> str:
    cols = [c for c in (columns or list(df.columns)) if c in df.columns]
    head = "".join(f"<th style='text-align:left;padding:1px 6px'>{_e(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td style='padding:1px 6px'>{_e(_fmt(v))}</td>" for v in row) + "</tr>"
                   for row in df[cols].itertuples(index=False, name=None))
    return f"<table style='border-collapse:collapse;font-size:12px'><tr>{head}</tr>{body}</table>"


def _note(text: str) -> str:
    return f"<div style='color:#666;font-size:11px;margin:2px 0'>{_e(text)}</div>"


def _png(img) -> bytes:
    from .explorer.imaging import png_bytes

    return png_bytes(img)


def _img_tag(img, caption: str, title: str, size: int = THUMB) -> str:
    thumb = img.copy()
    thumb.thumbnail((size, size))
    data = base64.b64encode(_png(thumb)).decode("ascii")
    return (f"<figure style='margin:0;width:{size}px;font-size:11px;text-align:center'>"
            f"<img src=\"data:image/png;base64,{data}\" width='{thumb.width}' height='{thumb.height}' "
            f"title='{_e(title)}' alt='{_e(title)}'><figcaption style='overflow-wrap:anywhere'>{caption}"
            f"</figcaption></figure>")


def _failed_tile(caption: str, error: BaseException, size: int = THUMB) -> str:
    return (f"<figure style='margin:0;width:{size}px;font-size:11px;color:#a00'><div style='height:{size}px;"
            f"overflow:hidden;border:1px dashed #ccc'>{_e(error)}</div><figcaption>{caption}</figcaption></figure>")


def _badge(annotation: dict | None) -> str:
    if not annotation:
        return ""
    colour = {"validated": "#2a7", "rejected": "#c33"}.get(annotation.get("status"), "#888")
    name = f" {_e(annotation['name'])}" if annotation.get("name") else ""
    return (f"{name} <span style='font-size:11px;color:white;background:{colour};border-radius:3px;padding:0 4px'>"
            f"{_e(annotation.get('status', ''))}</span>")


# ---------------------------------------------------------------------- the run
class RunView:
    """One run, read lazily through the explorer's RunDir. Open it with `cytosae.open_run(path)`."""

    def __init__(self, path: str | Path, data_roots: list | None = None, device: str = "cpu",
                 sae: str | None = None) -> None:
        self._dir = RunDir(path, data_roots, sae=sae)
        self._device = device
        self._encoder = None
        self._annotation_store: AnnotationStore | None = None

    # ------------------------------------------------------------------ what the run is
    @property
    def path(self) -> Path:
        return self._dir.path

    @property
    def rundir(self) -> RunDir:
        """The explorer's reader of this run (tables cached there are shared with this view)."""
        return self._dir

    @property
    def datasets(self) -> list[str]:
        return list(self._dir.datasets)

    @property
    def shown_sae(self) -> dict:
        """Which SAE this view reads (name, arch, k, expansion, layer, n_latents, its sweep; `title` in one line)."""
        return self._dir.shown_sae()

    @property
    def n_latents(self) -> int:
        return self._dir.n_latents

    @property
    def sae_config(self) -> dict:
        return copy.deepcopy(self._dir.sae_config)

    @property
    def sae(self):
        """The run's SAE (cytosae.sae.SAE), loaded on first use on this view's device."""
        return self.encoder.sae

    @property
    def encoder(self):
        """The explorer's Encoder over this run: per-image activations through the run's SAE, cached per image."""
        if self._encoder is None:
            from .devices import resolve_device
            from .explorer.activations import Encoder

            self._encoder = Encoder(self._dir, device=resolve_device(self._device))
        return self._encoder

    def dataset(self, name: str | None = None) -> str:
        """`name` checked against the run, or the run's first dataset (as the explorer picks) when None."""
        if name is None:
            if not self._dir.datasets:
                raise MissingData(f"{self._dir.rel(self.path / 'run.json')} names no dataset: extract one with "
                                  "`cytosae extract DATA --run RUN`")
            return next(iter(self._dir.datasets))
        self._dir.check_dataset(name)
        return name

    # ------------------------------------------------------------------ tables (plain DataFrames, copies)
    def table(self, name: str) -> pd.DataFrame:
        """A run table by its name in docs/run-layout.md without .parquet, e.g. "stats/top_images",
        "classify/predictions". Sorted by latent where it has one (the explorer's order)."""
        indexed = ("stats/top_images", "stats/class_profile", "stats/histograms", "patients/barcodes",
                   "patients/compare")
        if name == "stats/latents":
            df = self._dir.latents
        elif name in indexed:
            t = self._dir.table(name)
            df = None if t is None else t.df
        else:
            df = self._dir.raw_table(name)
        if df is None:
            raise self._dir.missing(f"{name}.parquet")
        return df.copy()  # the cached table stays what the files hold, whatever a notebook does to its copy

    @property
    def stats(self) -> pd.DataFrame:
        """stats/latents.parquet: one row per (dataset, latent); columns in docs/run-layout.md."""
        return self.table("stats/latents")

    @property
    def top_images(self) -> pd.DataFrame:
        return self.table("stats/top_images")

    @property
    def class_profile(self) -> pd.DataFrame:
        return self.table("stats/class_profile")

    @property
    def histograms(self) -> pd.DataFrame:
        return self.table("stats/histograms")

    @property
    def barcodes(self) -> pd.DataFrame:
        """patients/barcodes.parquet (long): patient_id, diagnosis, latent, frac, count, n_cells."""
        return self.table("patients/barcodes")

    @property
    def compare(self) -> pd.DataFrame:
        return self.table("patients/compare")

    @property
    def predictions(self) -> pd.DataFrame:
        return self.table("classify/predictions")

    @property
    def classify_results(self) -> dict:
        """classify/results.json as written (a copy), checked by its writer's reader."""
        from .analysis.classify_results import RESULTS

        res = self._dir.classify_results
        if res is None:
            raise self._dir.missing(self._dir.rel(self._dir.run.classify_dir / RESULTS))
        return copy.deepcopy(res)

    def summary(self, part: str = "stats") -> dict:
        """stats/summary.json (part "stats": what was measured on what, and the definitions) or
        patients/summary.json ("patients": groups, token policy, comparisons), as written (a copy)."""
        from .analysis import patients, stats

        if part not in ("stats", "patients"):
            raise ValueError(f"part must be 'stats' or 'patients', got {part!r}")
        res = self._dir.summary(part)
        if res is None:
            file = {"stats": stats.SUMMARY, "patients": patients.SUMMARY}[part]
            raise self._dir.missing(f"{part}/{file}")
        return copy.deepcopy(res)

    @property
    def classify(self) -> pd.DataFrame:
        """One row per classifier of classify/results.json: its scalar scores, confidence intervals as _lo/_hi."""
        rows = []
        for name, scores in (self.classify_results.get("models") or {}).items():
            row = {"name": name}
            for key, v in scores.items():
                if isinstance(v, (list, tuple)) and len(v) == 2 and key.endswith("_ci"):
                    row[key + "_lo"], row[key + "_hi"] = v
                elif v is None or isinstance(v, (str, int, float, bool)):
                    row[key] = v
            rows.append(row)
        return pd.DataFrame(rows)

    def images(self, dataset: str | None = None) -> pd.DataFrame:
        """The dataset's images.parquet (store order): image_id, path and the manifest's columns."""
        return self._dir.images(self.dataset(dataset)).reset_index(drop=True)

    # ------------------------------------------------------------------ annotations
    def _annotations(self) -> dict[int, dict]:
        """Every annotation, read now (the explorer may have written since); empty when the run has none yet.
        A run without annotations.sqlite is left without one: reading a run never creates files in it."""
        path = self._dir.run.annotations
        if self._annotation_store is None:
            if not path.is_file():
                return {}
            try:
                self._annotation_store = AnnotationStore(path)
            except sqlite3.DatabaseError as exc:
                raise self._dir.damaged(path, exc) from None
        try:
            return {a.latent: a.to_dict() for a in self._annotation_store.all()}
        except (sqlite3.DatabaseError, ValueError) as exc:  # not SQLite, or a row whose tags are not JSON
            raise self._dir.damaged(path, exc) from None

    @property
    def annotations(self) -> pd.DataFrame:
        """annotations.sqlite: latent, name, tags, note, status, author, updated (one row per annotated latent)."""
        from .explorer.annotations import FIELDS

        return pd.DataFrame(list(self._annotations().values()), columns=list(FIELDS))

    def annotation(self, latent: int) -> dict | None:
        return self._annotations().get(int(latent))

    # ------------------------------------------------------------------ views
    def latent(self, latent: int, dataset: str | None = None, k: int = 8) -> "LatentView":
        """Latent `latent`: its statistics, annotation and top `k` images of `dataset` (default: the first)."""
        return LatentView(self, latent, dataset, k)

    def image(self, dataset: str, image_id: str, k: int = 10) -> "ImageView":
        """Image `image_id` of `dataset` as the model saw it, with its `k` strongest latents."""
        return ImageView(self, dataset, image_id, k)

    def patient(self, patient_id: str, k: int = 16) -> "PatientView":
        """Patient `patient_id`: diagnosis and barcode (the `k` latents firing in most of their cells)."""
        return PatientView(self, patient_id, k)

    # ------------------------------------------------------------------ shared by the views
    def _check_latent(self, latent: int) -> int:
        n = self.n_latents
        j = int(latent)
        if not 0 <= j < n:
            raise IndexError(f"latent {latent} does not exist; this SAE has latents 0..{n - 1}")
        return j

    def picture(self, dataset: str, image_id: str):
        """The image as the backbone saw it (the store's resize), read from its file under the data folders."""
        from .explorer.imaging import model_view, open_image

        row = self._dir.image_row(dataset, image_id)
        path = self._dir.image_file(dataset, image_id, row.get("path"))
        if path is None or not Path(path).is_file():
            raise FileNotFoundError(f"the image file of {image_id!r} is not under the data folders of {dataset!r}; "
                                    "if the data moved, open the run with open_run(RUN, data_roots=[NEW_FOLDER])")
        return model_view(open_image(path), self._dir.preprocessing(dataset))

    def heatmap(self, dataset: str, image_id: str, latent: int) -> np.ndarray:
        """(grid, grid) activation of `latent` on each patch of a stored image (the SAE's full encoder)."""
        self._dir.image_row(dataset, image_id)  # a clear KeyError for an unknown id
        _, values, grid = self.encoder.latent_map(dataset, image_id, self._check_latent(latent))
        return np.asarray(values, dtype=np.float32).reshape(grid, grid)

    def overlay(self, dataset: str, image_id: str, latent: int, vmax: float | None = None):
        """The image with the latent's per-patch activation blended on (analysis.heatmaps.overlay)."""
        from .analysis.heatmaps import overlay

        amap = self.heatmap(dataset, image_id, latent)
        img = self.picture(dataset, image_id)
        return overlay(img, amap, alpha=ALPHA, vmax=vmax) if amap.size else img

    def _has(self) -> dict[str, bool]:
        from .analysis import patients, stats
        from .analysis.classify_results import RESULTS

        run = self._dir.run
        return {"stats": (run.stats_dir / stats.LATENTS).is_file(),
                "top_images": (run.stats_dir / stats.TOP_IMAGES).is_file(),
                "patients": (run.patients_dir / patients.BARCODES).is_file(),
                "classify": (run.classify_dir / RESULTS).is_file(), "annotations": run.annotations.is_file()}

    def __repr__(self) -> str:
        has = [k for k, v in self._has().items() if v]
        return f"<cytosae run {self.path.name}: {self.shown_sae['title']}; datasets {self.datasets}, has {has}>"

    def _repr_html_(self) -> str:
        rows = []
        for name in self.datasets:
            try:
                n = len(self._dir.images(name))
            except (MissingData, DamagedData) as exc:
                n = str(exc)
            rows.append({"dataset": name, "images": n})
        has = ", ".join(k for k, v in self._has().items() if v) or "nothing yet"
        return (f"<div style='font-family:sans-serif'><b>cytosae run {_e(self.path.name)}</b>: "
                f"{_e(self.shown_sae['title'])}; has {_e(has)}{_table_html(pd.DataFrame(rows))}</div>")


# ---------------------------------------------------------------------- a latent
class LatentView:
    """One latent of a run: `.stats`, `.top_images`, `.class_profile`, `.annotation`, and a card in a notebook."""

    def __init__(self, run: RunView, latent: int, dataset: str | None = None, k: int = 8) -> None:
        self.run = run
        self.latent = run._check_latent(latent)
        self.dataset = run.dataset(dataset)
        self.k = int(k)

    def _rows(self, name: str) -> pd.DataFrame:
        rd = self.run._dir
        t = rd.latents_indexed() if name == "stats/latents" else rd.table(name)
        if t is None:
            raise rd.missing(f"{name}.parquet")
        return t.rows(self.latent).reset_index(drop=True)

    @property
    def stats(self) -> pd.DataFrame:
        """This latent's rows of stats/latents.parquet (one per dataset)."""
        return self._rows("stats/latents")

    @property
    def top_images(self) -> pd.DataFrame:
        """This latent's top `k` images of its dataset, by image (mean over patch tokens), from stats/top_images."""
        rows = self._rows("stats/top_images")
        rows = rows[(rows["dataset"] == self.dataset) & (rows["by"] == "image")]
        return rows.sort_values("rank", kind="stable").head(self.k).reset_index(drop=True)

    @property
    def class_profile(self) -> pd.DataFrame:
        return self._rows("stats/class_profile")

    @property
    def annotation(self) -> dict | None:
        return self.run.annotation(self.latent)

    def heatmap(self, image_id: str) -> np.ndarray:
        return self.run.heatmap(self.dataset, image_id, self.latent)

    def overlay(self, image_id: str, vmax: float | None = None):
        return self.run.overlay(self.dataset, image_id, self.latent, vmax)

    def _stat_line(self) -> str:
        try:
            s = self.stats
        except (MissingData, DamagedData):
            return "no stats"
        s = s[s["dataset"] == self.dataset]
        if not len(s):
            return f"no stats on {self.dataset}"
        r = s.iloc[0]
        return f"freq_image {_fmt(r.get('freq_image'))} on {self.dataset}, top class {_fmt(r.get('top_label'))}"

    def __repr__(self) -> str:
        a = self.annotation
        named = f", {a['name']!r} [{a['status']}]" if a else ""
        return f"<latent {self.latent} of {self.run.n_latents}: {self._stat_line()}{named}>"

    def _stats_html(self) -> str:
        try:
            s = self.stats
        except (MissingData, DamagedData) as exc:
            return _note(str(exc))
        return _table_html(s, ["dataset", "freq_image", "freq_token", "mean_act", "max_act", "top_label",
                               "label_entropy", "noisy"]) + _note(MEASURED_STATS)

    def _thumbnails_html(self) -> str:
        try:
            top = self.top_images
        except (MissingData, DamagedData) as exc:
            return _note(str(exc))
        if not len(top):
            return _note(f"latent {self.latent} has no top images on {self.dataset} (it never fires there)")
        tiles, maps = [], {}
        for image_id in top["image_id"].astype(str):
            try:
                maps[image_id] = self.heatmap(image_id)
            except _ERRORS as exc:
                maps[image_id] = exc
        found = [m for m in maps.values() if isinstance(m, np.ndarray) and m.size]
        vmax = max([float(m.max()) for m in found] + [1e-12])  # one scale for the card: the cells compare
        from .analysis.heatmaps import overlay

        for r in top.itertuples(index=False):
            image_id = str(r.image_id)
            caption = f"{_e(_fmt(getattr(r, 'label', None)))}<br>{_e(_fmt(r.value))}"
            amap = maps[image_id]
            try:
                if isinstance(amap, BaseException):
                    raise amap
                img = self.run.picture(self.dataset, image_id)
                tiles.append(_img_tag(overlay(img, amap, alpha=ALPHA, vmax=vmax) if amap.size else img,
                                      caption, image_id))
            except _ERRORS as exc:
                tiles.append(_failed_tile(caption, exc))
        return (f"<div style='display:flex;flex-wrap:wrap;gap:4px;margin-top:4px'>{''.join(tiles)}</div>"
                + _note(f"top {len(top)} images of {self.dataset}: label and value; {MEASURED_TOP} "
                        f"(max {vmax:.4g})"))

    def _repr_html_(self) -> str:
        a = self.annotation
        extra = ""
        if a and (a.get("tags") or a.get("note")):
            extra = _note(" · ".join(filter(None, [", ".join(a.get("tags") or []), a.get("note", "")])))
        return (f"<div style='font-family:sans-serif;border:1px solid #ddd;border-radius:4px;padding:6px'>"
                f"<div style='font-size:14px'><b>latent {self.latent}</b> <span style='color:#888'>of "
                f"{self.run.n_latents}</span>{_badge(a)}</div>{extra}{self._stats_html()}{self._thumbnails_html()}"
                f"</div>")


# ---------------------------------------------------------------------- an image
class ImageView:
    """One stored image: `.meta`, `.top_latents`, `.picture()`, `.overlay(latent)`; in a notebook the image
    (PNG) or, where HTML is shown, the image with its strongest latents."""

    def __init__(self, run: RunView, dataset: str, image_id: str, k: int = 10) -> None:
        self.run = run
        self.dataset = run.dataset(dataset)
        self.image_id = str(image_id)
        self.meta = run._dir.image_row(self.dataset, self.image_id)  # KeyError naming the image and dataset
        self.k = int(k)

    @property
    def activations(self):
        """The explorer's ImageActivations: (tokens x latents) sparse activations of the run's SAE."""
        return self.run.encoder.for_store_image(self.dataset, self.image_id)

    @property
    def top_latents(self) -> pd.DataFrame:
        """The `k` latents with the largest activation on any patch (as the explorer's image page ranks them):
        latent, value (max over patches), patches (how many fire), cls (on the CLS token), name, status."""
        acts = self.activations
        top = acts.top_patch_max(self.k) if acts.n_patches else acts.top_cls(self.k)
        ann = self.run._annotations()
        rows = [{"latent": t["latent"], "value": t["value"], "patches": t.get("patches"),
                 "cls": acts.cls_value(t["latent"]), "name": ann.get(t["latent"], {}).get("name", ""),
                 "status": ann.get(t["latent"], {}).get("status", "")} for t in top]
        return pd.DataFrame(rows, columns=["latent", "value", "patches", "cls", "name", "status"])

    def picture(self):
        return self.run.picture(self.dataset, self.image_id)

    def heatmap(self, latent: int) -> np.ndarray:
        return self.run.heatmap(self.dataset, self.image_id, latent)

    def overlay(self, latent: int, vmax: float | None = None):
        return self.run.overlay(self.dataset, self.image_id, latent, vmax)

    def __repr__(self) -> str:
        label = self.meta.get("label")
        return f"<image {self.image_id!r} of {self.dataset}" + (f", label {label!r}>" if label is not None else ">")

    def _repr_png_(self) -> bytes:
        return _png(self.picture())

    def _repr_html_(self) -> str:
        from .analysis.heatmaps import overlay

        try:
            picture = self.picture()
            tiles = [_img_tag(picture, "as the model saw it", self.image_id, size=224)]
        except _ERRORS as exc:
            picture, tiles = None, [_failed_tile("image", exc, size=224)]
        try:
            top = self.top_latents
        except _ERRORS as exc:
            top, body = None, _note(str(exc))
        else:
            body = _table_html(top) + _note("value: largest activation of the latent over the image's patch tokens; "
                                            "patches: how many patches it fires on; cls: on the CLS token")
        if top is not None and picture is not None:
            for j in top["latent"].head(3):
                try:
                    amap = self.heatmap(int(j))
                    tiles.append(_img_tag(overlay(picture, amap, alpha=ALPHA) if amap.size else picture,
                                          f"latent {int(j)}", f"latent {int(j)}", size=224))
                except _ERRORS as exc:
                    tiles.append(_failed_tile(f"latent {int(j)}", exc, size=224))
        meta = {k: v for k, v in self.meta.items() if k not in ("path", "image_id")}
        return (f"<div style='font-family:sans-serif'><b>{_e(self.image_id)}</b> <span style='color:#888'>"
                f"{_e(self.dataset)}</span>" + _table_html(pd.DataFrame([meta])) +
                f"<div style='display:flex;gap:4px;margin:4px 0'>{''.join(tiles)}</div>" +
                _note("overlays: activation of the image's strongest latents on each patch, each on its own scale "
                      "(transparent at 0, full colour at its largest patch)") + body + "</div>")


# ---------------------------------------------------------------------- a patient
class PatientView:
    """One patient of patients/barcodes.parquet: `.diagnosis`, `.n_cells`, `.barcode`, `.predictions`."""

    def __init__(self, run: RunView, patient_id: str, k: int = 16) -> None:
        self.run = run
        self.patient_id = str(patient_id)
        self.k = int(k)
        rd = run._dir
        t = rd.table("patients/barcodes")
        if t is None:
            from .analysis.patients import BARCODES

            raise rd.missing(rd.rel(rd.run.patients_dir / BARCODES))
        # row positions per patient, found once: the table has n_patients x n_latents rows (millions at 49k latents)
        where = rd.cached("notebook:patient_rows",
                          lambda: t.df.groupby(t.df["patient_id"].astype(str), sort=True).indices)
        if self.patient_id not in where:
            raise KeyError(f"patient {self.patient_id!r} is not in patients/barcodes.parquet; it has {len(where)} "
                           f"patients, e.g. {list(where)[:5]}")
        rows = t.df.iloc[where[self.patient_id]]
        self._rows = rows
        self.diagnosis = rows["diagnosis"].iloc[0] if "diagnosis" in rows else None
        self.n_cells = int(rows["n_cells"].iloc[0]) if "n_cells" in rows else None

    @property
    def barcode(self) -> pd.DataFrame:
        """Every latent's fraction of this patient's cells where it fires (frac), with the mean over all patients
        (cohort_frac) and the annotation name; largest frac first."""
        rd = self.run._dir
        t = rd.table("patients/barcodes")
        cohort = rd.cached("notebook:cohort_frac", lambda: t.df.groupby("latent")["frac"].mean())
        ann = self.run._annotations()
        b = self._rows[[c for c in ("latent", "frac", "count") if c in self._rows]].copy()
        b["cohort_frac"] = b["latent"].map(cohort).to_numpy()
        b["name"] = [ann.get(int(j), {}).get("name", "") for j in b["latent"]]
        return b.sort_values(["frac", "latent"], ascending=[False, True], kind="stable").reset_index(drop=True)

    @property
    def predictions(self) -> pd.DataFrame | None:
        """This patient's rows of classify/predictions.parquet (out-of-fold), or None when the run has none."""
        p = self.run._dir.raw_table("classify/predictions")
        if p is None or "patient_id" not in p:
            return None
        return p[p["patient_id"].astype(str) == self.patient_id].reset_index(drop=True)

    def __repr__(self) -> str:
        return f"<patient {self.patient_id!r}: diagnosis {self.diagnosis!r}, {self.n_cells} cells>"

    def _repr_html_(self) -> str:
        top = self.barcode.head(self.k)
        bars = "".join(
            f"<tr><td style='padding:1px 6px'>{int(r.latent)}</td><td style='padding:1px 6px'>{_e(r.name)}</td>"
            f"<td style='width:160px'><div style='background:#4a7;height:10px;"
            f"width:{0.0 if pd.isna(r.frac) else 100 * max(0.0, min(1.0, float(r.frac))):.1f}%'>"
            f"</div></td><td style='padding:1px 6px'>{_e(_fmt(r.frac))}</td>"
            f"<td style='padding:1px 6px;color:#888'>{_e(_fmt(r.cohort_frac))}</td></tr>"
            for r in top.itertuples(index=False))
        table = ("<table style='border-collapse:collapse;font-size:12px'><tr><th>latent</th><th>name</th><th></th>"
                 f"<th>frac</th><th>cohort mean</th></tr>{bars}</table>")
        try:
            pred, pred_html = self.predictions, ""
        except DamagedData as exc:
            pred, pred_html = None, _note(str(exc))
        if pred is not None and len(pred):
            pred_html = _table_html(pred, [c for c in ("model", "true", "decided") if c in pred]) + _note(
                "classify/predictions.parquet: out-of-fold decisions (majority over repeats)")
        return (f"<div style='font-family:sans-serif'><b>patient {_e(self.patient_id)}</b>: diagnosis "
                f"{_e(_fmt(self.diagnosis))}, {_e(_fmt(self.n_cells))} cells{table}"
                + _note(f"barcode: the {len(top)} latents firing in the largest fraction of this patient's cells "
                        "(frac; token policy in patients/summary.json), beside the mean fraction over all patients")
                + pred_html + "</div>")
