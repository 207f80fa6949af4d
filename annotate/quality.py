"""Quality control: is each annotator accurate, do annotators agree, are they biased by position?

Per round (or over everything):
- gold accuracy per annotator: their choices on comparisons with a known answer;
- agreement: Krippendorff's alpha (nominal, via the `krippendorff` package) over every annotator and
  pairwise item with two or more votes, and Cohen's kappa for every pair of annotators with shared items;
- position bias: how often an annotator picks the response that was shown first (0.5 = none);
- median seconds per item and vote counts;
- flags: gold accuracy, or kappa against the leave-one-out consensus of the other humans, below a threshold
  (with enough evidence to judge). Consensus rather than mean pairwise kappa, so that one careless annotator
  does not drag down everybody they were paired with;
- AI-human agreement: how often an AI judge's choice matches the human majority on items both voted on.
Rankings (K > 2) count towards counts and timing; the agreement statistics use pairwise choices.
"""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from itertools import combinations

import numpy as np
from sqlmodel import Session, select

from alignloop.core.models import CHOICES, Comparison, User, Vote

GOLD_THRESHOLD = 0.6
KAPPA_THRESHOLD = 0.2
MIN_GOLD_VOTES = 5
MIN_SHARED_ITEMS = 5


@dataclass
class AnnotatorStats:
    user_id: int
    name: str
    kind: str
    disabled: bool
    votes_excluded: bool
    num_votes: int = 0
    num_gold: int = 0
    gold_accuracy: float | None = None
    consensus_kappa: float | None = None  # kappa against the other humans' plurality on shared items
    position_bias: float | None = None  # share of a/b choices that picked the response shown first
    median_seconds: float | None = None
    flags: list[str] = field(default_factory=list)


@dataclass
class QualityReport:
    round: int | None
    num_votes: int
    num_multi_voted: int  # pairwise items with at least two votes
    krippendorff_alpha: float | None
    pairwise_kappa: list[tuple[str, str, float, int]]  # (annotator, annotator, kappa, shared items)
    position_bias: float | None
    median_seconds: float | None
    ai_human_agreement: float | None
    ai_human_items: int
    annotators: list[AnnotatorStats]


def cohen_kappa(a: list[str], b: list[str]) -> float | None:
    """Cohen's kappa for two raters' nominal labels on the same items; None when undefined."""
    if not a:
        return None
    n = len(a)
    observed = sum(x == y for x, y in zip(a, b, strict=True)) / n
    ca, cb = Counter(a), Counter(b)
    expected = sum(ca[k] * cb[k] for k in set(ca) | set(cb)) / (n * n)
    if expected == 1:
        return 1.0 if observed == 1 else None
    return (observed - expected) / (1 - expected)


def _plurality(labels: list[str]) -> str | None:
    """The most common label, or None when there is none or two labels tie for most common."""
    ranked = Counter(labels).most_common(2)
    if not ranked or (len(ranked) == 2 and ranked[0][1] == ranked[1][1]):
        return None
    return ranked[0][0]


def krippendorff_alpha(votes_by_item: dict[int, dict[int, str]], raters: list[int]) -> float | None:
    import krippendorff

    items = [item for item, votes in votes_by_item.items() if len(votes) >= 2]
    if not items:
        return None
    codes = {c: i for i, c in enumerate(CHOICES)}
    data = np.full((len(raters), len(items)), np.nan)
    row = {r: i for i, r in enumerate(raters)}
    for j, item in enumerate(items):
        for rater, choice in votes_by_item[item].items():
            data[row[rater], j] = codes[choice]
    values = set(np.unique(data[~np.isnan(data)]))
    if len(values) < 2:
        return 1.0  # everybody gave the same answer everywhere: perfect agreement, alpha is 0/0
    return float(krippendorff.alpha(reliability_data=data, level_of_measurement="nominal"))


def quality_report(
    session: Session,
    *,
    round: int | None = None,
    gold_threshold: float = GOLD_THRESHOLD,
    kappa_threshold: float = KAPPA_THRESHOLD,
    min_gold_votes: int = MIN_GOLD_VOTES,
    min_shared_items: int = MIN_SHARED_ITEMS,
) -> QualityReport:
    query = select(Vote, Comparison).join(Comparison, Comparison.id == Vote.comparison_id)
    if round is not None:
        query = query.where(Comparison.round == round)
    rows = session.exec(query).all()
    users = {u.id: u for u in session.exec(select(User)).all()}
    stats = {
        uid: AnnotatorStats(
            user_id=uid, name=u.name, kind=u.kind, disabled=u.disabled, votes_excluded=u.votes_excluded
        )
        for uid, u in users.items()
    }

    choices: dict[int, dict[int, str]] = defaultdict(dict)  # comparison -> user -> choice (pairwise only)
    gold_hits: dict[int, list[bool]] = defaultdict(list)
    first_picks: dict[int, list[bool]] = defaultdict(list)
    seconds: dict[int, list[float]] = defaultdict(list)
    for vote, comparison in rows:
        s = stats[vote.user_id]
        s.num_votes += 1
        if vote.seconds is not None:
            seconds[vote.user_id].append(vote.seconds)
        if vote.choice is None:
            continue
        choices[comparison.id][vote.user_id] = vote.choice
        if comparison.gold is not None:
            gold_hits[vote.user_id].append(vote.choice == comparison.gold)
        if vote.choice in ("a", "b") and vote.shown_order:
            first_picks[vote.user_id].append("ab".index(vote.choice) == vote.shown_order[0])

    for uid, s in stats.items():
        s.num_gold = len(gold_hits[uid])
        s.gold_accuracy = sum(gold_hits[uid]) / s.num_gold if s.num_gold else None
        s.position_bias = sum(first_picks[uid]) / len(first_picks[uid]) if first_picks[uid] else None
        s.median_seconds = statistics.median(seconds[uid]) if seconds[uid] else None

    # Agreement among humans; the AI judge is compared with them separately below.
    human_choices = {
        c: {u: ch for u, ch in v.items() if users[u].kind == "human"} for c, v in choices.items()
    }
    raters = sorted({u for v in human_choices.values() for u in v})
    pairwise: list[tuple[str, str, float, int]] = []
    for a, b in combinations(raters, 2):
        shared = [c for c, v in human_choices.items() if a in v and b in v]
        kappa = cohen_kappa([human_choices[c][a] for c in shared], [human_choices[c][b] for c in shared])
        if kappa is not None and shared:
            pairwise.append((users[a].name, users[b].name, kappa, len(shared)))
    for uid in raters:
        mine, consensus = [], []
        for votes in human_choices.values():
            if uid not in votes:
                continue
            top = _plurality([ch for u, ch in votes.items() if u != uid])
            if top is not None:
                mine.append(votes[uid])
                consensus.append(top)
        if len(mine) >= min_shared_items:
            stats[uid].consensus_kappa = cohen_kappa(mine, consensus)
    for s in stats.values():
        if s.gold_accuracy is not None and s.num_gold >= min_gold_votes and s.gold_accuracy < gold_threshold:
            s.flags.append(f"gold accuracy {s.gold_accuracy:.2f} < {gold_threshold}")
        if s.consensus_kappa is not None and s.consensus_kappa < kappa_threshold:
            s.flags.append(f"agreement with the others (kappa) {s.consensus_kappa:.2f} < {kappa_threshold}")

    ai_matches = []
    for votes in choices.values():
        top = _plurality([ch for u, ch in votes.items() if users[u].kind == "human"])
        if top is not None:  # no human majority, nothing to agree with
            ai_matches.extend(ch == top for u, ch in votes.items() if users[u].kind == "ai")

    all_first = [x for picks in first_picks.values() for x in picks]
    all_seconds = [x for xs in seconds.values() for x in xs]
    return QualityReport(
        round=round,
        num_votes=len(rows),
        num_multi_voted=sum(len(v) >= 2 for v in human_choices.values()),
        krippendorff_alpha=krippendorff_alpha(human_choices, raters),
        pairwise_kappa=pairwise,
        position_bias=sum(all_first) / len(all_first) if all_first else None,
        median_seconds=statistics.median(all_seconds) if all_seconds else None,
        ai_human_agreement=sum(ai_matches) / len(ai_matches) if ai_matches else None,
        ai_human_items=len(ai_matches),
        annotators=[s for s in stats.values() if s.num_votes],
    )
