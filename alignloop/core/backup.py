"""`alignloop backup OUT` and `alignloop restore BACKUP`: a consistent copy while the server runs.

The database first, as one consistent snapshot: SQLite's online backup API (readers and writers carry on; the
copy is the database at one instant), or `pg_dump` for PostgreSQL (one repeatable-read transaction). Then the
model registry: every directory a registered `ModelVersion` of the snapshot points at (model folders are
written once, before they are registered, so a snapshot never names a half-written one), and config.yaml.
`manifest.json` records what was copied and the workspace it came from.

`restore` fills an empty workspace from a backup and rewrites model paths from the old workspace to the new.

Safety rules (issue #13 L1, L6, L11):
- a backup is the owner's only: 0700 folders, 0600 files (it holds the password hashes and the secret key);
- `restore` checks the whole backup first (manifest, config, a database that opens as an alignloop database,
  every listed model folder), builds the workspace in a hidden folder beside the target and renames it into
  place last: a failed or refused restore leaves no half workspace that would count as valid; a PostgreSQL
  dump is restored in a single transaction, so it is all there or not at all;
- pg_dump and pg_restore get the password through PGPASSWORD in their environment, never on the command line
  (which any local user can read in `ps`).
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import create_engine, make_url, text

from alignloop.core import AlignloopError, __version__
from alignloop.core.config import CONFIG_NAME, Settings
from alignloop.core.files import make_private, private_dir, private_umask

DB_FILE = "alignloop.db"
PG_FILE = "alignloop.pgdump"


def backup(settings: Settings, out: Path) -> dict:
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise AlignloopError(f"{out} exists and is not empty; choose a new folder")
    existed = out.exists()
    try:
        with private_umask():
            manifest = _backup(settings, out)
    except BaseException as exc:
        # A failed backup leaves no folder that looks like a backup (its manifest is written last anyway).
        if existed:
            for child in out.iterdir():
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        else:
            shutil.rmtree(out, ignore_errors=True)
        if isinstance(exc, OSError | sqlite3.Error):
            raise AlignloopError(
                f"cannot write the backup to {out}: {getattr(exc, 'strerror', None) or exc}"
            ) from None
        raise
    make_private(out)
    return manifest


def _backup(settings: Settings, out: Path) -> dict:
    private_dir(out)
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
        dbname, env = _libpq(url)
        proc = subprocess.run(
            [dump, "--format=custom", "--file", str(out / PG_FILE), "--dbname", dbname],
            capture_output=True,
            text=True,
            env=env,
        )
        if proc.returncode:
            raise AlignloopError(f"pg_dump failed: {_first_line(proc.stderr)}")
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
    manifest = {
        "alignloop": __version__,
        "created_at": datetime.now(UTC).isoformat(),
        "workspace": str(workspace),
        "database": database,
        "models": copied,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return manifest


def _first_line(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    return lines[0][:300] if lines else "no message"


def _libpq(url: str) -> tuple[str, dict]:
    """A libpq connection URL without the password, and an environment that carries the password."""
    parsed = make_url(url.replace("postgresql+psycopg://", "postgresql://", 1))
    env = dict(os.environ)
    if parsed.password is not None:
        env["PGPASSWORD"] = str(parsed.password)
    return parsed._replace(password=None).render_as_string(hide_password=False), env  # set() keeps a None


def _model_paths_sqlite(db: Path) -> list[str]:
    conn = sqlite3.connect(db)
    try:
        return [row[0] for row in conn.execute("SELECT path FROM modelversion WHERE path IS NOT NULL")]
    finally:
        conn.close()


def restore(backup_dir: Path, workspace: Path, *, database_url: str = "") -> dict:
    backup_dir, workspace = Path(backup_dir), Path(workspace).resolve()
    manifest = _check_backup(backup_dir)
    if workspace.exists() and (not workspace.is_dir() or any(workspace.iterdir())):
        raise AlignloopError(f"{workspace} is not empty; restore into a new folder")
    if manifest["database"] == PG_FILE and not database_url:
        raise AlignloopError("this backup holds a PostgreSQL dump: give --database-url of an empty database")
    try:
        workspace.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{workspace.name}.restoring-", dir=workspace.parent))
    except OSError as exc:
        raise AlignloopError(f"cannot restore into {workspace}: {exc.strerror or exc}") from None
    try:
        with private_umask():
            _fill(backup_dir, manifest, staging, workspace, database_url)
        make_private(staging)
        if workspace.exists():
            workspace.rmdir()  # empty, checked above
        staging.rename(workspace)  # the workspace appears whole, or not at all
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise AlignloopError(f"cannot restore into {workspace}: {exc.strerror or exc}") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {**manifest, "restored_to": str(workspace)}


def _check_backup(backup_dir: Path) -> dict:
    """The manifest of a complete, readable backup, or a one-line error saying what is wrong with it."""
    manifest_file = backup_dir / "manifest.json"
    if not manifest_file.is_file():
        raise AlignloopError(f"{backup_dir} is not an alignloop backup (no manifest.json)")
    try:
        manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        raise AlignloopError(f"{manifest_file}: not a readable manifest; the backup is damaged") from None
    if (
        not isinstance(manifest, dict)
        or manifest.get("database") not in (DB_FILE, PG_FILE)
        or not isinstance(manifest.get("workspace"), str)
        or not isinstance(manifest.get("models"), list)
        or not all(isinstance(m, str) for m in manifest["models"])
    ):
        raise AlignloopError(f"{manifest_file}: missing or malformed fields; the backup is damaged")
    missing = [name for name in (CONFIG_NAME, manifest["database"]) if not (backup_dir / name).is_file()]
    missing += [f"files/{m}" for m in manifest["models"] if not (backup_dir / "files" / m).is_dir()]
    if missing:
        raise AlignloopError(
            f"{backup_dir} is incomplete: {', '.join(missing[:5])} missing; nothing restored"
        )
    if manifest["database"] == DB_FILE:
        try:
            conn = sqlite3.connect(f"file:{backup_dir / DB_FILE}?mode=ro", uri=True)
            try:
                ok = conn.execute("PRAGMA quick_check").fetchone()[0] == "ok"
                ok = ok and conn.execute("SELECT version FROM schemainfo").fetchone() is not None
            finally:
                conn.close()
        except sqlite3.Error:
            ok = False
        if not ok:
            raise AlignloopError(
                f"{backup_dir / DB_FILE} is not a readable alignloop database; nothing restored"
            )
    return manifest


def _fill(backup_dir: Path, manifest: dict, staging: Path, workspace: Path, database_url: str) -> None:
    """Copy the backup into `staging` (which becomes `workspace`) and point the database at the new place."""
    if (backup_dir / "files").is_dir():
        shutil.copytree(backup_dir / "files", staging, dirs_exist_ok=True)
    old = manifest["workspace"].rstrip("/") + "/"
    config = (backup_dir / CONFIG_NAME).read_text(encoding="utf-8")
    if manifest["database"] == DB_FILE:
        shutil.copy2(backup_dir / DB_FILE, staging / DB_FILE)
        url = f"sqlite:///{staging / DB_FILE}"
    else:
        dbname, env = _libpq(database_url)
        proc = subprocess.run(
            [
                shutil.which("pg_restore") or "pg_restore",
                "--no-owner",
                "--single-transaction",
                "--exit-on-error",
                "--dbname",
                dbname,
                str(backup_dir / PG_FILE),
            ],
            capture_output=True,
            text=True,
            env=env,
        )
        if proc.returncode:
            raise AlignloopError(f"pg_restore failed: {_first_line(proc.stderr)}")
        url = database_url
        import yaml

        data = yaml.safe_load(config) or {}
        config = yaml.safe_dump({**data, "database_url": database_url})
    engine = create_engine(url)
    try:
        with engine.begin() as conn:  # model folders now live under the new workspace
            conn.execute(
                text("UPDATE modelversion SET path = :new || substr(path, :n) WHERE path LIKE :prefix"),
                {"new": str(workspace) + "/", "n": len(old) + 1, "prefix": old + "%"},
            )
            conn.execute(
                text("UPDATE run SET log_path = :new || substr(log_path, :n) WHERE log_path LIKE :prefix"),
                {"new": str(workspace) + "/", "n": len(old) + 1, "prefix": old + "%"},
            )
    finally:
        engine.dispose()
    (staging / CONFIG_NAME).write_text(config, encoding="utf-8")  # last: only now is it a workspace
