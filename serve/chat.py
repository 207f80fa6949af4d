"""/chat for reviewers: talk to any model version, with an L1 preset; side by side; feedback that becomes data.

`build_ui(engine, settings, pool)` returns the Blocks; `web.py` mounts it at /chat behind the login (reviewers
and admins). Replies stream token by token from the shared batching engine (`serve.engine`). Thumbs up/down
and a better answer written by the reviewer are stored as `ChatFeedback`: edits become SFT data
(`sft train --from-chat-edits`), and `crud.feedback_pairs` turns them (and up/down pairs on one conversation) into
preference pairs (`alignloop export feedback`). Model text is shown escaped: markup is displayed, not run.
"""

from __future__ import annotations

import html
import queue
import threading
from collections.abc import Iterator

import gradio as gr
from sqlmodel import Session

from alignloop.core import AlignloopError, crud
from alignloop.core.config import Settings
from alignloop.core.db import session_scope
from alignloop.core.models import ChatFeedback, User
from alignloop.core.presets import apply_preset, get_preset, list_presets, save_preset
from annotate.app import logout_button
from serve.battles import CHOICE_LABELS as SIDE_LABELS
from serve.battles import record_battle
from serve.engine import Request, Stream
from serve.review import review_transcript, save_transcript

NO_PRESET = "(no preset)"
REVIEW_ROLES = ("reviewer", "admin")


def reviewer(session: Session, request: gr.Request, roles=REVIEW_ROLES) -> User:
    user = crud.get_user(session, name=request.username) if request and request.username else None
    if user is None or user.disabled or user.role not in roles:
        raise gr.Error("You need a reviewer account here.")
    return user


def model_choices(engine) -> list[str]:
    with Session(engine) as session:
        return crud.servable_models(session)


def preset_choices(engine) -> list[str]:
    with Session(engine) as session:
        return [NO_PRESET] + [f"{p.name}@{p.version}" for p in list_presets(session)]


def prepare(engine, messages: list[dict], preset: str | None) -> list[dict]:
    if not preset or preset == NO_PRESET:
        return messages
    with Session(engine) as session:
        return apply_preset(get_preset(session, preset), messages)


def preset_delimiter(engine, preset: str | None) -> str | None:
    if not preset or preset == NO_PRESET:
        return None
    with Session(engine) as session:
        return get_preset(session, preset).answer_delimiter


def pin_preset(engine, preset: str | None) -> str | None:
    """'name' -> 'name@version' of the latest version now, so a later save cannot change what was used."""
    if not preset or preset == NO_PRESET:
        return None
    with Session(engine) as session:
        row = get_preset(session, preset)
        return f"{row.name}@{row.version}"


def model_ref(settings: Settings, name: str) -> str:
    return settings.default_policy if name == "default" else name


def stream_text(
    pool,
    settings,
    name: str,
    messages: list[dict],
    *,
    temperature: float,
    max_tokens: int,
    seed: int | None = None,
) -> tuple[Stream, Request]:
    """Start one reply; returns its event stream (and the request, to cancel it)."""
    engine = pool.get(model_ref(settings, name))
    stream = Stream()
    request = Request(
        prompt_ids=engine.render(messages),
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=0.95,
        seed=seed,
        emit=stream,
    )
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
    engine,
    user: User,
    *,
    model: str,
    history: list[dict],
    rating: int | None,
    edited: str | None,
    preset: str | None = None,
):
    """Store a verdict on the last reply with the preset it was made with (pinned to its version) and the
    messages the model was actually given, so edits become SFT data in the context the model saw."""
    if not history or history[-1]["role"] != "assistant":
        raise AlignloopError("there is no reply to give feedback on yet")
    if edited is not None and not edited.strip():
        raise AlignloopError("the better answer is empty")
    with session_scope(engine) as session:
        version = crud.get_model_version(session, name=model)
        row = get_preset(session, preset) if preset and preset != NO_PRESET else None
        session.add(
            ChatFeedback(
                user_id=user.id,
                model_version_id=version.id if version else None,
                messages=history[:-1],
                response=history[-1]["content"],
                rating=rating,
                edited=edited.strip() if edited else None,
                preset=f"{row.name}@{row.version}" if row else None,
                context=apply_preset(row, history[:-1]) if row else None,
            )
        )


def build_ui(engine, settings: Settings, pool) -> gr.Blocks:
    with gr.Blocks(title="alignloop · chat", analytics_enabled=False) as demo:
        gr.Markdown("## Chat with a model version")
        logout_button()
        with gr.Tab("Chat"):
            history_state = gr.State([])  # the conversation as plain messages (unescaped)
            reply_preset = gr.State(None)  # the preset ("name@version") the last reply was made with
            transcript_id = gr.State(None)  # this conversation's Transcript row (serve.review)
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

            def respond(text, history, name, preset_ref, temp, limit, kept, request: gr.Request):
                with Session(engine) as session:
                    user = reviewer(session, request)
                text = (text or "").strip()
                if not text:
                    raise gr.Error("Type a message first.")
                if len(text) > 8000:
                    raise gr.Error("That message is too long (8,000 characters at most).")
                history = [*history, {"role": "user", "content": text}]
                try:
                    pinned = pin_preset(engine, preset_ref)
                    stream, _ = stream_text(
                        pool,
                        settings,
                        name,
                        prepare(engine, history, pinned),
                        temperature=temp,
                        max_tokens=int(limit),
                    )
                except AlignloopError as exc:
                    raise gr.Error(str(exc)) from None
                delimiter, reply, shown = preset_delimiter(engine, preset_ref), "", history
                for (reply,) in merge_streams([stream]):
                    # The reasoning stays hidden: until the answer starts, the reviewer sees a placeholder.
                    visible = (
                        reply.split(delimiter, 1)[1].lstrip() if delimiter and delimiter in reply else reply
                    )
                    visible = "(thinking…)" if delimiter and delimiter not in reply else visible
                    shown = [*history, {"role": "assistant", "content": visible}]
                    yield "", shown, _shown(shown), pinned, kept
                if delimiter and delimiter not in reply:  # never wrote the delimiter: nothing to hide
                    shown = [*history, {"role": "assistant", "content": reply}]
                kept = save_transcript(
                    engine, user, transcript_id=kept, model=name, preset=pinned, history=shown
                )
                yield "", shown, _shown(shown), pinned, kept

            chat_inputs = [message, history_state, model, preset, temperature, max_tokens, transcript_id]
            chat_outputs = [message, history_state, chatbot, reply_preset, transcript_id]
            send.click(respond, chat_inputs, chat_outputs)
            message.submit(respond, chat_inputs, chat_outputs)

            def feedback(rating, edited):
                def handler(history, name, better_text, used_preset, request: gr.Request):
                    with Session(engine) as session:
                        user = reviewer(session, request)
                    try:
                        save_feedback(
                            engine,
                            user,
                            model=name,
                            history=history,
                            rating=rating,
                            edited=better_text if edited else None,
                            preset=used_preset,
                        )
                    except AlignloopError as exc:
                        raise gr.Error(str(exc)) from None
                    return "Saved: thank you." if not edited else "Saved your better answer."

                return handler

            up.click(feedback(1, False), [history_state, model, better, reply_preset], notice)
            down.click(feedback(-1, False), [history_state, model, better, reply_preset], notice)
            save_better.click(feedback(None, True), [history_state, model, better, reply_preset], notice)

            with gr.Accordion("Review this conversation", open=True):
                with gr.Row():
                    flag = gr.Checkbox(label="Flag for the admins' review queue", elem_id="review-flag")
                    tags = gr.Textbox(label="Tags (comma-separated)", elem_id="review-tags", max_lines=1)
                comment = gr.Textbox(label="Comment", lines=2, max_length=2000, elem_id="review-comment")
                save_review = gr.Button("Save review", elem_id="review-save")

            def do_review(kept, flagged, tag_text, comment_text, request: gr.Request):
                with Session(engine) as session:
                    user = reviewer(session, request)
                try:
                    row = review_transcript(
                        engine,
                        user,
                        transcript_id=kept,
                        flagged=bool(flagged),
                        tags=tag_text,
                        comment=comment_text,
                    )
                except AlignloopError as exc:
                    raise gr.Error(str(exc)) from None
                return "Review saved" + (" and flagged for the admins." if row.flagged else ".")

            save_review.click(do_review, [transcript_id, flag, tags, comment], notice)
            clear.click(
                lambda: ([], [], "", None, None, False, "", ""),
                None,
                [history_state, chatbot, notice, reply_preset, transcript_id, flag, tags, comment],
            )

        with gr.Tab("Side by side"):
            with gr.Row():
                left_model = gr.Dropdown(
                    label="Left model", choices=["default"], value="default", elem_id="side-left-model"
                )
                right_model = gr.Dropdown(
                    label="Right model", choices=["default"], value="default", elem_id="side-right-model"
                )
            side_prompt = gr.Textbox(label="Prompt", elem_id="side-prompt")
            side_go = gr.Button("Ask both", variant="primary", elem_id="side-go")
            with gr.Row():
                left_out = gr.Textbox(label="Left", lines=8, interactive=False, elem_id="side-left")
                right_out = gr.Textbox(label="Right", lines=8, interactive=False, elem_id="side-right")
            side_state = gr.State(None)  # {"prompt", "models", "texts"} of the last finished pair
            with gr.Row():
                side_buttons = {
                    c: gr.Button(
                        label.replace("A", "Left").replace("B", "Right"),
                        elem_id=f"side-vote-{c}",
                        interactive=False,
                    )
                    for c, label in SIDE_LABELS.items()
                }
            side_notice = gr.Markdown(elem_id="side-notice")

            def side_by_side(text, left, right, request: gr.Request):
                with Session(engine) as session:
                    reviewer(session, request)
                if not (text or "").strip():
                    raise gr.Error("Type a prompt first.")
                messages = [{"role": "user", "content": text.strip()}]
                streams = [
                    stream_text(pool, settings, m, messages, temperature=0.7, max_tokens=256)[0]
                    for m in (left, right)
                ]
                locked = [gr.update(interactive=False)] * len(side_buttons)
                texts = ["", ""]
                for texts in merge_streams(streams):
                    yield texts[0], texts[1], None, *locked
                state = (
                    {"prompt": text.strip(), "models": [left, right], "texts": texts}
                    if left != right
                    else None
                )
                yield (
                    texts[0],
                    texts[1],
                    state,
                    *[gr.update(interactive=state is not None)] * len(side_buttons),
                )

            side_go.click(
                side_by_side,
                [side_prompt, left_model, right_model],
                [left_out, right_out, side_state, *side_buttons.values()],
            )

            def side_vote(choice):
                # Named side by side, so not blind like the arena: the vote is stored as an arena battle all
                # the same (a comparison with the shown order), which reward training and the leaderboard use.
                def vote(state, request: gr.Request):
                    if not state:
                        raise gr.Error("Ask two different models first.")
                    with Session(engine) as session:
                        user = reviewer(session, request)
                    try:
                        record_battle(
                            engine,
                            user,
                            prompt=state["prompt"],
                            models=tuple(state["models"]),
                            texts=tuple(state["texts"]),
                            choice=choice,
                            settings=settings,
                        )
                    except AlignloopError as exc:
                        raise gr.Error(str(exc)) from None
                    return None, "Vote recorded.", *[gr.update(interactive=False)] * len(side_buttons)

                return vote

            for choice, button in side_buttons.items():
                button.click(
                    side_vote(choice), [side_state], [side_state, side_notice, *side_buttons.values()]
                )

        with gr.Tab("Presets"):
            gr.Markdown(
                "A preset is a system prompt, few-shot examples and an optional chain-of-thought "
                "instruction. Saving under an existing name adds a new version."
            )
            p_name = gr.Textbox(label="Name")
            p_system = gr.Textbox(label="System prompt", lines=3)
            p_examples = gr.Textbox(
                label='Few-shot examples (JSON: [{"user": "...", "assistant": "..."}])', lines=4, value="[]"
            )
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
                        preset_row = save_preset(
                            session,
                            name=name,
                            system_prompt=system or "",
                            examples=examples,
                            chain_of_thought=cot or None,
                            user_id=user.id,
                        )
                        ref = f"{preset_row.name}@{preset_row.version}"
                except (json.JSONDecodeError, AlignloopError) as exc:
                    raise gr.Error(f"Not saved: {exc}") from None
                return f"Saved **{html.escape(ref)}**.", gr.update(choices=preset_choices(engine), value=ref)

            p_save.click(save, [p_name, p_system, p_examples, p_cot], [p_notice, preset])

        def refresh():
            names = model_choices(engine)
            return (
                gr.update(choices=names),
                gr.update(choices=preset_choices(engine)),
                gr.update(choices=names),
                gr.update(choices=names),
            )

        demo.load(refresh, None, [model, preset, left_model, right_model])
    return demo
