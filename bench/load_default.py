"""Benchmark: loading the default model the first time (GGUF de-quantised and materialised as safetensors into
the workspace cache) against every later time (safetensors from the cache). Each load runs in a fresh process,
so neither benefits from the other's imports or page cache warm-up beyond the OS file cache.

    .venv/bin/python bench/load_default.py

Prints both wall times and, last, the ratio first / cached.
"""

import subprocess
import sys
import tempfile

LOAD = """
import os, time
os.environ["HF_HUB_OFFLINE"] = "1"
from pathlib import Path
import alignloop.core.registry as r
from alignloop.core.config import new_settings
import transformers, torch  # imports are not what we measure
t = time.perf_counter()
r.resolve("default", settings=new_settings(Path({ws!r})))
print(time.perf_counter() - t)
"""


def timed_load(workspace: str) -> float:
    out = subprocess.run(
        [sys.executable, "-c", LOAD.format(ws=workspace)], capture_output=True, text=True, check=True
    )
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    with tempfile.TemporaryDirectory() as ws:
        first = timed_load(ws)
        cached = min(timed_load(ws) for _ in range(3))
    print(f"first load (GGUF -> safetensors cache): {first:.2f}s")
    print(f"cached load (safetensors, best of 3):    {cached:.2f}s")
    print(f"ratio first / cached: {first / cached:.1f}x")


if __name__ == "__main__":
    main()
