"""Issue #13, the data and CLI half: private files (L1), one-line errors (L5), whole-or-nothing restore and no
silent empty database (L6), the newer-schema refusal before create_all (L7), config bounds (L8), pg_dump's
password kept off the command line (L11), judge endpoints from the web limited to config.yaml (M3)."""

import json
import os
import sqlite3
import stat
import subprocess
from pathlib import Path

import pytest
import yaml
from sqlalchemy import inspect, text

from alignloop import jobs
from alignloop.cli import main
from alignloop.core import AlignloopError, backup
from alignloop.core.config import load_settings, read_run_config
from alignloop.core.db import create_schema, make_engine
from alignloop.core.models import SCHEMA_VERSION
from alignloop.core.workspace import init_workspace, open_workspace


@pytest.fixture(autouse=True)
def keep_umask():
    previous = os.umask(0o022)  # a typical user's umask: the code must make its files private regardless
    yield
    os.umask(previous)


def run_cli(capsys, *argv) -> tuple[int, str]:
    code = main(list(argv))
    err = capsys.readouterr().err.strip()
    return code, err


def one_line_error(capsys, *argv) -> str:
    code, err = run_cli(capsys, *argv)
    assert code == 1 and len(err.splitlines()) == 1 and err.startswith("alignloop: error:"), err
    assert "Traceback" not in err
    return err


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- L1 -------------------------------------------------------------------------------------------------------


def test_workspace_database_wal_backups_and_logs_are_private(tmp_path):
    ws = tmp_path / "ws"
    init_workspace(ws)
    settings, engine = open_workspace(ws)
    with engine.begin() as conn:  # a write: SQLite makes the -wal and -shm files now
        conn.execute(text("UPDATE schemainfo SET version = version"))
    for folder in (ws, ws / "cache", ws / "runs"):
        assert mode(folder) == 0o700, folder
    for name in ("alignloop.db", "alignloop.db-wal", "alignloop.db-shm", "config.yaml"):
        assert mode(ws / name) == 0o600, name
    out = tmp_path / "backup"
    backup.backup(settings, out)
    assert mode(out) == 0o700
    assert all(mode(p) == 0o600 for p in out.rglob("*") if p.is_file())
    run = jobs.start_job(engine, settings, kind="generate", arguments="--prompts 1 --model nothing-here")
    log = Path(run.log_path)
    assert mode(log.parent) == 0o700 and mode(log) == 0o600
    engine.dispose()


# --- L5 -------------------------------------------------------------------------------------------------------


@pytest.fixture
def ws(tmp_path, monkeypatch):
    monkeypatch.delenv("ALIGNLOOP_DATABASE_URL", raising=False)
    path = tmp_path / "ws"
    init_workspace(path)
    return path


def test_import_errors_are_one_line_not_tracebacks(ws, tmp_path, capsys):
    surrogate = tmp_path / "surrogate.jsonl"
    surrogate.write_text('{"prompt": "bad \\ud800 text"}\n', encoding="utf-8")
    code, err = run_cli(capsys, "prompts", "import", str(surrogate), "--workspace", str(ws))
    assert code == 1 and "lone surrogate" in err and "Traceback" not in err
    deep = tmp_path / "deep.jsonl"
    deep.write_text("[" * 100_000 + "]" * 100_000 + "\n", encoding="utf-8")
    code, err = run_cli(capsys, "prompts", "import", str(deep), "--workspace", str(ws))
    assert code == 1 and "nested too deeply" in err
    code, err = run_cli(capsys, "prefs", "import", str(deep), "--workspace", str(ws))
    assert code == 1 and "nested too deeply" in err
    huge = tmp_path / "huge.jsonl"
    huge.write_text('{"prompt": "x", "meta": {"n": ' + "9" * 5000 + "}}\n", encoding="utf-8")
    code, err = run_cli(capsys, "prompts", "import", str(huge), "--workspace", str(ws))
    assert code == 1 and "too large" in err
    examples = tmp_path / "examples.json"
    for content in ("{not json", "[" * 100_000, '{"user": "x"}'):
        examples.write_text(content, encoding="utf-8")
        one_line_error(capsys, "presets", "save", "p", "--examples", str(examples), "--workspace", str(ws))
    one_line_error(
        capsys, "presets", "save", "p", "--examples", str(tmp_path / "missing.json"), "--workspace", str(ws)
    )


def _config(ws: Path, **changes) -> None:
    data = yaml.safe_load((ws / "config.yaml").read_text())
    (ws / "config.yaml").write_text(yaml.safe_dump({**data, **changes}))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"secret_key": "x"}, "secret_key must be at least"),
        ({"max_new_tokens": -5}, "max_new_tokens must be between 1 and"),
        ({"temperature": -1}, "temperature must be in \\["),
        ({"batch_size": 0}, "batch_size must be between 1 and"),
        ({"target_votes": 10**30}, "target_votes must be an integer"),
        ({"lease_minutes": "soon"}, "lease_minutes must be a number"),
        ({"allow_noncommercial": "yes"}, "allow_noncommercial must be true or false"),
        ({"login_attempts": True}, "login_attempts must be an integer"),
        ({"judge_endpoints": [{"base_url": "ftp://x", "api_key_env": "K"}]}, "judge_endpoints"),
    ],
)
def test_bad_settings_are_refused_with_the_setting_named(ws, changes, message):
    _config(ws, **changes)
    with pytest.raises(AlignloopError, match=message):
        load_settings(ws)


def test_binary_and_non_mapping_configs(ws, capsys):
    (ws / "config.yaml").write_bytes(b"\xff\xfe\x00binary\x00")
    assert "not valid YAML" in one_line_error(capsys, "keys", "list", "--workspace", str(ws))
    (ws / "config.yaml").write_text("- a list\n")
    assert "expected a mapping" in one_line_error(capsys, "keys", "list", "--workspace", str(ws))
    (ws / "config.yaml").write_text("target_votes: " + "9" * 5000 + "\n")
    assert "not valid YAML" in one_line_error(capsys, "keys", "list", "--workspace", str(ws))


def test_run_config_numbers_written_as_strings_and_data_as_a_string(tmp_path):
    from sft.train import SFTRunConfig

    path = tmp_path / "sft.yaml"
    path.write_text("learning_rate: 5e-5\nmax_steps: '3'\ndata: one.jsonl\n")  # PyYAML: '5e-5' is a string
    config = read_run_config(SFTRunConfig, path, {}, what="SFT")
    assert config.learning_rate == 5e-5 and config.max_steps == 3 and config.data == ["one.jsonl"]
    path.write_text("max_steps: 1e999999\n")
    with pytest.raises(AlignloopError, match="max_steps must be an integer"):
        read_run_config(SFTRunConfig, path, {}, what="SFT")
    path.write_text("data: {a: 1}\n")
    with pytest.raises(AlignloopError, match="data must be a list of strings"):
        read_run_config(SFTRunConfig, path, {}, what="SFT")
    path.write_bytes(b"\x00\xff\xfe")
    with pytest.raises(AlignloopError, match="cannot read"):
        read_run_config(SFTRunConfig, path, {}, what="SFT")


def test_init_on_a_read_only_path_and_unsupported_database_urls(tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    one_line_error(capsys, "init", "--workspace", str(tmp_path / "a-file" / "ws"))  # holds even as root
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        if not os.access(locked, os.W_OK):  # root may write anywhere
            one_line_error(capsys, "init", "--workspace", str(locked / "ws"))
    finally:
        locked.chmod(0o700)
    err = one_line_error(
        capsys, "init", "--workspace", str(tmp_path / "ws2"), "--database-url", "mysql://u@h/db"
    )
    assert "unsupported database URL" in err
    assert not (tmp_path / "ws2").exists()  # a refused init leaves nothing behind


# --- L6, L7 ---------------------------------------------------------------------------------------------------


def test_a_missing_database_is_an_error_not_an_empty_new_one(ws, capsys):
    (ws / "alignloop.db").unlink()
    assert "database" in one_line_error(capsys, "keys", "list", "--workspace", str(ws))
    assert not (ws / "alignloop.db").exists()


@pytest.mark.parametrize("damage", ["no-db", "no-config", "bad-manifest", "garbage-db", "no-model-folder"])
def test_restore_from_a_damaged_backup_refuses_and_makes_nothing(ws, tmp_path, capsys, damage):
    settings, engine = open_workspace(ws)
    engine.dispose()
    out = tmp_path / "backup"
    backup.backup(settings, out)
    if damage == "no-db":
        (out / "alignloop.db").unlink()
    elif damage == "no-config":
        (out / "config.yaml").unlink()
    elif damage == "bad-manifest":
        (out / "manifest.json").write_text("{")
    elif damage == "garbage-db":
        (out / "alignloop.db").write_bytes(b"SQLite format 3\x00" + b"\x00" * 100)
    else:
        manifest = json.loads((out / "manifest.json").read_text())
        (out / "manifest.json").write_text(json.dumps({**manifest, "models": ["models/gone"]}))
    target = tmp_path / "restored"
    err = one_line_error(capsys, "restore", str(out), "--workspace", str(target))
    assert "backup" in err or "damaged" in err or "incomplete" in err or "database" in err
    assert not target.exists()
    assert [p.name for p in tmp_path.iterdir() if "restoring" in p.name] == []


def test_a_complete_backup_restores(ws, tmp_path, capsys):
    settings, engine = open_workspace(ws)
    engine.dispose()
    backup.backup(settings, tmp_path / "b")
    assert run_cli(capsys, "restore", str(tmp_path / "b"), "--workspace", str(tmp_path / "r"))[0] == 0
    open_workspace(tmp_path / "r")[1].dispose()


def test_newer_schema_is_refused_before_create_all_touches_it(tmp_path):
    db = tmp_path / "future.db"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE schemainfo (id INTEGER PRIMARY KEY, version INTEGER NOT NULL)")
    conn.execute("INSERT INTO schemainfo VALUES (1, ?)", (SCHEMA_VERSION + 1,))
    conn.commit()
    conn.close()
    engine = make_engine(f"sqlite:///{db}")
    with pytest.raises(AlignloopError, match="newer than this alignloop"):
        create_schema(engine)
    assert inspect(engine).get_table_names() == ["schemainfo"]  # nothing was created
    engine.dispose()


# --- L11 ------------------------------------------------------------------------------------------------------


def test_pg_dump_gets_the_password_from_the_environment(ws, tmp_path, monkeypatch):
    import dataclasses

    calls = []

    def fake_run(argv, **kwargs):
        calls.append((argv, kwargs.get("env") or {}))
        return subprocess.CompletedProcess(argv, 1, "", "stopped here by the test")

    monkeypatch.setattr(backup.subprocess, "run", fake_run)
    monkeypatch.setattr(backup.shutil, "which", lambda name: f"/usr/bin/{name}")
    settings = dataclasses.replace(
        load_settings(ws), database_url="postgresql://alignloop:s3cret-pw@127.0.0.1:5432/alignloop"
    )
    with pytest.raises(AlignloopError, match="pg_dump failed"):
        backup.backup(settings, tmp_path / "b")
    ((argv, env),) = calls
    assert not any("s3cret-pw" in a for a in argv) and env["PGPASSWORD"] == "s3cret-pw"
    assert "postgresql://alignloop@127.0.0.1:5432/alignloop" in argv


# --- M3 -------------------------------------------------------------------------------------------------------


def test_judge_jobs_from_the_web_use_only_configured_endpoints(ws):
    import dataclasses

    settings = dataclasses.replace(
        load_settings(ws),
        judge_endpoints=[{"base_url": "https://judge.internal/v1", "api_key_env": "JUDGE_KEY"}],
    )
    ok = "--openai-base-url https://judge.internal/v1/ --openai-model m --api-key-env JUDGE_KEY"
    assert jobs.command_for("judge", ok, settings)[:2] == ["judge", "run"]
    for bad in (
        "--openai-base-url https://evil.example/v1 --openai-model m --api-key-env JUDGE_KEY",
        "--openai-base-url https://judge.internal/v1 --openai-model m --api-key-env AWS_SECRET_ACCESS_KEY",
        "--openai-base-url https://judge.internal/v1 --openai-model m",  # the default OPENAI_API_KEY: not listed
        "--openai-base=https://evil.example/v1 --openai-model m --api-key-env JUDGE_KEY",  # an abbreviation
    ):
        with pytest.raises(AlignloopError, match="not in judge_endpoints"):
            jobs.command_for("judge", bad, settings)
        _, engine = open_workspace(ws)
        with pytest.raises(AlignloopError, match="not in judge_endpoints"):
            jobs.start_job(engine, settings, kind="judge", arguments=bad)
        engine.dispose()
    assert list((ws / "runs").iterdir()) == []  # nothing started
    # The owner's own shell is not limited: the CLI parser still takes any endpoint.
    assert jobs.command_for("judge", "--openai-base-url https://any.example --openai-model m")
