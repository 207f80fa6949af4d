"""Assignment: which comparison an annotator gets next, under any number of concurrent annotators.

Rules (each one tested with concurrent threads and processes on SQLite and PostgreSQL):
- an annotator never gets a comparison they voted on or skipped;
- a comparison is never handed out beyond its target: votes plus unexpired leases held by others stay at or
  under `target_votes` (gold items are the exception: every annotator answers each one once);
- leases expire (default 10 minutes), so an abandoned item returns to the pool;
- order: a gold item when the annotator's gold share is due (default 5% of their items), then priority, then
  reward-model uncertainty (`reward.score.queue_keys`: smallest |r_a - r_b| first; for an ensemble reward model,
  the members' largest disagreement) when a reward model has scored the item, then oldest.

Votes (the same rules for the page, the JSON API and the judge, all through `submit_vote`):
- a vote needs the voter's live lease on that comparison, or a gold item they were assigned: nobody chooses
  what they label by sending an id, and nobody votes on an item leased to someone else;
- the time a vote took is measured by the server, from the moment the lease was first granted (`leased_at`,
  kept across reloads) to the vote; nothing the client sends changes it;
- ratings accept only the workspace's configured aspect names, with int values 1..5 (not bools or floats),
  for the labels the item has, so a row stays small whatever a client posts.
AI judges (users of kind "ai") take `next_ai_item`, not `next_item`: they fill the comparison's own AI slots
(`target_ai_votes`, a per-round setting), never a person's, and may answer items people have finished, so
that AI-human agreement can be measured. They get gold items at the same share as people. They take no
lease: judges are few, and the vote's conditional UPDATE (crud.record_vote) still stops a slot being filled
twice; the cost is that two judges racing for one slot waste one verdict.

How the "never beyond target" rule holds: a claim locks the candidate comparison row (PostgreSQL
`FOR UPDATE SKIP LOCKED`; SQLite serialises write transactions with `BEGIN IMMEDIATE`), then counts votes and
live leases in a fresh statement, which sees every claim committed before the lock was granted.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import and_, bindparam, delete, exists, func, or_, text
from sqlmodel import Session, col, select

from alignloop.core import AlignloopError, crud
from alignloop.core.config import Settings
from alignloop.core.models import (
    UNSCORED,
    Comparison,
    ComparisonItem,
    Generation,
    Lease,
    Prompt,
    User,
    Vote,
    utcnow,
)

LEASE_SECONDS = 600
GOLD_SHARE = 0.05
DEFAULT_ASPECTS = tuple(Settings().aspects)
RATING_RANGE = range(1, 6)
CANDIDATES_PER_CLAIM = 8
CLAIM_ATTEMPTS = 50
LABELS = "ABCDEFGHIJ"


class NotLeasedError(AlignloopError):
    """A vote on a comparison the voter does not hold a live lease on."""


@dataclass
class Item:
    """A comparison as one annotator sees it: responses in their shown order, labelled A, B, ..."""

    comparison_id: int
    round: int
    prompt: list[dict]
    responses: list[str]  # in shown order
    shown_order: list[int]  # shown_order[i] = position (0 = "a") of the i-th response shown
    expires_at: datetime
    gold: bool

    @property
    def labels(self) -> list[str]:
        return list(LABELS[: len(self.responses)])


@dataclass
class Progress:
    done_today: int
    done_in_round: int
    left: int  # items this annotator could still be given
    round: int | None


def shown_order_for(*, user_id: int, comparison_id: int, num_items: int) -> list[int]:
    """The order one annotator sees a comparison's responses in: random, but the same on every reload."""
    order = list(range(num_items))
    random.Random(f"alignloop-order:{user_id}:{comparison_id}").shuffle(order)
    return order


def _as_utc(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


# The hot statements are built once, with bind parameters: building SQLAlchemy expressions per request cost
# more CPU than running them (measured under the annotation load test).
_USER, _NOW = bindparam("user_id"), bindparam("now")
_LIVE_LEASE = and_(Lease.expires_at > _NOW, col(Lease.skipped).is_(False))
_VOTED = exists().where(Vote.comparison_id == Comparison.id, Vote.user_id == _USER)
_SKIPPED = exists().where(Lease.comparison_id == Comparison.id, Lease.user_id == _USER, col(Lease.skipped))
_HELD_BY_OTHERS = (
    select(func.count())
    .select_from(Lease)
    .where(Lease.comparison_id == Comparison.id, Lease.user_id != _USER, _LIVE_LEASE)
    .scalar_subquery()
)
# Comparisons a user may be given now (params user_id, now): a fast pre-filter; the claim re-checks.
AVAILABLE = and_(
    Comparison.status == "queued",
    ~_VOTED,
    ~_SKIPPED,
    or_(col(Comparison.gold).is_not(None), Comparison.num_votes + _HELD_BY_OTHERS < Comparison.target_votes),
)
# Matches the index ix_comparison_queue_order exactly; unscored items sort after every scored one.
_QUEUE_ORDER = (text("priority DESC"), text(f"coalesce(reward_margin, {UNSCORED})"), Comparison.id)
_HELD_LEASE = (
    select(Lease, Comparison)
    .join(Comparison, Comparison.id == Lease.comparison_id)
    .where(Lease.user_id == _USER, _LIVE_LEASE, Comparison.status == "queued", ~_VOTED)
    .order_by(Lease.expires_at.desc())
    .limit(1)
)
_VOTES_BY_USER = select(func.count()).select_from(Vote).where(Vote.user_id == _USER)
_CLAIM_COUNT = (
    select(func.count())
    .select_from(Lease)
    .where(Lease.comparison_id == bindparam("comparison_id"), Lease.user_id != _USER, _LIVE_LEASE)
)
_ITEM_ROWS = (
    select(ComparisonItem.position, Generation.text, Prompt.messages)
    .join(Generation, Generation.id == ComparisonItem.generation_id)
    .join(Prompt, Prompt.id == Generation.prompt_id)
    .where(ComparisonItem.comparison_id == bindparam("comparison_id"))
    .order_by(ComparisonItem.position)
)
_NUM_ITEMS = (
    select(func.count())
    .select_from(ComparisonItem)
    .where(ComparisonItem.comparison_id == bindparam("comparison_id"))
)
# The voter's own lease (live or not; not skipped) and whether the item is gold.
_VOTER_LEASE = (
    select(Lease, Comparison.gold)
    .join(Comparison, Comparison.id == Lease.comparison_id)
    .where(
        Lease.comparison_id == bindparam("comparison_id"),
        Lease.user_id == _USER,
        col(Lease.skipped).is_(False),
    )
)
_RELEASE = delete(Lease).where(Lease.comparison_id == bindparam("comparison_id"), Lease.user_id == _USER)


def _candidates(*, gold: bool, by_round: bool):
    query = select(Comparison).where(AVAILABLE)
    query = query.where(col(Comparison.gold).is_not(None) if gold else col(Comparison.gold).is_(None))
    if by_round:
        query = query.where(Comparison.round == bindparam("round"))
    return query.order_by(*_QUEUE_ORDER).limit(CANDIDATES_PER_CLAIM).with_for_update(skip_locked=True)


# How many comparisons a user may be given now: for progress, and to tell "nothing left" from "all locked".
_NUM_AVAILABLE = {
    0: select(func.count()).select_from(Comparison).where(AVAILABLE),
    1: select(func.count()).select_from(Comparison).where(AVAILABLE, Comparison.round == bindparam("round")),
}
_CANDIDATES = {
    (gold, by_round): _candidates(gold=gold, by_round=by_round) for gold in (0, 1) for by_round in (0, 1)
}


def _lease_upsert(dialect: str):
    """INSERT a lease, or renew this user's expired one on the same item, in one statement."""
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    statement = insert(Lease).values(
        comparison_id=bindparam("comparison_id"),
        user_id=_USER,
        expires_at=bindparam("expires_at"),
        skipped=False,
        leased_at=_NOW,
    )
    return statement.on_conflict_do_update(
        index_elements=["comparison_id", "user_id"],
        set_={"expires_at": statement.excluded.expires_at, "skipped": False, "leased_at": _NOW},
    )


_LEASE_UPSERT = {dialect: _lease_upsert(dialect) for dialect in ("sqlite", "postgresql")}


def _gold_turn(session: Session, user_id: int, gold_share: float) -> bool:
    """True when serving a gold item now keeps this annotator's gold share at `gold_share` (deterministic)."""
    if gold_share <= 0:
        return False
    n = session.exec(_VOTES_BY_USER, params={"user_id": user_id}).one()
    return math.floor((n + 1) * gold_share) > math.floor(n * gold_share)


def queue_options(settings) -> dict:
    """The workspace's queue settings as `next_item` keyword arguments."""
    return {"lease_seconds": int(settings.lease_minutes * 60), "gold_share": settings.gold_share}


def vote_options(settings) -> dict:
    """The workspace's vote settings as `submit_vote` keyword arguments."""
    return {"aspects": tuple(settings.aspects)}


def next_item(
    session: Session,
    *,
    user_id: int,
    lease_seconds: int = LEASE_SECONDS,
    gold_share: float = GOLD_SHARE,
    round: int | None = None,
    now: datetime | None = None,
) -> Item | None:
    """Lease the next comparison to this annotator and return it, or None when nothing is left for them.

    An annotator who already holds a live lease gets that item back (a page reload must not burn items).
    The caller commits; the lease is part of the caller's transaction.
    """
    now = now or utcnow()
    params = {"user_id": user_id, "now": now, "round": round}
    held = session.exec(_HELD_LEASE, params=params).first()
    if held is not None:
        lease, comparison = held
        lease.expires_at = now + timedelta(seconds=lease_seconds)
        session.add(lease)
        session.flush()
        return _item(session, comparison, user_id=user_id, expires_at=lease.expires_at)

    by_round = int(round is not None)
    queries = [_CANDIDATES[(0, by_round)]]
    queries.insert(0 if _gold_turn(session, user_id, gold_share) else 1, _CANDIDATES[(1, by_round)])
    # On PostgreSQL each attempt runs in a savepoint: rolling it back releases the row locks the attempt took,
    # so an annotator who found every candidate locked does not sit on locks while waiting to retry. SQLite
    # has no row locks (write transactions are serialised), so it needs neither savepoint nor retry.
    postgres = session.get_bind().dialect.name == "postgresql"
    expires_at = now + timedelta(seconds=lease_seconds)
    for attempt in range(CLAIM_ATTEMPTS if postgres else 1):
        savepoint = session.begin_nested() if postgres else None
        for query in queries:
            for comparison in session.exec(query, params=params).all():
                if _claim(session, comparison, user_id=user_id, now=now, expires_at=expires_at):
                    if savepoint is not None:
                        savepoint.commit()
                    return _item(session, comparison, user_id=user_id, expires_at=expires_at)
        if savepoint is None:
            return None
        savepoint.rollback()
        # Nothing claimed: either nothing is left, or everything left was locked by concurrent claims.
        if session.exec(_NUM_AVAILABLE[by_round], params=params).one() == 0:
            return None
        time.sleep(0.005 * (attempt + 1))
    return None


def next_ai_item(
    session: Session,
    *,
    user_id: int,
    gold_share: float = GOLD_SHARE,
    round: int | None = None,
    now: datetime | None = None,
) -> Item | None:
    """The next comparison for an AI judge: one with a free AI slot (or gold) it has not answered."""
    now = now or utcnow()
    open_slot = or_(col(Comparison.gold).is_not(None), Comparison.num_ai_votes < Comparison.target_ai_votes)
    query = select(Comparison).where(Comparison.status != "cancelled", ~_VOTED, ~_SKIPPED, open_slot)
    if round is not None:
        query = query.where(Comparison.round == round)
    gold_first = _gold_turn(session, user_id, gold_share)
    for gold in (gold_first, not gold_first):
        gold_filter = col(Comparison.gold).is_not(None) if gold else col(Comparison.gold).is_(None)
        comparison = session.exec(
            query.where(gold_filter).order_by(*_QUEUE_ORDER).limit(1), params={"user_id": user_id}
        ).first()
        if comparison is not None:
            return _item(session, comparison, user_id=user_id, expires_at=now)
    return None


def _claim(
    session: Session, comparison: Comparison, *, user_id: int, now: datetime, expires_at: datetime
) -> bool:
    """Lease the locked comparison to this user if it still has room, counted afresh under the lock."""
    params = {"comparison_id": comparison.id, "user_id": user_id, "now": now, "expires_at": expires_at}
    if comparison.gold is None:
        held = session.exec(_CLAIM_COUNT, params=params).one()
        if comparison.num_votes + held >= comparison.target_votes:
            return False
    session.connection().execute(_LEASE_UPSERT[session.get_bind().dialect.name], params)
    return True


def _item(session: Session, comparison: Comparison, *, user_id: int, expires_at: datetime) -> Item:
    rows = session.exec(_ITEM_ROWS, params={"comparison_id": comparison.id}).all()
    texts = [text for _, text, _ in rows]
    order = shown_order_for(user_id=user_id, comparison_id=comparison.id, num_items=len(texts))
    return Item(
        comparison_id=comparison.id,
        round=comparison.round,
        prompt=rows[0][2],
        responses=[texts[pos] for pos in order],
        shown_order=order,
        expires_at=_as_utc(expires_at),
        gold=comparison.gold is not None,
    )


def submit_vote(
    session: Session,
    *,
    user_id: int,
    comparison_id: int,
    choice: str | None = None,
    ranking_labels: list[str] | None = None,
    ratings: dict | None = None,
    rationale: str = "",
    aspects: Sequence[str] = DEFAULT_ASPECTS,
    now: datetime | None = None,
) -> int:
    """Record a vote given in terms of what the annotator saw, and release their lease. Returns the vote id.

    `choice` is "a"/"b" for the first/second response *as shown* (or "tie"/"both_bad"); `ranking_labels` lists
    shown labels best first ("C", "A", "B"). Both are mapped to stored positions with the annotator's shown
    order, which the server derives itself, so position-bias statistics cannot be spoofed by a client.
    `ratings` maps shown labels to {aspect: 1..5}, aspects from `aspects` only. The voter must hold a live
    lease on the comparison (or an assigned gold item); the vote's `seconds` run from the lease's start.
    """
    now = now or utcnow()
    num_items = session.exec(_NUM_ITEMS, params={"comparison_id": comparison_id}).one()
    if num_items == 0:
        raise crud.NotFoundError(f"comparison {comparison_id} does not exist")
    voter = session.get(User, user_id)
    if voter is not None and voter.kind == "ai":
        # AI judges take no lease (see the docstring): their own slots are filled by record_vote's conditional
        # UPDATE, which never touches a person's. They are made by `judge run`, never by a web login.
        leased_at = None
    else:
        lease = session.exec(
            _VOTER_LEASE, params={"comparison_id": comparison_id, "user_id": user_id}
        ).first()
        # A gold item stays assigned after its lease runs out (it has room for everyone); any other item needs
        # the lease still live, or the slot may already be someone else's.
        if lease is None or not (lease[1] is not None or _as_utc(lease[0].expires_at) > now):
            raise NotLeasedError(
                f"comparison {comparison_id} is not leased to you (or the lease expired): take items from the queue"
            )
        leased_at = lease[0].leased_at
    # Clamped at 0: several servers' clocks may differ by a little.
    seconds = (
        max(0.0, round((now - _as_utc(leased_at)).total_seconds(), 2)) if leased_at is not None else None
    )
    order = shown_order_for(user_id=user_id, comparison_id=comparison_id, num_items=num_items)
    labels = LABELS[:num_items]

    def position(label: str) -> int:
        if not isinstance(label, str) or label.upper() not in labels:
            raise AlignloopError(f"unknown response label {label!r}; expected one of {', '.join(labels)}")
        return order[labels.index(label.upper())]

    stored_choice = choice
    if choice in ("a", "b"):
        stored_choice = "ab"[position(choice.upper())] if num_items == 2 else choice
    ranking = [position(label) for label in ranking_labels] if ranking_labels is not None else None
    stored_ratings = {}
    if not isinstance(ratings or {}, dict) or len(ratings or {}) > num_items:
        raise AlignloopError(f"ratings must map at most {num_items} response labels to {{aspect: 1..5}}")
    for label, given in (ratings or {}).items():
        # type() rather than isinstance: True is an int to Python, but not a rating.
        if not isinstance(given, dict) or not all(
            isinstance(k, str) and k in aspects and type(v) is int and v in RATING_RANGE
            for k, v in given.items()
        ):
            raise AlignloopError(
                f"ratings must map each response label to {{aspect: 1..5}} with aspects from: {', '.join(aspects)}"
            )
        stored_ratings[str(position(label))] = given
    if len(rationale) > 5000:
        raise AlignloopError("the rationale is limited to 5000 characters")
    # The guidelines version is the server's to state, like the shown order: the one in force for the round.
    round_of = session.exec(select(Comparison.round).where(Comparison.id == comparison_id)).one()
    guidelines = crud.guidelines_for_round(session, round=round_of)
    vote = crud.record_vote(
        session,
        guidelines_version=guidelines.version if guidelines else None,
        comparison_id=comparison_id,
        user_id=user_id,
        choice=stored_choice,
        ranking=ranking,
        shown_order=order,
        ratings=stored_ratings,
        rationale=rationale.strip(),
        seconds=seconds,
        num_items=num_items,
    )
    session.connection().execute(_RELEASE, {"comparison_id": comparison_id, "user_id": user_id})
    session.flush()
    return vote.id


def skip(session: Session, *, user_id: int, comparison_id: int, now: datetime | None = None) -> None:
    """Pass on an item: it frees its slot at once and is never offered to this annotator again."""
    now = now or utcnow()
    lease = session.exec(
        select(Lease).where(Lease.comparison_id == comparison_id, Lease.user_id == user_id)
    ).first()
    if lease is None and session.get(Comparison, comparison_id) is None:
        raise crud.NotFoundError(f"comparison {comparison_id} does not exist")
    if lease is None:
        lease = Lease(comparison_id=comparison_id, user_id=user_id, expires_at=now)
    lease.skipped = True
    lease.expires_at = now
    session.add(lease)
    session.flush()


def progress(session: Session, *, user_id: int, now: datetime | None = None) -> Progress:
    now = now or utcnow()
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    current_round = session.exec(
        select(func.max(Comparison.round)).where(Comparison.status == "queued")
    ).one()
    mine = select(func.count()).select_from(Vote).where(Vote.user_id == user_id)
    done_today = session.exec(mine.where(Vote.created_at >= midnight)).one()
    done_in_round = 0
    if current_round is not None:
        done_in_round = session.exec(
            mine.join(Comparison, Comparison.id == Vote.comparison_id).where(
                Comparison.round == current_round
            )
        ).one()
    left = session.exec(_NUM_AVAILABLE[0], params={"user_id": user_id, "now": now}).one()
    return Progress(done_today=done_today, done_in_round=done_in_round, left=left, round=current_round)


def active_annotator(session: Session, *, user_id: int) -> User:
    user = session.get(User, user_id)
    if user is None or user.disabled:
        raise AlignloopError("this account is disabled")
    return user
