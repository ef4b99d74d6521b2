"""Static report: the explorer's pages without a server.

Every API response a page would request is rendered once (in-process, through the
same FastAPI app) and saved as data/<fnv1a(url)>.js, which the unchanged app.js loads
with a <script> tag (fetch() is blocked on file://). Images are saved the same way (as JPEG).
A report holds a chosen subset: all overview tables, the quality page, the latent pages of annotated and
most frequent latents, and a few image pages with every patch clickable.
"""
from __future__ import annotations

import html
import io
import json
import shutil
from pathlib import Path
from urllib.parse import quote

from fastapi.testclient import TestClient
from PIL import Image

from cytosae.store.format import atomic_write_bytes

from .api import STATIC_DIR, create_app


def canonical_url(path: str, params: dict | None = None) -> str:
    """Same as u() in app.js: sorted params, None dropped, encodeURIComponent escaping."""
    items = sorted((k, v) for k, v in (params or {}).items() if v is not None and v != "")
    q = "&".join(f"{quote(str(k), safe='-_.!~*()' + chr(39))}={quote(str(v), safe='-_.!~*()' + chr(39))}" for k, v in items)
    return f"/api/{path}" + (f"?{q}" if q else "")


def fnv1a(s: str) -> str:
    h = 0x811C9DC5
    for b in s.encode():
        h = ((h ^ b) * 0x01000193) & 0xFFFFFFFF
    return f"{h:08x}"


class _Site:
    def __init__(self, out: Path, client: TestClient) -> None:
        self.out, self.client = out, client
        self.keys: dict[str, str] = {}
        (out / "data").mkdir(parents=True, exist_ok=True)

    def _key(self, url: str) -> str:
        key = fnv1a(url)
        if self.keys.setdefault(key, url) != url:
            raise RuntimeError(f"hash collision between {url} and {self.keys[key]}")
        return key

    def json(self, path: str, params: dict | None = None) -> dict | None:
        url = canonical_url(path, params)
        r = self.client.get(url)
        if r.status_code != 200:
            return None  # absent analysis: the page shows "not included in this static report"
        key = self._key(url)
        body = r.content.decode()
        atomic_write_bytes(self.out / "data" / f"{key}.js",
                           f"CYTOSAE_DATA[{json.dumps(key)}]={body};\n".encode())
        return r.json()

    def image(self, path: str, params: dict) -> bool:
        """The PNG the API serves, re-encoded as JPEG (q=92): a report holds thousands of tiles."""
        url = canonical_url(path, params)
        r = self.client.get(url)
        if r.status_code != 200:
            return False
        buf = io.BytesIO()
        Image.open(io.BytesIO(r.content)).convert("RGB").save(buf, format="JPEG", quality=92)
        atomic_write_bytes(self.out / "data" / f"{self._key(url)}.jpg", buf.getvalue())
        return True


def _choose_latents(overview: dict, annotated: list[int], n: int) -> list[int]:
    """Annotated latents first (someone cared about them), then the most frequently firing ones."""
    cols = overview["columns"]
    firing = [(f, j) for j, f in zip(cols["latent"], cols["freq_image"]) if f]
    by_freq = [j for f, j in sorted(firing, key=lambda t: (-t[0], t[1]))]
    return list(dict.fromkeys(annotated + by_freq))[:n]


def build_report(run_dir, out, n_latents: int = 200, n_images: int = 12, k: int = 12, data_roots=None,
                 sae=None, sae_name: str | None = None) -> dict:
    """The static report of the run's SAE, or of SAE `sae_name` of its sweep; its title says which."""
    # the app first: an unknown SAE name is refused before anything is written
    app = create_app(run_dir, data_roots=data_roots, static=False, sae=sae, sae_name=sae_name)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # entered once: outside a `with`, every request starts and stops its own event-loop thread (~5 ms each, and a
    # report makes thousands)
    with TestClient(app, base_url="http://127.0.0.1") as client:  # a loopback Host
        site = _Site(out, client)
        run = site.json("run")
        if run is None:
            raise ValueError(f"{run_dir} could not be read as a run")
        first = _render_run(site, run)
        latents = _choose_latents(first, [a["latent"] for a in client.get("/api/annotations").json()["annotations"]],
                                  n_latents) if first else []
        pngs: set[tuple[str, str]] = set()
        images = _render_latents(site, latents, k, n_images, pngs)
        for ds, image_id in images:
            _render_image(site, ds, image_id, pngs)
    _write_page(out, latents, images, run["shown_sae"]["title"])
    files = sum(1 for _ in out.rglob("*") if _.is_file())
    return {"out": str(out), "latent_pages": len(latents), "image_pages": len(images), "latents": latents,
            "images": images, "files": files, "sae": run["shown_sae"]}


def _render_run(site: _Site, run: dict) -> dict | None:
    """The run-wide data (overviews, image lists, patients, classify, quality); the first dataset's overview."""
    datasets = [d["name"] for d in run["datasets"]]
    overviews = {ds: site.json("latents", {"dataset": ds}) for ds in datasets}
    for ds in datasets:
        site.json("images", {"dataset": ds, "limit": 200})
    for part in ("patients/barcodes", "classify", "quality"):
        site.json(part)
    cmp_ = site.json("patients/compare")
    for a, b in (cmp_ or {}).get("pairs", []):
        site.json("patients/compare", {"group_a": a, "group_b": b})
    return next((o for o in overviews.values() if o), None)


def _render_latents(site: _Site, latents: list[int], k: int, n_images: int, pngs: set) -> list[tuple[str, str]]:
    """Each latent's page, heatmaps and top-image files; returns the first `n_images` top images for image pages.
    `pngs` collects the image files written."""
    images: list[tuple[str, str]] = []
    for j in latents:
        page = site.json(f"latents/{j}")
        if page is None:
            continue
        for ds, by_map in page["top_images"].items():
            for by, items in by_map.items():
                site.json(f"latents/{j}/heatmaps", {"by": by, "dataset": ds})
                for it in items[:k]:
                    key = (ds, it["image_id"])
                    if key not in pngs:
                        pngs.add(key)
                        site.image("image/file", {"dataset": ds, "image_id": it["image_id"]})
                    if key not in images and len(images) < n_images:
                        images.append(key)
    return images


def _render_image(site: _Site, ds: str, image_id: str, pngs: set) -> None:
    """An image page: its summary, every patch, the heatmap of each latent the page can overlay, and the file."""
    info = site.json("image", {"dataset": ds, "image_id": image_id})
    if info is None:
        return
    overlay = {t["latent"] for t in info["top_cls"] + info["top_patch_max"]}
    for p in range(info["n_patches"]):
        patch = site.json("image/patch", {"dataset": ds, "image_id": image_id, "patch": p})
        if patch and patch["top"]:
            overlay.add(patch["top"][0]["latent"])
    for j in sorted(overlay):
        site.json("image/heatmap", {"dataset": ds, "image_id": image_id, "latent": j})
    if (ds, image_id) not in pngs:
        site.image("image/file", {"dataset": ds, "image_id": image_id})


def _write_page(out: Path, latents: list[int], images: list[tuple[str, str]], sae_title: str) -> None:
    # the same page and scripts as the live explorer, plus a flag that switches app.js to data/*.js; the title names
    # the SAE, so a report of one SAE of a sweep is not taken for another's
    shutil.copytree(STATIC_DIR, out / "static", dirs_exist_ok=True)
    title = html.escape(f"cytosae report: {sae_title}")
    index = (STATIC_DIR / "index.html").read_text().replace(
        "<title>cytosae explorer</title>", f"<title>{title}</title>").replace(
        '<script src="static/app.js"></script>', '<script src="data/static.js"></script>\n<script src="static/app.js"></script>')
    atomic_write_bytes(out / "index.html", index.encode())
    atomic_write_bytes(out / "data" / "static.js", ("window.CYTOSAE_STATIC = " + json.dumps(
        {"latents": latents, "images": [list(x) for x in images]}) + ";\nwindow.CYTOSAE_DATA = {};\n").encode())
