"""Issue #13 in a real Chromium against a real `alignloop serve`: the attacks that got through, now dead.

- H1: an imported prompt carries a relative markdown link to `/admin/users?notice=<payload>`; the admin who
  labels it sees no link on /annotate, and even opening the URL runs nothing.
- M1: a page served from another port of the same host (same *site*, so SameSite=Strict still sends the cookie)
  tries to promote a user and start a job, by form and by fetch; both are refused.
- M2: a copied session cookie stops working once its owner logs out.
- L2: logging out from a Gradio page clears what the origin kept in localStorage.
"""

import os

import pytest
from conftest import running_server, serve_in_thread
from sqlmodel import Session, select
from starlette.applications import Starlette
from starlette.responses import HTMLResponse
from starlette.routing import Route
from test_browser import CHROMIUM

from alignloop.core import crud
from alignloop.core.config import load_settings
from alignloop.core.db import make_engine
from alignloop.core.models import Run
from alignloop.core.workspace import init_workspace

pytestmark = pytest.mark.browser
PAYLOAD = "<img src=x onerror=\"window.__pwned=1;alert('xss')\">"
LINKED_PROMPT = (
    f"Please read the [guidelines](/admin/users?notice={PAYLOAD}) first, and also "
    "http://127.0.0.1/admin/users?notice=x before answering: what is 2+2?"
)


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        if os.environ.get("ALIGNLOOP_REQUIRE_BROWSER") == "1":
            pytest.fail(f"{CHROMIUM} is missing (.ci/run installs Debian's chromium)")
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--no-first-run",
                "--disable-sync",
                "--disable-quic",
            ],
        )
        yield b
        b.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = tmp_path_factory.mktemp("secbrowser") / "ws"
    password = init_workspace(path)
    settings = load_settings(path)
    engine = make_engine(settings.db_url)
    with Session(engine) as s:
        crud.create_user(s, name="rev", role="reviewer", password="reviewer-pass")
        (p,), _ = crud.add_prompts(
            s,
            prompts=[crud.PromptCreate(messages=[{"role": "user", "content": LINKED_PROMPT}])],
            source="import",
        )
        gens = [crud.add_generation(s, prompt_id=p.id, text=f"It is four ({k}).") for k in "xy"]
        crud.create_comparison(s, prompt_id=p.id, generation_ids=[g.id for g in gens])
        s.commit()
    with running_server(path) as base:
        yield base, engine, password
    engine.dispose()


def login(page, base, name, password):
    page.goto(f"{base}/login")
    page.fill("input[name=username]", name)
    page.fill("input[name=password]", password)
    page.click("form.login button")
    page.wait_for_url(lambda url: not url.endswith("/login"))


def role_of(engine, name):
    with Session(engine) as s:
        return crud.get_user(s, name=name).role


def test_h1_link_in_an_imported_prompt_is_dead(browser, server):
    base, engine, password = server
    context = browser.new_context()
    page = context.new_page()
    dialogs = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    login(page, base, "admin", password)
    page.goto(f"{base}/annotate/")
    conversation = page.locator("#conversation")
    conversation.get_by_text("guidelines", exact=False).wait_for(timeout=60_000)
    # Shown as text (the markdown syntax visible), with no live link of any kind to click.
    assert "[guidelines](/admin/users?notice=" in conversation.inner_text()
    assert conversation.locator("a").count() == 0
    # Even opened directly (an admin pasting it), the URL shows no notice and runs nothing.
    page.goto(f"{base}/admin/users?notice={PAYLOAD}")
    page.wait_for_selector("h2:has-text('Users')")
    assert page.locator("img[src=x]").count() == 0 and "onerror" not in page.content()
    # And the CSP would have stopped an injected inline handler anyway.
    page.evaluate("""() => { const d = document.createElement('div');
        d.innerHTML = '<img src=x onerror="window.__pwned=2">'; document.body.appendChild(d); }""")
    page.wait_for_timeout(500)
    assert page.evaluate("window.__pwned") is None and dialogs == []
    context.close()


ATTACK = """<!doctype html><html><body>
<form id="promote" method="post" action="{base}/admin/users/{rev}/role"><input name="role" value="admin">
<button id="go-promote">win a prize</button></form>
<form id="job" method="post" action="{base}/admin/jobs"><input name="kind" value="generate">
<input name="arguments" value="--samples 1"><button id="go-job">and another</button></form>
</body></html>"""


def test_m1_csrf_from_another_port_is_refused(browser, server):
    base, engine, password = server
    with Session(engine) as s:
        rev = crud.get_user(s, name="rev").id
        jobs_before = len(s.exec(select(Run).where(Run.kind == "job")).all())
    evil = Starlette(routes=[Route("/", lambda request: HTMLResponse(ATTACK.format(base=base, rev=rev)))])
    with serve_in_thread(evil) as evil_base:
        assert evil_base.split(":")[1] == base.split(":")[1]  # same host: same site, only the port differs
        context = browser.new_context()
        page = context.new_page()
        login(page, base, "admin", password)
        page.goto(evil_base)
        page.click("#go-promote")
        page.wait_for_load_state()
        assert "cross-origin request refused" in page.content()
        page.goto(evil_base)
        page.click("#go-job")
        page.wait_for_load_state()
        # fetch() with the cookie, as a script on that page could do it
        page.goto(evil_base)
        page.evaluate(
            """async (url) => { await fetch(url, {method: 'POST', credentials: 'include', mode: 'no-cors',
            headers: {'Content-Type': 'application/x-www-form-urlencoded'}, body: 'role=admin'}); }""",
            f"{base}/admin/users/{rev}/role",
        )
        context.close()
    assert role_of(engine, "rev") == "reviewer"
    with Session(engine) as s:
        assert len(s.exec(select(Run).where(Run.kind == "job")).all()) == jobs_before


def test_m2_copied_cookie_stops_working_after_logout(browser, server):
    base, engine, password = server
    owner = browser.new_context()
    page = owner.new_page()
    login(page, base, "admin", password)
    cookies = owner.cookies()
    assert any(c["name"] == "alignloop_session" for c in cookies)
    thief = browser.new_context()
    thief.add_cookies(cookies)
    stolen = thief.new_page()
    stolen.goto(f"{base}/admin/users")
    assert stolen.url.endswith("/admin/users")  # the copy works while the login lasts
    page.goto(f"{base}/")
    page.click("#logout")
    page.wait_for_url("**/login")
    stolen.goto(f"{base}/admin/users")
    assert stolen.url.endswith("/login")
    owner.close()
    thief.close()


def test_l2_logout_from_a_gradio_page_clears_local_storage(browser, server):
    base, engine, _ = server
    context = browser.new_context()
    page = context.new_page()
    login(page, base, "rev", "reviewer-pass")
    page.goto(f"{base}/chat/")
    page.wait_for_selector("#logout-link", timeout=60_000)
    page.evaluate("() => localStorage.setItem('gradio-history', 'my secret prompt and its reply')")
    page.click("#logout-link")
    page.wait_for_url("**/logout")
    page.click("#confirm-logout")
    page.wait_for_url("**/login")
    assert page.evaluate("() => localStorage.length") == 0
    page.goto(f"{base}/chat/")
    assert page.url.endswith("/login")
    context.close()
