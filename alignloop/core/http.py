"""What every router needs, apart from the module that composes them (the template's `deps.py`).

A leaf of the kernel: routers in the stages import the session dependency, the current user, role checks and
the page templates from here; `alignloop.web` (the application layer) composes those routers into one app.

Pages are Jinja2 templates rendered through FastAPI's `Jinja2Templates` with autoescape on: a stage keeps its
own `templates/` folder and extends this package's `base.html`. No page is built from strings, so no value can
reach the HTML unescaped by forgetting a call; the CSRF token comes into every page by a context processor.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi import Path as PathParam
from fastapi.templating import Jinja2Templates
from markupsafe import Markup
from sqlmodel import Session

from alignloop.core import crud, websec
from alignloop.core.models import User

MAX_FORM_CHARS = 1024
MAX_INT = 2**31 - 1  # ids, rounds and offsets: bounded, so the schema says what the database can hold
DbId = Annotated[int, PathParam(ge=1, le=MAX_INT)]  # an id in a path: huge values are a 422, not a 500
TEMPLATES = Path(__file__).parent / "templates"
STATIC = Path(__file__).parent / "static"


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
    user = websec.session_user(session, request)
    # End this read's transaction here rather than carry it across the worker-thread hop to the handler:
    # with SQLite every transaction holds the write lock, and nothing needs it held in between.
    session.commit()
    if user is None:
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


def _page_context(request: Request) -> dict:
    token = websec.csrf_token(request)
    return {
        "csrf_token": token,
        "csrf_input": Markup('<input type="hidden" name="{}" value="{}">').format(websec.CSRF_FIELD, token),
    }


def fmt(value, digits: int = 2) -> str:
    """A figure for a page: floats rounded, None as a dash, anything else as text (escaped by the template)."""
    if value is None:
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def templates_for(*folders: Path) -> Jinja2Templates:
    """Templates from `folders` (a stage's own), then the kernel's (`base.html`, `admin_base.html`)."""
    templates = Jinja2Templates(directory=[*folders, TEMPLATES], context_processors=[_page_context])
    templates.env.autoescape = True  # every template, whatever its file name ends with
    templates.env.filters["fmt"] = fmt
    return templates


def render(
    templates: Jinja2Templates,
    request: Request,
    name: str,
    *,
    status_code: int = 200,
    headers: dict | None = None,
    **context,
):
    """One page; `context` names the template's variables (`title`, `user`, `notice`, `error`, ...)."""
    return templates.TemplateResponse(request, name, context, status_code=status_code, headers=headers)
