"""/admin/levels: the latest levels report (`alignloop report levels`), its table and its chart. Admins only.
The page is serve/templates/levels.html (autoescaped)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import HTMLResponse, Response

from alignloop.core.http import AdminDep, DbId, SessionDep, render, templates_for
from alignloop.core.models import Run
from serve.levels import chart_png, latest_report

router = APIRouter(tags=["levels"])
templates = templates_for(Path(__file__).parent / "templates")


@router.get("/admin/levels", response_class=HTMLResponse, include_in_schema=False)
def levels_page(request: Request, user: AdminDep, session: SessionDep):
    run = latest_report(session)
    report = run.metrics if run is not None else None
    return render(
        templates,
        request,
        "levels.html",
        title="Levels",
        user=user,
        report=report,
        run_id=run.id if run is not None else None,
    )


@router.get("/admin/levels/{run_id}.png", include_in_schema=False)
def levels_chart(run_id: DbId, user: AdminDep, session: SessionDep):
    """Drawn again from the stored rows: any web worker can answer, whatever its disk holds."""
    run = session.get(Run, run_id)
    if run is None or run.kind != "levels" or run.status != "succeeded":
        raise HTTPException(404, "no such levels report")
    return Response(
        chart_png(run.metrics["rows"], title=f"judge {run.metrics['judge']}"), media_type="image/png"
    )
