"""/admin/levels: the latest levels report (`alignloop report levels`), its table and its chart. Admins only."""

from __future__ import annotations

import html

from fastapi import APIRouter, HTTPException
from fastapi.responses import HTMLResponse, Response

from alignloop.core.http import AdminDep, SessionDep, page
from alignloop.core.models import Run
from serve.levels import chart_png, latest_report

router = APIRouter(tags=["levels"])


def _cell(value, fmt: str = "") -> str:
    return "–" if value is None else html.escape(format(value, fmt) if fmt else str(value))


@router.get("/admin/levels", response_class=HTMLResponse, include_in_schema=False)
def levels_page(user: AdminDep, session: SessionDep):
    run = latest_report(session)
    if run is None:
        body = "<p>No levels report yet: <code>alignloop report levels [--judge REWARD_MODEL]</code>.</p>"
        return page("Levels", body, user)
    report = run.metrics
    rows = []
    for r in report["rows"]:
        flag = f"<br><b>self-judged</b>: {html.escape(r['self_judged'])}" if r["self_judged"] else ""
        human = (f"{r['human_rating']:.0f} [{r['human_ci'][0]:.0f}, {r['human_ci'][1]:.0f}] ({r['human_battles']})"
                 if r["human_rating"] is not None else "–")  # fmt: skip
        rows.append(
            f"<tr><td>{_cell(r['level'])}</td><td>{_cell(r['name'])}</td>"
            f"<td>{_cell(r['win_rate'], '.2f')} ± {_cell(r['stderr'], '.2f')}{flag}</td><td>{human}</td>"
            f"<td>{_cell(r['train_minutes'], '.2f')} {_cell(r['device'])}</td><td>{_cell(r['votes'])}</td>"
            f"<td>{_cell(r['examples'])}</td><td>{_cell(r['adapter_mb'], '.2f')}</td>"
            f"<td>{_cell(r['tokens_per_s'], '.0f')}</td></tr>"
        )
    body = (
        f"<p>Report {run.id}: judge <b>{html.escape(report['judge'])}</b> (a reward model), {report['prompts']} held-out "
        f"prompts, base <b>{html.escape(report['base'])}</b>. Win rate against the base's answers, ties half.</p>"
        f"<img src='/admin/levels/{run.id}.png' alt='win rate against cost' style='max-width:100%'>"
        "<table border=1 cellpadding=4 style='border-collapse:collapse'><tr><th>level</th><th>version</th>"
        "<th>win rate ± s.e.</th><th>human BT rating [95% CI] (battles)</th><th>train minutes</th><th>votes</th>"
        f"<th>examples</th><th>adapter MB</th><th>tokens/s</th></tr>{''.join(rows)}</table>"
    )  # fmt: skip
    return page("Levels", body, user)


@router.get("/admin/levels/{run_id}.png", include_in_schema=False)
def levels_chart(run_id: int, user: AdminDep, session: SessionDep):
    """Drawn again from the stored rows: any web worker can answer, whatever its disk holds."""
    run = session.get(Run, run_id)
    if run is None or run.kind != "levels" or run.status != "succeeded":
        raise HTTPException(404, "no such levels report")
    return Response(
        chart_png(run.metrics["rows"], title=f"judge {run.metrics['judge']}"), media_type="image/png"
    )
