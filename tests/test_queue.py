"""Assignment under concurrency: no repeats, never past target, leases expire, the documented order."""

import multiprocessing as mp
import threading
from datetime import timedelta

import numpy as np
import pytest
from sqlmodel import Session, select

from alignloop.core import AlignloopError, crud
from alignloop.core.db import make_engine, session_scope
from alignloop.core.models import Comparison, Lease, Vote, utcnow
from annotate import queue


def seed(session, n, *, target_votes=1, gold=None, priority=0, num_items=2, prefix="q"):
    version = crud.get_model_version(session, name="m") or crud.register_model(
        session, name="m", kind="policy", base="m"
    )
    out = []
    for i in range(n):
        (p,), _ = crud.add_prompts(
            session,
            prompts=[crud.PromptCreate(messages=[{"role": "user", "content": f"{prefix} {i}"}])],
            source="t",
        )
        gens = [
            crud.add_generation(session, prompt_id=p.id, model_version_id=version.id, text=f"{prefix}{i}-{k}")
            for k in range(num_items)
        ]
        out.append(
            crud.create_comparison(
                session,
                prompt_id=p.id,
                generation_ids=[g.id for g in gens],
                target_votes=target_votes,
                gold=gold,
                priority=priority,
            )
        )
    session.flush()
    return out


def users(session, n):
    return [crud.create_user(session, name=f"a{i}", role="annotator", password="pass-word") for i in range(n)]


def test_reload_returns_the_same_item_and_order_is_stable(session):
    (ann,) = users(session, 1)
    seed(session, 3)
    first = queue.next_item(session, user_id=ann.id)
    again = queue.next_item(session, user_id=ann.id)
    assert first.comparison_id == again.comparison_id and first.shown_order == again.shown_order
    assert first.responses == again.responses and first.labels == ["A", "B"]


def test_never_the_same_item_twice_and_never_past_target(session):
    a, b, c = users(session, 3)
    (only,) = seed(session, 1, target_votes=2)
    item_a = queue.next_item(session, user_id=a.id)
    item_b = queue.next_item(session, user_id=b.id)
    assert item_a.comparison_id == item_b.comparison_id == only.id
    assert queue.next_item(session, user_id=c.id) is None  # two live leases fill the target of 2
    queue.submit_vote(session, user_id=a.id, comparison_id=only.id, choice="a")
    assert queue.next_item(session, user_id=a.id) is None  # voted: never again
    assert queue.next_item(session, user_id=c.id) is None  # b still holds the second slot


def test_expired_leases_return_items_to_the_pool(session):
    a, b = users(session, 2)
    (only,) = seed(session, 1)
    now = utcnow()
    assert queue.next_item(session, user_id=a.id, now=now, lease_seconds=60).comparison_id == only.id
    assert queue.next_item(session, user_id=b.id, now=now + timedelta(seconds=30)) is None
    later = queue.next_item(session, user_id=b.id, now=now + timedelta(seconds=61))
    assert later.comparison_id == only.id
    # a's vote still counts if it lands first; then b's is refused rather than exceeding the target.
    queue.submit_vote(session, user_id=a.id, comparison_id=only.id, choice="b")
    with pytest.raises(crud.ComparisonClosedError):
        queue.submit_vote(session, user_id=b.id, comparison_id=only.id, choice="a")


def test_skip_frees_the_slot_and_never_comes_back(session):
    a, b = users(session, 2)
    (only,) = seed(session, 1)
    queue.next_item(session, user_id=a.id)
    queue.skip(session, user_id=a.id, comparison_id=only.id)
    assert queue.next_item(session, user_id=a.id) is None
    assert queue.next_item(session, user_id=b.id).comparison_id == only.id


def test_order_priority_then_uncertainty_then_oldest(session):
    (ann,) = users(session, 1)
    old, scored_sure, scored_unsure = seed(session, 3, prefix="plain")
    (urgent,) = seed(session, 1, priority=5, prefix="urgent")
    scored_sure.reward_margin, scored_unsure.reward_margin = 2.5, 0.1
    session.add_all([scored_sure, scored_unsure])
    session.flush()
    seen = []
    while (item := queue.next_item(session, user_id=ann.id, gold_share=0)) is not None:
        seen.append(item.comparison_id)
        queue.submit_vote(session, user_id=ann.id, comparison_id=item.comparison_id, choice="tie")
    assert seen == [urgent.id, scored_unsure.id, scored_sure.id, old.id]


def test_ensemble_keys_put_the_most_disputed_first(session):
    """An ensemble stores minus its disagreement (reward.score.queue_keys): negative keys, largest spread first."""
    from reward.score import queue_keys

    (ann,) = users(session, 1)
    calm, disputed, unscored = seed(session, 3, prefix="e")
    members = np.array([[1.0, 2.0], [1.1, -2.0], [0.9, 0.5]])  # two pairs, three members' r_a - r_b
    calm.reward_margin, disputed.reward_margin = map(float, queue_keys(members, np.zeros_like(members)))
    session.add_all([calm, disputed])
    session.flush()
    served = []
    while (item := queue.next_item(session, user_id=ann.id, gold_share=0)) is not None:
        served.append(item.comparison_id)
        queue.submit_vote(session, user_id=ann.id, comparison_id=item.comparison_id, choice="tie")
    assert served == [disputed.id, calm.id, unscored.id]


def test_gold_share_and_gold_items_for_everyone(session):
    a, b = users(session, 2)
    seed(session, 40, prefix="n")
    golds = seed(session, 3, gold="a", prefix="g")
    gold_ids = {g.id for g in golds}
    served = []
    while (item := queue.next_item(session, user_id=a.id, gold_share=0.1)) is not None:
        served.append(item.comparison_id in gold_ids)
        queue.submit_vote(session, user_id=a.id, comparison_id=item.comparison_id, choice="a")
    assert sum(served) == 3 and served[9] and served[19] and served[29]  # every 10th item while gold lasts
    # Gold items stay open for the next annotator.
    assert queue.next_item(session, user_id=b.id, gold_share=1.0).comparison_id in gold_ids


def test_votes_are_given_in_shown_terms_and_stored_by_position(session):
    (ann,) = users(session, 1)
    seed(session, 12)
    for _ in range(12):
        item = queue.next_item(session, user_id=ann.id, gold_share=0)
        shown_first_position = item.shown_order[0]
        queue.submit_vote(
            session,
            user_id=ann.id,
            comparison_id=item.comparison_id,
            choice="a",
            ratings={"A": {"helpfulness": 5}},
            rationale="first one",
        )
        vote = session.exec(select(Vote).where(Vote.comparison_id == item.comparison_id)).one()
        assert vote.choice == "ab"[shown_first_position]
        assert vote.shown_order == item.shown_order
        assert vote.ratings == {str(shown_first_position): {"helpfulness": 5}}
    orders = {tuple(v.shown_order) for v in session.exec(select(Vote)).all()}
    assert orders == {(0, 1), (1, 0)}  # sides really are randomised
    assert session.exec(select(Lease)).all() == []  # voting released the leases


def test_rankings_and_bad_votes(session):
    (ann,) = users(session, 1)
    (c,) = seed(session, 1, num_items=3)
    item = queue.next_item(session, user_id=ann.id)
    with pytest.raises(AlignloopError, match="unknown response label"):
        queue.submit_vote(session, user_id=ann.id, comparison_id=c.id, ranking_labels=["A", "B", "Z"])
    with pytest.raises(AlignloopError, match="ratings must map"):
        queue.submit_vote(
            session,
            user_id=ann.id,
            comparison_id=c.id,
            ranking_labels=["A", "B", "C"],
            ratings={"A": {"x": 9}},
        )
    queue.submit_vote(session, user_id=ann.id, comparison_id=c.id, ranking_labels=["C", "A", "B"])
    vote = session.exec(select(Vote)).one()
    assert vote.ranking == [item.shown_order[2], item.shown_order[0], item.shown_order[1]]


def test_progress(session):
    (ann,) = users(session, 1)
    seed(session, 4)
    for _ in range(3):
        item = queue.next_item(session, user_id=ann.id)
        queue.submit_vote(session, user_id=ann.id, comparison_id=item.comparison_id, choice="a")
    p = queue.progress(session, user_id=ann.id)
    assert (p.done_today, p.done_in_round, p.left, p.round) == (3, 3, 1, 0)


# --- concurrency ---------------------------------------------------------------------------------------------


def annotate_until_empty(engine, user_id, results, errors):
    try:
        while True:
            with session_scope(engine) as s:
                item = queue.next_item(s, user_id=user_id, gold_share=0)
            if item is None:
                return
            with session_scope(engine) as s:
                queue.submit_vote(s, user_id=user_id, comparison_id=item.comparison_id, choice="a")
            results.append((user_id, item.comparison_id))
    except Exception as exc:  # noqa: BLE001 - collected and asserted on below
        errors.append(repr(exc))


def check_final_state(engine, num_comparisons, target):
    with Session(engine) as s:
        comparisons = s.exec(select(Comparison)).all()
        assert len(comparisons) == num_comparisons
        assert all(c.num_votes == target and c.status == "done" for c in comparisons)
        votes = s.exec(select(Vote)).all()
        assert len(votes) == num_comparisons * target
        assert len({(v.comparison_id, v.user_id) for v in votes}) == len(votes)


def test_many_threads_annotate_without_overbooking(engine):
    with session_scope(engine) as s:
        ids = [u.id for u in users(s, 8)]
        seed(s, 30, target_votes=3)
    results, errors = [], []
    threads = [threading.Thread(target=annotate_until_empty, args=(engine, u, results, errors)) for u in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert errors == []  # in particular, no vote was refused: leases never handed out a full item
    assert len(results) == 90
    check_final_state(engine, 30, 3)


def _process_worker(url, user_id, queue_out):
    engine = make_engine(url)
    results, errors = [], []
    annotate_until_empty(engine, user_id, results, errors)
    queue_out.put((results, errors))


def test_many_processes_annotate_without_overbooking(engine):
    with session_scope(engine) as s:
        ids = [u.id for u in users(s, 4)]
        seed(s, 20, target_votes=2)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    url = engine.url.render_as_string(hide_password=False)
    procs = [ctx.Process(target=_process_worker, args=(url, u, out)) for u in ids]
    for p in procs:
        p.start()
    collected = [out.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert [e for _, errors in collected for e in errors] == []
    assert sum(len(r) for r, _ in collected) == 40
    check_final_state(engine, 20, 2)


def test_concurrent_claims_respect_target(engine):
    """Many annotators ask at the same instant for a pool smaller than their number."""
    with session_scope(engine) as s:
        ids = [u.id for u in users(s, 12)]
        seed(s, 3, target_votes=2)
    barrier, got, lock = threading.Barrier(len(ids)), [], threading.Lock()

    def claim(user_id):
        barrier.wait()
        with session_scope(engine) as s:
            item = queue.next_item(s, user_id=user_id)
        with lock:
            got.append(item.comparison_id if item else None)

    threads = [threading.Thread(target=claim, args=(u,)) for u in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    handed = [g for g in got if g is not None]
    assert len(handed) == 6 and all(handed.count(c) == 2 for c in set(handed))
