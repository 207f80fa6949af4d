"""L1 prompting presets: a system prompt, few-shot demonstrations and an optional chain-of-thought instruction.

A preset rewrites a conversation before the model sees it:

    [system]  preset.system_prompt (before any system turn the conversation already has)
    [user]    example 1 question      } few-shot demonstrations, as prior turns
    [assist.] example 1 answer        }
    ...
    the conversation, with `chain_of_thought` appended to its last user turn

Presets live in the database, versioned: saving under an existing name adds version N+1, so a generation,
an RL evaluation or a chat that used "support@3" can be reproduced. `alignloop generate --preset`, `rl eval
--preset`, the chat and the OpenAI endpoint (`"preset"` extra field) all apply them through `apply_preset`.

Two options go past a fixed prompt (both off for presets saved before them):
- `num_shots = k` turns `examples` into a pool: per prompt, the k examples whose question is nearest to the
  last user turn (cosine similarity of all-MiniLM-L6-v2 embeddings, `core.embed`) are shown, ordered by
  `shot_order`: "similar_last" (the default) puts the nearest one right before the question, where recency
  weighs most (Liu et al. 2021, "What Makes Good In-Context Examples for GPT-3?", found nearest-last best);
  "similar_first" the reverse. Ties keep the saved order, so the choice is deterministic.
- `answer_delimiter`: the chain-of-thought instruction asks the model to reason, then write the delimiter,
  then the answer; `final_answer` (and `ReasoningFilter` for streams) keeps only what follows the first
  delimiter (a stream cannot wait for a later one), which /chat, /v1 and the levels report show and judge. A reply without the delimiter is shown
  whole: there is nothing to tell reasoning from answer by, and hiding everything would hide the answer too.
"""

from __future__ import annotations

from sqlmodel import Session, col, func, select

from alignloop.core import AlignloopError
from alignloop.core.models import Preset

MAX_TEXT = 20_000
MAX_FIXED_EXAMPLES = 32  # all shown every time: the prompt grows with each
MAX_POOL_EXAMPLES = 2_000  # a pool (num_shots set): only k are shown, the rest cost one embedding each
SHOT_ORDERS = ("similar_last", "similar_first")


def _check(
    name: str,
    system_prompt: str,
    examples: list,
    chain_of_thought: str | None,
    num_shots: int | None,
    shot_order: str,
    answer_delimiter: str | None,
) -> None:
    if not name.strip() or len(name) > 64 or "@" in name:
        raise AlignloopError("preset name must be 1-64 characters, without '@'")
    if len(system_prompt) > MAX_TEXT or len(chain_of_thought or "") > MAX_TEXT:
        raise AlignloopError(
            f"system prompt and chain-of-thought instruction are limited to {MAX_TEXT} characters"
        )
    if num_shots is not None and not (isinstance(num_shots, int) and 1 <= num_shots <= MAX_FIXED_EXAMPLES):
        raise AlignloopError(f"num_shots must be a whole number from 1 to {MAX_FIXED_EXAMPLES}")
    if shot_order not in SHOT_ORDERS:
        raise AlignloopError(f"shot_order must be one of {', '.join(SHOT_ORDERS)}, not {shot_order!r}")
    if answer_delimiter is not None and not (0 < len(answer_delimiter.strip()) <= 64):
        raise AlignloopError("answer_delimiter must be 1-64 characters (not only spaces)")
    limit = MAX_FIXED_EXAMPLES if num_shots is None else MAX_POOL_EXAMPLES
    if not isinstance(examples, list) or len(examples) > limit:
        raise AlignloopError(
            f"examples must be a list of at most {limit} {{user, assistant}} pairs"
            + ("" if num_shots else f" (a pool of up to {MAX_POOL_EXAMPLES} with num_shots)")
        )
    for i, example in enumerate(examples, 1):
        if not isinstance(example, dict) or set(example) != {"user", "assistant"}:
            raise AlignloopError(f"example {i} must have exactly the keys 'user' and 'assistant'")
        if not all(isinstance(v, str) and v.strip() for v in example.values()):
            raise AlignloopError(f"example {i}: 'user' and 'assistant' must be non-empty text")


def save_preset(
    session: Session,
    *,
    name: str,
    system_prompt: str = "",
    examples: list | None = None,
    chain_of_thought: str | None = None,
    num_shots: int | None = None,
    shot_order: str = "similar_last",
    answer_delimiter: str | None = None,
    user_id: int | None = None,
) -> Preset:
    """Validate, then store as the next version of `name`."""
    examples = examples or []
    answer_delimiter = answer_delimiter or None
    _check(name, system_prompt, examples, chain_of_thought, num_shots, shot_order, answer_delimiter)
    latest = session.exec(select(func.max(Preset.version)).where(Preset.name == name.strip())).one()
    preset = Preset(
        name=name.strip(),
        version=(latest or 0) + 1,
        system_prompt=system_prompt,
        examples=examples,
        chain_of_thought=(chain_of_thought or None),
        num_shots=num_shots,
        shot_order=shot_order,
        answer_delimiter=answer_delimiter,
        created_by=user_id,
    )
    session.add(preset)
    session.flush()
    return preset


def get_preset(session: Session, ref: str) -> Preset:
    """'name' (latest version) or 'name@version'."""
    name, _, version = ref.partition("@")
    query = select(Preset).where(Preset.name == name)
    if version:
        if not version.isdigit():
            raise AlignloopError(f"preset version must be a number: {ref!r}")
        query = query.where(Preset.version == int(version))
    preset = session.exec(query.order_by(col(Preset.version).desc())).first()
    if preset is None:
        raise AlignloopError(f"no preset {ref!r}")
    return preset


def list_presets(session: Session) -> list[Preset]:
    """The latest version of each preset."""
    rows = session.exec(select(Preset).order_by(Preset.name, col(Preset.version).desc())).all()
    latest: dict[str, Preset] = {}
    for row in rows:
        latest.setdefault(row.name, row)
    return list(latest.values())


def select_examples(preset: Preset, messages: list[dict]) -> list[dict]:
    """The demonstrations shown before this conversation: all of them, or the k nearest (see the docstring)."""
    if not preset.num_shots or len(preset.examples) <= 0:
        return list(preset.examples)
    query = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
    from alignloop.core.embed import nearest

    chosen = nearest(query, [e["user"] for e in preset.examples], k=preset.num_shots)  # nearest first
    if preset.shot_order == "similar_last":
        chosen = chosen[::-1]
    return [preset.examples[i] for i in chosen]


def apply_preset(preset: Preset | None, messages: list[dict], *, chain_of_thought: bool = True) -> list[dict]:
    """The conversation the model sees. `chain_of_thought=False` leaves the CoT instruction out (the levels
    report measures each preset both ways)."""
    if preset is None:
        return list(messages)
    out: list[dict] = []
    if preset.system_prompt.strip():
        out.append({"role": "system", "content": preset.system_prompt})
    leading_system = [m for m in messages[:1] if m["role"] == "system"]
    if leading_system and out:
        out[0] = {"role": "system", "content": preset.system_prompt + "\n\n" + leading_system[0]["content"]}
    elif leading_system:
        out.append(leading_system[0])
    rest = messages[len(leading_system) :]
    for example in select_examples(preset, rest):
        out += [
            {"role": "user", "content": example["user"]},
            {"role": "assistant", "content": example["assistant"]},
        ]
    if chain_of_thought and preset.chain_of_thought and rest and rest[-1]["role"] == "user":
        rest = rest[:-1] + [
            {"role": "user", "content": rest[-1]["content"] + "\n\n" + preset.chain_of_thought}
        ]
    return out + rest


def final_answer(preset: Preset | None, text: str) -> str:
    """What a user is shown: the text after the first `answer_delimiter` (all of it if there is none)."""
    delimiter = preset.answer_delimiter if preset is not None else None
    if not delimiter or delimiter not in text:
        return text
    return text.split(delimiter, 1)[1].strip()


class ReasoningFilter:
    """`final_answer` for a stream of text pieces: holds everything back until the delimiter has been seen,
    then passes the rest through. `flush()` at the end releases a reply that never wrote the delimiter."""

    def __init__(self, delimiter: str | None):
        self.delimiter, self.held, self.open = delimiter, "", not delimiter

    def feed(self, piece: str) -> str:
        if self.open:
            return piece
        self.held += piece
        if self.delimiter not in self.held:
            return ""
        self.open = True
        return self.held.split(self.delimiter, 1)[1].lstrip()

    def flush(self) -> str:
        if self.open:
            return ""
        self.open = True
        return self.held
