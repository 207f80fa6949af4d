"""RL on /admin/rl: every training run's curves (reward, KL, entropy, losses) and every policy evaluation.
Admins only, checked in each handler."""

from __future__ import annotations

import html

from fastapi import APIRouter
from fastapi.responses import HTMLResponse
from sqlmodel import col, select

from alignloop.core.http import AdminDep, SessionDep, page
from alignloop.core.models import ModelVersion, Run

router = APIRouter(tags=["rl"])


def _fmt(value) -> str:
    return "–" if value is None else f"{value:.3f}" if isinstance(value, float) else html.escape(str(value))


@router.get("/api/rl/runs")
def rl_runs(user: AdminDep, session: SessionDep) -> list[dict]:
    """RL training runs and policy evaluations, newest first, without the per-step history."""
    runs = session.exec(
        select(Run).where(col(Run.kind).in_(["rl", "eval"])).order_by(col(Run.id).desc())
    ).all()
    return [
        {"id": r.id, "kind": r.kind, "status": r.status, "config": r.config,
         "metrics": {k: v for k, v in r.metrics.items() if k != "history"}}
        for r in runs
    ]  # fmt: skip


@router.get("/admin/rl", response_class=HTMLResponse, include_in_schema=False)
def rl_page(user: AdminDep, session: SessionDep):
    runs = session.exec(select(Run).where(Run.kind == "rl").order_by(col(Run.id).desc())).all()
    sections = []
    for run in runs:
        m = run.metrics
        model = session.get(ModelVersion, run.output_model_id) if run.output_model_id else None
        sections.append(
            f"<h3>run {run.id}: {html.escape(str(run.config.get('algo')))} from {html.escape(str(run.config.get('policy')))}"
            f" · {html.escape(run.status)}</h3><p>→ {html.escape(model.name) if model else '–'} · steps "
            f"{_fmt(m.get('step') or m.get('steps'))} · reward {_fmt(m.get('reward_start'))} → {_fmt(m.get('reward_end'))}"
            f" · KL {_fmt(m.get('kl_end'))}</p><img src='/admin/runs/{run.id}/metrics.png' alt='metrics' "
            "style='max-width:100%'>"
        )
    evals = session.exec(select(Run).where(Run.kind == "eval").order_by(col(Run.id).desc())).all()
    rows = "".join(
        f"<tr><td>{html.escape(str(e.metrics.get('policy')))}</td><td>{html.escape(str(e.metrics.get('baseline')))}</td>"
        f"<td>{_fmt(e.metrics.get('reward'))} / {_fmt(e.metrics.get('baseline_reward'))}</td>"
        f"<td>{_fmt(e.metrics.get('kl_to_baseline'))}</td><td>{_fmt(e.metrics.get('length'))} / "
        f"{_fmt(e.metrics.get('baseline_length'))}</td><td>{_fmt(e.metrics.get('win_rate_by_judge'))} "
        f"({html.escape(str(e.metrics.get('judge')))})</td></tr>"
        for e in evals
    )
    table = (
        "<table border=1 cellpadding=4 style='border-collapse:collapse'><tr><th>policy</th><th>baseline</th>"
        "<th>reward (policy / baseline)</th><th>KL to baseline</th><th>length</th><th>win rate (judge)</th></tr>"
        f"{rows}</table>"
        if rows
        else "<p>No evaluation yet: <code>alignloop rl eval</code>.</p>"
    )
    body = (
        "<p><a href='/admin'>annotation quality</a> · <a href='/admin/reward'>reward models</a></p>"
        f"<h2>Policy evaluations</h2>{table}<h2>RL runs</h2>"
        + ("".join(sections) or "<p>No RL run yet: <code>alignloop rl train</code>.</p>")
    )
    return page("RL", body, user)
