"""Browser-facing defences: revocable logins, CSRF tokens, an Origin check, body limits and security headers.

Threat model (README "Security"): annotators may be untrusted crowd workers and imported data is untrusted, so
any text on a page may be hostile, and any page on the same host (another port, a sibling subdomain) may try to
act with a logged-in admin's cookie. SameSite=Strict stops other *sites*; these stop the rest.

Invariants:
- A login is a server-side `LoginSession` row named by a random token in the signed cookie (Starlette's
  SessionMiddleware, itsdangerous). It ends on logout, "log out everywhere", a password change or reset, a role
  change (both change the row's fingerprint) and when the account is disabled, wherever that is done (web or CLI).
- Every state-changing request authenticated by the cookie carries the session's CSRF token (form field
  `csrf_token` or header `X-CSRF-Token`) and, from a browser, comes from this very origin (`Sec-Fetch-Site`,
  else `Origin`). Bearer API keys are exempt: a browser never attaches them by itself, so they cannot be forged.
- No request body over `MAX_BODY_BYTES` is read, whether or not the sender is logged in: the limit is checked
  against Content-Length and against the bytes actually streamed, before any handler or auth runs.

Trade-offs: per-session synchronizer tokens (a random value kept in the signed session) rather than a
double-submit cookie library such as starlette-csrf: that one reads only a header, so plain HTML forms would need
script, and our pages allow none inline. /login takes no token (there is no session yet); the Origin check
still covers it. Sources: OWASP CSRF Prevention Cheat Sheet (synchronizer token, Fetch Metadata), MDN
Clear-Site-Data, Content-Security-Policy Level 3.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

from fastapi import HTTPException, Request
from sqlmodel import Session, delete

from alignloop.core.models import LoginSession, User

SESSION_DAYS = 14
MAX_BODY_BYTES = 1 << 20
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"
CSRF_EXEMPT_PATHS = frozenset({"/login"})
MIN_FREE_DISK_BYTES = 16 << 20  # /healthz: below this a SQLite database cannot take a write reliably

# Content-Security-Policy. Our own pages run no inline script or style at all. Gradio's pages need inline
# bootstrap script (its config, our keyboard shortcuts), inline styles and blob:/data: media, but not `eval`
# (the browser tests pass without it); they still may not load anything from elsewhere, be framed, or post
# forms off-site.
CSP_PAGES = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; font-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
CSP_GRADIO = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data: blob:; media-src 'self' data: blob:; font-src 'self' data:; connect-src 'self'; "
    "worker-src 'self' blob:; object-src 'none'; base-uri 'self'; form-action 'self'; frame-ancestors 'none'"
)


# --- login sessions ------------------------------------------------------------------------------------------


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def fingerprint(user: User) -> str:
    """Changes when the password or the role does: such a change ends the user's logins."""
    return _digest(f"{user.id}|{user.password_hash}|{user.role}")


def start_login(db: Session, request: Request, user: User) -> None:
    """A fresh session for `user`: new token (no fixation), new CSRF token, a row that can be revoked."""
    token = secrets.token_urlsafe(32)
    db.add(LoginSession(id=_digest(token), user_id=user.id, fingerprint=fingerprint(user)))
    db.commit()
    request.session.clear()
    request.session.update({"user_id": user.id, "sid": token, "csrf": secrets.token_urlsafe(32)})


def session_user(db: Session, request: Request) -> User | None:
    """The user of this request's login session, or None if it has none, or it was revoked or has expired."""
    if "session" not in request.scope:
        return None
    token, user_id = request.session.get("sid"), request.session.get("user_id")
    if not isinstance(token, str) or not isinstance(user_id, int):
        return None
    row = db.get(LoginSession, _digest(token))
    user = db.get(User, user_id)
    if row is None or user is None or row.user_id != user.id or user.disabled:
        return None
    created = row.created_at if row.created_at.tzinfo else row.created_at.replace(tzinfo=UTC)
    if created < datetime.now(UTC) - timedelta(days=SESSION_DAYS):
        return None
    if not hmac.compare_digest(row.fingerprint, fingerprint(user)):
        return None
    return user


def end_login(db: Session, request: Request, *, everywhere: bool = False) -> None:
    """Log this browser out (and, with `everywhere`, every other login of the same user)."""
    token, user_id = request.session.get("sid"), request.session.get("user_id")
    if everywhere and isinstance(user_id, int):
        end_all_logins(db, user_id)
    elif isinstance(token, str):
        db.exec(delete(LoginSession).where(LoginSession.id == _digest(token)))
        db.commit()
    request.session.clear()


def end_all_logins(db: Session, user_id: int) -> None:
    db.exec(delete(LoginSession).where(LoginSession.user_id == user_id))
    db.commit()


# --- CSRF ----------------------------------------------------------------------------------------------------


def csrf_token(request: Request) -> str:
    """The session's CSRF token (made on first use: the login form's anonymous session gets one too)."""
    if "session" not in request.scope:
        return ""
    token = request.session.get("csrf")
    if not isinstance(token, str):
        token = request.session["csrf"] = secrets.token_urlsafe(32)
    return token


async def verify_csrf(request: Request) -> None:
    """App-wide dependency: unsafe requests carried by the session cookie must echo its CSRF token."""
    if request.method in SAFE_METHODS or request.url.path in CSRF_EXEMPT_PATHS:
        return
    if request.headers.get("authorization", "").lower().startswith("bearer "):
        return
    expected = request.session.get("csrf") if "session" in request.scope else None
    if not expected:
        return  # no session, so nothing to ride on: the handler answers 401 on its own
    sent = request.headers.get(CSRF_HEADER)
    if sent is None and request.headers.get("content-type", "").startswith(
        ("application/x-www-form-urlencoded", "multipart/form-data")
    ):
        sent = (await request.form()).get(CSRF_FIELD)
    if not isinstance(sent, str) or not hmac.compare_digest(sent, expected):
        raise HTTPException(
            status_code=403, detail="missing or wrong CSRF token; reload the page and try again"
        )


def cross_origin(headers: dict[str, str]) -> bool:
    """True if a browser says this request was made by another origin (another port or host counts)."""
    site = headers.get("sec-fetch-site")
    if site is not None:
        return site not in ("same-origin", "none")
    origin = headers.get("origin")
    if origin is None:
        return False  # not a browser, or one too old for either header: the CSRF token still applies
    return origin == "null" or urlsplit(origin).netloc != headers.get("host", "")


# --- the middleware ------------------------------------------------------------------------------------------


class GuardMiddleware:
    """Pure ASGI, outermost: body limit, cross-origin refusal, blocked Gradio uploads, security headers.

    Pure ASGI rather than `@app.middleware("http")` so the body can be counted as it streams in, and so a
    refusal is sent before any byte of it is read.
    """

    def __init__(self, app, *, gradio_paths: tuple[str, ...] = (), secure: bool = False):
        self.app, self.gradio_paths, self.secure = app, gradio_paths, secure

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path: str = scope["path"]
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        gradio = any(path == p or path.startswith(p + "/") for p in self.gradio_paths)
        if gradio and "/gradio_api/upload" in path:
            # No component on our pages takes a file; Gradio would otherwise accept any file from anyone.
            return await _refuse(send, 404, "uploads are not accepted here")
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
            return await _refuse(send, 413, f"request body over {MAX_BODY_BYTES} bytes")
        bearer = headers.get("authorization", "").lower().startswith("bearer ")
        if scope["method"] not in SAFE_METHODS and not bearer and cross_origin(headers):
            return await _refuse(send, 403, "cross-origin request refused")

        received, started, refused = 0, False, False

        async def limited_receive():
            # Over the limit mid-stream: answer 413 now and tell the app the client left, so it stops reading.
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > MAX_BODY_BYTES:
                    refused = True
                    if not started:
                        await _refuse(send, 413, f"request body over {MAX_BODY_BYTES} bytes")
                    return {"type": "http.disconnect"}
            return message

        csp = CSP_GRADIO if gradio else CSP_PAGES

        async def send_with_headers(message):
            nonlocal started
            if refused and not started:
                return  # the 413 already went out; whatever the app answers after is dropped
            if message["type"] == "http.response.start":
                started = True
                extra = [
                    (b"content-security-policy", csp.encode()),
                    (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"same-origin"),
                    (b"x-frame-options", b"DENY"),
                ]
                if self.secure:
                    extra.append((b"strict-transport-security", b"max-age=31536000"))
                present = {k.lower() for k, _ in message.get("headers", [])}
                message = {
                    **message,
                    "headers": [*message.get("headers", []), *[(k, v) for k, v in extra if k not in present]],
                }
            await send(message)

        await self.app(scope, limited_receive, send_with_headers)


async def _refuse(send, status: int, message: str) -> None:
    body = json.dumps({"detail": message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


# --- health --------------------------------------------------------------------------------------------------


def database_problem(engine) -> str | None:
    """Why the database cannot serve requests now (unreachable, or its disk full), or None if it can."""
    from sqlalchemy import text

    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT version FROM schemainfo WHERE id = 1")).first()
    except Exception as exc:  # any driver error means "not healthy"; the message is for the operator
        return f"database unreachable: {type(exc).__name__}"
    if engine.dialect.name == "sqlite" and engine.url.database:
        free = shutil.disk_usage(Path(engine.url.database).resolve().parent).free
        if free < MIN_FREE_DISK_BYTES:
            return f"database disk almost full ({free} bytes free)"
    return None
