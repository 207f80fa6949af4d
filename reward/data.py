"""Preference pairs for reward training: from the workspace's votes and from preference files, split by prompt,
then encoded for the reward model's tokenizer with the prompt truncated from the left.

A pair's `weight` (optional) is the mean gold accuracy of the annotators who voted on it (1.0 for annotators
with no gold record), so careless annotators count for less. Its `margin` (optional, TRL's margin column) grows
with how strongly the voters agreed: 0 for a bare majority, `margin_scale` for a unanimous verdict.

Truncation never drops a pair and never drops the response: the prompt loses its oldest tokens first; a
response that alone would not fit keeps its head and is counted. Every cut is counted in `EncodeReport`.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from sqlmodel import Session, col, select

from alignloop.core import crud
from alignloop.core.models import Comparison, Vote


@dataclass
class Pair:
    prompt: list[dict]
    chosen: str
    rejected: str
    source: str  # "queue" | "arena" | "import" for workspace votes, else the file's name
    round: int | None = None
    comparison_id: int | None = None
    agreement: float = 1.0
    weight: float = 1.0
    margin: float = 0.0

    @property
    def key(self) -> str:
        return crud.prompt_hash(self.prompt)


def workspace_pairs(
    session: Session,
    *,
    rounds: list[int] | None = None,
    gold_weights: bool = False,
    margin_scale: float = 0.0,
) -> list[Pair]:
    """The workspace's aggregated votes (as in `alignloop export prefs`), as pairs."""
    rows = crud.preference_pairs(session, rounds=rounds)
    ids = [r["comparison_id"] for r in rows]
    sources = dict(
        session.exec(select(Comparison.id, Comparison.source).where(col(Comparison.id).in_(ids))).all()
    )
    weights = _gold_weights(session, ids) if gold_weights else {}
    return [
        Pair(
            prompt=r["prompt"],
            chosen=r["chosen"][-1]["content"],
            rejected=r["rejected"][-1]["content"],
            source=sources.get(r["comparison_id"], "queue"),
            round=r["round"],
            comparison_id=r["comparison_id"],
            agreement=r["agreement"],
            weight=weights.get(r["comparison_id"], 1.0),
            margin=margin_scale * max(0.0, 2 * r["agreement"] - 1),
        )
        for r in rows
    ]


def _gold_weights(session: Session, comparison_ids: list[int]) -> dict[int, float]:
    from annotate.quality import quality_report

    accuracy = {a.user_id: a.gold_accuracy for a in quality_report(session).annotators}
    voters: dict[int, list[int]] = defaultdict(list)
    for comparison_id, user_id in session.exec(
        select(Vote.comparison_id, Vote.user_id).where(col(Vote.comparison_id).in_(comparison_ids))
    ).all():
        voters[comparison_id].append(user_id)
    return {
        cid: sum(1.0 if accuracy.get(u) is None else accuracy[u] for u in users) / len(users)
        for cid, users in voters.items()
    }


def file_pairs(path: str | Path) -> tuple[list[Pair], list[tuple[int, str]]]:
    """A preference file (HH-RLHF text or TRL prompt/chosen/rejected), read without importing it."""
    from annotate.io import parse_preference_file

    parsed, skipped = parse_preference_file(path)
    name = Path(path).name
    return [Pair(prompt=p.prompt, chosen=p.chosen, rejected=p.rejected, source=name) for p in parsed], skipped


def split_by_prompt(
    pairs: list[Pair], *, held_out: float | int, seed: int = 0
) -> tuple[list[Pair], list[Pair]]:
    """Hold out a share (a float < 1) or a number (an int) of prompts; no prompt lands in both splits."""
    keys = sorted({p.key for p in pairs}, key=lambda k: hashlib.sha256(f"{seed}:{k}".encode()).hexdigest())
    count = held_out if isinstance(held_out, int) else round(len(keys) * held_out)
    if held_out and len(keys) >= 2:
        count = max(1, min(count, len(keys) - 1))
    held = set(keys[:count])
    train = [p for p in pairs if p.key not in held]
    random.Random(seed).shuffle(train)
    return train, [p for p in pairs if p.key in held]


def fold_by_prompt(
    pairs: list[Pair], *, fold: int, folds: int, seed: int = 0
) -> tuple[list[Pair], list[Pair]]:
    """Cross-validation by prompt: hold out fold `fold` (1-based) of `folds`. Prompts are dealt round-robin in
    a seeded hash order, so the folds partition the prompts and their sizes differ by at most one prompt."""
    if not 1 <= fold <= folds or folds < 2:
        raise ValueError(f"fold must be 1..{folds} of at least 2 folds, not {fold}/{folds}")
    keys = sorted({p.key for p in pairs}, key=lambda k: hashlib.sha256(f"{seed}:{k}".encode()).hexdigest())
    held = set(keys[fold - 1 :: folds])
    train = [p for p in pairs if p.key not in held]
    random.Random(seed).shuffle(train)
    return train, [p for p in pairs if p.key in held]


# --- encoding ------------------------------------------------------------------------------------------------


@dataclass
class EncodeReport:
    pairs: int = 0
    prompt_truncated: int = 0  # pairs whose prompt lost its oldest tokens
    response_truncated: int = 0  # pairs where a response alone exceeded the budget and kept its head
    identical_after_truncation: int = 0  # kept, but the two sides encode identically (no signal)
    by_source: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict:
        return {
            "pairs": self.pairs,
            "prompt_truncated": self.prompt_truncated,
            "response_truncated": self.response_truncated,
            "dropped": 0,
            "identical_after_truncation": self.identical_after_truncation,
            "by_source": dict(self.by_source),
        }


class RewardFormat:
    """How a (prompt, response) becomes token ids for one reward model's tokenizer.

    A tokenizer with a chat template renders the conversation with it (the policy's own format); one without
    (a sentence encoder such as MiniLM) gets `[CLS] user: ... assistant: ... [SEP] response [SEP]`.
    """

    MIN_PROMPT_TOKENS = 16  # a response never squeezes the prompt below this

    def __init__(self, tokenizer, max_length: int):
        self.tokenizer, self.max_length = tokenizer, max_length
        self.chat = bool(getattr(tokenizer, "chat_template", None))

    def prompt_ids(self, prompt: list[dict]) -> list[int]:
        if self.chat:
            return list(
                self.tokenizer.apply_chat_template(
                    prompt, add_generation_prompt=True, tokenize=True, return_dict=False
                )
            )
        text = "\n".join(f"{m['role']}: {m['content']}" for m in prompt) + "\nassistant:"
        return self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]

    def response_ids(self, prompt: list[dict], prompt_ids: list[int], response: str) -> list[int]:
        if self.chat:
            full = self.tokenizer.apply_chat_template(
                prompt + [{"role": "assistant", "content": response}], tokenize=True, return_dict=False
            )
            if list(full[: len(prompt_ids)]) == prompt_ids:
                return list(full[len(prompt_ids) :])
            eos = self.tokenizer.eos_token or ""
            return self.tokenizer(response + eos, add_special_tokens=False, verbose=False)["input_ids"]
        return self.tokenizer(response, add_special_tokens=False, verbose=False)["input_ids"]

    def _frame(self) -> tuple[list[int], list[int], list[int]]:
        """Special tokens around (prompt, response): BERT-style encoders need [CLS] p [SEP] r [SEP]."""
        t = self.tokenizer
        if self.chat or t.cls_token_id is None or t.sep_token_id is None:
            return [], [], []
        return [t.cls_token_id], [t.sep_token_id], [t.sep_token_id]

    def join(self, prompt_ids: list[int], response_ids: list[int]) -> tuple[list[int], bool, bool]:
        """(ids, prompt_truncated, response_truncated) within max_length."""
        head, mid, tail = self._frame()
        budget = self.max_length - len(head) - len(mid) - len(tail)
        response_budget = budget - min(len(prompt_ids), self.MIN_PROMPT_TOKENS)
        response_cut = len(response_ids) > response_budget
        if response_cut:
            response_ids = response_ids[:response_budget]
        prompt_room = budget - len(response_ids)
        prompt_cut = len(prompt_ids) > prompt_room
        if prompt_cut:
            prompt_ids = prompt_ids[len(prompt_ids) - prompt_room :]
        return head + prompt_ids + mid + response_ids + tail, prompt_cut, response_cut

    def encode(self, prompt: list[dict], response: str) -> list[int]:
        ids = self.prompt_ids(prompt)
        return self.join(ids, self.response_ids(prompt, ids, response))[0]

    def encode_pairs(self, pairs: list[Pair]) -> tuple[list[dict], EncodeReport]:
        """Rows with `chosen_ids`, `rejected_ids`, `length`, `margin`, `weight` (TRL's processed layout)."""
        report, rows = EncodeReport(), []
        for pair in pairs:
            prompt_ids = self.prompt_ids(pair.prompt)
            chosen, c_prompt_cut, c_resp_cut = self.join(
                prompt_ids, self.response_ids(pair.prompt, prompt_ids, pair.chosen)
            )
            rejected, r_prompt_cut, r_resp_cut = self.join(
                prompt_ids, self.response_ids(pair.prompt, prompt_ids, pair.rejected)
            )
            report.pairs += 1
            report.by_source[pair.source] += 1
            report.prompt_truncated += c_prompt_cut or r_prompt_cut
            report.response_truncated += c_resp_cut or r_resp_cut
            report.identical_after_truncation += chosen == rejected
            rows.append(
                {
                    "chosen_ids": chosen,
                    "rejected_ids": rejected,
                    "length": max(len(chosen), len(rejected)),
                    "margin": pair.margin,
                    "weight": pair.weight,
                }
            )
        return rows, report
