"""Round over round: did each round's policy beat its predecessor, by human judgement?

`round next` queues round N+1 as the new policy against round N's, one comparison per prompt, sides drawn at
random. This module reads those comparisons back:
- a battle is one human vote on a round-N comparison between the round's policy (`Round.policy_id`) and one
  other model version (its predecessor); AI judges' votes and votes excluded by quality control do not count;
- the win rate is (wins + ties / 2) / battles, a tie or both-bad being half a win each way, as in the arena;
- the interval is the Wilson score interval at 95% on that rate. Counting a tie as half a win makes the
  binomial model an approximation; Wilson rather than the normal interval because it stays inside [0, 1] and
  behaves at the small counts early rounds have (Brown, Cai & DasGupta 2001).
`round_battles` hands the same votes to the Bradley-Terry leaderboard (`serve.leaderboard`) beside the arena's.
"""

from __future__ import annotations

import html
import math
from dataclasses import asdict, dataclass

from sqlmodel import Session, col, select

from alignloop.core import crud
from alignloop.core.models import Comparison, ModelVersion, Round, User, Vote

Z95 = 1.959964


@dataclass
class RoundResult:
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


def wilson(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def round_battles(session: Session) -> list[tuple[int, str, str, float]]:
    """(round, the round's policy, its opponent, score of the policy: 1 win, 0 loss, 0.5 tie) per human vote."""
    names = {v.id: v.name for v in session.exec(select(ModelVersion)).all()}
    policies = {r.number: r.policy_id for r in session.exec(select(Round)).all() if r.policy_id is not None}
    rows = session.exec(
        select(Comparison, Vote)
        .join(Vote, Vote.comparison_id == Comparison.id)
        .join(User, User.id == Vote.user_id)
        .where(col(Comparison.round).in_(list(policies)), Comparison.source == "queue")
        .where(User.kind == "human", col(User.votes_excluded).is_(False), col(Vote.choice).is_not(None))
        .order_by(Comparison.round, Vote.id)
    ).all()
    battles = []
    for comparison, vote in rows:
        versions = [
            g.model_version_id for g in crud.comparison_generations(session, comparison_id=comparison.id)
        ]
        policy = policies[comparison.round]
        if len(versions) != 2 or versions.count(policy) != 1 or None in versions:
            continue  # not a policy-against-predecessor comparison
        side = versions.index(policy)
        score = {"a": 1.0 - side, "b": float(side)}.get(vote.choice, 0.5)
        battles.append((comparison.round, names[policy], names[versions[1 - side]], score))
    return battles


def round_over_round(session: Session) -> list[RoundResult]:
    """One row per round whose policy has been voted on against its predecessor, oldest first."""
    by_round: dict[int, list[tuple[str, str, float]]] = {}
    for number, policy, opponent, score in round_battles(session):
        by_round.setdefault(number, []).append((policy, opponent, score))
    results = []
    for number, battles in sorted(by_round.items()):
        scores = [s for _, _, s in battles]
        opponents = sorted({o for _, o, _ in battles})
        wins, losses = scores.count(1.0), scores.count(0.0)
        rate = sum(scores) / len(scores)
        low, high = wilson(sum(scores), len(scores))
        results.append(
            RoundResult(
                round=number,
                policy=battles[0][0],
                predecessor=", ".join(opponents),
                battles=len(scores),
                wins=wins,
                losses=losses,
                ties=len(scores) - wins - losses,
                win_rate=round(rate, 4),
                ci_low=round(low, 4),
                ci_high=round(high, 4),
            )
        )
    return results


def report_text(results: list[RoundResult]) -> str:
    """The table `alignloop round report` prints, with a bar per round (| marks 50%)."""
    if not results:
        return "no round-over-round votes yet: vote on a round's policy-vs-predecessor comparisons first"
    lines = [
        f"{'round':>5}  {'policy':<24} {'vs':<24} {'battles':>7}  {'win rate':>8}  {'95% CI':<13}  chart"
    ]
    for r in results:
        bar = [" "] * 41
        lo, hi, mid = (round(40 * x) for x in (r.ci_low, r.ci_high, r.win_rate))
        for i in range(lo, hi + 1):
            bar[i] = "-"
        bar[20], bar[mid] = "|", "o"
        lines.append(
            f"{r.round:>5}  {r.policy[:24]:<24} {(r.predecessor or '-')[:24]:<24} {r.battles:>7}  "
            f"{r.win_rate:>8.1%}  {r.ci_low:.2f} – {r.ci_high:.2f}  [{''.join(bar)}]"
        )
    return "\n".join(lines)


def report_json(results: list[RoundResult]) -> list[dict]:
    return [asdict(r) for r in results]


def svg_chart(results: list[RoundResult], width: int = 480, height: int = 200) -> str:
    """Win rate against the predecessor per round, with its interval and the 50% line: plain SVG, no script."""
    if not results:
        return "<p>No round-over-round votes yet.</p>"
    left, right, top, bottom = 40, 10, 10, 30
    step = (width - left - right) / max(1, len(results))

    def y(p: float) -> float:
        return top + (1 - p) * (height - top - bottom)

    parts = [
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' role='img' "
        "aria-label='win rate of each round's policy against its predecessor' id='round-over-round'>",
        f"<line x1='{left}' x2='{width - right}' y1='{y(0.5)}' y2='{y(0.5)}' stroke='#999' stroke-dasharray='4'/>",
    ]
    for p in (0, 0.5, 1):
        parts.append(f"<text x='4' y='{y(p) + 4}' font-size='11'>{p:.0%}</text>")
    for i, r in enumerate(results):
        x = left + step * (i + 0.5)
        parts += [
            f"<line x1='{x}' x2='{x}' y1='{y(r.ci_low)}' y2='{y(r.ci_high)}' stroke='#36c' stroke-width='2'/>",
            f"<circle cx='{x}' cy='{y(r.win_rate)}' r='4' fill='#36c'><title>round {r.round}: "
            f"{html.escape(r.policy)} won {r.win_rate:.0%} of {r.battles} (95% CI {r.ci_low:.2f}–{r.ci_high:.2f})"
            "</title></circle>",
            f"<text x='{x - 12}' y='{height - 10}' font-size='11'>r{r.round}</text>",
        ]
    parts.append("</svg>")
    return "".join(parts)
