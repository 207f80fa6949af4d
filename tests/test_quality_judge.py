"""Quality statistics, the admin page's remedies, and the AI judge voting through the queue."""

import pytest
from conftest import serve_in_thread
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlmodel import Session, select
from test_queue import seed, users

from alignloop.core import crud
from alignloop.core.db import session_scope
from alignloop.core.models import User, Vote
from alignloop.web import create_app
from annotate.judge import LocalJudge, OpenAIJudge, decide, run_judge
from annotate.quality import cohen_kappa, quality_report


def test_cohen_kappa_matches_the_textbook():
    # Two raters, 10 items: 7 agreements; marginals a: 5/5, b: 6/4 -> pe = 0.5; kappa = (0.7-0.5)/0.5 = 0.4
    a = ["y"] * 5 + ["n"] * 5
    b = ["y", "y", "y", "y", "n", "n", "n", "n", "y", "y"]
    assert cohen_kappa(a, b) == pytest.approx((0.7 - 0.5) / 0.5)
    assert cohen_kappa(["a", "b"], ["a", "b"]) == 1.0


def vote_all(session, user, comparisons, choices, shown_order=(0, 1)):
    for c, choice in zip(comparisons, choices, strict=True):
        crud.record_vote(
            session,
            comparison_id=c.id,
            user_id=user.id,
            choice=choice,
            shown_order=list(shown_order),
            seconds=4.0,
        )


def test_quality_report_flags_the_careless_annotator(session):
    good1, good2, good3, careless = users(session, 4)
    items = seed(session, 12, target_votes=4)
    golds = seed(session, 6, gold="a", prefix="gold")
    truth = ["a", "b"] * 6
    vote_all(session, good1, items, truth)
    vote_all(session, good2, items, truth[:10] + ["tie", "tie"])
    vote_all(session, good3, items, truth)
    vote_all(session, careless, items, ["a"] * 12)  # always the first one shown
    for good in (good1, good2, good3):
        vote_all(session, good, golds, ["a"] * 6)
    vote_all(session, careless, golds, ["b"] * 6, shown_order=(1, 0))  # b was shown first: still the first

    report = quality_report(session)
    by_name = {a.name: a for a in report.annotators}
    assert by_name["a0"].gold_accuracy == 1.0 and by_name["a3"].gold_accuracy == 0.0
    assert by_name["a3"].position_bias == 1.0 and by_name["a0"].position_bias == pytest.approx(12 / 18)
    assert any("gold accuracy" in f for f in by_name["a3"].flags)
    assert any("agreement with the others" in f for f in by_name["a3"].flags)
    assert [name for name, a in by_name.items() if a.flags] == ["a3"]
    assert by_name["a0"].consensus_kappa > 0.8
    assert 0 < report.krippendorff_alpha < 1
    assert len(report.pairwise_kappa) == 6
    assert report.median_seconds == 4.0 and report.num_multi_voted == 18


def test_admin_can_exclude_and_disable_and_annotators_cannot(workspace):
    settings, engine, password = workspace
    with session_scope(engine) as s:
        (ann,) = users(s, 1)
        (c,) = seed(s, 1)
        crud.record_vote(s, comparison_id=c.id, user_id=ann.id, choice="a")
    with TestClient(create_app(settings, engine)) as client:
        client.post("/login", data={"username": "a0", "password": "pass-word"})
        assert client.get("/admin").status_code == 403
        assert client.post(f"/admin/users/{ann.id}/exclude").status_code == 403
        client.post("/logout")
        client.post("/login", data={"username": "admin", "password": password})
        page = client.get("/admin")
        assert page.status_code == 200 and "Annotation quality" in page.text and "a0" in page.text
        assert client.get("/api/quality").json()["num_votes"] == 1
        with Session(engine) as s:
            assert len(crud.preference_pairs(s)) == 1
        client.post(f"/admin/users/{ann.id}/exclude")
        with Session(engine) as s:
            assert crud.preference_pairs(s) == []  # excluded votes leave every export
        client.post(f"/admin/users/{ann.id}/disable")
        with Session(engine) as s:
            assert s.get(User, ann.id).disabled
        client.post("/logout")
        response = client.post(
            "/login", data={"username": "a0", "password": "pass-word"}, follow_redirects=False
        )
        assert response.headers["location"] == "/login?error=1"


class LengthJudge:
    """A judge with a known taste (longer is better), to check the swap logic and the queue path."""

    def prefer_first(self, prompt, first, second):
        return 1.0 if len(first) > len(second) else 0.0 if len(first) < len(second) else 0.5


class FirstJudge:
    """A judge that only ever likes whatever comes first: pure position bias."""

    def prefer_first(self, prompt, first, second):
        return 0.9


def test_position_swapping_turns_pure_position_bias_into_ties():
    prompt = [{"role": "user", "content": "q"}]
    assert decide(FirstJudge(), prompt, ["x", "yy"]) == ("tie", None)
    assert decide(LengthJudge(), prompt, ["x", "yy"]) == ("b", None)
    assert decide(LengthJudge(), prompt, ["bb", "a", "ccc"]) == (None, ["C", "A", "B"])


def test_judge_votes_through_the_queue_as_an_ai_user(engine):
    with session_scope(engine) as s:
        comparisons = seed(s, 5, target_votes=2)
        (human,) = users(s, 1)
        for c in comparisons:  # the human votes first, for the agreement figure
            items = crud.comparison_generations(s, comparison_id=c.id)
            crud.record_vote(
                s,
                comparison_id=c.id,
                user_id=human.id,
                choice="a" if len(items[0].text) >= len(items[1].text) else "b",
            )
    counts = run_judge(engine, judge=LengthJudge(), user_name="judge", progress=False)
    assert counts["votes"] == 5
    with Session(engine) as s:
        judge = crud.get_user(s, name="judge")
        assert judge.kind == "ai"
        votes = s.exec(select(Vote).where(Vote.user_id == judge.id)).all()
        assert len(votes) == 5 and all(sorted(v.shown_order) == [0, 1] for v in votes)
        report = quality_report(s)
        assert report.ai_human_items == 5


def test_local_judge_on_a_tiny_model(engine, tiny_model, tiny_tokenizer):
    judge = LocalJudge(tiny_model, tiny_tokenizer)
    p = judge.prefer_first([{"role": "user", "content": "Hi"}], "Hello there.", "Go away.")
    assert 0.0 < p < 1.0
    with session_scope(engine) as s:
        seed(s, 3)
    assert run_judge(engine, judge=judge, progress=False)["votes"] == 3


@pytest.fixture
def fake_openai_endpoint():
    """A local HTTP server speaking the chat-completions wire format, answering like a length-preferring judge.
    It stands in for whatever OpenAI-compatible endpoint a user configures; the client under test is the real
    `openai` package."""
    import re

    app = FastAPI()
    seen = []

    @app.post("/v1/chat/completions")
    def completions(body: dict):
        seen.append(body)
        text = body["messages"][-1]["content"]
        a = re.search(r"\[Reply A\]\n(.*?)\n\n\[Reply B\]", text, re.S).group(1)
        b = re.search(r"\[Reply B\]\n(.*?)\n\nWhich reply", text, re.S).group(1)
        answer = "A" if len(a) > len(b) else "B"
        return {
            "id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }  # fmt: skip

    with serve_in_thread(app) as url:
        yield f"{url}/v1", seen


def test_openai_compatible_judge(engine, fake_openai_endpoint):
    url, seen = fake_openai_endpoint
    judge = OpenAIJudge(base_url=url, model="judge-model", api_key="k")
    assert decide(judge, [{"role": "user", "content": "q"}], ["short", "much longer"]) == ("b", None)
    assert len(seen) == 2 and seen[0]["temperature"] == 0 and seen[0]["model"] == "judge-model"
    with session_scope(engine) as s:
        seed(s, 2)
    assert run_judge(engine, judge=judge, progress=False)["votes"] == 2


def test_judge_refuses_a_human_user(engine):
    with session_scope(engine) as s:
        users(s, 1)
    from alignloop.core import AlignloopError

    with pytest.raises(AlignloopError, match="human annotator"):
        run_judge(engine, judge=LengthJudge(), user_name="a0", progress=False)
