"""Issue #13, the web half, through the HTTP surface: each test reproduces an attack that got through before.

H1 reflected XSS via `notice`, pages built by hand, CSP; M1 CSRF (token and Origin / Sec-Fetch-Site); M2
revocable sessions; M5 body limits; M8 Gradio uploads; L3 cookie and headers; L4 huge ints on every route
(hypothesis, including the routes left out of the schema); L9 /healthz touching the database.
The browser halves (the whole XSS chain, CSRF from another port, a copied cookie) are in test_browser_security.py.
"""

import re
from pathlib import Path

import pytest
from conftest import web_login
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlmodel import Session

from alignloop.core import crud
from alignloop.web import create_app

ROOT = Path(__file__).resolve().parents[1]
PAYLOAD = "<img src=x onerror=alert(1)>"


@pytest.fixture
def app_and_users(workspace):
    settings, engine, admin_password = workspace
    with Session(engine) as s:
        crud.create_user(s, name="ann", role="annotator", password="annotator-pass")
        crud.create_user(s, name="rev", role="reviewer", password="reviewer-pass")
        s.commit()
    app = create_app(settings, engine)
    return app, settings, engine, admin_password


@pytest.fixture
def admin(app_and_users):
    app, settings, engine, password = app_and_users
    with TestClient(app) as client:
        web_login(client, "admin", password)
        yield client, engine


def all_routes(app):
    """Every API route, those of included routers too (FastAPI keeps them behind an `_IncludedRouter`)."""
    for route in app.routes:
        if isinstance(route, APIRoute):
            yield route
        elif hasattr(route, "original_router"):
            yield from all_routes(route.original_router)


def user_id(engine, name):
    with Session(engine) as s:
        return crud.get_user(s, name=name).id


def role_of(engine, name):
    with Session(engine) as s:
        return crud.get_user(s, name=name).role


# --- H1 ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/admin/users", "/admin/keys", "/admin/jobs", "/login"])
def test_no_query_parameter_reaches_the_page(admin, path):
    client, _ = admin
    page = client.get(path, params={"notice": PAYLOAD, "error": PAYLOAD})
    assert page.status_code == 200
    assert PAYLOAD not in page.text and "onerror" not in page.text


def test_pages_carry_a_csp_and_no_inline_script_or_style(admin):
    client, _ = admin
    for path in [
        "/",
        "/queue",
        "/admin",
        "/admin/rounds",
        "/admin/jobs",
        "/admin/users",
        "/admin/keys",
        "/admin/reward",
        "/admin/rl",
        "/login",
        "/logout",
    ]:
        page = client.get(path)
        assert page.status_code == 200, path
        csp = page.headers["content-security-policy"]
        assert "script-src 'self';" in csp and "frame-ancestors 'none'" in csp, path
        assert "<script" not in page.text and "style=" not in page.text and "<style" not in page.text, path
        assert page.headers["x-content-type-options"] == "nosniff"
        assert page.headers["x-frame-options"] == "DENY" and page.headers["referrer-policy"] == "same-origin"
    gradio = client.get("/annotate/")
    assert gradio.status_code == 200 and "frame-ancestors 'none'" in gradio.headers["content-security-policy"]
    assert (
        "https:" not in gradio.headers["content-security-policy"]
    )  # nothing from elsewhere, even for Gradio


def test_a_new_password_is_shown_escaped_as_a_value_not_from_the_url(admin):
    client, engine = admin
    page = client.post("/admin/users", data={"name": "x<b>y", "role": "annotator"})
    assert "x&lt;b&gt;y" in page.text and "x<b>y" not in page.text  # the name is refused or shown escaped


def test_pages_are_templates_not_strings():
    """The class of bug, not the instance: no page module builds HTML by hand any more."""
    for module in [
        "alignloop/web.py",
        "alignloop/console.py",
        "alignloop/core/http.py",
        "annotate/admin.py",
        "reward/web.py",
        "rl/web.py",
        "serve/levels_web.py",
        "annotate/gold.py",
        "annotate/guidelines.py",
        "serve/review.py",
    ]:
        source = (ROOT / module).read_text()
        assert "html.escape" not in source and "HTMLResponse(" not in source and "<td>" not in source, module
    # The templates travel with the package (pyproject package-data covers every one of them).
    pyproject = (ROOT / "pyproject.toml").read_text()
    for folder, pattern in [
        ("alignloop", '"templates/*.html"'),
        ("alignloop", '"core/templates/*.html"'),
        ("alignloop", '"core/static/*.css"'),
        ("annotate", '"templates/*.html"'),
        ("reward", '"templates/*.html"'),
        ("rl", '"templates/*.html"'),
    ]:
        line = next(ln for ln in pyproject.splitlines() if ln.startswith(f"{folder} = ["))
        assert pattern in line, (folder, pattern)
        assert list((ROOT / folder).glob(pattern.strip('"'))), pattern


# --- M1 ------------------------------------------------------------------------------------------------------


def test_state_changes_need_the_csrf_token(admin):
    client, engine = admin
    rev = user_id(engine, "rev")
    token = client.headers.pop("X-CSRF-Token")
    assert client.post(f"/admin/users/{rev}/role", data={"role": "admin"}).status_code == 403
    bad = client.post(f"/admin/users/{rev}/role", data={"role": "admin", "csrf_token": "x" * len(token)})
    assert bad.status_code == 403 and role_of(engine, "rev") == "reviewer"
    assert client.post("/admin/jobs", data={"kind": "generate", "arguments": ""}).status_code == 403
    ok = client.post(
        f"/admin/users/{rev}/role", data={"role": "annotator", "csrf_token": token}, follow_redirects=False
    )
    assert (
        ok.status_code == 303
        and role_of(engine, "ann") == "annotator"
        and role_of(engine, "rev") == "annotator"
    )


def test_every_form_on_every_page_carries_the_token(admin):
    client, _ = admin
    token = client.headers["X-CSRF-Token"]
    for path in ["/", "/admin", "/admin/jobs", "/admin/users", "/admin/keys", "/logout"]:
        text = client.get(path).text
        forms = re.findall(r"<form[^>]*method=\"post\"[^>]*>(.*?)</form>", text, flags=re.S)
        assert forms, path
        assert all(f'name="csrf_token" value="{token}"' in f for f in forms), path


def test_every_unsafe_route_refuses_a_cookie_request_without_the_token(admin):
    client, _ = admin
    client.headers.pop("X-CSRF-Token")
    checked = []
    for route in all_routes(client.app):
        if not isinstance(route, APIRoute) or not (route.methods & {"POST", "PUT", "PATCH", "DELETE"}):
            continue
        if route.path in ("/login",) or route.path.startswith("/v1/"):
            continue  # /login has no session yet (Origin-checked); /v1 is for API keys
        path = re.sub(r"\{(\w+)\}", lambda m: "disable" if m.group(1) == "action" else "1", route.path)
        for method in route.methods & {"POST", "PUT", "PATCH", "DELETE"}:
            response = client.request(method, path)
            assert response.status_code == 403 and "CSRF" in response.text, (method, path, response.text)
            checked.append(path)
    assert len(checked) >= 14, checked


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "http://testserver:8081"},
        {"Sec-Fetch-Site": "same-site"},
        {"Sec-Fetch-Site": "cross-site"},
        {"Origin": "null"},
    ],
)
def test_cross_origin_writes_are_refused_even_with_the_token(admin, headers):
    client, engine = admin
    rev = user_id(engine, "rev")
    response = client.post(f"/admin/users/{rev}/role", data={"role": "admin"}, headers=headers)
    assert response.status_code == 403 and role_of(engine, "rev") == "reviewer"
    assert (
        client.post("/login", data={"username": "admin", "password": "x"}, headers=headers).status_code == 403
    )


def test_same_origin_browser_requests_and_api_keys_pass(admin):
    client, engine = admin
    ok = client.post(
        f"/admin/users/{user_id(engine, 'rev')}/role",
        data={"role": "annotator"},
        headers={"Origin": "http://testserver", "Sec-Fetch-Site": "same-origin"},
        follow_redirects=False,
    )
    assert ok.status_code == 303
    with Session(engine) as s:
        key, _ = crud.create_api_key(s, user=crud.get_user(s, name="admin"), name="ci")
        s.commit()
    with TestClient(client.app) as api:  # no cookie, no token: a Bearer key is not CSRF-able
        response = api.post(
            "/api/jobs/999/cancel", headers={"Authorization": f"Bearer {key}", "Origin": "http://elsewhere"}
        )
        assert response.status_code == 404


# --- M2 ------------------------------------------------------------------------------------------------------


def test_a_copied_cookie_dies_with_logout(app_and_users):
    app, _, _, password = app_and_users
    with TestClient(app) as client, TestClient(app) as thief:
        web_login(client, "admin", password)
        thief.cookies.set("alignloop_session", client.cookies.get("alignloop_session"))
        assert thief.get("/api/users").status_code == 200
        response = client.post("/logout", follow_redirects=False)
        assert thief.get("/api/users").status_code == 401
        assert response.status_code == 303 and '"storage"' in response.headers.get("clear-site-data", "")


def test_log_out_everywhere_and_the_events_that_end_sessions(app_and_users):
    app, _, engine, password = app_and_users
    with TestClient(app) as admin, TestClient(app) as rev1, TestClient(app) as rev2:
        web_login(rev1, "rev", "reviewer-pass")
        web_login(rev2, "rev", "reviewer-pass")
        assert rev1.post("/logout", data={"everywhere": "1"}, follow_redirects=False).status_code == 303
        assert rev2.get("/api/models").status_code == 401  # the other browser too

        web_login(admin, "admin", password)
        rev = user_id(engine, "rev")
        for action in ("reset-password", "role", "disable"):
            web_login(rev1, "rev", "reviewer-pass")
            assert rev1.get("/api/models").status_code == 200
            if action == "reset-password":
                new = admin.post(f"/admin/users/{rev}/reset-password")
                password_rev = re.search(r'<code id="secret">([^<]+)</code>', new.text).group(1)
            elif action == "role":
                admin.post(f"/admin/users/{rev}/role", data={"role": "admin"})
                admin.post(f"/admin/users/{rev}/role", data={"role": "reviewer"})
            else:
                admin.post(f"/admin/users/{rev}/disable")
                admin.post(f"/admin/users/{rev}/enable")
            assert rev1.get("/api/models").status_code == 401, action
            with Session(engine) as s:  # the next round logs in with the known password again
                crud.set_password(s, user=crud.get_user(s, name="rev"), password="reviewer-pass")
                s.commit()
        assert password_rev


def test_cli_password_change_ends_sessions_too(app_and_users):
    """The fingerprint ties a login to the password hash and role, so changes made outside the web count."""
    app, _, engine, _ = app_and_users
    with TestClient(app) as rev:
        web_login(rev, "rev", "reviewer-pass")
        with Session(engine) as s:
            crud.set_password(s, user=crud.get_user(s, name="rev"), password="another-pass")
            s.commit()
        assert rev.get("/api/models").status_code == 401


def test_secure_cookies_setting(workspace):
    settings, engine, password = workspace
    settings.secure_cookies = True
    with TestClient(create_app(settings, engine), base_url="https://testserver") as client:
        response = client.post(
            "/login", data={"username": "admin", "password": password}, follow_redirects=False
        )
        cookie = response.headers["set-cookie"]
        assert (
            "secure" in cookie.lower()
            and "samesite=strict" in cookie.lower()
            and "httponly" in cookie.lower()
        )
        assert "max-age" in response.headers["strict-transport-security"]


# --- M5, M8 --------------------------------------------------------------------------------------------------


def test_big_bodies_are_refused_before_they_are_read(app_and_users):
    app = app_and_users[0]
    with TestClient(app) as client:
        big = b"x" * (2 << 20)
        response = client.post(
            "/api/annotate/vote", content=big, headers={"content-type": "application/json"}
        )
        assert response.status_code == 413  # anonymous, and Content-Length says it all

        def chunks():  # no Content-Length: the bytes are counted as they stream in
            for _ in range(40):
                yield b"y" * 65536

        form = {"content-type": "application/x-www-form-urlencoded"}
        assert client.post("/login", content=chunks(), headers=form).status_code == 413
        small = client.post("/login", data={"username": "a", "password": "b"}, follow_redirects=False)
        assert small.status_code == 303  # a small body is fine


def test_gradio_uploads_are_blocked_and_its_temp_dir_is_in_the_workspace(admin, workspace, monkeypatch):
    client, _ = admin
    for ui in ("annotate", "chat", "arena"):
        response = client.post(f"/{ui}/gradio_api/upload", files={"files": ("a.txt", b"hello")})
        assert response.status_code == 404, ui
    settings, engine, _ = workspace
    monkeypatch.delenv("GRADIO_TEMP_DIR", raising=False)
    create_app(settings, engine)
    import os

    assert Path(os.environ["GRADIO_TEMP_DIR"]).is_relative_to(settings.workspace)


# --- L4, L9 --------------------------------------------------------------------------------------------------

HUGE = st.one_of(
    st.integers(min_value=2**31, max_value=2**200),
    st.integers(max_value=-(2**31)),
    st.sampled_from([2**63, 2**64, 10**30, -(2**63) - 1]),
)


def test_huge_ints_get_4xx_on_every_route(admin):
    """Every route with an int in its path or query, schema or not (the PNGs, /queue, the admin forms)."""
    client, _ = admin
    routes = []
    for route in all_routes(client.app):
        if not isinstance(route, APIRoute) or route.path.startswith("/v1/") or route.path == "/api/jobs":
            continue  # /v1 has its own tests; a valid POST /api/jobs would start a training process
        ints = [
            p.name
            for p in route.dependant.path_params + route.dependant.query_params
            if p.field_info.annotation in (int, int | None)
        ]
        if ints:
            routes.append((route, ints))
    assert len(routes) >= 12, [r.path for r, _ in routes]

    def request(route, ints, value):
        path = route.path.replace("{action}", "disable")
        query = {}
        for p in route.dependant.path_params + route.dependant.query_params:
            if p.name in ints and p in route.dependant.path_params:
                path = path.replace("{" + p.name + "}", str(value))
            elif p.name in ints:
                query[p.field_info.alias or p.name] = str(value)
        for method in route.methods - {"HEAD"}:
            data = {"role": "reviewer"} if method == "POST" else None
            response = client.request(method, path, params=query, data=data)
            assert 400 <= response.status_code < 500, (method, path, query, response.status_code)

    @given(index=st.integers(0, len(routes) - 1), value=HUGE)
    @settings(
        max_examples=10 * len(routes), deadline=None, suppress_health_check=list(HealthCheck), database=None
    )
    def check(index, value):
        request(*routes[index], value)

    check()
    for route, ints in routes:  # and each route at least once with the value that overflowed SQLite
        request(route, ints, 2**64)


def test_healthz_touches_the_database(admin, tmp_path):
    client, _ = admin
    assert client.get("/healthz").json()["status"] == "ok"
    from alignloop.core.db import make_engine

    good = client.app.state.engine
    client.app.state.engine = make_engine(f"sqlite:///{tmp_path / 'missing' / 'x.db'}")
    try:
        response = client.get("/healthz")
        assert response.status_code == 503 and "database" in response.json()["detail"]
    finally:
        client.app.state.engine = good
