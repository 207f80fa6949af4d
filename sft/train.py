"""Instruction tuning (L2): adapt a model to your instructions with LoRA, prefix tuning, IA3 or full fine-tuning.

    alignloop sft train --config configs/sft/default.yaml --data dolly.jsonl [--method lora|prefix|ia3|full]

Phases, in order: validate the config and read all data (nothing is written if anything is wrong); open a
`Run`; split off held-out prompts per category; load the base from the registry; wrap it with the PEFT method;
sample a few held-out answers; train with TRL's `SFTTrainer` (loss on the assistant's tokens only, via
prompt/completion examples); measure held-out loss per category; sample again; save the adapter (or a merged
model) and register it as a `ModelVersion` of kind `sft`, which the registry, `generate`, reward and RL
stages accept as a base by name.

Departures from TRL's defaults, on purpose: activation checkpointing is off (it disables the KV cache, and
prefix tuning passes its virtual tokens through that cache: with it on, the attention mask and the keys
disagree in length); training runs on the CPU in float32 unless a GPU is present.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from datasets import Dataset
from sqlmodel import Session
from trl import SFTConfig, SFTTrainer

from alignloop.core import AlignloopError, crud, devices, registry
from alignloop.core.config import Settings, read_run_config
from alignloop.core.db import session_scope
from alignloop.core.models import Run
from alignloop.core.runlog import StepLog, trainer_callback
from alignloop.core.sampling import SamplingParams, generate
from alignloop.core.truncate import fit_prompts
from sft.data import Example, chosen_examples, edited_examples, parse_instruction_file, split_held_out
from sft.layers import check_layers, freeze_outside, in_layers, num_layers_of

log = logging.getLogger(__name__)
METHODS = ("lora", "prefix", "ia3", "full")


@dataclass
class SFTRunConfig:
    # --- data ---
    data: list[str] = field(
        default_factory=list, metadata={"help": "Instruction files (dolly, alpaca, chat)."}
    )
    from_chosen: bool = field(
        default=False, metadata={"help": "Add the chosen responses of voted comparisons."}
    )
    from_chat_edits: bool = field(default=False, metadata={"help": "Add reviewers' edited chat answers."})
    held_out_fraction: float = field(
        default=0.1, metadata={"help": "Share of prompts per category held out."}
    )
    max_examples: int | None = field(
        default=None, metadata={"help": "Use at most this many training examples."}
    )
    # --- model ---
    base: str = field(default="default", metadata={"help": "Model reference to tune."})
    method: str = field(default="lora", metadata={"help": "PEFT method (or full).", "choices": METHODS})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        metadata={"help": "LoRA target modules."},
    )
    num_virtual_tokens: int = field(default=16, metadata={"help": "Prefix tuning: virtual tokens per layer."})
    ia3_target_modules: list[str] = field(
        default_factory=lambda: ["k_proj", "v_proj", "down_proj"], metadata={"help": "IA3 target modules."}
    )
    layers_to_transform: list[int] | None = field(
        default=None,
        metadata={
            "help": "Tune only these decoder layers (LoRA, IA3: PEFT's layers_to_transform; full: the "
            "rest frozen). Default: all."
        },
    )
    ia3_feedforward_modules: list[str] = field(
        default_factory=lambda: ["down_proj"], metadata={"help": "IA3 modules scaled on their input."}
    )
    # --- training ---
    max_steps: int = field(default=200, metadata={"help": "Optimizer steps."})
    learning_rate: float | None = field(
        default=None, metadata={"help": "Default: per method (see LEARNING_RATES)."}
    )
    per_device_train_batch_size: int = field(default=4, metadata={"help": "Examples per step and device."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Steps accumulated per update."})
    max_length: int = field(default=512, metadata={"help": "Tokens per example (prompt + completion)."})
    logging_steps: int = field(default=5, metadata={"help": "Log metrics every this many steps."})
    seed: int = field(default=0, metadata={"help": "Random seed."})
    # --- output ---
    name: str | None = field(
        default=None, metadata={"help": "Model version name (default: sft-<method>-run<id>)."}
    )
    merge: bool = field(
        default=False, metadata={"help": "Merge the adapter into a standalone model (LoRA, IA3)."}
    )
    num_samples: int = field(
        default=3, metadata={"help": "Held-out prompts answered before and after, in the report."}
    )
    sample_max_new_tokens: int = field(default=64, metadata={"help": "Tokens per sample answer."})


# Adapters tolerate (and need) far larger steps than full fine-tuning.
LEARNING_RATES = {"lora": 2e-4, "prefix": 3e-3, "ia3": 3e-3, "full": 2e-5}


def load_config(path: str | Path | None, **overrides) -> SFTRunConfig:
    config = read_run_config(SFTRunConfig, path, overrides, what="SFT")
    if config.method not in METHODS:
        raise AlignloopError(f"method must be one of {', '.join(METHODS)}, not {config.method!r}")
    if config.merge and config.method not in ("lora", "ia3"):
        raise AlignloopError(f"--merge works for lora and ia3 adapters, not {config.method}")
    if config.layers_to_transform is not None and config.method == "prefix":
        raise AlignloopError("layers_to_transform works with lora, ia3 and full, not prefix tuning")
    if (
        config.max_steps < 1
        or config.per_device_train_batch_size < 1
        or not 0 <= config.held_out_fraction < 1
    ):
        raise AlignloopError("max_steps and batch size must be positive and held_out_fraction in [0, 1)")
    return config


def peft_config(config: SFTRunConfig):
    from peft import IA3Config, LoraConfig, PrefixTuningConfig, TaskType

    if config.method == "lora":
        return LoraConfig(
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=config.target_modules,
            layers_to_transform=config.layers_to_transform,
            task_type=TaskType.CAUSAL_LM,
        )
    if config.method == "prefix":
        return PrefixTuningConfig(num_virtual_tokens=config.num_virtual_tokens, task_type=TaskType.CAUSAL_LM)
    if config.method == "ia3":
        targets, feedforward = config.ia3_target_modules, config.ia3_feedforward_modules
        if (
            config.layers_to_transform is not None
        ):  # IA3Config has no layers_to_transform: a regex does the same
            targets, feedforward = (
                in_layers(names, config.layers_to_transform) for names in (targets, feedforward)
            )
        return IA3Config(
            target_modules=targets, feedforward_modules=feedforward, task_type=TaskType.CAUSAL_LM
        )
    return None  # full fine-tuning


def collect_examples(engine, config: SFTRunConfig) -> list[Example]:
    examples = [e for path in config.data for e in parse_instruction_file(path)]
    with Session(engine) as session:
        if config.from_chosen:
            examples += chosen_examples(session)
        if config.from_chat_edits:
            examples += edited_examples(session)
    if not examples:
        raise AlignloopError("no training data: give --data files, --from-chosen or --from-chat-edits")
    return examples


def train(engine, settings: Settings, config: SFTRunConfig, *, progress: bool = True) -> dict:
    # 1. Everything that can be wrong with the input is found before anything is written.
    examples = collect_examples(engine, config)
    train_examples, held_out = split_held_out(examples, fraction=config.held_out_fraction, seed=config.seed)
    if config.max_examples:
        train_examples = train_examples[: config.max_examples]
    with Session(engine) as session:
        source = registry.locate(config.base, settings=settings, session=session)
        devices.check_training_fits(
            config.base, registry.weights_path(source), settings, full=config.method == "full"
        )
        base_version = crud.get_model_version(session, name=config.base)
    check_layers(config.layers_to_transform, num_layers_of(source))

    with session_scope(engine) as session:
        run = crud.create_run(session, kind="sft", config=asdict(config))
    run_dir = settings.runs_dir / f"run{run.id}"
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        summary = _fit(
            engine,
            config,
            run.id,
            run_dir,
            source,
            base_version,
            train_examples,
            held_out,
            progress,
            settings=settings,
        )
    except BaseException as exc:
        with session_scope(engine) as session:
            crud.finish_run(session, run=session.get(Run, run.id), status="failed", error=str(exc)[:2000])
        raise
    return summary


def _fit(
    engine,
    config,
    run_id,
    run_dir,
    source,
    base_version,
    train_examples,
    held_out,
    progress,
    *,
    settings: Settings,
) -> dict:
    torch.manual_seed(config.seed)
    # 2. The base model, wrapped by the method. A base that is itself an adapter is merged first.
    # float32 master weights where the Trainer puts them; a base set to 4/8-bit in config.yaml loads
    # quantized on the GPU (QLoRA).
    placement = devices.for_training(settings, config.base)
    loaded = registry.load_causal_lm(source, placement=placement, settings=settings)
    model, tokenizer = loaded.model, loaded.tokenizer
    if source.base is not None:
        model = model.merge_and_unload()
    train_examples, train_cuts = fit_examples(tokenizer, train_examples, config.max_length)
    held_out, held_out_cuts = fit_examples(tokenizer, held_out, config.max_length)
    sample_prompts = [e.prompt for e in held_out[: config.num_samples]]
    before = _samples(model, tokenizer, sample_prompts, config)

    if config.method == "full" and config.layers_to_transform is not None:
        freeze_outside(model, config.layers_to_transform)
    cuda = torch.cuda.is_available()
    args = SFTConfig(
        output_dir=str(run_dir / "trainer"),
        max_steps=config.max_steps,
        learning_rate=config.learning_rate or LEARNING_RATES[config.method],
        per_device_train_batch_size=config.per_device_train_batch_size,
        per_device_eval_batch_size=config.per_device_train_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        max_length=config.max_length,
        logging_steps=config.logging_steps,
        seed=config.seed,
        save_strategy="no",
        report_to=[],
        use_cpu=not cuda,
        bf16=cuda and devices.native_bf16("cuda"),
        activation_checkpointing=False,  # see the module docstring
        disable_tqdm=not progress,
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list([e.row() for e in train_examples]),
        processing_class=tokenizer,
        peft_config=peft_config(config),
        callbacks=[trainer_callback(StepLog(engine, run_id, run_dir / "metrics.jsonl"))],
    )
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in trainer.model.parameters())
    start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - start

    # 3. Held-out loss per category (completion tokens only, as in training).
    eval_loss: dict[str, float] = {}
    categories = sorted({e.category for e in held_out})
    for category in categories:
        subset = Dataset.from_list([e.row() for e in held_out if e.category == category])
        eval_loss[category] = trainer.evaluate(eval_dataset=subset)["eval_loss"]
    if held_out:
        eval_loss["all"] = trainer.evaluate(eval_dataset=Dataset.from_list([e.row() for e in held_out]))[
            "eval_loss"
        ]

    # 4. Save and register.
    tuned = trainer.model
    after = _samples(tuned, tokenizer, sample_prompts, config)
    out = run_dir / "model"
    if config.merge:
        tuned = tuned.merge_and_unload()
    tuned.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if config.method != "full" and not config.merge:
        _point_adapter_at(out, source)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    metrics = {
        "method": config.method,
        "layers": config.layers_to_transform,
        "device": "cuda" if cuda else "cpu",
        "train_examples": len(train_examples),
        # distinct training rows the steps reached (a short run sees only the first batches of its shuffle)
        "examples_seen": min(
            len(train_examples),
            trainer.state.global_step
            * trainer.args.train_batch_size
            * trainer.args.gradient_accumulation_steps
            * trainer.args.world_size,
        ),
        "held_out_examples": len(held_out),
        "prompts_cut": {"train": train_cuts.as_dict(), "held_out": held_out_cuts.as_dict()},
        "trainable_params": trainable,
        "total_params": total,
        "train_seconds": round(train_seconds, 2),
        "seconds_per_step": round(train_seconds / config.max_steps, 4),
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "held_out_loss": eval_loss,
    }
    report = _report(config, metrics, sample_prompts, before, after)
    (run_dir / "report.md").write_text(report, encoding="utf-8")
    with session_scope(engine) as session:
        name = config.name or f"sft-{config.method}-run{run_id}"
        version = crud.register_model(
            session,
            name=name,
            kind="sft",
            base=config.base,
            path=str(out),
            parent_id=base_version.id if base_version else None,
            run_id=run_id,
            licence=source.licence,
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
        **metrics,
        "samples_before": before,
        "samples_after": after,
    }


# The completion's share of `max_length`: its tokens plus the end-of-turn frame (a token and a newline, with
# slack for templates that add more). The prompt gets the rest, but never less than half of `max_length`.
END_OF_TURN = 4


def fit_examples(tokenizer, examples: list[Example], max_length: int):
    """Each example's prompt cut, oldest turns first, so prompt + completion fit `max_length`.

    TRL truncates prompt + completion from the *end*: a long conversation loses its answer (the tokens that
    carry the loss) or, when the prompt alone fills `max_length`, is silently dropped. Cutting the prompt from
    the start instead keeps the answer whole and the latest turns it answers (as RL's `max_prompt_length`
    does). A completion longer than half of `max_length` still loses its end to TRL's cut."""
    limits = [
        max(
            max_length - len(tokenizer(e.completion, add_special_tokens=False)["input_ids"]) - END_OF_TURN,
            max_length // 2,
        )
        for e in examples
    ]
    try:
        prompts, report = fit_prompts(tokenizer, [e.prompt for e in examples], limits)
    except AlignloopError as exc:
        raise AlignloopError(
            f"max_length {max_length} is too short for this chat template: raise it"
        ) from exc
    return [replace(e, prompt=p) for e, p in zip(examples, prompts, strict=True)], report


def _point_adapter_at(adapter_dir: Path, source) -> None:
    """Record the base's local path in adapter_config.json, so the adapter also loads outside the registry."""
    config_file = adapter_dir / "adapter_config.json"
    data = json.loads(config_file.read_text())
    data["base_model_name_or_path"] = str(source.base.path if source.base is not None else source.path)
    config_file.write_text(json.dumps(data, indent=2))


def _samples(model, tokenizer, prompts: list[list[dict]], config: SFTRunConfig) -> list[str]:
    if not prompts:
        return []
    was_training = model.training
    model.eval()
    params = SamplingParams(max_new_tokens=config.sample_max_new_tokens, temperature=0)
    answers = [
        samples[0].text for samples in generate(model, tokenizer, prompts, params=params, progress=False)
    ]
    model.train(was_training)
    return answers


def _report(config, metrics, prompts, before, after) -> str:
    lines = [
        f"# SFT run: {config.method} on {config.base}",
        "",
        "```json",
        json.dumps(metrics, indent=2),
        "```",
        "",
    ]
    for prompt, b, a in zip(prompts, before, after, strict=True):
        lines += [f"## {prompt[-1]['content'][:200]}", "", f"**before:** {b}", "", f"**after:** {a}", ""]
    return "\n".join(lines)
