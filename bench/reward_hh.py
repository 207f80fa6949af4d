"""Benchmark: reward models on real HH-RLHF preferences; both bases side by side; throughput against TRL.

Data: `../shared/data/hh_harmless_dev.jsonl`, imported into a fresh workspace as votes (`alignloop prefs
import`), then split by prompt: 300 prompts held out, the rest (about 1,200 pairs) for training.

1. Accuracy: each base trains through `reward.train.train` (the path of `alignloop reward train`) with its
   shipped config and the same CPU time budget, in its own process; reports held-out accuracy, calibration
   error (ECE), reward~length correlation and wall time.
2. Throughput (the baseline): `trl.RewardTrainer` with its default settings (bf16 autocast, activation
   checkpointing, random batches of 8, TRL's own truncation filter) against alignloop's trainer on the same
   model, the same training pairs and the same batch size of 8, for the same number of steps, each in its own
   process. Both use max length 256 (TRL's default of 1024 exceeds MiniLM's 512 positions). Training pairs per
   second, from the trainers' own `train_runtime`. The ratio is printed last.

3. Cross-validation (`--folds K --members M`): the default config, and any `--variant NAME=JSON` overrides,
   trained once per fold of K prompt folds (`reward train --cv-fold i/K`) as an ensemble of M; every member's
   held-out scores are kept, so one run reports mean accuracy +- standard error over folds for one member
   (averaged over members) and for ensembles of 2..M, with training wall and CPU minutes.
4. Scoring cost (`--scoring N`): one MiniLM against an ensemble of N on full-context HH pairs, same run.

    .venv/bin/python bench/reward_hh.py [--minutes 14] [--bases minilm default] [--steps 40]
    .venv/bin/python bench/reward_hh.py --folds 5 --members 2 [--variant 'lr3e-5={"learning_rate": 3e-5}']
    .venv/bin/python bench/reward_hh.py --scoring 3
    .venv/bin/python bench/reward_hh.py --summarise cv.log   # the k-fold table from a run's (or a cut run's) output
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HH = ROOT.parent / "shared" / "data" / "hh_harmless_dev.jsonl"
CONFIGS = {
    "minilm": ROOT / "configs" / "reward" / "default.yaml",
    "default": ROOT / "configs" / "reward" / "policy.yaml",
}
HELD_OUT_PROMPTS = 300
MAX_LENGTH = 256

PRELUDE = """
import json, os, sys, time
os.environ["HF_HUB_OFFLINE"] = "1"
from alignloop.core.config import load_settings
from alignloop.core.db import make_engine
settings = load_settings(sys.argv[1])
engine = make_engine(settings.db_url)
"""

ACCURACY = (
    PRELUDE
    + """
from reward.train import load_config, train
config = load_config(sys.argv[2], held_out=int(sys.argv[3]), max_seconds=float(sys.argv[4]), logging_steps=20,
                     name="bench-" + sys.argv[5])
start = time.perf_counter()
s = train(engine, settings, config, progress=False)
held = s["evaluation"]["held_out"]
print("RESULT " + json.dumps({"accuracy": s["accuracy"], "ece": s["ece"], "train_pairs": s["train_pairs"],
      "held_out_pairs": s["held_out_pairs"], "steps": s["steps"], "train_seconds": s["train_seconds"],
      "wall_seconds": time.perf_counter() - start, "length_correlation": held["length_correlation"],
      "epochs": s["steps"] * config.per_device_train_batch_size / s["train_pairs"], "config": str(sys.argv[2])}))
"""
)

# One fold of k-fold cross-validation by prompt: the shipped config (plus overrides), every member's held-out
# scores kept, so one run gives the single model (mean over members) and the ensembles of its first m members.
KFOLD = (
    PRELUDE
    + """
import resource
import numpy as np
from reward.train import load_config, train
overrides = json.loads(sys.argv[4])
config = load_config(sys.argv[2], cv_fold=sys.argv[3], logging_steps=50, name="cv-" + sys.argv[3].replace("/", "of")
                     + "-" + sys.argv[5], **overrides)
cpu = resource.getrusage(resource.RUSAGE_SELF)
start = time.perf_counter()
s = train(engine, settings, config, progress=False)
after = resource.getrusage(resource.RUSAGE_SELF)
scores = json.loads((settings.runs_dir / f"run{s['run_id']}" / "held_out_scores.json").read_text())
members = scores.get("members", {"chosen": [scores["chosen"]], "rejected": [scores["rejected"]]})
print("RESULT " + json.dumps({"chosen": members["chosen"], "rejected": members["rejected"], "ece": s["ece"],
      "train_seconds": s["train_seconds"], "wall_seconds": time.perf_counter() - start,
      "cpu_seconds": after.ru_utime + after.ru_stime - cpu.ru_utime - cpu.ru_stime,
      "held_out_pairs": s["held_out_pairs"], "train_pairs": s["train_pairs"], "steps": s["steps"],
      "report": s["report"]}))
"""
)

THROUGHPUT = (
    PRELUDE
    + """
import torch
from datasets import Dataset
from sqlmodel import Session
from alignloop.core import registry
from reward.data import RewardFormat, split_by_prompt, workspace_pairs
from reward.score import load_sequence_classifier
impl, base, steps, held_out = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
with Session(engine) as session:
    pairs = workspace_pairs(session)
train_pairs, _ = split_by_prompt(pairs, held_out=held_out, seed=0)
if impl == "trl":
    from trl import RewardConfig, RewardTrainer
    model, tokenizer = load_sequence_classifier(registry.locate(base, settings=settings))
    fmt = RewardFormat(tokenizer, max_length=10**6)  # untruncated: TRL applies its own max_length filter
    rows, _ = fmt.encode_pairs(train_pairs)
    data = Dataset.from_list([{"chosen_ids": r["chosen_ids"], "rejected_ids": r["rejected_ids"]} for r in rows])
    args = RewardConfig(output_dir=str(settings.runs_dir / "trl"), max_steps=steps, max_length=MAX_LENGTH, use_cpu=True,
                        report_to=[], save_strategy="no", disable_tqdm=True, logging_steps=steps)
    trainer = RewardTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    kept = len(trainer.train_dataset)
    runtime = trainer.train().metrics["train_runtime"]
    tokens = max([h.get("num_tokens", 0) for h in trainer.state.log_history] + [0])
    out = {"pairs_per_second": steps * args.train_batch_size / runtime, "dropped": len(rows) - kept,
           "tokens_per_second": tokens / runtime,
           "train_runtime": runtime, "bf16": args.bf16, "checkpointing": args.gradient_checkpointing}
else:
    from reward.train import load_config, train
    config = load_config(None, base=base, max_steps=steps, per_device_train_batch_size=8, held_out=held_out,
                         max_length=MAX_LENGTH, logging_steps=steps, learning_rate=1e-4)
    s = train(engine, settings, config, progress=False)
    out = {"pairs_per_second": s["pairs_per_second"], "dropped": 0, "train_runtime": s["train_seconds"],
           "tokens_per_second": s["train_tokens"] / s["train_seconds"]}
print("RESULT " + json.dumps(out))
""".replace("MAX_LENGTH", str(MAX_LENGTH))
)


def child(script: str, *args) -> dict:
    proc = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        sys.exit(f"child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def cross_validate(workspace: Path, folds: int, members: int, variants: dict[str, dict]) -> dict:
    """Train every variant once per fold (an ensemble of `members`) and summarise (`summarise_folds`)."""
    runs = {}
    for name, overrides in variants.items():
        runs[name] = []
        for fold in range(1, folds + 1):
            run = child(
                KFOLD,
                workspace,
                CONFIGS["minilm"],
                f"{fold}/{folds}",
                json.dumps({"ensemble": members, **overrides}),
                name,
            )
            runs[name].append(run)
            print(
                f"{name} fold {fold}/{folds}: {run['train_seconds']:.0f} s, "
                f"{run['cpu_seconds'] / 60:.1f} CPU-min, ECE of the registered model {run['ece']:.3f}, "
                f"report {run['report']}",
                flush=True,
            )
            # every member's held-out scores: a cut run is summarised from its log (--summarise LOG)
            print("FOLD " + json.dumps({"variant": name, **run}), flush=True)
    return summarise_folds(runs)


def summarise_folds(runs: dict[str, list[dict]]) -> dict:
    """Mean held-out accuracy over the folds, with its standard error (std over folds / sqrt(k)), for one
    member (each member alone, averaged over members) and for ensembles of 2..members (their mean score);
    training minutes per member; ECE of the registered model (the whole ensemble)."""
    import numpy as np

    table = {}
    for name, folds in runs.items():
        k, members = len(folds), len(folds[0]["chosen"])
        rows = {}
        for m in range(1, members + 1):
            if m == 1:
                per_fold = [
                    np.mean(
                        [
                            np.mean(np.array(c) > np.array(r))
                            for c, r in zip(f["chosen"], f["rejected"], strict=True)
                        ]
                    )
                    for f in folds
                ]
            else:
                per_fold = [
                    np.mean(np.mean(f["chosen"][:m], 0) > np.mean(f["rejected"][:m], 0)) for f in folds
                ]
            rows[m] = (
                float(np.mean(per_fold)),
                float(np.std(per_fold, ddof=1) / np.sqrt(k)) if k > 1 else 0.0,
            )
        eces = [f["ece"] for f in folds]
        table[name] = {
            "accuracy": rows,
            "folds": k,
            "ece": (float(np.mean(eces)), float(np.std(eces, ddof=1) / np.sqrt(k)) if k > 1 else 0.0),
            "minutes_per_member": np.mean([f["train_seconds"] for f in folds]) / 60 / members,
            "cpu_minutes_per_member": np.mean([f["cpu_seconds"] for f in folds]) / 60 / members,
            "pairs": sum(f["held_out_pairs"] for f in folds),
        }
    print(
        "\nCross-validation by prompt (mean held-out accuracy +- standard error over folds; ECE of the registered "
        "model, all members):\n"
    )
    print("| variant | folds (held-out pairs) | members | accuracy | ECE | train min (wall) | CPU-min |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, row in table.items():
        for m, (acc, se) in row["accuracy"].items():
            ece = f"{row['ece'][0]:.3f} +- {row['ece'][1]:.3f}" if m == len(row["accuracy"]) else ""
            print(
                f"| {name} | {row['folds']} ({row['pairs']}) | {m} | {acc:.3f} +- {se:.3f} | {ece} | "
                f"{row['minutes_per_member'] * m:.1f} | {row['cpu_minutes_per_member'] * m:.1f} |"
            )
    return table


def scoring_throughput(members: int, pairs: int = 256, ppo_batch: int = 16) -> None:
    """Reward scoring speed, one model against an ensemble (the baseline in the same run): HH pairs with their
    full context (prompt cut from the left at the default config's max length), batches of 16 as PPO and the
    queue score. Heads are untrained: the speed does not depend on the weights."""
    import torch

    from alignloop.core import registry
    from reward.data import file_pairs
    from reward.score import RewardModel, load_sequence_classifier

    torch.manual_seed(0)
    source = registry.ModelSource(ref="minilm", path=registry.encoder_path(), licence="apache-2.0")
    models = [load_sequence_classifier(source, pooling="mean") for _ in range(members)]
    tokenizer = models[0][1]
    data = file_pairs(HH)[0][:pairs]
    prompts = [p.prompt for p in data] * 2
    responses = [p.chosen for p in data] + [p.rejected for p in data]
    rates = {}
    for size in (1, members):
        chosen = [m.eval() for m, _ in models[:size]]
        scorer = RewardModel(
            model=chosen[0], tokenizer=tokenizer, max_length=MAX_LENGTH, members=chosen if size > 1 else []
        )
        scorer.score(prompts[:16], responses[:16])  # warm-up
        start = time.perf_counter()
        scorer.score(prompts, responses)
        rates[size] = len(data) / (time.perf_counter() - start)
    print(f"\n| reward model | pairs/s | s per PPO batch of {ppo_batch} responses | ratio |")
    print("| --- | --- | --- | --- |")
    for size, rate in rates.items():
        name = "one MiniLM (the default)" if size == 1 else f"ensemble of {size}"
        print(f"| {name} | {rate:.1f} | {ppo_batch / 2 / rate:.2f} | {rates[1] / rate:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=14.0, help="training budget per base")
    parser.add_argument("--bases", nargs="+", default=["minilm", "default"], choices=sorted(CONFIGS))
    parser.add_argument("--steps", type=int, default=40, help="steps per throughput run (MiniLM)")
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--folds", type=int, default=0, help="k-fold cross-validation of the default config")
    parser.add_argument("--members", type=int, default=1, help="ensemble members trained per fold")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        help="NAME=JSON overrides of the default config, cross-validated beside it",
    )
    parser.add_argument("--skip-default", action="store_true", help="cross-validate the variants only")
    parser.add_argument("--scoring", type=int, default=0, help="scoring speed of one model vs N members")
    parser.add_argument(
        "--summarise", metavar="LOG", help="the cross-validation table from a (cut) run's output"
    )
    args = parser.parse_args()
    if args.summarise:
        runs: dict[str, list[dict]] = {}
        for line in Path(args.summarise).read_text().splitlines():
            if line.startswith("FOLD "):
                run = json.loads(line[len("FOLD ") :])
                runs.setdefault(run.pop("variant", "default"), []).append(run)
        summarise_folds(runs)
        return
    if args.scoring:
        scoring_throughput(args.scoring)
        return

    from alignloop.cli import main as cli

    workspace = Path(tempfile.mkdtemp(prefix="reward-bench-")) / "ws"
    cli(["init", "--workspace", str(workspace)])
    cli(["prefs", "import", str(HH), "--workspace", str(workspace)])

    if args.folds:
        variants = {} if args.skip_default else {"default": {}}
        for spec in args.variant:
            name, _, overrides = spec.partition("=")
            variants[name] = json.loads(overrides)
        cross_validate(workspace, args.folds, args.members, variants)
        return

    results = {}
    if not args.skip_accuracy:
        for base in args.bases:
            print(f"training {base} for up to {args.minutes:g} min ...", flush=True)
            results[base] = child(
                ACCURACY, workspace, CONFIGS[base], HELD_OUT_PROMPTS, args.minutes * 60, base
            )
            print(json.dumps(results[base]), flush=True)
        print(
            "\n| base | config | train pairs | held-out pairs | steps (epochs) | train s | held-out accuracy | ECE "
            "| reward~length r |"
        )
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for base, r in results.items():
            print(
                f"| {base} | {Path(r['config']).name} | {r['train_pairs']} | {r['held_out_pairs']} | {r['steps']} "
                f"({r['epochs']:.1f}) | {r['train_seconds']:.0f} | {r['accuracy']:.3f} | {r['ece']:.3f} "
                f"| {r['length_correlation']:.2f} |"
            )

    throughput = {}
    for base in args.bases:
        steps = args.steps if base == "minilm" else max(4, args.steps // 4)
        for impl in ("trl", "alignloop"):
            start = time.perf_counter()
            throughput[(base, impl)] = child(THROUGHPUT, workspace, impl, base, steps, HELD_OUT_PROMPTS)
            throughput[(base, impl)]["steps"] = steps
            print(
                f"{impl} on {base}: {json.dumps(throughput[(base, impl)])} ({time.perf_counter() - start:.0f} s)",
                flush=True,
            )
    print(
        "\n| base | trainer | steps x 8 pairs | train s | pairs/s | tokens/s | pairs TRL drops (> 256 tokens) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for (base, impl), r in throughput.items():
        print(
            f"| {base} | {'trl.RewardTrainer defaults' if impl == 'trl' else 'alignloop'} | {r['steps']} | "
            f"{r['train_runtime']:.1f} | {r['pairs_per_second']:.2f} | {r.get('tokens_per_second', 0):.0f} | "
            f"{r['dropped']} |"
        )
    for base in args.bases:
        ratio = (
            throughput[(base, "alignloop")]["pairs_per_second"]
            / throughput[(base, "trl")]["pairs_per_second"]
        )
        tokens = (
            throughput[(base, "alignloop")]["tokens_per_second"]
            / throughput[(base, "trl")]["tokens_per_second"]
        )
        print(
            f"{base}: alignloop trains {ratio:.2f}x the pairs/s ({tokens:.2f}x the tokens/s) of "
            "trl.RewardTrainer with its defaults"
        )


if __name__ == "__main__":
    main()
