"""Candidate responses into the annotation queue: sample K responses per prompt, queue them as comparisons.

The model runs outside any database transaction (it takes minutes; a held write lock would stall the
annotators), then everything is written in one short transaction. Sampling itself is
`alignloop.core.sampling`, which knows nothing of the database.
"""

from __future__ import annotations

import random
from dataclasses import asdict

from sqlmodel import Session, select

from alignloop.core import AlignloopError, crud, registry
from alignloop.core.config import Settings
from alignloop.core.db import session_scope
from alignloop.core.models import Comparison, Prompt, Run
from alignloop.core.presets import apply_preset
from alignloop.core.sampling import SamplingParams, generate


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
    `alignloop.core.presets`) rewrites each conversation before the model sees it; the comparison keeps the original.

    The model runs outside any database transaction (it takes minutes; a held write lock would stall the
    annotators), then everything is written in one short transaction. Returns a summary.
    """
    if num_samples < 2:
        raise AlignloopError("a comparison needs at least 2 samples per prompt")
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
        versions = [
            crud.ensure_model_version(session, ref=ref, licence=licence) for ref, licence, _ in outputs
        ]
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
