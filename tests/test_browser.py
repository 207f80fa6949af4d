"""End to end in a real Chromium (Debian's, driven by Playwright; no browser download) against a real server.

An annotator logs in, votes with the mouse and with a keyboard shortcut, and sees their progress update;
prompts and responses carrying HTML/JS payloads are shown as text and nothing executes.
"""

import os
import shutil
import subprocess
import sys
import time

import httpx
import pytest
from conftest import free_port
from sqlmodel import Session, select

from alignloop import crud
from alignloop.models import Vote

CHROMIUM = "/usr/bin/chromium"
XSS_PROMPT = (
    "Tell me about <script>window.__pwned = 1; alert('prompt')</script> <img src=x onerror=\"alert('img')\">"
)
XSS_RESPONSE = (
    "<b>bold?</b><svg onload=\"alert('svg')\"></svg> <a href=\"javascript:alert('link')\">click</a>"
)

pytestmark = pytest.mark.browser


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
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--no-first-run", "--disable-sync", "--disable-quic"],
        )  # fmt: skip
        yield b
        b.close()


@pytest.fixture
def live_server(workspace):
    settings, engine, admin_password = workspace
    with Session(engine) as s:
        crud.create_user(s, name="ann", role="annotator", password="annotator-pass")
        for i in range(3):
            text = XSS_PROMPT if i == 0 else f"Question number {i}"
            (p,), _ = crud.add_prompts(
                s, prompts=[crud.PromptCreate(messages=[{"role": "user", "content": text}])], source="t"
            )
            gens = [
                crud.add_generation(s, prompt_id=p.id, text=XSS_RESPONSE if i == 0 else f"Answer {i}{k}")
                for k in "xy"
            ]
            crud.create_comparison(s, prompt_id=p.id, generation_ids=[g.id for g in gens])
        s.commit()
    port = free_port()
    exe = shutil.which("alignloop")
    cmd = [exe] if exe else [sys.executable, "-m", "alignloop.cli"]
    log = open(settings.workspace / "serve.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [*cmd, "serve", "--port", str(port), "--workspace", str(settings.workspace)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("server did not start:\n" + (settings.workspace / "serve.log").read_text())
    yield base, engine
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


def test_annotator_votes_with_mouse_and_keyboard(browser, live_server, tmp_path):
    base, engine = live_server
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    dialogs = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))

    page.goto(f"{base}/annotate/")
    assert page.url.endswith("/login")  # anonymous visitors are sent to the login form
    page.fill("input[name=username]", "ann")
    page.fill("input[name=password]", "annotator-pass")
    page.click("button")
    page.wait_for_url("**/annotate/")
    page.wait_for_selector("#progress:has-text('Items left: 3')", timeout=60_000)

    # The first item carries the payloads: they must be visible as text and inert.
    conversation = page.locator("#conversation")
    conversation.get_by_text("window.__pwned", exact=False).wait_for(timeout=30_000)
    response_values = [page.input_value("#response-a textarea"), page.input_value("#response-b textarea")]
    assert XSS_RESPONSE in response_values
    page.screenshot(path=str(tmp_path / "annotate.png"), full_page=True)

    page.click("#vote-a")  # the mouse
    page.wait_for_selector("#progress:has-text('Today: 1')", timeout=30_000)
    page.locator("#conversation").get_by_text("Question number", exact=False).wait_for(timeout=30_000)
    page.locator("body").click(position={"x": 5, "y": 5})  # focus outside any text field
    page.keyboard.press("2")  # the keyboard shortcut for "B is better"
    page.wait_for_selector("#progress:has-text('Today: 2')", timeout=30_000)
    assert "Items left: 1" in page.inner_text("#progress")

    assert dialogs == [] and page.evaluate("window.__pwned") is None
    with Session(engine) as s:
        ann = crud.get_user(s, name="ann")
        votes = s.exec(select(Vote).where(Vote.user_id == ann.id).order_by(Vote.id)).all()
        assert len(votes) == 2 and all(v.seconds is not None and v.seconds >= 0 for v in votes)
        # What was clicked is stored by position through the shown order: "A" is whatever was shown first.
        assert votes[0].choice == "ab"[votes[0].shown_order[0]]
        assert votes[1].choice == "ab"[votes[1].shown_order[1]]
    page.close()
