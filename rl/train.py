"""`alignloop rl train --algo ppo|grpo|rloo|dpo`: one entry point, one config style, one registration.

- ppo: alignloop's own (`rl.ppo`), against a registered reward model;
- grpo, rloo: TRL's `GRPOTrainer` / `RLOOTrainer` with the same reward model as `reward_funcs`;
- dpo: TRL's `DPOTrainer` straight from the workspace's preference pairs (no reward model).
Every algorithm starts from a model reference (an adapter version is merged in memory first, so the new
adapter sits on top of it), trains a LoRA adapter (or the full model), logs per-step metrics to the `Run` row
and `runs/run<ID>/metrics.jsonl`, and registers the result as a `ModelVersion` of kind `policy` whose base is
the starting reference (the registry stacks adapters when it loads them).
PPO checkpoints every `save_every` steps; `--resume RUN` continues that run from its last checkpoint.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, fields
from pathlib import Path

import torch
from sqlmodel import Session

from alignloop.core import AlignloopError, crud, distributed, registry
from alignloop.core.config import Settings
from alignloop.core.db import session_scope
from alignloop.core.models import Run
from alignloop.core.runlog import StepLog, trainer_callback
from rl.ppo import PPOConfig, PPOTrainer

ALGOS = ("ppo", "grpo", "rloo", "dpo")


def load_config(algo: str, path: str | Path | None, **overrides) -> PPOConfig:
    """All algorithms share PPOConfig's fields; the TRL ones read what they have a use for."""
    from rl.ppo import load_config as load_ppo

    if algo not in ALGOS:
        raise AlignloopError(f"algo must be one of {', '.join(ALGOS)}, not {algo!r}")
    config = load_ppo(path, **overrides)
    if algo in ("ppo", "grpo", "rloo") and not config.reward_model:
        raise AlignloopError(
            f"{algo} needs a reward model: --reward-model NAME (see `alignloop reward train`)"
        )
    return config


def load_prompts(engine, config: PPOConfig) -> list[list[dict]]:
    if config.prompts == "workspace":
        with Session(engine) as session:
            prompts = [p.messages for p in crud.list_prompts(session, split="train")]
    else:
        from alignloop.core.prompts import parse_prompt_file

        prompts = [p.messages for p in parse_prompt_file(config.prompts)]
    if config.max_prompts:
        prompts = prompts[: config.max_prompts]
    if not prompts:
        raise AlignloopError(
            "no prompts to train on: `alignloop prompts import FILE`, or set `prompts: FILE`"
        )
    return prompts


def load_policy(settings: Settings, ref: str, session=None):
    """The starting policy as a plain model: adapters merged, so a new adapter (and the reference) sit on it."""
    loaded = registry.resolve(ref, settings=settings, session=session)
    model = loaded.model.merge_and_unload() if hasattr(loaded.model, "merge_and_unload") else loaded.model
    return model, loaded.tokenizer, loaded.licence


def reward_function(settings: Settings, session, name: str):
    """(prompts, completions) -> scores, from a registered reward model (any tokenizer)."""
    from reward.score import RewardModel

    scorer = RewardModel.load(name, settings=settings, session=session)
    return lambda prompts, completions: scorer.score(list(prompts), [c.text for c in completions])


def _open_run(engine, algo: str, config: PPOConfig, resume: int | None) -> int:
    """The main process opens (or reopens) the Run; the others learn its id."""
    run_id = None
    if distributed.is_main():
        with session_scope(engine) as session:
            if resume is not None:
                run = session.get(Run, resume)
                run.status, run.error = "running", None
                session.add(run)
                run_id = run.id
            else:
                run_id = crud.create_run(session, kind="rl", config={"algo": algo, **asdict(config)}).id
    return distributed.broadcast(run_id)


def train(engine, settings: Settings, algo: str, config: PPOConfig, *, resume: int | None = None,
          round: int | None = None, progress: bool = True, on_run=None) -> dict:  # fmt: skip
    if resume is not None:
        with Session(engine) as session:
            run = session.get(Run, resume)
            if run is None or run.kind != "rl":
                raise AlignloopError(f"no RL run {resume} to resume")
            if run.status == "succeeded":
                raise AlignloopError(f"run {resume} already finished")
            saved = dict(run.config)
            algo = saved.pop("algo")
            config = PPOConfig(**{k: v for k, v in saved.items() if k in {f.name for f in fields(PPOConfig)}})
    # 1. Read and check everything before writing anything.
    prompts = load_prompts(engine, config) if algo != "dpo" else []
    with Session(engine) as session:
        start_version = crud.get_model_version(session, name=config.policy)
        registry.locate(config.policy, settings=settings, session=session)
        if config.reward_model and algo != "dpo":
            version = crud.get_model_version(session, name=config.reward_model)
            if version is None or version.kind != "reward":
                raise AlignloopError(f"{config.reward_model!r} is not a registered reward model")
        if config.name and crud.get_model_version(session, name=config.name) is not None:
            raise AlignloopError(f"a model version named {config.name!r} is already registered")
        pairs = crud.preference_pairs(session) if algo == "dpo" else []
    if algo == "dpo" and len(pairs) < 2:
        raise AlignloopError(f"DPO needs preference pairs: the workspace has {len(pairs)}")

    run_id = _open_run(engine, algo, config, resume)
    if on_run is not None and distributed.is_main():
        on_run(run_id)  # the loop records the run before training, so an interrupted one can be resumed
    run_dir = settings.runs_dir / f"run{run_id}"
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        if algo == "ppo":
            out, metrics, licence = _ppo(engine, settings, config, prompts, run_id, run_dir, resume, progress)
        else:
            out, metrics, licence = _trl(
                engine, settings, algo, config, prompts, pairs, run_id, run_dir, progress
            )
    except BaseException as exc:
        if distributed.is_main():
            with session_scope(engine) as session:
                crud.finish_run(session, run=session.get(Run, run_id), status="failed", error=str(exc)[:2000])
        raise
    if not distributed.is_main():
        return {"run_id": run_id}
    with session_scope(engine) as session:
        name = config.name or f"{algo}-run{run_id}"
        version = crud.register_model(
            session, name=name, kind="policy", base=config.policy, path=str(out),
            parent_id=start_version.id if start_version else None, run_id=run_id, round=round,
            licence=licence, metrics={"algo": algo, **metrics},
        )  # fmt: skip
        run = session.get(Run, run_id)
        crud.finish_run(session, run=run, status="succeeded", metrics={**run.metrics, **metrics})
        run.log_path = str(run_dir / "metrics.jsonl")
        session.add(run)
    return {"run_id": run_id, "model": name, "model_version_id": version.id, "path": str(out), **metrics}


def _ppo(engine, settings, config, prompts, run_id, run_dir, resume, progress):
    with Session(engine) as session:
        model, tokenizer, licence = load_policy(settings, config.policy, session)
        reward_fn = reward_function(settings, session, config.reward_model)
    trainer = PPOTrainer(config, model, tokenizer, prompts, reward_fn, run_dir=run_dir,
                         on_step=StepLog(engine, run_id, run_dir / "metrics.jsonl"))  # fmt: skip
    if resume is not None:
        checkpoint = trainer.latest_checkpoint()
        if checkpoint is None:
            raise AlignloopError(f"run {run_id} has no checkpoint to resume from")
        trainer.load_checkpoint(checkpoint)
        _forget_after(engine, run_id, run_dir / "metrics.jsonl", trainer.step)
    start = time.perf_counter()
    history = trainer.train(progress=progress)
    out = run_dir / "model"
    if distributed.is_main():
        trainer.save_policy(out)
    metrics = summarise(history, time.perf_counter() - start)
    metrics |= {"processes": trainer.accelerator.num_processes, "replicas_in_sync": trainer.replicas_in_sync}
    return out, metrics, licence


def _forget_after(engine, run_id: int, path: Path, step: int) -> None:
    """A resumed run replays the steps after its checkpoint: drop their old log entries first."""
    with session_scope(engine) as session:
        run = session.get(Run, run_id)
        run.metrics = {
            **run.metrics,
            "history": [h for h in run.metrics.get("history", []) if h["step"] <= step],
        }
        session.add(run)
    if path.is_file():
        kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in kept))


def summarise(history: list[dict], seconds: float) -> dict:
    first, last = history[: max(1, len(history) // 5)], history[-max(1, len(history) // 5) :]
    mean = lambda rows, key: sum(r[key] for r in rows if key in r) / max(1, sum(key in r for r in rows))  # noqa: E731
    return {
        "steps": len(history), "train_seconds": round(seconds, 2),
        "reward_start": mean(first, "raw_score"), "reward_end": mean(last, "raw_score"),
        "kl_end": mean(last, "kl"), "response_length_end": mean(last, "response_length"),
    }  # fmt: skip


# --- TRL algorithms ------------------------------------------------------------------------------------------


def _trl(engine, settings, algo, config: PPOConfig, prompts, pairs, run_id, run_dir, progress):
    from datasets import Dataset
    from peft import LoraConfig

    logger = trainer_callback(StepLog(engine, run_id, run_dir / "metrics.jsonl"))
    with Session(engine) as session:
        model, tokenizer, licence = load_policy(settings, config.policy, session)
        scorer = reward_function(settings, session, config.reward_model) if algo != "dpo" else None
    peft = (
        LoraConfig(
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            target_modules=config.target_modules,
            task_type="CAUSAL_LM",
        )  # fmt: skip
        if config.method == "lora"
        else None
    )
    cuda = torch.cuda.is_available()
    common = dict(
        output_dir=str(run_dir / "trainer"), max_steps=config.steps, learning_rate=config.learning_rate,
        logging_steps=1, save_strategy="no", report_to=[], seed=config.seed, use_cpu=not cuda,
        bf16=cuda and torch.cuda.is_bf16_supported(), activation_checkpointing=False, disable_tqdm=not progress,
        max_grad_norm=config.max_grad_norm,
    )  # fmt: skip
    start = time.perf_counter()
    if algo == "dpo":
        from trl import DPOConfig, DPOTrainer

        data = Dataset.from_list([{"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"]}
                                  for p in pairs])  # fmt: skip
        args = DPOConfig(per_device_train_batch_size=min(config.mini_batch_size, len(pairs)), beta=config.kl_coef
                         * 2, max_length=512, **common)  # fmt: skip
        trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                             peft_config=peft, callbacks=[logger])  # fmt: skip
    else:

        def reward_func(prompts, completions, **kwargs) -> list[float]:
            from alignloop.core.sampling import Completion

            texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
            return scorer(prompts, [Completion(text=t, token_ids=[], finished=True) for t in texts])

        reward_func.__name__ = f"reward_{config.reward_model}"
        data = Dataset.from_list([{"prompt": p} for p in prompts])
        if algo == "grpo":
            from trl import GRPOConfig as Config
            from trl import GRPOTrainer as Trainer
        else:
            from trl import RLOOConfig as Config
            from trl import RLOOTrainer as Trainer
        num_generations = max(2, min(4, config.batch_size))
        args = Config(
            per_device_train_batch_size=num_generations * max(1, config.mini_batch_size // num_generations),
            num_generations=num_generations, max_completion_length=config.max_new_tokens,
            temperature=config.temperature, beta=config.kl_coef, **common,
        )  # fmt: skip
        trainer = Trainer(model=model, reward_funcs=reward_func, args=args, train_dataset=data,
                          processing_class=tokenizer, peft_config=peft, callbacks=[logger])  # fmt: skip
    trainer.train()
    seconds = time.perf_counter() - start
    out = run_dir / "model"
    if distributed.is_main():
        trainer.model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        (out / "alignloop_policy.json").write_text(
            json.dumps({"algo": algo, "config": asdict(config)}, indent=2)
        )
    history = [h for h in trainer.state.log_history if "loss" in h or "reward" in h]
    losses = [h["loss"] for h in history if "loss" in h]
    metrics = {"steps": trainer.state.global_step, "train_seconds": round(seconds, 2),
               "first_loss": losses[0] if losses else None, "final_loss": losses[-1] if losses else None}  # fmt: skip
    rewards = [h["reward"] for h in history if "reward" in h]
    if rewards:
        metrics |= {"reward_start": rewards[0], "reward_end": rewards[-1]}
    return out, metrics, licence
