"""RLAIF: an AI annotator that takes comparisons from the same queue and votes through the same code path.

A judge answers one question: of two responses to a conversation, which is better? Every pair is asked twice
with the positions swapped, and only a verdict that survives the swap counts; a disagreement is a tie. This is
the standard guard against the position bias LLM judges are known for (Zheng et al. 2023, "Judging
LLM-as-a-judge"). K > 2 responses are ranked by their wins over all pairs.

Judges:
- `LocalJudge`: a causal LM from the registry; reads the next-token probabilities of "A" and "B" after the
  judging prompt (no sampling, so the verdict is deterministic).
- `OpenAIJudge`: any OpenAI-compatible chat endpoint the user configures (greedy, one letter).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from itertools import combinations
from typing import Protocol

import torch
from sqlmodel import Session

from alignloop.core import AlignloopError, crud
from alignloop.core.db import session_scope
from alignloop.core.sampling import render
from annotate import queue

log = logging.getLogger(__name__)

JUDGE_INSTRUCTIONS = (
    "You are an impartial judge. Read the conversation and the two candidate replies from the assistant. "
    "Decide which reply is better: more helpful, more honest and more harmless. Ignore the order in which "
    "they appear and their length. Answer with a single letter: A or B."
)


def judge_messages(prompt: Sequence[dict], first: str, second: str) -> list[dict]:
    conversation = "\n".join(f"{m['role'].upper()}: {m['content']}" for m in prompt)
    body = f"[Conversation]\n{conversation}\n\n[Reply A]\n{first}\n\n[Reply B]\n{second}\n\nWhich reply is better, A or B?"
    return [{"role": "system", "content": JUDGE_INSTRUCTIONS}, {"role": "user", "content": body}]


class Judge(Protocol):
    def prefer_first(self, prompt: Sequence[dict], first: str, second: str) -> float:
        """Probability that `first` is the better reply."""


class LocalJudge:
    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.letter_ids = [self._letter_id("A"), self._letter_id("B")]

    def _letter_id(self, letter: str) -> int:
        ids = self.tokenizer(letter, add_special_tokens=False)["input_ids"]
        if not ids:
            raise AlignloopError(f"the judge's tokenizer cannot encode {letter!r}")
        return ids[0]

    @torch.inference_mode()
    def prefer_first(self, prompt: Sequence[dict], first: str, second: str) -> float:
        ids = torch.tensor([render(self.tokenizer, judge_messages(prompt, first, second))])
        logits = self.model(input_ids=ids).logits[0, -1, self.letter_ids]  # (2,) logits of "A", "B"
        return torch.softmax(logits.float(), dim=-1)[0].item()


class OpenAIJudge:
    def __init__(self, *, base_url: str, model: str, api_key: str | None = None, timeout: float = 60):
        from openai import OpenAI

        self.client = OpenAI(base_url=base_url, api_key=api_key or "none", timeout=timeout, max_retries=2)
        self.model = model

    def prefer_first(self, prompt: Sequence[dict], first: str, second: str) -> float:
        from openai import OpenAIError

        try:
            reply = self.client.chat.completions.create(
                model=self.model, messages=judge_messages(prompt, first, second), temperature=0, max_tokens=5
            )
        except OpenAIError as exc:
            raise AlignloopError(f"the judge endpoint failed: {exc}") from None
        answer = (reply.choices[0].message.content or "").strip().upper()
        letter = re.search(r"\b([AB])\b", answer)
        return {"A": 1.0, "B": 0.0}.get(letter.group(1) if letter else "", 0.5)


def verdict(judge: Judge, prompt: Sequence[dict], i: str, j: str) -> int:
    """+1 if `i` beats `j` in both orders, -1 if `j` does, 0 if the order decided it (a tie)."""
    first_order = judge.prefer_first(prompt, i, j) > 0.5
    swapped_order = judge.prefer_first(prompt, j, i) < 0.5
    if first_order == swapped_order:
        return 1 if first_order else -1
    return 0


def decide(
    judge: Judge, prompt: Sequence[dict], responses: Sequence[str]
) -> tuple[str | None, list[str] | None]:
    """(choice, ranking_labels) in the terms the responses were given (A = first)."""
    if len(responses) == 2:
        return {1: "a", -1: "b", 0: "tie"}[verdict(judge, prompt, responses[0], responses[1])], None
    wins = [0.0] * len(responses)
    for i, j in combinations(range(len(responses)), 2):
        v = verdict(judge, prompt, responses[i], responses[j])
        wins[i] += (v + 1) / 2
        wins[j] += (1 - v) / 2
    order = sorted(range(len(responses)), key=lambda k: (-wins[k], k))
    return None, [queue.LABELS[k] for k in order]


def ensure_judge_user(session: Session, *, name: str) -> int:
    user = crud.get_user(session, name=name)
    if user is None:
        user = crud.create_user(session, name=name, role="annotator", kind="ai")
    elif user.kind != "ai":
        raise AlignloopError(f"user {name!r} is a human annotator; give the AI judge its own user")
    if user.disabled:
        raise AlignloopError(f"judge user {name!r} is disabled")
    return user.id


def run_judge(
    engine, *, judge: Judge, user_name: str = "ai-judge", max_items: int | None = None, progress: bool = True
) -> dict:
    """Vote on queued comparisons as the AI user until the queue has nothing left for it (or `max_items`)."""
    from tqdm.auto import tqdm

    with session_scope(engine) as session:
        user_id = ensure_judge_user(session, name=user_name)
    counts = {"votes": 0, "a": 0, "b": 0, "tie": 0, "ranked": 0, "lost": 0}
    bar = tqdm(total=max_items, desc="judging", unit="item", disable=not progress)
    while max_items is None or counts["votes"] < max_items:
        with session_scope(engine) as session:
            item = queue.next_item(session, user_id=user_id, gold_share=0)
        if item is None:
            break
        choice, ranking = decide(judge, item.prompt, item.responses)  # outside any transaction: model time
        try:
            with session_scope(engine) as session:
                queue.submit_vote(
                    session, user_id=user_id, comparison_id=item.comparison_id, choice=choice, ranking_labels=ranking,
                    rationale="AI judge (position-swapped)",
                )  # fmt: skip
        except (crud.ComparisonClosedError, crud.DuplicateVoteError):
            counts["lost"] += 1  # a human finished it while the judge was thinking
            continue
        counts["votes"] += 1
        counts[choice or "ranked"] += 1
        bar.update(1)
    bar.close()
    return counts
