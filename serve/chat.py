"""/chat for reviewers: talk to any model version, with an L1 preset; side by side; feedback that becomes data.

`build_ui(engine, settings, pool)` returns the Blocks; `web.py` mounts it at /chat behind the login (reviewers
and admins). Replies stream token by token from the shared batching engine (`serve.engine`). Thumbs up/down
and a better answer written by the reviewer are stored as `ChatFeedback`: edits become SFT data
(`sft train --from-chat-edits`), and `feedback_pairs` turns them (and up/down pairs on one conversation) into
preference pairs (`alignloop export feedback`). Model text is shown escaped: markup is displayed, not run.
"""

from __future__ import annotations

import html
import queue
import threading
from collections import defaultdict
from collections.abc import Iterator

import gradio as gr
from sqlmodel import Session, select

from alignloop.core import AlignloopError, crud
from alignloop.core.config import Settings
from alignloop.core.db import session_scope
from alignloop.core.models import ChatFeedback, User
from alignloop.core.presets import apply_preset, get_preset, list_presets, save_preset
from serve.engine import Request, Stream

NO_PRESET = "(no preset)"
REVIEW_ROLES = ("reviewer", "admin")


def reviewer(session: Session, request: gr.Request, roles=REVIEW_ROLES) -> User:
    user = crud.get_user(session, name=request.username) if request and request.username else None
    if user is None or user.disabled or user.role not in roles:
        raise gr.Error("You need a reviewer account here.")
    return user


def model_choices(engine) -> list[str]:
    from serve.openai_api import servable_models

    with Session(engine) as session:
        return servable_models(session)


def preset_choices(engine) -> list[str]:
    with Session(engine) as session:
        return [NO_PRESET] + [f"{p.name}@{p.version}" for p in list_presets(session)]


def prepare(engine, messages: list[dict], preset: str | None) -> list[dict]:
    if not preset or preset == NO_PRESET:
        return messages
    with Session(engine) as session:
        return apply_preset(get_preset(session, preset), messages)


def model_ref(settings: Settings, name: str) -> str:
    return settings.default_policy if name == "default" else name


def stream_text(pool, settings, name: str, messages: list[dict], *, temperature: float, max_tokens: int,
                seed: int | None = None) -> tuple[Stream, Request]:  # fmt: skip
    """Start one reply; returns its event stream (and the request, to cancel it)."""
    engine = pool.get(model_ref(settings, name))
    stream = Stream()
    request = Request(prompt_ids=engine.render(messages), max_tokens=max_tokens, temperature=temperature,
                      top_p=0.95, seed=seed, emit=stream)  # fmt: skip
    engine.submit(request)
    return stream, request


def merge_streams(streams: list[Stream]) -> Iterator[list[str]]:
    """Texts so far of several replies streaming at once, yielded whenever any of them grows."""
    texts, done = ["" for _ in streams], [False for _ in streams]
    merged: queue.Queue = queue.Queue()

    def pump(i, s):
        for event in s:
            merged.put((i, event))

    for i, s in enumerate(streams):
        threading.Thread(target=pump, args=(i, s), daemon=True).start()
    while not all(done):
        i, event = merged.get()
        if event[0] == "text":
            texts[i] += event[1]
            yield list(texts)
        elif event[0] == "error":
            texts[i] += " [generation failed]"
            done[i] = True
            yield list(texts)
        else:
            done[i] = True
    yield list(texts)


def _shown(history: list[dict]) -> list[dict]:
    return [{"role": m["role"], "content": html.escape(m["content"])} for m in history]


def save_feedback(
    engine, user: User, *, model: str, history: list[dict], rating: int | None, edited: str | None
):
    if not history or history[-1]["role"] != "assistant":
        raise AlignloopError("there is no reply to give feedback on yet")
    if edited is not None and not edited.strip():
        raise AlignloopError("the better answer is empty")
    with session_scope(engine) as session:
        version = crud.get_model_version(session, name=model)
        session.add(ChatFeedback(user_id=user.id, model_version_id=version.id if version else None,
                                 messages=history[:-1], response=history[-1]["content"], rating=rating,
                                 edited=edited.strip() if edited else None))  # fmt: skip


def feedback_pairs(session: Session) -> list[dict]:
    """Preference pairs from chat feedback: a reviewer's better answer beats the reply it replaced; on one
    conversation, a thumbs-up reply beats a thumbs-down one."""
    rows = session.exec(select(ChatFeedback).order_by(ChatFeedback.id)).all()
    pairs = [
        {"prompt": r.messages, "chosen": [{"role": "assistant", "content": r.edited}],
         "rejected": [{"role": "assistant", "content": r.response}], "source": "chat-edit"}
        for r in rows if r.edited and r.edited != r.response
    ]  # fmt: skip
    by_conversation: dict[str, dict[int, set[str]]] = defaultdict(lambda: defaultdict(set))
    for r in rows:
        if r.rating in (1, -1):
            by_conversation[crud.prompt_hash(r.messages)][r.rating].add(r.response)
    prompts = {crud.prompt_hash(r.messages): r.messages for r in rows}
    for key, ratings in by_conversation.items():
        for good in sorted(ratings[1]):
            for bad in sorted(ratings[-1] - ratings[1]):
                pairs.append({"prompt": prompts[key], "chosen": [{"role": "assistant", "content": good}],
                              "rejected": [{"role": "assistant", "content": bad}], "source": "chat-rating"})  # fmt: skip
    return pairs


def build_ui(engine, settings: Settings, pool) -> gr.Blocks:
    with gr.Blocks(title="alignloop · chat", analytics_enabled=False) as demo:
        gr.Markdown("## Chat with a model version")
        with gr.Tab("Chat"):
            history_state = gr.State([])  # the conversation as plain messages (unescaped)
            with gr.Row():
                model = gr.Dropdown(label="Model", choices=["default"], value="default", elem_id="chat-model")
                preset = gr.Dropdown(
                    label="Preset (L1)", choices=[NO_PRESET], value=NO_PRESET, elem_id="chat-preset"
                )
                temperature = gr.Slider(0, 1.5, value=0.7, step=0.05, label="Temperature")
                max_tokens = gr.Slider(8, 512, value=128, step=8, label="Max new tokens")
            chatbot = gr.Chatbot(label="Conversation", height=360, sanitize_html=True, elem_id="chatbot")
            message = gr.Textbox(
                label="Message", placeholder="Ask something, Enter to send", elem_id="chat-input"
            )
            with gr.Row():
                send = gr.Button("Send", variant="primary", elem_id="chat-send")
                clear = gr.Button("New conversation")
            with gr.Row():
                up = gr.Button("👍 Good reply", elem_id="thumbs-up")
                down = gr.Button("👎 Bad reply", elem_id="thumbs-down")
            better = gr.Textbox(
                label="Better answer (becomes training data)", lines=3, elem_id="better-answer"
            )
            save_better = gr.Button("Save better answer", elem_id="save-better")
            notice = gr.Markdown(elem_id="chat-notice")

            def respond(text, history, name, preset_ref, temp, limit, request: gr.Request):
                with Session(engine) as session:
                    reviewer(session, request)
                text = (text or "").strip()
                if not text:
                    raise gr.Error("Type a message first.")
                if len(text) > 8000:
                    raise gr.Error("That message is too long (8,000 characters at most).")
                history = [*history, {"role": "user", "content": text}]
                try:
                    stream, _ = stream_text(pool, settings, name, prepare(engine, history, preset_ref),
                                            temperature=temp, max_tokens=int(limit))  # fmt: skip
                except AlignloopError as exc:
                    raise gr.Error(str(exc)) from None
                for (reply,) in merge_streams([stream]):
                    shown = [*history, {"role": "assistant", "content": reply}]
                    yield "", shown, _shown(shown)

            send.click(respond, [message, history_state, model, preset, temperature, max_tokens],
                       [message, history_state, chatbot])  # fmt: skip
            message.submit(respond, [message, history_state, model, preset, temperature, max_tokens],
                           [message, history_state, chatbot])  # fmt: skip
            clear.click(lambda: ([], [], ""), None, [history_state, chatbot, notice])

            def feedback(rating, edited):
                def handler(history, name, better_text, request: gr.Request):
                    with Session(engine) as session:
                        user = reviewer(session, request)
                    try:
                        save_feedback(engine, user, model=name, history=history, rating=rating,
                                      edited=better_text if edited else None)  # fmt: skip
                    except AlignloopError as exc:
                        raise gr.Error(str(exc)) from None
                    return "Saved: thank you." if not edited else "Saved your better answer."

                return handler

            up.click(feedback(1, False), [history_state, model, better], notice)
            down.click(feedback(-1, False), [history_state, model, better], notice)
            save_better.click(feedback(None, True), [history_state, model, better], notice)

        with gr.Tab("Side by side"):
            with gr.Row():
                left_model = gr.Dropdown(label="Left model", choices=["default"], value="default")
                right_model = gr.Dropdown(label="Right model", choices=["default"], value="default")
            side_prompt = gr.Textbox(label="Prompt", elem_id="side-prompt")
            side_go = gr.Button("Ask both", variant="primary")
            with gr.Row():
                left_out = gr.Textbox(label="Left", lines=8, interactive=False)
                right_out = gr.Textbox(label="Right", lines=8, interactive=False)

            def side_by_side(text, left, right, request: gr.Request):
                with Session(engine) as session:
                    reviewer(session, request)
                if not (text or "").strip():
                    raise gr.Error("Type a prompt first.")
                messages = [{"role": "user", "content": text.strip()}]
                streams = [stream_text(pool, settings, m, messages, temperature=0.7, max_tokens=256)[0]
                           for m in (left, right)]  # fmt: skip
                for texts in merge_streams(streams):
                    yield texts[0], texts[1]

            side_go.click(side_by_side, [side_prompt, left_model, right_model], [left_out, right_out])

        with gr.Tab("Presets"):
            gr.Markdown("A preset is a system prompt, few-shot examples and an optional chain-of-thought "
                        "instruction. Saving under an existing name adds a new version.")  # fmt: skip
            p_name = gr.Textbox(label="Name")
            p_system = gr.Textbox(label="System prompt", lines=3)
            p_examples = gr.Textbox(label='Few-shot examples (JSON: [{"user": "...", "assistant": "..."}])', lines=4,
                                    value="[]")  # fmt: skip
            p_cot = gr.Textbox(
                label="Chain-of-thought instruction (optional)", placeholder="Think step by step."
            )
            p_save = gr.Button("Save preset")
            p_notice = gr.Markdown()

            def save(name, system, examples_json, cot, request: gr.Request):
                import json

                with Session(engine) as session:
                    user = reviewer(session, request)
                try:
                    examples = json.loads(examples_json or "[]")
                    with session_scope(engine) as session:
                        preset_row = save_preset(session, name=name, system_prompt=system or "", examples=examples,
                                                 chain_of_thought=cot or None, user_id=user.id)  # fmt: skip
                        ref = f"{preset_row.name}@{preset_row.version}"
                except (json.JSONDecodeError, AlignloopError) as exc:
                    raise gr.Error(f"Not saved: {exc}") from None
                return f"Saved **{html.escape(ref)}**.", gr.update(choices=preset_choices(engine), value=ref)

            p_save.click(save, [p_name, p_system, p_examples, p_cot], [p_notice, preset])

        def refresh():
            names = model_choices(engine)
            return (gr.update(choices=names), gr.update(choices=preset_choices(engine)), gr.update(choices=names),
                    gr.update(choices=names))  # fmt: skip

        demo.load(refresh, None, [model, preset, left_model, right_model])
    return demo
