"""The annotator's page: one comparison at a time, keyboard-driven, the next item without a reload.

`build_ui(engine, settings)` returns the Blocks; `web.py` mounts it at /annotate behind the login. Handlers are
plain functions of their inputs that call `annotate.queue`; per-browser state (the item on screen and when it
appeared) lives in `gr.State`, never in module globals.

Text from prompts and models is HTML-escaped before it reaches the chat component, which renders it without
Markdown, and shown in plain textboxes otherwise: markup in a prompt or response is displayed, never executed,
and a link in an imported prompt is not a link (README "Security": it could point at a same-site admin action).
"""

from __future__ import annotations

import html

import gradio as gr
from sqlmodel import Session

from alignloop.core import AlignloopError, crud, websec
from alignloop.core.config import Settings
from alignloop.core.db import session_scope
from alignloop.core.limits import MAX_RESPONSES  # the page has this many response boxes
from annotate import queue

DEFAULT_GUIDELINES = """\
**Compare the responses to the conversation and pick the better one.**

- *Better* means more helpful, more honest and more harmless, in that order of importance unless told otherwise.
- Judge the content, not the length: a short correct answer beats a long wrong one.
- **Tie** when both are about equally good; **Both bad** when neither is acceptable.
- Ratings (1 = poor, 5 = excellent) and a one-line rationale are optional but help the model builders.

Keys: **1** A is better · **2** B is better · **3** tie · **4** both bad · **S** skip

Ranking three or four responses: press the responses from best to worst (click them, or type their letters),
drag a ranked one to move it (or focus it and use the up/down arrows), **Undo** (or Backspace) takes back the
last change, **Enter** submits.
"""

# The ranking control for K > 2 (mouse and keyboard). The "Ranking" textbox stays the single source of truth
# (the server reads it, and typing "C A B" into it still works); the control only edits it, so nothing here
# can disagree with what is submitted. Built with DOM calls and textContent, never innerHTML: labels only.
RANKING_JS = """
<script>
(() => {
  const undo = [];
  let rendered = null, dragged = null, last = null;
  const box = () => document.querySelector('#ranking textarea, #ranking input');
  const labels = () => ['a', 'b', 'c', 'd'].filter((l) => {
    const el = document.getElementById('response-' + l);
    return el && el.offsetParent !== null;
  }).map((l) => l.toUpperCase());
  const current = () => {
    const all = labels();
    const seen = [];
    for (const l of (box() ? box().value : '').toUpperCase().split(/[^A-Z]+/)) {
      if (all.includes(l) && !seen.includes(l)) seen.push(l);
    }
    return seen;
  };
  const write = (order) => {
    const el = box();
    if (!el) return;
    undo.push(el.value);
    el.value = order.join(' ');
    el.dispatchEvent(new Event('input', {bubbles: true}));
    render(true);
  };
  const pick = (label) => { const o = current(); if (!o.includes(label)) write([...o, label]); };
  const back = () => {
    const el = box();
    if (!el || !undo.length) return;
    el.value = undo.pop();
    el.dispatchEvent(new Event('input', {bubbles: true}));
    render(true);
  };
  const move = (from, to) => {
    const o = current();
    if (to < 0 || to >= o.length || from === to) return;
    const [x] = o.splice(from, 1);
    o.splice(to, 0, x);
    write(o);
  };
  const button = (id, text, onclick) => {
    const b = document.createElement('button');
    b.type = 'button'; b.id = id; b.textContent = text; b.className = 'lg secondary';
    b.style.margin = '2px'; b.onclick = onclick;
    return b;
  };
  function render(force) {
    const root = document.getElementById('rank-control');
    if (!root) return;
    const all = labels(), order = current();
    const key = all.join() + '|' + order.join();
    if (!force && key === rendered) return;
    rendered = key;
    root.replaceChildren();
    const picks = document.createElement('div');
    picks.append('Press in order, best first: ');
    for (const l of all) {
      const b = button('rank-pick-' + l.toLowerCase(), l, () => pick(l));
      b.disabled = order.includes(l);
      picks.append(b);
    }
    picks.append(button('rank-undo', 'Undo', back));
    const list = document.createElement('ol');
    list.id = 'rank-order';
    order.forEach((l, i) => {
      const item = document.createElement('li');
      item.textContent = 'Response ' + l;
      item.dataset.label = l; item.draggable = true; item.tabIndex = 0;
      item.style.cssText = 'cursor:grab;padding:4px 8px;margin:2px 0;border:1px solid #ccc;border-radius:4px';
      item.addEventListener('dragstart', (e) => { dragged = i; e.dataTransfer.setData('text/plain', l); });
      item.addEventListener('dragover', (e) => e.preventDefault());
      item.addEventListener('drop', (e) => { e.preventDefault(); if (dragged !== null) move(dragged, i); dragged = null; });
      item.addEventListener('keydown', (e) => {
        if (e.key === 'ArrowUp' || e.key === 'ArrowDown') {
          e.preventDefault(); e.stopPropagation();
          const to = i + (e.key === 'ArrowUp' ? -1 : 1);
          move(i, to);
          const again = document.querySelector('#rank-order li[data-label="' + l + '"]');
          if (again) again.focus();
        }
      });
      list.append(item);
    });
    root.append(picks, list);
  }
  window.alignloopRanking = {
    // Keys while a ranking item is on screen: letters press in order, Backspace/U undo, Enter submits.
    key(event) {
      const root = document.getElementById('rank-control');
      if (!root || root.offsetParent === null) return false;
      const k = event.key.toUpperCase();
      if (labels().includes(k)) { event.preventDefault(); pick(k); return true; }
      if (event.key === 'Backspace' || k === 'U') { event.preventDefault(); back(); return true; }
      if (event.key === 'Enter') {
        const submit = document.getElementById('submit-ranking');
        if (submit) { event.preventDefault(); submit.click(); return true; }
      }
      return false;
    },
  };
  setInterval(() => {
    const el = box();
    if (el && el.value === '' && last) undo.length = 0;  // the server cleared it: a new item
    last = el ? el.value : null;
    render(false);
  }, 150);  // a new item (or typing in the box) re-renders the control
})();
</script>
"""

# Keyboard shortcuts: click the matching button unless the annotator is typing in a text field.
SHORTCUTS_JS = (
    """
<script>
document.addEventListener('keydown', (event) => {
  const target = event.target;
  if (target && (target.tagName === 'TEXTAREA' || (target.tagName === 'INPUT' && target.type !== 'radio'))) return;
  if (event.ctrlKey || event.metaKey || event.altKey) return;
  if (window.alignloopRanking && window.alignloopRanking.key(event)) return;
  const ids = {'1': 'vote-a', '2': 'vote-b', '3': 'vote-tie', '4': 'vote-both-bad', 's': 'vote-skip', 'S': 'vote-skip'};
  const button = ids[event.key] && document.getElementById(ids[event.key]);
  if (button && button.offsetParent !== null) { event.preventDefault(); button.click(); }
});
</script>
"""
    + RANKING_JS
)


def logout_button() -> gr.Button:
    """Logging out is a POST with the CSRF token: this leads, in the same tab, to the page with that form."""
    return gr.Button(
        "Log out", link="/logout", link_target="_self", size="sm", elem_id="logout-link", scale=0
    )


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
            shown.append({"role": "user", "content": f"[system instructions] {content}"})
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
    vote_options = queue.vote_options(settings)
    guidelines = settings.guidelines or DEFAULT_GUIDELINES

    with gr.Blocks(title="alignloop · annotate", analytics_enabled=False) as demo:
        item_state = gr.State(None)  # {"comparison_id", "num"}; the server times votes from the lease
        with gr.Row():
            gr.Markdown("## alignloop · annotate")
            progress_md = gr.Markdown(elem_id="progress")
            logout_button()
        with gr.Accordion("Guidelines", open=False):
            guidelines_md = gr.Markdown(guidelines, elem_id="guidelines")
        status_md = gr.Markdown(elem_id="status")
        # Prompts are untrusted imported text: no Markdown, so no live links (README "Security").
        chat = gr.Chatbot(
            label="Conversation",
            height=260,
            sanitize_html=True,
            render_markdown=False,
            elem_id="conversation",
        )
        with gr.Row():
            boxes = [
                gr.Textbox(
                    label=f"Response {queue.LABELS[i]}",
                    lines=8,
                    max_lines=30,
                    interactive=False,
                    visible=i < 2,
                    elem_id=f"response-{queue.LABELS[i].lower()}",
                )
                for i in range(MAX_RESPONSES)
            ]
        with gr.Row(visible=True) as pair_row:
            vote_a = gr.Button("A is better  [1]", elem_id="vote-a", variant="primary")
            vote_b = gr.Button("B is better  [2]", elem_id="vote-b", variant="primary")
            vote_tie = gr.Button("Tie  [3]", elem_id="vote-tie")
            vote_bad = gr.Button("Both bad  [4]", elem_id="vote-both-bad")
        with gr.Column(visible=False) as rank_row:
            gr.HTML("", elem_id="rank-control")  # filled by RANKING_JS
            with gr.Row():
                ranking = gr.Textbox(label="Ranking, best first (e.g. C A B)", elem_id="ranking", scale=3)
                rank_submit = gr.Button(
                    "Submit ranking  [Enter]", elem_id="submit-ranking", variant="primary"
                )
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
        shown = [
            item_state,
            progress_md,
            status_md,
            chat,
            *boxes,
            pair_row,
            rank_row,
            ranking,
            *rating_rows,
            *rating_cells,
            rationale,
        ]

        def show(item: queue.Item | None, progress: queue.Progress, message: str = ""):
            if item is None:
                empty = "### Nothing left to label right now. Thank you! New items appear when the next round starts."
                return [
                    None,
                    _progress_md(progress),
                    message + "\n\n" + empty,
                    [],
                    *[gr.update(value="", visible=i < 2) for i in range(MAX_RESPONSES)],
                    gr.update(visible=False),
                    gr.update(visible=False),
                    "",
                    *[gr.update(visible=False) for _ in rating_rows],
                    *[None for _ in rating_cells],
                    "",
                ]
            num = len(item.responses)
            state = {"comparison_id": item.comparison_id, "num": num}
            return [
                state,
                _progress_md(progress),
                message,
                _chat(item.prompt),
                *[
                    gr.update(value=item.responses[i] if i < num else "", visible=i < num)
                    for i in range(MAX_RESPONSES)
                ],
                gr.update(visible=num == 2),
                gr.update(visible=num > 2),
                "",
                *[gr.update(visible=i < num) for i in range(MAX_RESPONSES)],
                *[None for _ in rating_cells],
                "",
            ]

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
                        **vote_options,
                    )
            except (crud.DuplicateVoteError, crud.ComparisonClosedError):
                return load_next(request, "That item was completed by someone else; here is the next one.")
            except queue.NotLeasedError:
                return load_next(request, "Your hold on that item ran out; here is the next one.")
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

        def current_guidelines():
            with Session(engine) as session:
                row = crud.guidelines_for_round(session, round=None)
            return row.text + f"\n\n*Guidelines version {row.version}.*" if row else guidelines

        demo.load(current_guidelines, inputs=None, outputs=guidelines_md)
    return demo


def username_of(engine, roles: tuple[str, ...] = ("annotator", "admin")):
    """Gradio's `auth_dependency`: the logged-in user's name from the app's session cookie if their role is
    one of `roles`, else None."""

    def dependency(request) -> str | None:
        with Session(engine) as session:
            user = websec.session_user(session, request)  # a revoked or expired login counts as none
            if user is None or user.role not in roles:
                return None
            return user.name

    return dependency
