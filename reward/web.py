"""Reward models on /admin/reward: each version's held-out accuracy, calibration, length bias and its PNG report.
Admins only, checked in each handler. The page is reward/templates/reward.html (autoescaped)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse
from pydantic import BaseModel

from alignloop.core import crud
from alignloop.core.http import AdminDep, DbId, SessionDep, render, templates_for
from alignloop.core.models import ModelVersion, Run

router = APIRouter(tags=["reward"])


class RewardModelOut(BaseModel):
    # A registered reward model and its figures (accuracy, ECE, length bias... as training recorded them).
    id: int
    name: str
    base: str
    round: int | None
    run_id: int | None
    metrics: dict


templates = templates_for(Path(__file__).parent / "templates")


@router.get("/api/reward/models", response_model=list[RewardModelOut])
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
def report_png(version_id: DbId, user: AdminDep, session: SessionDep):
    version = session.get(ModelVersion, version_id)
    path = _report_path(session, version) if version is not None and version.kind == "reward" else None
    if path is None:
        raise HTTPException(status_code=404, detail="no report for this reward model")
    return FileResponse(path, media_type="image/png")


@router.get("/admin/reward", response_class=HTMLResponse, include_in_schema=False)
def reward_page(request: Request, user: AdminDep, session: SessionDep):
    sections = [
        {
            "version": v,
            "metrics": v.metrics or {},
            "has_report": _report_path(session, v) is not None,
            "held": (v.metrics or {}).get("evaluation", {}).get("held_out", {}),
        }
        for v in reversed(crud.list_model_versions(session, kind="reward"))
    ]
    return render(templates, request, "reward.html", title="Reward models", user=user, sections=sections)
