"""Quality control on /admin: the round's agreement figures, each annotator's record, and the two remedies
(disable the account; leave their votes out of every export). Admins only, checked in each handler.
Pages are templates in annotate/templates (autoescaped, extending the kernel's admin layout)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from pydantic import BaseModel

from alignloop.core import websec
from alignloop.core.http import MAX_INT, AdminDep, DbId, SessionDep, render, templates_for
from alignloop.core.models import User
from annotate.quality import QualityReport, quality_report

router = APIRouter(tags=["quality"])


templates = templates_for(Path(__file__).parent / "templates")


class RoundModelOut(BaseModel):
    name: str
    kind: str
    lineage: list[str]  # the model itself first, then its ancestors


class VsPredecessorOut(BaseModel):
    # Human votes on this round's policy against the previous round's (annotate.evidence), Wilson 95% interval.
    round: int
    policy: str
    predecessor: str | None
    battles: int
    wins: int
    losses: int
    ties: int
    win_rate: float | None
    ci_low: float | None
    ci_high: float | None


class RoundOut(BaseModel):
    # One round of the loop: its data, its annotators' work, its models.
    round: int
    status: str
    prompts: int
    queued: int
    done: int
    votes_per_annotator: dict[str, int]
    krippendorff_alpha: float | None
    policy: str | None
    reward_model: str | None
    vs_predecessor: VsPredecessorOut | None
    models: list[RoundModelOut]


@router.get("/api/quality", response_model=QualityReport)
def quality_json(
    user: AdminDep, session: SessionDep, round: Annotated[int | None, Query(ge=0, le=MAX_INT)] = None
) -> dict:
    """Agreement, gold accuracy, position bias and flags, per round or overall."""
    return asdict(quality_report(session, round=round))


@router.get("/admin", response_class=HTMLResponse, include_in_schema=False)
def admin_page(
    request: Request,
    user: AdminDep,
    session: SessionDep,
    round: Annotated[int | None, Query(ge=0, le=MAX_INT)] = None,
):
    report = quality_report(session, round=round)
    return render(
        templates,
        request,
        "admin_quality.html",
        title="Admin",
        user=user,
        report=report,
        scope=f"round {round}" if round is not None else "all rounds",
        annotators=sorted(report.annotators, key=lambda a: (not a.flags, a.name)),
    )


@router.post("/admin/users/{user_id}/{action}", include_in_schema=False)
def user_action(
    user_id: DbId,
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
    if action == "disable":  # re-enabling later must not bring back the sessions the account had
        websec.end_all_logins(session, target.id)
    return RedirectResponse("/admin", status_code=303)


@router.get("/api/rounds", response_model=list[RoundOut])
def rounds_json(user: AdminDep, session: SessionDep) -> list[dict]:
    """Each round: prompts, comparisons queued/done, votes per annotator, agreement, models and lineage."""
    from sqlmodel import func, select

    from alignloop.core import crud
    from alignloop.core.models import Comparison, ModelVersion, Round, Vote
    from annotate.evidence import round_over_round

    names = {u.id: u.name for u in session.exec(select(User)).all()}
    evidence = {r.round: r for r in round_over_round(session)}
    out = []
    for r in session.exec(select(Round).order_by(Round.number)).all():
        counts = dict(
            session.exec(
                select(Comparison.status, func.count())
                .where(Comparison.round == r.number)
                .group_by(Comparison.status)
            ).all()
        )
        prompts = session.exec(
            select(func.count(func.distinct(Comparison.prompt_id))).where(Comparison.round == r.number)
        ).one()
        votes = session.exec(
            select(Vote.user_id, func.count())
            .join(Comparison, Comparison.id == Vote.comparison_id)
            .where(Comparison.round == r.number)
            .group_by(Vote.user_id)
        ).all()
        models = session.exec(select(ModelVersion).where(ModelVersion.round == r.number)).all()
        policy = session.get(ModelVersion, r.policy_id) if r.policy_id else None
        out.append(
            {
                "round": r.number,
                "status": r.status,
                "prompts": prompts,
                "queued": counts.get("queued", 0),
                "done": counts.get("done", 0),
                "votes_per_annotator": {names.get(u, u): n for u, n in votes},
                "krippendorff_alpha": quality_report(session, round=r.number).krippendorff_alpha,
                "policy": policy.name if policy else None,
                "reward_model": session.get(ModelVersion, r.reward_id).name if r.reward_id else None,
                "vs_predecessor": asdict(evidence[r.number]) if r.number in evidence else None,
                "models": [
                    {
                        "name": m.name,
                        "kind": m.kind,
                        "lineage": [x.name for x in crud.model_lineage(session, model_id=m.id)],
                    }
                    for m in models
                ],
            }
        )
    return out


@router.get("/admin/rounds", response_class=HTMLResponse, include_in_schema=False)
def rounds_page(request: Request, user: AdminDep, session: SessionDep):
    from markupsafe import Markup

    from annotate.evidence import round_over_round, svg_chart

    # The chart is SVG drawn by annotate.evidence from numbers, escaping every name it writes.
    chart = Markup(svg_chart(round_over_round(session)))
    return render(
        templates,
        request,
        "admin_rounds.html",
        title="Rounds",
        user=user,
        chart=chart,
        rounds=rounds_json(user, session),
    )
