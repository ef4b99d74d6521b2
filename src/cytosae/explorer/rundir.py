"""Read-only access to a run directory (docs/run-layout.md), loading each table once, on first use.

Every table is optional: a run that has only `cytosae stats` shows stats pages, and
the API answers 404 with the command that would produce a missing table.
"""
from __future__ import annotations

import json
import re
import threading
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

from .safety import is_safe_name
from .tables import LatentIndexed


class MissingData(LookupError):
    """A table or file the request needs is not in the run; the message says which command writes it."""


class DamagedData(RuntimeError):
    """A run file exists but cannot be read; the message names it (relative to the run) and the command that rebuilds it."""


_SERVER_PATH = re.compile(r"(^|[\s'\"(=])/")  # an absolute path in a message: never shown in a response


def _own_reason(message: str, path: Path) -> str | None:
    """The reason in a reader's `PATH: reason; remedy` about `path` itself (SAE.load's config errors), when it
    names no other server path; None otherwise."""
    head = f"{path}: "
    if not message.startswith(head):
        return None
    reason = message[len(head):].split("; ")[0].splitlines()[0]
    return None if _SERVER_PATH.search(reason) else reason


ANALYSES = ("stats", "patients", "classify", "concepts", "quality")  # folders of one SAE's analyses (Run.analysis_dir)
# what writes a sweep SAE's analysis (it is not the run's SAE, so `--run RUN` would write the run's own folder)
_MEMBER_COMMANDS = {"stats": "stats", "patients": "patients", "quality": "align", "concepts": "describe",
                    "eval": "evaluate"}


class RunDir:
    def __init__(self, path: str | Path, data_roots: list | None = None, sae: str | None = None) -> None:
        from cytosae.run import Run

        # NotARun (a FileNotFoundError) or ValueError with a one-line reason (an unknown `sae` lists the sweep's)
        self.run = Run.open(path).for_sae(sae)
        self.path = self.run.path.resolve()
        self.meta = self.run.meta
        self.datasets: dict[str, dict] = self.run.datasets
        for name in self.datasets:
            if not is_safe_name(name):
                raise ValueError(f"run.json: dataset name {name!r} is not a plain name")
        self._extra_roots = [str(p) for p in (data_roots or [])]  # PATH, or NAME=PATH for one dataset
        self._lock = threading.RLock()
        self._cache: dict[str, object] = {}

    # ------------------------------------------------------------------ locations (owned by cytosae.run)
    @property
    def sae_dir(self) -> Path:
        return self.run.sae_dir

    def store_dir(self, dataset: str) -> Path:
        self.check_dataset(dataset)
        return self.run.store_dir(dataset).resolve()

    def image_file(self, dataset: str, image_id: str, recorded: str | None) -> Path | None:
        """Where the image is now (data roots given on the command line first), or None."""
        return self.run.image_path(dataset, image_id, recorded, self._extra_roots)

    def data_roots(self, dataset: str) -> list[Path]:
        return self.run.data_roots(dataset, self._extra_roots)

    @cached_property
    def roots(self) -> list[Path]:
        """Folders images may be read from: the run and every dataset's data roots."""
        return [self.path] + [r for n in self.datasets for r in self.data_roots(n)]

    def check_dataset(self, dataset: str) -> None:
        if dataset not in self.datasets:
            raise KeyError(f"unknown dataset {dataset!r}; this run has {sorted(self.datasets)}")

    # ------------------------------------------------------------------ lazy tables
    def cached(self, key: str, load):
        """`load()` once per key for the life of the explorer (tables do not change under a running explorer)."""
        with self._lock:
            if key not in self._cache:
                self._cache[key] = load()
            return self._cache[key]

    # ------------------------------------------------------------------ damaged or missing files
    def rel(self, path: Path) -> str:
        """`path` relative to the run (what responses may show: never an absolute server path)."""
        try:
            return Path(path).resolve().relative_to(self.path).as_posix()
        except ValueError:
            return Path(path).name

    def file(self, name: str) -> Path:
        """Run file `name` as docs/run-layout.md names it ("stats/top_images.parquet"), in the shown SAE's folders."""
        part, _, rest = name.partition("/")
        return self.run.analysis_dir(part) / rest if part in ANALYSES and rest else self.path / name

    def rebuild_command(self, rel: str) -> str:
        """The command that writes the run file `rel` (RUN = this run directory)."""
        if self.run.sae_name is not None and rel.startswith(self.rel(self.sae_dir) + "/"):
            return self._member_command(rel[len(self.rel(self.sae_dir)) + 1:])
        if rel.startswith("stats/"):
            return "cytosae stats --run RUN"
        if rel.startswith("patients/"):
            return "cytosae patients --run RUN"
        if rel.startswith("classify/"):
            return "cytosae classify --run RUN"
        if rel.startswith("quality/"):
            return "cytosae align --run RUN"
        if rel.endswith(("/eval.json", "/eval.spliced.json")) and rel.startswith(self.rel(self.sae_dir) + "/"):
            return "cytosae evaluate --run RUN" + (" --spliced" if rel.endswith("spliced.json") else "")
        if rel.startswith(self.rel(self.sae_dir) + "/"):
            return "cytosae train --run RUN"
        for d in self.datasets:
            if rel.startswith(self.rel(self.store_dir(d))) and self.run.sae_layer is not None:
                return f"cytosae run STUDY (the run's study; its extract-layer:{d}:{self.run.sae_layer} step)"
            if rel.startswith(self.rel(self.store_dir(d))):
                return f"cytosae extract DATA --run RUN --name {d}"
        return "the cytosae command that wrote it"

    def _member_command(self, rest: str) -> str:
        """The command that writes file `rest` of the sweep SAE shown (rest relative to its folder)."""
        part = rest.partition("/")[0]
        part = "eval" if rest.startswith("eval") else part
        sae = "RUN/" + self.rel(self.sae_dir)
        if part == "classify":
            return f"cytosae classify {sae}/patients --sae {sae} --out {sae}/classify"
        if part not in _MEMBER_COMMANDS:
            return f"cytosae run STUDY (the study that made this run; its train:{self.run.sae_name} step)"
        command = f"cytosae {_MEMBER_COMMANDS[part]} --run RUN --sae {self.run.sae_name}"
        return command + (" --spliced" if part == "eval" and "spliced" in rest else "")

    def damaged(self, path: Path, exc: BaseException) -> DamagedData:
        from cytosae.store.format import InvalidFile

        rel = self.rel(path)
        rebuild = f"rebuild it with `{self.rebuild_command(rel)}` (RUN = this run directory)"
        if isinstance(exc, InvalidFile) and not _SERVER_PATH.search(exc.problem):  # the schema named the field
            return DamagedData(f"{rel}: " + (f"{exc.field}: " if exc.field else "") + f"{exc.problem}; {rebuild}")
        reason = _own_reason(str(exc), Path(path))
        if reason is not None:
            return DamagedData(f"{rel}: {reason}; {rebuild}")
        return DamagedData(f"{rel} could not be read ({type(exc).__name__}): the file is damaged or from another "
                           f"version; rebuild it with `{self.rebuild_command(rel)}` (RUN = this run directory)")

    def missing(self, name: str) -> MissingData:
        """`name` (relative to the run, or a run-layout name, "stats/latents.parquet": the shown SAE's) is absent."""
        rel = self.rel(self.file(name))
        return MissingData(f"{rel} is missing: write it with `{self.rebuild_command(rel)}` (RUN = this run directory)")

    def read(self, path: Path, reader):
        """reader(path), or None when the file is absent; DamagedData naming the file when it cannot be read."""
        if not path.is_file():
            return None
        try:
            return reader(path)
        except Exception as exc:  # parquet, JSON, safetensors each raise their own types for a damaged file
            raise self.damaged(path, exc) from None

    def open_sae(self, opener):
        """opener(sae_dir) with its failures named: missing -> MissingData, unreadable -> DamagedData (which file)."""
        d = self.sae_dir
        for name in ("config.json", "sae.safetensors"):
            if not (d / name).is_file():
                raise self.missing(f"{self.rel(d)}/{name}")
        try:
            return opener(d)
        except Exception as exc:  # JSON, config fields, safetensors header or tensor shapes
            culprit = d / ("config.json" if "config.json" in str(exc) or isinstance(exc, json.JSONDecodeError)
                           else "sae.safetensors")
            raise self.damaged(culprit, exc) from None

    @property
    def sae_config(self) -> dict:
        """The SAE's config.json as SAE.load checks it (typed schema, format version, its own config_sha256), without
        reading the weights: an edited config is DamagedData naming the field, never shown as the run's SAE."""
        from cytosae.sae.model import read_config

        cfg = self.cached("sae_config", lambda: self.read(self.sae_dir / "config.json", lambda p: read_config(p.parent)))
        if cfg is None:
            raise self.missing(f"{self.rel(self.sae_dir)}/config.json")
        return cfg

    @property
    def n_latents(self) -> int:
        """config.json's n_latents; without a readable one, the latents stats counted. A damaged config.json (which
        /api/run and the SAE's readers name) thus leaves the pages that need no SAE usable; with no stats either it
        is the error."""
        if (self.sae_dir / "config.json").is_file():
            try:
                return int(self.sae_config["n_latents"])
            except DamagedData:
                if self.latents is None or not len(self.latents):
                    raise
        lat = self.latents
        return int(lat["latent"].max()) + 1 if lat is not None and len(lat) else 0

    @property
    def latents(self) -> pd.DataFrame | None:
        from cytosae.analysis.stats import LATENTS, read_stats_table

        def load():
            return self.read(self.run.stats_dir / LATENTS, lambda p: read_stats_table(p.parent, LATENTS)
                             .sort_values(["dataset", "latent"]).reset_index(drop=True))
        return self.cached("latents", load)

    def latents_indexed(self) -> LatentIndexed | None:
        return self.cached("latents_idx", lambda: None if self.latents is None else LatentIndexed(self.latents, ["dataset"]))

    # a latent-indexed table by its name in docs/run-layout.md: the order one latent's rows are kept in
    _ORDER = {"stats/top_images": ["dataset", "by", "rank"], "stats/class_profile": ["dataset", "class"],
              "stats/histograms": ["dataset"], "patients/barcodes": ["patient_id"],
              "patients/compare": ["group_a", "group_b"], "quality/latent_classes": ["class"]}

    def _reader(self, name: str):
        """path -> DataFrame for run table `name`: the writer's reader (its required columns) where it has one."""
        from cytosae.analysis import classify_results, patients, stats

        part, _, stem = name.partition("/")
        columns, read = {"stats": (stats.COLUMNS, stats.read_stats_table),
                         "patients": (patients.COLUMNS, patients.read_patients_table),
                         "classify": (classify_results.COLUMNS, classify_results.read_classify_table)
                         }.get(part, ({}, None))
        file = f"{stem}.parquet"
        return (lambda p: read(p.parent, file)) if file in columns else pd.read_parquet

    def table(self, name: str) -> LatentIndexed | None:
        """One of stats/top_images, stats/class_profile, stats/histograms, patients/barcodes, patients/compare."""
        order = self._ORDER[name]
        read = self._reader(name)
        return self.cached(name, lambda: self.read(self.file(f"{name}.parquet"),
                                                   lambda p: LatentIndexed(read(p), order)))

    def raw_table(self, name: str) -> pd.DataFrame | None:
        return self.cached("raw:" + name, lambda: self.read(self.file(f"{name}.parquet"), self._reader(name)))

    def summary(self, part: str) -> dict | None:
        """stats/summary.json or patients/summary.json, checked by its writer's reader (None when absent)."""
        from cytosae.analysis import patients, stats

        file, read = {"stats": (stats.SUMMARY, stats.read_stats_summary),
                      "patients": (patients.SUMMARY, patients.read_patients_summary)}[part]
        return self.cached("summary:" + part, lambda: self.read(self.run.analysis_dir(part) / file,
                                                                lambda p: read(p.parent)))

    def descriptions(self) -> pd.DataFrame | None:
        """RUN/concepts/descriptions.parquet (`cytosae describe`) indexed by latent, through its writer's reader;
        None when the run has none."""
        from cytosae.analysis.describe import DESCRIPTIONS

        from .validation import read_descriptions  # the one place the table is checked and indexed by latent

        folder = self.run.concepts_dir
        return self.cached("descriptions", lambda: self.read(folder / DESCRIPTIONS,
                                                             lambda p: read_descriptions(folder)))

    @property
    def classify_results(self) -> dict | None:
        from cytosae.analysis.classify_results import RESULTS, read_classify_results

        return self.cached("classify", lambda: self.read(self.run.classify_dir / RESULTS,
                                                         lambda p: read_classify_results(p.parent)))

    def quality_json(self, name: str) -> dict | None:
        """quality/alignment.json, or the SAE's eval.json / eval.spliced.json (`cytosae evaluate`); None when absent."""
        path = self.run.quality_dir / name if name.startswith("alignment") else self.sae_dir / name

        from cytosae.analysis.alignment import read_alignment
        from cytosae.steps.evaluate import EVAL, SPLICED, read_eval, read_spliced

        readers = {EVAL: read_eval, SPLICED: read_spliced}  # each file through its writer's typed reader
        reader = (lambda p: read_alignment(p.parent)) if name.startswith("alignment") else readers[name]

        def load():
            doc = self.read(path, reader)
            if doc is not None and not isinstance(doc, dict):
                raise self.damaged(path, ValueError("not a JSON object"))
            return doc
        return self.cached("quality:" + name, load)

    # ------------------------------------------------------------------ images
    def images(self, dataset: str) -> pd.DataFrame:
        """The dataset's images.parquet (store order), indexed by image_id."""
        def load():
            p = self.store_dir(dataset) / "images.parquet"
            if not p.is_file():
                raise self.missing(self.rel(p))

            def index(path):
                df = pd.read_parquet(path)
                df["image_id"] = df["image_id"].astype(str)
                return df.set_index("image_id", drop=False)
            return self.read(p, index)
        self.check_dataset(dataset)
        return self.cached("images:" + dataset, load)

    def image_row(self, dataset: str, image_id: str) -> dict:
        df = self.images(dataset)
        if image_id not in df.index:
            raise KeyError(f"image {image_id!r} is not in dataset {dataset!r}")
        row = df.loc[image_id]
        return {k: (None if (isinstance(v, float) and np.isnan(v)) else v) for k, v in row.items()}

    def store(self, dataset: str):
        def load():
            from cytosae.store import ActivationStore
            try:
                return ActivationStore(self.store_dir(dataset))
            except (FileNotFoundError, ValueError, KeyError, OSError) as exc:
                rel = self.rel(self.store_dir(dataset))
                raise DamagedData(f"store {rel} cannot be read ({type(exc).__name__}: {exc}); rebuild it with "
                                  f"`{self.rebuild_command(rel)}` (RUN = this run directory)") from None
        self.check_dataset(dataset)
        return self.cached("store:" + dataset, load)

    def store_meta(self, dataset: str) -> dict | None:
        """The store's manifest as the package reads it (ActivationStore.meta); None when there is no readable store."""
        try:
            return self.store(dataset).meta
        except (DamagedData, KeyError):
            return None

    def preprocessing(self, dataset: str | None = None) -> dict:
        """How images were squashed/padded/cropped to the model's input, so overlays line up with patches."""
        for name in ([dataset] if dataset else list(self.datasets)):
            pre = ((self.store_meta(name) or {}).get("settings") or {}).get("preprocessing")
            if pre:
                return pre
        from cytosae.data import Preprocess
        return Preprocess().to_dict()

    def backbone_spec(self) -> dict:
        """Backbone name, weights and layer for encoding uploads: run.json first, else the first store's settings."""
        spec = dict(self.meta.get("backbone") or {}) if isinstance(self.meta.get("backbone"), dict) else (
            {"name": self.meta["backbone"]} if self.meta.get("backbone") else {})
        for name in self.datasets:
            meta = self.store_meta(name)
            if meta is not None:
                s = meta.get("settings", {})
                spec.setdefault("name", s.get("backbone"))
                spec.setdefault("layer", s.get("layer"))
                spec.setdefault("weights_sha256", s.get("weights_sha256"))
                spec.setdefault("random_weights_seed", s.get("random_weights_seed"))
                spec.setdefault("grid", meta.get("grid"))
                break
        if self.run.sae_layer is not None:  # a layer sweep's SAE: uploads are encoded at its own block
            spec["layer"] = self.run.sae_layer
        return spec

    # ------------------------------------------------------------------ which SAE is shown
    def shown_sae(self) -> dict:
        """Which SAE this reader shows (name, arch, k, expansion, layer, latents), whether it is the run's own (the
        default) and the sweep it is one of; `title` is the sentence page headers and report titles show."""
        from cytosae.sae.archs import arch_options

        sweep = self.run.sweep
        saes = sweep.get("saes") or {}
        name = self.run.sae_name or sweep.get("primary") or self.rel(self.sae_dir)
        recorded = (saes.get(name) or {}).get("settings") or {}
        try:
            cfg = self.sae_config
        except MissingData:
            cfg = {}
        arch, d_in, n = cfg.get("arch"), cfg.get("d_in"), cfg.get("n_latents")
        try:
            takes_k = arch is None or "k" in arch_options(arch)
        except (KeyError, ValueError):  # an architecture this version does not know (an imported SAE's)
            takes_k = "k" in cfg
        out = {"name": name, "default": self.run.sae_name is None, "dir": self.rel(self.sae_dir), "arch": arch,
               "k": recorded.get("k", cfg.get("k")) if takes_k else None, "n_latents": n,
               "expansion": recorded.get("expansion", n // d_in if isinstance(n, int) and d_in else None),
               "layer": recorded.get("layer", self.backbone_spec().get("layer")),
               "sweep": {"n": len(saes), "names": list(saes), "primary": sweep.get("primary")} if saes else None,
               "stats": (self.run.stats_dir / "latents.parquet").is_file()}
        out["note"] = None if out["stats"] or out["default"] else str(self.missing("stats/latents.parquet"))
        out["title"] = _sae_title(out)
        return out


def _sae_title(s: dict) -> str:
    """"SAE k2-x2 (topk, k=2, expansion 2, layer -2, 768 latents), one of 3 in this run's sweep", and for the
    default one that it is the run's own."""
    facts = [s["arch"], f"k={s['k']}" if s["k"] is not None else None,
             f"expansion {s['expansion']}" if s["expansion"] is not None else None,
             f"layer {s['layer']}" if s["layer"] is not None else None,
             f"{s['n_latents']} latents" if s["n_latents"] is not None else None]
    title = f"SAE {s['name']} (" + ", ".join(str(f) for f in facts if f is not None) + ")"
    if s["sweep"]:
        title += f", one of {s['sweep']['n']} in this run's sweep"
        title += (" (the primary one, shown by default; open another with --sae NAME)" if s["default"]
                  else f" (not the primary {s['sweep']['primary']})")
    return title
