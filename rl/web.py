"""RL on /admin/rl: every training run's curves (reward, KL, entropy, losses) and every policy evaluation.
Admins only, checked in each handler. The page is rl/templates/rl.html (autoescaped)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse
from pydantic import BaseModel
from sqlmodel import col, select

from alignloop.core.http import AdminDep, SessionDep, render, templates_for
from alignloop.core.models import ModelVersion, Run

router = APIRouter(tags=["rl"])


class RLRunOut(BaseModel):
    # An RL training run or a policy evaluation: its saved config and final metrics (no per-step history).
    id: int
    kind: str
    status: str
    config: dict
    metrics: dict


templates = templates_for(Path(__file__).parent / "templates")


@router.get("/api/rl/runs", response_model=list[RLRunOut])
def rl_runs(user: AdminDep, session: SessionDep) -> list[dict]:
    """RL training runs and policy evaluations, newest first, without the per-step history."""
    runs = session.exec(
        select(Run).where(col(Run.kind).in_(["rl", "eval"])).order_by(col(Run.id).desc())
    ).all()
    return [
        {
            "id": r.id,
            "kind": r.kind,
            "status": r.status,
            "config": r.config,
            "metrics": {k: v for k, v in r.metrics.items() if k != "history"},
        }
        for r in runs
    ]


@router.get("/admin/rl", response_class=HTMLResponse, include_in_schema=False)
def rl_page(request: Request, user: AdminDep, session: SessionDep):
    runs = session.exec(select(Run).where(Run.kind == "rl").order_by(col(Run.id).desc())).all()
    sections = [
        {"run": run, "model": session.get(ModelVersion, run.output_model_id) if run.output_model_id else None}
        for run in runs
    ]
    evals = session.exec(select(Run).where(Run.kind == "eval").order_by(col(Run.id).desc())).all()
    return render(templates, request, "rl.html", title="RL", user=user, sections=sections, evals=evals)
