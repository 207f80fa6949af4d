"""Create and open a workspace: the folder with config.yaml, the database and the model cache.

Used by the CLI, the web app, tests and benches alike, so a workspace made one way opens every way.
"""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path

from alignloop.core import AlignloopError, crud, runguard
from alignloop.core.config import Settings, load_settings, new_settings, write_settings
from alignloop.core.db import create_schema, make_engine, session_scope
from alignloop.core.files import make_private, private_dir, private_umask


def init_workspace(path: Path, *, database_url: str = "") -> str:
    """Create config, database and the admin user; returns the admin's random password."""
    if path.exists() and not path.is_dir():
        raise AlignloopError(f"{path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()):
        raise AlignloopError(
            f"{path} is not empty and not an alignloop workspace; choose an empty or new folder"
        )
    settings = new_settings(path, database_url=database_url)
    existed = path.exists()
    try:
        with private_umask():  # the folder, database and config are the owner's only (0700 / 0600)
            for folder in (path, settings.cache_dir, settings.runs_dir):
                private_dir(folder)
            engine = make_engine(os.environ.get("ALIGNLOOP_DATABASE_URL") or settings.db_url)
            create_schema(engine)
            password = secrets.token_urlsafe(12)
            with session_scope(engine) as session:
                if crud.get_user(session, name="admin") is None:
                    crud.create_user(session, name="admin", role="admin", password=password)
                else:
                    crud.set_password(session, user=crud.get_user(session, name="admin"), password=password)
            engine.dispose()
            write_settings(settings)  # last: a folder is a workspace only once everything above worked
    except BaseException as exc:
        _remove_partial(path, existed)  # a failed init leaves nothing behind, so it can simply be re-run
        if isinstance(exc, OSError):
            raise AlignloopError(f"cannot create a workspace at {path}: {exc.strerror or exc}") from None
        raise
    make_private(path)
    return password


def _remove_partial(path: Path, existed: bool) -> None:
    if not path.is_dir():
        return
    if not existed:
        shutil.rmtree(path, ignore_errors=True)
        return
    for child in path.iterdir():  # the folder was empty before init: empty it again
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


def open_workspace(workspace: str | Path | None) -> tuple[Settings, object]:
    """Settings and a database engine (schema created or checked) for an existing workspace."""
    settings = load_settings(workspace)
    url = settings.db_url
    if url.startswith("sqlite:///") and not Path(url.split("///", 1)[1].split("?", 1)[0]).is_file():
        # Recreating it would make an empty database with no admin that looks like a working workspace.
        raise AlignloopError(
            f"{settings.workspace} has a config.yaml but its database {url.split('///', 1)[1]} is missing; "
            "restore it from a backup (`alignloop restore`) or move it back"
        )
    engine = make_engine(url)
    create_schema(engine)
    runguard.recover(engine)  # runs left `running` by a process that died (SIGKILL, OOM) are marked failed
    return settings, engine
