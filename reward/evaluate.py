"""How good is a reward model? Pairwise accuracy, calibration, the length hack, by source and round.

- accuracy: share of pairs where r(chosen) > r(rejected) (an exact tie counts half);
- ECE: expected calibration error of p = sigmoid(r_chosen - r_rejected), the Bradley-Terry probability the
  model assigns to the human verdict, over 10 equal-width confidence bins (confidence = max(p, 1 - p));
- length correlation: Pearson correlation of reward with response length in characters over every scored
  response, and how often the model prefers the longer side versus how often the humans did;
- accuracy by source (votes, imports, arena, files) and by round.

`save_report` draws the same figures into one PNG (accuracy by source, reliability diagram, reward histogram).
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from reward.data import Pair

NUM_BINS = 10


def pair_scores(reward_model, pairs: list[Pair], *, batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    prompts = [p.prompt for p in pairs]
    scores = reward_model.score(
        prompts + prompts, [p.chosen for p in pairs] + [p.rejected for p in pairs], batch_size=batch_size
    )
    return np.array(scores[: len(pairs)]), np.array(scores[len(pairs) :])


def member_pair_scores(
    reward_model, pairs: list[Pair], *, batch_size: int = 16
) -> tuple[np.ndarray, np.ndarray]:
    """Each member's scores of the chosen and the rejected sides, as arrays [members, pairs]."""
    prompts = [p.prompt for p in pairs]
    scores = reward_model.member_scores(
        prompts + prompts, [p.chosen for p in pairs] + [p.rejected for p in pairs], batch_size=batch_size
    )
    return scores[:, : len(pairs)], scores[:, len(pairs) :]


def evaluate_members(pairs: list[Pair], chosen: np.ndarray, rejected: np.ndarray) -> dict:
    """`evaluate_scores` of the members' mean; for an ensemble also each member's accuracy and ECE, and the
    members' disagreement: the mean standard deviation of their margins r_chosen - r_rejected across members."""
    metrics = evaluate_scores(pairs, chosen.mean(0), rejected.mean(0))
    if len(chosen) > 1 and pairs:
        metrics["members"] = [
            {"accuracy": _accuracy(c, r), "ece": calibration(c, r)["ece"]}
            for c, r in zip(chosen, rejected, strict=True)
        ]
        metrics["disagreement"] = float((chosen - rejected).std(0).mean())
    return metrics


def _accuracy(chosen: np.ndarray, rejected: np.ndarray) -> float:
    return float(np.mean((chosen > rejected) + 0.5 * (chosen == rejected))) if len(chosen) else math.nan


def calibration(chosen: np.ndarray, rejected: np.ndarray, *, bins: int = NUM_BINS) -> dict:
    """ECE and the reliability curve (mean confidence vs accuracy per bin)."""
    p = 1 / (1 + np.exp(-(chosen - rejected)))
    confidence = np.maximum(p, 1 - p)
    correct = (p > 0.5).astype(float) + 0.5 * (p == 0.5)
    edges = np.linspace(0.5, 1.0, bins + 1)
    index = np.clip(np.digitize(confidence, edges) - 1, 0, bins - 1)
    curve, ece = [], 0.0
    for b in range(bins):
        in_bin = index == b
        if not in_bin.any():
            continue
        conf, acc = float(confidence[in_bin].mean()), float(correct[in_bin].mean())
        ece += in_bin.mean() * abs(conf - acc)
        curve.append({"confidence": conf, "accuracy": acc, "count": int(in_bin.sum())})
    return {"ece": float(ece), "curve": curve}


def evaluate_scores(pairs: list[Pair], chosen: np.ndarray, rejected: np.ndarray) -> dict:
    if not pairs:
        return {"pairs": 0}
    rewards = np.concatenate([chosen, rejected])
    lengths = np.array([len(p.chosen) for p in pairs] + [len(p.rejected) for p in pairs], dtype=float)
    length_corr = (
        float(np.corrcoef(rewards, lengths)[0, 1]) if rewards.std() > 0 and lengths.std() > 0 else math.nan
    )
    chosen_longer = np.array([len(p.chosen) > len(p.rejected) for p in pairs])
    prefers_longer = np.where(chosen_longer, chosen > rejected, rejected > chosen)
    groups: dict[str, dict] = {"source": defaultdict(list), "round": defaultdict(list)}
    for i, p in enumerate(pairs):
        groups["source"][p.source].append(i)
        groups["round"][str(p.round) if p.round is not None else "file"].append(i)
    cal = calibration(chosen, rejected)
    return {
        "pairs": len(pairs),
        "accuracy": _accuracy(chosen, rejected),
        "ece": cal["ece"],
        "calibration_curve": cal["curve"],
        "mean_margin": float(np.mean(chosen - rejected)),
        "length_correlation": length_corr,
        "prefers_longer": float(prefers_longer.mean()),
        "humans_prefer_longer": float(chosen_longer.mean()),
        "by_source": {
            k: {"pairs": len(v), "accuracy": _accuracy(chosen[v], rejected[v])}
            for k, v in sorted(groups["source"].items())
        },
        "by_round": {
            k: {"pairs": len(v), "accuracy": _accuracy(chosen[v], rejected[v])}
            for k, v in sorted(groups["round"].items())
        },
        "reward_histogram": _histogram(chosen, rejected),
    }


def _histogram(chosen: np.ndarray, rejected: np.ndarray, bins: int = 20) -> dict:
    edges = np.histogram_bin_edges(np.concatenate([chosen, rejected]), bins=bins)
    return {
        "edges": edges.tolist(),
        "chosen": np.histogram(chosen, edges)[0].tolist(),
        "rejected": np.histogram(rejected, edges)[0].tolist(),
    }


def evaluate(reward_model, pairs: list[Pair], *, batch_size: int = 16) -> dict:
    chosen, rejected = pair_scores(reward_model, pairs, batch_size=batch_size)
    return evaluate_scores(pairs, chosen, rejected)


def save_report(metrics: dict, out: str | Path, *, title: str = "reward model") -> Path:
    """One PNG: accuracy by source, reliability diagram, reward histogram (chosen vs rejected)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    sources = metrics.get("by_source", {})
    names = ["all", *sources]
    values = [metrics.get("accuracy", math.nan), *(s["accuracy"] for s in sources.values())]
    axes[0].bar(range(len(names)), values, color=["#3b6ea8"] + ["#8fb3d9"] * len(sources))
    axes[0].set_xticks(range(len(names)), [n[:18] for n in names], rotation=20, ha="right")
    axes[0].axhline(0.5, color="grey", lw=0.8, ls="--")
    axes[0].set_ylim(0, 1)
    axes[0].set_title(f"pairwise accuracy ({metrics.get('pairs', 0)} pairs)")
    curve = metrics.get("calibration_curve", [])
    axes[1].plot([0.5, 1], [0.5, 1], color="grey", lw=0.8, ls="--", label="perfect")
    axes[1].plot([c["confidence"] for c in curve], [c["accuracy"] for c in curve], "o-", label="model")
    axes[1].set_xlabel("confidence max(p, 1-p)")
    axes[1].set_ylabel("accuracy")
    axes[1].set_title(f"calibration (ECE {metrics.get('ece', math.nan):.3f})")
    axes[1].legend()
    hist = metrics.get("reward_histogram")
    if hist:
        edges = np.array(hist["edges"])
        centers, width = (edges[:-1] + edges[1:]) / 2, np.diff(edges)
        axes[2].bar(centers, hist["chosen"], width=width, alpha=0.6, label="chosen")
        axes[2].bar(centers, hist["rejected"], width=width, alpha=0.6, label="rejected")
        axes[2].legend()
    axes[2].set_title(f"rewards (length corr {metrics.get('length_correlation', math.nan):.2f})")
    fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out
