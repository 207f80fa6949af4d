"""`alignloop rl train --algo ppo|grpo|rloo|dpo|kto`: one entry point, one registration.

- ppo: alignloop's own (`rl.ppo`), against a registered reward model;
- grpo, rloo: TRL's `GRPOTrainer` / `RLOOTrainer` with the same reward model as `reward_funcs`;
- dpo: TRL's `DPOTrainer` straight from the workspace's preference pairs (no reward model);
- kto: TRL's `KTOTrainer` on reviewers' thumbs up/down from the chat (`ChatFeedback.rating`): unpaired
  judgements, each a desirable or undesirable completion in the context the model was given (preset applied),
  so no pair has to be invented from them (Ethayarajh et al. 2024).
Every algorithm starts from a model reference (an adapter version is merged in memory first, so the new
adapter sits on top of it), trains a LoRA adapter (or the full model), logs per-step metrics to the `Run` row
and `runs/run<ID>/metrics.jsonl`, and registers the result as a `ModelVersion` of kind `policy` whose base is
the starting reference (the registry stacks adapters when it loads them).
Each algorithm reads its own config (`rl.configs.CONFIGS`) and saves exactly that in its `Run`.
PPO checkpoints every `save_every` steps; `--resume RUN` continues that run from its last checkpoint.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, fields
from pathlib import Path

import torch
from sqlmodel import Session, col, select

from alignloop.core import AlignloopError, crud, devices, distributed, registry, runguard
from alignloop.core.config import Settings, read_config_file, read_run_config
from alignloop.core.db import session_scope
from alignloop.core.models import ChatFeedback, Run
from alignloop.core.runlog import StepLog, trainer_callback
from rl.configs import CONFIGS, DPOConfig, GRPOConfig, RLConfig
from rl.ppo import PPOTrainer
from rl.ppo import load_config as load_ppo

log = logging.getLogger(__name__)
ALGOS = tuple(CONFIGS)
OFFLINE = ("dpo", "kto")  # learn from stored judgements: no prompts to sample, no reward model


def load_config(algo: str, path: str | Path | None, **overrides) -> RLConfig:
    """The algorithm's own config from YAML plus overrides (None = not given).

    A YAML key of another RL algorithm is skipped (the files in configs/rl serve them all); an override the
    algorithm has no field for is an error (someone asked for it on purpose)."""
    if algo not in ALGOS:
        raise AlignloopError(f"algo must be one of {', '.join(ALGOS)}, not {algo!r}")
    own = {f.name for f in fields(CONFIGS[algo])}
    known = {f.name for cls in CONFIGS.values() for f in fields(cls)}
    raw = read_config_file(path, what="RL")
    raw.pop("algo", None)
    if unknown := sorted(set(raw) - known):
        raise AlignloopError(f"{path}: unknown RL setting(s) {', '.join(unknown)}")
    if skipped := sorted(set(raw) - own):
        log.info("%s: %s skips the other algorithms' settings %s", path, algo, ", ".join(skipped))
    given = {k: v for k, v in overrides.items() if v is not None}
    if foreign := sorted(set(given) - own):
        flags = ", ".join("--" + k.replace("_", "-") for k in foreign)
        raise AlignloopError(f"{flags}: not a setting of {algo} (see `alignloop rl train --help`)")
    values = {k: v for k, v in raw.items() if k in own} | given
    where = str(path) if path is not None else f"{algo} config"
    if algo == "ppo":
        try:
            config = load_ppo(None, **values)
        except AlignloopError as exc:
            raise AlignloopError(f"{where}: {exc}") from None
    else:
        config = read_run_config(CONFIGS[algo], None, values, what=algo)
        _check_trl(config, where)
    if algo not in OFFLINE and not config.reward_model:
        raise AlignloopError(
            f"{algo} needs a reward model: --reward-model NAME (see `alignloop reward train`)"
        )
    return config


def _check_trl(config: GRPOConfig | DPOConfig, where: str) -> None:
    if config.method not in ("lora", "full"):
        raise AlignloopError(f"{where}: method must be lora or full, not {config.method!r}")
    if config.steps < 1 or config.mini_batch_size < 1 or config.learning_rate <= 0:
        raise AlignloopError(f"{where}: steps and mini_batch_size must be at least 1, learning_rate > 0")
    if isinstance(config, GRPOConfig) and (config.num_generations < 2 or config.temperature <= 0):
        raise AlignloopError(f"{where}: num_generations must be at least 2 and temperature > 0")
    if isinstance(config, DPOConfig) and config.beta <= 0:
        raise AlignloopError(f"{where}: beta must be > 0")


def load_prompts(engine, config: RLConfig) -> list[list[dict]]:
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


def load_policy(settings: Settings, ref: str, session=None, *, training: bool = False):
    """The starting policy as a plain model: adapters merged, so a new adapter (and the reference) sit on it.
    For training: float32 master weights (or the 4/8-bit base config.yaml sets) that Accelerate places;
    otherwise (evaluation) the inference placement."""
    source = registry.locate(ref, settings=settings, session=session)
    placement = devices.for_training(settings, ref) if training else registry.placement_for(source, settings)
    loaded = registry.load_causal_lm(source, placement=placement, settings=settings)
    model = loaded.model.merge_and_unload() if hasattr(loaded.model, "merge_and_unload") else loaded.model
    return model, loaded.tokenizer, loaded.licence


def kto_examples(session) -> list[dict]:
    """Reviewers' thumbs up/down from the chat as KTO rows: prompt (as the model saw it), completion, label."""
    rows = session.exec(
        select(ChatFeedback).where(col(ChatFeedback.rating).in_([1, -1])).order_by(ChatFeedback.id)
    )
    return [
        {
            "prompt": r.context or r.messages,
            "completion": [{"role": "assistant", "content": r.response}],
            "label": r.rating == 1,
            "feedback_id": r.id,
        }
        for r in rows.all()
    ]


def reward_function(settings: Settings, session, name: str, *, device: str | None = None):
    """(prompts, completions) -> scores, from a registered reward model (any tokenizer), on `device`."""
    from reward.score import RewardModel

    scorer = RewardModel.load(name, settings=settings, session=session, device=device)
    return lambda prompts, completions: scorer.score(list(prompts), [c.text for c in completions])


def _open_run(engine, algo: str, config: RLConfig, resume: int | None, extra: dict | None = None) -> int:
    """The main process opens (or reopens) the Run; the others learn its id. `extra` goes into its config."""
    run_id = None
    if distributed.is_main():
        with session_scope(engine) as session:
            if resume is not None:
                run = session.get(Run, resume)
                run.status, run.error = "running", None
                runguard.claim(session, run)  # this process owns it now
                run_id = run.id
            else:
                run_config = {"algo": algo, **asdict(config), **(extra or {})}
                run_id = crud.create_run(session, kind="rl", config=run_config).id
    return distributed.broadcast(run_id)


def train(
    engine,
    settings: Settings,
    algo: str,
    config: RLConfig | None,
    *,
    resume: int | None = None,
    round: int | None = None,
    progress: bool = True,
    on_run=None,
) -> dict:
    if resume is not None:
        with Session(engine) as session:
            run = session.get(Run, resume)
            if run is None or run.kind != "rl":
                raise AlignloopError(f"no RL run {resume} to resume")
            if run.status == "succeeded":
                raise AlignloopError(f"run {resume} already finished")
            saved = dict(run.config)
            algo = saved.pop("algo")
            cls = CONFIGS[algo]
            config = cls(**{k: v for k, v in saved.items() if k in {f.name for f in fields(cls)}})
    # 1. Read and check everything before writing anything.
    prompts = load_prompts(engine, config) if algo not in OFFLINE else []
    with Session(engine) as session:
        start_version = crud.get_model_version(session, name=config.policy)
        source = registry.locate(config.policy, settings=settings, session=session)
        # A model that cannot fit is refused here, before the Run opens (one line, not an OOM mid-run).
        devices.check_training_fits(
            config.policy,
            registry.weights_path(source),
            settings,
            full=getattr(config, "method", "lora") == "full",
        )
        if algo not in OFFLINE:
            version = crud.get_model_version(session, name=config.reward_model)
            if version is None or version.kind != "reward":
                raise AlignloopError(f"{config.reward_model!r} is not a registered reward model")
        if config.name and crud.get_model_version(session, name=config.name) is not None:
            raise AlignloopError(f"a model version named {config.name!r} is already registered")
        pairs = (
            crud.preference_pairs(session)
            if algo == "dpo"
            else kto_examples(session)
            if algo == "kto"
            else []
        )
    from sft.layers import check_layers, num_layers_of

    check_layers(config.layers_to_transform, num_layers_of(source))
    if algo == "dpo" and len(pairs) < 2:
        raise AlignloopError(f"DPO needs preference pairs: the workspace has {len(pairs)}")
    if algo == "kto" and len({p["label"] for p in pairs}) < 2:
        raise AlignloopError(
            f"KTO needs thumbs up and thumbs down from the chat: the workspace has {len(pairs)} rated replies"
            f" ({sum(p['label'] for p in pairs)} up)"
        )

    # DPO learns from votes directly: record exactly which comparisons it saw (lineage), as reward runs do.
    extra = (
        {"comparison_ids": sorted({p["comparison_id"] for p in pairs})}
        if algo == "dpo"
        else {"feedback_ids": sorted(p["feedback_id"] for p in pairs)}
        if algo == "kto"
        else None
    )
    run_id = _open_run(engine, algo, config, resume, extra)
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
            session,
            name=name,
            kind="policy",
            base=config.policy,
            path=str(out),
            parent_id=start_version.id if start_version else None,
            run_id=run_id,
            round=round,
            licence=licence,
            metrics={"algo": algo, **metrics},
        )
        run = session.get(Run, run_id)
        crud.finish_run(session, run=run, status="succeeded", metrics={**run.metrics, **metrics})
        run.log_path = str(run_dir / "metrics.jsonl")
        session.add(run)
    return {"run_id": run_id, "model": name, "model_version_id": version.id, "path": str(out), **metrics}


def _ppo(engine, settings, config, prompts, run_id, run_dir, resume, progress):
    with Session(engine) as session:
        model, tokenizer, licence = load_policy(settings, config.policy, session, training=True)
        # Scoring follows the policy: the device Accelerate gives this process (its GPU), not the CPU.
        policy_device = str(distributed.state().device)
        reward_fn = reward_function(settings, session, config.reward_model, device=policy_device)
    trainer = PPOTrainer(
        config,
        model,
        tokenizer,
        prompts,
        reward_fn,
        run_dir=run_dir,
        on_step=StepLog(engine, run_id, run_dir / "metrics.jsonl"),
    )
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
    metrics |= {
        "processes": trainer.accelerator.num_processes,
        "replicas_in_sync": trainer.replicas_in_sync,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        # What accelerator.prepare wrapped the actor-critic in (the class itself on one process) and the
        # autocast precision it trained under.
        "prepared": type(trainer.model).__name__,
        "mixed_precision": trainer.accelerator.mixed_precision,
        "prompt_truncation": trainer.prompt_report.as_dict(),
        "peak_rss_mb": max((h.get("peak_rss_mb", 0) for h in history), default=None),
    }
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
        "steps": len(history),
        "train_seconds": round(seconds, 2),
        "reward_start": mean(first, "raw_score"),
        "reward_end": mean(last, "raw_score"),
        "kl_end": mean(last, "kl"),
        "response_length_end": mean(last, "response_length"),
    }


# --- TRL algorithms ------------------------------------------------------------------------------------------


def _trl(engine, settings, algo, config: GRPOConfig | DPOConfig, prompts, pairs, run_id, run_dir, progress):
    from datasets import Dataset
    from peft import LoraConfig

    from sft.layers import lora_targets

    logger = trainer_callback(StepLog(engine, run_id, run_dir / "metrics.jsonl"))
    with Session(engine) as session:
        model, tokenizer, licence = load_policy(settings, config.policy, session, training=True)
        policy_device = str(distributed.state().device)  # where the Trainer will put the policy
        scorer = (
            reward_function(settings, session, config.reward_model, device=policy_device)
            if algo not in OFFLINE
            else None
        )
    peft = (
        LoraConfig(
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            task_type="CAUSAL_LM",
            **lora_targets(model, config.target_modules, config.layers_to_transform),
        )
        if config.method == "lora"
        else None
    )
    if config.method == "full" and config.layers_to_transform is not None:
        from sft.layers import freeze_outside

        freeze_outside(model, config.layers_to_transform)
    cuda = torch.cuda.is_available()
    common = dict(
        output_dir=str(run_dir / "trainer"),
        max_steps=config.steps,
        learning_rate=config.learning_rate,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=config.seed,
        use_cpu=not cuda,
        bf16=cuda and devices.native_bf16("cuda"),
        activation_checkpointing=False,
        disable_tqdm=not progress,
        max_grad_norm=config.max_grad_norm,
    )
    start = time.perf_counter()
    if algo in OFFLINE:  # TRL's offline trainers: DPO on preference pairs, KTO on unpaired thumbs up/down
        import trl

        columns = ("prompt", "chosen", "rejected") if algo == "dpo" else ("prompt", "completion", "label")
        data = Dataset.from_list([{k: p[k] for k in columns} for p in pairs])
        batch = min(config.mini_batch_size, len(pairs))
        # KTO estimates its reference point from mismatched pairs within a batch: it needs two or more rows.
        batch = batch if algo == "dpo" else max(2, batch)
        TRLConfig, Trainer = (
            (trl.DPOConfig, trl.DPOTrainer) if algo == "dpo" else (trl.KTOConfig, trl.KTOTrainer)
        )
        args = TRLConfig(
            per_device_train_batch_size=batch, beta=config.beta, max_length=config.max_length, **common
        )
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=data,
            processing_class=tokenizer,
            peft_config=peft,
            callbacks=[logger],
        )
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
        num_generations = config.num_generations
        args = Config(
            per_device_train_batch_size=num_generations * max(1, config.mini_batch_size // num_generations),
            num_generations=num_generations,
            max_completion_length=config.max_new_tokens,
            temperature=config.temperature,
            beta=config.kl_coef,
            **common,
        )
        trainer = Trainer(
            model=model,
            reward_funcs=reward_func,
            args=args,
            train_dataset=data,
            processing_class=tokenizer,
            peft_config=peft,
            callbacks=[logger],
        )
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
    metrics = {
        "steps": trainer.state.global_step,
        "train_seconds": round(seconds, 2),
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "device": "cuda" if cuda else "cpu",
        "pairs": len(pairs),
    }
    rewards = [h["reward"] for h in history if "reward" in h]
    if rewards:
        metrics |= {"reward_start": rewards[0], "reward_end": rewards[-1]}
    return out, metrics, licence
