"""RLAIF: an AI annotator that takes comparisons from the same queue and votes through the same code path.

A judge answers one question: of two responses to a conversation, which is better? Every pair is asked twice
with the positions swapped, and only a verdict that survives the swap counts; a disagreement is a tie. This is
the standard guard against the position bias LLM judges are known for (Zheng et al. 2023, "Judging
LLM-as-a-judge"). K > 2 responses are ranked by their wins over all pairs.

Principles: by default the judge weighs helpfulness, honesty and harmlessness. A constitution file (plain text
or markdown, one principle per line; `judge run --constitution FILE`) replaces them, in the spirit of
Constitutional AI (Bai et al. 2022): the principles are written into the judge's instructions, and the file's
SHA-256 goes into each vote's rationale so a verdict can be traced to the principles it applied.
Critique (`--critique`): the judge also writes a short critique of the replies against the principles; it
is stored as the vote's rationale, where people's rationales go. Critique-and-revise (`--revise`) asks for an
improved reply too; the revision is stored as chat feedback with an edited answer, which is what
`sft train --from-chat-edits` learns from.

Judges:
- `LocalJudge`: a causal LM from the registry; reads the next-token probabilities of "A" and "B" after the
  judging prompt (no sampling, so the verdict is deterministic).
- `OpenAIJudge`: any OpenAI-compatible chat endpoint the user configures (greedy, one letter).
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Protocol

import torch
from sqlmodel import Session

from alignloop.core import AlignloopError, crud
from alignloop.core.db import session_scope
from alignloop.core.models import ChatFeedback
from alignloop.core.sampling import render
from annotate import queue

log = logging.getLogger(__name__)

JUDGE_INSTRUCTIONS = (
    "You are an impartial judge. Read the conversation and the two candidate replies from the assistant. "
    "Decide which reply is better: more helpful, more honest and more harmless. Ignore the order in which "
    "they appear and their length. Answer with a single letter: A or B."
)


MAX_CONSTITUTION_CHARS = 8000


@dataclass
class Constitution:
    principles: list[str]
    sha256: str

    @classmethod
    def load(cls, path: str | Path) -> Constitution:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise AlignloopError(f"cannot read the constitution {path}: {exc}") from None
        principles = [line.strip().lstrip("-*0123456789.) ").strip() for line in text.splitlines()]
        principles = [p for p in principles if p and not p.startswith("#")]
        if not principles or len(text) > MAX_CONSTITUTION_CHARS:
            raise AlignloopError(
                f"{path}: a constitution is one principle per line, {MAX_CONSTITUTION_CHARS} characters at most"
            )
        return cls(principles=principles, sha256=hashlib.sha256(text.encode()).hexdigest())

    def instructions(self) -> str:
        listed = "\n".join(f"{i}. {p}" for i, p in enumerate(self.principles, 1))
        return (
            "You are an impartial judge. Read the conversation and the two candidate replies from the assistant. "
            f"Decide which reply better follows these principles:\n{listed}\nIgnore the order in which the replies "
            "appear and their length. Answer with a single letter: A or B."
        )


def critique_messages(
    prompt: Sequence[dict], replies: Sequence[str], instructions: str, *, revise: bool
) -> list[dict]:
    conversation = "\n".join(f"{m['role'].upper()}: {m['content']}" for m in prompt)
    shown = "\n\n".join(f"[Reply {queue.LABELS[i]}]\n{r}" for i, r in enumerate(replies))
    ask = "Critique the replies against the principles in two or three sentences." + (
        " Then write 'Revision:' and a better reply to the conversation." if revise else ""
    )
    return [
        {"role": "system", "content": instructions.rsplit("Answer with", 1)[0].strip()},
        {"role": "user", "content": f"[Conversation]\n{conversation}\n\n{shown}\n\n{ask}"},
    ]


def split_revision(text: str) -> tuple[str, str | None]:
    critique, marker, revision = text.partition("Revision:")
    return critique.strip(), (revision.strip() or None) if marker else None


def judge_messages(
    prompt: Sequence[dict], first: str, second: str, instructions: str = JUDGE_INSTRUCTIONS
) -> list[dict]:
    conversation = "\n".join(f"{m['role'].upper()}: {m['content']}" for m in prompt)
    body = f"[Conversation]\n{conversation}\n\n[Reply A]\n{first}\n\n[Reply B]\n{second}\n\nWhich reply is better, A or B?"
    return [{"role": "system", "content": instructions}, {"role": "user", "content": body}]


class Judge(Protocol):
    def prefer_first(self, prompt: Sequence[dict], first: str, second: str) -> float:
        """Probability that `first` is the better reply."""

    def critique(self, prompt: Sequence[dict], replies: Sequence[str], *, revise: bool = False) -> str:
        """A short written critique of the replies (with `revise`: then "Revision:" and a better reply)."""


class LocalJudge:
    def __init__(
        self, model, tokenizer, instructions: str = JUDGE_INSTRUCTIONS, max_critique_tokens: int = 96
    ):
        self.model, self.tokenizer, self.instructions = model, tokenizer, instructions
        self.max_critique_tokens = max_critique_tokens
        self.letter_ids = [self._letter_id("A"), self._letter_id("B")]

    def _letter_id(self, letter: str) -> int:
        ids = self.tokenizer(letter, add_special_tokens=False)["input_ids"]
        if not ids:
            raise AlignloopError(f"the judge's tokenizer cannot encode {letter!r}")
        return ids[0]

    @torch.inference_mode()
    def prefer_first(self, prompt: Sequence[dict], first: str, second: str) -> float:
        device = next(self.model.parameters()).device  # the judge may sit on a GPU: the ids go there too
        ids = torch.tensor(
            [render(self.tokenizer, judge_messages(prompt, first, second, self.instructions))], device=device
        )
        logits = self.model(input_ids=ids).logits[0, -1, self.letter_ids]  # (2,) logits of "A", "B"
        return torch.softmax(logits.float(), dim=-1)[0].item()

    def critique(self, prompt: Sequence[dict], replies: Sequence[str], *, revise: bool = False) -> str:
        from alignloop.core.sampling import SamplingParams, generate

        messages = critique_messages(prompt, replies, self.instructions, revise=revise)
        params = SamplingParams(max_new_tokens=self.max_critique_tokens * (2 if revise else 1), temperature=0)
        (completion,) = generate(self.model, self.tokenizer, [messages], params=params, progress=False)[0]
        return completion.text.strip()


class OpenAIJudge:
    def __init__(
        self,
        *,
        base_url: str,
        model: str,
        api_key: str | None = None,
        timeout: float = 60,
        instructions: str = JUDGE_INSTRUCTIONS,
    ):
        from openai import OpenAI

        self.client = OpenAI(base_url=base_url, api_key=api_key or "none", timeout=timeout, max_retries=2)
        self.model, self.instructions = model, instructions

    def critique(self, prompt: Sequence[dict], replies: Sequence[str], *, revise: bool = False) -> str:
        from openai import OpenAIError

        try:
            reply = self.client.chat.completions.create(
                model=self.model,
                temperature=0,
                max_tokens=512 if revise else 200,
                messages=critique_messages(prompt, replies, self.instructions, revise=revise),
            )
        except OpenAIError as exc:
            raise AlignloopError(f"the judge endpoint failed: {exc}") from None
        return (reply.choices[0].message.content or "").strip()

    def prefer_first(self, prompt: Sequence[dict], first: str, second: str) -> float:
        from openai import OpenAIError

        try:
            reply = self.client.chat.completions.create(
                model=self.model,
                messages=judge_messages(prompt, first, second, self.instructions),
                temperature=0,
                max_tokens=5,
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
    engine,
    *,
    judge: Judge,
    user_name: str = "ai-judge",
    max_items: int | None = None,
    progress: bool = True,
    gold_share: float = queue.GOLD_SHARE,
    round: int | None = None,
    critique: bool = False,
    revise: bool = False,
    constitution: Constitution | None = None,
) -> dict:
    """Vote as the AI user on comparisons with a free AI slot (its own, never a person's) and on its share
    of gold items, until nothing is left for it (or `max_items`)."""
    from tqdm.auto import tqdm

    with session_scope(engine) as session:
        user_id = ensure_judge_user(session, name=user_name)
    counts = {"votes": 0, "a": 0, "b": 0, "tie": 0, "both_bad": 0, "ranked": 0, "lost": 0, "revisions": 0}
    bar = tqdm(total=max_items, desc="judging", unit="item", disable=not progress)
    while max_items is None or counts["votes"] < max_items:
        with session_scope(engine) as session:
            item = queue.next_ai_item(session, user_id=user_id, gold_share=gold_share, round=round)
        if item is None:
            break
        choice, ranking = decide(judge, item.prompt, item.responses)  # outside any transaction: model time
        rationale = "AI judge (position-swapped)"
        if constitution is not None:
            rationale += f"; constitution sha256 {constitution.sha256[:12]}"
        revision = None
        if critique or revise:
            written, revision = split_revision(judge.critique(item.prompt, item.responses, revise=revise))
            rationale = (rationale + f". Critique: {written}")[:4800]
        try:
            with session_scope(engine) as session:
                queue.submit_vote(
                    session,
                    user_id=user_id,
                    comparison_id=item.comparison_id,
                    choice=choice,
                    ranking_labels=ranking,
                    rationale=rationale,
                )
                if revise and revision:
                    # The revision improves on the reply the judge preferred (the first shown on a tie).
                    best = queue.LABELS.index(ranking[0]) if ranking else int(choice == "b")
                    session.add(
                        ChatFeedback(
                            user_id=user_id,
                            messages=item.prompt,
                            response=item.responses[best],
                            edited=revision,
                        )
                    )
                    counts["revisions"] += 1
        except (crud.ComparisonClosedError, crud.DuplicateVoteError):
            counts["lost"] += 1  # another judge filled the slot while this one was thinking
            continue
        counts["votes"] += 1
        counts[choice or "ranked"] += 1
        bar.update(1)
    bar.close()
    return counts
