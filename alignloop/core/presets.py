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
"""

from __future__ import annotations

from sqlmodel import Session, col, func, select

from alignloop.core import AlignloopError
from alignloop.core.models import Preset

MAX_TEXT = 20_000


def _check(name: str, system_prompt: str, examples: list, chain_of_thought: str | None) -> None:
    if not name.strip() or len(name) > 64 or "@" in name:
        raise AlignloopError("preset name must be 1-64 characters, without '@'")
    if len(system_prompt) > MAX_TEXT or len(chain_of_thought or "") > MAX_TEXT:
        raise AlignloopError(
            f"system prompt and chain-of-thought instruction are limited to {MAX_TEXT} characters"
        )
    if not isinstance(examples, list) or len(examples) > 32:
        raise AlignloopError("examples must be a list of at most 32 {user, assistant} pairs")
    for i, example in enumerate(examples, 1):
        if not isinstance(example, dict) or set(example) != {"user", "assistant"}:
            raise AlignloopError(f"example {i} must have exactly the keys 'user' and 'assistant'")
        if not all(isinstance(v, str) and v.strip() for v in example.values()):
            raise AlignloopError(f"example {i}: 'user' and 'assistant' must be non-empty text")


def save_preset(session: Session, *, name: str, system_prompt: str = "", examples: list | None = None,
                chain_of_thought: str | None = None, user_id: int | None = None) -> Preset:  # fmt: skip
    """Validate, then store as the next version of `name`."""
    examples = examples or []
    _check(name, system_prompt, examples, chain_of_thought)
    latest = session.exec(select(func.max(Preset.version)).where(Preset.name == name.strip())).one()
    preset = Preset(name=name.strip(), version=(latest or 0) + 1, system_prompt=system_prompt,
                    examples=examples, chain_of_thought=(chain_of_thought or None), created_by=user_id)  # fmt: skip
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


def apply_preset(preset: Preset | None, messages: list[dict]) -> list[dict]:
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
    for example in preset.examples:
        out += [
            {"role": "user", "content": example["user"]},
            {"role": "assistant", "content": example["assistant"]},
        ]
    if preset.chain_of_thought and rest and rest[-1]["role"] == "user":
        rest = rest[:-1] + [
            {"role": "user", "content": rest[-1]["content"] + "\n\n" + preset.chain_of_thought}
        ]
    return out + rest
