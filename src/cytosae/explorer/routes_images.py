"""Dataset images (`images_router`) and uploads (`uploads_router`): top latents, per-patch latents, overlays, the
image as the model saw it."""
from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import APIRouter, File, HTTPException, Query, UploadFile
from fastapi import Path as PathParam
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from .activations import ImageActivations
from .imaging import InvalidImage, decode_upload, model_view, open_image, png_bytes
from .state import MAX_K, MAX_LATENT_QUERY, Explorer, ExplorerDep, patch_index, safe_image_path
from .tables import records, to_json

images_router = APIRouter()
uploads_router = APIRouter()
UploadId = Annotated[str, PathParam(pattern="^[0-9a-f]{16}$")]


# ------------------------------------------------------------------ images
@images_router.get("/api/images", summary="Images of a dataset (for the image picker)")
def images(ex: ExplorerDep, dataset: str | None = None, label: str | None = None, offset: int = Query(0, ge=0),
           limit: int = Query(100, ge=1, le=1000),
           q: str | None = Query(None, max_length=200, description="image id contains (case-insensitive)")):
    dataset = ex.dataset(dataset)
    df = ex.run.images(dataset)
    if label is not None and "label" in df:
        df = df[df["label"].astype(str) == label]
    if q:
        df = df[df["image_id"].str.contains(q, case=False, regex=False)]
    page = df.iloc[offset:offset + limit]
    cols = [c for c in ("image_id", "label", "patient_id", "diagnosis") if c in page]
    return {"dataset": dataset, "total": len(df), "offset": offset, "images": records(page[cols].reset_index(drop=True))}


@images_router.get("/api/image", summary="One dataset image: metadata and its top latents")
def image(ex: ExplorerDep, dataset: str, image_id: str = Query(..., min_length=1, max_length=1000),
          k: int = Query(20, ge=1, le=MAX_K)):
    acts = ex.image_acts(dataset, image_id)
    meta = ex.run.image_row(dataset, image_id)
    meta.pop("path", None)  # server-side detail; never needed by the page
    return to_json({"dataset": dataset, "image_id": image_id, "meta": meta, **_image_summary(acts, k)})


@images_router.get("/api/image/patch", summary="Top latents of one patch of a dataset image")
def image_patch(ex: ExplorerDep, dataset: str, image_id: str = Query(..., max_length=1000), patch: int = Query(...),
                k: int = Query(10, ge=1, le=MAX_K)):
    acts = ex.image_acts(dataset, image_id)
    p = patch_index(acts, patch)
    return {"dataset": dataset, "image_id": image_id, "patch": p, "row": p // acts.grid, "col": p % acts.grid,
            "top": acts.top_patch(p, k)}


@images_router.get("/api/image/heatmap", summary="Per-patch activation of one latent on a dataset image")
def image_heatmap(ex: ExplorerDep, dataset: str, image_id: str = Query(..., max_length=1000),
                  latent: int = Query(..., ge=0, le=MAX_LATENT_QUERY)):
    latent = ex.latent(latent)
    cls, values, grid = ex.latent_map(ex.dataset(dataset), image_id, latent)
    return {"dataset": dataset, "image_id": image_id, "latent": latent, "grid": grid,
            "cls": to_json(cls), "values": values}


@images_router.get("/api/image/file", summary="The image as the model saw it (PNG, model input size)",
                   response_class=Response, responses={200: {"content": {"image/png": {}}}})
def image_file(ex: ExplorerDep, dataset: str, image_id: str = Query(..., max_length=1000)):
    dataset = ex.dataset(dataset)
    try:
        row = ex.run.image_row(dataset, image_id)
    except KeyError as exc:
        raise HTTPException(404, str(exc.args[0])) from None
    path = safe_image_path(ex, dataset, image_id, row.get("path"))
    try:
        img = open_image(path)
    except Exception as exc:
        raise HTTPException(503, f"image {image_id!r} could not be decoded: {getattr(exc, 'reason', exc)}") from None
    return Response(png_bytes(model_view(img, ex.run.preprocessing(dataset))), media_type="image/png",
                    headers={"Cache-Control": "max-age=3600"})


# ------------------------------------------------------------------ uploads
@uploads_router.post("/api/uploads", summary="Upload a cell image (PNG/JPEG/TIFF/BMP/WebP); encode it with the run's "
                                             "backbone + SAE", status_code=201,
                     responses={400: {"description": "the image is too small, above the pixel budget or too thin "
                                                     "(aspect ratio above 20:1) to be a cell image"},
                                413: {"description": "the file is larger than the upload limit"},
                                415: {"description": "not a readable image of an accepted format"}})
async def upload(ex: ExplorerDep, file: UploadFile = File(...), k: int = Query(20, ge=1, le=MAX_K)):
    data = await file.read(ex.max_upload_bytes + 1)
    if len(data) > ex.max_upload_bytes:
        raise HTTPException(413, f"upload is larger than the limit of {ex.max_upload_bytes} bytes")
    upload_id = secrets.token_hex(8)
    # decoding a 25-megapixel image, the backbone and the PNG take seconds of CPU: off the event loop, so other
    # requests are answered meanwhile
    img, png, acts = await run_in_threadpool(_process_upload, ex, data, upload_id)
    name = (file.filename or "")[:200]
    ex.remember_upload(upload_id, {"png": png, "acts": acts, "name": name, "size": list(img.size)})
    return to_json({"upload_id": upload_id, "filename": name, "size": list(img.size),
                    "encoded_with": ex.encoder.backbone_note(), **_image_summary(acts, k)})


@uploads_router.get("/api/uploads/{upload_id}/patch", summary="Top latents of one patch of an uploaded image")
def upload_patch(ex: ExplorerDep, upload_id: UploadId, patch: int = Query(...),
                 k: int = Query(10, ge=1, le=MAX_K)):
    acts = ex.upload(upload_id)["acts"]
    p = patch_index(acts, patch)
    return {"upload_id": upload_id, "patch": p, "row": p // acts.grid, "col": p % acts.grid, "top": acts.top_patch(p, k)}


@uploads_router.get("/api/uploads/{upload_id}/heatmap", summary="Per-patch activation of one latent on an uploaded image")
def upload_heatmap(ex: ExplorerDep, upload_id: UploadId, latent: int = Query(..., ge=0, le=MAX_LATENT_QUERY)):
    latent = ex.latent(latent)
    acts = ex.upload(upload_id)["acts"]
    return {"upload_id": upload_id, "latent": latent, "grid": acts.grid, "cls": to_json(acts.cls_value(latent)),
            "values": acts.heatmap(latent)}


@uploads_router.get("/api/uploads/{upload_id}/file", summary="The uploaded image as the model saw it (PNG)",
                    response_class=Response, responses={200: {"content": {"image/png": {}}}})
def upload_file(ex: ExplorerDep, upload_id: UploadId):
    return Response(ex.upload(upload_id)["png"], media_type="image/png")


def _image_summary(acts: ImageActivations, k: int) -> dict:
    return {"grid": acts.grid, "n_patches": acts.n_patches, "top_cls": acts.top_cls(k),
            "top_patch_max": acts.top_patch_max(k),
            "measured": "top_cls: activation on the CLS token; top_patch_max: largest activation over patch tokens "
                        "(patches = number of patches where the latent fires)"}


def _process_upload(ex: Explorer, data: bytes, upload_id: str):
    """(image, PNG of the model's view, activations) of an uploaded file; 415/400 when it is not a usable image.
    Looks decode_upload, model_view and png_bytes up here, so a test can watch which thread runs them."""
    try:
        img = decode_upload(data, max_bytes=ex.max_upload_bytes)
    except InvalidImage as exc:
        raise HTTPException(415 if "not a readable image" in str(exc) or "format" in str(exc) else 400,
                            str(exc)) from None
    acts = ex.encoder.for_upload(upload_id, img)
    return img, png_bytes(model_view(img, ex.run.preprocessing())), acts
