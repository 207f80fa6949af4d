"""Engine and sessions: SQLite in WAL mode by default, PostgreSQL when the URL says so.

SQLite gets WAL (readers never block the writer), a busy timeout (writers queue instead of failing at once)
and foreign keys on. Schema creation is idempotent and records `SCHEMA_VERSION`; opening a database written
by a newer alignloop is refused rather than guessed at.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from sqlalchemy import event, inspect, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.pool import StaticPool
from sqlmodel import Session, SQLModel, create_engine, select

from alignloop.core import AlignloopError
from alignloop.core.models import SCHEMA_VERSION, Comparison, SchemaInfo

SQLITE_BUSY_TIMEOUT_MS = 30_000  # how long a transaction waits for the write lock in all
SQLITE_BUSY_POLL_MS = 2  # SQLite's own wait before `_begin_immediate` polls again


def _add_columns(engine: Engine, table: str, columns: dict[str, str]) -> None:
    """ALTER TABLE ... ADD COLUMN for each column the table lacks (so a half-applied step can be re-run)."""
    with engine.begin() as conn:
        present = {c["name"] for c in inspect(conn).get_columns(table)}
        for name, ddl in columns.items():
            if name not in present:
                conn.execute(text(f'ALTER TABLE "{table}" ADD COLUMN {name} {ddl}'))


def _v2_annotation_queue(engine: Engine) -> None:
    _add_columns(engine, "user", {"votes_excluded": "BOOLEAN NOT NULL DEFAULT FALSE"})
    _add_columns(engine, "comparison", {"reward_margin": "FLOAT"})
    _add_columns(engine, "lease", {"skipped": "BOOLEAN NOT NULL DEFAULT FALSE"})
    with engine.begin() as conn:
        conn.execute(text("DROP INDEX IF EXISTS ix_comparison_queue"))
    for index in Comparison.__table__.indexes:
        if index.name == "ix_comparison_queue_order":
            index.create(engine, checkfirst=True)


# version -> step that upgrades a database from `version - 1`.
def _v3_presets_and_keys(engine: Engine) -> None:
    """New tables only (Preset, ApiKey): `create_all` has already made them; nothing to alter."""


MIGRATIONS: dict[int, Callable[[Engine], None]] = {2: _v2_annotation_queue, 3: _v3_presets_and_keys}


def make_engine(url: str, *, echo: bool = False) -> Engine:
    if url.startswith("sqlite"):
        in_memory = url in ("sqlite://", "sqlite:///:memory:")
        engine = create_engine(
            url,
            echo=echo,
            connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_POLL_MS / 1000},
            # One shared connection is the only way an in-memory database is seen by every session.
            poolclass=StaticPool if in_memory else None,
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        # pysqlite's own transaction handling defers BEGIN and breaks SAVEPOINT; take control of it so every
        # transaction starts with BEGIN IMMEDIATE: it waits for the write lock up front instead of failing
        # half-way when a read turns into a write.
        event.listen(engine, "begin", _begin_immediate)
        return engine
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    return create_engine(url, echo=echo, pool_pre_ping=True, pool_size=10, max_overflow=20)


def _begin_immediate(conn) -> None:
    """BEGIN IMMEDIATE, polling for the write lock every millisecond or so.

    SQLite's own busy handler backs off to sleeps of up to 100 ms, so a waiter often sleeps long after the
    lock was freed; with several processes (web workers, a judge, the CLI) that idle time dominated the
    annotation load test. SQLite's busy timeout is kept short (SQLITE_BUSY_POLL_MS) and the wait happens here.
    """
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            conn.exec_driver_sql("BEGIN IMMEDIATE")
            return
        except OperationalError as exc:
            if "locked" not in str(exc.orig) or time.monotonic() > deadline:
                raise
            time.sleep(0.0005)


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    dbapi_conn.isolation_level = None  # autocommit at the driver; SQLAlchemy's "begin" event issues BEGIN
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_POLL_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")  # durable across process crashes in WAL mode
    cursor.close()


def create_schema(engine: Engine) -> int:
    """Create missing tables and record the schema version; safe to call any number of times."""
    try:
        SQLModel.metadata.create_all(engine)
    except OperationalError as exc:
        raise AlignloopError(f"cannot open database {engine.url!r}: {exc.orig}") from None
    with Session(engine) as session:
        info = session.get(SchemaInfo, 1)
        if info is None:
            session.add(SchemaInfo(id=1, version=SCHEMA_VERSION))
            session.commit()
            return SCHEMA_VERSION
        version = info.version
    if version > SCHEMA_VERSION:
        raise AlignloopError(
            f"database schema version {version} is newer than this alignloop ({SCHEMA_VERSION}); upgrade alignloop"
        )
    for step in range(version + 1, SCHEMA_VERSION + 1):
        MIGRATIONS[step](engine)
        with Session(engine) as session:
            info = session.get(SchemaInfo, 1)
            info.version = step
            session.add(info)
            session.commit()
    return SCHEMA_VERSION


def schema_version(engine: Engine) -> int | None:
    with Session(engine) as session:
        try:
            info = session.exec(select(SchemaInfo)).first()
        except OperationalError:
            return None
        return info.version if info else None


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """A session that commits on success and rolls back on any error."""
    with Session(engine, expire_on_commit=False) as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise


def ping(engine: Engine) -> None:
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))
