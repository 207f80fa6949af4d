"""`alignloop rl eval`: did the new policy get better, or did it only learn to please its reward model?

On held-out prompts (split `eval`), both policies answer (same sampling, same seed). Reported:
- mean reward of each under the reward model used in training;
- KL of the new policy to the baseline on its own samples (sum over tokens of log pi - log pi_base, k1);
- mean response length of each (length is the classic reward hack);
- the win rate of the new policy against the baseline as judged by a *different* reward model (ties half):
  a policy that over-optimised its training reward gains there and not here.
The result is stored as a `Run` (kind `eval`) so /admin/rl lists it beside the training curves.
"""

from __future__ import annotations

import torch
from sqlmodel import Session

from alignloop.core import AlignloopError, crud
from alignloop.core.db import session_scope
from alignloop.core.sampling import SamplingParams, generate, render
from reward.score import RewardModel
from rl.train import load_policy


@torch.no_grad()
def sequence_logprob(model, tokenizer, prompt: list[dict], response_ids: list[int]) -> float:
    query = render(tokenizer, prompt)
    ids = torch.tensor([query + response_ids])
    logits = model(input_ids=ids).logits[0, len(query) - 1 : -1].float()
    return float(torch.log_softmax(logits, -1).gather(-1, torch.tensor(response_ids)[:, None]).sum())


def evaluate_policy(engine, settings, *, policy: str, baseline: str, reward_model: str, judge: str,
                    num_prompts: int = 32, max_new_tokens: int = 64, seed: int = 0, preset: str | None = None) -> dict:  # fmt: skip
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
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.7, top_p=0.95, seed=seed)
    new = [c[0] for c in generate(new_model, tokenizer, prompts_for_models, params=params, progress=False)]
    old = [
        c[0] for c in generate(base_model, base_tokenizer, prompts_for_models, params=params, progress=False)
    ]
    new_texts, old_texts = [c.text for c in new], [c.text for c in old]
    reward_new, reward_old = trained_rm.score(prompts, new_texts), trained_rm.score(prompts, old_texts)
    judge_new, judge_old = judge_rm.score(prompts, new_texts), judge_rm.score(prompts, old_texts)
    kl = [
        sequence_logprob(new_model, tokenizer, p, c.token_ids) - sequence_logprob(base_model, tokenizer, p, c.token_ids)
        for p, c in zip(prompts_for_models, new, strict=True)
        if c.token_ids
    ]  # fmt: skip
    wins = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(judge_new, judge_old, strict=True)]
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    summary = {
        "policy": policy, "baseline": baseline, "reward_model": reward_model, "judge": judge, "prompts": len(prompts),
        "reward": mean(reward_new), "baseline_reward": mean(reward_old), "kl_to_baseline": mean(kl),
        "length": mean([c.num_tokens for c in new]), "baseline_length": mean([c.num_tokens for c in old]),
        "win_rate_by_judge": mean(wins), "preset": preset,
    }  # fmt: skip
    with session_scope(engine) as session:
        run = crud.create_run(session, kind="eval", config={"policy": policy, "baseline": baseline,
                              "reward_model": reward_model, "judge": judge})  # fmt: skip
        crud.finish_run(session, run=run, status="succeeded", metrics=summary)
    samples = [
        {"prompt": p, "policy": a, "baseline": b}
        for p, a, b in zip(prompts, new_texts, old_texts, strict=True)
    ]
    return {"summary": summary, "samples": samples}
