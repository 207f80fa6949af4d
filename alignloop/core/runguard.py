"""No `Run` stays `running` after the process that ran it is gone.

A run records its owner when it starts (`claim`: pid, hostname and the process's start time, under
`metrics["owner"]`). Two ways a run can end without its code marking it:
- the command raised: `fail_unfinished` (called by the CLI's `main` on any exception, KeyboardInterrupt
  included) marks the runs this process opened and left running as failed, with the exception as the reason;
- the process died without a word (SIGKILL, the kernel's OOM killer, a power cut): `recover`, called whenever a
  command opens the workspace, marks a running run failed when its owner was on this host and that process no
  longer exists ("process PID ended without finishing (killed? OOM?)").

Invariants: a run owned by a live process, or by a process on another host (a shared PostgreSQL workspace),
is never touched; a pid reused by an unrelated process is told apart by its start time (/proc/PID/stat field
22); runs of kind `job` are left to `alignloop.jobs.recover_jobs`, which watches their subprocess instead of the
server that recorded them; runs from before this module (no owner) are left alone.
Trade-off: on a system without /proc (macOS) a reused pid passes for the owner, so such a run stays running
until that process ends, never the reverse (a live run is never marked failed).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from pathlib import Path

from sqlmodel import Session, select

from alignloop.core.db import session_scope
from alignloop.core.models import Run, utcnow

log = logging.getLogger(__name__)
_opened: list[tuple[object, int]] = []  # (engine, run id) opened by this process
_lock = threading.Lock()


def _start_ticks(pid: int) -> int | None:
    """When the process started (clock ticks since boot), or None where /proc cannot tell."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2 :].split()[19])  # field 22; the name in parentheses may hold spaces


def owner() -> dict:
    pid = os.getpid()
    return {"pid": pid, "host": socket.gethostname(), "start": _start_ticks(pid)}


def claim(session: Session, run: Run) -> None:
    """Record this process as the run's owner (a new run, or a resumed one) and remember it for
    `fail_unfinished`."""
    run.metrics = {**(run.metrics or {}), "owner": owner()}
    session.add(run)
    session.flush()
    with _lock:
        _opened.append((session.get_bind(), run.id))


def alive(pid: int) -> bool:
    """Whether process `pid` exists and has not exited. An exited process not yet reaped (a zombie) is not
    alive; a process reaped between the signal check and the /proc read is gone, not an error."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, someone else's: /proc still tells whether it is a zombie
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return not Path("/proc/self").exists()  # reaped just now; without /proc at all, trust the signal
    except (OSError, IndexError):
        return True  # cannot tell: never call a live process gone


def _gone(info: dict) -> bool:
    """True when the owning process (on this host) no longer exists."""
    pid = info.get("pid")
    if not isinstance(pid, int) or info.get("host") != socket.gethostname():
        return False
    if not alive(pid):
        return True
    start = _start_ticks(pid)
    return info.get("start") is not None and start is not None and start != info["start"]  # pid reused


def _fail(session: Session, run: Run, error: str) -> None:
    # crud.finish_run's effect, written here: crud imports this module (create_run claims the run).
    run.status, run.finished_at, run.error = "failed", utcnow(), error
    session.add(run)
    session.flush()


def recover(engine) -> list[int]:
    """Mark running runs whose owning process is gone as failed; returns their ids."""
    with Session(engine) as session:
        running = session.exec(select(Run).where(Run.status == "running", Run.kind != "job")).all()
        dead = [
            (r.id, r.metrics["owner"]["pid"])
            for r in running
            if isinstance((r.metrics or {}).get("owner"), dict) and _gone(r.metrics["owner"])
        ]
    marked = []
    for run_id, pid in dead:
        with session_scope(engine) as session:
            run = session.get(Run, run_id)
            if run.status != "running":
                continue  # finished meanwhile
            _fail(session, run, f"process {pid} ended without finishing (killed? OOM?)")
            marked.append(run_id)
            log.warning(
                "run %s (%s) marked failed: its process %s ended without finishing", run_id, run.kind, pid
            )
    return marked


def mark() -> int:
    """A bookmark in this process's list of opened runs (a command's `fail_unfinished` looks only past it)."""
    with _lock:
        return len(_opened)


def fail_unfinished(exc: BaseException, since: int = 0) -> list[int]:
    """Mark the runs this process opened (after `since`) and left running as failed, the exception as reason."""
    reason = f"{type(exc).__name__}: {exc}"[:2000] if str(exc) else type(exc).__name__
    marked = []
    with _lock:
        opened = _opened[since:]
    for engine, run_id in opened:
        try:
            with session_scope(engine) as session:
                run = session.get(Run, run_id)
                if run is not None and run.status == "running" and run.kind != "job":
                    _fail(session, run, reason)
                    marked.append(run_id)
        except Exception:  # the database may be what failed: the original error matters more
            log.exception("could not mark run %s failed", run_id)
    return marked
