"""Import external preference data as voted comparisons, so reward training sees it beside the team's votes.

Formats, detected per record:
- HH-RLHF: {"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": "..."}; the two conversations share
  everything up to the final Assistant turn, which is split off as the response;
- TRL, explicit prompt: {"prompt", "chosen", "rejected"}, each a string or a list of chat messages;
- TRL, implicit prompt: {"chosen", "rejected"} as full conversations (lists of messages) sharing a prefix.

Malformed records (bad JSON, missing or wrongly typed fields) stop the import: nothing is written and every
bad line is reported. Well-formed pairs that carry no preference (identical responses, conversations whose
prompts differ, an empty response) are skipped, counted and reported by line.

Each imported pair becomes a prompt, two generations, a finished comparison (source `import`) and one vote
by the disabled user `import` (it cannot log in). The chosen response goes to a random side, so imported
data carries no position artefact. Importing the same pair twice adds nothing.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from sqlmodel import Session, select

from alignloop.core import AlignloopError, crud
from alignloop.core.models import Comparison, Prompt
from alignloop.core.prompts import ImportFileError, RecordError, read_json_records

IMPORT_USER = "import"
HH_TURN = re.compile(r"\n\n(Human|Assistant): ?")


class SkipPair(ValueError):
    """A well-formed record that holds no usable preference."""


@dataclass
class PreferencePair:
    line: int
    prompt: list[dict]
    chosen: str
    rejected: str


@dataclass
class ImportReport:
    added: int = 0
    duplicates: int = 0
    skipped: list[tuple[int, str]] = field(default_factory=list)

    def summary(self) -> str:
        reasons = Counter(reason for _, reason in self.skipped)
        detail = "; ".join(f"{n} {reason}" for reason, n in reasons.most_common())
        return (
            f"imported {self.added} pairs, {self.duplicates} already present, {len(self.skipped)} skipped"
            + (f" ({detail})" if detail else "")
        )


def parse_hh(text: str) -> list[dict]:
    """'\\n\\nHuman: hi\\n\\nAssistant: hello' -> [{"role": "user", ...}, {"role": "assistant", ...}]."""
    parts = HH_TURN.split(text)
    if parts[0].strip():
        raise ValueError("text before the first 'Human:' turn")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[parts[i]], "content": parts[i + 1].strip()} for i in range(1, len(parts) - 1, 2)]


def _messages(value, name: str) -> list[dict]:
    if isinstance(value, str):
        return (
            [{"role": "user", "content": value}]
            if name == "prompt"
            else [{"role": "assistant", "content": value}]
        )
    if not isinstance(value, list) or not value:
        raise AlignloopError(f"'{name}' must be a string or a non-empty list of messages")
    for m in value:
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("role"), str)
            or not isinstance(m.get("content"), str)
        ):
            raise AlignloopError(f"'{name}' holds a message without a string 'role' and 'content'")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _split_final(conversation: list[dict]) -> tuple[list[dict], str]:
    if conversation[-1]["role"] != "assistant":
        raise SkipPair("conversation does not end with an assistant turn")
    return conversation[:-1], conversation[-1]["content"].strip()


def to_pair(record: object, line: int) -> PreferencePair:
    """Raise AlignloopError for a malformed record, SkipPair for one that carries no preference."""
    if not isinstance(record, dict):
        raise AlignloopError(f"expected a JSON object, got {type(record).__name__}")
    for key in ("chosen", "rejected"):
        if key not in record:
            raise AlignloopError(f"missing field '{key}'")
    chosen, rejected = record["chosen"], record["rejected"]
    if "prompt" in record:
        prompt = _messages(record["prompt"], "prompt")
        chosen_text = _messages(chosen, "chosen")[-1]["content"].strip()
        rejected_text = _messages(rejected, "rejected")[-1]["content"].strip()
    elif isinstance(chosen, str) and isinstance(rejected, str):
        try:
            chosen_turns, rejected_turns = parse_hh(chosen), parse_hh(rejected)
        except ValueError as exc:
            raise AlignloopError(f"not HH-RLHF text: {exc}") from None
        if not chosen_turns or not rejected_turns:
            raise AlignloopError("no 'Human:'/'Assistant:' turns found (HH-RLHF format)")
        prompt, chosen_text = _split_final(chosen_turns)
        rejected_prompt, rejected_text = _split_final(rejected_turns)
        if prompt != rejected_prompt:
            raise SkipPair("chosen and rejected prompts do not match")
    else:
        prompt, chosen_text = _split_final(_messages(chosen, "chosen"))
        rejected_prompt, rejected_text = _split_final(_messages(rejected, "rejected"))
        if prompt != rejected_prompt:
            raise SkipPair("chosen and rejected prompts do not match")
    if not prompt or prompt[-1]["role"] != "user" or not all(m["content"].strip() for m in prompt):
        raise SkipPair("prompt does not end with a non-empty user turn")
    if not chosen_text or not rejected_text:
        raise SkipPair("empty response")
    if chosen_text == rejected_text:
        raise SkipPair("identical responses")
    return PreferencePair(line=line, prompt=prompt, chosen=chosen_text, rejected=rejected_text)


def parse_preference_file(path: str | Path) -> tuple[list[PreferencePair], list[tuple[int, str]]]:
    path = Path(path)
    pairs, skipped, errors = [], [], []
    for number, record in read_json_records(path):
        try:
            if isinstance(record, RecordError):
                raise AlignloopError(str(record))
            pairs.append(to_pair(record, number))
        except SkipPair as exc:
            skipped.append((number, str(exc)))
        except AlignloopError as exc:
            errors.append((number, str(exc)))
    if errors:
        raise ImportFileError(path, errors)
    if not pairs and not skipped:
        raise ImportFileError(path, [(0, "no preference pairs in file")])
    return pairs, skipped


def import_preferences(session: Session, *, path: str | Path, round: int = 0, seed: int = 0) -> ImportReport:
    """Parse and store a preference file in the caller's transaction (see the module docstring)."""
    pairs, skipped = parse_preference_file(path)
    report = ImportReport(skipped=skipped)
    importer = crud.get_user(session, name=IMPORT_USER)
    if importer is None:
        importer = crud.create_user(session, name=IMPORT_USER, role="annotator")
        importer.disabled = True  # a bookkeeping identity, never a login
        session.add(importer)
    rng = random.Random(seed)
    source = Path(path).name
    for pair in pairs:
        prompt = _prompt_row(session, pair.prompt, source=source)
        if _already_imported(session, prompt.id, {pair.chosen, pair.rejected}):
            report.duplicates += 1
            continue
        chosen_first = rng.random() < 0.5
        texts = [pair.chosen, pair.rejected] if chosen_first else [pair.rejected, pair.chosen]
        gens = [
            crud.add_generation(session, prompt_id=prompt.id, text=t, params={"imported_from": source})
            for t in texts
        ]
        comparison = crud.create_comparison(
            session, prompt_id=prompt.id, generation_ids=[g.id for g in gens], round=round, source="import"
        )
        crud.record_vote(
            session, comparison_id=comparison.id, user_id=importer.id, choice="a" if chosen_first else "b"
        )
        report.added += 1
    return report


def _prompt_row(session: Session, messages: list[dict], *, source: str) -> Prompt:
    existing = session.exec(select(Prompt).where(Prompt.content_hash == crud.prompt_hash(messages))).first()
    if existing is not None:
        return existing
    (row,), _ = crud.add_prompts(session, prompts=[crud.PromptCreate(messages=messages)], source=source)
    return row


def _already_imported(session: Session, prompt_id: int, texts: set[str]) -> bool:
    comparisons = session.exec(
        select(Comparison.id).where(Comparison.prompt_id == prompt_id, Comparison.source == "import")
    ).all()
    for comparison_id in comparisons:
        if {g.text for g in crud.comparison_generations(session, comparison_id=comparison_id)} == texts:
            return True
    return False
