"""The Argilla adapter, with the real `argilla` client, against a local stand-in server.

Plainly: this is not a real Argilla server. One needs Elasticsearch/OpenSearch, which these machines cannot
run; `argilla_standin.py` replays the documented REST API that the client uses (see its docstring), and fails
loudly on any call it does not know.
"""

import pytest
from argilla_standin import make_standin
from conftest import serve_in_thread
from sqlmodel import Session, select
from test_queue import seed

from alignloop.core import crud
from alignloop.core.db import session_scope
from alignloop.core.models import Comparison, Vote
from annotate.argilla_sync import RECORD_PREFIX, connect, pull, push

API_KEY = "alignloop-test-key"


@pytest.fixture
def argilla_server():
    app, state = make_standin(API_KEY)
    with serve_in_thread(app) as url:
        yield url, state
    assert state["unhandled"] == [], (
        f"the client called endpoints the stand-in does not implement: {state['unhandled']}"
    )


@pytest.mark.parametrize("engine", ["sqlite"], indirect=True)
def test_push_then_pull_votes_idempotently(engine, argilla_server):
    url, state = argilla_server
    state["add_workspace"]("labeling")
    with session_scope(engine) as s:
        pairs = seed(s, 4, target_votes=2)
        seed(s, 1, num_items=3, prefix="kway")
        crud.save_guidelines(s, text="Prefer the honest answer.", round=0)
    client = connect(url, API_KEY)

    summary = push(engine, client, dataset_name="round-0", workspace="labeling")
    assert (summary.pushed, summary.pushed_rankings, summary.skipped_k_way) == (4, 1, 0)
    ds = state["find"]("round-0")
    assert ds["dataset"]["status"] == "ready"
    assert ds["dataset"]["distribution"] == {"strategy": "overlap", "min_submitted": 2}
    assert ds["dataset"]["guidelines"].startswith(
        "Prefer the honest answer.\n\n(alignloop guidelines version 1)"
    )
    assert [q["name"] for q in ds["questions"]] == ["preference"]
    assert [f["name"] for f in ds["fields"]] == ["conversation", "response_a", "response_b"]
    record = ds["records"][0]
    assert record["fields"]["conversation"] == [{"role": "user", "content": "q 0"}]
    order = [int(x) for x in record["metadata"]["shown_order"].split(",")]
    with Session(engine) as s:
        texts = [g.text for g in crud.comparison_generations(s, comparison_id=pairs[0].id)]
    assert record["fields"]["response_a"] == texts[order[0]]

    # Two annotators label in Argilla: alice prefers what Argilla shows as A, bob submits B; carol's is a draft.
    ds_id = ds["dataset"]["id"]
    alice, bob, carol = (state["add_annotator"](n) for n in ("alice", "bob", "carol"))
    ext = f"{RECORD_PREFIX}{pairs[0].id}"
    state["respond"](ds_id, ext, alice, "a")
    state["respond"](ds_id, ext, bob, "b")
    state["respond"](ds_id, ext, carol, "tie", status="draft")
    state["respond"](ds_id, f"{RECORD_PREFIX}{pairs[1].id}", alice, "both_bad")

    first = pull(engine, client, dataset_name="round-0", workspace="labeling")
    assert (first.pulled, first.already_present) == (3, 0)
    again = pull(engine, client, dataset_name="round-0", workspace="labeling")
    assert (again.pulled, again.already_present) == (0, 3)
    with Session(engine) as s:
        votes = {crud.get_user(s, name=n).id: n for n in ("argilla-alice", "argilla-bob")}
        rows = s.exec(select(Vote).where(Vote.comparison_id == pairs[0].id)).all()
        by_user = {votes[v.user_id]: v for v in rows}
        assert by_user["argilla-alice"].choice == "ab"[order[0]]  # "A" in Argilla is position order[0]
        assert by_user["argilla-bob"].choice == "ab"[order[1]]
        assert s.get(Comparison, pairs[0].id).status == "done"
        assert crud.get_user(s, name="argilla-carol") is None
        assert len(s.exec(select(Vote)).all()) == 3
        assert {v.guidelines_version for v in s.exec(select(Vote)).all()} == {1}

    # Pushing again adds no duplicate records in Argilla and re-sends none.
    again = push(engine, client, dataset_name="round-0", workspace="labeling")
    assert (again.pushed, again.already_pushed) == (0, 4)
    assert len(ds["records"]) == len({r["external_id"] for r in ds["records"]})


@pytest.mark.parametrize("engine", ["sqlite"], indirect=True)
def test_a_second_push_never_inverts_votes_already_given(engine, argilla_server):
    """The first comparison closes between two pushes; every later record already has a response. Each pulled
    vote must name the response its annotator saw as A when they answered."""
    url, state = argilla_server
    state["add_workspace"]("labeling")
    with session_scope(engine) as s:
        pairs = seed(s, 8)
        crud.create_user(s, name="inhouse", role="annotator")
    client = connect(url, API_KEY)
    push(engine, client, dataset_name="r", workspace="labeling")
    ds = state["find"]("r")
    alice = state["add_annotator"]("alice")
    seen_as_a = {}
    for p in pairs[1:]:
        ext = f"{RECORD_PREFIX}{p.id}"
        seen_as_a[p.id] = next(r for r in ds["records"] if r["external_id"] == ext)["fields"]["response_a"]
        state["respond"](ds["dataset"]["id"], ext, alice, "a")
    with session_scope(engine) as s:  # an in-house annotator closes the first comparison meanwhile
        crud.record_vote(
            s, comparison_id=pairs[0].id, user_id=crud.get_user(s, name="inhouse").id, choice="a"
        )
    push(engine, client, dataset_name="r", workspace="labeling")
    assert pull(engine, client, dataset_name="r", workspace="labeling").pulled == len(pairs) - 1
    with Session(engine) as s:
        user = crud.get_user(s, name="argilla-alice")
        for p in pairs[1:]:
            vote = s.exec(select(Vote).where(Vote.comparison_id == p.id, Vote.user_id == user.id)).one()
            texts = [g.text for g in crud.comparison_generations(s, comparison_id=p.id)]
            assert texts["ab".index(vote.choice)] == seen_as_a[p.id], f"vote on comparison {p.id} inverted"


@pytest.mark.parametrize("engine", ["sqlite"], indirect=True)
def test_rankings_go_to_argilla_as_a_ranking_question(engine, argilla_server):
    url, state = argilla_server
    state["add_workspace"]("labeling")
    with session_scope(engine) as s:
        (three,) = seed(s, 1, num_items=3, prefix="kway")
    client = connect(url, API_KEY)
    summary = push(engine, client, dataset_name="r", workspace="labeling")
    assert (summary.pushed, summary.pushed_rankings, summary.skipped_k_way) == (0, 1, 0)
    ds = state["find"]("r-rank3")
    (question,) = ds["questions"]
    assert question["name"] == "ranking" and question["settings"]["type"] == "ranking"
    assert [f["name"] for f in ds["fields"]] == ["conversation", "response_a", "response_b", "response_c"]
    (record,) = ds["records"]
    order = [int(x) for x in record["metadata"]["shown_order"].split(",")]
    bob = state["add_annotator"]("bob")
    state["respond"](ds["dataset"]["id"], record["external_id"], bob, ["c", "a", "b"], question="ranking")
    assert pull(engine, client, dataset_name="r", workspace="labeling").pulled == 1
    with Session(engine) as s:
        (vote,) = s.exec(select(Vote).where(Vote.comparison_id == three.id)).all()
        texts = [g.text for g in crud.comparison_generations(s, comparison_id=three.id)]
    assert vote.ranking == [order[2], order[0], order[1]]
    assert [texts[p] for p in vote.ranking] == [record["fields"][f"response_{x}"] for x in "cab"]
