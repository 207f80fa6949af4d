"""Issue #13 M7: login throttling counted before the hash, per (name, address) with back-off, shared by every
worker through the database, and X-Forwarded-For believed only from configured proxies."""

import dataclasses
import threading
from datetime import timedelta

import httpx
import pytest
from fastapi.testclient import TestClient

from alignloop.core import logins
from alignloop.core.models import utcnow
from alignloop.web import create_app
from tests.conftest import serve_in_thread


def _guess(base_or_client, name, password, **headers):
    return base_or_client.post(
        "/login", data={"username": name, "password": password}, headers=headers, follow_redirects=False
    )


def test_thirty_parallel_guesses_do_not_pass_a_limit_of_ten(workspace, monkeypatch):
    settings, engine, _ = workspace
    frozen = utcnow()  # every guess at the same instant: no back-off runs out during the test
    monkeypatch.setattr(logins, "utcnow", lambda: frozen)
    app = create_app(dataclasses.replace(settings, login_attempts=10), engine)
    codes, lock = [], threading.Lock()
    with serve_in_thread(app) as base:
        barrier = threading.Barrier(30)

        def guess(i):
            with httpx.Client(base_url=base, timeout=120) as client:
                barrier.wait()
                code = _guess(client, "admin", f"wrong-{i}").status_code
            with lock:
                codes.append(code)

        threads = [threading.Thread(target=guess, args=(i,)) for i in range(30)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert sorted(codes) == [303] * 10 + [429] * 20  # 303 = a password was checked (and was wrong)


def test_backoff_is_per_name_and_address_and_doubles(engine):
    now = utcnow()
    keys = logins.keys_for("admin", "10.0.0.1", 3)
    assert [logins.reserve(engine, keys, now=now) for _ in range(4)] == [0, 0, 0, 30]
    # The right password from another address is not locked out by someone else's guessing.
    assert logins.reserve(engine, logins.keys_for("admin", "10.0.0.2", 3), now=now) == 0
    later = now + timedelta(seconds=31)
    assert logins.reserve(engine, keys, now=later) == 0  # the wait ran out: one more try...
    assert logins.reserve(engine, keys, now=later) == 60  # ...and the next wait is twice as long
    logins.succeeded(engine, keys)  # a right password clears the series
    assert logins.reserve(engine, keys, now=later) == 0


def test_right_password_from_another_address_still_works(workspace):
    settings, engine, password = workspace
    settings = dataclasses.replace(settings, login_attempts=3)
    with TestClient(create_app(settings, engine), client=("10.0.0.66", 5000)) as attacker:
        for _ in range(3):
            assert _guess(attacker, "admin", "wrong").status_code == 303
        assert _guess(attacker, "admin", password).status_code == 429  # this address waits
    with TestClient(create_app(settings, engine), client=("10.0.0.7", 5000)) as owner:
        assert _guess(owner, "admin", password).headers["location"] == "/"


def test_two_workers_share_one_limit(workspace):
    """Two app instances on one database stand in for `serve --workers 2`: they enforce one limit, not two."""
    settings, engine, _ = workspace
    settings = dataclasses.replace(settings, login_attempts=4)
    from alignloop.core.db import make_engine

    other_engine = make_engine(settings.db_url)  # a second process has its own engine and connections
    with (
        TestClient(create_app(settings, engine)) as one,
        TestClient(create_app(settings, other_engine)) as two,
    ):
        codes = [_guess(client, "admin", "wrong").status_code for client in (one, two) * 4]
    other_engine.dispose()
    assert codes == [303] * 4 + [429] * 4


@pytest.mark.parametrize(("allowed", "seen"), [([], "127.0.0.1"), (["127.0.0.1"], "203.0.113.9")])
def test_forwarded_for_is_believed_only_from_configured_proxies(workspace, allowed, seen):
    import uvicorn
    from fastapi import FastAPI, Request

    settings = dataclasses.replace(workspace[0], forwarded_allow_ips=allowed)
    echo = FastAPI()

    @echo.get("/who")
    def who(request: Request):
        return request.client.host

    from tests.conftest import free_port

    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            echo, host="127.0.0.1", port=port, log_level="warning", **logins.proxy_options(settings)
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        threading.Event().wait(0.01)
    try:
        got = httpx.get(f"http://127.0.0.1:{port}/who", headers={"X-Forwarded-For": "203.0.113.9"}).json()
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    assert got == seen
