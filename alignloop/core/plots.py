"""Metric curves of a run (loss, reward, KL, accuracy, ...) as a PNG, from the per-step history in `Run.metrics`."""

from __future__ import annotations

import io
import math

PREFERRED = (
    "loss",
    "raw_score",
    "reward",
    "kl",
    "accuracy",
    "entropy",
    "value_loss",
    "clipfrac",
    "response_length",
)


def numeric_series(history: list[dict]) -> dict[str, list[tuple[float, float]]]:
    series: dict[str, list[tuple[float, float]]] = {}
    for entry in history:
        step = entry.get("step")
        if step is None:
            continue
        for key, value in entry.items():
            if key in ("step", "time", "epoch") or key.endswith("_s") or isinstance(value, bool):
                continue
            try:
                number = float(value)
            except (TypeError, ValueError):
                continue
            if math.isfinite(number):
                series.setdefault(key, []).append((float(step), number))
    return series


def history_png(history: list[dict], *, title: str = "", max_panels: int = 6) -> bytes:
    """Up to `max_panels` curves, the usual suspects first. Empty history -> a panel saying so."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = numeric_series(history)
    keys = [k for k in PREFERRED if k in series] + sorted(k for k in series if k not in PREFERRED)
    keys = keys[:max_panels] or ["(no metrics yet)"]
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys, strict=False):
        points = series.get(key, [])
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="." if len(points) < 30 else None)
        ax.set_title(key)
        ax.set_xlabel("step")
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=72)
    plt.close(fig)
    return buffer.getvalue()
