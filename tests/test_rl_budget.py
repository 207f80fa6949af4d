"""PPO's memory bounds on the tiny model: prompts capped (latest turns kept, cuts counted), every forward pass
with a graph within the token budget whatever the prompt lengths, and micro-batching that changes nothing but
memory (the accumulated gradients equal one pass over the minibatch)."""

import copy

import pytest
import torch
from conftest import build_tiny_llama

from alignloop.core import AlignloopError
from alignloop.core.batching import plan_micro_batches
from alignloop.core.sampling import render
from alignloop.core.truncate import fit_prompt, fit_prompts
from rl.ppo import PPOTrainer, load_config


def conversation(turns: int, words: int = 30) -> list[dict]:
    roles = ["user", "assistant"]
    return [
        {"role": roles[t % 2], "content": f"turn {t} " + " ".join(f"w{t}x{i}" for i in range(words))}
        for t in range(turns - 1)
    ] + [{"role": "user", "content": "And the last question?"}]


def test_fit_prompt_keeps_the_latest_turns_and_counts_the_cuts(tiny_tokenizer):
    long = conversation(9)
    assert len(render(tiny_tokenizer, long)) > 120
    fitted, dropped, cut, before = fit_prompt(tiny_tokenizer, long, 120)
    assert len(render(tiny_tokenizer, fitted)) <= 120 and before > 120
    assert dropped > 0 and not cut and fitted == long[dropped:]  # oldest turns went, the rest is unchanged
    # One huge last turn: it keeps its latest tokens, in the chat format.
    huge = [{"role": "user", "content": " ".join(f"word{i}" for i in range(400)) + " final words"}]
    fitted, dropped, cut, _ = fit_prompt(tiny_tokenizer, huge, 64)
    assert cut and dropped == 0 and fitted[0]["content"].endswith("final words")
    assert 50 <= len(render(tiny_tokenizer, fitted)) <= 64
    short = [{"role": "user", "content": "hi"}]
    prompts, report = fit_prompts(tiny_tokenizer, [long, huge, short], 64)
    assert prompts[2] == short and all(len(render(tiny_tokenizer, p)) <= 64 for p in prompts)
    assert report.as_dict() | {"longest_before": 0} == {
        "prompts": 3,
        "truncated": 2,
        "turns_dropped": report.turns_dropped,
        "turn_cut": 1,
        "longest_before": 0,
        "longest_after": max(len(render(tiny_tokenizer, p)) for p in prompts),
    }
    with pytest.raises(AlignloopError, match="frame"):
        fit_prompt(tiny_tokenizer, huge, 8)


def test_micro_batch_plan_partitions_rows_within_the_budget():
    lengths = [(500, 10), (20, 48), (300, 5), (7, 1), (90, 48), (250, 30)] * 3
    groups = plan_micro_batches(lengths, 600)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for g in groups:
        width = max(lengths[i][0] for i in g) + max(lengths[i][1] for i in g)
        assert len(g) * width <= 600
    assert plan_micro_batches(lengths, None) == [sorted(range(len(lengths)), key=lambda i: -sum(lengths[i]))]
    capped = plan_micro_batches(lengths, 600, max_rows=2)
    assert sorted(i for g in capped for i in g) == list(range(len(lengths)))
    assert max(map(len, capped)) == 2 and len(capped) > len(groups)
    by_rows = plan_micro_batches(lengths, None, max_rows=4)
    assert sorted(i for g in by_rows for i in g) == list(range(len(lengths))) and max(map(len, by_rows)) <= 4


def test_micro_batch_plan_is_the_cheapest_grouping_not_a_greedy_fill():
    # Longest first, a greedy fill to the budget pads three 150-token rows to 300: [300, 160, 150] (900 padded
    # tokens) + [150, 150, 150] (450). The cheapest plan isolates the long row: [300] + [160, 150 x 4] (800).
    lengths = [(150, 0), (300, 0), (150, 0), (160, 0), (150, 0), (150, 0)]
    groups = plan_micro_batches(lengths, 900)
    assert groups == [[1], [3, 0, 2, 4, 5]]
    # A pass has a fixed cost: rows of nearly equal length share one pass rather than one pass each.
    assert plan_micro_batches([(100, 0), (99, 0), (98, 0)], 1000) == [[0, 1, 2]]
    # Planning stays linear in the rows for a long list under a small budget.
    many = [(10 + i % 90, 5) for i in range(20_000)]
    planned = plan_micro_batches(many, 512, max_rows=64)
    assert sorted(i for g in planned for i in g) == list(range(len(many)))


def ppo(tokenizer, model, **overrides):
    base = dict(
        batch_size=8,
        mini_batch_size=8,
        ppo_epochs=1,
        max_new_tokens=8,
        learning_rate=1e-2,
        kl_coef=0.05,
        missing_eos_penalty=0.0,
        lora_r=4,
        lora_alpha=8,
        save_every=0,
        target_modules=["q_proj", "v_proj", "down_proj"],
        temperature=1.0,
    )
    reward = lambda prompts, completions: [len(c.token_ids) / 8 for c in completions]  # noqa: E731
    prompts = [conversation(1 + (i % 3) * 6, words=5 + 8 * (i % 4)) for i in range(8)]
    return PPOTrainer(load_config(None, **(base | overrides)), model, tokenizer, prompts, reward)


def test_the_token_budget_bounds_every_forward_pass_whatever_the_prompt_lengths(tiny_tokenizer):
    """Prompts from 20 to ~1,500 tokens, capped at 96, budget 160 padded tokens: every forward pass outside
    generation (rollout log-probs, reference, values, update with its graph) sees at most 160 token positions,
    so the activations it keeps (per layer: positions x hidden) are bounded by the budget, not by the data."""
    budget = 160
    trainer = ppo(
        tiny_tokenizer,
        build_tiny_llama(tiny_tokenizer, initializer_range=0.1),
        max_prompt_length=96,
        micro_batch_tokens=budget,
    )
    assert trainer.prompt_report.longest_before > 1000 and trainer.prompt_report.truncated >= 4
    seen, hidden = [], []
    lm = trainer.ac.causal_lm

    def count(module, args, kwargs):
        if not kwargs.get("use_cache"):  # generation decodes with the cache; every other pass is bounded
            seen.append(kwargs["input_ids"].numel())

    def activations(module, args, output):
        if not torch.is_inference_mode_enabled():
            hidden.append((output[0] if isinstance(output, tuple) else output).numel())

    handles = [
        lm.model.register_forward_pre_hook(count, with_kwargs=True),
        lm.model.layers[0].register_forward_hook(activations),
    ]
    batch, _ = trainer.rollout(0)
    trainer.update(batch, 0)
    for h in handles:
        h.remove()
    assert seen and max(seen) <= budget, seen
    assert max(hidden) <= budget * lm.config.hidden_size
    assert 0 < trainer.largest_micro_batch <= budget
    # Without the budget the same step's widest pass is far larger: the bound is doing the work.
    loose = ppo(
        tiny_tokenizer,
        build_tiny_llama(tiny_tokenizer, initializer_range=0.1),
        max_prompt_length=8192,
        micro_batch_tokens=100_000,
    )
    batch, _ = loose.rollout(0)
    loose.update(batch, 0)
    assert loose.largest_micro_batch > 8 * budget


def test_micro_batches_and_checkpointing_leave_the_gradients_unchanged(tiny_tokenizer):
    model = build_tiny_llama(tiny_tokenizer, initializer_range=0.1)
    # float32: under bf16 autocast every change of a pass's shape moves results by bf16 rounding (~4e-3), on
    # chips with native bf16, where the trainer autocasts by default.
    whole = ppo(
        tiny_tokenizer, copy.deepcopy(model), max_prompt_length=96, micro_batch_tokens=100_000, bf16=False
    )
    split = ppo(
        tiny_tokenizer,
        copy.deepcopy(model),
        max_prompt_length=96,
        micro_batch_tokens=110,
        gradient_checkpointing=True,
        bf16=False,
    )
    batch, _ = whole.rollout(0)
    grads = []
    for trainer in (whole, split):
        trainer.ac.train()
        trainer.optimizer.zero_grad(set_to_none=True)
        stats = trainer.accumulate(batch)
        named = [(n, p) for n, p in trainer.ac.named_parameters() if p.requires_grad or "lora_" in n]
        grads.append(({n: p.grad for n, p in named}, stats))
    assert len(split.micro_batches(batch)) > 2  # really split
    assert grads[0][0].keys() == grads[1][0].keys()
    # Both adapters and the head learn: the value adapter used to be frozen again (peft's set_adapter) before
    # its backward, so it never got a gradient, and checkpointing recomputed its pass with the policy's.
    assert len(grads[0][0]) > 6 and all(g is not None for g in grads[0][0].values())
    for name, a in grads[0][0].items():
        b = grads[1][0][name]
        assert (a is None and b is None) or torch.allclose(a, b, atol=1e-6, rtol=1e-4), name
    assert grads[0][1]["policy_loss"] == pytest.approx(grads[1][1]["policy_loss"], abs=1e-6)


@pytest.mark.parametrize("value_model", ["shared", "adapter"])
def test_old_log_probs_and_values_from_the_generation_pass_equal_a_forward_pass(tiny_tokenizer, value_model):
    """The rollout's old log-probs (and the shared head's values) come from the hidden states generation
    already computed, with the policy adapter merged; they must be the numbers a separate forward pass over
    prompt + response gives, after an update has moved the adapter, and one forward pass per micro-batch
    must really be saved."""
    trainer = ppo(
        tiny_tokenizer,
        build_tiny_llama(tiny_tokenizer, initializer_range=0.1),
        max_prompt_length=96,
        micro_batch_tokens=110,
        value_model=value_model,
    )
    assert trainer.from_generation  # float32 on this CPU: on by default
    batch, _ = trainer.rollout(0)
    trainer.update(batch, 0)  # the adapter is no longer zero: generation runs with it merged
    passes = []
    lm = trainer.ac.causal_lm
    hook = lm.model.register_forward_pre_hook(
        lambda module, args, kwargs: passes.append(1) if not kwargs.get("use_cache") else None,
        with_kwargs=True,
    )
    batch, stats = trainer.rollout(1)
    reused = len(passes)
    trainer.from_generation = False
    logprobs, ref, values, entropy = trainer.rollout_forwards(batch)
    hook.remove()
    micro = len(trainer.micro_batches(batch))
    assert micro > 1 and reused == micro * (
        1 if value_model == "shared" else 2
    )  # reference (+ value adapter)
    assert len(passes) - reused == micro * (2 if value_model == "shared" else 3)  # + the policy's own pass
    for c in batch.completions:
        assert c.hidden is not None and c.hidden.shape == (c.num_tokens, lm.config.hidden_size)
    mask = batch.response_mask.bool()
    assert (batch.logprobs - logprobs)[mask].abs().max() < 1e-4
    assert (batch.values - values)[mask].abs().max() < 1e-4
    assert stats["entropy"] == pytest.approx(float(entropy[mask].mean()), abs=1e-4)
    assert torch.equal(batch.ref_logprobs, ref)
    assert (logprobs - ref)[mask].abs().max() > 1e-3  # the policy's log-probs, not the reference's


@pytest.mark.parametrize("method", ["lora", "full"])
def test_the_output_layer_on_response_positions_equals_the_models_own_forward(tiny_tokenizer, method):
    """With a plain output layer the decoder runs alone and the head reads only the response positions, the
    temperature applied to the hidden state: log-probs, entropy, hidden states and gradients must equal the
    model's own forward (logits for those positions, divided by the temperature), for the policy and the
    reference; a soft-capped model takes the model's own forward."""
    trainer = ppo(
        tiny_tokenizer,
        build_tiny_llama(tiny_tokenizer, initializer_range=0.1),
        max_prompt_length=96,
        micro_batch_tokens=512,
        method=method,
        temperature=0.7,
    )
    batch, _ = trainer.rollout(0)
    trainer.update(batch, 0)  # the policy moves away from the reference
    ac = trainer.ac
    assert ac.plain_head
    results = {}
    for plain in (True, False):
        ac.plain_head = plain
        ac.zero_grad(set_to_none=True)
        lp, ent, hidden = ac.policy_forward(batch, want_hidden=True, want_entropy=True)
        ((lp * batch.response_mask).sum() + ac.values_from(hidden).sum()).backward()
        grads = {n: p.grad.clone() for n, p in ac.named_parameters() if p.grad is not None}
        ref = ac.policy_forward(batch, reference=True)[0]
        results[plain] = (lp.detach(), ent, hidden.detach(), grads, ref)
    mask = batch.response_mask.bool()
    for i in (0, 1, 2, 4):  # log-probs, entropy, hidden states, reference log-probs
        assert (results[True][i] - results[False][i])[mask].abs().max() < 1e-5, i
    assert results[True][3].keys() == results[False][3].keys() and len(results[True][3]) > 2
    for name, g in results[True][3].items():
        assert torch.allclose(g, results[False][3][name], atol=1e-5, rtol=1e-4), name
    assert (results[True][0] - results[True][4])[mask].abs().max() > 1e-3  # policy and reference differ

    from rl.ppo import plain_output_head

    assert not plain_output_head(type("C", (), {"final_logit_softcapping": 30.0})())
    assert not plain_output_head(type("C", (), {"logits_scaling": 8.0})())
    assert plain_output_head(type("C", (), {"final_logit_softcapping": None})())


def test_budget_settings_are_checked(tmp_path):
    with pytest.raises(AlignloopError, match="must hold one full row"):
        load_config(None, max_prompt_length=512, max_new_tokens=48, micro_batch_tokens=256)
    config = tmp_path / "ppo.yaml"
    config.write_text("max_prompt_length: null\nmicro_batch_tokens: 1024\n")
    with pytest.raises(AlignloopError, match="set both"):
        load_config(config)


BF16_STEP = """
import json, math, os, sys
sys.path.insert(0, os.environ["TESTS_DIR"])
from conftest import build_tiny_llama, build_tiny_tokenizer
from test_rl_budget import ppo
tok = build_tiny_tokenizer()
trainer = ppo(tok, build_tiny_llama(tok, initializer_range=0.1), max_prompt_length=96, micro_batch_tokens=110,
              steps=3, bf16=True)
history = trainer.train(progress=False)
print(json.dumps({"precision": trainer.accelerator.mixed_precision, "from_generation": trainer.from_generation,
                  "finite": all(math.isfinite(h[k]) for h in history for k in ("policy_loss", "value_loss", "kl")),
                  "steps": len(history), "widest": trainer.largest_micro_batch}))
"""


def test_ppo_trains_under_bf16_autocast(tmp_path):
    """The suite pins float32 (conftest), but bf16 autocast is the trainer's default on chips that do bf16
    natively: it runs here in its own process (Accelerate's precision is fixed per process) with `bf16: true`,
    which also works, emulated, on chips without it. Steps finish with finite losses, the token budget holds,
    and old log-probs come from a forward pass (generation's rounding differs in bf16)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = os.environ | {"TESTS_DIR": str(Path(__file__).resolve().parent)}
    out = subprocess.run(
        [sys.executable, "-c", BF16_STEP], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    widest = result.pop("widest")
    assert result == {"precision": "bf16", "from_generation": False, "finite": True, "steps": 3}
    assert 0 < widest <= 110
