"""Arena battles -> a leaderboard of model versions by Bradley-Terry strength, with bootstrap 95% intervals.

Chatbot Arena's method: P(i beats j) = sigmoid(beta_i - beta_j), fitted by maximum likelihood over every
battle (a tie or both-bad counts as half a win for each side), shown on the Elo scale (1000 + 400/ln 10 *
beta, mean strength 1000). The interval comes from refitting on battles resampled with replacement.
A tiny L2 term keeps a version that has only won (or only lost) finite.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize
from sqlmodel import Session, select

from alignloop.core import crud
from alignloop.core.models import Comparison, ModelVersion, Vote

SCALE = 400 / math.log(10)


@dataclass
class Battle:
    a: str
    b: str
    score_a: float  # 1 a won, 0 b won, 0.5 tie / both bad


def arena_battles(session: Session) -> list[Battle]:
    rows = session.exec(
        select(Comparison, Vote)
        .join(Vote, Vote.comparison_id == Comparison.id)
        .where(Comparison.source == "arena")
    ).all()
    names = {v.id: v.name for v in session.exec(select(ModelVersion)).all()}
    battles = []
    for comparison, vote in rows:
        a, b = (g.model_version_id for g in crud.comparison_generations(session, comparison_id=comparison.id))
        if a is None or b is None or vote.choice is None:
            continue
        score = {"a": 1.0, "b": 0.0}.get(vote.choice, 0.5)
        battles.append(Battle(a=names[a], b=names[b], score_a=score))
    return battles


def fit(battles: list[Battle], models: list[str], l2: float = 1e-4) -> np.ndarray:
    index = {m: i for i, m in enumerate(models)}
    a = np.array([index[x.a] for x in battles])
    b = np.array([index[x.b] for x in battles])
    y = np.array([x.score_a for x in battles])

    def loss(beta):
        d = beta[a] - beta[b]
        p = 1 / (1 + np.exp(-d))
        nll = -np.sum(y * np.log(p + 1e-12) + (1 - y) * np.log(1 - p + 1e-12)) + l2 * np.sum(beta**2)
        g = np.zeros_like(beta)
        np.add.at(g, a, p - y)
        np.add.at(g, b, y - p)
        return nll, g + 2 * l2 * beta

    beta = minimize(loss, np.zeros(len(models)), jac=True, method="L-BFGS-B").x
    return beta - beta.mean()


def leaderboard(battles: list[Battle], *, rounds: int = 200, seed: int = 0) -> list[dict]:
    if not battles:
        return []
    models = sorted({x.a for x in battles} | {x.b for x in battles})
    point = fit(battles, models)
    rng = np.random.default_rng(seed)
    samples = np.array([fit([battles[i] for i in rng.integers(0, len(battles), len(battles))], models)
                        for _ in range(rounds)])  # fmt: skip
    low, high = np.percentile(samples, 2.5, axis=0), np.percentile(samples, 97.5, axis=0)
    counts = {m: sum(m in (x.a, x.b) for x in battles) for m in models}
    wins = {m: sum((x.a == m) * x.score_a + (x.b == m) * (1 - x.score_a) for x in battles) for m in models}
    table = [
        {"model": m, "rating": round(1000 + SCALE * point[i], 1), "ci_low": round(1000 + SCALE * low[i], 1),
         "ci_high": round(1000 + SCALE * high[i], 1), "battles": counts[m], "win_rate": round(wins[m] / counts[m], 3)}
        for i, m in enumerate(models)
    ]  # fmt: skip
    table.sort(key=lambda r: -r["rating"])
    for rank, row in enumerate(table, 1):
        row["rank"] = rank
    return table
