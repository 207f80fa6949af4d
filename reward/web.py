"""Reward models on /admin/reward: each version's held-out accuracy, calibration, length bias and its PNG report.
Admins only, checked in each handler."""

from __future__ import annotations

import html
from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse, HTMLResponse

from alignloop.core import crud
from alignloop.core.http import AdminDep, SessionDep, page
from alignloop.core.models import ModelVersion, Run

router = APIRouter(tags=["reward"])


def _fmt(value) -> str:
    return "–" if value is None else f"{value:.3f}" if isinstance(value, float) else html.escape(str(value))


@router.get("/api/reward/models")
def reward_models(user: AdminDep, session: SessionDep) -> list[dict]:
    """Registered reward models with their training and evaluation figures."""
    return [
        {
            "id": v.id,
            "name": v.name,
            "base": v.base,
            "round": v.round,
            "run_id": v.run_id,
            "metrics": v.metrics,
        }
        for v in crud.list_model_versions(session, kind="reward")
    ]


def _report_path(session, version: ModelVersion) -> Path | None:
    run = session.get(Run, version.run_id) if version.run_id else None
    if run is None or not run.log_path:
        return None
    path = Path(run.log_path).parent / "report.png"
    return path if path.is_file() else None


@router.get("/admin/reward/{version_id}/report.png", include_in_schema=False)
def report_png(version_id: int, user: AdminDep, session: SessionDep):
    version = session.get(ModelVersion, version_id)
    path = _report_path(session, version) if version is not None and version.kind == "reward" else None
    if path is None:
        raise HTTPException(status_code=404, detail="no report for this reward model")
    return FileResponse(path, media_type="image/png")


@router.get("/admin/reward", response_class=HTMLResponse, include_in_schema=False)
def reward_page(user: AdminDep, session: SessionDep):
    sections = []
    for v in reversed(crud.list_model_versions(session, kind="reward")):
        m = v.metrics or {}
        held = m.get("evaluation", {}).get("held_out", {})
        sources = ", ".join(
            f"{html.escape(k)} {_fmt(s['accuracy'])} ({s['pairs']})"
            for k, s in held.get("by_source", {}).items()
        )
        enc = m.get("encoding", {})
        image = (
            f'<img src="/admin/reward/{v.id}/report.png" alt="report" style="max-width:100%">'
            if _report_path(session, v)
            else ""
        )
        sections.append(
            f"<h3>{html.escape(v.name)}</h3><p>base {html.escape(v.base)} · {html.escape(str(m.get('method')))} · "
            f"round {_fmt(v.round)} · {m.get('train_pairs', '–')} training pairs, {m.get('steps', '–')} steps in "
            f"{_fmt(m.get('train_seconds'))} s</p><p>held-out accuracy <b>{_fmt(m.get('accuracy'))}</b> on "
            f"{held.get('pairs', 0)} pairs · ECE {_fmt(m.get('ece'))} · reward~length correlation "
            f"{_fmt(held.get('length_correlation'))} · by source: {sources or '–'}</p><p>truncated: "
            f"{enc.get('prompt_truncated', 0)} prompts, {enc.get('response_truncated', 0)} responses; "
            f"pairs dropped: {enc.get('dropped', 0)}</p>{image}"
        )
    body = '<p><a href="/admin">annotation quality</a></p><h2>Reward models</h2>' + (
        "".join(sections) or "<p>No reward model yet: <code>alignloop reward train</code>.</p>"
    )
    return page("Reward models", body, user)
