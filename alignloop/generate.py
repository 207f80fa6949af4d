"""Batched sampling: candidates for annotation and, later, rollouts for RL.

All prompts x samples are rendered with the model's chat template, sorted by length (so each batch carries
little padding), left-padded and decoded together with the KV cache. A response ends at the first EOS token;
one that reaches `max_new_tokens` first is returned with `finished=False`. Sampling is seeded per batch, so
the same prompts, parameters, batch size and seed give the same texts.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from sqlmodel import Session, select
from tqdm.auto import tqdm

from alignloop import AlignloopError, crud
from alignloop.config import Settings
from alignloop.db import session_scope
from alignloop.models import MAX_RESPONSES, Comparison, ModelVersion, Prompt, Run

log = logging.getLogger(__name__)


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.8  # 0 = greedy
    top_p: float = 0.95
    top_k: int = 0  # 0 = off
    seed: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise AlignloopError("max_new_tokens must be at least 1")
        if self.temperature < 0:
            raise AlignloopError("temperature cannot be negative")
        if not 0 < self.top_p <= 1:
            raise AlignloopError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise AlignloopError("top_k cannot be negative")


@dataclass
class Completion:
    text: str
    token_ids: list[int]  # generated ids up to and including EOS
    finished: bool  # True: ended with EOS; False: cut at max_new_tokens

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


def stop_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends a turn: the tokenizer's EOS and whatever the generation config adds."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return sorted(i for i in ids if i is not None)


def render(tokenizer, messages: Sequence[dict]) -> list[int]:
    """Token ids of a conversation ready for the assistant's next turn."""
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
    else:  # a base model without a template: plain turns
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _is_prompt_learning(model) -> bool:
    config = getattr(model, "active_peft_config", None)
    return bool(getattr(config, "is_prompt_learning", False))


@torch.inference_mode()
def generate(
    model,
    tokenizer,
    prompts: Sequence[Sequence[dict]],
    *,
    params: SamplingParams | None = None,
    num_samples: int = 1,
    batch_size: int = 16,
    progress: bool = True,
) -> list[list[Completion]]:
    """Sample `num_samples` responses for each chat prompt. Returns one list of completions per prompt."""
    params = params or SamplingParams()
    if num_samples < 1 or batch_size < 1:
        raise AlignloopError("num_samples and batch_size must be at least 1")
    if _is_prompt_learning(model):
        batch_size = 1  # virtual tokens (prefix tuning) meet left padding in the wrong places: one at a time
    stops = stop_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    device = next(model.parameters()).device

    rendered = [render(tokenizer, messages) for messages in prompts]
    # Longest first: similar lengths share a batch, and the slowest batch shows up early in the progress bar.
    jobs = sorted(
        ((p, s) for p in range(len(prompts)) for s in range(num_samples)),
        key=lambda job: (-len(rendered[job[0]]), job),
    )
    results: list[list[Completion | None]] = [[None] * num_samples for _ in prompts]
    bar = tqdm(total=len(jobs), desc="generating", unit="seq", disable=not progress)
    for batch_index, start in enumerate(range(0, len(jobs), batch_size)):
        batch = jobs[start : start + batch_size]
        B, T = len(batch), max(len(rendered[p]) for p, _ in batch)  # batch, prompt length
        input_ids = torch.full((B, T), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((B, T), dtype=torch.long)
        for row, (p, _) in enumerate(batch):
            ids = rendered[p]
            input_ids[row, T - len(ids) :] = torch.tensor(
                ids
            )  # left padding: every row ends where decoding starts
            attention_mask[row, T - len(ids) :] = 1
        torch.manual_seed(params.seed * 1_000_003 + batch_index)
        out = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            do_sample=params.temperature > 0,
            temperature=params.temperature if params.temperature > 0 else None,
            top_p=params.top_p if params.temperature > 0 else None,
            top_k=params.top_k if params.temperature > 0 else None,
            max_new_tokens=params.max_new_tokens,
            eos_token_id=stops,
            pad_token_id=pad_id,
            use_cache=True,
        )
        new_tokens = out[:, T:].tolist()  # (B, <= max_new_tokens)
        for row, (p, s) in enumerate(batch):
            ids = new_tokens[row]
            end = next((i for i, t in enumerate(ids) if t in stops), None)
            kept = ids if end is None else ids[: end + 1]
            text = tokenizer.decode(kept[:-1] if end is not None else kept, skip_special_tokens=True)
            results[p][s] = Completion(text=text.strip(), token_ids=kept, finished=end is not None)
        bar.update(B)
    bar.close()
    return results  # type: ignore[return-value]


# --- queueing comparisons ------------------------------------------------------------------------------------


def ensure_model_version(session: Session, *, ref: str, licence: str | None) -> ModelVersion:
    """The registered version for `ref`; a base model used for the first time is registered as a policy."""
    version = crud.get_model_version(session, name=ref)
    if version is None:
        version = crud.register_model(session, name=ref, kind="policy", base=ref, licence=licence)
    return version


def pick_prompts(session: Session, *, num_prompts: int, round: int, split: str = "train") -> list[Prompt]:
    """The oldest prompts of the split with no comparison in this round yet."""
    taken = select(Comparison.prompt_id).where(Comparison.round == round)
    query = select(Prompt).where(Prompt.split == split).where(Prompt.id.not_in(taken)).order_by(Prompt.id)
    return list(session.exec(query.limit(num_prompts)).all())


def queue_comparisons(
    engine,
    *,
    settings: Settings,
    model_ref: str,
    num_prompts: int,
    num_samples: int = 2,
    round: int = 0,
    target_votes: int | None = None,
    params: SamplingParams | None = None,
    batch_size: int | None = None,
    split: str = "train",
    allow_noncommercial: bool | None = None,
    progress: bool = True,
    versus: str | None = None,
    preset=None,
) -> dict:
    """Sample `num_samples` responses per prompt and queue each prompt's responses as one comparison.
    With `versus`, each comparison instead pits one response of `model_ref` against one of `versus` (the
    next round's new policy against the previous one), sides randomised. `preset` (an L1 prompting preset,
    `serve.prompting`) rewrites each conversation before the model sees it; the comparison keeps the original.

    The model runs outside any database transaction (it takes minutes; a held write lock would stall the
    annotators), then everything is written in one short transaction. Returns a summary.
    """
    from alignloop import registry

    if not 2 <= num_samples <= MAX_RESPONSES:
        raise AlignloopError(
            f"--samples must be 2 to {MAX_RESPONSES} (the annotation page shows at most {MAX_RESPONSES} responses)"
        )
    if num_prompts < 1:
        raise AlignloopError("--prompts must be at least 1")
    params = params or SamplingParams(
        max_new_tokens=settings.max_new_tokens, temperature=settings.temperature, top_p=settings.top_p
    )
    if params.temperature == 0:
        raise AlignloopError("greedy decoding gives identical samples; use a temperature above 0")
    target_votes = target_votes or settings.target_votes
    with session_scope(engine) as session:
        prompts = pick_prompts(session, num_prompts=num_prompts, round=round, split=split)
        if not prompts:
            return {"prompts": 0, "comparisons": 0, "identical": 0, "run_id": None}
        prompt_ids = [p.id for p in prompts]
        messages = [p.messages for p in prompts]
        if preset is not None:
            from serve.prompting import apply_preset

            messages = [apply_preset(preset, m) for m in messages]
        preset_ref = f"{preset.name}@{preset.version}" if preset is not None else None
        config = {
            "model": model_ref,
            "versus": versus,
            "num_samples": num_samples,
            "round": round,
            "preset": preset_ref,
            **asdict(params),
        }
        run = crud.create_run(session, kind="generate", config=config)
    refs = [model_ref] if versus is None else [model_ref, versus]
    outputs = []  # (ref, licence, completions per prompt), one model loaded at a time
    try:
        for ref in refs:
            with Session(engine) as lookup:  # closed before the weights load: no lock held meanwhile
                source = registry.locate(
                    ref, settings=settings, session=lookup, allow_noncommercial=allow_noncommercial
                )
            loaded = registry.load_causal_lm(source)
            completions = generate(
                loaded.model,
                loaded.tokenizer,
                messages,
                params=params,
                num_samples=num_samples if versus is None else 1,
                batch_size=batch_size or settings.batch_size,
                progress=progress,
            )
            outputs.append((ref, loaded.licence, completions))
            del loaded
    except BaseException as exc:
        with session_scope(engine) as session:
            crud.finish_run(session, run=session.get(Run, run.id), status="failed", error=str(exc))
        raise

    rng = random.Random(params.seed)
    summary = {"prompts": len(prompt_ids), "comparisons": 0, "identical": 0, "run_id": run.id}
    with session_scope(engine) as session:
        versions = [ensure_model_version(session, ref=ref, licence=licence) for ref, licence, _ in outputs]
        crud.get_or_create_round(session, number=round, target_votes=target_votes, policy_id=versions[0].id)
        per_prompt = [
            [
                (version, c)
                for version, (_, _, completions) in zip(versions, outputs, strict=True)
                for c in completions[i]
            ]
            for i in range(len(prompt_ids))
        ]
        completions = [[c for _, c in samples] for samples in per_prompt]
        for prompt_id, samples in zip(prompt_ids, per_prompt, strict=True):
            if len({c.text for _, c in samples}) < len(samples):
                summary["identical"] += 1  # nothing to choose between: not worth an annotator's time
                continue
            rows = [
                crud.add_generation(
                    session,
                    prompt_id=prompt_id,
                    model_version_id=version.id,
                    text=c.text,
                    num_tokens=c.num_tokens,
                    finished=c.finished,
                    params={**asdict(params), "preset": preset_ref} if preset_ref else asdict(params),
                    run_id=run.id,
                )
                for version, c in samples
            ]
            rng.shuffle(rows)
            crud.create_comparison(
                session,
                prompt_id=prompt_id,
                generation_ids=[g.id for g in rows],
                round=round,
                target_votes=target_votes,
            )
            summary["comparisons"] += 1
        num_tokens = sum(c.num_tokens for samples in completions for c in samples)
        unfinished = sum(not c.finished for samples in completions for c in samples)
        metrics = {"comparisons": summary["comparisons"], "tokens": num_tokens, "unfinished": unfinished}
        crud.finish_run(session, run=session.get(Run, run.id), status="succeeded", metrics=metrics)
    return summary
