"""Login throttling that holds across web worker processes, and the one place that decides who is asking.

Rules (issue #13 M7; each one tested, with real threads and with two app instances on one database):
- every attempt is counted *before* the password hash is checked, in one locked database transaction, so
  N parallel guesses cannot all pass a check made before any of them was recorded; a right password then
  clears its (name, address) count;
- the key is (name, address): after `login_attempts` tries the next one waits 30 s, then 60 s, 120 s, ... up
  to `MAX_BACKOFF_SECONDS`. Nobody can lock a name (the admin's included) for everyone else: the right password
  from another address still works. Each address also has a budget of 3x that across all names;
- counts live in the database (`LoginThrottle`, a row per key), so `alignloop serve --workers N` enforces one
  limit, not N; a series is forgotten once its key has been quiet for `WINDOW_SECONDS`;
- the address is the socket's peer; `X-Forwarded-For` is believed only from the proxies listed in the
  `forwarded_allow_ips` setting (uvicorn's own proxy-header handling, configured by `proxy_options`). Empty
  by default: then the header is ignored, even from loopback.

Trade-offs: an attacker with many addresses gets `login_attempts` fast guesses per address per name (argon2
keeps each one slow); a shared store costs one small write transaction per login attempt. The `limits`
package has no SQL storage (memory, Redis, Memcached, MongoDB), so this is a small counter of our own.
"""

from __future__ import annotations

import random
from datetime import datetime, timedelta

from sqlalchemy import delete, or_
from sqlmodel import Session, col, select

from alignloop.core.db import session_scope
from alignloop.core.models import LoginThrottle, utcnow

WINDOW_SECONDS = 300
BACKOFF_SECONDS = 30  # the first wait; each further attempt doubles it
MAX_BACKOFF_SECONDS = 900
ADDRESS_FACTOR = 3
PRUNE_CHANCE, PRUNE_AFTER_SECONDS = 0.02, 3600


def keys_for(name: str, address: str, limit: int) -> dict[str, int]:
    """The throttle keys one attempt counts against, with their limits."""
    return {f"pair:{name[:64]}@{address}": limit, f"addr:{address}": ADDRESS_FACTOR * limit}


def _backoff(over: int) -> float:
    return float(min(BACKOFF_SECONDS * 2 ** min(over, 20), MAX_BACKOFF_SECONDS))


def _insert_missing(session: Session, key: str, now: datetime) -> None:
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    statement = insert(LoginThrottle).values(key=key, attempts=0, window_start=now)
    session.connection().execute(statement.on_conflict_do_nothing(index_elements=["key"]))


def _aware(value: datetime | None) -> datetime | None:
    from datetime import UTC

    return value if value is None or value.tzinfo else value.replace(tzinfo=UTC)


def reserve(engine, keys: dict[str, int], *, now: datetime | None = None) -> float:
    """Count one attempt against every key, or none of them; returns 0 (go ahead) or the seconds to wait.

    The rows are locked (SQLite: the write transaction is BEGIN IMMEDIATE; PostgreSQL: FOR UPDATE, in key
    order so two attempts never deadlock) from the check to the increment.
    """
    now = now or utcnow()
    with session_scope(engine) as session:
        if random.random() < PRUNE_CHANCE:  # keep the table small: forget series quiet for an hour
            horizon = now - timedelta(seconds=PRUNE_AFTER_SECONDS)
            session.connection().execute(
                delete(LoginThrottle).where(
                    LoginThrottle.window_start < horizon,
                    or_(
                        col(LoginThrottle.next_allowed_at).is_(None), LoginThrottle.next_allowed_at < horizon
                    ),
                )
            )
        rows = []
        for key in sorted(keys):
            _insert_missing(session, key, now)
            row = session.exec(select(LoginThrottle).where(LoginThrottle.key == key).with_for_update()).one()
            rows.append(row)
        wait = 0.0
        for row in rows:
            next_allowed = _aware(row.next_allowed_at)
            if next_allowed is not None and now < next_allowed:
                wait = max(wait, (next_allowed - now).total_seconds())
        if wait:
            return wait
        for row in rows:
            quiet_since = _aware(row.next_allowed_at) or _aware(row.window_start)
            if (now - quiet_since).total_seconds() > WINDOW_SECONDS:
                row.attempts, row.window_start, row.next_allowed_at = 0, now, None
            row.attempts += 1
            if row.attempts >= keys[row.key]:
                row.next_allowed_at = now + timedelta(seconds=_backoff(row.attempts - keys[row.key]))
            session.add(row)
    return 0.0


def succeeded(engine, keys: dict[str, int]) -> None:
    """A right password: forget the (name, address) series; give the address its attempt back."""
    with session_scope(engine) as session:
        for key in sorted(keys):
            row = session.exec(
                select(LoginThrottle).where(LoginThrottle.key == key).with_for_update()
            ).first()
            if row is None:
                continue
            if key.startswith("pair:"):
                session.delete(row)
            elif row.attempts > 0:
                row.attempts -= 1
                session.add(row)


def proxy_options(settings) -> dict:
    """uvicorn options: believe X-Forwarded-For only from the proxies the workspace names (none by default;
    uvicorn's own default trusts 127.0.0.1, which is any local process)."""
    allowed = [str(a) for a in settings.forwarded_allow_ips]
    return {"proxy_headers": bool(allowed), "forwarded_allow_ips": allowed or None}
