"""Memory bounds for RL: prompts cut to `max_prompt_length`, micro-batches cut to a token budget, RSS measured.

Why: a PPO step's memory is set by its widest forward pass with a graph (activations kept for the backward
pass grow with rows x padded tokens), and on real conversations (HH: p50 91 prompt tokens, max 830) one long
prompt in a minibatch pads every row to its length. Two bounds make the peak independent of the data:
- `fit_prompt`: a prompt that renders to more than `max_prompt_length` tokens loses its oldest turns first
  (the latest turns are what the response answers); if the last turn alone is still too long, that turn keeps
  its *latest* tokens. The chat format is kept (the cut is made on the messages, then re-rendered), so the
  policy still sees a well-formed conversation. Every cut is counted in `PromptReport`, as reward training
  counts its cuts in `reward.data.EncodeReport`.
- `plan_micro_batches`: a minibatch's rows are grouped, longest first, into micro-batches whose *padded* size
  (rows x (query width + response width) after trimming the padding no row in the group needs) never exceeds
  `micro_batch_tokens`; gradients accumulate over them, weighted so the sum equals the full minibatch's
  gradient (see `rl.ppo.PPOTrainer.losses`). With prompts capped, every row fits the budget, so the activations
  of any forward pass are bounded by the budget whatever the prompt lengths.

Invariants: `fit_prompt` never drops the last message and never returns more than `max_length` tokens when
rendered (a prompt whose chat frame alone is longer raises); every micro-batch holds at least one row and,
when each row alone fits, at most `budget` padded tokens; the micro-batches of a minibatch partition its rows.
"""

from __future__ import annotations

import resource
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from alignloop.core import AlignloopError
from alignloop.core.sampling import render


@dataclass
class PromptReport:
    prompts: int = 0
    truncated: int = 0  # prompts that lost anything
    turns_dropped: int = 0  # whole oldest messages dropped, over all prompts
    turn_cut: int = 0  # prompts whose last remaining turn kept only its latest tokens
    longest_before: int = 0  # rendered tokens of the longest prompt before truncation
    lengths: list[int] = field(default_factory=list, repr=False)  # rendered tokens after truncation

    def as_dict(self) -> dict:
        return {
            "prompts": self.prompts,
            "truncated": self.truncated,
            "turns_dropped": self.turns_dropped,
            "turn_cut": self.turn_cut,
            "longest_before": self.longest_before,
            "longest_after": max(self.lengths, default=0),
        }


def fit_prompt(tokenizer, messages: Sequence[dict], max_length: int) -> tuple[list[dict], int, bool, int]:
    """(messages, turns dropped, last turn cut, rendered length before) with the rendering <= max_length."""
    messages = [dict(m) for m in messages]
    before = len(render(tokenizer, messages))
    if before <= max_length:
        return messages, 0, False, before
    dropped = 0
    # A system message states the rules of the conversation: kept while anything else can go instead.
    system = messages[:1] if messages and messages[0].get("role") == "system" and len(messages) > 1 else []
    rest = messages[len(system) :]
    while len(rest) > 1 and len(render(tokenizer, system + rest)) > max_length:
        rest, dropped = rest[1:], dropped + 1
    if len(render(tokenizer, system + rest)) > max_length and system:
        system, dropped = [], dropped + 1
    messages = system + rest
    length = len(render(tokenizer, messages))
    if length <= max_length:
        return messages, dropped, False, before
    # The last turn alone is too long: keep its latest tokens. Re-encoding decoded text can shift a token or
    # two at the cut, so shrink until the rendering fits.
    content = tokenizer(messages[-1]["content"], add_special_tokens=False)["input_ids"]
    keep = len(content) - (length - max_length)
    while keep > 0:
        messages[-1]["content"] = tokenizer.decode(content[len(content) - keep :], skip_special_tokens=True)
        length = len(render(tokenizer, messages))
        if length <= max_length:
            return messages, dropped, True, before
        keep -= max(1, length - max_length)
    raise AlignloopError(
        f"max_prompt_length {max_length} is shorter than the chat template's own frame; raise it"
    )


def fit_prompts(tokenizer, prompts: Sequence[Sequence[dict]], max_length: int | None):
    """Every prompt fitted to `max_length` (None: unchanged, only measured), with the report of the cuts."""
    report, out = PromptReport(), []
    for prompt in prompts:
        if max_length is None:
            fitted, dropped, cut, before = list(prompt), 0, False, len(render(tokenizer, prompt))
        else:
            fitted, dropped, cut, before = fit_prompt(tokenizer, prompt, max_length)
        report.prompts += 1
        report.truncated += bool(dropped or cut)
        report.turns_dropped += dropped
        report.turn_cut += cut
        report.longest_before = max(report.longest_before, before)
        report.lengths.append(len(render(tokenizer, fitted)) if dropped or cut else before)
        out.append(fitted)
    return out, report


def row_lengths(query_mask: torch.Tensor, response_mask: torch.Tensor) -> list[tuple[int, int]]:
    return list(zip(query_mask.sum(1).tolist(), response_mask.sum(1).tolist(), strict=True))


def plan_micro_batches(lengths: Sequence[tuple[int, int]], budget: int | None) -> list[list[int]]:
    """Row indices grouped so each group's padded size, rows x (max query + max response), is <= budget.

    Longest rows first, so rows of similar length share a group (less padding). A row longer than the budget
    on its own gets a group of one (the caller prevents that by capping prompts)."""
    order = sorted(range(len(lengths)), key=lambda i: (-(lengths[i][0] + lengths[i][1]), i))
    if budget is None:
        return [order] if order else []
    groups, current, width_q, width_r = [], [], 0, 0
    for i in order:
        q, r = max(width_q, lengths[i][0]), max(width_r, lengths[i][1])
        if current and (len(current) + 1) * (q + r) > budget:
            groups.append(current)
            current, q, r = [], lengths[i][0], lengths[i][1]
        current.append(i)
        width_q, width_r = q, r
    if current:
        groups.append(current)
    return groups


def padded_tokens(query_mask: torch.Tensor, response_mask: torch.Tensor) -> int:
    """What a forward pass over these rows really processes: rows x (query width + response width)."""
    return query_mask.shape[0] * (query_mask.shape[1] + response_mask.shape[1])


def peak_rss_mb() -> float:
    """The process's peak resident memory so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    """The process's resident memory now."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * resource.getpagesize() / 2**20
    except OSError:
        return peak_rss_mb()
