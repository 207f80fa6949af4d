"""The CLI end to end on the tiny model, and its one-line errors."""

import json
import os
import subprocess
import sys

import pytest
from sqlmodel import Session

from alignloop.cli import main
from alignloop.core import crud


def run(*args, workspace=None):
    argv = list(args) + (["--workspace", str(workspace)] if workspace else [])
    return main(argv)


def test_help_for_every_command(capsys):
    for command in (
        ["init"],
        ["demo"],
        ["prompts", "import"],
        ["generate"],
        ["users", "add"],
        ["serve"],
        ["export", "prefs"],
    ):
        with pytest.raises(SystemExit) as info:
            main([*command, "--help"])
        assert info.value.code == 0
        assert "usage: alignloop" in capsys.readouterr().out


def test_init_prints_a_random_admin_password_once(tmp_path, capsys):
    ws = tmp_path / "ws"
    assert run("init", workspace=ws) == 0
    out = capsys.readouterr().out
    password = out.split("admin / ")[1].split()[0]
    assert len(password) >= 12
    assert (ws / "config.yaml").stat().st_mode & 0o077 == 0  # the cookie key is not world-readable
    assert run("init", workspace=ws) == 1
    assert "already an alignloop workspace" in capsys.readouterr().err


def test_init_refuses_a_non_empty_folder(tmp_path, capsys):
    (tmp_path / "stuff.txt").write_text("x")
    assert run("init", workspace=tmp_path) == 1
    assert "not empty" in capsys.readouterr().err
    assert not (tmp_path / "config.yaml").exists()


def test_not_a_workspace_is_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "alignloop.cli", "generate", "--workspace", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"alignloop: error: {tmp_path} is not an alignloop workspace (no config.yaml); run `alignloop init` first"
    ]


def test_users_add_and_passwd(workspace, capsys):
    settings, engine, _ = workspace
    assert run("users", "add", "ann", "--role", "annotator", workspace=settings.workspace) == 0
    password = capsys.readouterr().out.split("password: ")[1].split()[0]
    assert (
        run("users", "add", "judge", "--role", "annotator", "--kind", "ai", workspace=settings.workspace) == 0
    )
    assert run("users", "add", "ann", "--role", "annotator", workspace=settings.workspace) == 1
    assert "already exists" in capsys.readouterr().err
    with Session(engine) as s:
        assert crud.authenticate(s, name="ann", password=password) is not None
        assert crud.get_user(s, name="judge").kind == "ai"
    assert run("users", "passwd", "ann", workspace=settings.workspace) == 0
    new = capsys.readouterr().out.split(": ")[1].split()[0]
    with Session(engine) as s:
        assert crud.authenticate(s, name="ann", password=new) is not None
        assert crud.authenticate(s, name="ann", password=password) is None


def test_generate_then_vote_then_export(workspace, tiny_model_dir, tmp_path, capsys):
    settings, engine, _ = workspace
    ws = settings.workspace
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Tell me fact number {i}."}) + "\n" for i in range(6)))
    assert run("prompts", "import", str(prompts), workspace=ws) == 0
    code = run(
        "generate", "--model", str(tiny_model_dir), "--prompts", "6", "--samples", "2",
        "--max-new-tokens", "6", "--temperature", "1.0", "--seed", "3", workspace=ws,
    )  # fmt: skip
    assert code == 0
    assert "queued" in capsys.readouterr().out

    assert run("export", "prefs", str(tmp_path / "none.jsonl"), workspace=ws) == 1
    assert "nothing to export" in capsys.readouterr().err

    with Session(engine) as s:
        user = crud.create_user(s, name="ann", role="annotator", password="longenough")
        for i, c in enumerate(crud.list_comparisons(s, status="queued")):
            crud.record_vote(s, comparison_id=c.id, user_id=user.id, choice="ab"[i % 2], seconds=3.5)
        s.commit()
        num_votes = len(crud.raw_votes(s))

    from datasets import load_from_disk

    assert run("export", "prefs", str(tmp_path / "pairs.jsonl"), workspace=ws) == 0
    lines = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert len(lines) == num_votes and {"prompt", "chosen", "rejected"} <= set(lines[0])
    assert lines[0]["chosen"][0]["role"] == "assistant"
    assert run("export", "prefs", str(tmp_path / "pairs.parquet"), workspace=ws) == 0
    assert run("export", "prefs", str(tmp_path / "raw_ds"), "--raw", workspace=ws) == 0
    raw = load_from_disk(str(tmp_path / "raw_ds"))
    assert len(raw) == num_votes and raw[0]["annotator"] == "ann" and raw[0]["seconds"] == 3.5
    assert run("export", "prefs", str(tmp_path / "pairs.jsonl"), workspace=ws) == 1
    assert "already exists" in capsys.readouterr().err


def test_refused_licence_and_missing_model_are_one_line(workspace, tmp_path, tiny_model_dir):
    import shutil

    settings, _, _ = workspace
    nc = tmp_path / "nc-model"
    shutil.copytree(tiny_model_dir, nc)
    (nc / "README.md").write_text("---\nlicense: cc-by-nc-sa-4.0\n---\n")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hello"}\n')
    env = {**os.environ, "ALIGNLOOP_HOME": str(settings.workspace)}
    subprocess.run(
        [sys.executable, "-m", "alignloop.cli", "prompts", "import", str(prompts)], env=env, check=True
    )
    for model, message in [
        (str(nc), "licensed 'cc-by-nc-sa-4.0'"),
        ("nope/missing", "not in the local hub cache"),
    ]:
        proc = subprocess.run(
            [sys.executable, "-m", "alignloop.cli", "generate", "--model", model, "--prompts", "1"],
            capture_output=True, text=True, env=env, timeout=300,
        )  # fmt: skip
        assert proc.returncode == 1
        errors = [line for line in proc.stderr.splitlines() if line.startswith("alignloop: error:")]
        assert len(errors) == 1 and message in errors[0] and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "line, message",
    [
        ("gold_share: 2", "gold_share must be in [0, 1]"),
        ("aspects: []", "aspects must be a list"),
        ("lease_minutes: 0", "lease_minutes and target_votes positive"),
        ("colour: blue", "unknown setting(s) colour"),
        ("{{{", "not valid YAML"),
    ],
)
def test_bad_config_is_one_clear_line(workspace, line, message, capsys):
    settings, _, _ = workspace
    config = settings.workspace / "config.yaml"
    config.write_text(config.read_text() + "\n" + line + "\n" if line != "{{{" else line)
    assert run("users", "add", "x", "--role", "annotator", workspace=settings.workspace) == 1
    assert message in capsys.readouterr().err
