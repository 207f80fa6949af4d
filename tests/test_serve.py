"""Arena bookkeeping, the Bradley-Terry leaderboard, chat feedback as data."""

import random

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session, select

from alignloop.core import AlignloopError, crud
from alignloop.core.db import session_scope
from alignloop.core.models import ChatFeedback, Comparison, Vote
from serve.arena import pick_pair, record_battle
from serve.chat import feedback_pairs, save_feedback
from serve.leaderboard import Battle, leaderboard


def test_bradley_terry_recovers_known_strengths():
    rng = random.Random(0)
    strength = {"strong": 1.5, "middle": 0.0, "weak": -1.5}
    battles = []
    for _ in range(600):
        a, b = rng.sample(sorted(strength), 2)
        p = 1 / (1 + 2.718281828 ** -(strength[a] - strength[b]))
        battles.append(Battle(a=a, b=b, score_a=1.0 if rng.random() < p else 0.0))
    table = leaderboard(battles, rounds=50)
    assert [r["model"] for r in table] == ["strong", "middle", "weak"]
    for row in table:
        assert row["ci_low"] <= row["rating"] <= row["ci_high"] and row["battles"] > 300
    # 1.5 logits apart is about 260 Elo points; the fit lands near it
    gap = table[0]["rating"] - table[1]["rating"]
    assert 180 < gap < 340
    ties = leaderboard([Battle("x", "y", 0.5)] * 20, rounds=10)
    assert abs(ties[0]["rating"] - ties[1]["rating"]) < 1


def test_arena_battles_are_comparisons_with_votes(workspace):
    settings, engine, password = workspace
    with session_scope(engine) as s:
        reviewer = crud.create_user(s, name="rev", role="reviewer", password="reviewer-pass")
        for name in ("m1", "m2"):
            crud.register_model(s, name=name, kind="policy", base="default")
    with pytest.raises(AlignloopError, match="at least two"):
        pick_pair(["only"], random.Random(0))
    for choice in ("a", "a", "b", "tie", "both_bad"):
        record_battle(engine, reviewer, prompt="Which is better?", models=("m1", "m2"), texts=("one", "two"),
                      choice=choice, settings=settings)  # fmt: skip
    with pytest.raises(AlignloopError):
        record_battle(
            engine, reviewer, prompt="p", models=("m1", "m2"), texts=("x", "y"), choice="c", settings=settings
        )
    with Session(engine) as s:
        arena = s.exec(select(Comparison).where(Comparison.source == "arena")).all()
        assert len(arena) == 5 and all(c.status == "done" for c in arena)
        assert len(s.exec(select(Vote)).all()) == 5
        pairs = crud.preference_pairs(s)  # arena votes feed reward training like any vote
        assert {p["chosen"][-1]["content"] for p in pairs} == {"one", "two"}
    from alignloop.web import create_app

    with TestClient(create_app(settings, engine)) as client:
        assert client.get("/api/leaderboard", follow_redirects=False).status_code in (303, 401)
        client.post("/login", data={"username": "rev", "password": "reviewer-pass"})
        board = client.get("/api/leaderboard").json()
        assert board["battles"] == 5 and [m["model"] for m in board["models"]] == ["m1", "m2"]


def test_chat_feedback_becomes_sft_and_preference_data(workspace):
    _, engine, _ = workspace
    with session_scope(engine) as s:
        reviewer = crud.create_user(s, name="rev", role="reviewer", password="reviewer-pass")
    question = [{"role": "user", "content": "Capital of France?"}]
    save_feedback(engine, reviewer, model="default", history=[*question, {"role": "assistant", "content": "Paris."}],
                  rating=1, edited=None)  # fmt: skip
    save_feedback(engine, reviewer, model="default", history=[*question, {"role": "assistant", "content": "Lyon."}],
                  rating=-1, edited=None)  # fmt: skip
    save_feedback(engine, reviewer, model="default", history=[*question, {"role": "assistant", "content": "Lyon."}],
                  rating=None, edited="Paris is the capital of France.")  # fmt: skip
    with pytest.raises(AlignloopError):
        save_feedback(engine, reviewer, model="default", history=question, rating=1, edited=None)
    with Session(engine) as s:
        assert len(s.exec(select(ChatFeedback)).all()) == 3
        pairs = feedback_pairs(s)
    by_source = {p["source"]: (p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in pairs}
    assert by_source == {
        "chat-edit": ("Paris is the capital of France.", "Lyon."),
        "chat-rating": ("Paris.", "Lyon."),
    }
    from sft.data import edited_examples

    with Session(engine) as s:
        assert [e.completion for e in edited_examples(s)] == ["Paris is the capital of France."]
