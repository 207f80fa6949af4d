"""Reliability with real processes: SIGKILL mid vote load loses no acknowledged vote; backups taken during the
load are consistent and restore into a working workspace."""

import os
import shutil
import signal
import sqlite3
import threading
import time

import httpx
import pytest
from conftest import start_server
from sqlmodel import Session, func, select

from alignloop.cli import main
from alignloop.core import crud
from alignloop.core.config import load_settings
from alignloop.core.db import make_engine, session_scope
from alignloop.core.models import Comparison, Vote

ANNOTATORS = 4


@pytest.fixture
def loaded_workspace(workspace):
    settings, engine, _ = workspace
    with session_scope(engine) as s:
        for i in range(ANNOTATORS):
            crud.create_user(s, name=f"ann{i}", role="annotator", password="annotator-pass")
        for i in range(300):
            (p,), _ = crud.add_prompts(s, prompts=[crud.PromptCreate(messages=[{"role": "user", "content": f"q{i}"}])],
                                       source="t")  # fmt: skip
            gens = [crud.add_generation(s, prompt_id=p.id, text=f"answer {i}{k}") for k in "xy"]
            crud.create_comparison(s, prompt_id=p.id, generation_ids=[g.id for g in gens], target_votes=2)
    return settings, engine


def vote_until_stopped(base, name, acknowledged, stop):
    client = httpx.Client(base_url=base, timeout=5)
    try:
        client.post("/login", data={"username": name, "password": "annotator-pass"})
        item = client.get("/api/annotate/next")
        item = item.json() if item.status_code == 200 else None
        while item and not stop.is_set():
            response = client.post(
                "/api/annotate/vote", json={"comparison_id": item["comparison_id"], "choice": "a"}
            )
            if response.status_code != 201:
                break
            acknowledged.append(response.json()["vote_id"])
            item = response.json()["next"]
    except httpx.TransportError:
        pass  # the server was killed under us
    finally:
        client.close()


def check_consistent(engine):
    with Session(engine) as s:
        counts = dict(s.exec(select(Vote.comparison_id, func.count()).group_by(Vote.comparison_id)).all())
        for c in s.exec(select(Comparison)).all():
            assert c.num_votes == counts.get(c.id, 0) <= c.target_votes, (
                c.id
            )  # nothing half-written or over target
            assert (c.status == "done") == (c.num_votes == c.target_votes)
        return set(s.exec(select(Vote.id)).all())


def run_load(base, seconds, stop=None):
    acknowledged, stop = [], stop or threading.Event()
    threads = [threading.Thread(target=vote_until_stopped, args=(base, f"ann{i}", acknowledged, stop))
               for i in range(ANNOTATORS)]  # fmt: skip
    for t in threads:
        t.start()
    return acknowledged, stop, threads


def test_sigkill_mid_load_loses_no_acknowledged_vote(loaded_workspace):
    settings, engine = loaded_workspace
    proc, base = start_server(settings.workspace)
    acknowledged, stop, threads = run_load(base, 0)
    deadline = time.time() + 30
    while len(acknowledged) < 40 and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # no shutdown, no flush: the process is gone
    proc.wait()
    for t in threads:
        t.join(timeout=30)
    assert len(acknowledged) >= 40
    fresh = make_engine(settings.db_url)
    stored = check_consistent(fresh)
    assert set(acknowledged) <= stored  # every vote the client was told about survived
    db = settings.workspace / "alignloop.db"
    assert sqlite3.connect(db).execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    # and the restarted server carries on
    proc, base = start_server(settings.workspace)
    try:
        more, stop, threads = run_load(base, 0)
        time.sleep(1.5)
        stop.set()
        for t in threads:
            t.join(timeout=30)
        assert more and set(more) <= check_consistent(fresh)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_backup_during_load_restores_consistently(loaded_workspace, tiny_model_dir, tmp_path):
    settings, engine = loaded_workspace
    model_dir = settings.runs_dir / "run99" / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    with session_scope(engine) as s:
        crud.register_model(s, name="tiny", kind="policy", base=str(tiny_model_dir), path=str(model_dir))
    proc, base = start_server(settings.workspace)
    try:
        acknowledged, stop, threads = run_load(base, 0)
        while len(acknowledged) < 20:
            time.sleep(0.05)
        assert main(["backup", str(tmp_path / "bk"), "--workspace", str(settings.workspace)]) == 0
        time.sleep(0.5)
        stop.set()
        for t in threads:
            t.join(timeout=30)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert main(["restore", str(tmp_path / "bk"), "--workspace", str(tmp_path / "restored")]) == 0
    restored = load_settings(tmp_path / "restored")
    restored_engine = make_engine(restored.db_url)
    votes = check_consistent(restored_engine)
    assert 20 <= len(votes) <= len(check_consistent(engine))
    from alignloop.core.registry import resolve

    with Session(restored_engine) as s:
        version = crud.get_model_version(s, name="tiny")
        assert version.path.startswith(str(tmp_path / "restored"))
        assert resolve("tiny", settings=restored, session=s).model is not None
    assert (
        main(["restore", str(tmp_path / "bk"), "--workspace", str(tmp_path / "restored")]) == 1
    )  # not empty
    assert main(["backup", str(tmp_path / "bk"), "--workspace", str(settings.workspace)]) == 1  # not empty
