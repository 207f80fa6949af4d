"""One FastAPI app for everything a browser or a script talks to.

Until the annotation, chat and admin UIs land, it serves login, a page listing the queued comparisons and a
small JSON API. Login is required everywhere except /login and /healthz; roles are checked in each handler
(`require_role`), never by hiding links. All model and user text goes through `html.escape`.
The interactive API docs are off: they load scripts from a CDN, and nothing here reaches the network.
"""

from __future__ import annotations

import asyncio
import html
import logging
from typing import Annotated

from fastapi import FastAPI, Form, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from sqlmodel import Session, select
from starlette.middleware.sessions import SessionMiddleware

from alignloop.core import __version__, crud
from alignloop.core.config import Settings
from alignloop.core.db import make_engine
from alignloop.core.http import (
    MAX_FORM_CHARS,
    MAX_INT,
    AdminDep,
    LoginRequired,
    SessionDep,
    UserDep,
    page,
)
from alignloop.core.limits import RateLimiter, retry_after
from alignloop.core.models import Comparison, Prompt, User

log = logging.getLogger(__name__)

PAGE_SIZE = 50
POSTGRES_DB_SLOTS = 16  # below the engine's pool size + overflow (30)
UI_PATHS = {"/annotate", "/chat", "/arena"}
LOGIN_WINDOW_SECONDS = 300
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
    )
    app.state.settings = settings
    app.state.engine = engine if engine is not None else make_engine(settings.db_url)
    sqlite = app.state.engine.dialect.name == "sqlite"
    app.state.db_slots = asyncio.Semaphore(1 if sqlite else POSTGRES_DB_SLOTS)
    app.state.model_pool = _model_pool(settings, app.state.engine)
    app.state.login_failures = RateLimiter(settings.login_attempts, LOGIN_WINDOW_SECONDS)
    app.state.login_failures_by_address = RateLimiter(3 * settings.login_attempts, LOGIN_WINDOW_SECONDS)
    app.state.vote_limiter = RateLimiter(settings.votes_per_minute, 60)
    app.add_exception_handler(LoginRequired, _login_required)
    app.add_exception_handler(Exception, _internal_error)
    _register_routes(app)
    from alignloop import console, jobs

    app.include_router(console.router)
    jobs.recover_jobs(app.state.engine)  # a restart leaves no job in a false "running" state
    _mount_stages(app)
    # Added last, so it is the outermost middleware and every other one (and Gradio) sees `request.session`.
    app.add_middleware(
        SessionMiddleware,
        secret_key=settings.secret_key,
        session_cookie="alignloop_session",
        same_site="strict",
    )
    return app


def _model_pool(settings: Settings, engine):
    """Loaded chat models (the OpenAI endpoint, /chat, /arena), by reference; adapters merged for speed."""
    from serve.engine import ModelPool

    def load(ref: str):
        from alignloop.core import registry

        with Session(engine) as session:
            loaded = registry.resolve(ref, settings=settings, session=session)
        model = loaded.model.merge_and_unload() if hasattr(loaded.model, "merge_and_unload") else loaded.model
        return model, loaded.tokenizer

    return ModelPool(load)


def app_from_env() -> FastAPI:
    """Factory for `uvicorn --factory` and `alignloop serve --workers N`: the workspace is $ALIGNLOOP_HOME."""
    from alignloop.core.config import load_settings

    return create_app(load_settings())


def _mount_stages(app: FastAPI) -> None:
    """The stage UIs and APIs. Imported here, not at the top: the kernel must import without Gradio."""
    import gradio as gr

    from annotate import admin as annotate_admin
    from annotate import api as annotate_api
    from annotate import app as annotate_app
    from reward import web as reward_web
    from rl import web as rl_web
    from serve import arena, chat, openai_api

    app.include_router(annotate_api.router)
    app.include_router(annotate_admin.router)
    app.include_router(reward_web.router)
    app.include_router(rl_web.router)
    app.include_router(arena.router)
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
    gr.mount_gradio_app(app, chat.build_ui(engine, settings, pool), path="/chat", auth_dependency=reviewers,
                        **ui_options)  # fmt: skip
    gr.mount_gradio_app(app, arena.build_ui(engine, settings, pool), path="/arena", auth_dependency=reviewers,
                        **ui_options)  # fmt: skip


async def _login_required(request: Request, exc: LoginRequired):
    if request.url.path.startswith("/api"):
        return JSONResponse({"detail": "login required"}, status_code=401)
    return RedirectResponse("/login", status_code=303)


async def _internal_error(request: Request, exc: Exception):
    log.exception("unhandled error on %s", request.url.path)
    return JSONResponse({"detail": "internal error; the server log has the details"}, status_code=500)


def render_comparison(session: Session, comparison: Comparison) -> str:
    prompt = session.get(Prompt, comparison.prompt_id)
    turns = "".join(
        f'<div class="turn"><span class="role">{html.escape(m["role"])}:</span> {html.escape(m["content"])}</div>'
        for m in prompt.messages
    )
    items = crud.comparison_generations(session, comparison_id=comparison.id)
    responses = "".join(
        f'<div class="response"><div class="role">{chr(ord("A") + i)}</div>{html.escape(g.text)}</div>'
        for i, g in enumerate(items)
    )
    meta = (
        f"#{comparison.id} · round {comparison.round} · {comparison.num_votes}/{comparison.target_votes} votes"
        f" · {comparison.status}"
    )
    return f'<div class="card"><div class="meta">{meta}</div>{turns}<div class="responses">{responses}</div></div>'


def _register_routes(app: FastAPI) -> None:
    @app.get("/healthz", include_in_schema=False)
    def healthz():
        return {"status": "ok", "version": __version__}

    @app.get("/login", response_class=HTMLResponse, include_in_schema=False)
    def login_form(error: str = ""):
        message = '<p style="color:#b00">Wrong name or password.</p>' if error else ""
        return page(
            "Log in",
            f"<h2>Log in</h2>{message}<form class='login' method='post' action='/login'>"
            "<input name='username' placeholder='name' autofocus required maxlength='64'>"
            "<input name='password' type='password' placeholder='password' required maxlength='1024'>"
            "<button>Log in</button></form>",
        )

    @app.post("/login", include_in_schema=False)
    def login(
        request: Request,
        username: Annotated[str, Form(max_length=64)],
        password: Annotated[str, Form(max_length=MAX_FORM_CHARS)],
    ):
        state = request.app.state
        address = request.client.host if request.client else "?"
        wait = max(
            state.login_failures.blocked_for(username), state.login_failures_by_address.blocked_for(address)
        )
        if wait:
            return HTMLResponse(
                page("Log in", "<h2>Too many failed attempts</h2><p>Wait a few minutes and try again.</p>").body,
                status_code=429, headers={"Retry-After": retry_after(wait)},
            )  # fmt: skip
        # A short session of its own rather than a request slot: the argon2 check below is slow on purpose,
        # and other requests should not queue behind it.
        with Session(request.app.state.engine, expire_on_commit=False) as session:
            user = crud.get_user(session, name=username)
        if not crud.check_password(user, password):
            state.login_failures.record(username)
            state.login_failures_by_address.record(address)
            return RedirectResponse("/login?error=1", status_code=303)
        request.session.clear()
        request.session["user_id"] = user.id
        return RedirectResponse("/annotate/" if user.role == "annotator" else "/", status_code=303)

    @app.post("/logout", include_in_schema=False)
    def logout(request: Request):
        request.session.clear()
        return RedirectResponse("/login", status_code=303)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def home(user: UserDep):
        links = [("/queue", "Queue", "the comparisons waiting for votes")]
        if user.role in ("annotator", "admin"):
            links.insert(0, ("/annotate/", "Annotate", "compare responses, one item at a time (keys 1-4, S)"))
        if user.role in ("reviewer", "admin"):
            links.append(("/chat/", "Chat", "talk to any model version, side by side, with L1 presets"))
            links.append(("/arena/", "Arena", "blind battles between versions, and the leaderboard"))
        if user.role == "admin":
            links.append(("/admin", "Admin", "annotation quality, reward models, RL runs"))
        items = "".join(f'<li><a href="{href}">{label}</a> — {text}</li>' for href, label, text in links)
        return page("Home", f"<h2>Welcome, {html.escape(user.name)}</h2><ul>{items}</ul>", user)

    @app.get("/queue", response_class=HTMLResponse, include_in_schema=False)
    def queue_page(
        user: UserDep, session: SessionDep, page_number: Annotated[int, Query(alias="page", ge=1)] = 1
    ):
        total = crud.count_comparisons(session, status="queued")
        comparisons = crud.list_comparisons(
            session, status="queued", limit=PAGE_SIZE, offset=(page_number - 1) * PAGE_SIZE
        )
        cards = "".join(render_comparison(session, c) for c in comparisons) or "<p>The queue is empty.</p>"
        pages = (total + PAGE_SIZE - 1) // PAGE_SIZE
        nav = f'<p class="meta">page {page_number} of {max(pages, 1)}'
        if page_number < pages:
            nav += f' · <a href="/queue?page={page_number + 1}">next</a>'
        nav += "</p>"
        return page("Queue", f"<h2>Queued comparisons ({total})</h2>{nav}{cards}", user)

    @app.get("/api/comparisons", tags=["comparisons"])
    def api_comparisons(
        user: UserDep,
        session: SessionDep,
        status: Annotated[str | None, Query(pattern="^(queued|done|cancelled)$")] = None,
        round: Annotated[int | None, Query(ge=0, le=MAX_INT)] = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 100,
        offset: Annotated[int, Query(ge=0, le=MAX_INT)] = 0,
    ) -> list[dict]:
        """Comparisons with their prompt and responses (in position order: a, b, ...)."""
        out = []
        for c in crud.list_comparisons(session, status=status, round=round, limit=limit, offset=offset):
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

    @app.get("/api/models", tags=["models"])
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

    @app.get("/api/users", tags=["users"])
    def api_users(user: AdminDep, session: SessionDep) -> list[dict]:
        """Every user (admins only)."""
        return [
            {"id": u.id, "name": u.name, "role": u.role, "kind": u.kind, "disabled": u.disabled}
            for u in session.exec(select(User).order_by(User.id)).all()
        ]
