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
    client = connect(url, API_KEY)

    summary = push(engine, client, dataset_name="round-0", workspace="labeling")
    assert (summary.pushed, summary.skipped_k_way) == (4, 1)
    (ds,) = state["datasets"].values()
    assert ds["dataset"]["status"] == "ready"
    assert ds["dataset"]["distribution"] == {"strategy": "overlap", "min_submitted": 2}
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

    # Pushing again adds no duplicate records in Argilla.
    push(engine, client, dataset_name="round-0", workspace="labeling")
    assert len(ds["records"]) == len({r["external_id"] for r in ds["records"]})
