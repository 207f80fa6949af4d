"""Write exported rows as JSON Lines, Parquet or a Hugging Face `datasets` dataset on disk."""

from __future__ import annotations

import json
from pathlib import Path

from alignloop.core import AlignloopError


def write_rows(rows: list[dict], out: Path, *, fmt: str = "auto") -> str:
    """Write `rows` to `out`; `auto` picks by suffix (.jsonl, .parquet, anything else a dataset folder)."""
    if fmt == "auto":
        fmt = {".jsonl": "jsonl", ".parquet": "parquet"}.get(out.suffix.lower(), "dataset")
    if out.exists():
        raise AlignloopError(f"{out} already exists; choose a new path")
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "jsonl":
        tmp = out.with_name(out.name + ".tmp")
        with tmp.open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        tmp.rename(out)
        return fmt
    from datasets import Dataset

    dataset = Dataset.from_list(rows)
    if fmt == "parquet":
        dataset.to_parquet(str(out))
    elif fmt == "dataset":
        dataset.save_to_disk(str(out))
    else:
        raise AlignloopError(f"unknown export format {fmt!r}")
    return fmt
