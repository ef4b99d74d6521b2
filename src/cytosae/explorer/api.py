"""The explorer's JSON API (FastAPI). Every page, live or static, is drawn from these responses.

Errors are 4xx/503 with a message that says what was wrong and what is valid; nothing a
client sends is used as a file path (images are looked up by id in images.parquet and
then checked to lie inside the run or data folders). No response shows an absolute
server path: messages name files relative to the run (see `Explorer.redact`).
"""
from __future__ import annotations

import logging
import secrets
from importlib import resources
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from .routes_annotations import annotations_router
from .routes_images import images_router, uploads_router
from .routes_latents import latent_router, overview_router, run_router
from .routes_patients import classify_router, patients_router
from .routes_quality import quality_router
from .routes_validation import validation_router
from .activations import BackboneUnavailable
from .annotations import DamagedAnnotations, clean_text
from .guards import HostGuard, MethodGuard, allowed_hosts, is_loopback
from .imaging import MAX_UPLOAD_BYTES
from .limits import BodyLimit, SecurityHeaders
from .rundir import DamagedData, MissingData
from .safety import OutsideRoots
from .state import Explorer, FastJSON

log = logging.getLogger(__name__)
STATIC_DIR = Path(str(resources.files("cytosae.explorer") / "static"))

# one router per page or resource, included in this order (a new page: its module's router, one line here)
ROUTERS: tuple[APIRouter, ...] = (
    run_router,
    overview_router,
    latent_router,
    images_router,
    uploads_router,
    patients_router,
    classify_router,
    quality_router,
    annotations_router,
    validation_router,
)

page_router = APIRouter()  # the one HTML page; included only when the app serves its static files


@page_router.get("/", include_in_schema=False)
def index():
    return FileResponse(STATIC_DIR / "index.html")


@page_router.get("/validate", include_in_schema=False)
def validate_page():
    return FileResponse(STATIC_DIR / "validate.html")


class ErrorOut(BaseModel):
    detail: str


def _err(description: str) -> dict:
    return {"model": ErrorOut, "description": description}


# answers any operation can give (declared so clients and the OpenAPI checks know them)
COMMON_RESPONSES = {
    400: _err("a parameter is out of range or inconsistent (the message says which)"),
    401: _err("the explorer listens on a network address and the access token is missing"),
    403: _err("Host or Origin not allowed (DNS rebinding guard), or a file outside the run and data folders"),
    404: _err("no such latent, dataset, image, upload or analysis (the message says which command writes it)"),
    503: _err("a run file is damaged or the backbone is unavailable (the message names the file and the fix)"),
}


def startup_lines(run_dir, host: str, port: int) -> tuple[list[str], str | None]:
    """What `cytosae explore` prints, and the access token (None on loopback addresses, where none is needed)."""
    shown = f"[{host}]" if ":" in host else host
    if is_loopback(host):
        return [f"cytosae explorer for {run_dir}: http://{shown}:{port}/  "
                f"(API schema: http://{shown}:{port}/openapi.json; Ctrl-C stops)"], None
    token = secrets.token_urlsafe(24)
    return [f"warning: listening on {host}, reachable from the network: anyone who has the token below can read this "
            "run and edit its annotations (there is no TLS; prefer 127.0.0.1 and an SSH tunnel)",
            f"cytosae explorer for {run_dir}: http://{shown}:{port}/?token={token}  (Ctrl-C stops)"], token


def create_app(run_dir, data_roots=None, max_upload_bytes: int = MAX_UPLOAD_BYTES, static: bool = True,
               preload: bool = False, device: str = "cpu", host: str = "127.0.0.1", token: str | None = None,
               allow_hosts: list[str] | tuple[str, ...] = (), sae=None, sae_name: str | None = None) -> FastAPI:
    """The explorer for one run; `data_roots` are extra folders images may be read from; SAE encodes run on `device`
    (auto | cpu | cuda | cuda:N). Requests must name a loopback host, `host` or one of `allow_hosts`; with a
    `token`, they must also carry it (header, cookie, or ?token= on the first page). `sae_name`: the SAE of the run's
    sweep to show (None: the run's own, at sae/); `sae`: that SAE when the caller has loaded it already (otherwise it
    is loaded on first use)."""
    ex = Explorer(run_dir, data_roots, max_upload_bytes, device=device, sae=sae, sae_name=sae_name)
    if preload:
        ex.preload()
    # /docs and /redoc would load Swagger/ReDoc from a CDN: off; the schema itself stays at /openapi.json
    app = FastAPI(title="cytosae explorer", version="1", default_response_class=FastJSON, docs_url=None, redoc_url=None,
                  responses=COMMON_RESPONSES,
                  description="Browse, inspect and name the latents of a sparse autoencoder trained on "
                              "a hematology foundation model's activations.")
    app.state.explorer = ex
    _error_handlers(app)
    for router in ROUTERS:
        app.include_router(router)
    if static:
        app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
        app.include_router(page_router)

    # added last = outermost: security headers on every answer, then foreign hosts refused before anything is parsed
    app.add_middleware(MethodGuard, routes=lambda: app.routes)
    app.add_middleware(BodyLimit, max_bytes=max(max_upload_bytes, 64 * 1024))
    app.add_middleware(HostGuard, hosts=allowed_hosts(host, allow_hosts), token=token)
    app.add_middleware(SecurityHeaders)
    return app


# run-file problems the routes let through, and the status each is answered with
KNOWN_ERRORS = {MissingData: 404, DamagedData: 503, DamagedAnnotations: 503, OutsideRoots: 403, BackboneUnavailable: 503}


def _error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(StarletteHTTPException, _http)
    app.add_exception_handler(RequestValidationError, _invalid)
    for exc_type, status in KNOWN_ERRORS.items():
        app.add_exception_handler(exc_type, _answer_with(status))
    app.add_exception_handler(Exception, _unexpected)


def _answer(request: Request, status: int, detail, headers=None) -> FastJSON:
    if isinstance(detail, str):
        detail = request.app.state.explorer.redact(clean_text(detail))
    return FastJSON({"detail": detail}, status_code=status, headers=headers)


def _answer_with(status: int):
    async def handler(request: Request, exc: Exception):
        return _answer(request, status, str(exc))
    return handler


async def _http(request: Request, exc: StarletteHTTPException):
    return _answer(request, exc.status_code, exc.detail, getattr(exc, "headers", None))


async def _invalid(_: Request, exc: RequestValidationError):
    # never echo the input: it may hold text that cannot be encoded (a lone surrogate) or be huge
    errors = [{"loc": [clean_text(str(p)) if isinstance(p, str) else p for p in e.get("loc", ())],
               "msg": clean_text(str(e.get("msg", ""))), "type": str(e.get("type", ""))} for e in exc.errors()]
    return FastJSON({"detail": errors}, status_code=422)


async def _unexpected(request: Request, exc: Exception):
    log.exception("unexpected error on %s", request.url.path)
    return FastJSON({"detail": f"internal error ({type(exc).__name__}); the explorer's log has the details"},
                    status_code=500)
