"""The data store on SQLite and on a real PostgreSQL server: schema, crud rules, concurrency, export."""

import multiprocessing as mp
import threading

import pytest
from sqlalchemy import inspect, text
from sqlmodel import Session, select

from alignloop.core import AlignloopError, crud
from alignloop.core.db import create_schema, make_engine, schema_version, session_scope
from alignloop.core.models import SCHEMA_VERSION, Comparison, SchemaInfo, Vote


def make_comparison(
    session, *, num_items=2, target_votes=1, text_prefix="answer", prompt="Why is the sky blue?"
):
    (prompt_row,), _ = crud.add_prompts(
        session, prompts=[crud.PromptCreate(messages=[{"role": "user", "content": prompt}])], source="test"
    )
    version = crud.get_model_version(session, name="m") or crud.register_model(
        session, name="m", kind="policy", base="m"
    )
    gens = [
        crud.add_generation(
            session, prompt_id=prompt_row.id, model_version_id=version.id, text=f"{text_prefix} {i}"
        )
        for i in range(num_items)
    ]
    return crud.create_comparison(
        session, prompt_id=prompt_row.id, generation_ids=[g.id for g in gens], target_votes=target_votes
    )


def add_users(session, n, role="annotator"):
    return [crud.create_user(session, name=f"u{i}", role=role, password="correct horse") for i in range(n)]


# --- schema --------------------------------------------------------------------------------------------------


def test_schema_creation_is_idempotent_and_versioned(engine):
    assert create_schema(engine) == SCHEMA_VERSION
    assert create_schema(engine) == SCHEMA_VERSION
    assert schema_version(engine) == SCHEMA_VERSION
    tables = set(inspect(engine).get_table_names())
    assert {
        "user",
        "prompt",
        "generation",
        "comparison",
        "comparisonitem",
        "vote",
        "lease",
        "run",
        "round",
    } <= tables
    with Session(engine) as s:
        assert len(s.exec(select(SchemaInfo)).all()) == 1


def test_newer_schema_is_refused(engine):
    with Session(engine) as s:
        info = s.get(SchemaInfo, 1)
        info.version = SCHEMA_VERSION + 1
        s.add(info)
        s.commit()
    with pytest.raises(AlignloopError, match="newer than this alignloop"):
        create_schema(engine)


def test_sqlite_runs_in_wal_mode_with_busy_timeout(tmp_path):
    eng = make_engine(f"sqlite:///{tmp_path / 'x.db'}")
    with eng.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("PRAGMA busy_timeout")).scalar() >= 1  # plus polling in BEGIN IMMEDIATE
        assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1


# --- users, prompts, models ----------------------------------------------------------------------------------


def test_users_hash_passwords_and_authenticate(session):
    user = crud.create_user(session, name="ann", role="annotator", password="s3cret-pass")
    assert user.password_hash.startswith("$argon2id$")
    assert crud.authenticate(session, name="ann", password="s3cret-pass").id == user.id
    assert crud.authenticate(session, name="ann", password="wrong") is None
    assert crud.authenticate(session, name="nobody", password="s3cret-pass") is None
    user.disabled = True
    session.add(user)
    assert crud.authenticate(session, name="ann", password="s3cret-pass") is None
    with pytest.raises(AlignloopError, match="already exists"):
        crud.create_user(session, name="ann", role="annotator")
    with pytest.raises(AlignloopError, match="role must be"):
        crud.create_user(session, name="bob", role="root")


def test_prompts_are_deduplicated_by_content(session):
    p = lambda text: crud.PromptCreate(messages=[{"role": "user", "content": text}])  # noqa: E731
    added, dups = crud.add_prompts(session, prompts=[p("a"), p("b"), p("a")], source="one")
    assert (len(added), dups) == (2, 1)
    added, dups = crud.add_prompts(session, prompts=[p("b"), p("c")], source="two")
    assert (len(added), dups) == (1, 1)
    assert crud.count_prompts(session) == 3


def test_model_lineage_is_queryable(session):
    run = crud.create_run(session, kind="rl", config={"algo": "ppo"})
    base = crud.register_model(session, name="base", kind="policy", base="default", licence="apache-2.0")
    r1 = crud.register_model(
        session, name="r1", kind="policy", base="default", parent_id=base.id, round=1, run_id=run.id
    )
    r2 = crud.register_model(session, name="r2", kind="policy", base="default", parent_id=r1.id, round=2)
    assert [m.name for m in crud.model_lineage(session, model_id=r2.id)] == ["r2", "r1", "base"]
    assert run.output_model_id == r1.id
    with pytest.raises(AlignloopError, match="already registered"):
        crud.register_model(session, name="r1", kind="policy", base="x")
    with pytest.raises(AlignloopError, match="parent model version"):
        crud.register_model(session, name="r3", kind="policy", base="x", parent_id=999)


def test_comparison_validation(session):
    comparison = make_comparison(session)
    other = make_comparison(session, prompt="Another prompt")
    items = crud.comparison_generations(session, comparison_id=comparison.id)
    other_items = crud.comparison_generations(session, comparison_id=other.id)
    with pytest.raises(AlignloopError, match="at least two"):
        crud.create_comparison(session, prompt_id=comparison.prompt_id, generation_ids=[items[0].id])
    with pytest.raises(AlignloopError, match="must answer the comparison's prompt"):
        crud.create_comparison(
            session, prompt_id=comparison.prompt_id, generation_ids=[items[0].id, other_items[0].id]
        )
    with pytest.raises(AlignloopError, match="does not exist"):
        crud.create_comparison(session, prompt_id=comparison.prompt_id, generation_ids=[items[0].id, 12345])


# --- votes ---------------------------------------------------------------------------------------------------


def test_vote_rules(session):
    (ann, bob) = add_users(session, 2)
    comparison = make_comparison(session, target_votes=1)
    with pytest.raises(AlignloopError, match="choice must be one of"):
        crud.record_vote(session, comparison_id=comparison.id, user_id=ann.id, choice="c")
    with pytest.raises(AlignloopError, match="either a choice or a ranking"):
        crud.record_vote(session, comparison_id=comparison.id, user_id=ann.id)
    with pytest.raises(AlignloopError, match="shown_order"):
        crud.record_vote(session, comparison_id=comparison.id, user_id=ann.id, choice="a", shown_order=[0, 0])
    vote = crud.record_vote(
        session, comparison_id=comparison.id, user_id=ann.id, choice="b", shown_order=[1, 0]
    )
    assert vote.shown_order == [1, 0]
    session.refresh(comparison)
    assert (comparison.num_votes, comparison.status) == (1, "done")
    with pytest.raises(crud.ComparisonClosedError):
        crud.record_vote(session, comparison_id=comparison.id, user_id=bob.id, choice="a")
    # The failed attempts left the session usable and wrote nothing.
    assert len(session.exec(select(Vote)).all()) == 1


def test_k_way_comparisons_take_rankings(session):
    (ann,) = add_users(session, 1)
    comparison = make_comparison(session, num_items=4)
    with pytest.raises(AlignloopError, match="takes a ranking"):
        crud.record_vote(session, comparison_id=comparison.id, user_id=ann.id, choice="a")
    with pytest.raises(AlignloopError, match="must order all 4"):
        crud.record_vote(session, comparison_id=comparison.id, user_id=ann.id, ranking=[0, 1, 2])
    crud.record_vote(session, comparison_id=comparison.id, user_id=ann.id, ranking=[2, 0, 3, 1])
    pairs = crud.preference_pairs(session)
    assert len(pairs) == 6  # K(K-1)/2
    assert pairs[0]["chosen"][0]["content"] == "answer 2" and pairs[0]["rejected"][0]["content"] == "answer 0"


def test_one_vote_per_user_is_a_constraint(session):
    (ann,) = add_users(session, 1)
    comparison = make_comparison(session, target_votes=3)
    crud.record_vote(session, comparison_id=comparison.id, user_id=ann.id, choice="a")
    with pytest.raises(crud.DuplicateVoteError):
        crud.record_vote(session, comparison_id=comparison.id, user_id=ann.id, choice="b")
    session.refresh(comparison)
    assert comparison.num_votes == 1


def _vote_in_threads(engine, comparison_id, user_ids):
    outcomes, lock, barrier = [], threading.Lock(), threading.Barrier(len(user_ids))

    def work(user_id):
        barrier.wait()
        try:
            with session_scope(engine) as s:
                crud.record_vote(s, comparison_id=comparison_id, user_id=user_id, choice="a")
            result = "ok"
        except crud.ComparisonClosedError:
            result = "closed"
        except crud.DuplicateVoteError:
            result = "duplicate"
        with lock:
            outcomes.append(result)

    threads = [threading.Thread(target=work, args=(u,)) for u in user_ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outcomes


def test_concurrent_votes_never_exceed_target(engine):
    with session_scope(engine) as s:
        users = [u.id for u in add_users(s, 12)]
        comparison_id = make_comparison(s, target_votes=3).id
    outcomes = _vote_in_threads(engine, comparison_id, users)
    assert sorted(outcomes) == ["closed"] * 9 + ["ok"] * 3
    with Session(engine) as s:
        comparison = s.get(Comparison, comparison_id)
        assert (comparison.num_votes, comparison.status) == (3, "done")
        assert len(s.exec(select(Vote).where(Vote.comparison_id == comparison_id)).all()) == 3


def test_concurrent_duplicate_votes_count_once(engine):
    with session_scope(engine) as s:
        (user,) = add_users(s, 1)
        comparison_id = make_comparison(s, target_votes=5).id
    outcomes = _vote_in_threads(engine, comparison_id, [user.id] * 8)
    assert sorted(outcomes) == ["duplicate"] * 7 + ["ok"]
    with Session(engine) as s:
        assert s.get(Comparison, comparison_id).num_votes == 1


def _vote_process(url, comparison_ids, user_id, queue):
    engine = make_engine(url)
    results = []
    for comparison_id in comparison_ids:
        try:
            with session_scope(engine) as s:
                crud.record_vote(s, comparison_id=comparison_id, user_id=user_id, choice="b")
            results.append("ok")
        except crud.ComparisonClosedError:
            results.append("closed")
    queue.put(results)


def test_concurrent_votes_from_processes(engine):
    """Several OS processes (as with several web workers) voting on the same items at once."""
    with session_scope(engine) as s:
        users = [u.id for u in add_users(s, 4)]
        ids = [make_comparison(s, target_votes=2, prompt=f"prompt {i}").id for i in range(10)]
    url = engine.url.render_as_string(hide_password=False)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_vote_process, args=(url, ids, u, queue)) for u in users]
    for p in procs:
        p.start()
    results = [r for _ in procs for r in queue.get(timeout=120)]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert results.count("ok") == 2 * len(ids)  # every item got exactly its two votes
    with Session(engine) as s:
        for c in s.exec(select(Comparison)).all():
            assert (c.num_votes, c.status) == (2, "done")


# --- export --------------------------------------------------------------------------------------------------


def test_preference_pairs_take_the_majority(session):
    users = add_users(session, 3)
    majority_b = make_comparison(session, target_votes=3, prompt="p1")
    split = make_comparison(session, target_votes=2, prompt="p2")
    tie = make_comparison(session, target_votes=1, prompt="p3")
    for user, choice in zip(users, ["b", "b", "a"], strict=True):
        crud.record_vote(session, comparison_id=majority_b.id, user_id=user.id, choice=choice)
    crud.record_vote(session, comparison_id=split.id, user_id=users[0].id, choice="a")
    crud.record_vote(session, comparison_id=split.id, user_id=users[1].id, choice="b")
    crud.record_vote(session, comparison_id=tie.id, user_id=users[0].id, choice="tie")

    pairs = crud.preference_pairs(session)
    assert len(pairs) == 1
    pair = pairs[0]
    assert pair["prompt"] == [{"role": "user", "content": "p1"}]
    assert pair["chosen"] == [{"role": "assistant", "content": "answer 1"}]
    assert pair["rejected"] == [{"role": "assistant", "content": "answer 0"}]
    assert pair["agreement"] == pytest.approx(2 / 3)
    with_ties = crud.preference_pairs(session, include_ties=True)
    assert [p["outcome"] for p in with_ties] == ["preferred", "tie"]
    assert len(crud.preference_pairs(session, exclude_user_ids=[users[0].id, users[1].id])) == 1
    raw = crud.raw_votes(session)
    assert len(raw) == 6 and {r["annotator"] for r in raw} == {"u0", "u1", "u2"}


def test_a_version_1_database_is_migrated(engine):
    """A workspace made before the annotation columns existed is upgraded in place, data kept."""
    with session_scope(engine) as s:
        make_comparison(s)
    with engine.begin() as conn:  # back to the version-1 shape: its queue index, no annotation columns
        conn.execute(text("DROP INDEX ix_comparison_queue_order"))
        conn.execute(text("CREATE INDEX ix_comparison_queue ON comparison (status, priority, id)"))
        conn.execute(text('ALTER TABLE "user" DROP COLUMN votes_excluded'))
        conn.execute(text("ALTER TABLE comparison DROP COLUMN reward_margin"))
        conn.execute(text("ALTER TABLE lease DROP COLUMN skipped"))
        conn.execute(text("UPDATE schemainfo SET version = 1"))
    assert create_schema(engine) == SCHEMA_VERSION == schema_version(engine)
    columns = {c["name"] for c in inspect(engine).get_columns("comparison")}
    assert "reward_margin" in columns
    catalogue = (  # the inspector does not reflect expression indexes on SQLite
        "SELECT name FROM sqlite_master WHERE type = 'index'"
        if engine.dialect.name == "sqlite"
        else "SELECT indexname FROM pg_indexes WHERE tablename = 'comparison'"
    )
    with engine.connect() as conn:
        indexes = {row[0] for row in conn.execute(text(catalogue))}
    assert "ix_comparison_queue_order" in indexes and "ix_comparison_queue" not in indexes
    with Session(engine) as s:
        assert len(s.exec(select(Comparison)).all()) == 1
        assert crud.create_user(s, name="after", role="annotator").votes_excluded is False
