"""Parse prompt files into validated prompts, all or nothing.

Formats (picked by `--format`, or per record by its keys when `auto`):
- chat:    {"messages": [{"role": "user", "content": ...}, ...]}  (or "prompt" holding such a list)
- plain:   {"prompt": "..."}
- dolly:   {"instruction", "context", "response", "category"}  (context joins the user turn; response ignored)
- alpaca:  {"instruction", "input", "output"}
- mtbench: {"question_id", "category", "turns": [...]}  (MT-bench / Vicuna-bench; the first turn is the
           prompt, later turns depend on the model's answer and are kept in `meta`)
Files are JSON Lines (`.jsonl`), a JSON array (`.json`) or CSV with a header (`prompt`, or `instruction` with
`context`/`input`). Optional fields on any record: `split` (train | eval), `tags` (list, or comma-separated).

Every record is checked before anything is stored; a file with any bad record raises `ImportFileError`,
which names the file, each bad line and the reason.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from alignloop.core import AlignloopError
from alignloop.core.crud import PromptCreate
from alignloop.core.models import SPLITS

FORMATS = ("auto", "chat", "plain", "dolly", "alpaca", "mtbench")
ROLES = ("system", "user", "assistant")
MAX_PROMPT_CHARS = 32_000
MAX_FILE_BYTES = 512 * 1024 * 1024
MAX_ERRORS_SHOWN = 20


class ImportFileError(AlignloopError):
    def __init__(self, path: Path, errors: list[tuple[int, str]], unit: str = "line"):
        self.path, self.errors = path, errors
        shown = "\n".join(
            f"  {path}:{n}: {reason}" if n else f"  {path}: {reason}"
            for n, reason in errors[:MAX_ERRORS_SHOWN]
        )
        more = f"\n  ... and {len(errors) - MAX_ERRORS_SHOWN} more" if len(errors) > MAX_ERRORS_SHOWN else ""
        noun = "problem" if len(errors) == 1 else "problems"
        super().__init__(f"{path}: {len(errors)} {noun}, nothing imported\n{shown}{more}")


class RecordError(ValueError):
    pass


def read_text(path: Path) -> str:
    """The file as text; binary content and invalid UTF-8 are refused with the line they occur on."""
    path = Path(path)
    if not path.is_file():
        raise AlignloopError(f"{path}: no such file")
    if path.stat().st_size > MAX_FILE_BYTES:
        raise AlignloopError(f"{path}: larger than {MAX_FILE_BYTES // 2**20} MiB")
    data = path.read_bytes()
    if b"\x00" in data:
        line = data[: data.index(b"\x00")].count(b"\n") + 1
        raise ImportFileError(path, [(line, "binary content (NUL byte); expected UTF-8 text")])
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ImportFileError(
            path, [(line, f"not valid UTF-8 (byte 0x{data[exc.start]:02x}); re-save the file as UTF-8")]
        ) from None


def parse_prompt_file(path: str | Path, *, fmt: str = "auto") -> list[PromptCreate]:
    path = Path(path)
    if fmt not in FORMATS:
        raise AlignloopError(f"format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    text = read_text(path)
    records = _csv_records(path, text) if path.suffix.lower() == ".csv" else read_json_records(path, text)
    prompts: list[PromptCreate] = []
    errors: list[tuple[int, str]] = []
    for line, record in records:
        if isinstance(record, RecordError):
            errors.append((line, str(record)))
            continue
        try:
            prompts.append(to_prompt(record, fmt=fmt))
        except RecordError as exc:
            errors.append((line, str(exc)))
    if errors:
        raise ImportFileError(path, errors)
    if not prompts:
        raise ImportFileError(path, [(0, "no prompts in file")])
    return prompts


def read_json_records(path: Path, text: str | None = None) -> list[tuple[int, object]]:
    """(line, record) pairs of a JSON Lines file, or (index, record) of a .json array. A line that is not valid
    JSON comes back as a RecordError in place of its record, so callers report every bad line at once."""
    path = Path(path)
    text = read_text(path) if text is None else text
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ImportFileError(
                path, [(exc.lineno, f"invalid JSON: {exc.msg} at column {exc.colno}")]
            ) from None
        if not isinstance(data, list):
            raise ImportFileError(
                path, [(1, "a .json file must hold an array of records (use .jsonl for JSON Lines)")]
            )
        return list(enumerate(data, start=1))
    records: list[tuple[int, object]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((number, json.loads(line)))
        except json.JSONDecodeError as exc:
            records.append((number, RecordError(f"invalid JSON: {exc.msg} at column {exc.colno}")))
    return records


def _csv_records(path: Path, text: str) -> list[tuple[int, object]]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = reader.fieldnames or []
    if not ({"prompt", "instruction", "messages"} & set(header)):
        raise ImportFileError(
            path, [(1, f"CSV header needs a 'prompt' or 'instruction' column, found {header}")]
        )
    records: list[tuple[int, object]] = []
    try:
        for row in reader:
            if None in row:
                records.append(
                    (reader.line_num, RecordError(f"more fields than the {len(header)} in the header"))
                )
            elif any(value is None for value in row.values()):
                records.append(
                    (reader.line_num, RecordError(f"fewer fields than the {len(header)} in the header"))
                )
            else:
                clean = {k: v for k, v in row.items() if v != ""}
                if "messages" in clean:
                    try:
                        clean["messages"] = json.loads(clean["messages"])
                    except json.JSONDecodeError:
                        records.append((reader.line_num, RecordError("'messages' column is not valid JSON")))
                        continue
                records.append((reader.line_num, clean))
    except csv.Error as exc:
        raise ImportFileError(path, [(reader.line_num, f"malformed CSV: {exc}")]) from None
    return records


def _text(record: dict, key: str, *, required: bool = True) -> str:
    value = record.get(key)
    if value is None:
        if required:
            raise RecordError(f"missing field '{key}'")
        return ""
    if not isinstance(value, str):
        raise RecordError(f"field '{key}' must be a string, not {type(value).__name__}")
    if required and not value.strip():
        raise RecordError(f"field '{key}' is empty")
    return value.strip()


def _messages(value: object) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise RecordError("'messages' must be a non-empty list of {role, content}")
    out = []
    for i, m in enumerate(value):
        if (
            not isinstance(m, dict)
            or set(m) - {"role", "content", "name"}
            or "role" not in m
            or "content" not in m
        ):
            raise RecordError(f"message {i} must be an object with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise RecordError(f"message {i} has role {m['role']!r}; expected one of {', '.join(ROLES)}")
        if m["role"] == "system" and i != 0:
            raise RecordError(f"message {i}: a system message may only come first")
        if not isinstance(m["content"], str) or not m["content"].strip():
            raise RecordError(f"message {i} has empty or non-text content")
        out.append({"role": m["role"], "content": m["content"].strip()})
    if out[-1]["role"] != "user":
        raise RecordError("the last message must be from the user (the model answers it)")
    return out


def _detect(record: dict) -> str:
    if "messages" in record or isinstance(record.get("prompt"), list):
        return "chat"
    if "turns" in record:
        return "mtbench"
    if "instruction" in record:
        return "alpaca" if "input" in record or "output" in record else "dolly"
    if "prompt" in record:
        return "plain"
    raise RecordError(
        f"no prompt field: expected one of messages, prompt, instruction, turns (found {sorted(record)})"
    )


def to_prompt(record: object, *, fmt: str = "auto") -> PromptCreate:
    if not isinstance(record, dict):
        raise RecordError(f"expected a JSON object, got {type(record).__name__}")
    kind = _detect(record) if fmt == "auto" else fmt
    meta: dict = {}
    tags = _tags(record.get("tags"))
    if kind == "chat":
        messages = _messages(record.get("messages", record.get("prompt")))
    elif kind == "plain":
        messages = [{"role": "user", "content": _text(record, "prompt")}]
    elif kind in ("dolly", "alpaca"):
        instruction = _text(record, "instruction")
        extra = _text(record, "context" if kind == "dolly" else "input", required=False)
        messages = [{"role": "user", "content": f"{instruction}\n\n{extra}" if extra else instruction}]
        if category := record.get("category"):
            meta["category"] = str(category)
            tags = tags or [str(category)]
    elif kind == "mtbench":
        turns = record.get("turns")
        if (
            not isinstance(turns, list)
            or not turns
            or not all(isinstance(t, str) and t.strip() for t in turns)
        ):
            raise RecordError("'turns' must be a non-empty list of non-empty strings")
        messages = [{"role": "user", "content": turns[0].strip()}]
        meta = {k: record[k] for k in ("question_id", "category") if k in record}
        if len(turns) > 1:
            meta["later_turns"] = [t.strip() for t in turns[1:]]
        if "category" in record:
            tags = tags or [str(record["category"])]
    else:
        raise RecordError(f"unknown format {kind!r}")
    if sum(len(m["content"]) for m in messages) > MAX_PROMPT_CHARS:
        raise RecordError(f"prompt longer than {MAX_PROMPT_CHARS} characters")
    split = record.get("split", "train")
    if split not in SPLITS:
        raise RecordError(f"split must be one of {', '.join(SPLITS)}, not {split!r}")
    return PromptCreate(messages=messages, split=split, tags=tags, meta=meta)


def _tags(value: object) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [t.strip() for t in value.split(",") if t.strip()]
    if isinstance(value, list) and all(isinstance(t, str) for t in value):
        return [t.strip() for t in value if t.strip()]
    raise RecordError("'tags' must be a list of strings or a comma-separated string")
