"""Long work started from the admin console runs as a background job: an `alignloop ...` subprocess whose
state lives in a `Run` of kind `job` (command, pid, exit code) and whose output goes to `runs/run<ID>/job.log`.

- `start_job` validates the command with the CLI's own parser first (bad arguments start nothing), then
  spawns it in its own process group and a thread waits for it to end, recording succeeded / failed.
- At most `max_jobs` (config.yaml, default 2) run at once: one more is refused before it spawns. Counting the
  running jobs and recording the new one happen in one transaction that holds the write lock (SQLite's
  BEGIN IMMEDIATE; a transaction-scoped advisory lock on PostgreSQL), so two admins clicking at once, or two
  web workers, cannot both take the last slot. A training job can hold a machine for hours: the cap keeps a
  runaway console from starting enough of them to push one another (or the web server) out of memory.
- The runs the command creates (a reward training, a PPO run...) carry `job: <ID>` in their config
  (`ALIGNLOOP_JOB` in their environment), so the console can show their metrics beside the log.
- `cancel_job` sends SIGTERM to the whole group (SIGKILL after a grace period) and records `cancelled`.
- `recover_jobs` runs when the server starts: a job recorded as running whose process is gone (the server
  died with it, the machine rebooted) is marked failed, so no job stays in a false "running" state; one
  whose process is still alive is watched again.
"""

from __future__ import annotations

import contextlib
import io
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from sqlalchemy import func, text
from sqlmodel import Session, select

from alignloop.core import AlignloopError, crud
from alignloop.core.config import Settings
from alignloop.core.db import session_scope
from alignloop.core.files import private_dir, private_opener
from alignloop.core.models import Run
from alignloop.core.runguard import alive

JOB_KINDS = {  # what the console may start, and the CLI words that start it
    "generate": ["generate"],
    "judge": ["judge", "run"],
    "reward": ["reward", "train"],
    "sft": ["sft", "train"],
    "rl": ["rl", "train"],
    "round": ["round", "next"],
    "export": ["export", "model"],
}
GRACE_SECONDS = 10


class TooManyJobs(AlignloopError):
    """`max_jobs` jobs are running already (the web API answers 429)."""


def command_for(kind: str, arguments: str, settings: Settings | None = None) -> list[str]:
    """The CLI words for a job, checked by the CLI's own parser; raises AlignloopError on bad input.

    With `settings` (a job from the web), a judge may reach only the endpoints in `judge_endpoints`, each with
    its own key variable: an admin session must not be able to send any server environment variable to any
    URL as a bearer token. The check reads the parsed arguments, so abbreviations (`--openai-base`) and
    `--flag=value` forms are covered too.
    """
    from alignloop.parser import make_parser

    if kind not in JOB_KINDS:
        raise AlignloopError(f"job kind must be one of {', '.join(JOB_KINDS)}, not {kind!r}")
    try:
        extra = shlex.split(arguments or "")
    except ValueError as exc:
        raise AlignloopError(f"cannot read the arguments: {exc}") from None
    if any(a == "--workspace" or a.startswith("--workspace=") for a in extra):
        raise AlignloopError("a job always runs in the server's workspace; leave out --workspace")
    argv = [*JOB_KINDS[kind], *extra]
    with contextlib.redirect_stderr(io.StringIO()) as err, contextlib.redirect_stdout(io.StringIO()):
        try:
            parsed = make_parser().parse_args(argv)
        except SystemExit:
            reason = (err.getvalue().strip().splitlines() or ["see alignloop --help"])[-1]
            raise AlignloopError(f"invalid arguments for {kind}: {reason}") from None
    if settings is not None and kind == "judge" and parsed.openai_base_url is not None:
        allowed = {(e["base_url"].rstrip("/"), e["api_key_env"]) for e in settings.judge_endpoints}
        if (parsed.openai_base_url.rstrip("/"), parsed.api_key_env) not in allowed:
            raise AlignloopError(
                f"judge endpoint {parsed.openai_base_url!r} with key variable {parsed.api_key_env!r} is not in "
                "judge_endpoints in config.yaml; only configured endpoints may be used from the web"
            )
    return argv


def start_job(engine, settings: Settings, *, kind: str, arguments: str = "", user: str | None = None) -> Run:
    argv = command_for(kind, arguments, settings)
    with session_scope(engine) as session:
        if session.get_bind().dialect.name == "postgresql":
            session.exec(text("SELECT pg_advisory_xact_lock(hashtext('alignloop.jobs'))"))
        running = session.exec(
            select(func.count()).select_from(Run).where(Run.kind == "job", Run.status == "running")
        ).one()
        if running >= settings.max_jobs:
            raise TooManyJobs(
                f"{running} jobs are already running (max_jobs: {settings.max_jobs} in config.yaml): "
                "wait for one to finish or cancel one"
            )
        run = crud.create_run(
            session, kind="job", config={"job_kind": kind, "argv": argv, "started_by": user}
        )
    log_path = settings.runs_dir / f"run{run.id}" / "job.log"
    private_dir(log_path.parent)  # logs hold prompts and model output: the owner's only
    env = {
        **os.environ,
        "ALIGNLOOP_JOB": str(run.id),
        "ALIGNLOOP_HOME": str(settings.workspace),
        "PYTHONUNBUFFERED": "1",
    }
    with open(log_path, "ab", opener=private_opener) as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "alignloop.cli", *argv, "--workspace", str(settings.workspace)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
    with session_scope(engine) as session:
        row = session.get(Run, run.id)
        row.log_path, row.metrics = str(log_path), {"pid": process.pid}
        session.add(row)
    threading.Thread(target=_wait, args=(engine, run.id, process), daemon=True).start()
    return row


def _wait(engine, run_id: int, process: subprocess.Popen) -> None:
    code = process.wait()
    _finish(engine, run_id, code)


def _finish(engine, run_id: int, code: int | None, error: str | None = None) -> None:
    with session_scope(engine) as session:
        run = session.get(Run, run_id)
        if run.status != "running":
            return  # cancelled meanwhile
        status = "succeeded" if code == 0 else "failed"
        crud.finish_run(
            session,
            run=run,
            status=status,
            metrics={"exit_code": code},
            error=error or (None if code == 0 else f"exited with code {code}"),
        )


def cancel_job(engine, run_id: int) -> Run:
    with session_scope(engine) as session:
        run = session.get(Run, run_id)
        if run is None or run.kind != "job":
            raise AlignloopError(f"no job {run_id}")
        if run.status != "running":
            raise AlignloopError(f"job {run_id} is not running ({run.status})")
        pid = run.metrics.get("pid")
        crud.finish_run(session, run=run, status="cancelled", error="cancelled by an admin")
    if pid:
        threading.Thread(target=_terminate_group, args=(pid,), daemon=True).start()
    return run


def _terminate_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + GRACE_SECONDS
    while time.monotonic() < deadline:
        if not alive(pid):
            return
        time.sleep(0.2)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def recover_jobs(engine) -> list[int]:
    """Mark jobs whose process is gone as failed; watch the ones still running. Returns the ids marked."""
    marked = []
    with Session(engine) as session:
        running = session.exec(select(Run).where(Run.kind == "job", Run.status == "running")).all()
    for run in running:
        pid = run.metrics.get("pid")
        if pid and alive(pid) and _is_ours(pid, run.id):
            threading.Thread(target=_poll, args=(engine, run.id, pid), daemon=True).start()
            continue
        _finish(engine, run.id, None, error="the server restarted and the job's process was gone")
        marked.append(run.id)
    return marked


def _is_ours(pid: int, run_id: int) -> bool:
    environ = Path(f"/proc/{pid}/environ")
    try:
        return f"ALIGNLOOP_JOB={run_id}".encode() in environ.read_bytes().split(b"\0")
    except OSError:
        return False


def _poll(engine, run_id: int, pid: int) -> None:
    while alive(pid):
        time.sleep(1)
    _finish(engine, run_id, None, error="the job's process ended while the server was away; see its log")


def log_tail(run: Run, lines: int = 200) -> str:
    if not run.log_path or not Path(run.log_path).is_file():
        return ""
    with open(run.log_path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 64_000))
        text = f.read().decode("utf-8", errors="replace")
    # progress bars redraw with carriage returns: keep only each line's last state
    return "\n".join(line.split("\r")[-1] for line in text.splitlines()[-lines:])


def child_runs(session: Session, job_id: int) -> list[Run]:
    return [
        r
        for r in session.exec(select(Run).where(Run.kind != "job").order_by(Run.id)).all()
        if r.config.get("job") == job_id
    ]
