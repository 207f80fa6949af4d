"""Quality control on /admin: the round's agreement figures, each annotator's record, and the two remedies
(disable the account; leave their votes out of every export). Admins only, checked in each handler."""

from __future__ import annotations

import html
from dataclasses import asdict
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, HTTPException, Query
from fastapi.responses import HTMLResponse, RedirectResponse

from alignloop.models import User
from alignloop.web import SessionDep, page, require_role
from annotate.quality import quality_report

router = APIRouter(tags=["quality"])
AdminDep = Annotated[User, Depends(require_role("admin"))]


def _fmt(value, digits: int = 2) -> str:
    return (
        "–"
        if value is None
        else f"{value:.{digits}f}"
        if isinstance(value, float)
        else html.escape(str(value))
    )


@router.get("/api/quality")
def quality_json(
    user: AdminDep, session: SessionDep, round: Annotated[int | None, Query(ge=0)] = None
) -> dict:
    """Agreement, gold accuracy, position bias and flags, per round or overall."""
    return asdict(quality_report(session, round=round))


@router.get("/admin", response_class=HTMLResponse, include_in_schema=False)
def admin_page(user: AdminDep, session: SessionDep, round: Annotated[int | None, Query(ge=0)] = None):
    report = quality_report(session, round=round)
    scope = f"round {round}" if round is not None else "all rounds"
    summary = (
        f"<p>{report.num_votes} votes ({scope}) · Krippendorff's alpha {_fmt(report.krippendorff_alpha)} over "
        f"{report.num_multi_voted} multiply-voted items · position bias {_fmt(report.position_bias)} "
        f"(0.50 = none) · median {_fmt(report.median_seconds, 1)} s per item · AI-human agreement "
        f"{_fmt(report.ai_human_agreement)} on {report.ai_human_items} items</p>"
    )
    rows = []
    for a in sorted(report.annotators, key=lambda a: (not a.flags, a.name)):
        actions = "".join(
            f'<form method="post" action="/admin/users/{a.user_id}/{action}" style="display:inline">'
            f"<button>{label}</button></form> "
            for action, label in (
                ("enable" if a.disabled else "disable", "Enable" if a.disabled else "Disable"),
                (
                    "include" if a.votes_excluded else "exclude",
                    "Include votes" if a.votes_excluded else "Exclude votes",
                ),
            )
        )
        rows.append(
            f"<tr{' style=background:#fff3f3' if a.flags else ''}><td>{html.escape(a.name)}</td><td>{a.kind}</td>"
            f"<td>{a.num_votes}</td><td>{_fmt(a.gold_accuracy)} ({a.num_gold})</td><td>{_fmt(a.consensus_kappa)}</td>"
            f"<td>{_fmt(a.position_bias)}</td><td>{_fmt(a.median_seconds, 1)}</td>"
            f"<td>{html.escape('; '.join(a.flags)) or 'ok'}{' · disabled' if a.disabled else ''}"
            f"{' · votes excluded' if a.votes_excluded else ''}</td><td>{actions}</td></tr>"
        )
    table = (
        "<table border=1 cellpadding=4 style='border-collapse:collapse'><tr><th>annotator</th><th>kind</th>"
        "<th>votes</th><th>gold accuracy (n)</th><th>kappa vs consensus</th><th>position bias</th><th>median s</th>"
        "<th>flags</th><th></th></tr>" + "".join(rows) + "</table>"
    )
    kappas = "".join(
        f"<li>{html.escape(a)} – {html.escape(b)}: {k:.2f} on {n} items</li>"
        for a, b, k, n in report.pairwise_kappa
    )
    body = f"<p><a href='/admin/reward'>reward models</a> · <a href='/admin/rl'>RL runs and evaluations</a></p><h2>Annotation quality</h2>{summary}{table}<h3>Pairwise Cohen's kappa</h3><ul>{kappas or '<li>–</li>'}</ul>"
    return page("Admin", body, user)


@router.post("/admin/users/{user_id}/{action}", include_in_schema=False)
def user_action(
    user_id: int,
    action: Literal["disable", "enable", "exclude", "include"],
    user: AdminDep,
    session: SessionDep,
):
    target = session.get(User, user_id)
    if target is None:
        raise HTTPException(status_code=404, detail="no such user")
    if target.id == user.id and action == "disable":
        raise HTTPException(status_code=400, detail="you cannot disable your own account")
    if action in ("disable", "enable"):
        target.disabled = action == "disable"
    else:
        target.votes_excluded = action == "exclude"
    session.add(target)
    session.commit()
    return RedirectResponse("/admin", status_code=303)
