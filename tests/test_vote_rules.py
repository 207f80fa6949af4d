"""Issue #13 M6: a vote needs the voter's lease, is timed by the server, and carries only configured ratings;
annotators see only the items leased to them. The same rules through the queue, the JSON API and the page."""

from datetime import timedelta

import pytest
from conftest import web_login
from fastapi.testclient import TestClient
from sqlmodel import Session, select

from alignloop.core import crud
from alignloop.core.models import Vote, utcnow
from alignloop.web import create_app
from annotate import queue
from tests.test_queue import seed, users


def test_a_vote_needs_the_voters_live_lease(session):
    a, b = users(session, 2)
    first, second = seed(session, 2)
    item = queue.next_item(session, user_id=a.id, gold_share=0)
    other = second.id if item.comparison_id == first.id else first.id
    with pytest.raises(queue.NotLeasedError):  # never handed out: not for the choosing
        queue.submit_vote(session, user_id=a.id, comparison_id=other, choice="a")
    with pytest.raises(queue.NotLeasedError):  # leased to somebody else
        queue.submit_vote(session, user_id=b.id, comparison_id=item.comparison_id, choice="a")
    with pytest.raises(queue.NotLeasedError):  # the lease ran out
        queue.submit_vote(
            session,
            user_id=a.id,
            comparison_id=item.comparison_id,
            choice="a",
            now=item.expires_at + timedelta(seconds=1),
        )
    assert session.exec(select(Vote)).all() == []
    queue.submit_vote(session, user_id=a.id, comparison_id=item.comparison_id, choice="a")
    assert len(session.exec(select(Vote)).all()) == 1


def test_a_gold_assignment_outlives_its_lease(session):
    (a,) = users(session, 1)
    (gold,) = seed(session, 1, gold="a", prefix="g")
    item = queue.next_item(session, user_id=a.id, gold_share=1.0)
    assert item.comparison_id == gold.id
    queue.submit_vote(
        session, user_id=a.id, comparison_id=gold.id, choice="a", now=item.expires_at + timedelta(hours=1)
    )


def test_seconds_are_measured_from_the_lease_start_not_the_reload(session):
    (a,) = users(session, 1)
    seed(session, 1)
    start = utcnow()
    item = queue.next_item(session, user_id=a.id, now=start)
    queue.next_item(session, user_id=a.id, now=start + timedelta(seconds=30))  # a reload renews, not restarts
    queue.submit_vote(
        session, user_id=a.id, comparison_id=item.comparison_id, choice="b", now=start + timedelta(seconds=42)
    )
    assert session.exec(select(Vote)).one().seconds == 42.0


@pytest.mark.parametrize(
    "ratings",
    [
        {"A": {"helpfulness": True}},  # a bool is an int to Python, not a rating
        {"A": {"helpfulness": 4.0}},
        {"A": {"helpfulness": 6}},
        {"A": {"made-up": 3}},
        {"A": {f"x{i}": 3 for i in range(15_000)}},
        {"A": {"helpfulness": 3}, "B": {}, "C": {}},  # more labels than responses
    ],
)
def test_ratings_take_only_configured_aspects_with_int_values(session, ratings):
    (a,) = users(session, 1)
    (c,) = seed(session, 1)
    queue.next_item(session, user_id=a.id)
    with pytest.raises(queue.AlignloopError, match="ratings must map"):
        queue.submit_vote(
            session, user_id=a.id, comparison_id=c.id, choice="a", ratings=ratings, aspects=("helpfulness",)
        )
    assert session.exec(select(Vote)).all() == []


@pytest.fixture
def api(workspace):
    settings, engine, admin_password = workspace
    with Session(engine) as s:
        for name, role in (("ann", "annotator"), ("bob", "annotator"), ("rev", "reviewer")):
            crud.create_user(s, name=name, role=role, password=f"{name}-password")
        seed(s, 3)
        s.commit()
    with TestClient(create_app(settings, engine)) as client:
        yield client, engine


def _login(client, name):
    client.cookies.clear()
    response = web_login(client, name, f"{name}-password")
    assert response.status_code == 303


def test_api_votes_need_a_lease_and_ignore_client_seconds(api):
    client, engine = api
    _login(client, "ann")
    item = client.get("/api/annotate/next").json()
    others = [c for c in (1, 2, 3) if c != item["comparison_id"]]
    refused = client.post("/api/annotate/vote", json={"comparison_id": others[0], "choice": "a"})
    assert refused.status_code == 409 and "not leased" in refused.json()["detail"]
    bad = client.post(
        "/api/annotate/vote",
        json={"comparison_id": item["comparison_id"], "choice": "a", "ratings": {"A": {"helpfulness": True}}},
    )
    assert bad.status_code == 422
    ok = client.post(
        "/api/annotate/vote", json={"comparison_id": item["comparison_id"], "choice": "a", "seconds": 9999}
    )
    assert ok.status_code == 201
    with Session(engine) as s:
        (vote,) = s.exec(select(Vote)).all()
    assert vote.comparison_id == item["comparison_id"] and vote.seconds < 60


def test_annotators_see_only_their_leased_items(api):
    client, _ = api
    _login(client, "ann")
    assert client.get("/api/comparisons").json() == []
    assert "Queued comparisons (0)" in client.get("/queue").text
    item = client.get("/api/annotate/next").json()
    assert [c["id"] for c in client.get("/api/comparisons").json()] == [item["comparison_id"]]
    assert "Queued comparisons (1)" in client.get("/queue").text
    _login(client, "bob")
    assert client.get("/api/comparisons").json() == []
    _login(client, "rev")
    assert len(client.get("/api/comparisons").json()) == 3
    assert "Queued comparisons (3)" in client.get("/queue").text


def test_the_annotation_page_votes_only_on_the_leased_item(workspace):
    """The Gradio handlers go through the same rule: a state naming another item is not voted on."""
    import gradio as gr

    from annotate.app import build_ui

    settings, engine, _ = workspace
    with Session(engine, expire_on_commit=False) as s:
        (ann,) = users(s, 1)
        first, second = seed(s, 2)
        s.commit()
    demo = build_ui(engine, settings)
    vote_a = next(f.fn for f in demo.fns.values() if f.name == "vote")
    request = gr.Request(username=ann.name)
    with Session(engine) as s:
        item = queue.next_item(s, user_id=ann.id, gold_share=0)
        s.commit()
    other = second.id if item.comparison_id == first.id else first.id
    cells = [None] * (4 * len(settings.aspects))
    shown = vote_a(request, {"comparison_id": other, "num": 2}, "", "", *cells)
    assert "ran out" in shown[2]
    with Session(engine) as s:
        assert s.exec(select(Vote)).all() == []
    shown = vote_a(request, {"comparison_id": item.comparison_id, "num": 2}, "", "", *cells)
    assert "Saved" in shown[2]
    with Session(engine) as s:
        (vote,) = s.exec(select(Vote)).all()
    assert vote.comparison_id == item.comparison_id and vote.seconds is not None


def test_a_version_3_database_gains_lease_start_and_old_leases_still_vote(engine):
    from sqlalchemy import inspect, text

    from alignloop.core.db import create_schema, schema_version
    from alignloop.core.models import SCHEMA_VERSION

    with Session(engine, expire_on_commit=False) as s:
        (a,) = users(s, 1)
        (c,) = seed(s, 1)
        queue.next_item(s, user_id=a.id)
        s.commit()
    with engine.begin() as conn:  # back to the version-3 shape: leases without a start time
        conn.execute(text("ALTER TABLE lease DROP COLUMN leased_at"))
        conn.execute(text("UPDATE schemainfo SET version = 3"))
    assert create_schema(engine) == SCHEMA_VERSION == schema_version(engine)
    assert "leased_at" in {col["name"] for col in inspect(engine).get_columns("lease")}
    with Session(engine) as s:
        queue.submit_vote(s, user_id=a.id, comparison_id=c.id, choice="a")  # a lease from before: no time
        s.commit()
        assert s.exec(select(Vote)).one().seconds is None
