"""`rl eval`'s KL is a KL: zero for the policy against itself, and on one-token responses (where the exact KL is
a finite sum) the estimate from the policy's own tempered samples lands within a few standard errors of it."""

import torch
from conftest import build_tiny_llama

from alignloop.core.sampling import SamplingParams, generate, render
from rl.evaluate import kl_to_baseline

T = 0.7
PROMPT = [{"role": "user", "content": "Tell me about item 3."}]


def samples(model, tokenizer, n: int, max_new_tokens: int):
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=T, top_p=1.0, seed=0)
    return [
        c[0] for c in generate(model, tokenizer, [PROMPT] * n, params=params, batch_size=50, progress=False)
    ]


def test_kl_to_itself_is_zero_and_to_another_policy_matches_the_exact_value(tiny_tokenizer):
    policy = build_tiny_llama(tiny_tokenizer, seed=0)
    same, se = kl_to_baseline(
        policy, policy, tiny_tokenizer, [PROMPT] * 20, samples(policy, tiny_tokenizer, 20, 6), temperature=T
    )
    assert same == 0.0 and se == 0.0

    baseline = build_tiny_llama(tiny_tokenizer, seed=0)
    with torch.no_grad():  # a perturbed copy: the same model family, a measurably different distribution
        for p in baseline.parameters():
            p.add_(0.15 * torch.randn_like(p))
    n = 400
    drawn = samples(policy, tiny_tokenizer, n, 1)
    estimate, se = kl_to_baseline(policy, baseline, tiny_tokenizer, [PROMPT] * n, drawn, temperature=T)
    ids = torch.tensor([render(tiny_tokenizer, PROMPT)])
    with torch.no_grad():
        p_log = torch.log_softmax(policy(input_ids=ids).logits[0, -1] / T, -1)
        q_log = torch.log_softmax(baseline(input_ids=ids).logits[0, -1] / T, -1)
    exact = float((p_log.exp() * (p_log - q_log)).sum())
    assert exact > 0.05  # the two really differ
    assert se is not None and 0 < se < exact / 2
    assert abs(estimate - exact) < 4 * se, (estimate, exact, se)
    assert estimate > 0
