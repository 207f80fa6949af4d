"""The admin console's operations pages: background jobs, users, API keys, run metric plots.
Admins only, checked in every handler (an annotator calling these directly gets 403).

Pages are templates in alignloop/templates. A notice (a new password, a new key) is a value the handler passes
to its template, never a request parameter: no URL can put text on an admin's page."""

from __future__ import annotations

import secrets
import shlex
import time
from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, Form, HTTPException, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from pydantic import BaseModel, Field
from sqlmodel import col, select

from alignloop import jobs
from alignloop.core import AlignloopError, crud, websec
from alignloop.core.http import AdminDep, DbId, SessionDep, render, templates_for
from alignloop.core.models import ROLES, ModelVersion, Run, User
from alignloop.core.plots import history_png

router = APIRouter(tags=["admin"])
JobId = DbId
templates = templates_for(Path(__file__).parent / "templates")


# --- run plots -----------------------------------------------------------------------------------------------


@router.get("/admin/runs/{run_id}/metrics.png", include_in_schema=False)
def run_metrics_png(run_id: DbId, user: AdminDep, session: SessionDep):
    run = session.get(Run, run_id)
    if run is None:
        raise HTTPException(status_code=404, detail="no such run")
    png = history_png(run.metrics.get("history", []), title=f"run {run.id} ({run.kind}, {run.status})")
    return Response(content=png, media_type="image/png", headers={"Cache-Control": "no-store"})


# --- jobs ----------------------------------------------------------------------------------------------------


class JobRequest(BaseModel):
    kind: Literal["generate", "judge", "reward", "sft", "rl", "round", "export"]
    arguments: str = Field(default="", max_length=2000, description="command-line arguments, as for the CLI")


class JobRunOut(BaseModel):
    # A run the job's command created (a reward training, a PPO run...).
    id: int
    kind: str
    status: str


class JobOut(BaseModel):
    # A background job: the CLI words it runs and how it ended.
    id: int
    kind: str | None
    argv: list[str] | None
    status: str
    error: str | None
    exit_code: int | None
    runs: list[JobRunOut]


class JobDetailOut(JobOut):
    log: str = Field(description="the end of the job's output (progress bars at their last state)")


class JobStatusOut(BaseModel):
    id: int
    status: str


def _job_dict(run: Run, session) -> dict:
    return {
        "id": run.id,
        "kind": run.config.get("job_kind"),
        "argv": run.config.get("argv"),
        "status": run.status,
        "error": run.error,
        "exit_code": run.metrics.get("exit_code"),
        "runs": [{"id": r.id, "kind": r.kind, "status": r.status} for r in jobs.child_runs(session, run.id)],
    }


@router.get("/api/jobs", response_model=list[JobOut])
def list_jobs(user: AdminDep, session: SessionDep) -> list[dict]:
    """Background jobs, newest first."""
    rows = session.exec(select(Run).where(Run.kind == "job").order_by(col(Run.id).desc()).limit(100)).all()
    return [_job_dict(r, session) for r in rows]


@router.post("/api/jobs", status_code=201, response_model=JobStatusOut)
def create_job(body: JobRequest, request: Request, user: AdminDep, session: SessionDep) -> dict:
    """Start a job (validated like the CLI: bad arguments start nothing, 400)."""
    session.commit()
    try:
        run = jobs.start_job(
            request.app.state.engine,
            request.app.state.settings,
            kind=body.kind,
            arguments=body.arguments,
            user=user.name,
        )
    except jobs.TooManyJobs as exc:
        raise HTTPException(status_code=429, detail=str(exc)) from None
    except AlignloopError as exc:
        raise HTTPException(status_code=400, detail=str(exc)) from None
    return {"id": run.id, "status": run.status}


@router.get("/api/jobs/{job_id}", response_model=JobDetailOut)
def get_job(job_id: JobId, user: AdminDep, session: SessionDep) -> dict:
    run = session.get(Run, job_id)
    if run is None or run.kind != "job":
        raise HTTPException(status_code=404, detail="no such job")
    return {**_job_dict(run, session), "log": jobs.log_tail(run)}


@router.post("/api/jobs/{job_id}/cancel", response_model=JobStatusOut)
def cancel(job_id: JobId, request: Request, user: AdminDep, session: SessionDep) -> dict:
    session.commit()
    try:
        jobs.cancel_job(request.app.state.engine, job_id)
    except AlignloopError as exc:
        raise HTTPException(status_code=409 if "not running" in str(exc) else 404, detail=str(exc)) from None
    return {"id": job_id, "status": "cancelled"}


@router.get("/admin/jobs", response_class=HTMLResponse, include_in_schema=False)
def jobs_page(request: Request, user: AdminDep, session: SessionDep):
    return _jobs_page(request, user, session)


def _jobs_page(request: Request, user, session, error: str | None = None, status_code: int = 200):
    return render(
        templates,
        request,
        "jobs.html",
        title="Jobs",
        user=user,
        error=error,
        status_code=status_code,
        kinds=jobs.JOB_KINDS,
        jobs=list_jobs(user, session),
    )


@router.post("/admin/jobs", include_in_schema=False)
def start_from_form(
    request: Request,
    user: AdminDep,
    session: SessionDep,
    kind: Annotated[str, Form(max_length=16)],
    arguments: Annotated[str, Form(max_length=2000)] = "",
):
    session.commit()
    try:
        run = jobs.start_job(
            request.app.state.engine,
            request.app.state.settings,
            kind=kind,
            arguments=arguments,
            user=user.name,
        )
    except AlignloopError as exc:
        return _jobs_page(request, user, session, error=str(exc), status_code=400)
    return RedirectResponse(f"/admin/jobs/{run.id}", status_code=303)


@router.get("/admin/jobs/{job_id}", response_class=HTMLResponse, include_in_schema=False)
def job_page(job_id: DbId, request: Request, user: AdminDep, session: SessionDep):
    job = get_job(job_id, user, session)
    return render(
        templates,
        request,
        "job.html",
        title=f"Job {job_id}",
        user=user,
        job=job,
        refresh=3 if job["status"] == "running" else None,
    )


@router.post("/admin/jobs/{job_id}/cancel", include_in_schema=False)
def cancel_from_form(job_id: DbId, request: Request, user: AdminDep, session: SessionDep):
    cancel(job_id, request, user, session)
    return RedirectResponse(f"/admin/jobs/{job_id}", status_code=303)


# --- model export --------------------------------------------------------------------------------------------

EXPORT_CHOICES = {
    "hf": ("hf", "f16"),
    "gguf-f16": ("gguf", "f16"),
    "gguf-q8_0": ("gguf", "q8_0"),
    "gguf-q4_k_m": ("gguf", "q4_k_m"),
}


@router.get("/admin/models", response_class=HTMLResponse, include_in_schema=False)
def models_page(user: AdminDep, session: SessionDep, request: Request):
    from serve.export import list_exports

    versions = session.exec(select(ModelVersion).order_by(ModelVersion.id)).all()
    names = ["default"] + [v.name for v in versions if v.kind != "reward" and v.name != "default"]
    return render(
        templates,
        request,
        "models.html",
        title="Models",
        user=user,
        names=names,
        choices=list(EXPORT_CHOICES),
        exports=list_exports(request.app.state.settings),
    )


@router.post("/admin/models/export", include_in_schema=False)
def export_from_form(
    request: Request,
    user: AdminDep,
    session: SessionDep,
    ref: Annotated[str, Form(max_length=128)],
    choice: Annotated[str, Form(max_length=16)],
):
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
        run = jobs.start_job(
            request.app.state.engine,
            settings,
            kind="export",
            user=user.name,
            arguments=shlex.join([ref, str(out), "--format", fmt, "--quant", quant]),
        )
    except jobs.TooManyJobs as exc:
        raise HTTPException(status_code=429, detail=str(exc)) from None
    except AlignloopError as exc:
        raise HTTPException(status_code=400, detail=str(exc)) from None
    return RedirectResponse(f"/admin/jobs/{run.id}", status_code=303)


# --- users ---------------------------------------------------------------------------------------------------


@router.get("/admin/users", response_class=HTMLResponse, include_in_schema=False)
def users_page(request: Request, user: AdminDep, session: SessionDep):
    return _users_page(request, user, session)


def _users_page(
    request: Request,
    user,
    session,
    *,
    notice: str | None = None,
    secret: str | None = None,
    status_code: int = 200,
):
    users = session.exec(select(User).order_by(User.id)).all()
    return render(
        templates,
        request,
        "users.html",
        title="Users",
        user=user,
        users=users,
        roles=ROLES,
        notice=notice,
        secret=secret,
        status_code=status_code,
    )


@router.post("/admin/users", response_class=HTMLResponse, include_in_schema=False)
def add_user(
    request: Request,
    user: AdminDep,
    session: SessionDep,
    name: Annotated[str, Form(max_length=64)],
    role: Annotated[str, Form(max_length=16)],
):
    password = secrets.token_urlsafe(12)
    try:
        crud.create_user(session, name=name, role=role, password=password)
        session.commit()
    except AlignloopError as exc:
        session.rollback()
        return _users_page(request, user, session, notice=str(exc), status_code=400)
    return _users_page(
        request, user, session, notice=f"Added {name}; password (shown once):", secret=password
    )


@router.post("/admin/users/{user_id}/role", include_in_schema=False)
def set_role(user_id: DbId, user: AdminDep, session: SessionDep, role: Annotated[str, Form(max_length=16)]):
    target = session.get(User, user_id)
    if target is None:
        raise HTTPException(status_code=404, detail="no such user")
    if role not in ROLES:
        raise HTTPException(status_code=400, detail=f"role must be one of {', '.join(ROLES)}")
    if target.id == user.id and role != "admin":
        raise HTTPException(status_code=400, detail="you cannot take away your own admin role")
    changed = target.role != role
    target.role = role
    session.add(target)
    session.commit()
    if changed:  # a new role is a new login: the old cookie must not keep the old rights (or gain new ones)
        websec.end_all_logins(session, target.id)
    return RedirectResponse("/admin/users", status_code=303)


@router.post("/admin/users/{user_id}/reset-password", response_class=HTMLResponse, include_in_schema=False)
def reset_password(user_id: DbId, request: Request, user: AdminDep, session: SessionDep):
    target = session.get(User, user_id)
    if target is None or target.kind != "human":
        raise HTTPException(status_code=404, detail="no such human user")
    password = secrets.token_urlsafe(12)
    crud.set_password(session, user=target, password=password)
    session.commit()
    websec.end_all_logins(session, target.id)
    return _users_page(
        request, user, session, notice=f"New password for {target.name} (shown once):", secret=password
    )


@router.post("/admin/users/{user_id}/logout", include_in_schema=False)
def end_sessions(user_id: DbId, user: AdminDep, session: SessionDep):
    """Log a user out everywhere (a lost laptop, a crowd worker let go)."""
    if session.get(User, user_id) is None:
        raise HTTPException(status_code=404, detail="no such user")
    websec.end_all_logins(session, user_id)
    return RedirectResponse("/admin/users", status_code=303)


# --- API keys ------------------------------------------------------------------------------------------------


@router.get("/admin/keys", response_class=HTMLResponse, include_in_schema=False)
def keys_page(request: Request, user: AdminDep, session: SessionDep):
    return _keys_page(request, user, session)


def _keys_page(
    request: Request,
    user,
    session,
    *,
    notice: str | None = None,
    secret: str | None = None,
    status_code: int = 200,
):
    names = {u.id: u.name for u in session.exec(select(User)).all()}
    return render(
        templates,
        request,
        "keys.html",
        title="API keys",
        user=user,
        names=names,
        user_names=sorted(names.values()),
        keys=crud.list_api_keys(session),
        notice=notice,
        secret=secret,
        status_code=status_code,
    )


@router.post("/admin/keys", response_class=HTMLResponse, include_in_schema=False)
def create_key(
    request: Request,
    user: AdminDep,
    session: SessionDep,
    name: Annotated[str, Form(max_length=64)],
    user_name: Annotated[str, Form(alias="user", max_length=64)],
):
    owner = crud.get_user(session, name=user_name)
    if owner is None:
        raise HTTPException(status_code=400, detail="no such user")
    try:
        key, _ = crud.create_api_key(session, user=owner, name=name)
        session.commit()
    except AlignloopError as exc:
        return _keys_page(request, user, session, notice=str(exc), status_code=400)
    return _keys_page(request, user, session, notice="New key (shown once, store it now):", secret=key)


@router.post("/admin/keys/{key_id}/revoke", include_in_schema=False)
def revoke_key(key_id: DbId, user: AdminDep, session: SessionDep):
    try:
        crud.revoke_api_key(session, key_id=key_id)
        session.commit()
    except AlignloopError:
        raise HTTPException(status_code=404, detail="no such key") from None
    return RedirectResponse("/admin/keys", status_code=303)
