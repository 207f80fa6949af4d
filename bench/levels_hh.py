"""The levels report on the embedded model and the shared HH-harmless data, end to end, on a CPU.

Builds a fresh workspace, then, through the same commands a user runs:
- prompts: the first --eval unique HH prompts held out (split `eval`), the next --train for training;
- two reward models on the embedded encoder (MiniLM), on disjoint halves of the remaining pairs (by prompt):
  `rm` (PPO trains against it) and `judge` (the report's referee, never trained against);
- L1: a preset with a system prompt, a pool of HH chosen answers (2 nearest per prompt, nearest last) and a CoT
  instruction whose reasoning is hidden behind "Answer:";
- L2: LoRA SFT of SmolLM2-135M-Instruct on HH chosen answers (all layers) and on the last two layers only;
- L3: PPO on top of the full-layer SFT version against `rm`;
then `alignloop report levels --judge judge` on the held-out prompts, and prints its table.

    .venv/bin/python bench/levels_hh.py [--eval 24] [--train 240] [--sft-steps 30] [--ppo-steps 6] [--out DIR]
"""

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

DATA = os.environ.get("ALIGNLOOP_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data"
HH = Path(DATA) / "hh_harmless_dev.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--eval", type=int, default=24)
    parser.add_argument("--train", type=int, default=240)
    parser.add_argument("--sft-steps", type=int, default=30)
    parser.add_argument("--rm-steps", type=int, default=40)
    parser.add_argument("--ppo-steps", type=int, default=6)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--out", default="levels-report")
    args = parser.parse_args()

    from alignloop.cli import main as cli
    from alignloop.core.config import load_settings
    from alignloop.core.db import make_engine, session_scope
    from alignloop.core.presets import save_preset
    from annotate.io import parse_preference_file

    pairs, _ = parse_preference_file(HH)
    by_prompt: dict[str, list] = {}
    for pair in pairs:
        by_prompt.setdefault(json.dumps(pair.prompt), []).append(pair)
    prompts = list(by_prompt)
    held, rest = prompts[: args.eval], prompts[args.eval :]
    train_prompts = rest[: args.train]
    half = len(rest) // 2
    tmp = Path(tempfile.mkdtemp(prefix="levels-hh-"))
    ws = ["--workspace", str(tmp / "ws")]

    def write(name: str, rows: list[dict]) -> str:
        (tmp / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(tmp / name)

    def trl_pairs(keys: list[str]) -> list[dict]:
        return [
            {
                "prompt": p.prompt,
                "chosen": [{"role": "assistant", "content": p.chosen}],
                "rejected": [{"role": "assistant", "content": p.rejected}],
            }
            for k in keys
            for p in by_prompt[k]
        ]

    def run(*argv) -> None:
        print("$ alignloop", " ".join(argv), file=sys.stderr, flush=True)
        if cli([*argv, *ws]) != 0:
            sys.exit(f"failed: {argv}")

    run("init")
    run(
        "prompts",
        "import",
        write("eval.jsonl", [{"messages": json.loads(k)} for k in held]),
        "--split",
        "eval",
    )
    run("prompts", "import", write("train.jsonl", [{"messages": json.loads(k)} for k in train_prompts]))
    reward_config = tmp / "reward.yaml"
    reward_config.write_text(
        "max_length: 128\nper_device_train_batch_size: 8\nlearning_rate: 1.0e-4\nheld_out: 0.1\n"
    )
    for name, keys in (("rm", rest[:half]), ("judge", rest[half:])):
        run(
            "reward",
            "train",
            "--config",
            str(reward_config),
            "--base",
            "minilm",
            "--no-votes",
            "--data",
            write(f"{name}.jsonl", trl_pairs(keys)),
            "--max-steps",
            str(args.rm_steps),
            "--name",
            name,
        )
    sft_rows = [
        {"messages": json.loads(k) + [{"role": "assistant", "content": by_prompt[k][0].chosen}]} for k in rest
    ]
    sft_file = write("sft.jsonl", sft_rows)
    short = "max_length: 256\nper_device_train_batch_size: 4\nnum_samples: 0\n"
    (tmp / "sft.yaml").write_text(short)
    run(
        "sft",
        "train",
        "--config",
        str(tmp / "sft.yaml"),
        "--data",
        sft_file,
        "--method",
        "lora",
        "--max-steps",
        str(args.sft_steps),
        "--name",
        "sft-lora",
    )
    config = tmp / "sft-top2.yaml"
    config.write_text(short + "layers_to_transform: [28, 29]\n")
    run(
        "sft",
        "train",
        "--config",
        str(config),
        "--data",
        sft_file,
        "--method",
        "lora",
        "--max-steps",
        str(args.sft_steps),
        "--name",
        "sft-lora-top2",
    )
    ppo = tmp / "ppo.yaml"
    ppo.write_text(
        "batch_size: 8\nmini_batch_size: 4\nppo_epochs: 1\nmax_new_tokens: 32\nlora_r: 8\nlora_alpha: 16\n"
        "learning_rate: 5.0e-5\nsave_every: 0\n"
    )
    run(
        "rl",
        "train",
        "--config",
        str(ppo),
        "--policy",
        "sft-lora",
        "--reward-model",
        "rm",
        "--steps",
        str(args.ppo_steps),
        "--name",
        "ppo-on-sft",
    )
    settings = load_settings(tmp / "ws")
    pool = [
        {"user": json.loads(k)[-1]["content"], "assistant": by_prompt[k][0].chosen}
        for k in rest[:200]
        if len(by_prompt[k][0].chosen) < 600
    ]
    with session_scope(make_engine(settings.db_url)) as session:
        save_preset(
            session,
            name="harmless",
            system_prompt="You are a helpful and harmless assistant. Decline "
            "dangerous or hurtful requests politely and offer a safe alternative.",
            examples=pool,
            num_shots=2,
            chain_of_thought="First think in one sentence about whether the request could cause harm, then "
            "write 'Answer:' followed by your reply.",
            answer_delimiter="Answer:",
        )
    run(
        "report",
        "levels",
        "--judge",
        "judge",
        "--prompts",
        str(args.eval),
        "--max-new-tokens",
        str(args.max_new_tokens),
        "--out",
        args.out,
    )


if __name__ == "__main__":
    main()
