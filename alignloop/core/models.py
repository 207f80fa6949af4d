"""The tables every stage shares (SQLModel). One class per entity, one line on what it is for.

Times are aware UTC (`utcnow()`); SQLModel stores them as UTC on both SQLite and PostgreSQL.
JSON columns hold small structured values (chat messages, sampling parameters, metrics); anything queried
by value is its own column.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, Column, Index, Text, UniqueConstraint, text
from sqlmodel import Field, SQLModel

# Bump when a table changes and add the step to `db.MIGRATIONS`.
SCHEMA_VERSION = 6

UNSCORED = 1e300  # sorts comparisons without a reward margin after every scored one

ROLES = ("admin", "annotator", "reviewer")
USER_KINDS = ("human", "ai")
MODEL_KINDS = ("policy", "reward", "sft")
SPLITS = ("train", "eval")
CHOICES = ("a", "b", "tie", "both_bad")
COMPARISON_SOURCES = ("queue", "arena", "import")
COMPARISON_STATUSES = ("queued", "done", "cancelled")
RUN_STATUSES = ("pending", "running", "succeeded", "failed", "cancelled")


def utcnow() -> datetime:
    return datetime.now(UTC)


def json_column(*, nullable: bool = False, default_factory: Any = None) -> Any:
    if default_factory is None:
        return Field(default=None, sa_column=Column(JSON, nullable=nullable))
    return Field(default_factory=default_factory, sa_column=Column(JSON, nullable=nullable))


class SchemaInfo(SQLModel, table=True):
    # One row: the schema version this database was created or migrated to.
    id: int = Field(default=1, primary_key=True)
    version: int
    updated_at: datetime = Field(default_factory=utcnow)


class User(SQLModel, table=True):
    # A person or an AI judge that votes; `role` decides what each handler lets it do.
    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(index=True, unique=True, max_length=64)
    role: str = Field(max_length=16)
    kind: str = Field(default="human", max_length=8)
    password_hash: str | None = Field(default=None)
    disabled: bool = Field(default=False)
    votes_excluded: bool = Field(default=False)  # quality control: leave this user's votes out of exports
    created_at: datetime = Field(default_factory=utcnow)


class Run(SQLModel, table=True):
    # One piece of long work (generation, training, judging): its config, status, log and metrics.
    id: int | None = Field(default=None, primary_key=True)
    kind: str = Field(index=True, max_length=16)
    status: str = Field(default="pending", max_length=16)
    config: dict = json_column(default_factory=dict)
    metrics: dict = json_column(default_factory=dict)
    log_path: str | None = None
    error: str | None = Field(default=None, sa_column=Column(Text))
    output_model_id: int | None = Field(default=None, foreign_key="modelversion.id")
    created_at: datetime = Field(default_factory=utcnow)
    started_at: datetime | None = None
    finished_at: datetime | None = None


class ModelVersion(SQLModel, table=True):
    # A model the workspace knows by name: where its weights are, what it came from, how good it is.
    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(index=True, unique=True, max_length=128)
    kind: str = Field(max_length=16)
    base: str = Field(max_length=512)  # the reference it was built from ("default", a hub id, a path)
    path: str | None = None  # local weights (full model or adapter); None = resolve `base`
    parent_id: int | None = Field(default=None, foreign_key="modelversion.id")
    run_id: int | None = Field(default=None, foreign_key="run.id")
    round: int | None = None
    licence: str | None = Field(default=None, max_length=128)
    metrics: dict = json_column(default_factory=dict)
    created_at: datetime = Field(default_factory=utcnow)


class Round(SQLModel, table=True):
    # One turn of the loop: which policy generated, which reward model scored, how many votes per item.
    id: int | None = Field(default=None, primary_key=True)
    number: int = Field(unique=True, index=True)
    policy_id: int | None = Field(default=None, foreign_key="modelversion.id")
    reward_id: int | None = Field(default=None, foreign_key="modelversion.id")
    target_votes: int = 1
    ai_votes: int = 1  # slots per comparison for AI judges, separate from the people's `target_votes`
    status: str = Field(default="open", max_length=16)
    created_at: datetime = Field(default_factory=utcnow)


class Prompt(SQLModel, table=True):
    # A conversation to respond to: chat messages ending in a user turn; unique by content hash.
    id: int | None = Field(default=None, primary_key=True)
    messages: list = json_column(default_factory=list)
    content_hash: str = Field(unique=True, index=True, max_length=64)
    source: str = Field(default="", max_length=256)
    split: str = Field(default="train", max_length=8)
    tags: list = json_column(default_factory=list)
    meta: dict = json_column(default_factory=dict)  # e.g. category, question_id, later turns
    created_at: datetime = Field(default_factory=utcnow)


class Generation(SQLModel, table=True):
    # One sampled response of one model version to one prompt, with how it was sampled.
    id: int | None = Field(default=None, primary_key=True)
    prompt_id: int = Field(foreign_key="prompt.id", index=True)
    model_version_id: int | None = Field(default=None, foreign_key="modelversion.id", index=True)
    text: str = Field(sa_column=Column(Text, nullable=False))
    num_tokens: int = 0
    finished: bool = True  # False: stopped by max_new_tokens before EOS
    params: dict = json_column(default_factory=dict)
    run_id: int | None = Field(default=None, foreign_key="run.id")
    created_at: datetime = Field(default_factory=utcnow)


class Comparison(SQLModel, table=True):
    # 2..K responses to one prompt, to be voted on `target_votes` times.
    __table_args__ = (
        # The annotation queue's exact ORDER BY (see annotate.queue): a claim reads a few index entries
        # instead of sorting every queued comparison.
        Index(
            "ix_comparison_queue_order",
            "status",
            text("priority DESC"),
            text(f"coalesce(reward_margin, {UNSCORED})"),
            "id",
        ),
    )
    id: int | None = Field(default=None, primary_key=True)
    prompt_id: int = Field(foreign_key="prompt.id", index=True)
    round: int = Field(default=0, index=True)
    target_votes: int = 1  # human votes; `status` turns "done" when they are in
    num_votes: int = 0  # human votes counted so far
    target_ai_votes: int = 1  # AI judges' own slots: they never take a person's
    num_ai_votes: int = 0
    status: str = Field(default="queued", max_length=16)
    # Known answer for gold items: a choice (a | b | tie | both_bad), or for K > 2 the ranking's positions best
    # first, comma-separated ("2,0,1").
    gold: str | None = Field(default=None, max_length=16)
    source: str = Field(default="queue", max_length=16)
    priority: int = 0
    # reward.score.queue_keys: the model's margin (an ensemble: minus its disagreement); small = ask first
    reward_margin: float | None = None
    created_at: datetime = Field(default_factory=utcnow)


class ComparisonItem(SQLModel, table=True):
    # The ordered generations of a comparison: position 0 is "a", 1 is "b", and so on.
    comparison_id: int = Field(foreign_key="comparison.id", primary_key=True)
    position: int = Field(primary_key=True)
    generation_id: int = Field(foreign_key="generation.id", index=True)


class Vote(SQLModel, table=True):
    # One annotator's judgement of one comparison; the unique constraint makes "one vote each" a fact.
    __table_args__ = (UniqueConstraint("comparison_id", "user_id", name="uq_vote_comparison_user"),)
    id: int | None = Field(default=None, primary_key=True)
    comparison_id: int = Field(foreign_key="comparison.id", index=True)
    user_id: int = Field(foreign_key="user.id", index=True)
    choice: str | None = Field(default=None, max_length=16)  # pairwise: a | b | tie | both_bad
    ranking: list | None = json_column(nullable=True)  # K>2: positions, best first
    shown_order: list = json_column(default_factory=list)  # positions in the order shown
    ratings: dict = json_column(default_factory=dict)  # {position: {aspect: 1..5}}
    rationale: str = Field(default="", sa_column=Column(Text, nullable=False, default=""))
    seconds: float | None = None
    guidelines_version: int | None = None  # the annotation guidelines in force for the item's round
    created_at: datetime = Field(default_factory=utcnow)


class Lease(SQLModel, table=True):
    # Which annotator holds which comparison until when, so two people are not handed the same slot.
    __table_args__ = (UniqueConstraint("comparison_id", "user_id", name="uq_lease_comparison_user"),)
    id: int | None = Field(default=None, primary_key=True)
    comparison_id: int = Field(foreign_key="comparison.id", index=True)
    user_id: int = Field(foreign_key="user.id", index=True)
    expires_at: datetime = Field(index=True)
    skipped: bool = False  # the annotator passed on it: never offered to them again, holds no slot
    # When the annotator was handed the item (kept across reloads): a vote's time is measured from here by the
    # server, never taken from the client. None only for leases made before schema version 4.
    leased_at: datetime | None = None


class LoginThrottle(SQLModel, table=True):
    # Login attempts per key ("pair:<name>@<address>", "addr:<address>"), in the database so that every web
    # worker process sees the same counts; see `alignloop.core.throttle`.
    key: str = Field(primary_key=True, max_length=200)
    attempts: int = 0
    window_start: datetime
    next_allowed_at: datetime | None = None


class ChatFeedback(SQLModel, table=True):
    # A reviewer's verdict on one chat reply: thumbs up/down and, optionally, the better answer they wrote.
    # Edited answers become SFT data; an up/down pair on the same conversation becomes preference data.
    id: int | None = Field(default=None, primary_key=True)
    user_id: int = Field(foreign_key="user.id", index=True)
    model_version_id: int | None = Field(default=None, foreign_key="modelversion.id", index=True)
    messages: list = json_column(default_factory=list)  # the conversation up to and including the user turn
    response: str = Field(sa_column=Column(Text, nullable=False))
    rating: int | None = None  # +1 thumbs up, -1 thumbs down
    edited: str | None = Field(default=None, sa_column=Column(Text))
    # The L1 preset ("name@version") the reply was made with, and the messages as the model was given them.
    preset: str | None = Field(default=None, max_length=80)
    context: list | None = json_column(nullable=True)
    created_at: datetime = Field(default_factory=utcnow)


class Preset(SQLModel, table=True):
    # An L1 prompting preset: system prompt, few-shot demonstrations, optional chain-of-thought instruction.
    # Saving a preset under an existing name adds a new version; old versions stay for reproducibility.
    __table_args__ = (UniqueConstraint("name", "version", name="uq_preset_name_version"),)
    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(index=True, max_length=64)
    version: int = 1
    system_prompt: str = Field(default="", sa_column=Column(Text, nullable=False))
    examples: list = json_column(
        default_factory=list
    )  # [{"user": ..., "assistant": ...}], shown as prior turns
    chain_of_thought: str | None = Field(default=None, sa_column=Column(Text))  # appended to the user's turn
    num_shots: int | None = (
        None  # k: the k examples most similar to the prompt (None: every example, as saved)
    )
    shot_order: str = Field(default="similar_last", max_length=16)  # similar_last | similar_first
    answer_delimiter: str | None = Field(default=None, max_length=64)  # users see only the text after it
    created_by: int | None = Field(default=None, foreign_key="user.id")
    created_at: datetime = Field(default_factory=utcnow)


class ApiKey(SQLModel, table=True):
    # A key for the OpenAI-compatible API (and the REST API). Only its SHA-256 is stored; the key is shown once.
    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=64)
    prefix: str = Field(max_length=12)  # the first characters, to tell keys apart in lists
    key_hash: str = Field(unique=True, index=True, max_length=64)
    user_id: int = Field(foreign_key="user.id", index=True)
    revoked: bool = Field(default=False)
    created_at: datetime = Field(default_factory=utcnow)
    last_used_at: datetime | None = None


class LoginSession(SQLModel, table=True):
    # One browser login (server-side, so it can be revoked). The cookie holds a random token; only its SHA-256
    # is stored. `fingerprint` digests the user's password hash and role at login: changing either ends it.
    id: str = Field(primary_key=True, max_length=64)
    user_id: int = Field(foreign_key="user.id", index=True)
    fingerprint: str = Field(max_length=64)
    created_at: datetime = Field(default_factory=utcnow)


class Transcript(SQLModel, table=True):
    # A reviewer's chat conversation, kept whole; flagged, tagged and commented on for the admins' review queue.
    id: int | None = Field(default=None, primary_key=True)
    user_id: int = Field(foreign_key="user.id", index=True)
    model: str = Field(max_length=128)  # the model name as chosen in the chat ("default" or a version's name)
    preset: str | None = Field(default=None, max_length=80)  # "name@version" of the last reply's preset
    messages: list = json_column(default_factory=list)
    flagged: bool = Field(default=False, index=True)
    tags: list = json_column(default_factory=list)
    comment: str = Field(default="", sa_column=Column(Text, nullable=False, default=""))
    resolved_by: int | None = Field(default=None, foreign_key="user.id")  # the admin who closed the flag
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)


class Guidelines(SQLModel, table=True):
    # The annotators' guidelines, versioned: each edit on /admin/guidelines is a new version for a round onwards.
    id: int | None = Field(default=None, primary_key=True)
    version: int = Field(unique=True, index=True)
    round: int = 0  # in force for this round and later ones, until a newer version
    text: str = Field(sa_column=Column(Text, nullable=False))
    created_by: int | None = Field(default=None, foreign_key="user.id")
    created_at: datetime = Field(default_factory=utcnow)


class LicenceAcceptance(SQLModel, table=True):
    # An admin's recorded acceptance of a model's restricted (or undeclared) licence; checked before each load.
    __table_args__ = (UniqueConstraint("model_ref", "licence", name="uq_licenceacceptance_ref_licence"),)
    id: int | None = Field(default=None, primary_key=True)
    model_ref: str = Field(index=True, max_length=512)  # as `registry.licence_key` names it (paths absolute)
    licence: str = Field(max_length=128)  # what the model declares; "" when it declares none
    note: str | None = Field(default=None, max_length=256)  # for an undeclared licence: what the admin found
    user_id: int = Field(foreign_key="user.id")
    accepted_at: datetime = Field(default_factory=utcnow)
