"""/admin/guidelines: the annotators' guidelines, edited by admins and versioned per round.

Each save is a new version in force from a round on; `annotate.queue.submit_vote` stores the version in force
for the item's round with every vote (server-side, like the shown order), so a change of instructions can be
seen in the data. The annotation page shows the newest version; the workspace's `guidelines` setting (or the
built-in text) until an admin saves one.
"""

from __future__ import annotations

import html
from typing import Annotated

from fastapi import APIRouter, Depends, Form, HTTPException
from fastapi.responses import HTMLResponse, RedirectResponse
from sqlmodel import col, select

from alignloop.core import AlignloopError, crud
from alignloop.core.http import MAX_INT, SessionDep, page, require_role
from alignloop.core.models import Guidelines, User

router = APIRouter(tags=["guidelines"])
AdminDep = Annotated[User, Depends(require_role("admin"))]


@router.get("/admin/guidelines", response_class=HTMLResponse, include_in_schema=False)
def guidelines_page(user: AdminDep, session: SessionDep):
    versions = session.exec(select(Guidelines).order_by(col(Guidelines.version).desc())).all()
    current = versions[0].text if versions else ""
    history = "".join(
        f"<li>v{g.version} (round {g.round} on, {g.created_at:%Y-%m-%d %H:%M}): "
        f"{html.escape(g.text[:120])}{'…' if len(g.text) > 120 else ''}</li>"
        for g in versions
    )
    body = (
        "<p><a href='/admin'>quality</a> · <a href='/admin/rounds'>rounds</a></p><h2>Annotation guidelines</h2>"
        "<form method='post' action='/admin/guidelines'><textarea name='text' rows='12' cols='100'>"
        f"{html.escape(current)}</textarea><br>In force from round <input name='round' type='number' min='0' "
        "value='0'> <button>Save as a new version</button></form>"
        f"<h3>Versions</h3><ul>{history or '<li>none yet: annotators see the built-in guidelines</li>'}</ul>"
    )
    return page("Guidelines", body, user)


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
