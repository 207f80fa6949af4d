"""The RLHF recipe end to end on real preference data, graded by a judge that never saw the training data.

    .venv/bin/python bench/rlhf_recipe.py [--config configs/rl/default.yaml] [--steps N] [--eval-prompts 64]
        [--algo [LABEL=]ALGO[:{YAML settings}] ...] [--workspace DIR] [--sft-steps N [--sft-name NAME]]

`--algo` repeats: PPO, GRPO and RLOO runs share the training reward model, DPO learns from half A's pairs
directly (no reward model: its budget is its own training), and all share the judge. `--workspace` keeps the
workspace; running again with the same one (and the same --seed and --eval-prompts) reuses its reward model and
judge, whose CPU time was recorded the first time, so further algorithms or settings cost only their own run.
`--sft-steps N` first instruction-tunes the base on half A's chosen answers (the InstructGPT order; measured: on
this data it is the step that wins, see the README) and every algorithm starts from that version; its CPU time
counts in each budget, and each policy is still judged against the base model.

Protocol (issue #12), so nobody grades their own homework:
1. the HH harmless dev pairs (`../shared/data/hh_harmless_dev.jsonl`) are grouped by prompt; a seeded hash of
   the prompt puts `--eval-prompts` prompts aside for evaluation and splits the rest into two disjoint halves;
2. the training reward model (configs/reward/default.yaml: MiniLM, fully fine-tuned) learns from half A only;
3. PPO (the given config, from the embedded default model) trains on half A's prompts, full context (the
   config's `max_prompt_length` caps them), against that reward model;
4. the judge reward model (same recipe) learns from half B only;
5. `rl eval` answers the evaluation prompts (in neither half) with the new policy and the base, and the judge
   scores both: win rate with its standard error, KL(policy_T || base_T) with its standard error (rl eval's
   estimator), response lengths and EOS rates.
Time per phase is CPU time (user + system, this process and its children, `resource.getrusage`), reported in
CPU-minutes, because the machine is shared: wall time depends on the neighbours, CPU time much less. The
budget that matters, "reward model + RL", is phases 2 and 3 (the judge and the evaluation are grading). Peak
resident memory of the whole process is printed too, and the PPO run logs its own per step.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
HH = Path(os.environ.get("ALIGNLOOP_SHARED_DATA", ROOT.parent / "shared" / "data")) / "hh_harmless_dev.jsonl"


def cpu_seconds() -> float:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


class Phases:
    def __init__(self):
        self.rows = []

    def run(self, name: str, fn, *args, **kwargs):
        cpu, wall = cpu_seconds(), time.perf_counter()
        print(f"--- {name} ...", flush=True)
        out = fn(*args, **kwargs)
        self.rows.append((name, (cpu_seconds() - cpu) / 60, (time.perf_counter() - wall) / 60))
        print(f"--- {name}: {self.rows[-1][1]:.1f} CPU-min, {self.rows[-1][2]:.1f} wall-min", flush=True)
        return out


def split_pairs(eval_prompts: int, seed: int):
    from reward.data import file_pairs

    pairs = file_pairs(HH)[0]
    keys = sorted({p.key for p in pairs}, key=lambda k: hashlib.sha256(f"{seed}:{k}".encode()).hexdigest())
    held = set(keys[:eval_prompts])
    rest = keys[eval_prompts:]
    half_a, half_b = set(rest[0::2]), set(rest[1::2])
    pick = lambda ks: [p for p in pairs if p.key in ks]  # noqa: E731
    return pick(half_a), pick(half_b), pick(held)


def write_pairs(pairs, path: Path) -> Path:
    with path.open("w") as f:
        for p in pairs:
            f.write(json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}) + "\n")
    return path


def write_prompts(pairs, path: Path) -> Path:
    seen = {}
    for p in pairs:
        seen.setdefault(p.key, p.prompt)
    with path.open("w") as f:
        for messages in seen.values():
            f.write(json.dumps({"messages": messages}) + "\n")
    return path


def write_chosen(pairs, path: Path) -> Path:
    """Instruction rows for SFT: each prompt once, with its first pair's chosen answer (the DPO paper's
    "Preferred-FT" on HH: no SFT model exists for these conversations, so one is made from the preferred side)."""
    seen = {}
    for p in pairs:
        seen.setdefault(p.key, p.prompt + [{"role": "assistant", "content": p.chosen}])
    with path.open("w") as f:
        for messages in seen.values():
            f.write(json.dumps({"messages": messages}) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=str(ROOT / "configs" / "rl" / "default.yaml"))
    parser.add_argument("--reward-config", default=str(ROOT / "configs" / "reward" / "default.yaml"))
    parser.add_argument(
        "--algo",
        action="append",
        help="[LABEL=]ALGO[:{YAML settings}], ALGO one of ppo grpo rloo dpo, or sft (the --sft-steps version itself), e.g. "
        "'ppo-lr3=ppo:{learning_rate: 3.0e-4}'; repeat to compare (they share the reward model and the judge). "
        "Default: ppo",
    )
    parser.add_argument("--steps", type=int, default=None, help="RL steps (default: the config's)")
    parser.add_argument(
        "--sft-steps",
        type=int,
        default=0,
        help="first instruction-tune the base on half A's chosen answers (LoRA, this many steps x 8 examples); "
        "every algorithm then starts from that version and its CPU time counts in each budget (0: none)",
    )
    parser.add_argument(
        "--sft-name",
        default=None,
        help="name of the SFT version (default: sft-half-a-N); a new name trains a new one in the same workspace",
    )
    parser.add_argument(
        "--reward-epochs", type=float, default=None, help="reward training epochs (default: config's)"
    )
    parser.add_argument(
        "--max-pairs", type=int, default=None, help="reward training pairs per model (default: all)"
    )
    parser.add_argument("--eval-prompts", type=int, default=64)
    parser.add_argument(
        "--eval-tokens", type=int, default=None, help="response cap at evaluation (default: PPO's)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--workspace", default=None, help="keep the workspace here (default: a temporary one)"
    )
    args = parser.parse_args()

    from alignloop.core.config import load_settings
    from alignloop.core.db import make_engine, session_scope
    from alignloop.core.prompts import parse_prompt_file
    from alignloop.core.workspace import init_workspace
    from reward import train as reward_train
    from rl import train as rl_train
    from rl.evaluate import evaluate_policy

    work = Path(args.workspace or tempfile.mkdtemp(prefix="rlhf-recipe-"))
    # An earlier run's workspace is reused: its reward model and judge (and their recorded CPU time) stand.
    reuse = (work / "recipe.json").exists()
    if not reuse:
        init_workspace(work / "ws")
    settings = load_settings(work / "ws")
    engine = make_engine(settings.db_url)
    phases = Phases()
    saved = json.loads((work / "recipe.json").read_text()) if reuse else {}

    half_a, half_b, held = split_pairs(args.eval_prompts, args.seed)
    keys = lambda ps: {p.key for p in ps}  # noqa: E731
    assert not (keys(half_a) & keys(half_b)) and not ((keys(half_a) | keys(half_b)) & keys(held))
    print(
        f"pairs: half A {len(half_a)} ({len(keys(half_a))} prompts), half B {len(half_b)} "
        f"({len(keys(half_b))} prompts), evaluation prompts {len(keys(held))} (in neither half)"
    )
    file_a, file_b = write_pairs(half_a, work / "half_a.jsonl"), write_pairs(half_b, work / "half_b.jsonl")
    with session_scope(engine) as session:
        from alignloop.core import crud

        for path, split in (
            (write_prompts(half_a, work / "train_prompts.jsonl"), "train"),
            (write_prompts(held, work / "eval_prompts.jsonl"), "eval"),
        )[: 0 if reuse else 2]:
            prompts = parse_prompt_file(path)
            for p in prompts:
                p.split = split
            crud.add_prompts(session, prompts=prompts, source=path.name)

    rm_over = {"from_workspace": False}
    if args.max_pairs:
        rm_over["max_pairs"] = args.max_pairs
    if args.reward_epochs is not None:
        rm_over["num_train_epochs"] = args.reward_epochs
    runs = [parse_algo(text, args.steps) for text in args.algo or ["ppo"]]
    if any(algo == "dpo" for algo, _, _ in runs):  # DPO learns from half A's votes directly
        from annotate.io import import_preferences

        with session_scope(engine) as session:
            import_preferences(session, path=file_a)  # pairs already there are skipped

    def reward_model(label: str, name: str, data: Path) -> float:
        """Train one reward model as a phase; its CPU-minutes."""
        out = phases.run(
            label,
            reward_train.train,
            engine,
            settings,
            reward_train.load_config(args.reward_config, data=[str(data)], name=name, **rm_over),
            progress=False,
        )
        print(f"{label}: held-out accuracy {out.get('accuracy')}")
        return phases.rows[-1][1]

    # DPO runs do not learn from the half-A model (nor count it), but rl eval reports every policy's reward under it.
    if "rm_cpu_min" in saved:
        print(f"reward model (half A) reused: it took {saved['rm_cpu_min']:.1f} CPU-min")
    else:
        saved["rm_cpu_min"] = reward_model("reward model (half A)", "rm-train", file_a)
    if not saved.get("judge"):
        reward_model("judge reward model (half B)", "rm-judge", file_b)
        saved["judge"] = True
    rm_cpu = saved["rm_cpu_min"]
    (work / "recipe.json").write_text(json.dumps(saved))

    from sqlmodel import Session

    from alignloop.core.models import Run

    # Optional SFT first (the InstructGPT order): its version is every algorithm's starting point.
    sft_name, sft_cpu = None, 0.0
    if args.sft_steps:
        from sft import train as sft_train

        sft_name = args.sft_name or f"sft-half-a-{args.sft_steps}"
        if sft_name in saved:
            sft_cpu = saved[sft_name]
            print(f"SFT version {sft_name} reused: it took {sft_cpu:.1f} CPU-min")
        else:
            sft_config = sft_train.load_config(
                str(ROOT / "configs" / "sft" / "default.yaml"),
                data=[str(write_chosen(half_a, work / "sft_half_a.jsonl"))],
                max_steps=args.sft_steps,
                max_length=256,
                held_out_fraction=0.05,
                num_samples=0,
                name=sft_name,
            )
            phases.run(
                f"SFT on half A's chosen answers ({args.sft_steps} steps)",
                sft_train.train,
                engine,
                settings,
                sft_config,
                progress=False,
            )
            saved[sft_name] = sft_cpu = phases.rows[-1][1]
            (work / "recipe.json").write_text(json.dumps(saved))

    table = []
    for algo, label, over in runs:
        if algo == "sft":
            if not sft_name:
                raise SystemExit("--algo sft needs --sft-steps")
            config, policy, train_cpu, peak = None, sft_name, 0.0, None
        else:
            over = {"name": f"policy-{label}", **({"policy": sft_name} if sft_name else {}), **over}
            if algo != "dpo":
                over["reward_model"] = "rm-train"
            config = rl_train.load_config(algo, args.config, **over)
            policy = config.name
            result = phases.run(label, rl_train.train, engine, settings, algo, config, progress=False)
            train_cpu = phases.rows[-1][1]
            with Session(engine) as session:
                history = session.get(Run, result["run_id"]).metrics.get("history", [])
            peak = max((h.get("peak_rss_mb", 0) for h in history), default=0) or None
        if algo == "ppo":  # TRL's trainers log other fields
            print(
                f"{label}: {len(history)} steps, reward {result['reward_start']:.3f} -> "
                f"{result['reward_end']:.3f}, KL {result['kl_end']:.2f}, peak RSS {peak:.0f} MB (per step: "
                f"{[round(h['peak_rss_mb']) for h in history]})"
            )
            split = {
                k: round(sum(h.get(k, 0) for h in history) / len(history), 1)
                for k in ("generate_s", "score_s", "forward_s", "update_s", "step_s")
            }
            print(f"{label} seconds per step (wall):", json.dumps(split))
        ev = phases.run(
            f"evaluation of {label}",
            evaluate_policy,
            engine,
            settings,
            policy=policy,
            baseline="default" if sft_name else config.policy,
            reward_model="rm-train",
            judge="rm-judge",
            num_prompts=args.eval_prompts,
            max_new_tokens=args.eval_tokens or getattr(config, "max_new_tokens", 48),
            seed=args.seed,
        )
        s = ev["summary"]
        budget = sft_cpu + train_cpu + (0.0 if algo in ("dpo", "sft") else rm_cpu)
        table.append({"algo": label, "budget_cpu_min": budget, "peak_rss_mb": peak, "summary": s})
        print(
            f"\n{label}: {'SFT + ' if sft_name else ''}reward model + RL {budget:.1f} CPU-minutes (target <= 30)"
        )
        print(
            f"win rate vs base, judged by the half-B reward model on {s['prompts']} held-out prompts: "
            f"{s['win_rate_by_judge']:.3f} +- {s['win_rate_se']:.3f} (target >= 0.60)"
        )
        kl_se = s["kl_to_baseline_se"]
        print(f"KL(policy_T || base_T), T={s['temperature']}: {s['kl_to_baseline']:.3f} +- {kl_se or 0:.3f}")
        print(
            f"length (tokens): policy {s['length']:.1f} vs base {s['baseline_length']:.1f}; EOS rate "
            f"{s['eos_rate']:.2f} vs {s['baseline_eos_rate']:.2f}\n"
        )

    print("\n| phase | CPU-min | wall-min |\n| --- | --- | --- |")
    for name, cpu, wall in phases.rows:
        print(f"| {name} | {cpu:.1f} | {wall:.1f} |")
    print(
        "\n| algorithm | reward model + RL, CPU-min | judged win rate vs base +- s.e. | KL(policy_T || base_T) "
        "+- s.e. | length policy / base | EOS rate policy / base |\n| --- | --- | --- | --- | --- | --- |"
    )
    for row in table:
        s = row["summary"]
        print(
            f"| {row['algo']} | {row['budget_cpu_min']:.1f} | {s['win_rate_by_judge']:.3f} +- "
            f"{s['win_rate_se']:.3f} | {s['kl_to_baseline']:.3f} +- {s['kl_to_baseline_se'] or 0:.3f} | "
            f"{s['length']:.1f} / {s['baseline_length']:.1f} | {s['eos_rate']:.2f} / {s['baseline_eos_rate']:.2f} |"
        )
    print(f"peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    print("RESULT " + json.dumps({"phases": phases.rows, "algorithms": table}))


def parse_algo(text: str, steps: int | None) -> tuple[str, str, dict]:
    """`ppo`, or `[LABEL=]ALGO:{YAML mapping}` (settings over the config file's), e.g.
    `ppo-last4=ppo:{layers_to_transform: [26, 27, 28, 29], learning_rate: 3.0e-4}`."""
    import yaml

    label, _, spec = text.rpartition("=") if "=" in text.split(":", 1)[0] else ("", "", text)
    algo, _, rest = spec.partition(":")
    over = {"steps": steps} if steps else {}
    extra = yaml.safe_load(rest) if rest.strip() else {}
    if not isinstance(extra, dict):
        raise SystemExit(f"--algo {text!r}: the settings after ':' must be a YAML mapping")
    return algo.strip(), label or algo.strip(), {**over, **extra}


if __name__ == "__main__":
    main()
