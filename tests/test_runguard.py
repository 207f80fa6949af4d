"""A Run never stays `running` after its process is gone: SIGKILLed -> failed by the next command that opens
the workspace; a command that raises -> failed with the reason. Live owners and other hosts are left alone."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from sqlmodel import Session, select

from alignloop.cli import main
from alignloop.core import crud, runguard
from alignloop.core.db import session_scope
from alignloop.core.models import Run

HOLD = """
import sys, time
from alignloop.core.config import load_settings
from alignloop.core.db import make_engine, session_scope
from alignloop.core import crud
engine = make_engine(load_settings(sys.argv[1]).db_url)
with session_scope(engine) as session:
    run_id = crud.create_run(session, kind="rl", config={}).id
print(run_id, flush=True)
time.sleep(120)
"""


def test_a_sigkilled_run_is_marked_failed_by_the_next_command(workspace, tmp_path):
    settings, engine, _ = workspace
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(settings.workspace)], stdout=subprocess.PIPE, text=True, env=env
    )
    killed_id = int(proc.stdout.readline())
    # While its process lives, opening the workspace leaves the run alone.
    assert runguard.recover(engine) == []
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with session_scope(engine) as session:
        mine = crud.create_run(session, kind="reward", config={}).id  # owned by this (live) process
        elsewhere = crud.create_run(session, kind="sft", config={})
        elsewhere.metrics = {"owner": {"pid": proc.pid, "host": "another-machine", "start": 1}}
        elsewhere_id = elsewhere.id
        legacy = crud.create_run(session, kind="sft", config={})
        legacy.metrics = {}
        legacy_id = legacy.id
    with Session(engine) as s:
        assert s.get(Run, killed_id).status == "running"  # the process died without a word
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "hello"}) + "\n")
    assert main(["prompts", "import", str(prompts), "--workspace", str(settings.workspace)]) == 0
    with Session(engine) as s:
        killed = s.get(Run, killed_id)
        assert killed.status == "failed" and killed.finished_at is not None
        assert killed.error == f"process {proc.pid} ended without finishing (killed? OOM?)"
        assert killed.metrics["owner"]["pid"] == proc.pid
        assert [s.get(Run, i).status for i in (mine, elsewhere_id, legacy_id)] == ["running"] * 3


def test_a_command_that_raises_marks_its_run_failed(workspace, monkeypatch):
    settings, engine, _ = workspace
    import alignloop.cli as cli

    with session_scope(engine) as session:
        earlier = crud.create_run(session, kind="rl", config={}).id  # not this command's: left alone

    def crashing(args):
        _, eng = cli.open_workspace(args)
        with session_scope(eng) as session:
            crud.create_run(session, kind="rl", config={"crash": True})
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(cli, "cmd_round_lineage", crashing)
    with pytest.raises(RuntimeError):
        main(["round", "lineage", "--vote", "1", "--workspace", str(settings.workspace)])
    with Session(engine) as s:
        runs = {r.id: r for r in s.exec(select(Run)).all()}
    crashed = next(r for r in runs.values() if r.config.get("crash"))
    assert crashed.status == "failed" and crashed.error == "RuntimeError: CUDA out of memory"
    assert runs[earlier].status == "running"


def test_a_process_reaped_while_it_is_checked_reads_as_gone(monkeypatch):
    """The race CI hit: the signal finds the process, then it is reaped before /proc/PID/stat is read."""
    child = subprocess.Popen(["sleep", "30"])
    assert runguard.alive(child.pid)
    child.kill()
    child.wait()  # reaped: its /proc entry is gone
    # ...but the signal check had still found it
    monkeypatch.setattr(runguard.os, "kill", lambda pid, sig: None)
    assert runguard.alive(child.pid) is False

    zombie = subprocess.Popen(["true"])
    deadline = time.time() + 30
    while runguard.alive(zombie.pid) and time.time() < deadline:  # exited, not yet reaped: not alive
        time.sleep(0.05)
    assert not runguard.alive(zombie.pid)
    zombie.wait()
