"""Instruction data for SFT, from files and from the workspace, as TRL prompt/completion conversations.

Every example becomes {"prompt": [chat messages], "completion": [{"role": "assistant", ...}]}: TRL then
renders it with the model's chat template and puts the loss on the completion tokens only.

File formats (JSON Lines, or a .json array), detected per record:
- dolly-15k: {"instruction", "context", "response", "category"}; the context joins the user turn;
- alpaca: {"instruction", "input", "output"};
- chat: {"messages": [...]} ending with the assistant's turn, which is the completion.
Workspace sources: the chosen response of every aggregated preference pair ("SFT on chosen"), and the
better answers reviewers wrote in the chat (`ChatFeedback.edited`).
A file with any malformed record raises ImportFileError (file, line, reason) before anything is trained.
"""

from __future__ import annotations

import hashlib
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from sqlmodel import Session, col, select

from alignloop.core import crud
from alignloop.core.models import ChatFeedback
from alignloop.core.prompts import ImportFileError, RecordError, _messages, _text, read_json_records


@dataclass
class Example:
    prompt: list[dict]
    completion: str
    category: str = "general"

    def row(self) -> dict:
        return {"prompt": self.prompt, "completion": [{"role": "assistant", "content": self.completion}]}


def to_example(record: object) -> Example:
    if not isinstance(record, dict):
        raise RecordError(f"expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or len(messages) < 2:
            raise RecordError("'messages' must hold the conversation and end with the assistant's reply")
        last = messages[-1]
        if (
            not isinstance(last, dict)
            or last.get("role") != "assistant"
            or not str(last.get("content", "")).strip()
        ):
            raise RecordError(
                "the last message must be the assistant's (non-empty) reply: it is what is learned"
            )
        return Example(prompt=_messages(messages[:-1]), completion=str(last["content"]).strip(),
                       category=str(record.get("category") or "chat"))  # fmt: skip
    if "instruction" in record:
        instruction = _text(record, "instruction")
        if "response" not in record and "output" not in record:
            raise RecordError("missing field 'response' (dolly) or 'output' (alpaca): the answer to learn")
        dolly = "response" in record or "context" in record
        extra = _text(record, "context" if dolly else "input", required=False)
        completion = _text(record, "response" if dolly else "output")
        user = f"{instruction}\n\n{extra}" if extra else instruction
        return Example(prompt=[{"role": "user", "content": user}], completion=completion,
                       category=str(record.get("category") or ("general" if dolly else "alpaca")))  # fmt: skip
    raise RecordError(
        f"no instruction data: expected 'instruction' (dolly/alpaca) or 'messages' (found {sorted(record)})"
    )


def parse_instruction_file(path: str | Path) -> list[Example]:
    path = Path(path)
    records = read_json_records(path)
    examples, errors = [], []
    for number, record in records:
        try:
            if isinstance(record, RecordError):
                raise record
            examples.append(to_example(record))
        except RecordError as exc:
            errors.append((number, str(exc)))
    if errors:
        raise ImportFileError(path, errors)
    if not examples:
        raise ImportFileError(path, [(0, "no examples in file")])
    return examples


def chosen_examples(session: Session, *, rounds: list[int] | None = None) -> list[Example]:
    """SFT on chosen: the preferred response of every aggregated preference pair (one per prompt)."""
    seen, out = set(), []
    for pair in crud.preference_pairs(session, rounds=rounds):
        key = (crud.prompt_hash(pair["prompt"]), pair["chosen"][0]["content"])
        if key not in seen:
            seen.add(key)
            out.append(
                Example(prompt=pair["prompt"], completion=pair["chosen"][0]["content"], category="chosen")
            )
    return out


def edited_examples(session: Session) -> list[Example]:
    """The better answers reviewers wrote for chat replies."""
    rows = session.exec(select(ChatFeedback).where(col(ChatFeedback.edited).is_not(None))).all()
    return [
        Example(prompt=r.messages, completion=r.edited.strip(), category="chat-edit")
        for r in rows
        if r.edited.strip()
    ]


def split_held_out(
    examples: list[Example], *, fraction: float, seed: int = 0
) -> tuple[list[Example], list[Example]]:
    """Hold out `fraction` of each category, by prompt, so no prompt is in both splits."""
    by_prompt: dict[str, list[Example]] = defaultdict(list)
    for e in examples:
        by_prompt[crud.prompt_hash(e.prompt)].append(e)
    by_category: dict[str, list[str]] = defaultdict(list)
    for key, group in by_prompt.items():
        by_category[group[0].category].append(key)
    held: set[str] = set()
    for keys in by_category.values():
        keys.sort(key=lambda k: hashlib.sha256(f"{seed}:{k}".encode()).hexdigest())
        count = round(len(keys) * fraction)
        if fraction > 0 and len(keys) >= 2:
            count = max(1, min(count, len(keys) - 1))
        held.update(keys[:count])
    train = [e for k, group in by_prompt.items() if k not in held for e in group]
    held_out = [e for k, group in by_prompt.items() if k in held for e in group]
    random.Random(seed).shuffle(train)
    return train, held_out
