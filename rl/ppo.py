"""PPO for RLHF, written to be read top to bottom.

    alignloop rl train --algo ppo --config configs/rl/default.yaml --reward-model RM [--policy REF]

One step: sample a batch of prompts -> roll out responses with `alignloop.generate` (batched, KV cache) ->
score the decoded text with the reward model (its tokenizer may differ from the policy's) -> per-token rewards:
`-kl_coef * (log pi - log pi_ref)` on every token plus the score on the last one -> GAE -> whitened advantages
-> `ppo_epochs` passes over minibatches of the clipped policy loss and the clipped value loss -> gradient
clipping -> one optimizer step per minibatch -> the adaptive KL controller moves `kl_coef` toward `target_kl`.

Models. The policy is the base plus a LoRA adapter ("default"). The reference is the same base with the
adapter switched off (`disable_adapter`), so there is no second copy in memory. The value model is chosen by
`value_model`:
- "adapter": a second LoRA adapter ("value") on the same base with a scalar head on the last hidden state —
  separate parameters, so value regression never pulls on the policy (two forward passes per minibatch);
- "shared": the scalar head reads the policy's own last hidden state (one forward pass, coupled gradients).
Measured (`bench/cuda_check.py`, H100, the default model's architecture): "shared" takes 0.78x the time per
step (its update half as long) at the same peak memory, and both learn the test task equally fast. "adapter" is
the default anyway: it keeps value regression from pulling on the policy's weights, the failure the PPO
literature warns about with shared trunks, for about a quarter more time per step. (Those figures predate a
fix: peft's `set_adapter` froze the value adapter again before its backward, so only the head learned.)

Memory and speed (issue #12: on full-context HH prompts the first version reached 20.7 GB and was OOM-killed):
prompts are capped at `max_prompt_length` tokens once, up front (oldest turns first, cuts counted: see
`rl/budget.py`); every forward pass (rollout log-probs, reference, values, update) runs on micro-batches of at
most `micro_batch_tokens` padded tokens, gradients accumulated with each micro-batch's token sums divided by
the whole minibatch's token count, so the update equals one pass over the minibatch (a test checks the
gradients); optional activation checkpointing; bf16 autocast where the chip multiplies in bf16 natively;
rollouts generate with the policy adapter merged into fresh weight tensors (swapped back afterwards, so the
reference never drifts); the old log-probs (and the shared value head's values) come from the hidden states
generation already computed, so the policy's own forward pass over every prompt is not run twice per step
(float32 only, `logprobs_from_generation`: under bf16 a KV-cached decode and a full pass round differently;
TRL's PPOTrainer takes its old log-probs from the generation logits the same way); the output layer reads only
the R positions that predict response tokens, with the temperature applied to their hidden states (head(h / T)
= head(h) / T for a linear head; models with a soft-cap or logit scale after it use their own forward), and the
entropy, a metric, is measured once per step at the rollout rather than in every update pass: on the tiny
model, whose cost is its vocabulary-sized output layer, the update went from 2.6 to 1.8 s per step (hh-tiny);
micro-batches are the cheapest grouping of rows of similar length under the budget (`alignloop.core.batching`:
the update in 0.83x the time of a greedy fill, shipped config on HH rollouts, 3 paired batches); rollouts
prefill prompts in length groups (`alignloop.core.sampling.prefill`: 0.74-0.83x the generation time on HH
batches);
every step logs the time split (generate / score / forward / update) and the process's peak and current RSS.

Implementation details follow "The N Implementation Details of RLHF with PPO" (Huang et al., 2024) and
"Secrets of RLHF in LLMs Part I" (Zheng et al., 2023): logits divided by the sampling temperature before
log-probs; left-padded queries and right-padded responses with explicit position ids; values and rewards
masked after the end of each response; advantages whitened over valid tokens; rewards not whitened by
default; `missing_eos_penalty` is subtracted from the score of a response that never emits EOS; the KL
estimate is the sum over tokens of `log pi - log pi_ref` (k1).
Departures: sampling is seeded per step (`seed + step`) rather than from one running generator, so a run
resumed from a checkpoint replays exactly the rollouts of the run it continues.

Accelerate (`accelerate launch ... -m alignloop.cli rl train --algo ppo`). The actor-critic (adapters, value head,
frozen base) and the optimizer go through `accelerator.prepare`, so DDP averages gradients in its backward hooks
and a DeepSpeed ZeRO config shards optimizer state and gradients; every gradient-carrying forward pass goes
through the prepared wrapper (`ActorCritic.forward`), every no-grad pass (generation, old and reference
log-probs, values) through the unwrapped module, under `accelerator.autocast()` (bf16 per the device policy or
`bf16`). Invariants the token budget adds:
- one optimizer step per minibatch whatever its micro-batch count, so Accelerate's fixed
  `gradient_accumulation_steps` (which also divides every loss by that count) does not fit: the micro-batches
  but the last run under `accelerator.no_sync`, and `accelerator.sync_gradients` is True only for the
  minibatch's last backward (where DeepSpeed steps its engine). The losses keep their token-share scaling;
- every process runs the same number of forward/backward passes per minibatch: the count is the maximum over
  processes (one small all-gather), and a rank short of it repeats its smallest micro-batch with weight 0.
  DDP alone would survive unequal counts (it communicates only in the synchronising backward), but ZeRO-2
  reduces gradients in every backward, where a rank with fewer micro-batches would hang the others; one
  padded path for both keeps the tested path the shipped one. The filler runs while that rank would
  otherwise wait for the slowest one;
- "adapter" value models take turns in the forward pass (policy pass and its backward, then value pass and its
  backward, so one graph at a time), so half the trainable parameters are unused in each pass: DDP runs with
  `find_unused_parameters` there, and both adapters stay `requires_grad` (peft's `set_adapter` toggles it) so
  DDP registers them all.
Each process averages its own minibatch (token means); DDP then averages over processes. Refused with a
one-line error: ZeRO-3 (generation merges the adapter into weights it would have sharded) and checkpoints
under DeepSpeed (the optimizer state is sharded; `save_every` must be 0 there). The DeepSpeed path is written
to Accelerate's contract but has not run: no DeepSpeed and no second GPU where it was written.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from alignloop.core import AlignloopError, devices
from alignloop.core.batching import plan_micro_batches
from alignloop.core.config import read_run_config
from alignloop.core.sampling import Completion, SamplingParams, generate, render
from alignloop.core.truncate import fit_prompts
from rl.budget import padded_tokens, peak_rss_mb, row_lengths, rss_mb

log = logging.getLogger(__name__)
RewardFn = Callable[[Sequence[list[dict]], Sequence[Completion]], list[float]]


@dataclass
class PPOConfig:
    # --- models ---
    policy: str = field(default="default", metadata={"help": "Model reference to start from."})
    reward_model: str | None = field(default=None, metadata={"help": "Registered reward model."})
    method: str = field(
        default="lora", metadata={"help": "lora | full (full keeps a frozen reference copy)."}
    )
    value_model: str = field(
        default="adapter", metadata={"help": "adapter | shared (see the module docstring)."}
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank (policy and value adapters)."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator."})
    target_modules: list[str] | str = field(default="all-linear", metadata={"help": "LoRA target modules."})
    layers_to_transform: list[int] | None = field(
        default=None, metadata={"help": "Tune only these decoder layers (see sft.layers). Default: all."}
    )
    # --- data ---
    prompts: str = field(
        default="workspace", metadata={"help": "'workspace' (train split) or a prompt file."}
    )
    max_prompts: int | None = field(default=None, metadata={"help": "Use at most this many prompts."})
    max_prompt_length: int | None = field(
        default=512,
        metadata={"help": "Prompts longer than this (tokens) lose their oldest turns (None: no cap)."},
    )
    # --- rollouts ---
    steps: int = field(default=100, metadata={"help": "PPO steps (each: rollouts, then updates)."})
    batch_size: int = field(default=16, metadata={"help": "Rollouts per step (over all processes)."})
    mini_batch_size: int = field(default=8, metadata={"help": "Rollouts per optimizer step (per process)."})
    ppo_epochs: int = field(default=2, metadata={"help": "Passes over each step's rollouts."})
    max_new_tokens: int = field(default=48, metadata={"help": "Response length cap."})
    temperature: float = field(
        default=1.0, metadata={"help": "Sampling temperature (also scales log-probs)."}
    )
    missing_eos_penalty: float = field(default=1.0, metadata={"help": "Subtracted from scores without EOS."})
    # --- memory and speed (see rl/budget.py) ---
    micro_batch_tokens: int | None = field(
        default=4096,
        metadata={"help": "Padded tokens per forward pass; gradients accumulate (None: no cap)."},
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata={"help": "Recompute activations in the backward pass (less memory, ~30% slower)."},
    )
    bf16: bool | None = field(
        default=None, metadata={"help": "bf16 autocast (default: where the chip does bf16 natively)."}
    )
    merge_for_rollout: bool = field(
        default=True, metadata={"help": "Generate with the policy adapter merged into the base weights."}
    )
    logprobs_from_generation: bool = field(
        default=True,
        metadata={
            "help": "Old log-probs (and shared values) from the generation pass's hidden states instead of a "
            "second forward pass; float32 only (under bf16 autocast the forward pass is kept)."
        },
    )
    # --- objective ---
    learning_rate: float = field(default=1e-4, metadata={"help": "AdamW learning rate."})
    kl_coef: float = field(default=0.05, metadata={"help": "Initial per-token KL penalty."})
    adaptive_kl: bool = field(default=False, metadata={"help": "Steer kl_coef toward target_kl."})
    target_kl: float = field(
        default=6.0, metadata={"help": "Adaptive controller's target (sum over tokens)."}
    )
    kl_horizon: int = field(default=10000, metadata={"help": "Adaptive controller's horizon (rollouts)."})
    gamma: float = field(default=1.0, metadata={"help": "Discount."})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda."})
    cliprange: float = field(default=0.2, metadata={"help": "Policy ratio clip."})
    cliprange_value: float = field(default=0.2, metadata={"help": "Value prediction clip."})
    vf_coef: float = field(default=0.1, metadata={"help": "Value loss weight."})
    whiten_rewards: bool = field(default=False, metadata={"help": "Whiten per-token rewards before GAE."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping."})
    # --- bookkeeping ---
    save_every: int = field(default=10, metadata={"help": "Checkpoint every this many steps (0 = never)."})
    seed: int = field(default=0, metadata={"help": "Random seed."})
    name: str | None = field(default=None, metadata={"help": "Model version name (default: ppo-run<id>)."})


def load_config(path: str | Path | None, **overrides) -> PPOConfig:
    config = read_run_config(PPOConfig, path, overrides, what="PPO", ignore=("algo",))
    if config.method not in ("lora", "full") or config.value_model not in ("adapter", "shared"):
        raise AlignloopError("method must be lora or full; value_model adapter or shared")
    if config.method == "full" and config.value_model == "adapter":
        config.value_model = "shared"  # no adapters to take turns with
    if config.steps < 1 or config.batch_size < 1 or config.mini_batch_size < 1 or config.ppo_epochs < 1:
        raise AlignloopError("steps, batch_size, mini_batch_size and ppo_epochs must be at least 1")
    if config.temperature <= 0:
        raise AlignloopError("PPO samples from the policy: temperature must be > 0")
    if config.max_prompt_length is not None and config.max_prompt_length < 8:
        raise AlignloopError("max_prompt_length must be at least 8 tokens (or null for no cap)")
    if config.micro_batch_tokens is not None:
        if config.max_prompt_length is None:
            raise AlignloopError("micro_batch_tokens bounds memory only with max_prompt_length set: set both")
        if config.max_prompt_length + config.max_new_tokens > config.micro_batch_tokens:
            raise AlignloopError(
                f"micro_batch_tokens ({config.micro_batch_tokens}) must hold one full row: max_prompt_length + "
                f"max_new_tokens = {config.max_prompt_length + config.max_new_tokens}"
            )
    return config


# --- tensors -------------------------------------------------------------------------------------------------


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    return (
        (x * mask).sum(dim) / mask.sum(dim).clamp(min=1) if dim is not None else (x * mask).sum() / mask.sum()
    )


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    return whitened if shift_mean else whitened + mean


def token_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, *, want_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(token) (B, R) from tempered logits (B, R, V); the entropy too on request (a metric, no graph)."""
    logp_all = F.log_softmax(logits, dim=-1)
    logprobs = logp_all.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    if not want_entropy:
        return logprobs, None
    with torch.no_grad():
        return logprobs, -(logp_all.exp() * logp_all).sum(-1)


# Config fields of architectures whose logits are more than the output layer's product (Gemma 2/3's soft-cap,
# Cohere's logit_scale, Granite's logits_scaling): for those, log-probs come from the model's own forward.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def plain_output_head(config) -> bool:
    """True when a causal LM's logits are its output layer applied to the last hidden state, nothing after."""
    return all(getattr(config, name, None) in (None, 1, 1.0) for name in _LOGIT_TRANSFORMS)


@dataclass
class Rollouts:
    """One step's experience; every (B, R) tensor is aligned with the response tokens."""

    prompts: list[list[dict]]
    queries: torch.Tensor  # (B, P) left-padded
    query_mask: torch.Tensor
    responses: torch.Tensor  # (B, R) right-padded
    response_mask: torch.Tensor
    completions: list[Completion]
    scores: torch.Tensor | None = None  # (B,)
    logprobs: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None
    values: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None

    def rows(self, index: torch.Tensor) -> Rollouts:
        pick = lambda t: None if t is None else t[index]  # noqa: E731
        return Rollouts(
            prompts=[self.prompts[i] for i in index.tolist()],
            completions=[self.completions[i] for i in index.tolist()],
            **{
                f.name: pick(getattr(self, f.name))
                for f in fields(self)
                if f.name not in ("prompts", "completions")
            },
        )

    def trimmed(self) -> Rollouts:
        """The same rows without the padding columns none of them needs (left of the queries, right of the
        responses): a micro-batch of short rows is processed at its own width, not the step's widest."""
        q_keep = int(self.query_mask.sum(1).max())
        r_keep = max(1, int(self.response_mask.sum(1).max()))
        P = self.queries.shape[1]
        out = Rollouts(
            prompts=self.prompts,
            completions=self.completions,
            queries=self.queries[:, P - q_keep :],
            query_mask=self.query_mask[:, P - q_keep :],
            responses=self.responses[:, :r_keep],
            response_mask=self.response_mask[:, :r_keep],
            scores=self.scores,
        )
        for name in ("logprobs", "ref_logprobs", "values", "advantages", "returns"):
            value = getattr(self, name)
            setattr(out, name, None if value is None else value[:, :r_keep])
        return out


def pad_batch(prompts, completions, tokenizer, pad_id: int, device=None) -> Rollouts:
    queries = [render(tokenizer, p) for p in prompts]
    P, R = max(map(len, queries)), max(max(len(c.token_ids) for c in completions), 1)
    B = len(prompts)
    q, qm = torch.full((B, P), pad_id), torch.zeros((B, P), dtype=torch.long)
    r, rm = torch.full((B, R), pad_id), torch.zeros((B, R), dtype=torch.long)
    for i, (ids, c) in enumerate(zip(queries, completions, strict=True)):
        q[i, P - len(ids) :], qm[i, P - len(ids) :] = torch.tensor(ids), 1
        r[i, : len(c.token_ids)], rm[i, : len(c.token_ids)] = torch.tensor(c.token_ids, dtype=torch.long), 1
    q, qm, r, rm = (t.to(device) for t in (q, qm, r, rm))
    return Rollouts(
        prompts=list(prompts),
        queries=q,
        query_mask=qm,
        responses=r,
        response_mask=rm,
        completions=list(completions),
    )


# --- the models ----------------------------------------------------------------------------------------------


class ValueHead(nn.Module):
    def __init__(self, hidden_size: int):
        super().__init__()
        self.summary = nn.Linear(hidden_size, 1)
        nn.init.normal_(self.summary.weight, std=1 / math.sqrt(hidden_size + 1))
        nn.init.zeros_(self.summary.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.summary(hidden).squeeze(-1)


class ActorCritic(nn.Module):
    """Policy, value and reference from one set of base weights (see the module docstring)."""

    def __init__(self, model, config: PPOConfig):
        super().__init__()
        self.config = config
        if config.method == "lora":
            from peft import LoraConfig, get_peft_model

            from sft.layers import lora_targets

            lora = dict(
                r=config.lora_r,
                lora_alpha=config.lora_alpha,
                lora_dropout=0.0,
                task_type="CAUSAL_LM",
                **lora_targets(model, config.target_modules, config.layers_to_transform),
            )
            model = get_peft_model(model, LoraConfig(**lora))  # adapter "default": the policy
            if config.value_model == "adapter":
                model.add_adapter("value", LoraConfig(**lora))
            self.reference = None
        else:
            import copy

            self.reference = copy.deepcopy(model).eval().requires_grad_(False)
            if config.layers_to_transform is not None:
                from sft.layers import freeze_outside

                freeze_outside(model, config.layers_to_transform)
        self.model = model
        self.value_head = ValueHead(model.config.hidden_size)
        self.keeps_logits = "logits_to_keep" in inspect.signature(self.causal_lm.forward).parameters
        self.plain_head = plain_output_head(model.config)
        if config.gradient_checkpointing:  # non-reentrant: works with frozen embeddings (LoRA) as they are
            lm, kwargs = self.causal_lm, {"use_reentrant": False}
            if hasattr(lm, "activation_checkpointing_enable"):  # transformers >= 5.2's name for it
                lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        self._set_adapter("default")

    def forward(
        self,
        batch: Rollouts,
        role: str = "policy",
        *,
        with_values: bool = False,
        with_entropy: bool = False,
    ):
        """The one entry point of the prepared (DDP / DeepSpeed) wrapper, whose hooks see only `forward`.
        role "policy" -> (log-probs, entropy if `with_entropy` else None, values from the policy's hidden
        state if `with_values` else None), "reference" -> the same with the adapter off; "value" -> V(s_t)
        from the value adapter. All (B, R)."""
        if role == "value":
            return self.value_forward(batch)
        logprobs, entropy, hidden = self.policy_forward(
            batch, reference=role == "reference", want_hidden=with_values, want_entropy=with_entropy
        )
        return logprobs, entropy, self.values_from(hidden) if with_values else None

    def values_from(self, hidden: torch.Tensor) -> torch.Tensor:
        """The scalar head in float32 even under bf16 autocast: value targets need the precision."""
        with torch.autocast(hidden.device.type, enabled=False):
            return self.value_head(hidden.float())

    @contextmanager
    def merged_policy(self):
        """The policy adapter folded into the base weights for generation, so the decoding loop runs plain
        linear layers (an unmerged adapter adds two small matrix products per layer and token). The merged
        weights are new tensors swapped in and swapped out again, never `W += BA` then `W -= BA`: the base (the
        reference) stays bit for bit what it was, so a resumed run still replays the one it continues. Costs
        one transient copy of the adapted layers' weights while generating, when no activations are held."""
        merge = self.config.method == "lora" and self.config.merge_for_rollout
        swapped = []
        if merge:
            from peft.tuners.lora import LoraLayer

            with torch.no_grad():
                for module in self.model.modules():
                    if isinstance(module, LoraLayer) and "default" in module.lora_A and not module.merged:
                        base = module.get_base_layer()
                        original = base.weight.data
                        delta = module.get_delta_weight("default").to(original.dtype)
                        base.weight.data = original + delta
                        module.merged_adapters.append("default")  # peft's forward then skips the adapter
                        swapped.append((module, base, original))
        try:
            yield
        finally:
            for module, base, original in swapped:
                base.weight.data = original
                module.merged_adapters.remove("default")

    @property
    def causal_lm(self):
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    def _set_adapter(self, name: str) -> None:
        """peft's `set_adapter` freezes the inactive adapter; both stay trainable here, so DDP (which registers
        only parameters that require grad when it wraps the model) averages both adapters' gradients."""
        if self.config.method == "lora":
            self.model.set_adapter(name)
            for n, p in self.model.named_parameters():
                if "lora_" in n:
                    p.requires_grad_(True)

    @contextmanager
    def adapter(self, name: str):
        """`name` active inside, the previous adapter again after (nests: the value pass's backward runs
        inside one too, since activation checkpointing recomputes the forward there)."""
        previous = self.model.active_adapter if self.config.method == "lora" else name
        if name != previous:
            self._set_adapter(name)
        try:
            yield
        finally:
            if name != previous:
                self._set_adapter(previous)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Every adapter's weights (set_adapter toggles requires_grad, so select by name) and the head."""
        if self.config.method == "lora":
            params = [p for n, p in self.model.named_parameters() if "lora_" in n]
        else:
            params = [p for p in self.model.parameters() if p.requires_grad]  # all, or the chosen layers'
        return params + list(self.value_head.parameters())

    def trainable_state(self) -> dict:
        named = dict(self.named_parameters())
        keep = {id(p) for p in self.trainable_parameters()}
        return {n: p.detach().clone() for n, p in named.items() if id(p) in keep}

    def _inputs(self, batch: Rollouts) -> dict:
        """Prompt + response as one left-padded sequence, with explicit positions; no KV cache."""
        input_ids = torch.cat([batch.queries, batch.responses], dim=1)
        attention_mask = torch.cat([batch.query_mask, batch.response_mask], dim=1)
        position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
        return dict(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        )

    def _response_hidden(self, lm, batch: Rollouts) -> torch.Tensor:
        """The decoder's last hidden states (B, R, H) at the positions that predict the response tokens."""
        P, R = batch.queries.shape[1], batch.responses.shape[1]
        decoder = getattr(lm, lm.base_model_prefix)
        return decoder(**self._inputs(batch)).last_hidden_state[:, P - 1 : P + R - 1]

    def policy_forward(
        self,
        batch: Rollouts,
        *,
        reference: bool = False,
        want_hidden: bool = False,
        want_entropy: bool = False,
    ):
        """Log-probs of the response tokens (B, R); their entropy (a metric) and the last hidden state there
        on request, else None. With a plain output layer (`plain_output_head`) the decoder runs alone and the
        output layer reads only the R positions that predict response tokens, the temperature applied to their
        hidden states rather than to vocabulary-sized logits (no vocabulary-sized slice or division in the
        graph); otherwise the model's own forward computes the logits, kept for those positions only."""
        if reference and self.reference is not None:
            lm, ctx = self.reference, torch.no_grad()
        elif reference:
            lm, ctx = self.causal_lm, self.model.disable_adapter()
        else:
            lm, ctx = self.causal_lm, _nullcontext()
        with ctx:
            if self.plain_head:
                hidden = self._response_hidden(lm, batch)
                logits = self.output_logits(hidden, lm)
            else:
                P, R = batch.queries.shape[1], batch.responses.shape[1]
                keep = {"logits_to_keep": R + 1} if self.keeps_logits else {}
                out = lm(**self._inputs(batch), output_hidden_states=want_hidden, **keep)
                logits = out.logits[:, -(R + 1) : -1].float() / self.config.temperature
                hidden = out.hidden_states[-1][:, P - 1 : P + R - 1] if want_hidden else None
        logprobs, entropy = token_logprobs(logits, batch.responses, want_entropy=want_entropy)
        return logprobs, entropy, hidden if want_hidden else None

    def output_logits(self, hidden: torch.Tensor, lm=None) -> torch.Tensor:
        """Tempered float32 logits from last hidden states, for a plain output layer: head(h / T) = head(h) / T."""
        head = (lm if lm is not None else self.causal_lm).get_output_embeddings()
        return head(hidden / self.config.temperature).float()

    def logprobs_from_hidden(self, hidden: torch.Tensor, responses: torch.Tensor):
        """Log-probs and entropy (B, R) of `responses` from the last hidden states that predicted them
        (generation's)."""
        return token_logprobs(self.output_logits(hidden), responses, want_entropy=True)

    def value_forward(self, batch: Rollouts) -> torch.Tensor:
        """V(s_t) for each response position (B, R), from the value adapter's last hidden state."""
        with self.adapter("value"):
            return self.values_from(self._response_hidden(self.causal_lm, batch))


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


# --- advantages ----------------------------------------------------------------------------------------------


def compute_rewards(
    scores, logprobs, ref_logprobs, mask, kl_coef: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards: the KL penalty on every token, the score added on each response's last token."""
    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    last = (mask.sum(1) - 1).clamp(min=0).long()
    rewards[torch.arange(len(scores), device=scores.device), last] += scores
    return rewards * mask, kl


def gae(rewards, values, mask, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    values = values * mask
    advantages_reversed, last = [], torch.zeros(rewards.shape[0], device=rewards.device)
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        advantages_reversed.append(last)
    advantages = torch.stack(advantages_reversed[::-1], dim=1) * mask
    return advantages, (advantages + values) * mask


class AdaptiveKL:
    """Ziegler et al. (2019): move the coefficient in proportion to the KL's relative error, clipped at 20%."""

    def __init__(self, value: float, target: float, horizon: int):
        self.value, self.target, self.horizon = value, target, horizon

    def update(self, kl: float, n: int) -> None:
        error = max(-0.2, min(0.2, kl / self.target - 1))
        self.value *= 1 + error * n / self.horizon


# --- the trainer ---------------------------------------------------------------------------------------------


class PPOTrainer:
    def __init__(
        self,
        config: PPOConfig,
        model,
        tokenizer,
        prompts: list[list[dict]],
        reward_fn: RewardFn,
        *,
        accelerator=None,
        run_dir: Path | None = None,
        on_step=None,
    ):
        from accelerate import Accelerator

        if not prompts:
            raise AlignloopError("PPO needs prompts: import some, or give a prompt file")
        self.config, self.tokenizer, self.reward_fn = config, tokenizer, reward_fn
        # Capped once, up front: every rollout, forward pass and reward score sees the same (fitted) prompt.
        self.prompts, self.prompt_report = fit_prompts(tokenizer, prompts, config.max_prompt_length)
        if self.prompt_report.truncated:
            log.info(
                "prompts cut to max_prompt_length=%s: %s",
                config.max_prompt_length,
                self.prompt_report.as_dict(),
            )
        from accelerate.utils import DistributedDataParallelKwargs, DistributedType

        from alignloop.core import distributed

        distributed.state()  # the process group, on the CPU when there is no GPU
        bf16 = devices.autocast_bf16(config.bf16)
        # The adapters take turns in the forward pass ("adapter" value model): DDP must look for unused
        # parameters then. Buffers (rotary tables) are the same everywhere: no broadcast per forward pass.
        ddp = DistributedDataParallelKwargs(
            find_unused_parameters=config.value_model == "adapter", broadcast_buffers=False
        )
        self.accelerator = accelerator or Accelerator(
            cpu=not torch.cuda.is_available(),
            mixed_precision="bf16" if bf16 else "no",
            kwargs_handlers=[ddp],
        )
        self.run_dir, self.on_step = run_dir, on_step
        deepspeed = self.accelerator.distributed_type == DistributedType.DEEPSPEED
        if deepspeed:
            # No dataloader goes through prepare, so DeepSpeed learns its batch size and clipping here (TRL's
            # PPOTrainer does the same); its optimizer state is sharded, which this trainer cannot checkpoint.
            plugin = self.accelerator.state.deepspeed_plugin
            if plugin.zero_stage == 3:
                raise AlignloopError(
                    "PPO under DeepSpeed supports ZeRO stages 0-2 (its rollouts generate with weights ZeRO-3 "
                    "shards): use configs/accelerate/deepspeed_zero2.yaml"
                )
            ds_config = plugin.deepspeed_config
            ds_config["train_micro_batch_size_per_gpu"] = config.mini_batch_size
            ds_config["gradient_clipping"] = config.max_grad_norm
            if config.save_every:
                raise AlignloopError("PPO checkpoints are not supported under DeepSpeed: set save_every: 0")
        torch.manual_seed(config.seed)  # the same adapter and head initialisation on every process
        ac = ActorCritic(model, config).to(self.accelerator.device)
        optimizer = torch.optim.AdamW(ac.trainable_parameters(), lr=config.learning_rate, eps=1e-5)
        # `self.model` is what the gradients flow through (DDP, a DeepSpeed engine, or `ac` itself on one
        # process); `self.ac` is the unwrapped module for generation, no-grad passes, saving and checkpoints.
        self.model, self.optimizer = self.accelerator.prepare(ac, optimizer)
        self.ac = self.accelerator.unwrap_model(self.model)
        self.kl = AdaptiveKL(config.kl_coef, config.target_kl, config.kl_horizon)
        self.step, self.history = 0, []
        self.largest_micro_batch = (
            0  # padded tokens of the widest forward pass so far (the memory bound's witness)
        )
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        # Reusing the generation pass needs the output layer's logits to be the model's (nothing after it)
        # and float32: bf16's rounding differs between a KV-cached decode and a full forward pass.
        self.from_generation = (
            config.logprobs_from_generation
            and self.accelerator.mixed_precision == "no"
            and plain_output_head(model.config)
        )
        world = self.accelerator.num_processes
        if config.batch_size % world:
            raise AlignloopError(f"batch_size {config.batch_size} must divide by the {world} processes")
        self.local_batch = config.batch_size // world

    # 1. rollouts
    def step_prompts(self, step: int) -> list[list[dict]]:
        """This process's share of the step's prompts; the same for any run that reaches this step."""
        picked = random.Random(self.config.seed * 7919 + step).choices(self.prompts, k=self.config.batch_size)
        rank = self.accelerator.process_index
        return picked[rank * self.local_batch : (rank + 1) * self.local_batch]

    @torch.no_grad()
    def rollout(self, step: int) -> tuple[Rollouts, dict]:
        timings, start = {}, time.perf_counter()
        prompts = self.step_prompts(step)
        params = SamplingParams(
            max_new_tokens=self.config.max_new_tokens,
            temperature=self.config.temperature,
            top_p=1.0,
            seed=self.config.seed * 1_000_033 + step * 97 + self.accelerator.process_index,
        )
        self.ac.eval()
        with self.ac.merged_policy(), self.accelerator.autocast():
            completions = [
                c[0]
                for c in generate(
                    self.ac.model,
                    self.tokenizer,
                    prompts,
                    params=params,
                    batch_size=self.local_batch,
                    progress=False,
                    return_hidden=self.from_generation,
                )
            ]
        timings["generate_s"] = time.perf_counter() - start

        start = time.perf_counter()
        device = self.accelerator.device
        scores = torch.tensor(self.reward_fn(prompts, completions), dtype=torch.float, device=device)
        finished = torch.tensor([c.finished for c in completions], device=device)
        scores = scores - self.config.missing_eos_penalty * (~finished).float()
        timings["score_s"] = time.perf_counter() - start

        start = time.perf_counter()
        batch = pad_batch(prompts, completions, self.tokenizer, self.pad_id, device)
        batch.scores = scores
        batch.logprobs, batch.ref_logprobs, batch.values, entropy = self.rollout_forwards(batch)
        timings["forward_s"] = time.perf_counter() - start
        mask = batch.response_mask.float()
        rewards, kl = compute_rewards(scores, batch.logprobs, batch.ref_logprobs, mask, self.kl.value)
        if self.config.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False)
        advantages, batch.returns = gae(rewards, batch.values, mask, self.config.gamma, self.config.lam)
        batch.advantages = masked_whiten(advantages, mask) * mask
        stats = {
            "kl": kl.sum(1).mean().item(),
            "raw_score": (scores + self.config.missing_eos_penalty * (~finished).float()).mean().item(),
            "score": scores.mean().item(),
            "response_length": mask.sum(1).mean().item(),
            "eos_rate": finished.float().mean().item(),
            "entropy": masked_mean(entropy, mask).item(),  # of the policy that sampled, per token
        }
        return batch, {**stats, **timings}

    def micro_batches(self, batch: Rollouts) -> list[tuple[torch.Tensor, Rollouts]]:
        """(row indices, trimmed rows) per micro-batch: at most `micro_batch_tokens` padded tokens each."""
        groups = plan_micro_batches(
            row_lengths(batch.query_mask, batch.response_mask), self.config.micro_batch_tokens
        )
        out = []
        for group in groups:
            index = torch.tensor(group, device=batch.queries.device)
            mb = batch.rows(index).trimmed()
            self.largest_micro_batch = max(
                self.largest_micro_batch, padded_tokens(mb.query_mask, mb.response_mask)
            )
            out.append((index, mb))
        return out

    @torch.no_grad()
    def rollout_forwards(self, batch: Rollouts) -> tuple[torch.Tensor, ...]:
        """Old log-probs, reference log-probs, values and the policy's entropy (B, R), micro-batch by
        micro-batch (the entropy, a metric, is measured here once per step, not in every update pass). With
        `from_generation`, the policy's own pass is the generation's: its log-probs and shared values come from
        the hidden states the output layer read while sampling (the same numbers in float32, to rounding; a
        test compares them), which saves one forward pass over every prompt per step."""
        B, R = batch.responses.shape
        device = batch.responses.device
        logprobs, ref_logprobs, values, entropy = (torch.zeros(B, R, device=device) for _ in range(4))
        shared = self.config.value_model == "shared"
        hidden = None
        if self.from_generation:
            hidden = torch.zeros(B, R, self.ac.model.config.hidden_size, device=device)
            for i, c in enumerate(batch.completions):
                hidden[i, : c.num_tokens] = c.hidden.to(device=device, dtype=hidden.dtype)
        for index, mb in self.micro_batches(batch):
            width = mb.responses.shape[1]
            with self.accelerator.autocast():  # no graph: the unwrapped module, no DDP hooks
                if hidden is not None:
                    h = hidden[index, :width]
                    lp, ent = self.ac.logprobs_from_hidden(h, mb.responses)
                    v = self.ac.values_from(h) if shared else None
                else:
                    lp, ent, v = self.ac(mb, "policy", with_values=shared, with_entropy=True)
                logprobs[index, :width], entropy[index, :width] = lp, ent
                ref_logprobs[index, :width] = self.ac(mb, "reference")[0]
                values[index, :width] = v if shared else self.ac(mb, "value")
        mask = batch.response_mask.float()
        return logprobs * mask, ref_logprobs * mask, values * mask, entropy * mask

    # 2. updates
    def losses(self, mb: Rollouts, tokens: float, *, weight: float = 1.0, last: bool = True) -> dict:
        """Backward pass for one micro-batch. Token sums are divided by the whole minibatch's `tokens`, so the
        gradients accumulated over its micro-batches equal one pass over the minibatch (masked means).
        `weight` 0 makes a filler pass (see `accumulate`); `last` marks the minibatch's last micro-batch."""
        mask = mb.response_mask.float()
        shared = self.config.value_model == "shared"
        total = lambda x: (x * mask).sum() / tokens  # noqa: E731  (this micro-batch's share of a masked mean)
        with self.accelerator.autocast():
            logprobs, _, vpred = self.model(mb, "policy", with_values=shared)
        ratio = torch.exp(logprobs - mb.logprobs)
        pg_losses = torch.max(
            -mb.advantages * ratio,
            -mb.advantages * ratio.clamp(1 - self.config.cliprange, 1 + self.config.cliprange),
        )
        pg_loss = total(pg_losses)
        if shared:
            vf_loss, vf_clip = self._value_loss(vpred, mb, total)
            self._backward((pg_loss + self.config.vf_coef * vf_loss) * weight, boundary=last)
        else:  # two passes, one graph at a time; only the value pass may end the accumulation
            self._backward(pg_loss * weight, boundary=False)
            # The value adapter stays active through its backward: checkpointing recomputes the forward there.
            with self.ac.adapter("value"):
                with self.accelerator.autocast():
                    vpred = self.model(mb, "value")
                vf_loss, vf_clip = self._value_loss(vpred, mb, total)
                self._backward(self.config.vf_coef * vf_loss * weight, boundary=last)
        with torch.no_grad():
            return {
                "policy_loss": pg_loss.item(),
                "value_loss": vf_loss.item(),
                "value_clipfrac": vf_clip,
                "clipfrac": total((torch.abs(ratio - 1) > self.config.cliprange).float()).item(),
                "approx_kl": total(0.5 * (logprobs - mb.logprobs) ** 2).item(),
            }

    def _backward(self, loss: torch.Tensor, *, boundary: bool) -> None:
        """`sync_gradients` True only on the backward that ends the minibatch: DeepSpeed reduces and steps its
        engine there, and Accelerate's optimizer wrapper skips `step` while it is False."""
        self.accelerator.sync_gradients = boundary
        self.accelerator.backward(loss)

    def _value_loss(self, vpred, mb: Rollouts, total) -> tuple[torch.Tensor, float]:
        clipped = mb.values + (vpred - mb.values).clamp(
            -self.config.cliprange_value, self.config.cliprange_value
        )
        losses = torch.max((vpred - mb.returns) ** 2, (clipped - mb.returns) ** 2)
        frac = total(((clipped - mb.returns) ** 2 > (vpred - mb.returns) ** 2).float()).item()
        return 0.5 * total(losses), frac

    def accumulate(self, minibatch: Rollouts) -> dict:
        """One minibatch's gradients, accumulated over its micro-batches (synchronised across processes on the
        last one); its stats (masked means, over the real micro-batches)."""
        tokens = float(minibatch.response_mask.sum().clamp(min=1))
        parts = [mb for _, mb in self.micro_batches(minibatch)]
        count = self._max_over_processes(len(parts))
        # A rank with fewer micro-batches than another repeats its smallest with weight 0: same number of
        # forward/backward passes everywhere (the collectives in the backward must pair up), no effect.
        filler = min(parts, key=lambda mb: padded_tokens(mb.query_mask, mb.response_mask))
        stats = []
        for i in range(count):
            real = i < len(parts)
            last = i == count - 1
            with _nullcontext() if last else self.accelerator.no_sync(self.model):
                part = self.losses(
                    parts[i] if real else filler, tokens, weight=1.0 if real else 0.0, last=last
                )
            if real:
                stats.append(part)
        return {k: sum(p[k] for p in stats) for k in stats[0]}  # each part is its share of the mean

    def update(self, batch: Rollouts, step: int) -> dict:
        self.model.train()
        generator = torch.Generator().manual_seed(self.config.seed * 31 + step)
        stats: list[dict] = []
        n = batch.queries.shape[0]
        for _ in range(self.config.ppo_epochs):
            order = torch.randperm(n, generator=generator).to(batch.queries.device)
            for start in range(0, n, self.config.mini_batch_size):
                self.optimizer.zero_grad(set_to_none=True)
                stats.append(self.accumulate(batch.rows(order[start : start + self.config.mini_batch_size])))
                # Gradients are averaged over processes by now (DDP's hooks; DeepSpeed clips and steps itself).
                self.accelerator.clip_grad_norm_(self.ac.trainable_parameters(), self.config.max_grad_norm)
                self.optimizer.step()
        return {k: sum(s[k] for s in stats) / len(stats) for k in stats[0]}

    # 3. the loop
    def train(self, *, progress: bool = True) -> list[dict]:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=self.config.steps,
            initial=self.step,
            desc="ppo",
            disable=not progress or not self.accelerator.is_main_process,
        )
        while self.step < self.config.steps:
            step_start = time.perf_counter()
            self.largest_micro_batch = 0
            batch, rollout_stats = self.rollout(self.step)
            start = time.perf_counter()
            update_stats = self.update(batch, self.step)
            update_s = time.perf_counter() - start
            stats = {
                **rollout_stats,
                **update_stats,
                "update_s": update_s,
                "kl_coef": self.kl.value,
                "peak_rss_mb": peak_rss_mb(),
                "rss_mb": rss_mb(),
                "largest_micro_batch_tokens": self.largest_micro_batch,
            }
            stats = {k: self._mean_over_processes(v) for k, v in stats.items()}
            if self.config.adaptive_kl:
                self.kl.update(stats["kl"], self.config.batch_size)
            self.step += 1
            entry = {"step": self.step, **stats, "step_s": time.perf_counter() - step_start}
            self.history.append(entry)
            if self.on_step is not None and self.accelerator.is_main_process:
                self.on_step(entry)
            if (
                self.config.save_every
                and self.step % self.config.save_every == 0
                and self.step < self.config.steps
            ):
                self.save_checkpoint()
            bar.update(1)
            bar.set_postfix(score=f"{stats['raw_score']:.3f}", kl=f"{stats['kl']:.3f}")
        bar.close()
        self.replicas_in_sync = self._replicas_in_sync()
        return self.history

    def _replicas_in_sync(self) -> bool:
        """Every process must hold the same weights after training (gradients were averaged each step)."""
        if self.accelerator.num_processes == 1:
            return True
        total = torch.tensor(
            [sum(float(p.detach().double().sum()) for p in self.ac.trainable_parameters())],
            device=self.accelerator.device,
        )
        sums = self.accelerator.gather(total)
        return bool(torch.allclose(sums, sums[0].expand_as(sums), rtol=0, atol=1e-6))

    def _max_over_processes(self, value: int) -> int:
        if self.accelerator.num_processes == 1:
            return value
        return int(self.accelerator.gather(torch.tensor([value], device=self.accelerator.device)).max())

    def _mean_over_processes(self, value: float) -> float:
        if self.accelerator.num_processes == 1:
            return float(value)
        return self.accelerator.reduce(
            torch.tensor(float(value), device=self.accelerator.device), reduction="mean"
        ).item()

    # 4. checkpoints: everything that changes during training, so a resumed run continues bit for bit
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def save_checkpoint(self) -> Path | None:
        if self.run_dir is None or not self.accelerator.is_main_process:
            return None
        path = self.checkpoint_dir() / f"step-{self.step:06d}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {
            "step": self.step,
            "weights": self.ac.trainable_state(),
            "optimizer": self.optimizer.state_dict(),
            "kl_coef": self.kl.value,
            "history": self.history,
            "config": asdict(self.config),
        }
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(path)  # a crash mid-write never leaves a half checkpoint behind
        return path

    def latest_checkpoint(self) -> Path | None:
        found = sorted(self.checkpoint_dir().glob("step-*.pt")) if self.run_dir else []
        return found[-1] if found else None

    def load_checkpoint(self, path: Path) -> None:
        state = torch.load(path, map_location="cpu", weights_only=False)
        named = dict(self.ac.named_parameters())
        with torch.no_grad():
            for name, value in state["weights"].items():
                named[name].copy_(value)
        self.optimizer.load_state_dict(state["optimizer"])
        self.kl.value, self.step, self.history = state["kl_coef"], state["step"], state["history"]

    def save_policy(self, out: Path) -> None:
        """The policy alone: a LoRA adapter (value adapter and head left out) or the full model."""
        model = self.ac.model
        if self.config.method == "lora":
            model.save_pretrained(out, selected_adapters=["default"])
        else:
            model.save_pretrained(out)
        self.tokenizer.save_pretrained(out)
        (out / "alignloop_policy.json").write_text(
            json.dumps({"algo": "ppo", "config": asdict(self.config)}, indent=2)
        )
