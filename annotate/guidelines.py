"""/admin/guidelines: the annotators' guidelines, edited by admins and versioned per round.

Each save is a new version in force from a round on; `annotate.queue.submit_vote` stores the version in force
for the item's round with every vote (server-side, like the shown order), so a change of instructions can be
seen in the data. The annotation page shows the newest version; the workspace's `guidelines` setting (or the
built-in text) until an admin saves one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from sqlmodel import col, select

from alignloop.core import AlignloopError, crud
from alignloop.core.http import MAX_INT, AdminDep, SessionDep, render, templates_for
from alignloop.core.models import Guidelines

router = APIRouter(tags=["guidelines"])
templates = templates_for(Path(__file__).parent / "templates")


@router.get("/admin/guidelines", response_class=HTMLResponse, include_in_schema=False)
def guidelines_page(request: Request, user: AdminDep, session: SessionDep):
    versions = session.exec(select(Guidelines).order_by(col(Guidelines.version).desc())).all()
    current = versions[0].text if versions else ""
    return render(
        templates,
        request,
        "admin_guidelines.html",
        title="Guidelines",
        user=user,
        versions=versions,
        current=current,
    )


@router.post("/admin/guidelines", include_in_schema=False)
def save(
    user: AdminDep,
    session: SessionDep,
    text: Annotated[str, Form()],
    round: Annotated[int, Form(ge=0, le=MAX_INT)] = 0,
):
    try:
        crud.save_guidelines(session, text=text, round=round, user_id=user.id)
    except AlignloopError as exc:
        raise HTTPException(status_code=400, detail=str(exc)) from None
    session.commit()
    return RedirectResponse("/admin/guidelines", status_code=303)
