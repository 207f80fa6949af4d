"""Quality control on /admin: the round's agreement figures, each annotator's record, and the two remedies
(disable the account; leave their votes out of every export). Admins only, checked in each handler."""

from __future__ import annotations

import html
from dataclasses import asdict
from typing import Annotated, Literal

from fastapi import APIRouter, HTTPException, Query
from fastapi.responses import HTMLResponse, RedirectResponse

from alignloop.core.http import MAX_INT, AdminDep, SessionDep, page
from alignloop.core.models import User
from annotate.quality import quality_report

router = APIRouter(tags=["quality"])


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
    user: AdminDep, session: SessionDep, round: Annotated[int | None, Query(ge=0, le=MAX_INT)] = None
) -> dict:
    """Agreement, gold accuracy, position bias and flags, per round or overall."""
    return asdict(quality_report(session, round=round))


@router.get("/admin", response_class=HTMLResponse, include_in_schema=False)
def admin_page(
    user: AdminDep, session: SessionDep, round: Annotated[int | None, Query(ge=0, le=MAX_INT)] = None
):
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


@router.get("/api/rounds")
def rounds_json(user: AdminDep, session: SessionDep) -> list[dict]:
    """Each round: prompts, comparisons queued/done, votes per annotator, agreement, models and lineage."""
    from sqlmodel import func, select

    from alignloop.core import crud
    from alignloop.core.models import Comparison, ModelVersion, Round, Vote

    names = {u.id: u.name for u in session.exec(select(User)).all()}
    out = []
    for r in session.exec(select(Round).order_by(Round.number)).all():
        counts = dict(session.exec(select(Comparison.status, func.count()).where(Comparison.round == r.number)
                                   .group_by(Comparison.status)).all())  # fmt: skip
        prompts = session.exec(
            select(func.count(func.distinct(Comparison.prompt_id))).where(Comparison.round == r.number)
        ).one()
        votes = session.exec(select(Vote.user_id, func.count()).join(Comparison, Comparison.id == Vote.comparison_id)
                             .where(Comparison.round == r.number).group_by(Vote.user_id)).all()  # fmt: skip
        models = session.exec(select(ModelVersion).where(ModelVersion.round == r.number)).all()
        policy = session.get(ModelVersion, r.policy_id) if r.policy_id else None
        out.append({
            "round": r.number, "status": r.status, "prompts": prompts, "queued": counts.get("queued", 0),
            "done": counts.get("done", 0), "votes_per_annotator": {names.get(u, u): n for u, n in votes},
            "krippendorff_alpha": quality_report(session, round=r.number).krippendorff_alpha,
            "policy": policy.name if policy else None,
            "reward_model": session.get(ModelVersion, r.reward_id).name if r.reward_id else None,
            "models": [{"name": m.name, "kind": m.kind,
                        "lineage": [x.name for x in crud.model_lineage(session, model_id=m.id)]} for m in models],
        })  # fmt: skip
    return out


@router.get("/admin/rounds", response_class=HTMLResponse, include_in_schema=False)
def rounds_page(user: AdminDep, session: SessionDep):
    rows = []
    for r in rounds_json(user, session):
        votes = ", ".join(f"{html.escape(str(k))} {v}" for k, v in r["votes_per_annotator"].items()) or "–"
        models = "<br>".join(
            f"{html.escape(m['name'])} ({m['kind']}): {' ← '.join(html.escape(x) for x in m['lineage'])}"
            for m in r["models"]
        )
        rows.append(
            f"<tr><td>{r['round']}</td><td>{r['status']}</td><td>{r['prompts']}</td><td>{r['queued']} / {r['done']}</td>"
            f"<td>{votes}</td><td>{_fmt(r['krippendorff_alpha'])}</td><td>{_fmt(r['policy'])}</td>"
            f"<td>{_fmt(r['reward_model'])}</td><td>{models or '–'}</td></tr>"
        )
    body = (
        "<p><a href='/admin'>quality</a> · <a href='/admin/jobs'>jobs</a></p><h2>Rounds</h2>"
        "<table border=1 cellpadding=4 style='border-collapse:collapse'><tr><th>round</th><th>status</th>"
        "<th>prompts</th><th>queued / done</th><th>votes per annotator</th><th>alpha</th><th>policy</th>"
        "<th>reward model</th><th>models of the round (lineage)</th></tr>" + "".join(rows) + "</table>"
    )
    return page("Rounds", body, user)
