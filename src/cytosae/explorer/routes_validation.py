"""Expert validation: an expert's session, the latent at each position, their answers, the automatic description.

Blinded by construction: every answer here is about the expert named in the request, and nothing reads the
`annotations` table, other experts' sessions or answers. A latent's images come from stats/top_images without
their class labels (the page draws them with the existing image and heatmap endpoints).
"""
from __future__ import annotations

import threading

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi import Path as PathParam
from pydantic import BaseModel, Field

from .annotations import MAX_NAME, InvalidAnnotation
from .rundir import DamagedData
from .routes_annotations import NO_NUL
from .state import MAX_LATENT_QUERY, ExplorerDep
from .validation import (MAX_EXPERT, NO_DESCRIPTION, Answer, ValidationStore, open_validation,
                         read_descriptions, sample_latents)

EXPERT = r"^[^\x00]*[^\s\x00][^\x00]*$"  # some text besides spaces: the name identifies the session
MAX_IMAGES = 24
validation_router = APIRouter(prefix="/api/validation", tags=["validation"])
_opening = threading.Lock()


def store(request: Request, ex: ExplorerDep) -> ValidationStore:
    """The validation tables, opened (and created) on first use: an explorer nobody validates with never adds them."""
    state = request.app.state
    with _opening:
        if getattr(state, "validation", None) is None:
            state.validation = open_validation(ex.run.run.annotations)
    return state.validation


class StartIn(BaseModel):
    expert: str = Field(..., min_length=1, max_length=MAX_EXPERT, pattern=EXPERT)
    n: int | None = Field(None, ge=1, le=MAX_LATENT_QUERY, description="how many latents to judge; none = all")


class AnswerIn(BaseModel):
    expert: str = Field(..., min_length=1, max_length=MAX_EXPERT, pattern=EXPERT)
    latent: int = Field(..., ge=0, le=MAX_LATENT_QUERY)
    answer: Answer
    name: str = Field("", max_length=MAX_NAME, pattern=NO_NUL, description="the concept the expert sees, if any")
    saw_description: bool = Field(False, description="the automatic description was shown when answering")


class SessionOut(BaseModel):
    expert: str
    n: int
    answered: int
    next: int | None = Field(description="first position without an answer; none when every latent is judged")
    created: str


class StartOut(SessionOut):
    started: bool = Field(description="true when this call created the session, false when it resumed one")


class GivenOut(BaseModel):
    expert: str = Field(description="the expert who asked: never anyone else")
    latent: int
    answer: Answer
    name: str
    saw_description: bool
    updated: str


class AnswerOut(GivenOut):
    session: SessionOut


class ImageOut(BaseModel):
    image_id: str
    rank: int
    value: float | None
    patch: int | None = None


class ItemOut(BaseModel):
    position: int
    latent: int
    session: SessionOut
    answer: GivenOut | None = Field(description="this expert's own answer to this latent, if given")
    top_images: dict[str, dict[str, list[ImageOut]]] = Field(description="dataset -> image|patch -> images")


class DescriptionOut(BaseModel):
    latent: int
    text: str
    best_class: str | None


def _session(vs, expert: str):
    s = vs.session(expert.strip())
    if s is None:
        raise HTTPException(404, f"expert {expert.strip()!r} has no validation session yet; start one")
    return s


def _bad(exc: InvalidAnnotation) -> HTTPException:
    return HTTPException(400, str(exc))


@validation_router.post("/session", summary="Start (or resume) an expert's validation session", response_model=StartOut)
def start_session(body: StartIn, ex: ExplorerDep, vs=Depends(store)):
    top = ex.run.table("stats/top_images")
    if top is None:
        raise ex.run.missing("stats/top_images.parquet")
    latents = sample_latents(top.df["latent"].unique(), body.n)
    try:
        s, started = vs.start(body.expert, latents)
    except InvalidAnnotation as exc:
        raise _bad(exc) from None
    return {**s.progress(vs.answers(s.expert)), "started": started}


@validation_router.get("/session", summary="An expert's progress: answers given and where to resume", response_model=SessionOut)
def get_session(expert: str = Query(..., min_length=1, max_length=MAX_EXPERT, pattern=EXPERT), vs=Depends(store)):
    s = _session(vs, expert)
    return s.progress(vs.answers(s.expert))


@validation_router.get("/item", summary="The latent at one position of an expert's session, with its top images",
            response_model=ItemOut)
def get_item(ex: ExplorerDep, expert: str = Query(..., min_length=1, max_length=MAX_EXPERT, pattern=EXPERT), position: int = Query(..., ge=0),
             k: int = Query(8, ge=1, le=MAX_IMAGES), vs=Depends(store)):
    s = _session(vs, expert)
    if position >= len(s.latents):
        raise HTTPException(404, f"no position {position} in this session: positions are 0..{len(s.latents) - 1}")
    latent = ex.latent(s.latents[position])
    top = ex.run.table("stats/top_images")
    if top is None:
        raise ex.run.missing("stats/top_images.parquet")
    groups: dict[str, dict[str, list]] = {}
    for r in top.records(latent, ["dataset", "by", "rank", "image_id", "value", "patch"]):  # no label: blinded
        group = groups.setdefault(str(r.pop("dataset")), {}).setdefault(str(r.pop("by")), [])
        if len(group) < k:
            group.append(r)
    answers = vs.answers(s.expert)
    return {"position": position, "latent": latent, "session": s.progress(answers), "answer": answers.get(latent),
            "top_images": groups}


@validation_router.put("/answer", summary="Save an expert's answer to one latent (replaces an earlier one)",
            response_model=AnswerOut)
def put_answer(body: AnswerIn, vs=Depends(store)):
    try:
        saved = vs.answer(body.expert, body.latent, body.answer, body.name, body.saw_description)
    except InvalidAnnotation as exc:
        raise _bad(exc) from None
    except LookupError as exc:  # no session, or a latent it does not show
        raise HTTPException(404, str(exc)) from None
    s = _session(vs, body.expert)
    return {**saved, "session": s.progress(vs.answers(s.expert))}


@validation_router.get("/description/{latent}", summary="The automatic description of a latent (concepts/descriptions.parquet)",
            response_model=DescriptionOut, responses={404: {"description": NO_DESCRIPTION}})
def get_description(ex: ExplorerDep, latent: int = PathParam(..., ge=0, le=MAX_LATENT_QUERY)):
    latent = ex.latent(latent)
    try:
        df = read_descriptions(ex.run.run.concepts_dir)
    except ValueError as exc:
        raise DamagedData(str(exc)) from None
    if df is None:
        raise HTTPException(404, NO_DESCRIPTION)
    if latent not in df.index:
        raise HTTPException(404, f"no description of latent {latent} in concepts/descriptions.parquet")
    row = df.loc[latent]
    best = row["best_class"]
    return {"latent": latent, "text": str(row["text"]), "best_class": None if best is None or best != best else str(best)}
