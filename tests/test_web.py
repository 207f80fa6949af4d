"""The web app through its HTTP surface: login, roles enforced server-side, text rendered inert."""

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session

from alignloop.core import crud
from alignloop.web import create_app

XSS = '<script>alert("x")</script><img src=x onerror=alert(1)>'


@pytest.fixture
def app_client(workspace):
    settings, engine, admin_password = workspace
    with Session(engine) as s:
        crud.create_user(s, name="ann", role="annotator", password="annotator-pass")
        (prompt,), _ = crud.add_prompts(
            s,
            prompts=[crud.PromptCreate(messages=[{"role": "user", "content": f"Prompt {XSS}"}])],
            source="t",
        )
        gens = [crud.add_generation(s, prompt_id=prompt.id, text=f"Response {i} {XSS}") for i in range(2)]
        crud.create_comparison(s, prompt_id=prompt.id, generation_ids=[g.id for g in gens])
        s.commit()
    with TestClient(create_app(settings, engine)) as client:
        yield client, admin_password


def login(client, name, password):
    return client.post("/login", data={"username": name, "password": password}, follow_redirects=False)


def test_everything_needs_login(app_client):
    client, _ = app_client
    assert client.get("/healthz").status_code == 200
    assert client.get("/api/comparisons").status_code == 401
    response = client.get("/queue", follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"] == "/login"


def test_wrong_password_is_refused(app_client):
    client, _ = app_client
    response = login(client, "admin", "wrong")
    assert response.headers["location"] == "/login?error=1"
    assert client.get("/api/comparisons").status_code == 401


def test_queue_page_shows_comparisons_as_inert_text(app_client):
    client, password = app_client
    assert login(client, "admin", password).headers["location"] == "/"
    home = client.get("/")
    assert all(link in home.text for link in ('href="/annotate/"', 'href="/queue"', 'href="/admin"'))
    page = client.get("/queue")
    assert page.status_code == 200
    assert "Queued comparisons (1)" in page.text
    assert "<script>" not in page.text and "onerror=alert" not in page.text.replace(
        "onerror=alert(1)&gt;", ""
    )
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page.text
    data = client.get("/api/comparisons", params={"status": "queued"}).json()
    assert data[0]["responses"][1]["text"] == f"Response 1 {XSS}"


def test_roles_are_enforced_in_the_handler(app_client):
    client, password = app_client
    login(client, "ann", "annotator-pass")
    assert client.get("/api/comparisons").status_code == 200
    assert client.get("/api/users").status_code == 403
    client.post("/logout")
    login(client, "admin", password)
    assert [u["name"] for u in client.get("/api/users").json()] == ["admin", "ann"]


def test_bad_query_values_get_422_not_500(app_client):
    client, password = app_client
    login(client, "admin", password)
    assert client.get("/api/comparisons", params={"limit": 0}).status_code == 422
    assert client.get("/api/comparisons", params={"status": "<x>"}).status_code == 422
    assert client.get("/api/comparisons", params={"limit": "many"}).status_code == 422


def test_no_cdn_docs(app_client):
    client, _ = app_client
    assert client.get("/docs").status_code == 404
    assert client.get("/api/openapi.json").status_code == 200
