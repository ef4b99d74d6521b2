"""Latent annotations: read, create/replace, delete (`annotations_router`)."""
from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException
from fastapi import Path as PathParam
from pydantic import BaseModel, Field

from .annotations import MAX_AUTHOR, MAX_NAME, MAX_NOTE, MAX_TAG, MAX_TAGS, STATUSES, InvalidAnnotation, Status
from .state import MAX_LATENT_QUERY, ExplorerDep


NO_NUL = r"^[^\x00]*$"  # NUL cannot be stored in SQLite TEXT faithfully


class AnnotationIn(BaseModel):
    name: str = Field("", max_length=MAX_NAME, pattern=NO_NUL)
    tags: list[Annotated[str, Field(max_length=MAX_TAG, pattern=NO_NUL)]] = Field(default_factory=list, max_length=MAX_TAGS)
    note: str = Field("", max_length=MAX_NOTE, pattern=NO_NUL)
    status: Status = "unreviewed"
    author: str = Field("", max_length=MAX_AUTHOR, pattern=NO_NUL)


annotations_router = APIRouter()


@annotations_router.get("/api/annotations", summary="All annotations")
def list_annotations(ex: ExplorerDep):
    return {"annotations": [a.to_dict() for a in ex.annotations.all()], "statuses": list(STATUSES)}


@annotations_router.get("/api/annotations/{latent}", summary="The annotation of one latent (404 when none)")
def get_annotation(ex: ExplorerDep, latent: int = PathParam(..., ge=0, le=MAX_LATENT_QUERY)):
    ex.latent(latent)
    a = ex.annotations.get(latent)
    if a is None:
        raise HTTPException(404, f"latent {latent} has no annotation yet")
    return a.to_dict()


@annotations_router.put("/api/annotations/{latent}", summary="Create or replace the annotation of one latent",
                        responses={413: {"description": "the body is larger than the limit"}})
def put_annotation(ex: ExplorerDep, body: AnnotationIn, latent: int = PathParam(..., ge=0, le=MAX_LATENT_QUERY)):
    ex.latent(latent)
    try:
        return ex.annotations.put(latent, body.name, body.tags, body.note, body.status, body.author).to_dict()
    except InvalidAnnotation as exc:
        raise HTTPException(400, str(exc)) from None


@annotations_router.delete("/api/annotations/{latent}", summary="Delete the annotation of one latent")
def delete_annotation(ex: ExplorerDep, latent: int = PathParam(..., ge=0, le=MAX_LATENT_QUERY)):
    ex.latent(latent)
    if not ex.annotations.delete(latent):
        raise HTTPException(404, f"latent {latent} has no annotation")
    return {"deleted": latent}
