"""The admin console's operations pages: background jobs, users, API keys, run metric plots.
Admins only, checked in every handler (an annotator calling these directly gets 403)."""

from __future__ import annotations

import html
import secrets
import shlex
import time
from typing import Annotated, Literal

from fastapi import APIRouter, Form, HTTPException, Path, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from pydantic import BaseModel, Field
from sqlmodel import col, select

from alignloop import jobs
from alignloop.core import AlignloopError, crud
from alignloop.core.http import MAX_INT, AdminDep, SessionDep, page
from alignloop.core.models import ROLES, ModelVersion, Run, User
from alignloop.core.plots import history_png

router = APIRouter(tags=["admin"])
JobId = Annotated[int, Path(ge=1, le=MAX_INT)]
NAV = ("<p><a href='/admin'>quality</a> · <a href='/admin/rounds'>rounds</a> · <a href='/admin/jobs'>jobs</a> · "
       "<a href='/admin/reward'>reward models</a> · <a href='/admin/rl'>RL</a> · <a href='/admin/users'>users</a> · "
       "<a href='/admin/keys'>API keys</a> · <a href='/admin/models'>models</a></p>")  # fmt: skip


def _e(value) -> str:
    return html.escape(str(value)) if value is not None else "–"


# --- run plots -----------------------------------------------------------------------------------------------


@router.get("/admin/runs/{run_id}/metrics.png", include_in_schema=False)
def run_metrics_png(run_id: int, user: AdminDep, session: SessionDep):
    run = session.get(Run, run_id)
    if run is None:
        raise HTTPException(status_code=404, detail="no such run")
    png = history_png(run.metrics.get("history", []), title=f"run {run.id} ({run.kind}, {run.status})")
    return Response(content=png, media_type="image/png", headers={"Cache-Control": "no-store"})


# --- jobs ----------------------------------------------------------------------------------------------------


class JobRequest(BaseModel):
    kind: Literal["generate", "judge", "reward", "sft", "rl", "round", "export"]
    arguments: str = Field(default="", max_length=2000, description="command-line arguments, as for the CLI")


def _job_dict(run: Run, session) -> dict:
    return {"id": run.id, "kind": run.config.get("job_kind"), "argv": run.config.get("argv"), "status": run.status,
            "error": run.error, "exit_code": run.metrics.get("exit_code"),
            "runs": [{"id": r.id, "kind": r.kind, "status": r.status} for r in jobs.child_runs(session, run.id)]}  # fmt: skip


@router.get("/api/jobs")
def list_jobs(user: AdminDep, session: SessionDep) -> list[dict]:
    """Background jobs, newest first."""
    rows = session.exec(select(Run).where(Run.kind == "job").order_by(col(Run.id).desc()).limit(100)).all()
    return [_job_dict(r, session) for r in rows]


@router.post("/api/jobs", status_code=201)
def create_job(body: JobRequest, request: Request, user: AdminDep, session: SessionDep) -> dict:
    """Start a job (validated like the CLI: bad arguments start nothing, 400)."""
    session.commit()
    try:
        run = jobs.start_job(request.app.state.engine, request.app.state.settings, kind=body.kind,
                             arguments=body.arguments, user=user.name)  # fmt: skip
    except AlignloopError as exc:
        raise HTTPException(status_code=400, detail=str(exc)) from None
    return {"id": run.id, "status": run.status}


@router.get("/api/jobs/{job_id}")
def get_job(job_id: JobId, user: AdminDep, session: SessionDep) -> dict:
    run = session.get(Run, job_id)
    if run is None or run.kind != "job":
        raise HTTPException(status_code=404, detail="no such job")
    return {**_job_dict(run, session), "log": jobs.log_tail(run)}


@router.post("/api/jobs/{job_id}/cancel")
def cancel(job_id: JobId, request: Request, user: AdminDep, session: SessionDep) -> dict:
    session.commit()
    try:
        jobs.cancel_job(request.app.state.engine, job_id)
    except AlignloopError as exc:
        raise HTTPException(status_code=409 if "not running" in str(exc) else 404, detail=str(exc)) from None
    return {"id": job_id, "status": "cancelled"}


@router.get("/admin/jobs", response_class=HTMLResponse, include_in_schema=False)
def jobs_page(user: AdminDep, session: SessionDep, error: str | None = None):
    rows = "".join(
        f"<tr><td><a href='/admin/jobs/{j['id']}'>{j['id']}</a></td><td>{_e(j['kind'])}</td>"
        f"<td><code>{_e(' '.join(j['argv'] or []))}</code></td><td>{_e(j['status'])}</td></tr>"
        for j in list_jobs(user, session)
    )
    options = "".join(f"<option>{k}</option>" for k in jobs.JOB_KINDS)
    form = (
        "<form method='post' action='/admin/jobs'><select name='kind'>" + options + "</select> "
        "<input name='arguments' size='80' placeholder='e.g. --config configs/reward/default.yaml --max-seconds 600'>"
        " <button>Start</button></form><p class='meta'>Arguments are those of the command line "
        "(<code>alignloop reward train --help</code>); the job runs in this workspace.</p>"
    )
    notice = f"<p style='color:#b00'>{_e(error)}</p>" if error else ""
    body = (f"{NAV}<h2>Jobs</h2>{notice}{form}<table border=1 cellpadding=4 style='border-collapse:collapse'>"
            f"<tr><th>id</th><th>kind</th><th>command</th><th>status</th></tr>{rows}</table>")  # fmt: skip
    return page("Jobs", body, user)


@router.post("/admin/jobs", include_in_schema=False)
def start_from_form(request: Request, user: AdminDep, session: SessionDep, kind: Annotated[str, Form()],
                    arguments: Annotated[str, Form(max_length=2000)] = ""):  # fmt: skip
    session.commit()
    try:
        run = jobs.start_job(request.app.state.engine, request.app.state.settings, kind=kind, arguments=arguments,
                             user=user.name)  # fmt: skip
    except AlignloopError as exc:
        return jobs_page(user, session, error=str(exc))
    return RedirectResponse(f"/admin/jobs/{run.id}", status_code=303)


@router.get("/admin/jobs/{job_id}", response_class=HTMLResponse, include_in_schema=False)
def job_page(job_id: int, user: AdminDep, session: SessionDep):
    job = get_job(job_id, user, session)
    refresh = "<meta http-equiv='refresh' content='3'>" if job["status"] == "running" else ""
    cancel_form = (
        f"<form method='post' action='/admin/jobs/{job_id}/cancel'><button>Cancel</button></form>"
        if job["status"] == "running"
        else ""
    )
    plots = "".join(
        f"<h3>run {r['id']} ({_e(r['kind'])}, {_e(r['status'])})</h3>"
        f"<img src='/admin/runs/{r['id']}/metrics.png' alt='metrics' style='max-width:100%'>"
        for r in job["runs"]
    )
    body = (
        f"{refresh}{NAV}<h2>Job {job_id}: {_e(job['kind'])} · {_e(job['status'])}</h2>"
        f"<p><code>alignloop {_e(' '.join(job['argv'] or []))}</code></p>{cancel_form}"
        f"{'<p>' + _e(job['error']) + '</p>' if job['error'] else ''}"
        f"<pre style='background:#f6f6f6;padding:8px;max-height:420px;overflow:auto'>{_e(job['log'])}</pre>{plots}"
    )
    return page(f"Job {job_id}", body, user)


@router.post("/admin/jobs/{job_id}/cancel", include_in_schema=False)
def cancel_from_form(job_id: int, request: Request, user: AdminDep, session: SessionDep):
    cancel(job_id, request, user, session)
    return RedirectResponse(f"/admin/jobs/{job_id}", status_code=303)


# --- model export --------------------------------------------------------------------------------------------

EXPORT_CHOICES = {"hf": ("hf", "f16"), "gguf-f16": ("gguf", "f16"), "gguf-q8_0": ("gguf", "q8_0"),
                  "gguf-q4_k_m": ("gguf", "q4_k_m")}  # fmt: skip


@router.get("/admin/models", response_class=HTMLResponse, include_in_schema=False)
def models_page(user: AdminDep, session: SessionDep, request: Request):
    from serve.export import list_exports

    names = ["default"] + [v.name for v in session.exec(select(ModelVersion).order_by(ModelVersion.id)).all()
                           if v.kind != "reward"]  # fmt: skip
    options = "".join(f"<option>{k}</option>" for k in EXPORT_CHOICES)
    rows = "".join(
        f"<tr><td>{_e(n)}</td><td><form method='post' action='/admin/models/export'>"
        f"<input type='hidden' name='ref' value='{_e(n)}'><select name='choice'>{options}</select> "
        "<button>Export</button></form></td></tr>"
        for n in names
    )
    exports = "".join(
        f"<tr><td><code>{_e(folder)}</code></td><td>"
        + "<br>".join(f"{_e(f)}: {size / 2**20:.1f} MiB" for f, size in files.items())
        + "</td></tr>"
        for folder, files in list_exports(request.app.state.settings)
    )
    body = (f"{NAV}<h2>Models</h2><p>Export a version as merged weights (hf) or GGUF for llama.cpp / Ollama, with "
            "its model card; it runs as a job and lands in the workspace's <code>exports/</code> folder.</p>"
            f"<table border=1 cellpadding=4 style='border-collapse:collapse'><tr><th>version</th><th></th></tr>{rows}"
            f"</table><h3>Exports</h3><table border=1 cellpadding=4 style='border-collapse:collapse'><tr><th>folder"
            f"</th><th>files</th></tr>{exports or '<tr><td colspan=2>none yet</td></tr>'}</table>")  # fmt: skip
    return page("Models", body, user)


@router.post("/admin/models/export", include_in_schema=False)
def export_from_form(request: Request, user: AdminDep, session: SessionDep, ref: Annotated[str, Form(max_length=128)],
                     choice: Annotated[str, Form(max_length=16)]):  # fmt: skip
    from serve.export import exports_dir

    if choice not in EXPORT_CHOICES:
        raise HTTPException(status_code=400, detail=f"choice must be one of {', '.join(EXPORT_CHOICES)}")
    fmt, quant = EXPORT_CHOICES[choice]
    settings = request.app.state.settings
    exports_dir(settings).mkdir(parents=True, exist_ok=True)
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in ref)
    out = exports_dir(settings) / f"{safe}-{choice}-{time.strftime('%Y%m%d-%H%M%S')}"
    session.commit()
    try:
        run = jobs.start_job(request.app.state.engine, settings, kind="export", user=user.name,
                             arguments=shlex.join([ref, str(out), "--format", fmt, "--quant", quant]))  # fmt: skip
    except AlignloopError as exc:
        raise HTTPException(status_code=400, detail=str(exc)) from None
    return RedirectResponse(f"/admin/jobs/{run.id}", status_code=303)


# --- users ---------------------------------------------------------------------------------------------------


@router.get("/admin/users", response_class=HTMLResponse, include_in_schema=False)
def users_page(user: AdminDep, session: SessionDep, notice: str | None = None):
    rows = []
    for u in session.exec(select(User).order_by(User.id)).all():
        roles = "".join(f"<option{' selected' if r == u.role else ''}>{r}</option>" for r in ROLES)
        rows.append(
            f"<tr><td>{_e(u.name)}</td><td>{_e(u.kind)}</td><td><form method='post' action='/admin/users/{u.id}/role'>"
            f"<select name='role'>{roles}</select> <button>Set</button></form></td>"
            f"<td>{'disabled' if u.disabled else 'active'}</td><td>"
            f"<form method='post' action='/admin/users/{u.id}/{'enable' if u.disabled else 'disable'}' style='display:inline'>"
            f"<button>{'Enable' if u.disabled else 'Disable'}</button></form> "
            f"<form method='post' action='/admin/users/{u.id}/reset-password' style='display:inline'>"
            "<button>Reset password</button></form></td></tr>"
        )
    roles = "".join(f"<option>{r}</option>" for r in ROLES)
    add = (f"<form method='post' action='/admin/users'><input name='name' placeholder='name' required> "
           f"<select name='role'>{roles}</select> <button>Add user</button></form>")  # fmt: skip
    shown = f"<p style='background:#ffd;padding:6px'>{notice}</p>" if notice else ""
    body = (f"{NAV}<h2>Users</h2>{shown}{add}<table border=1 cellpadding=4 style='border-collapse:collapse'>"
            f"<tr><th>name</th><th>kind</th><th>role</th><th>state</th><th></th></tr>{''.join(rows)}</table>")  # fmt: skip
    return page("Users", body, user)


@router.post("/admin/users", response_class=HTMLResponse, include_in_schema=False)
def add_user(user: AdminDep, session: SessionDep, name: Annotated[str, Form(max_length=64)],
             role: Annotated[str, Form(max_length=16)]):  # fmt: skip
    password = secrets.token_urlsafe(12)
    try:
        crud.create_user(session, name=name, role=role, password=password)
        session.commit()
    except AlignloopError as exc:
        session.rollback()
        return users_page(user, session, notice=_e(exc))
    return users_page(
        user, session, notice=f"Added {_e(name)}; password (shown once): <code>{password}</code>"
    )


@router.post("/admin/users/{user_id}/role", include_in_schema=False)
def set_role(user_id: int, user: AdminDep, session: SessionDep, role: Annotated[str, Form(max_length=16)]):
    target = session.get(User, user_id)
    if target is None:
        raise HTTPException(status_code=404, detail="no such user")
    if role not in ROLES:
        raise HTTPException(status_code=400, detail=f"role must be one of {', '.join(ROLES)}")
    if target.id == user.id and role != "admin":
        raise HTTPException(status_code=400, detail="you cannot take away your own admin role")
    target.role = role
    session.add(target)
    session.commit()
    return RedirectResponse("/admin/users", status_code=303)


@router.post("/admin/users/{user_id}/reset-password", response_class=HTMLResponse, include_in_schema=False)
def reset_password(user_id: int, user: AdminDep, session: SessionDep):
    target = session.get(User, user_id)
    if target is None or target.kind != "human":
        raise HTTPException(status_code=404, detail="no such human user")
    password = secrets.token_urlsafe(12)
    crud.set_password(session, user=target, password=password)
    session.commit()
    return users_page(
        user, session, notice=f"New password for {_e(target.name)} (shown once): <code>{password}</code>"
    )


# --- API keys ------------------------------------------------------------------------------------------------


@router.get("/admin/keys", response_class=HTMLResponse, include_in_schema=False)
def keys_page(user: AdminDep, session: SessionDep, notice: str | None = None):
    names = {u.id: u.name for u in session.exec(select(User)).all()}
    rows = "".join(
        f"<tr><td>{k.id}</td><td>{_e(k.name)}</td><td><code>{_e(k.prefix)}…</code></td><td>{_e(names.get(k.user_id))}</td>"
        f"<td>{'revoked' if k.revoked else 'active'}</td><td>"
        + (
            ""
            if k.revoked
            else f"<form method='post' action='/admin/keys/{k.id}/revoke'><button>Revoke</button></form>"
        )
        + "</td></tr>"
        for k in crud.list_api_keys(session)
    )
    users = "".join(f"<option>{_e(n)}</option>" for n in sorted(names.values()))
    form = (f"<form method='post' action='/admin/keys'><input name='name' placeholder='what it is for' required> "
            f"acts as <select name='user'>{users}</select> <button>Create key</button></form>")  # fmt: skip
    shown = f"<p style='background:#ffd;padding:6px'>{notice}</p>" if notice else ""
    body = (f"{NAV}<h2>API keys</h2><p>For <code>/v1</code> (OpenAI-compatible): "
            f"<code>Authorization: Bearer KEY</code>.</p>{shown}{form}<table border=1 cellpadding=4 "
            f"style='border-collapse:collapse'><tr><th>id</th><th>name</th><th>key</th><th>user</th><th>state</th>"
            f"<th></th></tr>{rows}</table>")  # fmt: skip
    return page("API keys", body, user)


@router.post("/admin/keys", response_class=HTMLResponse, include_in_schema=False)
def create_key(user: AdminDep, session: SessionDep, name: Annotated[str, Form(max_length=64)],
               user_name: Annotated[str, Form(alias="user", max_length=64)]):  # fmt: skip
    owner = crud.get_user(session, name=user_name)
    if owner is None:
        raise HTTPException(status_code=400, detail="no such user")
    try:
        key, _ = crud.create_api_key(session, user=owner, name=name)
        session.commit()
    except AlignloopError as exc:
        return keys_page(user, session, notice=_e(exc))
    return keys_page(user, session, notice=f"New key (shown once, store it now): <code>{key}</code>")


@router.post("/admin/keys/{key_id}/revoke", include_in_schema=False)
def revoke_key(key_id: int, user: AdminDep, session: SessionDep):
    try:
        crud.revoke_api_key(session, key_id=key_id)
        session.commit()
    except AlignloopError:
        raise HTTPException(status_code=404, detail="no such key") from None
    return RedirectResponse("/admin/keys", status_code=303)
