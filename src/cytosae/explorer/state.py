"""State the routes share: the run, encoder cache, neighbours, annotations, uploads; and the checks that
turn bad ids into clear 4xx answers."""
from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Annotated

import numpy as np
import pandas as pd
from fastapi import Depends, HTTPException, Request
from fastapi.responses import JSONResponse

from .activations import Encoder, ImageActivations
from .annotations import open_store
from .imaging import MAX_UPLOAD_BYTES
from .neighbours import LazyNeighbours
from .rundir import DamagedData, MissingData, RunDir
from ..devices import resolve_device
from .safety import resolve_inside

log = logging.getLogger(__name__)

MAX_K = 200
LATENT_ID = re.compile(r"[0-9]{1,12}")
ABS_PATH = re.compile(r"(?<![\w.:/\]])/[^\s'\"`,;()<>]+")
MAX_LATENT_QUERY = 2**31  # anything larger is answered 422, without int overflow in numpy
MAX_UPLOADS = 32  # uploads kept in memory (oldest dropped first): each holds its PNG and activations


class FastJSON(JSONResponse):
    """JSON without NaN (browsers reject it): callers sanitise with to_json/records first."""

    def render(self, content) -> bytes:
        return json.dumps(content, separators=(",", ":"), allow_nan=False).encode()


def nan_none(values) -> list:
    arr = pd.Series(values)
    return arr.astype(object).where(arr.notna(), None).tolist()


class Explorer:
    """State shared by the routes: the run, the encoder cache, neighbours, annotations, uploads."""

    def __init__(self, run_dir, data_roots=None, max_upload_bytes: int = MAX_UPLOAD_BYTES, device: str = "cpu",
                 sae=None, sae_name: str | None = None) -> None:
        self.run = RunDir(run_dir, data_roots, sae=sae_name)
        self.annotations = open_store(self.run.run.annotations)
        if self.annotations.error:  # the explorer still starts: the person reads this and restores the file
            print(f"warning: {self.annotations.error}", file=sys.stderr, flush=True)
        self.encoder = Encoder(self.run, device=resolve_device(device), sae=sae)
        self.neighbours = LazyNeighbours(self.run)
        self.max_upload_bytes = max_upload_bytes
        self.uploads: OrderedDict[str, dict] = OrderedDict()
        self._lock = threading.Lock()
        self._stop_preload = threading.Event()
        self._preloading: threading.Thread | None = None

    def preload(self) -> threading.Thread:
        """Load and index the tables and the decoder in the background, so the first page is not the slow one."""
        def work():
            run = self.run
            steps = [run.latents_indexed] + [lambda n=name: run.table(n) for name in (
                "stats/top_images", "stats/class_profile", "stats/histograms", "patients/barcodes",
                "patients/compare")] + [self.neighbours.precompute]
            try:
                for step in steps:
                    if self._stop_preload.is_set():
                        return
                    step()
            except Exception as exc:  # a missing or broken table is reported when a page asks for it
                log.info("preload stopped: %s", exc)
        self._preloading = threading.Thread(target=work, name="cytosae-preload", daemon=True)
        self._preloading.start()
        return self._preloading

    def stop_preload(self, timeout: float = 60.0) -> None:
        """Stop the preload after its current step and wait for it: interpreter shutdown while that thread is inside
        torch can abort the process."""
        self._stop_preload.set()
        if self._preloading is not None:
            self._preloading.join(timeout)

    # ------------------------------------------------------------------ checks
    def dataset(self, name: str | None) -> str:
        if name is None:
            if not self.run.datasets:
                raise HTTPException(404, "this run has no datasets")
            return next(iter(self.run.datasets))
        if name not in self.run.datasets:
            raise HTTPException(404, f"unknown dataset {name!r}; this run has {sorted(self.run.datasets)}")
        return name

    def latent(self, latent: int) -> int:
        n = self.run.n_latents
        if not 0 <= latent < n:
            raise HTTPException(404, f"latent {latent} does not exist; this SAE has latents 0..{n - 1}")
        return latent

    def image_acts(self, dataset: str, image_id: str) -> ImageActivations:
        dataset = self.dataset(dataset)
        try:
            self.run.image_row(dataset, image_id)
        except KeyError as exc:
            raise HTTPException(404, str(exc.args[0])) from None
        try:
            return self.encoder.for_store_image(dataset, image_id)
        except (MissingData, DamagedData):
            raise
        except KeyError as exc:
            raise HTTPException(404, f"the store lacks an image its tables name: {exc.args[0]}") from None
        except (FileNotFoundError, ValueError) as exc:  # missing/incomplete store or SAE, width mismatch
            raise HTTPException(503, f"activations of {image_id!r} unavailable: {exc}") from None

    def latent_map(self, dataset: str, image_id: str, latent: int):
        try:
            self.run.image_row(dataset, image_id)
        except KeyError as exc:
            raise HTTPException(404, str(exc.args[0])) from None
        try:
            return self.encoder.latent_map(dataset, image_id, latent)
        except (MissingData, DamagedData):
            raise
        except KeyError as exc:
            raise HTTPException(404, f"the store lacks an image its tables name: {exc.args[0]}") from None
        except (FileNotFoundError, ValueError, RuntimeError) as exc:
            raise HTTPException(503, f"activations of {image_id!r} unavailable: {exc}") from None

    def upload(self, upload_id: str) -> dict:
        with self._lock:
            up = self.uploads.get(upload_id)
        if up is None:
            raise HTTPException(404, f"upload {upload_id!r} is unknown or expired; upload the image again")
        return up

    def remember_upload(self, upload_id: str, entry: dict) -> None:
        with self._lock:
            self.uploads[upload_id] = entry
            while len(self.uploads) > MAX_UPLOADS:
                self.uploads.popitem(last=False)

    def redact(self, text: str) -> str:
        """`text` without absolute server paths: the run becomes RUN, data folders DATA[name], anything else its name."""
        if not hasattr(self, "_redactions"):
            pairs = []
            for root, label in [(self.run.path, "RUN")] + [(r, f"DATA[{d}]") for d in self.run.datasets
                                                           for r in self.run.data_roots(d)]:
                if root is not None:
                    pairs += [(str(root), label), (os.path.realpath(root), label)]
            self._redactions = sorted(set(pairs), key=lambda p: -len(p[0]))
        for prefix, label in self._redactions:
            text = text.replace(prefix, label)
        return ABS_PATH.sub(lambda m: m.group(0) if m.group(0).startswith(("/api/", "/static/"))
                            else ".../" + m.group(0).rstrip("/").rsplit("/", 1)[-1], text)

    def redact_deep(self, obj):
        """redact() applied to every string of a JSON-like value."""
        if isinstance(obj, str):
            return self.redact(obj)
        if isinstance(obj, dict):
            return {k: self.redact_deep(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [self.redact_deep(v) for v in obj]
        return obj

    def annotation_names(self) -> dict[int, dict]:
        return {a.latent: a.to_dict() for a in self.annotations.all()}


async def get_explorer(request: Request) -> Explorer:
    """The app's Explorer, for route handlers (`ex: ExplorerDep`). async: FastAPI would run a plain def in the
    thread pool, one more hop on every request for a lookup."""
    return request.app.state.explorer


ExplorerDep = Annotated[Explorer, Depends(get_explorer)]


def patch_index(acts: ImageActivations, patch: int) -> int:
    if acts.n_patches == 0:
        raise HTTPException(400, "this store holds one embedding per image (no patch tokens), so there are no patches")
    if not 0 <= patch < acts.n_patches:
        raise HTTPException(400, f"patch must be in 0..{acts.n_patches - 1} (grid {acts.grid}x{acts.grid}), got {patch}")
    return patch


def search_latents(ex: Explorer, q: str, limit: int) -> list[dict]:
    q = q.strip()
    out: list[dict] = []
    seen: set[int] = set()
    digits = q.lstrip("#")
    if LATENT_ID.fullmatch(digits):  # ASCII only: str.isdigit() accepts '²' and '①', which int() rejects
        j = int(digits)
        if j < ex.run.n_latents:
            a = ex.annotations.get(j)
            out.append({"latent": j, "name": a.name if a else "", "match": "id"})
            seen.add(j)
    for a in ex.annotations.search(q):
        if a.latent not in seen:
            out.append({"latent": a.latent, "name": a.name, "match": "annotation"})
            seen.add(a.latent)
    out += _description_matches(ex, q, seen, limit - len(out))
    return out[:limit]


def _description_matches(ex: Explorer, q: str, seen: set[int], limit: int) -> list[dict]:
    """Latents whose automatic description (`cytosae describe`) holds every word of q, any case ("nucleus
    eosinophil"), in latent order."""
    table = ex.run.descriptions() if limit > 0 else None
    words = q.lower().split()
    if table is None or not words:
        return []
    text = table["text"].astype(str).str.lower()
    hit = np.logical_and.reduce([text.str.contains(w, regex=False).to_numpy() for w in words])
    out = []
    for j, line in zip(table.index[hit], table["text"][hit]):
        if int(j) not in seen and len(out) < limit:
            a = ex.annotations.get(int(j))
            out.append({"latent": int(j), "name": a.name if a else "", "match": "description", "description": line})
    return out


def safe_image_path(ex: Explorer, dataset: str, image_id: str, recorded: str | None) -> Path:
    """The image file if it is found and lies inside the run or data folders (after following symlinks)."""
    p = ex.run.image_file(dataset, image_id, recorded)
    if p is None:
        raise HTTPException(404, f"the image file of {image_id!r} is not found under the data folders of "
                                 f"{dataset!r}; if the data moved, start the explorer with --data-root NEW_FOLDER")
    real = resolve_inside(p, ex.run.roots)
    if not real.is_file():
        raise HTTPException(404, "the image file is missing on disk")
    return real
