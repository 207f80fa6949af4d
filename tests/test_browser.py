"""End to end in a real Chromium (Debian's, driven by Playwright; no browser download) against a real server.

An annotator logs in, votes with the mouse and with a keyboard shortcut, and sees their progress update;
prompts and responses carrying HTML/JS payloads are shown as text and nothing executes.
"""

import os

import pytest
from conftest import running_server
from sqlmodel import Session, select

from alignloop.core import crud
from alignloop.core.models import Vote

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
    with running_server(settings.workspace) as base:
        yield base, engine


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
    page.screenshot(
        path=os.path.join(os.environ.get("ALIGNLOOP_SCREENSHOTS", str(tmp_path)), "annotate.png"),
        full_page=True,
    )

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


@pytest.fixture
def review_server(workspace, tiny_model_dir, tmp_path):
    """A server whose default policy is the tiny model, plus a second tiny version, and a reviewer."""
    import yaml
    from conftest import build_tiny_llama, build_tiny_tokenizer

    settings, engine, _ = workspace
    other = tmp_path / "tiny-b"
    tokenizer = build_tiny_tokenizer()
    build_tiny_llama(tokenizer, seed=1).save_pretrained(other)
    tokenizer.save_pretrained(other)
    config_file = settings.workspace / "config.yaml"
    config = yaml.safe_load(config_file.read_text())
    config_file.write_text(yaml.safe_dump({**config, "default_policy": str(tiny_model_dir)}))
    with Session(engine) as s:
        crud.create_user(s, name="rev", role="reviewer", password="reviewer-pass")
        crud.register_model(
            s, name="tiny-b", kind="policy", base=str(other), path=str(other), licence="apache-2.0"
        )
        s.commit()
    with running_server(settings.workspace) as base:
        yield base, engine


def login(page, base, name, password, landing):
    page.goto(f"{base}/login")
    page.fill("input[name=username]", name)
    page.fill("input[name=password]", password)
    page.click("button")
    page.wait_for_url(landing)


def test_reviewer_chats_with_streaming_then_battles_in_the_arena(browser, review_server, tmp_path):
    base, engine = review_server
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    dialogs = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    login(page, base, "rev", "reviewer-pass", f"{base}/")
    shots = os.environ.get("ALIGNLOOP_SCREENSHOTS")

    # Chat: the reply grows on screen piece by piece (a MutationObserver records each length it shows).
    page.goto(f"{base}/chat/")
    page.wait_for_selector("#chat-input textarea", timeout=60_000)
    page.evaluate("""() => {
        window.__lengths = [];
        const box = document.querySelector('#chatbot');
        new MutationObserver(() => window.__lengths.push(box.innerText.length))
            .observe(box, {subtree: true, childList: true, characterData: true});
    }""")
    page.fill("#chat-input textarea", "Write a short poem about <b>the sea</b>.")
    page.click("#chat-send")
    page.locator("#chatbot").get_by_text("the sea", exact=False).first.wait_for(timeout=60_000)
    page.wait_for_function("() => window.__lengths.length > 0", timeout=60_000)
    page.wait_for_timeout(1500)
    lengths = page.evaluate("window.__lengths")
    assert len(set(lengths)) >= 3, lengths  # the prompt, then the reply in several pieces
    assert page.locator("#chatbot b").count() == 0  # the prompt's markup is shown as text
    page.click("#thumbs-up")
    page.wait_for_selector("#chat-notice:has-text('Saved')", timeout=30_000)
    if shots:
        page.screenshot(path=os.path.join(shots, "chat.png"), full_page=True)

    # Arena: two anonymous answers, a vote, the names revealed, the leaderboard updated.
    page.goto(f"{base}/arena/")
    page.wait_for_selector("#arena-prompt textarea", timeout=60_000)
    page.fill("#arena-prompt textarea", "Explain what a hash table is.")
    page.click("#arena-go")
    page.wait_for_selector("#arena-vote-a:not([disabled])", timeout=60_000)
    page.click("#arena-vote-a")
    page.wait_for_selector("#arena-reveal:has-text('Model A was')", timeout=30_000)
    if shots:
        page.screenshot(path=os.path.join(shots, "arena.png"), full_page=True)
    page.get_by_role("tab", name="Leaderboard").click()
    page.wait_for_selector("#leaderboard:has-text('1 battles')", timeout=30_000)
    board = page.inner_text("#leaderboard")
    assert "tiny-b" in board
    if shots:
        page.screenshot(path=os.path.join(shots, "leaderboard.png"), full_page=True)
    assert dialogs == []
    with Session(engine) as s:
        from alignloop.core.models import ChatFeedback, Comparison

        assert len(s.exec(select(Comparison).where(Comparison.source == "arena")).all()) == 1
        assert len(s.exec(select(ChatFeedback)).all()) == 1
    page.close()


@pytest.fixture
def ranking_server(workspace):
    settings, engine, _ = workspace
    with Session(engine) as s:
        crud.create_user(s, name="ranker", role="annotator", password="annotator-pass")
        for i in range(2):
            (p,), _ = crud.add_prompts(
                s,
                prompts=[crud.PromptCreate(messages=[{"role": "user", "content": f"Rank these {i}"}])],
                source="t",
            )
            gens = [crud.add_generation(s, prompt_id=p.id, text=f"Answer {i}{k}") for k in "xyzw"[: 3 + i]]
            crud.create_comparison(s, prompt_id=p.id, generation_ids=[g.id for g in gens])
        s.commit()
    with running_server(settings.workspace) as base:
        yield base, engine


def test_ranking_control_with_mouse_drag_undo_and_keyboard(browser, ranking_server):
    base, engine = ranking_server
    page = browser.new_page(viewport={"width": 1280, "height": 1200})
    login(page, base, "ranker", "annotator-pass", "**/annotate/")
    page.wait_for_selector("#rank-pick-c", timeout=60_000)
    order = lambda: page.locator("#rank-order li").all_inner_texts()  # noqa: E731
    # First item (3 responses): press C, A with the mouse; undo A; B by keyboard; A by mouse -> C B A.
    page.click("#rank-pick-c")
    page.click("#rank-pick-a")
    page.click("#rank-undo")
    page.locator("body").click(position={"x": 5, "y": 5})
    page.keyboard.press("b")
    page.click("#rank-pick-a")
    assert order() == ["Response C", "Response B", "Response A"]
    # Drag A to the top with the mouse -> A C B; then move C down with the keyboard -> A B C; undo -> A C B.
    page.drag_and_drop("#rank-order li[data-label=A]", "#rank-order li[data-label=C]")
    assert order() == ["Response A", "Response C", "Response B"]
    page.focus("#rank-order li[data-label=C]")
    page.keyboard.press("ArrowDown")
    assert order() == ["Response A", "Response B", "Response C"]
    page.keyboard.press("Backspace")
    assert order() == ["Response A", "Response C", "Response B"]
    assert page.input_value("#ranking textarea") == "A C B"
    page.keyboard.press("Enter")  # submit
    page.wait_for_selector("#progress:has-text('Today: 1')", timeout=30_000)
    # The next item has four responses; the control starts empty, keyboard only: D A C B, Enter.
    page.wait_for_selector("#rank-pick-d", timeout=30_000)
    assert order() == []
    page.locator("body").click(position={"x": 5, "y": 5})
    for key in "dacb":
        page.keyboard.press(key)
    page.keyboard.press("Enter")
    page.wait_for_selector("#progress:has-text('Today: 2')", timeout=30_000)
    with Session(engine) as s:
        ranker = crud.get_user(s, name="ranker")
        first, second = s.exec(
            select(Vote).where(Vote.user_id == ranker.id).order_by(Vote.comparison_id)
        ).all()
    # Shown labels map to stored positions through the shown order.
    assert first.ranking == [first.shown_order[i] for i in (0, 2, 1)]
    assert second.ranking == [second.shown_order[i] for i in (3, 0, 2, 1)]
    page.close()


def test_reviewer_flags_and_comments_and_votes_side_by_side(browser, review_server, workspace):
    base, engine = review_server
    _, _, admin_password = workspace
    page = browser.new_page(viewport={"width": 1280, "height": 1400})
    login(page, base, "rev", "reviewer-pass", f"{base}/")
    page.goto(f"{base}/chat/")
    page.wait_for_selector("#chat-input textarea", timeout=60_000)
    page.fill("#chat-input textarea", "Tell me a secret <i>recipe</i>.")
    page.click("#chat-send")
    page.locator("#chatbot").get_by_text("secret", exact=False).first.wait_for(timeout=60_000)
    page.wait_for_function(
        "() => document.querySelectorAll('#chatbot [data-testid=bot], #chatbot .bot').length > 0",
        timeout=60_000,
    )
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    from alignloop.core.models import Transcript

    # The transcript is kept when the reply finishes; its id reaches the page with the last update.
    for _ in range(600):
        with Session(engine) as s:
            if s.exec(select(Transcript)).first() is not None:
                break
        page.wait_for_timeout(100)
    page.check("#review-flag input")
    page.fill("#review-tags textarea, #review-tags input", "unsafe, Recipe")
    page.fill("#review-comment textarea", "It should have refused <b>this</b>.")
    for attempt in range(10):  # saving is idempotent; a click before the id arrived is refused
        page.click("#review-save")
        try:
            page.wait_for_selector("#chat-notice:has-text('flagged for the admins')", timeout=3_000)
            break
        except PlaywrightTimeout:
            if attempt == 9:
                raise

    # Side by side: the default model on the left, tiny-b on the right; the vote is recorded.
    page.get_by_role("tab", name="Side by side").click()
    page.click("#side-right-model input")
    page.get_by_role("option", name="tiny-b").click()
    page.fill("#side-prompt textarea", "Name a colour.")
    page.click("#side-go")
    page.wait_for_selector("#side-vote-a:not([disabled])", timeout=60_000)
    page.click("#side-vote-a")
    page.wait_for_selector("#side-notice:has-text('Vote recorded')", timeout=30_000)
    page.close()

    with Session(engine) as s:
        from alignloop.core.models import Comparison, Transcript

        (transcript,) = s.exec(select(Transcript)).all()
        assert transcript.flagged and transcript.tags == ["recipe", "unsafe"]
        assert transcript.messages[-1]["role"] == "assistant" and len(transcript.messages) == 2
        (battle,) = s.exec(select(Comparison).where(Comparison.source == "arena")).all()
        (vote,) = s.exec(select(Vote).where(Vote.comparison_id == battle.id)).all()
        left = crud.comparison_generations(s, comparison_id=battle.id)[vote.shown_order[0]]
        assert (
            vote.choice == "ab"[vote.shown_order[0]]
            and left.model_version_id != crud.get_model_version(s, name="tiny-b").id
        )  # the left (default) model won, and it was shown first

    admin = browser.new_page()
    login(admin, base, "admin", admin_password, f"{base}/")
    admin.goto(f"{base}/admin/review")
    queue_text = admin.inner_text("body")
    assert "It should have refused <b>this</b>." in queue_text and "recipe, unsafe" in queue_text
    admin.click(f"#transcript-{transcript.id} button")
    admin.wait_for_selector("text=Nothing flagged.", timeout=30_000)
    admin.close()
