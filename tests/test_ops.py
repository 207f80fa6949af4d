"""Operations: background jobs (start, link, cancel, recover after a restart), users and keys, roles everywhere."""

import json
import time

import pytest
from conftest import web_login
from fastapi.testclient import TestClient
from sqlmodel import Session, select

from alignloop import jobs
from alignloop.core import AlignloopError, crud
from alignloop.core.db import session_scope
from alignloop.core.models import Run
from alignloop.core.runguard import alive
from alignloop.web import create_app


def wait_for(predicate, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def job_status(engine, job_id):
    with Session(engine) as s:
        return s.get(Run, job_id).status


@pytest.fixture
def admin_client(workspace):
    settings, engine, password = workspace
    with session_scope(engine) as s:
        crud.create_user(s, name="ann", role="annotator", password="annotator-pass")
    with TestClient(create_app(settings, engine)) as client:
        web_login(client, "admin", password)
        yield client, settings, engine


def test_bad_job_arguments_start_nothing(admin_client):
    client, _, engine = admin_client
    for body in (
        {"kind": "generate", "arguments": "--prompts many"},
        {"kind": "rm", "arguments": ""},
        {"kind": "generate", "arguments": "--samples 99999999999999999999"},
        {"kind": "rl", "arguments": "--algo dpo --steps 100000000000"},
        {"kind": "reward", "arguments": "--workspace /elsewhere"},
        {"kind": "sft", "arguments": "--bogus"},
    ):
        response = client.post("/api/jobs", json=body)
        assert response.status_code in (400, 422), body
    with Session(engine) as s:
        assert s.exec(select(Run)).all() == []


def test_a_job_runs_in_the_background_and_links_its_runs(admin_client, tiny_model_dir, tmp_path):
    client, settings, engine = admin_client
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Question {i}?"}) + "\n" for i in range(3)))
    from alignloop.cli import main

    assert main(["prompts", "import", str(prompts), "--workspace", str(settings.workspace)]) == 0
    response = client.post(
        "/api/jobs",
        json={"kind": "generate", "arguments": f"--model {tiny_model_dir} --prompts 3 --max-new-tokens 4"},
    )
    assert response.status_code == 201
    job_id = response.json()["id"]
    assert wait_for(lambda: job_status(engine, job_id) != "running")
    job = client.get(f"/api/jobs/{job_id}").json()
    assert job["status"] == "succeeded" and "queued" in job["log"], job
    assert [r["kind"] for r in job["runs"]] == ["generate"]  # the command's own run points back at the job
    page = client.get(f"/admin/jobs/{job_id}")
    assert page.status_code == 200 and "metrics.png" in page.text


def test_cancel_stops_the_process_group(admin_client, tiny_model_dir, tmp_path):
    client, settings, engine = admin_client
    data = tmp_path / "d.jsonl"
    data.write_text(
        "".join(json.dumps({"instruction": f"Say {i}", "response": f"{i}"}) + "\n" for i in range(8))
    )
    args = f"--data {data} --base {tiny_model_dir} --max-steps 100000 --method lora"
    job_id = client.post("/api/jobs", json={"kind": "sft", "arguments": args}).json()["id"]
    with Session(engine) as s:
        pid = s.get(Run, job_id).metrics["pid"]
    assert wait_for(
        lambda: (
            "it/s" in client.get(f"/api/jobs/{job_id}").json()["log"]
            or "s/it" in client.get(f"/api/jobs/{job_id}").json()["log"]
        ),
        timeout=120,
    )
    assert client.post(f"/api/jobs/{job_id}/cancel").json()["status"] == "cancelled"
    assert wait_for(lambda: not alive(pid), timeout=30)
    assert job_status(engine, job_id) == "cancelled"
    assert client.post(f"/api/jobs/{job_id}/cancel").status_code == 409


def test_at_most_max_jobs_run_at_once(admin_client, tiny_model_dir, tmp_path):
    """Issue 13 (M4): the third job is refused while two run, also when the requests race each other."""
    import threading

    client, settings, engine = admin_client
    assert settings.max_jobs == 2  # the default in config.yaml
    data = tmp_path / "d.jsonl"
    data.write_text(
        "".join(json.dumps({"instruction": f"Say {i}", "response": f"{i}"}) + "\n" for i in range(8))
    )
    args = f"--data {data} --base {tiny_model_dir} --max-steps 100000 --method lora"

    def running_pids():
        with Session(engine) as s:
            rows = s.exec(select(Run).where(Run.kind == "job", Run.status == "running")).all()
            return [r.metrics["pid"] for r in rows]

    try:
        first = [client.post("/api/jobs", json={"kind": "sft", "arguments": args}) for _ in range(2)]
        assert [r.status_code for r in first] == [201, 201]
        third = client.post("/api/jobs", json={"kind": "sft", "arguments": args})
        assert third.status_code == 429 and "max_jobs: 2" in third.json()["detail"]
        with Session(engine) as s:
            assert len(s.exec(select(Run).where(Run.kind == "job")).all()) == 2  # the refused one left no row
        for r in first:
            assert client.post(f"/api/jobs/{r.json()['id']}/cancel").status_code == 200

        # Four admins at once for two free slots: exactly two start (count and insert are one transaction).
        barrier, outcomes = threading.Barrier(4), []

        def start():
            barrier.wait()
            try:
                outcomes.append(jobs.start_job(engine, settings, kind="sft", arguments=args).id)
            except jobs.TooManyJobs:
                outcomes.append("refused")

        threads = [threading.Thread(target=start) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(map(str, outcomes)).count("refused") == 2 and len(running_pids()) == 2
    finally:
        pids = running_pids()
        with Session(engine) as s:
            ids = [r.id for r in s.exec(select(Run).where(Run.kind == "job", Run.status == "running")).all()]
        for job_id in ids:
            jobs.cancel_job(engine, job_id)
        assert wait_for(lambda: not any(alive(pid) for pid in pids), timeout=60)


def test_a_restart_leaves_no_job_falsely_running(workspace):
    settings, engine, _ = workspace
    with session_scope(engine) as s:
        ghost = crud.create_run(s, kind="job", config={"job_kind": "reward", "argv": ["reward", "train"]})
        ghost.metrics = {"pid": 999_999_9}
        s.add(ghost)
    create_app(settings, engine)  # what a server start does
    with Session(engine) as s:
        row = s.get(Run, ghost.id)
        assert row.status == "failed" and "restarted" in row.error


def test_admin_pages_are_admin_only(workspace):
    settings, engine, password = workspace
    with session_scope(engine) as s:
        crud.create_user(s, name="ann", role="annotator", password="annotator-pass")
    with TestClient(create_app(settings, engine)) as client:
        web_login(client, "ann", "annotator-pass")
        for path in (
            "/api/jobs",
            "/admin/jobs",
            "/admin/users",
            "/admin/keys",
            "/api/rounds",
            "/admin/rounds",
            "/admin/reward",
            "/admin/rl",
            "/api/rl/runs",
            "/api/reward/models",
            "/admin/runs/1/metrics.png",
        ):
            assert client.get(path).status_code == 403, path
        for path, data in (
            ("/admin/users", {"name": "x", "role": "admin"}),
            ("/admin/keys", {"name": "k", "user": "ann"}),
            ("/admin/jobs", {"kind": "generate"}),
        ):
            assert client.post(path, data=data).status_code == 403, path
        assert client.post("/api/jobs", json={"kind": "generate"}).status_code == 403


def test_user_and_key_management(admin_client):
    client, settings, engine = admin_client
    page = client.post("/admin/users", data={"name": "rev", "role": "reviewer"})
    assert "password (shown once):" in page.text
    password = page.text.split('<code id="secret">')[1].split("</code>")[0]
    with Session(engine) as s:
        rev = crud.get_user(s, name="rev")
        assert crud.authenticate(s, name="rev", password=password) is not None
    reset = client.post(f"/admin/users/{rev.id}/reset-password")
    new_password = reset.text.split('<code id="secret">')[1].split("</code>")[0]
    with Session(engine) as s:
        assert crud.authenticate(s, name="rev", password=password) is None
        assert crud.authenticate(s, name="rev", password=new_password) is not None
    assert (
        client.post(
            f"/admin/users/{rev.id}/role", data={"role": "annotator"}, follow_redirects=False
        ).status_code
        == 303
    )
    assert client.post(f"/admin/users/{rev.id}/role", data={"role": "root"}).status_code == 400
    with Session(engine) as s:
        assert crud.get_user(s, name="rev").role == "annotator"
        admin = crud.get_user(s, name="admin")
    assert client.post(f"/admin/users/{admin.id}/role", data={"role": "reviewer"}).status_code == 400
    key_page = client.post("/admin/keys", data={"name": "ci", "user": "admin"})
    assert "store it now):" in key_page.text
    key = key_page.text.split('<code id="secret">')[1].split("</code>")[0]
    assert client.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    with Session(engine) as s:
        key_id = crud.list_api_keys(s)[-1].id
    client.post(f"/admin/keys/{key_id}/revoke")
    fresh = TestClient(client.app)
    assert fresh.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 401
    with pytest.raises(AlignloopError):
        jobs.command_for("reward", "--config 'unclosed")


def test_rate_limiter_window():
    from alignloop.core.limits import RateLimiter

    now = [0.0]
    limiter = RateLimiter(2, 10, clock=lambda: now[0])
    assert limiter.hit("a") == 0 and limiter.hit("a") == 0
    assert limiter.hit("a") == pytest.approx(10) and limiter.hit("b") == 0
    now[0] = 10.5
    assert limiter.hit("a") == 0


def test_login_attempts_and_votes_are_rate_limited(workspace):
    import dataclasses

    settings, engine, password = workspace
    settings = dataclasses.replace(settings, login_attempts=3, votes_per_minute=2)
    with session_scope(engine) as s:
        crud.create_user(s, name="ann", role="annotator", password="annotator-pass")
        for i in range(4):
            (p,), _ = crud.add_prompts(
                s, prompts=[crud.PromptCreate(messages=[{"role": "user", "content": f"q{i}"}])], source="t"
            )
            gens = [crud.add_generation(s, prompt_id=p.id, text=f"answer {i}{k}") for k in "xy"]
            crud.create_comparison(s, prompt_id=p.id, generation_ids=[g.id for g in gens])
    with TestClient(create_app(settings, engine)) as client:
        for _ in range(3):
            assert (
                client.post(
                    "/login", data={"username": "admin", "password": "wrong"}, follow_redirects=False
                ).status_code
                == 303
            )
        blocked = client.post(
            "/login", data={"username": "admin", "password": password}, follow_redirects=False
        )
        assert (
            blocked.status_code == 429 and int(blocked.headers["Retry-After"]) > 0
        )  # even the right password
        web_login(client, "ann", "annotator-pass")  # other names are unaffected
        item = client.get("/api/annotate/next").json()
        codes = []
        for _ in range(3):
            response = client.post(
                "/api/annotate/vote", json={"comparison_id": item["comparison_id"], "choice": "a"}
            )
            codes.append(response.status_code)
            if response.status_code == 201:
                item = response.json()["next"]
        assert codes == [201, 201, 429]
