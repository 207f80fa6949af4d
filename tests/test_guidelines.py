"""Guidelines edited on /admin, versioned per round, and the version in force stored with each vote."""

from conftest import web_login
from fastapi.testclient import TestClient
from sqlmodel import Session, select
from test_queue import seed, users

from alignloop.core import crud
from alignloop.core.db import session_scope
from alignloop.core.models import Comparison, Guidelines, Vote
from alignloop.web import create_app
from annotate import queue


def test_guidelines_versions_per_round_are_stored_with_each_vote(workspace):
    settings, engine, password = workspace
    with session_scope(engine) as s:
        (round0,) = seed(s, 1, prefix="r0")
        (round1,) = seed(s, 1, prefix="r1")
        s.get(Comparison, round1.id).round = 1
        (ann,) = users(s, 1)
        crud.record_vote(s, comparison_id=round0.id, user_id=ann.id, choice="a")  # before any version
    with TestClient(create_app(settings, engine)) as client:
        web_login(client, "a0", "pass-word")
        assert client.post("/admin/guidelines", data={"text": "x", "round": "0"}).status_code == 403
        client.post("/logout")
        web_login(client, "admin", password)
        for text, round in (("Prefer the honest answer.", 0), ("Prefer the honest, short answer.", 1)):
            response = client.post(
                "/admin/guidelines", data={"text": text, "round": str(round)}, follow_redirects=False
            )
            assert response.status_code == 303
        assert client.post("/admin/guidelines", data={"text": "  ", "round": "0"}).status_code == 400
        page = client.get("/admin/guidelines").text
        assert "v2 (round 1 on" in page and "Prefer the honest, short answer." in page
    with session_scope(engine) as s:
        assert len(s.exec(select(Guidelines)).all()) == 2
        (b,) = users_named(s, "b")
        item = queue.next_item(s, user_id=b.id, gold_share=0)
        queue.submit_vote(s, user_id=b.id, comparison_id=item.comparison_id, choice="a")
    with Session(engine) as s:
        votes = {v.comparison_id: v for v in s.exec(select(Vote).where(Vote.user_id == b.id)).all()}
        first = s.exec(select(Vote).where(Vote.user_id == ann.id)).one()
        assert first.guidelines_version is None  # cast before any version existed
        (vote,) = votes.values()
        assert vote.guidelines_version == (1 if vote.comparison_id == round0.id else 2)
        raw = {r["vote_id"]: r for r in crud.raw_votes(s)}
        assert raw[vote.id]["guidelines_version"] == vote.guidelines_version


def users_named(session, name):
    return [crud.create_user(session, name=name, role="annotator")]
