"""Train a reward model on preference pairs with TRL's `RewardTrainer` (Bradley-Terry loss).

    alignloop reward train --config configs/reward/default.yaml [--data prefs.jsonl] [--base minilm|default]

Phases, in order: validate the config and read every source (nothing is written if anything is wrong); split
held-out prompts; open a `Run`; load the base with a scalar head; encode pairs (prompt truncated from the left,
nothing dropped: see `reward.data`); train; evaluate on the held-out split and on any `eval_data` files; save
the model (LoRA adapters keep the score head through `modules_to_save`), a PNG report, and register a
`ModelVersion` of kind `reward` with metrics and lineage (base, round, the comparisons it learned from).

Departures from TRL's defaults, each measured in `bench/reward_hh.py`:
- pairs are encoded here, so truncation keeps the response and counts every cut (TRL drops long pairs);
- batches are grouped by length (`train_sampling_strategy="group_by_length"`), so a batch pads to similar
  lengths instead of to its one long outlier;
- activation checkpointing is off (it recomputes the forward pass: a third more work for memory a reward
  model of this size does not need); bf16 autocast only where the chip does bf16 natively (`native_bf16`);
- optional per-pair weights (annotators' gold accuracy) multiply each pair's loss.
Runs under `accelerate launch` like any `transformers.Trainer`: the main process alone writes to the database.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from datasets import Dataset
from sqlmodel import Session
from trl import RewardConfig, RewardTrainer
from trl.trainer.reward_trainer import DataCollatorForPreference

from alignloop.core import AlignloopError, crud, devices, distributed, registry
from alignloop.core.config import Settings, read_run_config
from alignloop.core.db import session_scope
from alignloop.core.models import Run
from alignloop.core.runlog import StepLog, trainer_callback
from reward import evaluate as reward_eval
from reward.data import Pair, RewardFormat, file_pairs, fold_by_prompt, split_by_prompt, workspace_pairs
from reward.score import RewardModel, default_pooling, load_sequence_classifier, write_meta

log = logging.getLogger(__name__)
METHODS = ("full", "lora")


@dataclass
class RewardRunConfig:
    # --- data ---
    data: list[str] = field(default_factory=list, metadata={"help": "Preference files (HH-RLHF or TRL)."})
    from_workspace: bool = field(
        default=True, metadata={"help": "Use the workspace's aggregated votes.", "aliases": ["--votes"]}
    )
    rounds: list[int] | None = field(default=None, metadata={"help": "Only votes from these rounds."})
    gold_weights: bool = field(default=False, metadata={"help": "Weight pairs by voters' gold accuracy."})
    margin_scale: float = field(default=0.0, metadata={"help": "TRL margin for unanimous votes (0 = off)."})
    held_out: float = field(default=0.1, metadata={"help": "Held-out prompts: a share (<1) or a count."})
    cv_fold: str | None = field(
        default=None,
        metadata={
            "help": "Hold out fold i of k prompt folds, as 'i/k' (cross-validation); replaces held_out."
        },
    )
    eval_data: list[str] = field(
        default_factory=list, metadata={"help": "Extra preference files to evaluate on."}
    )
    max_pairs: int | None = field(default=None, metadata={"help": "Use at most this many training pairs."})
    # --- model ---
    base: str = field(default="minilm", metadata={"help": "minilm | default | any model reference."})
    method: str = field(
        default="full", metadata={"help": "Train the whole model or a LoRA adapter.", "choices": METHODS}
    )
    pooling: str = field(
        default="auto", metadata={"help": "See reward.score.", "choices": ("auto", "mean", "last")}
    )
    ensemble: int = field(
        default=1,
        metadata={
            "help": "Members trained with different seeds; scores are their mean, their spread the queue's order."
        },
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    target_modules: list[str] | str = field(default="all-linear", metadata={"help": "LoRA target modules."})
    # --- training ---
    max_length: int = field(
        default=256, metadata={"help": "Tokens per prompt+response (prompt cut from the left)."}
    )
    num_train_epochs: float = field(default=2.0, metadata={"help": "Passes over the training pairs."})
    max_steps: int = field(default=-1, metadata={"help": "Optimizer steps (overrides epochs when > 0)."})
    max_seconds: float | None = field(
        default=None, metadata={"help": "Stop training after this many seconds."}
    )
    learning_rate: float = field(default=5e-5, metadata={"help": "Peak learning rate (linear decay)."})
    warmup_ratio: float = field(default=0.05, metadata={"help": "Share of steps spent warming up."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    per_device_train_batch_size: int = field(default=16, metadata={"help": "Pairs per step and device."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Steps accumulated per update."})
    group_by_length: bool = field(default=True, metadata={"help": "Batch pairs of similar length together."})
    center_rewards_coefficient: float | None = field(
        default=None, metadata={"help": "Pull rewards to mean 0."}
    )
    bf16: bool | None = field(
        default=None, metadata={"help": "bf16 autocast (default: where the chip does bf16 natively)."}
    )
    logging_steps: int = field(default=10, metadata={"help": "Log metrics every this many steps."})
    seed: int = field(default=0, metadata={"help": "Random seed."})
    # --- output ---
    name: str | None = field(
        default=None, metadata={"help": "Model version name (default: reward-<base>-run<id>)."}
    )
    round: int | None = field(
        default=None, metadata={"help": "Round the model belongs to (default: latest voted)."}
    )


def load_config(path: str | Path | None, **overrides) -> RewardRunConfig:
    config = read_run_config(RewardRunConfig, path, overrides, what="reward")
    if config.pooling not in ("auto", "mean", "last"):
        raise AlignloopError(f"pooling must be auto, mean or last, not {config.pooling!r}")
    if config.method not in METHODS:
        raise AlignloopError(f"method must be one of {', '.join(METHODS)}, not {config.method!r}")
    if config.max_length < 32 or config.per_device_train_batch_size < 1 or config.learning_rate <= 0:
        raise AlignloopError("max_length must be >= 32, batch size >= 1 and learning_rate > 0")
    if not (0 <= config.held_out < 1 or float(config.held_out).is_integer()):
        raise AlignloopError("held_out is a share in [0, 1) or a whole number of prompts")
    if config.cv_fold is not None:
        parse_fold(config.cv_fold)
    return config


def parse_fold(text: str) -> tuple[int, int]:
    """'2/5' -> (2, 5): fold 2 of 5, counted from 1."""
    try:
        fold, folds = (int(part) for part in str(text).split("/"))
    except ValueError:
        raise AlignloopError(f"cv_fold is 'i/k' (e.g. 2/5), not {str(text)[:30]!r}") from None
    if not 2 <= folds <= 100 or not 1 <= fold <= folds:
        raise AlignloopError(f"cv_fold {fold}/{folds}: need 2 <= k <= 100 and 1 <= i <= k")
    return fold, folds


def collect_pairs(engine, config: RewardRunConfig) -> tuple[list[Pair], dict]:
    pairs, skipped = [], {}
    for path in config.data:
        file_rows, file_skipped = file_pairs(path)
        pairs += file_rows
        skipped[Path(path).name] = len(file_skipped)
    if config.from_workspace:
        with Session(engine) as session:
            pairs += workspace_pairs(
                session,
                rounds=config.rounds,
                gold_weights=config.gold_weights,
                margin_scale=config.margin_scale,
            )
    if len({p.key for p in pairs}) < 2:
        raise AlignloopError(
            f"not enough preference data: {len(pairs)} pairs (need pairs on at least 2 prompts); "
            "collect votes, or give --data files"
        )
    return pairs, skipped


def peft_config(config: RewardRunConfig, model):
    if config.method != "lora":
        return None
    from peft import LoraConfig, TaskType

    head = "classifier" if hasattr(model, "classifier") else "score"
    return LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.target_modules,
        task_type=TaskType.SEQ_CLS,
        modules_to_save=[head],
    )


class PairCollator(DataCollatorForPreference):
    """TRL's collator (chosen then rejected, padded) plus the per-pair weights."""

    def torch_call(self, examples):
        batch = super().torch_call(examples)
        if "weight" in examples[0]:
            batch["weight"] = torch.tensor([e["weight"] for e in examples], dtype=torch.float)
        return batch


class PairRewardTrainer(RewardTrainer):
    """RewardTrainer whose loss weights each pair (weights all 1 give TRL's loss exactly)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        weight = inputs.pop("weight", None)
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True)
        if weight is not None and not torch.all(weight == 1):
            chosen, rejected = torch.chunk(outputs.logits.squeeze(-1), chunks=2)
            margin = inputs.get("margin", 0)
            per_pair = -torch.nn.functional.logsigmoid(chosen - rejected - margin)
            loss = (weight * per_pair).sum() / weight.sum()
        return (loss, outputs) if return_outputs else loss


def _shared_run_id(engine, config: RewardRunConfig, comparison_ids: list[int]) -> int:
    """The main process opens the Run; the others learn its id (one Run per launch, not one per process)."""
    run_id = None
    if distributed.is_main():
        with session_scope(engine) as session:
            run_config = {
                **asdict(config),
                "comparison_ids": comparison_ids,
            }  # lineage: the votes it learned from
            run_id = crud.create_run(session, kind="reward", config=run_config).id
    return distributed.broadcast(run_id)


def train(engine, settings: Settings, config: RewardRunConfig, *, progress: bool = True) -> dict:
    # 1. Read and check everything before writing anything.
    pairs, skipped = collect_pairs(engine, config)
    if config.cv_fold is not None:
        fold, folds = parse_fold(config.cv_fold)
        train_pairs, held_out = fold_by_prompt(pairs, fold=fold, folds=folds, seed=config.seed)
    else:
        held = int(config.held_out) if config.held_out >= 1 else config.held_out
        train_pairs, held_out = split_by_prompt(pairs, held_out=held, seed=config.seed)
    if config.max_pairs:
        train_pairs = train_pairs[: config.max_pairs]
    eval_sets = {Path(p).name: file_pairs(p)[0] for p in config.eval_data}
    with Session(engine) as session:
        source = registry.locate(config.base, settings=settings, session=session)
        devices.check_training_fits(
            config.base, registry.weights_path(source), settings, full=config.method == "full"
        )
        base_version = crud.get_model_version(session, name=config.base)
        if config.name and crud.get_model_version(session, name=config.name) is not None:
            raise AlignloopError(f"a model version named {config.name!r} is already registered")

    comparison_ids = sorted({p.comparison_id for p in train_pairs if p.comparison_id is not None})
    run_id = _shared_run_id(engine, config, comparison_ids)
    run_dir = settings.runs_dir / f"run{run_id}"
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        return _fit(
            engine,
            config,
            run_id,
            run_dir,
            source,
            base_version,
            train_pairs,
            held_out,
            eval_sets,
            skipped,
            progress,
        )
    except BaseException as exc:
        if distributed.is_main():
            with session_scope(engine) as session:
                crud.finish_run(session, run=session.get(Run, run_id), status="failed", error=str(exc)[:2000])
        raise


def _fit(
    engine, config, run_id, run_dir, source, base_version, train_pairs, held_out, eval_sets, skipped, progress
) -> dict:
    # 2. The base with a scalar head; pairs encoded once for its tokenizer; then each member trains with its
    # own seed (head initialisation and batch order), in turn, sharing the time budget.
    pooling = (
        default_pooling(source.base.path if source.base else source.path)
        if config.pooling == "auto"
        else config.pooling
    )
    out = run_dir / "model"
    member_names = [None] if config.ensemble == 1 else [f"member{i}" for i in range(config.ensemble)]
    budget = config.max_seconds / config.ensemble if config.max_seconds else None
    log_steps = StepLog(engine, run_id, run_dir / "metrics.jsonl") if distributed.is_main() else None
    train_dataset = encode_report = None
    members, train_seconds = [], 0.0
    for index, member in enumerate(member_names):
        seed = config.seed + index
        torch.manual_seed(seed)
        model, tokenizer = load_sequence_classifier(source, pooling=pooling)
        if train_dataset is None:
            train_dataset, encode_report = _encode(RewardFormat(tokenizer, config.max_length), train_pairs)
        fields = {"member": index} if member else None
        trainer = _trainer(
            config, run_dir, model, tokenizer, train_dataset, seed, progress, log_steps, budget, fields
        )
        start = time.perf_counter()
        trainer.train()
        train_seconds += time.perf_counter() - start
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        members.append(
            {
                "steps": trainer.state.global_step,
                "first_loss": losses[0] if losses else None,
                "final_loss": losses[-1] if losses else None,
            }
        )
        if distributed.is_main():  # an adapter keeps its score head via modules_to_save
            member_dir = out / member if member else out
            trainer.model.save_pretrained(member_dir)
            tokenizer.save_pretrained(member_dir)
    if not distributed.is_main():
        return {"run_id": run_id}
    tokenizer.save_pretrained(out)
    write_meta(
        out,
        max_length=config.max_length,
        base=config.base,
        method=config.method,
        pooling=pooling,
        **({"members": member_names} if config.ensemble > 1 else {}),
    )
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in trainer.model.parameters())

    # 3. Evaluate the saved files, loaded back (float32 on the CPU, no training-time autocast): the figures then
    # describe exactly the weights that get registered, the same on every machine. Scoring elsewhere follows
    # the device policy (bf16 on a GPU), which moves scores by rounding only.
    saved = registry.ModelSource(
        ref=str(out), path=out, licence=source.licence, base=source if config.method == "lora" else None
    )
    scorer = RewardModel.from_source(saved, member_names, pooling=pooling, max_length=config.max_length)
    evaluation = {}
    if held_out:
        chosen, rejected = reward_eval.member_pair_scores(scorer, held_out)
        evaluation["held_out"] = reward_eval.evaluate_members(held_out, chosen, rejected)
        scores = {"chosen": chosen.mean(0).tolist(), "rejected": rejected.mean(0).tolist()}
        if config.ensemble > 1:
            scores["members"] = {"chosen": chosen.tolist(), "rejected": rejected.tolist()}
        (run_dir / "held_out_scores.json").write_text(json.dumps(scores), encoding="utf-8")
    for name, pairs in eval_sets.items():
        evaluation[name] = reward_eval.evaluate_members(pairs, *reward_eval.member_pair_scores(scorer, pairs))
    if held_out:
        reward_eval.save_report(evaluation["held_out"], run_dir / "report.png", title=f"reward run {run_id}")

    steps = sum(m["steps"] for m in members)
    rounds = sorted({p.round for p in train_pairs if p.round is not None})
    metrics = {
        "base": config.base,
        "method": config.method,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "train_pairs": len(train_pairs),
        "processes": trainer.accelerator.num_processes,
        "ensemble": config.ensemble,
        "held_out_pairs": len(held_out),
        "trainable_params": trainable,
        "total_params": total,
        "steps": steps,
        "train_seconds": round(train_seconds, 2),
        "train_tokens": int(getattr(trainer, "_total_train_tokens", 0)),
        "pairs_per_second": round(
            steps * trainer.args.train_batch_size * config.gradient_accumulation_steps / train_seconds, 3
        )
        if steps
        else None,
        "first_loss": members[0]["first_loss"],
        "final_loss": members[-1]["final_loss"],
        **({"members": members} if config.ensemble > 1 else {}),
        "encoding": encode_report.as_dict(),
        "skipped_in_files": skipped,
        "rounds": rounds,
        "accuracy": evaluation.get("held_out", {}).get("accuracy"),
        "ece": evaluation.get("held_out", {}).get("ece"),
        "evaluation": _compact(evaluation),
    }
    (run_dir / "evaluation.json").write_text(json.dumps(evaluation, indent=2), encoding="utf-8")
    with session_scope(engine) as session:
        name = config.name or f"reward-{config.base.replace('/', '-')}-run{run_id}"
        version = crud.register_model(
            session,
            name=name,
            kind="reward",
            base=config.base,
            path=str(out),
            parent_id=base_version.id if base_version else None,
            run_id=run_id,
            licence=source.licence,
            round=config.round if config.round is not None else (rounds[-1] if rounds else None),
            metrics=metrics,
        )
        run = session.get(Run, run_id)
        crud.finish_run(session, run=run, status="succeeded", metrics=metrics)
        run.log_path = str(run_dir / "metrics.jsonl")
        session.add(run)
    return {
        "run_id": run_id,
        "model": name,
        "model_version_id": version.id,
        "path": str(out),
        "report": str(run_dir / "report.png") if held_out else None,
        **metrics,
    }


def _encode(fmt: RewardFormat, train_pairs: list[Pair]):
    rows, encode_report = fmt.encode_pairs(train_pairs)
    train_dataset = Dataset.from_list(rows)
    if all(r["weight"] == 1 for r in rows):
        train_dataset = train_dataset.remove_columns("weight")
    if all(r["margin"] == 0 for r in rows):
        train_dataset = train_dataset.remove_columns("margin")
    return train_dataset, encode_report


def _trainer(config, run_dir, model, tokenizer, train_dataset, seed, progress, log_steps, budget, fields):
    cuda = torch.cuda.is_available()
    args = RewardConfig(
        output_dir=str(run_dir / "trainer"),
        num_train_epochs=config.num_train_epochs,
        max_steps=config.max_steps,
        learning_rate=config.learning_rate,
        lr_scheduler_type="linear",
        warmup_steps=config.warmup_ratio,
        weight_decay=config.weight_decay,
        per_device_train_batch_size=config.per_device_train_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        train_sampling_strategy="group_by_length" if config.group_by_length else "random",
        length_column_name="length",
        remove_unused_columns=False,  # the sampler needs `length`; the collator ignores what it does not use
        max_length=None,  # encoded and truncated above, nothing for TRL to drop
        center_rewards_coefficient=config.center_rewards_coefficient,
        activation_checkpointing=False,
        bf16=devices.autocast_bf16(config.bf16),
        use_cpu=not cuda,
        logging_steps=config.logging_steps,
        save_strategy="no",
        report_to=[],
        seed=seed,
        disable_tqdm=not progress,
    )
    return PairRewardTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        peft_config=peft_config(config, model),
        data_collator=PairCollator(pad_token_id=tokenizer.pad_token_id),
        callbacks=[trainer_callback(log_steps, max_seconds=budget, fields=fields)],
    )


def _compact(evaluation: dict) -> dict:
    """Evaluation figures for the database row, without the curves and histograms."""
    keep = (
        "pairs",
        "accuracy",
        "ece",
        "length_correlation",
        "prefers_longer",
        "humans_prefer_longer",
        "by_source",
        "by_round",
        "members",
        "disagreement",
    )
    return {name: {k: v for k, v in m.items() if k in keep} for name, m in evaluation.items()}
