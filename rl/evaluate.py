"""`alignloop rl eval`: did the new policy get better, or did it only learn to please its reward model?

On held-out prompts (split `eval`), both policies answer (same sampling, same seed). Reported:
- mean reward of each under the reward model used in training;
- KL of the new policy to the baseline, KL(pi_T || base_T), with its standard error: the new policy's own
  samples at temperature T (top_p 1, so they really are draws from pi_T), each scored as the sum over its
  tokens of log pi_T - log base_T, both distributions tempered by the same T (logits / T). That is the k1
  estimator, unbiased for a KL, so non-negative in expectation. (The first version sampled at T=0.7 with
  top_p 0.95 and scored under the untempered distributions: not a KL of anything, and it came out negative.)
  Policies with different vocabularies have no such KL: reported as None;
- mean response length of each (length is the classic reward hack);
- the win rate of the new policy against the baseline as judged by a *different* reward model (ties half):
  a policy that over-optimised its training reward gains there and not here.
The result is stored as a `Run` (kind `eval`) so /admin/rl lists it beside the training curves.
"""

from __future__ import annotations

import math

import torch
from sqlmodel import Session

from alignloop.core import AlignloopError, crud
from alignloop.core.db import session_scope
from alignloop.core.sampling import Completion, SamplingParams, generate
from reward.score import RewardModel
from rl.ppo import pad_batch
from rl.train import load_policy


@torch.no_grad()
def response_logprobs(
    model,
    tokenizer,
    prompts: list[list[dict]],
    completions: list[Completion],
    *,
    temperature: float = 1.0,
    batch_size: int = 8,
) -> list[float]:
    """log p_T(response | prompt) for each pair: the sum over the response's tokens of log softmax(logits / T)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(prompts), batch_size):
        batch = pad_batch(
            prompts[start : start + batch_size],
            completions[start : start + batch_size],
            tokenizer,
            pad,
            device,
        )
        ids = torch.cat([batch.queries, batch.responses], 1)
        mask = torch.cat([batch.query_mask, batch.response_mask], 1)
        P = batch.queries.shape[1]
        logits = model(
            input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0)
        ).logits
        logp = torch.log_softmax(logits[:, P - 1 : -1].float() / temperature, -1)
        picked = logp.gather(-1, batch.responses.unsqueeze(-1)).squeeze(-1) * batch.response_mask
        out.extend(picked.sum(1).tolist())
    return out


def kl_to_baseline(
    model,
    baseline,
    tokenizer,
    prompts: list[list[dict]],
    completions: list[Completion],
    *,
    temperature: float,
) -> tuple[float | None, float | None]:
    """(mean, standard error) of the k1 estimate of KL(model_T || baseline_T) from `completions`, which must
    be the model's own samples at `temperature` with top_p 1."""
    kept = [(p, c) for p, c in zip(prompts, completions, strict=True) if c.token_ids]
    if not kept:
        return None, None
    ps, cs = [p for p, _ in kept], [c for _, c in kept]
    new = response_logprobs(model, tokenizer, ps, cs, temperature=temperature)
    old = response_logprobs(baseline, tokenizer, ps, cs, temperature=temperature)
    return mean_and_se([a - b for a, b in zip(new, old, strict=True)])


def mean_and_se(xs: list[float]) -> tuple[float | None, float | None]:
    if not xs:
        return None, None
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, None
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs))


def evaluate_policy(
    engine,
    settings,
    *,
    policy: str,
    baseline: str,
    reward_model: str,
    judge: str,
    num_prompts: int = 32,
    max_new_tokens: int = 64,
    seed: int = 0,
    preset: str | None = None,
    temperature: float = 0.7,
) -> dict:
    if judge == reward_model:
        raise AlignloopError("the judge must be a different reward model from the one used in training")
    with Session(engine) as session:
        prompts = [p.messages for p in crud.list_prompts(session, split="eval", limit=num_prompts)]
        if not prompts:
            raise AlignloopError(
                "no held-out prompts: import some with `alignloop prompts import FILE --split eval`"
            )
        if preset:
            from alignloop.core.presets import apply_preset, get_preset

            chosen_preset = get_preset(session, preset)
            prompts_for_models = [apply_preset(chosen_preset, p) for p in prompts]
        else:
            prompts_for_models = prompts
        trained_rm = RewardModel.load(reward_model, settings=settings, session=session)
        judge_rm = RewardModel.load(judge, settings=settings, session=session)
        new_model, tokenizer, _ = load_policy(settings, policy, session)
        base_model, base_tokenizer, _ = load_policy(settings, baseline, session)
    # top_p 1: the samples are draws from the tempered policy itself, which the KL below needs.
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=1.0, seed=seed)
    new = [c[0] for c in generate(new_model, tokenizer, prompts_for_models, params=params, progress=False)]
    old = [
        c[0] for c in generate(base_model, base_tokenizer, prompts_for_models, params=params, progress=False)
    ]
    new_texts, old_texts = [c.text for c in new], [c.text for c in old]
    reward_new, reward_old = trained_rm.score(prompts, new_texts), trained_rm.score(prompts, old_texts)
    judge_new, judge_old = judge_rm.score(prompts, new_texts), judge_rm.score(prompts, old_texts)
    same_vocab = tokenizer.get_vocab() == base_tokenizer.get_vocab()
    kl, kl_se = (
        kl_to_baseline(new_model, base_model, tokenizer, prompts_for_models, new, temperature=temperature)
        if same_vocab
        else (None, None)
    )
    wins = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(judge_new, judge_old, strict=True)]
    win_rate, win_se = mean_and_se(wins)
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    summary = {
        "policy": policy,
        "baseline": baseline,
        "reward_model": reward_model,
        "judge": judge,
        "prompts": len(prompts),
        "reward": mean(reward_new),
        "baseline_reward": mean(reward_old),
        "kl_to_baseline": kl,
        "kl_to_baseline_se": kl_se,
        "temperature": temperature,
        "length": mean([c.num_tokens for c in new]),
        "baseline_length": mean([c.num_tokens for c in old]),
        "eos_rate": mean([float(c.finished) for c in new]),
        "baseline_eos_rate": mean([float(c.finished) for c in old]),
        "win_rate_by_judge": win_rate,
        "win_rate_se": win_se,
        "preset": preset,
    }
    with session_scope(engine) as session:
        run = crud.create_run(
            session,
            kind="eval",
            config={"policy": policy, "baseline": baseline, "reward_model": reward_model, "judge": judge},
        )
        crud.finish_run(session, run=run, status="succeeded", metrics=summary)
    samples = [
        {"prompt": p, "policy": a, "baseline": b}
        for p, a, b in zip(prompts, new_texts, old_texts, strict=True)
    ]
    return {"summary": summary, "samples": samples}
