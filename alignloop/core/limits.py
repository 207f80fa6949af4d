"""Limits. Sliding-window rate limits, in memory, per web worker process (N workers allow up to N times the
limit; put a shared limiter in the reverse proxy if that matters), used for failed logins and votes; and the
upper bounds on every count a command line or a config file can ask for (`COUNT_BOUNDS`, below)."""

from __future__ import annotations

import math
import threading
import time
from collections import defaultdict, deque


class RateLimiter:
    def __init__(self, limit: int, window_seconds: float, *, clock=time.monotonic):
        self.limit, self.window, self.clock = limit, window_seconds, clock
        self.events: dict[object, deque] = defaultdict(deque)
        self.lock = threading.Lock()

    def _prune(self, key) -> deque:
        events, horizon = self.events[key], self.clock() - self.window
        while events and events[0] <= horizon:
            events.popleft()
        return events

    def blocked_for(self, key) -> float:
        """Seconds until `key` may act again (0: it may now)."""
        with self.lock:
            events = self._prune(key)
            return 0.0 if len(events) < self.limit else events[0] + self.window - self.clock()

    def record(self, key) -> None:
        with self.lock:
            self._prune(key).append(self.clock())

    def hit(self, key) -> float:
        """Record an event if allowed; return 0, or the seconds to wait (nothing recorded)."""
        with self.lock:
            events = self._prune(key)
            if len(events) >= self.limit:
                return max(0.0, events[0] + self.window - self.clock())
            events.append(self.clock())
            return 0.0


def retry_after(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))


# --- upper bounds on counts (issue 13, M4) -----------------------------------------------------------------
# One table for the parser and the config files: a flag and a YAML key of the same name share one bound, so
# `--samples 99999999999999999999` and `samples: 1e20` in a YAML are refused alike, before anything is
# allocated. The ceilings are far above what a laptop or one GPU can use, and far below what would exhaust
# memory or overflow a 64-bit database column.
MAX_RESPONSES = 4  # responses per comparison: what the annotation page can show
MAX_PROMPTS = 100_000
MAX_BATCH = 1024
MAX_NEW_TOKENS = 8192
MAX_LENGTH = 32_768
MAX_STEPS = 1_000_000
MAX_EPOCHS = 1000
MAX_ID = 2**63 - 1  # database ids and round numbers: SQLite and PostgreSQL BIGINT
DEFAULT_INT_BOUND = 10**9  # any other integer setting (ranks, seeds, horizons...)

COUNT_BOUNDS: dict[str, tuple[float, float]] = {
    # counts of work
    "steps": (1, MAX_STEPS),
    "max_steps": (-1, MAX_STEPS),  # -1: train by epochs (transformers' convention)
    "ppo_epochs": (1, MAX_EPOCHS),
    "num_train_epochs": (0, MAX_EPOCHS),
    "num_generations": (2, 64),
    # batches and lengths
    "batch_size": (1, MAX_BATCH),
    "mini_batch_size": (1, MAX_BATCH),
    "per_device_train_batch_size": (1, MAX_BATCH),
    "gradient_accumulation_steps": (1, MAX_BATCH),
    "max_new_tokens": (1, MAX_NEW_TOKENS),
    "sample_max_new_tokens": (1, MAX_NEW_TOKENS),
    "max_length": (1, MAX_LENGTH),
    "num_virtual_tokens": (1, 1024),
    # how much data
    "max_prompts": (1, MAX_PROMPTS),
    "max_pairs": (1, 10 * MAX_PROMPTS),
    "max_examples": (1, 10 * MAX_PROMPTS),
    "num_samples": (0, 64),  # SFT's before/after answers in the report
    "held_out": (0, MAX_PROMPTS),
    # models
    "lora_r": (1, 4096),
    "lora_alpha": (1, 65_536),
    "ensemble": (1, 16),  # reward models trained and scored together: each one costs a full training
    # bookkeeping
    "round": (0, MAX_ID),
    "rounds": (0, MAX_ID),
    "seed": (0, 2**32 - 1),
    "max_seconds": (0, 10**8),
    # workspace settings (config.yaml)
    "target_votes": (1, 100),
    "max_jobs": (1, 64),
}


def check_bound(name: str, value, *, integer: bool) -> str | None:
    """Why `value` is not acceptable for the setting or flag `name` (None when it is)."""
    if not integer and name not in COUNT_BOUNDS:
        return None
    low, high = COUNT_BOUNDS.get(name, (-DEFAULT_INT_BOUND, DEFAULT_INT_BOUND))
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"{name} must be a number, not {str(value)[:30]!r}"
    if integer and not isinstance(value, int):
        return f"{name} must be a whole number, not {str(value)[:30]}"
    if not low <= value <= high:  # NaN fails this too
        shown = str(value) if len(str(value)) <= 24 else str(value)[:21] + "..."
        return f"{name} must be between {low:,} and {high:,}, not {shown}"
    return None
