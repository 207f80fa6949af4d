"""What every router needs, apart from the module that composes them (the template's `deps.py`).

A leaf of the kernel: routers in the stages import the session dependency, the current user, role checks and
the page shell from here; `alignloop.web` (the application layer) composes those routers into one app.
"""

from __future__ import annotations

import html
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.responses import HTMLResponse
from sqlmodel import Session

from alignloop.core import crud
from alignloop.core.models import User

MAX_FORM_CHARS = 1024
MAX_INT = 2**31 - 1  # ids, rounds and offsets: bounded, so the schema says what the database can hold


class LoginRequired(Exception):
    """Raised by `current_user` for a visitor without a session; the app answers 401 (API) or a redirect."""


# --- dependencies --------------------------------------------------------------------------------------------


async def get_session(request: Request) -> AsyncIterator[Session]:
    """One session per request, held only while the handler runs.

    Requests queue for a database slot on the event loop (`app.state.db_slots`): one slot with SQLite, which
    runs one write transaction at a time anyway and whose busy handler wakes waiters with back-off sleeps,
    so queueing here is both fairer and faster; several with PostgreSQL. The teardown is async so it never
    waits for a worker thread: under load every worker could be waiting for the lock it would release.
    """
    async with request.app.state.db_slots:
        session = Session(request.app.state.engine, expire_on_commit=False)
        try:
            yield session
        finally:
            session.close()


SessionDep = Annotated[Session, Depends(get_session, scope="function")]


def current_user(request: Request, session: SessionDep) -> User:
    """The logged-in user (session cookie) or the owner of a Bearer API key."""
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        user = crud.user_for_api_key(session, key=header[7:].strip())
        session.commit()
        if user is None:
            raise HTTPException(
                status_code=401, detail="invalid API key", headers={"WWW-Authenticate": "Bearer"}
            )
        return user
    user_id = request.session.get("user_id")
    user = session.get(User, user_id) if user_id is not None else None
    # End this read's transaction here rather than carry it across the worker-thread hop to the handler:
    # with SQLite every transaction holds the write lock, and nothing needs it held in between.
    session.commit()
    if user is None or user.disabled:
        request.session.clear()
        raise LoginRequired()
    return user


def require_role(*roles: str):
    def check(user: Annotated[User, Depends(current_user)]) -> User:
        if user.role not in roles:
            raise HTTPException(status_code=403, detail=f"this needs the role {' or '.join(roles)}")
        return user

    return check


UserDep = Annotated[User, Depends(current_user)]
AdminDep = Annotated[User, Depends(require_role("admin"))]


# --- pages ---------------------------------------------------------------------------------------------------

STYLE = """
body{font-family:system-ui,sans-serif;max-width:70rem;margin:1.5rem auto;padding:0 1rem;color:#222}
header{display:flex;justify-content:space-between;align-items:center;border-bottom:1px solid #ddd}
.card{border:1px solid #ddd;border-radius:8px;padding:.8rem 1rem;margin:1rem 0}
.turn{white-space:pre-wrap;margin:.3rem 0}.role{font-weight:600;color:#555}
.responses{display:grid;grid-template-columns:repeat(auto-fit,minmax(20rem,1fr));gap:.8rem}
.response{background:#f7f7f9;border-radius:6px;padding:.6rem;white-space:pre-wrap}
.meta{color:#777;font-size:.85rem}form.login{max-width:20rem;display:grid;gap:.5rem}
"""


def page(title: str, body: str, user: User | None = None) -> HTMLResponse:
    who = (
        f'<span class="meta">{html.escape(user.name)} ({user.role})</span> '
        '<form method="post" action="/logout" style="display:inline"><button>Log out</button></form>'
        if user
        else ""
    )
    return HTMLResponse(
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)} · alignloop</title>"
        f"<style>{STYLE}</style></head><body><header><h1>alignloop</h1><div>{who}</div></header>{body}</body></html>"
    )
