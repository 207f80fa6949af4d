"""One FastAPI app for everything a browser or a script talks to.

It serves login, a page listing the queued comparisons and a small JSON API, and composes the stages' routers
and Gradio UIs. Login is required everywhere except /login, /healthz and /static; roles are checked in each
handler (`require_role`), never by hiding links. Pages are autoescaped Jinja2 templates (`core.http.render`);
the defences every request passes through (CSRF, Origin, body limit, CSP and other headers, revocable
logins) are in `core.websec` and wired here. The interactive API docs are off: they load scripts from a CDN,
and nothing here reaches the network.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Annotated

from fastapi import Depends, FastAPI, Form, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from sqlmodel import Session, select
from starlette.middleware.sessions import SessionMiddleware

from alignloop.core import __version__, crud, logins, websec
from alignloop.core.config import Settings
from alignloop.core.db import make_engine
from alignloop.core.http import (
    MAX_FORM_CHARS,
    MAX_INT,
    STATIC,
    AdminDep,
    LoginRequired,
    SessionDep,
    UserDep,
    render,
    templates_for,
)
from alignloop.core.limits import RateLimiter, retry_after
from alignloop.core.models import Comparison, Prompt, User

log = logging.getLogger(__name__)

PAGE_SIZE = 50


# --- JSON shapes of the endpoints defined here (the routers keep theirs beside them) ---
class ResponseOut(BaseModel):
    # One response of a comparison, in position order (a, b, ...).
    generation_id: int
    text: str


class ComparisonOut(BaseModel):
    # A comparison with its prompt (chat messages) and responses.
    id: int
    round: int
    status: str
    num_votes: int
    target_votes: int
    prompt: list[dict]
    responses: list[ResponseOut]


class ModelVersionOut(BaseModel):
    # A registered model version; `lineage` names its ancestors, nearest first.
    id: int
    name: str
    kind: str
    base: str
    round: int | None
    licence: str | None
    run_id: int | None
    lineage: list[str]
    metrics: dict


class UserOut(BaseModel):
    # A user as admins see it (never the password hash).
    id: int
    name: str
    role: str
    kind: str
    disabled: bool


POSTGRES_DB_SLOTS = 16  # below the engine's pool size + overflow (30)
UI_PATHS = {"/annotate", "/chat", "/arena"}
templates = templates_for(Path(__file__).parent / "templates")
ERROR_RESPONSES = {  # documented on every operation: what any handler may answer besides success
    400: {"description": "invalid input (a message says why)"},
    401: {"description": "not logged in, or an invalid API key"},
    403: {"description": "logged in, but the role does not allow this"},
    404: {"description": "no such object"},
    409: {"description": "conflicts with the current state (e.g. cancelling a finished job)"},
    429: {"description": "rate limited: see Retry-After"},
}


def create_app(settings: Settings, engine=None) -> FastAPI:
    if not settings.secret_key:
        raise ValueError("settings.secret_key is empty; run `alignloop init`")
    app = FastAPI(
        title="alignloop",
        version=__version__,
        docs_url=None,
        redoc_url=None,
        openapi_url="/api/openapi.json",
        responses=ERROR_RESPONSES,
        dependencies=[Depends(websec.verify_csrf)],  # every route, the stages' routers included
    )
    app.state.settings = settings
    app.state.engine = engine if engine is not None else make_engine(settings.db_url)
    sqlite = app.state.engine.dialect.name == "sqlite"
    app.state.db_slots = asyncio.Semaphore(1 if sqlite else POSTGRES_DB_SLOTS)
    app.state.model_pool = _model_pool(settings, app.state.engine)
    app.state.vote_limiter = RateLimiter(settings.votes_per_minute, 60)
    app.add_exception_handler(LoginRequired, _login_required)
    app.add_exception_handler(Exception, _internal_error)
    _register_routes(app)
    from alignloop import console, jobs

    app.include_router(console.router)
    jobs.recover_jobs(app.state.engine)  # a restart leaves no job in a false "running" state
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    _mount_stages(app)
    # Added after the stages, so every other middleware (and Gradio) sees `request.session`. The cookie only
    # names a server-side `LoginSession` (websec): logging out ends it wherever the cookie was copied to.
    app.add_middleware(
        SessionMiddleware,
        secret_key=settings.secret_key,
        session_cookie="alignloop_session",
        max_age=websec.SESSION_DAYS * 86400,
        same_site="strict",
        https_only=settings.secure_cookies,
    )
    # Outermost: oversized bodies and cross-origin writes are refused before anything else runs.
    app.add_middleware(
        websec.GuardMiddleware, gradio_paths=tuple(sorted(UI_PATHS)), secure=settings.secure_cookies
    )
    return app


def _model_pool(settings: Settings, engine):
    """Loaded chat models (the OpenAI endpoint, /chat, /arena), by reference: torch (adapters merged for
    speed) or llama.cpp for versions with a GGUF, as `gguf_backend` says (serve/backend.py)."""
    from functools import partial

    from serve.backend import open_engine
    from serve.engine import ModelPool

    return ModelPool(partial(open_engine, settings=settings, db=engine))


def app_from_env() -> FastAPI:
    """Factory for `uvicorn --factory` and `alignloop serve --workers N`: the workspace is $ALIGNLOOP_HOME."""
    from alignloop.core.config import load_settings

    return create_app(load_settings())


def _mount_stages(app: FastAPI) -> None:
    """The stage UIs and APIs. Imported here, not at the top: the kernel must import without Gradio."""
    # Gradio keeps what it caches (and would keep uploads, which GuardMiddleware refuses) inside the workspace;
    # some of its modules read this when first imported, so it is set before the import.
    os.environ.setdefault("GRADIO_TEMP_DIR", str(app.state.settings.cache_dir / "gradio"))
    import gradio as gr

    from annotate import admin as annotate_admin
    from annotate import api as annotate_api
    from annotate import app as annotate_app
    from annotate import gold as annotate_gold
    from annotate import guidelines as annotate_guidelines
    from reward import web as reward_web
    from rl import web as rl_web
    from serve import arena, chat, levels_web, openai_api, review

    app.include_router(annotate_api.router)
    app.include_router(annotate_admin.router)
    app.include_router(annotate_gold.router)
    app.include_router(annotate_guidelines.router)
    app.include_router(reward_web.router)
    app.include_router(rl_web.router)
    app.include_router(arena.router)
    app.include_router(levels_web.router)
    app.include_router(review.router)
    openai_api.install(app)
    engine, settings = app.state.engine, app.state.settings

    @app.middleware("http")
    async def login_before_ui(request: Request, call_next):
        # Gradio answers an anonymous visitor with a bare 401; send people to the login form instead.
        if request.url.path.rstrip("/") in UI_PATHS and not request.session.get("user_id"):
            return RedirectResponse("/login", status_code=303)
        return await call_next(request)

    ui_options = dict(
        footer_links=[], show_error=True, ssr_mode=False, mcp_server=False, enable_monitoring=False
    )
    gr.mount_gradio_app(
        app,
        annotate_app.build_ui(engine, settings, vote_limiter=app.state.vote_limiter),
        path="/annotate",
        auth_dependency=annotate_app.username_of(engine),
        head=annotate_app.SHORTCUTS_JS,
        **ui_options,
    )
    reviewers = annotate_app.username_of(engine, roles=("reviewer", "admin"))
    pool = app.state.model_pool
    gr.mount_gradio_app(
        app, chat.build_ui(engine, settings, pool), path="/chat", auth_dependency=reviewers, **ui_options
    )
    gr.mount_gradio_app(
        app, arena.build_ui(engine, settings, pool), path="/arena", auth_dependency=reviewers, **ui_options
    )


async def _login_required(request: Request, exc: LoginRequired):
    if request.url.path.startswith("/api"):
        return JSONResponse({"detail": "login required"}, status_code=401)
    return RedirectResponse("/login", status_code=303)


async def _internal_error(request: Request, exc: Exception):
    log.exception("unhandled error on %s", request.url.path)
    return JSONResponse({"detail": "internal error; the server log has the details"}, status_code=500)


def comparison_card(session: Session, comparison: Comparison) -> dict:
    """What queue.html shows of one comparison (plain values; the template escapes them)."""
    prompt = session.get(Prompt, comparison.prompt_id)
    items = crud.comparison_generations(session, comparison_id=comparison.id)
    return {
        "id": comparison.id,
        "round": comparison.round,
        "num_votes": comparison.num_votes,
        "target_votes": comparison.target_votes,
        "status": comparison.status,
        "messages": prompt.messages,
        "responses": [g.text for g in items],
    }


def _leased_to(user: User) -> int | None:
    """Annotators (who may be untrusted crowd workers) see only the items leased to them; reviewers and
    admins see every item."""
    return user.id if user.role == "annotator" else None


def _register_routes(app: FastAPI) -> None:
    @app.get("/healthz", include_in_schema=False)
    def healthz(request: Request):
        # Touches the database (and, for SQLite, checks its disk), so a broken store is not reported as ok.
        problem = websec.database_problem(request.app.state.engine)
        if problem:
            return JSONResponse({"status": "unavailable", "detail": problem}, status_code=503)
        return {"status": "ok", "version": __version__}

    @app.get("/login", response_class=HTMLResponse, include_in_schema=False)
    def login_form(request: Request, error: str = ""):
        # `error` only switches on a fixed message: nothing from the query string is ever shown.
        return render(templates, request, "login.html", title="Log in", wrong=bool(error))

    @app.post("/login", include_in_schema=False)
    def login(
        request: Request,
        username: Annotated[str, Form(max_length=64)],
        password: Annotated[str, Form(max_length=MAX_FORM_CHARS)],
    ):
        state = request.app.state
        # The peer address; uvicorn puts X-Forwarded-For here only from `forwarded_allow_ips` (logins.py).
        address = request.client.host if request.client else "?"
        keys = logins.keys_for(username, address, state.settings.login_attempts)
        wait = logins.reserve(state.engine, keys)  # counted before the hash: parallel guesses queue here
        if wait:
            return render(
                templates,
                request,
                "message.html",
                title="Log in",
                status_code=429,
                headers={"Retry-After": retry_after(wait)},
                heading="Too many failed attempts",
                message="Wait a few minutes and try again.",
            )
        # A short session of its own rather than a request slot: the argon2 check below is slow on purpose,
        # and other requests should not queue behind it.
        with Session(request.app.state.engine, expire_on_commit=False) as session:
            user = crud.get_user(session, name=username)
        if not crud.check_password(user, password):
            return RedirectResponse("/login?error=1", status_code=303)
        logins.succeeded(state.engine, keys)
        with Session(request.app.state.engine, expire_on_commit=False) as session:
            websec.start_login(session, request, user)
        return RedirectResponse("/annotate/" if user.role == "annotator" else "/", status_code=303)

    @app.get("/logout", response_class=HTMLResponse, include_in_schema=False)
    def logout_form(request: Request, user: UserDep):
        # The Gradio pages link here: logging out is a POST with the CSRF token, so no link can do it.
        return render(templates, request, "logout.html", title="Log out", user=user)

    @app.post("/logout", include_in_schema=False)
    def logout(request: Request, session: SessionDep, everywhere: Annotated[str, Form(max_length=1)] = ""):
        websec.end_login(session, request, everywhere=bool(everywhere))
        # Clear-Site-Data drops what the Gradio pages keep in localStorage (run history: prompts, replies).
        return RedirectResponse("/login", status_code=303, headers={"Clear-Site-Data": '"cache", "storage"'})

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def home(request: Request, user: UserDep):
        links = [("/queue", "Queue", "the comparisons waiting for votes")]
        if user.role in ("annotator", "admin"):
            links.insert(0, ("/annotate/", "Annotate", "compare responses, one item at a time (keys 1-4, S)"))
        if user.role in ("reviewer", "admin"):
            links.append(("/chat/", "Chat", "talk to any model version, side by side, with L1 presets"))
            links.append(("/arena/", "Arena", "blind battles between versions, and the leaderboard"))
        if user.role == "admin":
            links.append(("/admin", "Admin", "annotation quality, reward models, RL runs"))
        return render(templates, request, "home.html", title="Home", user=user, links=links)

    @app.get("/queue", response_class=HTMLResponse, include_in_schema=False)
    def queue_page(
        request: Request,
        user: UserDep,
        session: SessionDep,
        page_number: Annotated[int, Query(alias="page", ge=1, le=MAX_INT // PAGE_SIZE)] = 1,
    ):
        mine = _leased_to(user)
        total = crud.count_comparisons(session, status="queued", leased_to=mine)
        comparisons = crud.list_comparisons(
            session, status="queued", limit=PAGE_SIZE, offset=(page_number - 1) * PAGE_SIZE, leased_to=mine
        )
        cards = [comparison_card(session, c) for c in comparisons]
        pages = (total + PAGE_SIZE - 1) // PAGE_SIZE
        return render(
            templates,
            request,
            "queue.html",
            title="Queue",
            user=user,
            total=total,
            cards=cards,
            page_number=page_number,
            pages=pages,
        )

    @app.get("/api/comparisons", tags=["comparisons"], response_model=list[ComparisonOut])
    def api_comparisons(
        user: UserDep,
        session: SessionDep,
        status: Annotated[str | None, Query(pattern="^(queued|done|cancelled)$")] = None,
        round: Annotated[int | None, Query(ge=0, le=MAX_INT)] = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 100,
        offset: Annotated[int, Query(ge=0, le=MAX_INT)] = 0,
    ) -> list[dict]:
        """Comparisons with their prompt and responses (in position order: a, b, ...); an annotator gets only
        the items currently leased to them."""
        out = []
        listed = crud.list_comparisons(
            session, status=status, round=round, limit=limit, offset=offset, leased_to=_leased_to(user)
        )
        for c in listed:
            prompt = session.get(Prompt, c.prompt_id)
            items = crud.comparison_generations(session, comparison_id=c.id)
            out.append(
                {
                    "id": c.id,
                    "round": c.round,
                    "status": c.status,
                    "num_votes": c.num_votes,
                    "target_votes": c.target_votes,
                    "prompt": prompt.messages,
                    "responses": [{"generation_id": g.id, "text": g.text} for g in items],
                }
            )
        return out

    @app.get("/api/models", tags=["models"], response_model=list[ModelVersionOut])
    def api_models(user: UserDep, session: SessionDep) -> list[dict]:
        """Registered model versions with their lineage (newest ancestor first)."""
        return [
            {
                "id": v.id,
                "name": v.name,
                "kind": v.kind,
                "base": v.base,
                "round": v.round,
                "licence": v.licence,
                "run_id": v.run_id,
                "lineage": [a.name for a in crud.model_lineage(session, model_id=v.id)[1:]],
                "metrics": v.metrics,
            }
            for v in crud.list_model_versions(session)
        ]

    @app.get("/api/users", tags=["users"], response_model=list[UserOut])
    def api_users(user: AdminDep, session: SessionDep) -> list[dict]:
        """Every user (admins only)."""
        return [
            {"id": u.id, "name": u.name, "role": u.role, "kind": u.kind, "disabled": u.disabled}
            for u in session.exec(select(User).order_by(User.id)).all()
        ]
