"""The loop: close the current round -> reward model -> RL -> register -> queue the next round's comparisons.

    alignloop round next [--reward-config FILE] [--rl-config FILE] [--algo ppo|grpo|rloo|dpo] [--prompts N]

Round N's state lives in its `Round` row and in one `Run` of kind `round` (config: the round and the plan;
metrics: the id of each step's own Run as it finishes):
1. export: the preference pairs of every round so far, to `runs/run<ID>/prefs.jsonl` (the record of what the
   reward model saw);
2. reward: `reward.train` on the workspace's votes -> `reward-round<N>`, recorded as the round's reward model;
3. rl: `rl.train` from the round's policy against that reward model -> `policy-round<N+1>` (DPO needs no reward
   model and skips step 2);
4. queue: round N+1 is opened with the new policy, and each pool prompt gets one comparison: the new policy
   against the round's policy, sides randomised, for the annotators.
Interrupted anywhere, `round next` again continues where it stopped: finished steps are skipped, an interrupted
PPO run resumes from its last checkpoint, and queueing only adds prompts that have no comparison yet.
Stages are called through their public functions (DESIGN.md: stages never reach into each other).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sqlmodel import Session, col, select

from alignloop.core import AlignloopError, crud
from alignloop.core.config import Settings
from alignloop.core.db import session_scope
from alignloop.core.export import write_rows
from alignloop.core.models import ModelVersion, Round, Run, Vote

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class RoundPlan:
    reward_config: str | None = None
    rl_config: str | None = None
    algo: str = "ppo"
    num_prompts: int = 32
    progress: bool = True


def current_round(session: Session) -> Round:
    row = session.exec(
        select(Round).where(Round.status != "closed").order_by(col(Round.number).desc())
    ).first()
    if row is None:
        raise AlignloopError("no open round: queue the first comparisons with `alignloop generate` (round 0)")
    return row


def _round_run(session: Session, number: int, plan: RoundPlan) -> Run:
    for run in session.exec(select(Run).where(Run.kind == "round").order_by(col(Run.id).desc())).all():
        if run.config.get("round") == number and run.status != "succeeded":
            return run
    return crud.create_run(session, kind="round", config={"round": number, **plan.__dict__})


def _record(engine, run_id: int, **step_runs) -> None:
    with session_scope(engine) as session:
        run = session.get(Run, run_id)
        run.metrics = {**run.metrics, **step_runs}
        session.add(run)


def next_round(engine, settings: Settings, plan: RoundPlan) -> dict:
    from reward.train import load_config as reward_config
    from reward.train import train as train_reward
    from rl.train import load_config as rl_config
    from rl.train import train as train_rl

    with session_scope(engine) as session:
        round_ = current_round(session)
        number = round_.number
        policy = (
            session.get(ModelVersion, round_.policy_id).name if round_.policy_id else settings.default_policy
        )
        if not crud.preference_pairs(session, rounds=[number]) and round_.status == "open":
            raise AlignloopError(f"round {number} has no usable votes yet: annotate (or run the judge) first")
        run = _round_run(session, number, plan)
        run.status = "running"
        session.add(run)
        run_id, done = run.id, dict(run.metrics)
    run_dir = settings.runs_dir / f"run{run_id}"
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        # 1. export
        with Session(engine) as session:
            pairs = crud.preference_pairs(session)
        (run_dir / "prefs.jsonl").unlink(missing_ok=True)  # a resumed round re-exports what it sees now
        write_rows(pairs, run_dir / "prefs.jsonl")
        # 2. reward
        reward_name = None
        if plan.algo != "dpo":
            reward_name = f"reward-round{number}"
            with Session(engine) as session:
                existing = crud.get_model_version(session, name=reward_name)
            if existing is None:
                config = reward_config(plan.reward_config or ROOT / "configs/reward/default.yaml", name=reward_name,
                                       round=number, from_workspace=True)  # fmt: skip
                done["reward_run"] = train_reward(engine, settings, config, progress=plan.progress)["run_id"]
                _record(engine, run_id, reward_run=done["reward_run"])
            with session_scope(engine) as session:
                row = session.get(Round, round_.id)
                row.reward_id, row.status = crud.get_model_version(session, name=reward_name).id, "reward"
                session.add(row)
        # 3. rl
        policy_name = f"policy-round{number + 1}"
        with Session(engine) as session:
            new_policy = crud.get_model_version(session, name=policy_name)
            interrupted = session.get(Run, done["rl_run"]) if "rl_run" in done else None
        if new_policy is None:
            if interrupted is not None and interrupted.status != "succeeded" and plan.algo == "ppo":
                result = train_rl(engine, settings, "ppo", None, resume=interrupted.id, round=number + 1,
                                  progress=plan.progress)  # fmt: skip
            else:
                config = rl_config(plan.algo, plan.rl_config or ROOT / "configs/rl/default.yaml", policy=policy,
                                   reward_model=reward_name, name=policy_name)  # fmt: skip
                result = train_rl(engine, settings, plan.algo, config, round=number + 1, progress=plan.progress,
                                  on_run=lambda rid: _record(engine, run_id, rl_run=rid))  # fmt: skip
            done["rl_run"] = result["run_id"]
            _record(engine, run_id, rl_run=done["rl_run"])
        # 4. queue the next round: the new policy against this round's
        from annotate.generate import queue_comparisons

        with session_scope(engine) as session:
            new_id = crud.get_model_version(session, name=policy_name).id
            crud.get_or_create_round(
                session, number=number + 1, target_votes=round_.target_votes, policy_id=new_id
            )
        summary = queue_comparisons(
            engine, settings=settings, model_ref=policy_name, versus=policy, num_prompts=plan.num_prompts,
            round=number + 1, progress=plan.progress,
        )  # fmt: skip
        if reward_name:  # the new items the reward model is least sure about go to the annotators first
            from reward.score import score_queue

            done["scored"] = score_queue(engine, settings, reward_name)
        with session_scope(engine) as session:
            session.get(Round, round_.id).status = "closed"
            run = session.get(Run, run_id)
            crud.finish_run(session, run=run, status="succeeded",
                            metrics={**done, "queued": summary["comparisons"], "next_round": number + 1})  # fmt: skip
    except BaseException as exc:
        with session_scope(engine) as session:
            crud.finish_run(session, run=session.get(Run, run_id), status="failed", error=str(exc)[:2000])
        raise
    return {"round": number, "reward_model": reward_name, "policy": policy_name, "next_round": number + 1,
            "queued": summary["comparisons"], "run_id": run_id}  # fmt: skip


# --- lineage -------------------------------------------------------------------------------------------------


def models_influenced_by_vote(session: Session, *, vote_id: int) -> list[ModelVersion]:
    """Every model a vote reached: reward models trained on its comparison, the policies optimised against
    them (or trained by DPO on it), and every model descended from those."""
    vote = session.get(Vote, vote_id)
    if vote is None:
        raise AlignloopError(f"no vote {vote_id}")
    reached: dict[int, ModelVersion] = {}
    runs = session.exec(select(Run).where(col(Run.kind).in_(["reward", "rl"]))).all()
    reward_names = set()
    for run in runs:
        if (
            run.kind == "reward"
            and vote.comparison_id in run.config.get("comparison_ids", [])
            and run.output_model_id
        ):
            model = session.get(ModelVersion, run.output_model_id)
            reached[model.id] = model
            reward_names.add(model.name)
    for run in runs:
        if run.kind != "rl" or not run.output_model_id:
            continue
        uses_vote = run.config.get("reward_model") in reward_names or (
            run.config.get("algo") == "dpo" and run.created_at >= vote.created_at
        )
        if uses_vote:
            model = session.get(ModelVersion, run.output_model_id)
            reached[model.id] = model
    frontier = list(reached)
    while frontier:  # descendants: later rounds start from these policies
        children = session.exec(select(ModelVersion).where(col(ModelVersion.parent_id).in_(frontier))).all()
        frontier = [c.id for c in children if c.id not in reached]
        reached.update({c.id: c for c in children})
    return sorted(reached.values(), key=lambda m: m.id)
