"""L1 depth: examples chosen per prompt by similarity (the embedded encoder), the reasoning hidden behind the
preset's delimiter (/v1 and its stream), and a version-3 database keeping its presets after the migration."""

import pytest
from sqlalchemy import inspect, text
from sqlmodel import Session

from alignloop.core import AlignloopError
from alignloop.core.db import create_schema, schema_version, session_scope
from alignloop.core.models import SCHEMA_VERSION
from alignloop.core.presets import ReasoningFilter, apply_preset, final_answer, get_preset, save_preset

POOL = [
    {"user": "How long should I knead bread dough?", "assistant": "About ten minutes."},
    {"user": "What is the capital of Japan?", "assistant": "Tokyo."},
    {"user": "How do I reverse a list in Python?", "assistant": "Use reversed(xs) or xs[::-1]."},
    {"user": "Which river flows through Paris?", "assistant": "The Seine."},
    {"user": "How do I sort a dictionary by value in Python?", "assistant": "sorted(d.items(), key=...)."},
]


def shown_examples(messages: list[dict]) -> list[str]:
    return [m["content"] for m in messages[:-1] if m["role"] == "user"]


def test_the_k_nearest_examples_are_chosen_per_prompt_nearest_last(session):
    save_preset(session, name="pool", examples=POOL, num_shots=2)
    save_preset(session, name="pool", examples=POOL, num_shots=2, shot_order="similar_first")
    code = [{"role": "user", "content": "How can I remove duplicates from a Python list?"}]
    geo = [{"role": "user", "content": "What is the capital city of France?"}]
    last = shown_examples(apply_preset(get_preset(session, "pool@1"), code))
    assert set(last) == {POOL[2]["user"], POOL[4]["user"]}
    first = shown_examples(apply_preset(get_preset(session, "pool@2"), code))
    assert first == last[::-1]  # the same two, the other order
    # A different question gets different demonstrations from the same pool.
    assert set(shown_examples(apply_preset(get_preset(session, "pool@1"), geo))) == {
        POOL[1]["user"],
        POOL[3]["user"],
    }
    # Without num_shots every example is shown, in the saved order (presets saved before this feature).
    save_preset(session, name="fixed", examples=POOL[:3])
    assert shown_examples(apply_preset(get_preset(session, "fixed"), code)) == [e["user"] for e in POOL[:3]]


def test_chain_of_thought_can_be_left_out_and_the_reasoning_hidden(session):
    preset = save_preset(
        session,
        name="cot",
        chain_of_thought="Think step by step, then write ANSWER:",
        answer_delimiter="ANSWER:",
    )
    messages = [{"role": "user", "content": "2+2?"}]
    assert apply_preset(preset, messages)[-1]["content"].endswith("then write ANSWER:")
    assert apply_preset(preset, messages, chain_of_thought=False)[-1]["content"] == "2+2?"
    assert final_answer(preset, "Two and two... ANSWER: 4") == "4"
    assert final_answer(preset, "4, no reasoning") == "4, no reasoning"  # nothing to tell apart: shown whole
    stream = ReasoningFilter("ANSWER:")
    pieces = [stream.feed(p) for p in ["Two and ", "two make four. ANS", "WER: 4", " exactly"]]
    assert "".join(pieces) + stream.flush() == "4 exactly" and pieces[:2] == ["", ""]
    silent = ReasoningFilter("ANSWER:")
    assert silent.feed("just 4") == "" and silent.flush() == "just 4"


@pytest.mark.parametrize(
    "bad, reason",
    [
        ({"num_shots": 0}, "num_shots"),
        ({"shot_order": "random"}, "shot_order"),
        ({"answer_delimiter": "  "}, "answer_delimiter"),
        ({"examples": POOL * 7}, "at most 32"),
    ],
)
def test_bad_selection_options_are_refused(session, bad, reason):
    with pytest.raises(AlignloopError, match=reason):
        save_preset(session, **({"name": "bad"} | bad))
    assert save_preset(session, name="big-pool", examples=POOL * 7, num_shots=3).version == 1


def test_a_version_3_database_keeps_its_presets(engine):
    with session_scope(engine) as s:
        save_preset(s, name="old", system_prompt="Be terse.", examples=POOL[:1])
    with engine.begin() as conn:  # back to the version-3 shape: no selection columns
        for column in ("num_shots", "shot_order", "answer_delimiter"):
            conn.execute(text(f"ALTER TABLE preset DROP COLUMN {column}"))
        conn.execute(text("UPDATE schemainfo SET version = 3"))
    assert create_schema(engine) == SCHEMA_VERSION == schema_version(engine)
    assert {"num_shots", "shot_order", "answer_delimiter"} <= {
        c["name"] for c in inspect(engine).get_columns("preset")
    }
    with Session(engine) as s:
        old = get_preset(s, "old")
        assert (old.num_shots, old.shot_order, old.answer_delimiter) == (None, "similar_last", None)
        assert shown_examples(apply_preset(old, [{"role": "user", "content": "q"}])) == [POOL[0]["user"]]
