"""/arena: anonymous battles between two model versions, and the leaderboard they produce.

A reviewer types a prompt; two different versions, drawn at random and placed on random sides, answer side by
side with their names hidden. The vote (A / B / tie / both bad) is stored as a `Comparison` with source
`arena` plus a `Vote`, exactly like an annotation, so reward training can use it; only then are the names
shown. The comparison is filed under the round open now (per-round figures stay per round), its responses in
a fixed order (by model version id) and the vote carries the order the sides were actually shown in, so
position bias in the arena is measurable like anywhere else. The leaderboard (`serve.leaderboard`) ranks versions by Bradley-Terry strength with bootstrap 95%
intervals; `/api/leaderboard` serves the same table as JSON.
"""

from __future__ import annotations

import html
import random
from typing import Annotated

import gradio as gr
from fastapi import APIRouter, Depends
from pydantic import BaseModel
from sqlmodel import Session

from alignloop.core import AlignloopError
from alignloop.core.config import Settings
from alignloop.core.http import SessionDep, require_role
from alignloop.core.models import User
from annotate.app import logout_button
from serve.battles import CHOICE_LABELS, current_round, record_battle  # noqa: F401  (re-exported)
from serve.chat import merge_streams, model_choices, reviewer, stream_text
from serve.leaderboard import (
    LeaderboardRow,
    all_battles,
    arena_battles,
    leaderboard,
    round_over_round_battles,
)

router = APIRouter(tags=["arena"])
ReviewerDep = Annotated[User, Depends(require_role("reviewer", "admin"))]


class LeaderboardOut(BaseModel):
    # The ranking and what it was fitted on: arena battles plus the round-over-round human votes.
    battles: int
    arena_battles: int
    round_battles: int
    models: list[LeaderboardRow]


@router.get("/api/leaderboard", response_model=LeaderboardOut)
def leaderboard_json(user: ReviewerDep, session: SessionDep) -> dict:
    """Versions ranked by Bradley-Terry strength (Elo scale) with bootstrap 95% intervals and battle counts, from
    arena battles and the human votes on each round's policy against its predecessor."""
    arena, rounds = arena_battles(session), round_over_round_battles(session)
    return {
        "battles": len(arena) + len(rounds),
        "arena_battles": len(arena),
        "round_battles": len(rounds),
        "models": leaderboard(arena + rounds),
    }


def pick_pair(names: list[str], rng: random.Random) -> tuple[str, str]:
    if len(names) < 2:
        raise AlignloopError("the arena needs at least two model versions: register or train another one")
    return tuple(rng.sample(names, 2))


def board_markdown(engine) -> str:
    with Session(engine) as session:
        battles = all_battles(session)
    rows = leaderboard(battles)
    if not rows:
        return "No battles yet."
    lines = [
        f"{len(battles)} battles\n",
        "| rank | model | rating | 95% CI | battles | win rate |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {r['rank']} | {html.escape(r['model'])} | {r['rating']:.0f} | {r['ci_low']:.0f} – {r['ci_high']:.0f} "
        f"| {r['battles']} | {r['win_rate']:.0%} |"
        for r in rows
    ]
    return "\n".join(lines)


def build_ui(engine, settings: Settings, pool) -> gr.Blocks:
    with gr.Blocks(title="alignloop · arena", analytics_enabled=False) as demo:
        gr.Markdown("## Arena: two anonymous models answer; vote for the better answer")
        logout_button()
        battle = gr.State(None)  # {"prompt", "models", "texts"}: the names stay server-side until the vote
        with gr.Tab("Battle"):
            prompt = gr.Textbox(label="Prompt", elem_id="arena-prompt")
            go = gr.Button("Battle", variant="primary", elem_id="arena-go")
            with gr.Row():
                out_a = gr.Textbox(label="Model A", lines=8, interactive=False, elem_id="arena-a")
                out_b = gr.Textbox(label="Model B", lines=8, interactive=False, elem_id="arena-b")
            with gr.Row():
                buttons = {
                    c: gr.Button(label, elem_id=f"arena-vote-{c}", interactive=False)
                    for c, label in CHOICE_LABELS.items()
                }
            reveal = gr.Markdown(elem_id="arena-reveal")
        with gr.Tab("Leaderboard"):
            board = gr.Markdown(elem_id="leaderboard")
            refresh = gr.Button("Refresh", elem_id="leaderboard-refresh")

        def fight(text, request: gr.Request):
            with Session(engine) as session:
                reviewer(session, request)
            text = (text or "").strip()
            if not text or len(text) > 8000:
                raise gr.Error("Type a prompt (8,000 characters at most).")
            try:
                models = pick_pair(model_choices(engine), random.Random())
                messages = [{"role": "user", "content": text}]
                streams = [
                    stream_text(pool, settings, m, messages, temperature=0.7, max_tokens=256)[0]
                    for m in models
                ]
            except AlignloopError as exc:
                raise gr.Error(str(exc)) from None
            locked = [gr.update(interactive=False)] * len(buttons)
            texts = ["", ""]
            for texts in merge_streams(streams):
                yield (None, texts[0], texts[1], "", *locked)
            state = {"prompt": text, "models": list(models), "texts": texts}
            yield (state, texts[0], texts[1], "", *[gr.update(interactive=True)] * len(buttons))

        go.click(fight, [prompt], [battle, out_a, out_b, reveal, *buttons.values()])

        def make_vote(choice):
            def vote(state, request: gr.Request):
                if not state:
                    raise gr.Error("Start a battle first.")
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
                a, b = (html.escape(m) for m in state["models"])
                message = f"You voted **{CHOICE_LABELS[choice]}**. Model A was **{a}**, model B was **{b}**."
                return (None, message, *[gr.update(interactive=False)] * len(buttons), board_markdown(engine))

            return vote

        for choice, button in buttons.items():
            button.click(make_vote(choice), [battle], [battle, reveal, *buttons.values(), board])
        refresh.click(lambda: board_markdown(engine), None, board)
        demo.load(lambda: board_markdown(engine), None, board)
    return demo
