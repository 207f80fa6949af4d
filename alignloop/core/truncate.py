"""Prompts cut to a token budget, keeping what the answer responds to: the latest turns.

Used wherever a conversation must fit a model's window before an answer is generated or learned: RL rollouts
(`rl.budget`, `max_prompt_length`) and instruction tuning (`sft.train`, where the prompt gives way to the
completion so the answer being learned is kept whole).

- `fit_prompt`: a prompt that renders to more than `max_length` tokens loses its oldest turns first; a system
  message is kept while anything else can go instead; if the last turn alone is still too long, that turn keeps
  its *latest* tokens. The chat format is kept (the cut is made on the messages, then re-rendered), so the
  model still sees a well-formed conversation. Every cut is counted in `PromptReport`, as reward training
  counts its cuts in `reward.data.EncodeReport`.

Invariants: `fit_prompt` never drops the last message and never returns more than `max_length` tokens when
rendered (a prompt whose chat frame alone is longer raises).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

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


def fit_prompts(tokenizer, prompts: Sequence[Sequence[dict]], max_length: int | None | Sequence[int]):
    """Every prompt fitted to `max_length` (None: unchanged, only measured; a sequence: one limit per prompt),
    with the report of the cuts."""
    limits = [max_length] * len(prompts) if max_length is None or isinstance(max_length, int) else max_length
    report, out = PromptReport(), []
    for prompt, max_length in zip(prompts, limits, strict=True):
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
