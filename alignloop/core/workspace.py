"""Create and open a workspace: the folder with config.yaml, the database and the model cache.

Used by the CLI, the web app, tests and benches alike, so a workspace made one way opens every way.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from alignloop.core import AlignloopError, crud
from alignloop.core.config import Settings, load_settings, new_settings, write_settings
from alignloop.core.db import create_schema, make_engine, session_scope


def init_workspace(path: Path, *, database_url: str = "") -> str:
    """Create config, database and the admin user; returns the admin's random password."""
    if path.exists() and not path.is_dir():
        raise AlignloopError(f"{path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()):
        raise AlignloopError(
            f"{path} is not empty and not an alignloop workspace; choose an empty or new folder"
        )
    settings = new_settings(path, database_url=database_url)
    for folder in (path, settings.cache_dir, settings.runs_dir):
        folder.mkdir(parents=True, exist_ok=True)
    engine = make_engine(os.environ.get("ALIGNLOOP_DATABASE_URL") or settings.db_url)
    create_schema(engine)
    password = secrets.token_urlsafe(12)
    with session_scope(engine) as session:
        if crud.get_user(session, name="admin") is None:
            crud.create_user(session, name="admin", role="admin", password=password)
        else:
            crud.set_password(session, user=crud.get_user(session, name="admin"), password=password)
    write_settings(settings)  # last: a folder is a workspace only once everything above worked
    return password


def open_workspace(workspace: str | Path | None) -> tuple[Settings, object]:
    """Settings and a database engine (schema created or checked) for an existing workspace."""
    settings = load_settings(workspace)
    engine = make_engine(settings.db_url)
    create_schema(engine)
    return settings, engine
