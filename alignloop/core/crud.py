"""Data access. Every function takes the session first and keyword-only arguments, and returns typed rows.

Handlers and commands own the transaction (see `db.session_scope`); functions here only flush, so a caller
can compose several of them into one all-or-nothing change.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from datetime import datetime

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import and_, bindparam, case, exists, func, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, SQLModel, col, select

from alignloop.core import AlignloopError
from alignloop.core.models import (
    CHOICES,
    COMPARISON_SOURCES,
    MODEL_KINDS,
    ROLES,
    SPLITS,
    USER_KINDS,
    ApiKey,
    Comparison,
    ComparisonItem,
    Generation,
    ModelVersion,
    Prompt,
    Round,
    Run,
    User,
    Vote,
    utcnow,
)

_hasher = PasswordHasher()  # argon2id with the library's current recommended cost


class NotFoundError(AlignloopError):
    """The object a request names does not exist."""


class DuplicateVoteError(AlignloopError):
    """The user has already voted on this comparison."""


class ComparisonClosedError(AlignloopError):
    """The comparison has all the votes it needs (or was cancelled)."""


# --- users ---------------------------------------------------------------------------------------------------


def create_user(
    session: Session, *, name: str, role: str, kind: str = "human", password: str | None = None
) -> User:
    name = name.strip()
    if not name or len(name) > 64 or any(c.isspace() for c in name):
        raise AlignloopError(f"user name {name!r} must be 1-64 characters without spaces")
    if role not in ROLES:
        raise AlignloopError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    if kind not in USER_KINDS:
        raise AlignloopError(f"user kind must be one of {', '.join(USER_KINDS)}, not {kind!r}")
    if session.exec(select(User).where(User.name == name)).first() is not None:
        raise AlignloopError(f"user {name!r} already exists")
    user = User(name=name, role=role, kind=kind, password_hash=_hasher.hash(password) if password else None)
    session.add(user)
    session.flush()
    return user


def get_user(session: Session, *, name: str) -> User | None:
    return session.exec(select(User).where(User.name == name)).first()


def authenticate(session: Session, *, name: str, password: str) -> User | None:
    """The enabled user with this name and password, else None (same answer for every kind of failure)."""
    user = get_user(session, name=name)
    return user if check_password(user, password) else None


def check_password(user: User | None, password: str) -> bool:
    """Argon2 verification; needs no database, so callers can run it outside any transaction."""
    if user is None or user.disabled or not user.password_hash:
        _hasher.hash(password)  # spend the same time as a real check, so timing does not reveal names
        return False
    try:
        return _hasher.verify(user.password_hash, password)
    except (VerificationError, InvalidHashError):
        return False


def set_password(session: Session, *, user: User, password: str) -> None:
    user.password_hash = _hasher.hash(password)
    session.add(user)
    session.flush()


# --- API keys ------------------------------------------------------------------------------------------------

API_KEY_PREFIX = "al-"


def _key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_api_key(session: Session, *, user: User, name: str) -> tuple[str, ApiKey]:
    """A new key for `user`; the key itself is returned once and only its hash is stored."""
    if not name.strip() or len(name) > 64:
        raise AlignloopError("API key name must be 1-64 characters")
    key = API_KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(name=name.strip(), prefix=key[:10], key_hash=_key_hash(key), user_id=user.id)
    session.add(row)
    session.flush()
    return key, row


def user_for_api_key(session: Session, *, key: str) -> User | None:
    row = session.exec(select(ApiKey).where(ApiKey.key_hash == _key_hash(key))).first()
    if row is None or row.revoked:
        return None
    user = session.get(User, row.user_id)
    return None if user is None or user.disabled else user


def list_api_keys(session: Session) -> list[ApiKey]:
    return list(session.exec(select(ApiKey).order_by(ApiKey.id)).all())


def revoke_api_key(session: Session, *, key_id: int) -> ApiKey:
    row = session.get(ApiKey, key_id)
    if row is None:
        raise AlignloopError(f"no API key {key_id}")
    row.revoked = True
    session.add(row)
    return row


# --- prompts -------------------------------------------------------------------------------------------------


class PromptCreate(SQLModel):
    # A validated prompt on its way in (see `alignloop.prompts` for parsing files into these).
    messages: list[dict]
    split: str = "train"
    tags: list[str] = []
    meta: dict = {}


def prompt_hash(messages: Sequence[dict]) -> str:
    canonical = json.dumps([[m["role"], m["content"]] for m in messages], ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def add_prompts(
    session: Session, *, prompts: Iterable[PromptCreate], source: str
) -> tuple[list[Prompt], int]:
    """Insert the prompts not already stored (by content hash). Returns (added, number of duplicates)."""
    added: list[Prompt] = []
    by_hash: dict[str, PromptCreate] = {}
    duplicates = 0
    for p in prompts:
        if p.split not in SPLITS:
            raise AlignloopError(f"split must be one of {', '.join(SPLITS)}, not {p.split!r}")
        h = prompt_hash(p.messages)
        if h in by_hash:
            duplicates += 1
        else:
            by_hash[h] = p
    hashes = list(by_hash)
    existing: set[str] = set()
    for start in range(0, len(hashes), 500):
        chunk = hashes[start : start + 500]
        existing.update(
            session.exec(select(Prompt.content_hash).where(col(Prompt.content_hash).in_(chunk))).all()
        )
    for h, p in by_hash.items():
        if h in existing:
            duplicates += 1
            continue
        row = Prompt(
            messages=p.messages, content_hash=h, source=source, split=p.split, tags=p.tags, meta=p.meta
        )
        session.add(row)
        added.append(row)
    session.flush()
    return added, duplicates


def get_prompt_by_hash(session: Session, *, content_hash: str) -> Prompt | None:
    return session.exec(select(Prompt).where(Prompt.content_hash == content_hash)).first()


def list_prompts(
    session: Session, *, split: str | None = None, limit: int | None = None, offset: int = 0
) -> list[Prompt]:
    query = select(Prompt).order_by(Prompt.id).offset(offset)
    if split is not None:
        query = query.where(Prompt.split == split)
    if limit is not None:
        query = query.limit(limit)
    return list(session.exec(query).all())


def count_prompts(session: Session) -> int:
    return session.exec(select(func.count()).select_from(Prompt)).one()


# --- models and runs -----------------------------------------------------------------------------------------


def register_model(
    session: Session,
    *,
    name: str,
    kind: str,
    base: str,
    path: str | None = None,
    parent_id: int | None = None,
    run_id: int | None = None,
    round: int | None = None,
    licence: str | None = None,
    metrics: dict | None = None,
) -> ModelVersion:
    if kind not in MODEL_KINDS:
        raise AlignloopError(f"model kind must be one of {', '.join(MODEL_KINDS)}, not {kind!r}")
    if get_model_version(session, name=name) is not None:
        raise AlignloopError(f"a model version named {name!r} is already registered")
    if parent_id is not None and session.get(ModelVersion, parent_id) is None:
        raise AlignloopError(f"parent model version {parent_id} does not exist")
    version = ModelVersion(
        name=name,
        kind=kind,
        base=base,
        path=path,
        parent_id=parent_id,
        run_id=run_id,
        round=round,
        licence=licence,
        metrics=metrics or {},
    )
    session.add(version)
    session.flush()
    if run_id is not None:
        run = session.get(Run, run_id)
        if run is not None and run.output_model_id is None:
            run.output_model_id = version.id
            session.add(run)
            session.flush()
    return version


def get_model_version(session: Session, *, name: str) -> ModelVersion | None:
    return session.exec(select(ModelVersion).where(ModelVersion.name == name)).first()


def list_model_versions(session: Session, *, kind: str | None = None) -> list[ModelVersion]:
    query = select(ModelVersion).order_by(ModelVersion.id)
    if kind is not None:
        query = query.where(ModelVersion.kind == kind)
    return list(session.exec(query).all())


def model_lineage(session: Session, *, model_id: int) -> list[ModelVersion]:
    """The model and its ancestors, newest first."""
    chain: list[ModelVersion] = []
    seen: set[int] = set()
    current = session.get(ModelVersion, model_id)
    while current is not None and current.id not in seen:
        chain.append(current)
        seen.add(current.id)
        current = session.get(ModelVersion, current.parent_id) if current.parent_id is not None else None
    return chain


def create_run(session: Session, *, kind: str, config: dict, log_path: str | None = None) -> Run:
    job = os.environ.get("ALIGNLOOP_JOB")
    if job and job.isdigit() and kind != "job":  # started from the admin console: link the run to its job
        config = {**config, "job": int(job)}
    run = Run(kind=kind, config=config, status="running", started_at=utcnow(), log_path=log_path)
    session.add(run)
    session.flush()
    return run


def finish_run(
    session: Session, *, run: Run, status: str, metrics: dict | None = None, error: str | None = None
) -> Run:
    run.status = status
    run.finished_at = utcnow()
    if metrics:
        run.metrics = {**run.metrics, **metrics}
    run.error = error
    session.add(run)
    session.flush()
    return run


def get_or_create_round(
    session: Session, *, number: int, target_votes: int = 1, policy_id: int | None = None
) -> Round:
    existing = session.exec(select(Round).where(Round.number == number)).first()
    if existing is not None:
        return existing
    row = Round(number=number, target_votes=target_votes, policy_id=policy_id)
    session.add(row)
    session.flush()
    return row


# --- generations and comparisons ------------------------------------------------------------------------------


def add_generation(
    session: Session,
    *,
    prompt_id: int,
    text: str,
    model_version_id: int | None = None,
    num_tokens: int = 0,
    finished: bool = True,
    params: dict | None = None,
    run_id: int | None = None,
) -> Generation:
    row = Generation(
        prompt_id=prompt_id,
        model_version_id=model_version_id,
        text=text,
        num_tokens=num_tokens,
        finished=finished,
        params=params or {},
        run_id=run_id,
    )
    session.add(row)
    session.flush()
    return row


def create_comparison(
    session: Session,
    *,
    prompt_id: int,
    generation_ids: Sequence[int],
    round: int = 0,
    target_votes: int = 1,
    source: str = "queue",
    priority: int = 0,
    gold: str | None = None,
) -> Comparison:
    if len(generation_ids) < 2:
        raise AlignloopError("a comparison needs at least two generations")
    if len(set(generation_ids)) != len(generation_ids):
        raise AlignloopError("a comparison cannot hold the same generation twice")
    if target_votes < 1:
        raise AlignloopError("target_votes must be at least 1")
    if source not in COMPARISON_SOURCES:
        raise AlignloopError(f"source must be one of {', '.join(COMPARISON_SOURCES)}")
    generations = session.exec(select(Generation).where(col(Generation.id).in_(generation_ids))).all()
    if len(generations) != len(generation_ids):
        raise AlignloopError("a comparison refers to a generation that does not exist")
    if any(g.prompt_id != prompt_id for g in generations):
        raise AlignloopError("every generation in a comparison must answer the comparison's prompt")
    if gold is not None:
        _check_choice(gold, len(generation_ids))
    comparison = Comparison(
        prompt_id=prompt_id,
        round=round,
        target_votes=target_votes,
        source=source,
        priority=priority,
        gold=gold,
    )
    session.add(comparison)
    session.flush()
    for position, generation_id in enumerate(generation_ids):
        session.add(
            ComparisonItem(comparison_id=comparison.id, position=position, generation_id=generation_id)
        )
    session.flush()
    return comparison


def comparison_generations(session: Session, *, comparison_id: int) -> list[Generation]:
    """The comparison's generations in position order (a, b, ...)."""
    rows = session.exec(
        select(Generation)
        .join(ComparisonItem, ComparisonItem.generation_id == Generation.id)
        .where(ComparisonItem.comparison_id == comparison_id)
        .order_by(ComparisonItem.position)
    ).all()
    return list(rows)


def list_comparisons(
    session: Session,
    *,
    status: str | None = None,
    round: int | None = None,
    limit: int = 100,
    offset: int = 0,
) -> list[Comparison]:
    query = (
        select(Comparison)
        .order_by(col(Comparison.priority).desc(), Comparison.id)
        .offset(offset)
        .limit(limit)
    )
    if status is not None:
        query = query.where(Comparison.status == status)
    if round is not None:
        query = query.where(Comparison.round == round)
    return list(session.exec(query).all())


def count_comparisons(session: Session, *, status: str | None = None, round: int | None = None) -> int:
    query = select(func.count()).select_from(Comparison)
    if status is not None:
        query = query.where(Comparison.status == status)
    if round is not None:
        query = query.where(Comparison.round == round)
    return session.exec(query).one()


# --- votes ---------------------------------------------------------------------------------------------------


def _check_choice(choice: str, num_items: int) -> None:
    if choice not in CHOICES:
        raise AlignloopError(f"choice must be one of {', '.join(CHOICES)}, not {choice!r}")
    if num_items > 2 and choice in ("a", "b"):
        raise AlignloopError(f"a comparison of {num_items} responses takes a ranking, not {choice!r}")


def _check_permutation(name: str, value: Sequence[int], num_items: int) -> None:
    if sorted(value) != list(range(num_items)) or not all(isinstance(v, int) for v in value):
        raise AlignloopError(f"{name} must order all {num_items} responses exactly once, got {list(value)!r}")


# Built once with bind parameters (cid, uid): this runs for every vote.
_VOTE_GATE = (
    update(Comparison)
    .where(Comparison.id == bindparam("cid"), Comparison.status == "queued")
    .where(~exists().where(Vote.comparison_id == bindparam("cid"), Vote.user_id == bindparam("uid")))
    .where((Comparison.num_votes < Comparison.target_votes) | col(Comparison.gold).is_not(None))
    .values(
        num_votes=Comparison.num_votes + 1,
        status=case(
            (
                and_(Comparison.num_votes + 1 >= Comparison.target_votes, col(Comparison.gold).is_(None)),
                "done",
            ),
            else_=Comparison.status,
        ),
    )
)


def record_vote(
    session: Session,
    *,
    comparison_id: int,
    user_id: int,
    choice: str | None = None,
    ranking: Sequence[int] | None = None,
    shown_order: Sequence[int] | None = None,
    ratings: dict | None = None,
    rationale: str = "",
    seconds: float | None = None,
    num_items: int | None = None,
) -> Vote:
    """Store one vote and count it, atomically: never two votes by one user, never past the target.

    `num_items` (the comparison's number of responses) saves a query when the caller knows it. Refused votes
    raise before anything is written, except when the same user votes twice at the same instant on
    PostgreSQL: then the database's unique constraint stops the second, DuplicateVoteError is raised and the
    caller's transaction must be rolled back.
    """
    if num_items is None:
        num_items = session.exec(
            select(func.count())
            .select_from(ComparisonItem)
            .where(ComparisonItem.comparison_id == comparison_id)
        ).one()
    if num_items == 0:
        raise NotFoundError(f"comparison {comparison_id} does not exist")
    if (choice is None) == (ranking is None):
        raise AlignloopError("a vote has either a choice or a ranking")
    if choice is not None:
        _check_choice(choice, num_items)
    if ranking is not None:
        _check_permutation("ranking", ranking, num_items)
    shown = list(shown_order) if shown_order is not None else list(range(num_items))
    _check_permutation("shown_order", shown, num_items)
    if seconds is not None and seconds < 0:
        raise AlignloopError("seconds cannot be negative")

    # One conditional UPDATE is the gate: it counts the vote only while the comparison has room (gold items
    # always do: every annotator answers them) and this user has not voted on it, whatever the concurrency.
    counted = session.connection().execute(_VOTE_GATE, {"cid": comparison_id, "uid": user_id}).rowcount
    if counted != 1:
        if session.exec(
            select(Vote.id).where(Vote.comparison_id == comparison_id, Vote.user_id == user_id)
        ).first():
            raise DuplicateVoteError(f"user {user_id} has already voted on comparison {comparison_id}")
        raise ComparisonClosedError(f"comparison {comparison_id} already has all the votes it needs")
    vote = Vote(
        comparison_id=comparison_id,
        user_id=user_id,
        choice=choice,
        ranking=list(ranking) if ranking is not None else None,
        shown_order=shown,
        ratings=ratings or {},
        rationale=rationale,
        seconds=seconds,
    )
    session.add(vote)
    try:
        session.flush()
    except IntegrityError:  # the unique constraint caught a simultaneous second vote by the same user
        raise DuplicateVoteError(f"user {user_id} has already voted on comparison {comparison_id}") from None
    return vote


# --- export --------------------------------------------------------------------------------------------------


def _assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def preference_pairs(
    session: Session,
    *,
    include_ties: bool = False,
    include_both_bad: bool = False,
    rounds: Sequence[int] | None = None,
    exclude_user_ids: Iterable[int] = (),
) -> list[dict]:
    """Aggregate votes into TRL conversational pairs: `prompt` messages, `chosen`/`rejected` assistant turns.

    Pairwise items take the plurality choice (a tie in the count yields no pair); K-way rankings are averaged
    per item and expanded into all K(K-1)/2 ordered pairs. Ties and both-bad outcomes are left out unless
    asked for, and then carry `outcome` so a trainer can filter them.
    Votes of users marked `votes_excluded` by quality control are always left out.
    """
    excluded = set(exclude_user_ids) | set(session.exec(select(User.id).where(User.votes_excluded)).all())
    query = (
        select(Vote, Comparison)
        .join(Comparison, Comparison.id == Vote.comparison_id)
        .order_by(Vote.comparison_id)
    )
    if rounds is not None:
        query = query.where(col(Comparison.round).in_(list(rounds)))
    votes_by_comparison: dict[int, list[Vote]] = defaultdict(list)
    comparisons: dict[int, Comparison] = {}
    for vote, comparison in session.exec(query).all():
        if vote.user_id in excluded:
            continue
        votes_by_comparison[comparison.id].append(vote)
        comparisons[comparison.id] = comparison

    pairs: list[dict] = []
    for comparison_id, votes in votes_by_comparison.items():
        comparison = comparisons[comparison_id]
        prompt = session.get(Prompt, comparison.prompt_id)
        items = comparison_generations(session, comparison_id=comparison_id)
        base = {"prompt": prompt.messages, "comparison_id": comparison_id, "round": comparison.round}
        choices = Counter(v.choice for v in votes if v.choice is not None)
        rankings = [v.ranking for v in votes if v.ranking is not None]
        if rankings:
            mean_rank = {
                pos: sum(r.index(pos) for r in rankings) / len(rankings) for pos in range(len(items))
            }
            order = sorted(range(len(items)), key=lambda pos: mean_rank[pos])
            for i, better in enumerate(order):
                for worse in order[i + 1 :]:
                    if mean_rank[better] == mean_rank[worse]:
                        continue
                    pairs.append(
                        base
                        | {
                            "chosen": _assistant(items[better].text),
                            "rejected": _assistant(items[worse].text),
                            "outcome": "ranked",
                            "agreement": sum(r.index(better) < r.index(worse) for r in rankings)
                            / len(rankings),
                            "num_votes": len(rankings),
                        }
                    )
            continue
        (top, top_count), *rest = choices.most_common() or [(None, 0)]
        if top is None or (rest and rest[0][1] == top_count):
            continue  # no votes or a dead heat between outcomes: no preference to learn from
        agreement = top_count / sum(choices.values())
        if top in ("a", "b"):
            chosen, rejected = (items[0], items[1]) if top == "a" else (items[1], items[0])
        elif (top == "tie" and include_ties) or (top == "both_bad" and include_both_bad):
            chosen, rejected = items[0], items[1]
        else:
            continue
        pairs.append(
            base
            | {
                "chosen": _assistant(chosen.text),
                "rejected": _assistant(rejected.text),
                "outcome": top if top in ("tie", "both_bad") else "preferred",
                "agreement": agreement,
                "num_votes": sum(choices.values()),
            }
        )
    return pairs


def raw_votes(session: Session, *, rounds: Sequence[int] | None = None) -> list[dict]:
    """Every vote with its annotator, the shown order, ratings, rationale and timing."""
    query = (
        select(Vote, User, Comparison)
        .join(User, User.id == Vote.user_id)
        .join(Comparison, Comparison.id == Vote.comparison_id)
        .order_by(Vote.id)
    )
    if rounds is not None:
        query = query.where(col(Comparison.round).in_(list(rounds)))
    out = []
    for vote, user, comparison in session.exec(query).all():
        prompt = session.get(Prompt, comparison.prompt_id)
        items = comparison_generations(session, comparison_id=comparison.id)
        out.append(
            {
                "vote_id": vote.id,
                "comparison_id": comparison.id,
                "round": comparison.round,
                "prompt": prompt.messages,
                "responses": [g.text for g in items],
                "generation_ids": [g.id for g in items],
                "annotator": user.name,
                "annotator_kind": user.kind,
                "choice": vote.choice,
                "ranking": vote.ranking,
                "shown_order": vote.shown_order,
                "ratings": json.dumps(vote.ratings),
                "rationale": vote.rationale,
                "seconds": vote.seconds,
                "created_at": _iso(vote.created_at),
            }
        )
    return out


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def list_runs(session: Session, *, kind: str | None = None) -> list[Run]:
    query = select(Run).order_by(Run.id)
    if kind is not None:
        query = query.where(Run.kind == kind)
    return list(session.exec(query).all())


def ensure_model_version(session: Session, *, ref: str, licence: str | None) -> ModelVersion:
    """The registered version for `ref`; a base model used for the first time is registered as a policy."""
    version = get_model_version(session, name=ref)
    if version is None:
        version = register_model(session, name=ref, kind="policy", base=ref, licence=licence)
    return version
