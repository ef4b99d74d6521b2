"""The explorer's JSON API (FastAPI). Every page, live or static, is drawn from these responses.

Errors are 4xx with a message that says what was wrong and what is valid; nothing a
client sends is used as a file path (images are looked up by id in images.parquet and
then checked to lie inside the run or data folders).
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from . import routes_annotations, routes_images, routes_latents, routes_patients
from .activations import BackboneUnavailable
from .imaging import MAX_UPLOAD_BYTES
from .limits import BodyLimit, SecurityHeaders
from .rundir import MissingData
from .safety import OutsideRoots
from .state import Explorer, FastJSON

STATIC_DIR = Path(str(resources.files("cytosae.explorer") / "static"))


def create_app(run_dir, data_roots=None, max_upload_bytes: int = MAX_UPLOAD_BYTES, static: bool = True,
               preload: bool = False, device: str = "cpu") -> FastAPI:
    """The explorer for one run; `data_roots` are extra folders images may be read from; SAE encodes run on `device`
    (auto | cpu | cuda | cuda:N)."""
    ex = Explorer(run_dir, data_roots, max_upload_bytes, device=device)
    if preload:
        ex.preload()
    # /docs and /redoc would load Swagger/ReDoc from a CDN: off; the schema itself stays at /openapi.json
    app = FastAPI(title="cytosae explorer", version="1", default_response_class=FastJSON, docs_url=None, redoc_url=None,
                  description="Browse, inspect and name the latents of a sparse autoencoder trained on "
                              "a hematology foundation model's activations.")
    app.state.explorer = ex
    app.add_middleware(BodyLimit, max_bytes=max(max_upload_bytes, 64 * 1024))
    app.add_middleware(SecurityHeaders)

    @app.exception_handler(MissingData)
    async def _missing(_: Request, exc: MissingData):
        return FastJSON({"detail": str(exc)}, status_code=404)

    @app.exception_handler(OutsideRoots)
    async def _outside(_: Request, exc: OutsideRoots):
        return FastJSON({"detail": str(exc)}, status_code=403)

    @app.exception_handler(BackboneUnavailable)
    async def _no_backbone(_: Request, exc: BackboneUnavailable):
        return FastJSON({"detail": str(exc)}, status_code=503)

    for routes in (routes_latents, routes_images, routes_patients, routes_annotations):
        routes.register(app, ex)

    if static:
        app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

        @app.get("/", include_in_schema=False)
        def index():
            return FileResponse(STATIC_DIR / "index.html")

    return app
