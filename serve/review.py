"""Reviewers review the aligned model's chats: conversations are kept, flagged, tagged and commented on, and
flagged ones wait in a review queue for the admins (/admin/review).

Each chat conversation is one `Transcript`, saved after every reply (so nothing a reviewer saw is lost when they
close the tab). Flagging is the reviewer's call; resolving is the admin's. Text is escaped on the page.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from sqlmodel import Session, col, select

from alignloop.core import AlignloopError
from alignloop.core.db import session_scope
from alignloop.core.http import MAX_INT, AdminDep, SessionDep, render, templates_for
from alignloop.core.models import Transcript, User, utcnow

MAX_TAGS, MAX_TAG_CHARS, MAX_COMMENT_CHARS = 10, 32, 2000


def save_transcript(
    engine, user: User, *, transcript_id: int | None, model: str, preset: str | None, history: list[dict]
) -> int:
    """Create or update the reviewer's transcript of this conversation; returns its id."""
    with session_scope(engine) as session:
        row = session.get(Transcript, transcript_id) if transcript_id else None
        if row is None or row.user_id != user.id:
            row = Transcript(user_id=user.id, model=model)
        row.messages, row.model, row.preset, row.updated_at = list(history), model, preset, utcnow()
        session.add(row)
        session.flush()
        return row.id


def parse_tags(text: str) -> list[str]:
    tags = [t.strip().lower() for t in (text or "").split(",") if t.strip()]
    if len(tags) > MAX_TAGS or any(len(t) > MAX_TAG_CHARS for t in tags):
        raise AlignloopError(f"at most {MAX_TAGS} tags of {MAX_TAG_CHARS} characters each")
    return sorted(set(tags))


def review_transcript(
    engine, user: User, *, transcript_id: int | None, flagged: bool, tags: str, comment: str
) -> Transcript:
    if not transcript_id:
        raise AlignloopError("there is no conversation to review yet: send a message first")
    if len(comment or "") > MAX_COMMENT_CHARS:
        raise AlignloopError(f"the comment is limited to {MAX_COMMENT_CHARS} characters")
    parsed = parse_tags(tags)
    with session_scope(engine) as session:
        row = session.get(Transcript, transcript_id)
        if row is None or row.user_id != user.id:
            raise AlignloopError("that conversation is not yours to review")
        row.flagged, row.tags, row.comment, row.updated_at = (
            flagged,
            parsed,
            (comment or "").strip(),
            utcnow(),
        )
        row.resolved_by = None  # a new review reopens it
        session.add(row)
        return row


def review_queue(session: Session) -> list[Transcript]:
    """Flagged transcripts no admin has resolved, oldest first."""
    query = select(Transcript).where(col(Transcript.flagged), col(Transcript.resolved_by).is_(None))
    return list(session.exec(query.order_by(Transcript.updated_at)).all())


# --- /admin/review -------------------------------------------------------------------------------------------

router = APIRouter(tags=["review"])
templates = templates_for(Path(__file__).parent / "templates")


@router.get("/admin/review", response_class=HTMLResponse, include_in_schema=False)
def review_page(request: Request, user: AdminDep, session: SessionDep):
    names = {u.id: u.name for u in session.exec(select(User)).all()}
    return render(
        templates,
        request,
        "admin_review.html",
        title="Review queue",
        user=user,
        names=names,
        transcripts=review_queue(session),
    )


@router.post("/admin/review/{transcript_id}/resolve", include_in_schema=False)
def resolve(transcript_id: int, user: AdminDep, session: SessionDep):
    row = session.get(Transcript, transcript_id) if 1 <= transcript_id <= MAX_INT else None
    if row is None:
        raise HTTPException(status_code=404, detail="no such transcript")
    row.resolved_by = user.id
    session.add(row)
    session.commit()
    return RedirectResponse("/admin/review", status_code=303)
