"""The annotator's page: one comparison at a time, keyboard-driven, the next item without a reload.

`build_ui(engine, settings)` returns the Blocks; `web.py` mounts it at /annotate behind the login. Handlers are
plain functions of their inputs that call `annotate.queue`; per-browser state (the item on screen and when it
appeared) lives in `gr.State`, never in module globals.

Text from prompts and models is HTML-escaped before it reaches the chat component and shown in plain
textboxes otherwise, so markup in a prompt or response is displayed, never executed.
"""

from __future__ import annotations

import html
import time

import gradio as gr
from sqlmodel import Session

from alignloop.core import AlignloopError, crud
from alignloop.core.config import Settings
from alignloop.core.db import session_scope
from alignloop.core.models import User
from annotate import queue

MAX_RESPONSES = 4
DEFAULT_GUIDELINES = """\
**Compare the responses to the conversation and pick the better one.**

- *Better* means more helpful, more honest and more harmless, in that order of importance unless told otherwise.
- Judge the content, not the length: a short correct answer beats a long wrong one.
- **Tie** when both are about equally good; **Both bad** when neither is acceptable.
- Ratings (1 = poor, 5 = excellent) and a one-line rationale are optional but help the model builders.

Keys: **1** A is better · **2** B is better · **3** tie · **4** both bad · **S** skip
"""

# Keyboard shortcuts: click the matching button unless the annotator is typing in a text field.
SHORTCUTS_JS = """
<script>
document.addEventListener('keydown', (event) => {
  const target = event.target;
  if (target && (target.tagName === 'TEXTAREA' || (target.tagName === 'INPUT' && target.type !== 'radio'))) return;
  if (event.ctrlKey || event.metaKey || event.altKey) return;
  const ids = {'1': 'vote-a', '2': 'vote-b', '3': 'vote-tie', '4': 'vote-both-bad', 's': 'vote-skip', 'S': 'vote-skip'};
  const button = ids[event.key] && document.getElementById(ids[event.key]);
  if (button && button.offsetParent !== null) { event.preventDefault(); button.click(); }
});
</script>
"""


def _user(session: Session, request: gr.Request):
    user = crud.get_user(session, name=request.username) if request and request.username else None
    if user is None or user.disabled or user.role not in ("annotator", "admin"):
        raise gr.Error("You need an annotator account to label.")
    return user


def _chat(messages: list[dict]) -> list[dict]:
    shown = []
    for m in messages:
        content = html.escape(m["content"])
        if m["role"] == "system":
            shown.append({"role": "user", "content": f"*[system instructions]* {content}"})
        else:
            shown.append({"role": m["role"], "content": content})
    return shown


def _progress_md(progress: queue.Progress) -> str:
    return (
        f"**Today:** {progress.done_today} · **This round:** {progress.done_in_round} · "
        f"**Items left:** {progress.left}"
    )


def build_ui(engine, settings: Settings, vote_limiter=None) -> gr.Blocks:
    aspects = list(settings.aspects)
    options = queue.queue_options(settings)
    guidelines = settings.guidelines or DEFAULT_GUIDELINES

    with gr.Blocks(title="alignloop · annotate", analytics_enabled=False) as demo:
        item_state = gr.State(None)  # {"comparison_id", "num", "shown_at"}
        with gr.Row():
            gr.Markdown("## alignloop · annotate")
            progress_md = gr.Markdown(elem_id="progress")
        with gr.Accordion("Guidelines", open=False):
            gr.Markdown(guidelines)
        status_md = gr.Markdown(elem_id="status")
        chat = gr.Chatbot(label="Conversation", height=260, sanitize_html=True, elem_id="conversation")
        with gr.Row():
            boxes = [
                gr.Textbox(label=f"Response {queue.LABELS[i]}", lines=8, max_lines=30, interactive=False,
                           visible=i < 2, elem_id=f"response-{queue.LABELS[i].lower()}")
                for i in range(MAX_RESPONSES)
            ]  # fmt: skip
        with gr.Row(visible=True) as pair_row:
            vote_a = gr.Button("A is better  [1]", elem_id="vote-a", variant="primary")
            vote_b = gr.Button("B is better  [2]", elem_id="vote-b", variant="primary")
            vote_tie = gr.Button("Tie  [3]", elem_id="vote-tie")
            vote_bad = gr.Button("Both bad  [4]", elem_id="vote-both-bad")
        with gr.Row(visible=False) as rank_row:
            ranking = gr.Textbox(label="Ranking, best first (e.g. C A B)", elem_id="ranking", scale=3)
            rank_submit = gr.Button("Submit ranking", elem_id="submit-ranking", variant="primary")
        skip_btn = gr.Button("Skip  [S]", elem_id="vote-skip", size="sm")
        with gr.Accordion("Ratings and rationale (optional)", open=False):
            radios = []
            for i in range(MAX_RESPONSES):
                with gr.Row(visible=i < 2) as row:
                    gr.Markdown(f"**{queue.LABELS[i]}**")
                    cells = [
                        gr.Radio([1, 2, 3, 4, 5], label=a, elem_id=f"rate-{queue.LABELS[i].lower()}-{a}")
                        for a in aspects
                    ]
                radios.append((row, cells))
            rationale = gr.Textbox(label="Rationale", max_lines=4, max_length=5000, elem_id="rationale")

        rating_cells = [cell for _, cells in radios for cell in cells]
        rating_rows = [row for row, _ in radios]
        shown = [item_state, progress_md, status_md, chat, *boxes, pair_row, rank_row, ranking, *rating_rows,
                 *rating_cells, rationale]  # fmt: skip

        def show(item: queue.Item | None, progress: queue.Progress, message: str = ""):
            if item is None:
                empty = "### Nothing left to label right now. Thank you! New items appear when the next round starts."
                return [None, _progress_md(progress), message + "\n\n" + empty, [],
                        *[gr.update(value="", visible=i < 2) for i in range(MAX_RESPONSES)],
                        gr.update(visible=False), gr.update(visible=False), "",
                        *[gr.update(visible=False) for _ in rating_rows],
                        *[None for _ in rating_cells], ""]  # fmt: skip
            num = len(item.responses)
            state = {"comparison_id": item.comparison_id, "num": num, "shown_at": time.time()}
            return [state, _progress_md(progress), message, _chat(item.prompt),
                    *[gr.update(value=item.responses[i] if i < num else "", visible=i < num) for i in range(MAX_RESPONSES)],
                    gr.update(visible=num == 2), gr.update(visible=num > 2), "",
                    *[gr.update(visible=i < num) for i in range(MAX_RESPONSES)],
                    *[None for _ in rating_cells], ""]  # fmt: skip

        def load_next(request: gr.Request, message: str = ""):
            with session_scope(engine) as session:
                user = _user(session, request)
                item = queue.next_item(session, user_id=user.id, **options)
                progress = queue.progress(session, user_id=user.id)
            return show(item, progress, message)

        def submit(state, choice, ranking_text, rationale_text, cell_values, request: gr.Request):
            if not state:
                return load_next(request)
            ratings = {}
            for i in range(state["num"]):
                values = cell_values[i * len(aspects) : (i + 1) * len(aspects)]
                chosen = {a: int(v) for a, v in zip(aspects, values, strict=True) if v is not None}
                if chosen:
                    ratings[queue.LABELS[i]] = chosen
            ranking_labels = ranking_text.replace(",", " ").split() if choice == "rank" else None
            try:
                with session_scope(engine) as session:
                    user = _user(session, request)
                    if vote_limiter is not None and vote_limiter.hit(user.id):
                        raise AlignloopError("Too many votes in a minute: please slow down.")
                    queue.submit_vote(
                        session,
                        user_id=user.id,
                        comparison_id=state["comparison_id"],
                        choice=None if choice == "rank" else choice,
                        ranking_labels=ranking_labels,
                        ratings=ratings,
                        rationale=rationale_text or "",
                        seconds=round(time.time() - state["shown_at"], 2),
                    )
            except (crud.DuplicateVoteError, crud.ComparisonClosedError):
                return load_next(request, "That item was completed by someone else; here is the next one.")
            except AlignloopError as exc:
                raise gr.Error(str(exc)) from None
            return load_next(request, "Saved.")

        def make_vote(choice: str):
            # `request` first: Gradio injects it by annotation, which it cannot do after *cells.
            def vote(request: gr.Request, state, ranking_text, rationale_text, *cells):
                return submit(state, choice, ranking_text, rationale_text, list(cells), request)

            return vote

        def do_skip(state, request: gr.Request):
            if state:
                with session_scope(engine) as session:
                    user = _user(session, request)
                    queue.skip(session, user_id=user.id, comparison_id=state["comparison_id"])
            return load_next(request, "Skipped.")

        vote_inputs = [item_state, ranking, rationale, *rating_cells]
        for button, choice in [(vote_a, "a"), (vote_b, "b"), (vote_tie, "tie"), (vote_bad, "both_bad")]:
            button.click(make_vote(choice), inputs=vote_inputs, outputs=shown, show_progress="hidden")
        rank_submit.click(make_vote("rank"), inputs=vote_inputs, outputs=shown)
        ranking.submit(make_vote("rank"), inputs=vote_inputs, outputs=shown)
        skip_btn.click(do_skip, inputs=[item_state], outputs=shown, show_progress="hidden")
        demo.load(load_next, inputs=None, outputs=shown)
    return demo


def username_of(engine, roles: tuple[str, ...] = ("annotator", "admin")):
    """Gradio's `auth_dependency`: the logged-in user's name from the app's session cookie if their role is
    one of `roles`, else None."""

    def dependency(request) -> str | None:
        user_id = request.session.get("user_id") if "session" in request.scope else None
        if user_id is None:
            return None
        with Session(engine) as session:
            user = session.get(User, user_id)
            if user is None or user.disabled or user.role not in roles:
                return None
            return user.name

    return dependency
