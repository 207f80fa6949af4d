"""REST endpoints for annotation: the same queue and vote path as the browser page, for scripts and load tests."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from alignloop.core import AlignloopError, crud
from alignloop.core.http import MAX_INT, SessionDep, require_role
from alignloop.core.limits import retry_after
from alignloop.core.models import User
from annotate import queue

router = APIRouter(prefix="/api/annotate", tags=["annotate"])
AnnotatorDep = Annotated[User, Depends(require_role("annotator", "admin"))]


class ItemOut(BaseModel):
    comparison_id: int
    round: int
    prompt: list[dict]
    responses: list[dict]  # [{"label": "A", "text": ...}] in shown order
    expires_at: str


class VoteIn(BaseModel):
    comparison_id: int = Field(ge=1, le=MAX_INT)
    choice: Literal["a", "b", "tie", "both_bad"] | None = Field(
        default=None, description="'a'/'b' = the first/second response as shown"
    )
    ranking: list[str] | None = Field(default=None, max_length=10, description="shown labels, best first")
    ratings: dict[str, dict[str, int]] = Field(default_factory=dict, description="label -> {aspect: 1..5}")
    rationale: str = Field(default="", max_length=5000)
    seconds: float | None = Field(default=None, ge=0, le=86_400)


class VoteOut(BaseModel):
    vote_id: int
    next: ItemOut | None = Field(description="the caller's next item, already leased (null: nothing left)")


def _item_dict(item: queue.Item | None) -> dict | None:
    if item is None:
        return None
    return {
        "comparison_id": item.comparison_id,
        "round": item.round,
        "prompt": item.prompt,
        "responses": [
            {"label": label, "text": text} for label, text in zip(item.labels, item.responses, strict=True)
        ],
        "expires_at": item.expires_at.isoformat(),
    }


NOTHING_LEFT = {204: {"description": "nothing left for this annotator"}}


@router.get("/next", response_model=ItemOut, responses=NOTHING_LEFT)
def next_item(request: Request, user: AnnotatorDep, session: SessionDep):
    """Lease the next comparison to the caller (the same one again while their lease lives)."""
    item = queue.next_item(session, user_id=user.id, **queue.queue_options(request.app.state.settings))
    session.commit()
    return Response(status_code=204) if item is None else JSONResponse(_item_dict(item))


@router.post("/vote", response_model=VoteOut, status_code=201)
def vote(body: VoteIn, request: Request, user: AnnotatorDep, session: SessionDep):
    """Vote on a comparison in the terms it was shown to the caller. The reply carries the caller's next item,
    leased in the same transaction: fetch-and-vote in one round trip."""
    wait = request.app.state.vote_limiter.hit(user.id)
    if wait:
        raise HTTPException(
            status_code=429, detail="too many votes: slow down", headers={"Retry-After": retry_after(wait)}
        )
    try:
        vote_id = queue.submit_vote(
            session,
            user_id=user.id,
            comparison_id=body.comparison_id,
            choice=body.choice,
            ranking_labels=body.ranking,
            ratings=body.ratings,
            rationale=body.rationale,
            seconds=body.seconds,
        )
    except crud.NotFoundError as exc:
        session.rollback()
        raise HTTPException(status_code=404, detail=str(exc)) from None
    except (crud.DuplicateVoteError, crud.ComparisonClosedError) as exc:
        session.rollback()
        raise HTTPException(status_code=409, detail=str(exc)) from None
    except AlignloopError as exc:
        session.rollback()
        raise HTTPException(status_code=400, detail=str(exc)) from None
    item = queue.next_item(session, user_id=user.id, **queue.queue_options(request.app.state.settings))
    session.commit()
    # A Response returned directly skips FastAPI's second validation of `response_model` (still documented).
    return JSONResponse({"vote_id": vote_id, "next": _item_dict(item)}, status_code=201)


@router.post("/skip", status_code=204)
def skip(comparison_id: Annotated[int, Query(ge=1, le=MAX_INT)], user: AnnotatorDep, session: SessionDep):
    """Pass on an item: it is never offered to the caller again."""
    try:
        queue.skip(session, user_id=user.id, comparison_id=comparison_id)
    except crud.NotFoundError as exc:
        raise HTTPException(status_code=404, detail=str(exc)) from None
    session.commit()
    return Response(status_code=204)


@router.get("/progress")
def progress(user: AnnotatorDep, session: SessionDep) -> dict:
    """Votes today and in the current round, and how many items are left for the caller."""
    return queue.progress(session, user_id=user.id).__dict__
