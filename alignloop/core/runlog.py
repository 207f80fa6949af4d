"""Per-step metrics of a run: appended to `runs/run<ID>/metrics.jsonl` and to the `Run` row's history (which
the admin pages plot). One writer for every trainer: SFT, reward, PPO and TRL's GRPO/RLOO/DPO."""

from __future__ import annotations

import json
import time
from pathlib import Path

from alignloop.core.db import session_scope
from alignloop.core.files import private_opener
from alignloop.core.models import Run


class StepLog:
    def __init__(self, engine, run_id: int, path: Path):
        self.engine, self.run_id, self.path = engine, run_id, path

    def __call__(self, entry: dict) -> None:
        entry = {"time": time.time(), **entry}
        with open(self.path, "a", encoding="utf-8", opener=private_opener) as f:
            f.write(json.dumps(entry) + "\n")
        with session_scope(self.engine) as session:
            run = session.get(Run, self.run_id)
            run.metrics = {
                **run.metrics,
                "history": [*run.metrics.get("history", []), entry],
                "step": entry.get("step"),
            }
            session.add(run)


def trainer_callback(log: StepLog | None, *, max_seconds: float | None = None, fields: dict | None = None):
    """A `transformers.TrainerCallback` that feeds `log` from the main process (None: log nothing) and stops
    training once `max_seconds` have passed; `fields` are added to every entry (an ensemble's member index)."""
    from transformers import TrainerCallback

    class StepLogCallback(TrainerCallback):
        def __init__(self):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if max_seconds and time.perf_counter() - self.start > max_seconds:
                control.should_training_stop = True

        def on_log(self, args, state, control, logs=None, **kwargs):
            if log is not None and state.is_world_process_zero:
                log({"step": state.global_step, **(fields or {}), **(logs or {})})

    return StepLogCallback()
