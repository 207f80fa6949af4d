"""`alignloop backup OUT` and `alignloop restore BACKUP`: a consistent copy while the server runs.

The database first, as one consistent snapshot: SQLite's online backup API (readers and writers carry on; the
copy is the database at one instant), or `pg_dump` for PostgreSQL (one repeatable-read transaction). Then the
model registry: every directory a registered `ModelVersion` of the snapshot points at (model folders are
written once, before they are registered, so a snapshot never names a half-written one), and config.yaml.
`manifest.json` records what was copied and the workspace it came from.

`restore` fills an empty workspace from a backup and rewrites model paths from the old workspace to the new.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import create_engine, text

from alignloop.core import AlignloopError, __version__
from alignloop.core.config import CONFIG_NAME, Settings

DB_FILE = "alignloop.db"
PG_FILE = "alignloop.pgdump"


def backup(settings: Settings, out: Path) -> dict:
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise AlignloopError(f"{out} exists and is not empty; choose a new folder")
    out.mkdir(parents=True, exist_ok=True)
    url = settings.db_url
    if url.startswith("sqlite"):
        source = sqlite3.connect(url.split("///", 1)[1])
        target = sqlite3.connect(out / DB_FILE)
        with target:
            source.backup(target)  # consistent online copy
        source.close()
        target.close()
        paths = _model_paths_sqlite(out / DB_FILE)
        database = DB_FILE
    else:
        dump = shutil.which("pg_dump")
        if dump is None:
            raise AlignloopError("backing up PostgreSQL needs pg_dump (apt-get install postgresql-client)")
        proc = subprocess.run([dump, "--format=custom", "--file", str(out / PG_FILE), _libpq_url(url)],
                              capture_output=True, text=True)  # fmt: skip
        if proc.returncode:
            raise AlignloopError(f"pg_dump failed: {proc.stderr.strip()[:500]}")
        with create_engine(url).connect() as conn:
            paths = [
                row[0] for row in conn.execute(text("SELECT path FROM modelversion WHERE path IS NOT NULL"))
            ]
        database = PG_FILE
    copied = []
    workspace = settings.workspace.resolve()
    for path in sorted(set(paths)):
        source = Path(path)
        if source.is_dir() and source.resolve().is_relative_to(workspace):
            relative = source.resolve().relative_to(workspace)
            shutil.copytree(source, out / "files" / relative)
            copied.append(str(relative))
    shutil.copy2(settings.workspace / CONFIG_NAME, out / CONFIG_NAME)
    manifest = {"alignloop": __version__, "created_at": datetime.now(UTC).isoformat(), "workspace": str(workspace),
                "database": database, "models": copied}  # fmt: skip
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return manifest


def _libpq_url(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def _model_paths_sqlite(db: Path) -> list[str]:
    conn = sqlite3.connect(db)
    try:
        return [row[0] for row in conn.execute("SELECT path FROM modelversion WHERE path IS NOT NULL")]
    finally:
        conn.close()


def restore(backup_dir: Path, workspace: Path, *, database_url: str = "") -> dict:
    backup_dir, workspace = Path(backup_dir), Path(workspace).resolve()
    manifest_file = backup_dir / "manifest.json"
    if not manifest_file.is_file():
        raise AlignloopError(f"{backup_dir} is not an alignloop backup (no manifest.json)")
    manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
    if workspace.exists() and any(workspace.iterdir()):
        raise AlignloopError(f"{workspace} is not empty; restore into a new folder")
    workspace.mkdir(parents=True, exist_ok=True)
    shutil.copy2(backup_dir / CONFIG_NAME, workspace / CONFIG_NAME)
    if (backup_dir / "files").is_dir():
        shutil.copytree(backup_dir / "files", workspace, dirs_exist_ok=True)
    old = manifest["workspace"].rstrip("/") + "/"
    if manifest["database"] == DB_FILE:
        shutil.copy2(backup_dir / DB_FILE, workspace / DB_FILE)
        url = f"sqlite:///{workspace / DB_FILE}"
    else:
        if not database_url:
            raise AlignloopError(
                "this backup holds a PostgreSQL dump: give --database-url of an empty database"
            )
        proc = subprocess.run([shutil.which("pg_restore") or "pg_restore", "--no-owner", "--dbname",
                               _libpq_url(database_url), str(backup_dir / PG_FILE)], capture_output=True, text=True)  # fmt: skip
        if proc.returncode:
            raise AlignloopError(f"pg_restore failed: {proc.stderr.strip()[:500]}")
        url = database_url
        import yaml

        config = yaml.safe_load((workspace / CONFIG_NAME).read_text(encoding="utf-8")) or {}
        (workspace / CONFIG_NAME).write_text(
            yaml.safe_dump({**config, "database_url": database_url}), encoding="utf-8"
        )
    engine = create_engine(url)
    with engine.begin() as conn:  # model folders now live under the new workspace
        conn.execute(text("UPDATE modelversion SET path = :new || substr(path, :n) WHERE path LIKE :prefix"),
                     {"new": str(workspace) + "/", "n": len(old) + 1, "prefix": old + "%"})  # fmt: skip
        conn.execute(text("UPDATE run SET log_path = :new || substr(log_path, :n) WHERE log_path LIKE :prefix"),
                     {"new": str(workspace) + "/", "n": len(old) + 1, "prefix": old + "%"})  # fmt: skip
    engine.dispose()
    return {**manifest, "restored_to": str(workspace)}
