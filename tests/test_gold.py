"""Gold items made without code: `alignloop gold import FILE`, promoting a human consensus on /admin/gold, and
gold for rankings, measured for people and the AI judge alike."""

import json

from conftest import web_login
from fastapi.testclient import TestClient
from sqlmodel import Session, select
from test_queue import seed, users

from alignloop.cli import main
from alignloop.core import crud
from alignloop.core.db import session_scope
from alignloop.core.models import Comparison, User
from alignloop.web import create_app
from annotate import queue
from annotate.quality import quality_report


def write(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_gold_import_is_all_or_nothing_and_rankings_have_gold(workspace, tmp_path, capsys):
    settings, engine, _ = workspace
    ws = ["--workspace", str(settings.workspace)]
    good = [
        {"prompt": "2+2?", "responses": ["4", "5"], "gold": "a"},
        {
            "prompt": [{"role": "user", "content": "Rank"}],
            "responses": ["x", "yy", "zzz"],
            "gold": ["C", "A", "B"],
        },
    ]
    bad = write(
        tmp_path / "bad.jsonl", [*good, {"prompt": "q", "responses": ["a", "b"], "gold": "c"}, "{nope"]
    )
    assert main(["gold", "import", str(bad), *ws]) != 0
    err = capsys.readouterr().err
    assert "bad.jsonl:3:" in err and "bad.jsonl:4:" in err
    too_many = write(
        tmp_path / "k5.jsonl", [{"prompt": "q", "responses": list("abcde"), "gold": list("ABCDE")}]
    )
    assert main(["gold", "import", str(too_many), *ws]) != 0
    with Session(engine) as s:
        assert crud.count_comparisons(s) == 0  # nothing written
    assert main(["gold", "import", str(write(tmp_path / "gold.jsonl", good)), "--round", "0", *ws]) == 0
    with session_scope(engine) as s:
        pair, ranked = s.exec(select(Comparison).order_by(Comparison.id)).all()
        assert (pair.gold, ranked.gold) == ("a", "2,0,1")
        (ann,) = users(s, 1)
        # The annotator ranks the gold item: the response shown for position 2 first is right.
        crud.record_vote(s, comparison_id=ranked.id, user_id=ann.id, ranking=[2, 1, 0])
        crud.record_vote(s, comparison_id=pair.id, user_id=ann.id, choice="b")
        stats = next(a for a in quality_report(s).annotators if a.name == "a0")
    assert (stats.num_gold, stats.gold_accuracy) == (2, 0.5)


def test_admin_promotes_a_human_consensus_to_gold(workspace):
    settings, engine, password = workspace
    with session_scope(engine) as s:
        agreed, split = seed(s, 2, target_votes=2)
        a0, a1, a2 = users(s, 3)
        judge = crud.create_user(s, name="judge", role="annotator", kind="ai")
        for comparison, choices in ((agreed, ("b", "b")), (split, ("a", "b"))):
            for user, choice in zip((a0, a1), choices, strict=True):
                crud.record_vote(s, comparison_id=comparison.id, user_id=user.id, choice=choice)
        crud.record_vote(s, comparison_id=split.id, user_id=judge.id, choice="a")  # an AI is no tie-breaker
    with TestClient(create_app(settings, engine)) as client:
        web_login(client, "admin", password)
        page = client.get("/admin/gold")
        assert page.status_code == 200 and f"/admin/gold/{agreed.id}/promote" in page.text
        assert f"/admin/gold/{split.id}/promote" not in page.text
        assert client.post(f"/admin/gold/{split.id}/promote").status_code == 400
        assert client.post(f"/admin/gold/{agreed.id}/promote", follow_redirects=False).status_code == 303
        client.post("/logout")
        web_login(client, "a2", "pass-word")
        assert client.post(f"/admin/gold/{split.id}/promote").status_code == 403
    with session_scope(engine) as s:
        promoted = s.get(Comparison, agreed.id)
        assert (promoted.gold, promoted.status) == ("b", "queued")
        assert s.get(Comparison, split.id).gold is None
        item = queue.next_item(
            s, user_id=s.exec(select(User).where(User.name == "a2")).one().id, gold_share=1
        )
        assert item.comparison_id == agreed.id and item.gold  # now served to everyone else as gold
