"""Benchmark: LoRA, prefix tuning, IA3 and full fine-tuning of the default model, after equal steps, in one run.

The instruction set is derived from `../shared/data/hh_harmless_dev.jsonl`: each pair's prompt with its chosen
response. Every method trains in its own process through `sft.train.train` (the same path as
`alignloop sft train`), on the same examples, held-out split (by prompt), steps, batch size and length.
Reports trainable parameters, peak resident memory of the process, seconds per step and held-out loss,
each as a ratio to full fine-tuning (the baseline) measured in the same run.

    .venv/bin/python bench/sft_peft.py [--steps 30] [--examples 240] [--max-length 256]
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HH = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh_harmless_dev.jsonl"
METHODS = ("full", "lora", "prefix", "ia3")

CHILD = """
import json, os, resource, sys
os.environ["HF_HUB_OFFLINE"] = "1"
from pathlib import Path
from alignloop.core.workspace import init_workspace
from alignloop.core.config import load_settings
from alignloop.core.db import make_engine
from sft.train import load_config, train
ws = Path(sys.argv[1]) / sys.argv[2]
init_workspace(ws)
settings = load_settings(ws)
config = load_config(None, data=[sys.argv[3]], method=sys.argv[2], max_steps=int(sys.argv[4]),
                     max_length=int(sys.argv[5]), per_device_train_batch_size=4, held_out_fraction=0.2,
                     logging_steps=5, num_samples=0)
summary = train(make_engine(settings.db_url), settings, config, progress=False)
summary["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print("RESULT " + json.dumps({k: summary[k] for k in ("trainable_params", "total_params", "seconds_per_step",
      "first_loss", "final_loss", "held_out_loss", "peak_rss_mb")}))
"""


def instruction_set(limit: int) -> list[dict]:
    from annotate.io import parse_preference_file

    pairs, _ = parse_preference_file(HH)
    rows, seen = [], set()
    for pair in pairs:
        if pair.prompt[-1]["content"] in seen:
            continue
        seen.add(pair.prompt[-1]["content"])
        rows.append(
            {
                "messages": pair.prompt + [{"role": "assistant", "content": pair.chosen}],
                "category": "harmless",
            }
        )
        if len(rows) == limit:
            break
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--examples", type=int, default=240)
    parser.add_argument("--max-length", type=int, default=256)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "instructions.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in instruction_set(args.examples)))
        for method in METHODS:
            proc = subprocess.run(
                [sys.executable, "-c", CHILD, tmp, method, str(data), str(args.steps), str(args.max_length)],
                capture_output=True, text=True,
            )  # fmt: skip
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                sys.exit(f"{method} failed:\n{proc.stderr[-3000:]}")
            results[method] = json.loads(line.removeprefix("RESULT "))
            print(f"{method}: done", file=sys.stderr)
    base = results["full"]
    print(
        f"SmolLM2-135M-Instruct, {args.examples} HH-harmless chosen responses (80/20 by prompt), "
        f"{args.steps} steps x batch 4, max length {args.max_length}, CPU"
    )
    print(
        "| method | trainable params | peak memory | s/step | held-out loss | vs full: params, memory, time |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for method, r in results.items():
        print(
            f"| {method} | {r['trainable_params']:,} ({r['trainable_params'] / r['total_params']:.2%}) | "
            f"{r['peak_rss_mb']:.0f} MB | {r['seconds_per_step']:.2f} | {r['held_out_loss']['all']:.3f} | "
            f"{r['trainable_params'] / base['trainable_params']:.4f}x, {r['peak_rss_mb'] / base['peak_rss_mb']:.2f}x, "
            f"{r['seconds_per_step'] / base['seconds_per_step']:.2f}x |"
        )
    best = min(results, key=lambda m: results[m]["held_out_loss"]["all"])
    print(
        f"ratio lora / full seconds per step: {results['lora']['seconds_per_step'] / base['seconds_per_step']:.2f}x "
        f"(lowest held-out loss after {args.steps} steps: {best})"
    )


if __name__ == "__main__":
    main()
