"""Sliding-window rate limits, in memory, per web worker process (N workers allow up to N times the limit;
put a shared limiter in the reverse proxy if that matters). Used for failed logins and votes."""

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
