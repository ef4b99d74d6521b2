"""Latent annotations: read, create/replace, delete."""
from __future__ import annotations

from fastapi import HTTPException
from fastapi import Path as PathParam
from pydantic import BaseModel, Field

from .annotations import STATUSES, InvalidAnnotation
from .state import MAX_LATENT_QUERY, Explorer


class AnnotationIn(BaseModel):
    name: str = Field("", max_length=200)
    tags: list[str] = Field(default_factory=list, max_length=32)
    note: str = Field("", max_length=10_000)
    status: str = Field("unreviewed", description=f"one of {', '.join(STATUSES)}")
    author: str = Field("", max_length=100)


def register(app, ex: Explorer) -> None:
    # ------------------------------------------------------------------ annotations
    @app.get("/api/annotations", summary="All annotations")
    def list_annotations():
        return {"annotations": [a.to_dict() for a in ex.annotations.all()], "statuses": list(STATUSES)}

    @app.get("/api/annotations/{latent}", summary="The annotation of one latent (404 when none)")
    def get_annotation(latent: int = PathParam(..., ge=0, le=MAX_LATENT_QUERY)):
        ex.latent(latent)
        a = ex.annotations.get(latent)
        if a is None:
            raise HTTPException(404, f"latent {latent} has no annotation yet")
        return a.to_dict()

    @app.put("/api/annotations/{latent}", summary="Create or replace the annotation of one latent",
             responses={413: {"description": "the body is larger than the limit"}})
    def put_annotation(body: AnnotationIn, latent: int = PathParam(..., ge=0, le=MAX_LATENT_QUERY)):
        ex.latent(latent)
        try:
            return ex.annotations.put(latent, body.name, body.tags, body.note, body.status, body.author).to_dict()
        except InvalidAnnotation as exc:
            raise HTTPException(400, str(exc)) from None

    @app.delete("/api/annotations/{latent}", summary="Delete the annotation of one latent")
    def delete_annotation(latent: int = PathParam(..., ge=0, le=MAX_LATENT_QUERY)):
        ex.latent(latent)
        if not ex.annotations.delete(latent):
            raise HTTPException(404, f"latent {latent} has no annotation")
        return {"deleted": latent}
