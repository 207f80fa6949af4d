"""The GPU check: every path that CI (CPU only) never runs on a GPU, through the same entry points users call.
Prints one JSON line per check and, at the end, a Markdown table (the README's "GPU check" section).

    python bench/cuda_check.py                       (a machine with a GPU: tiny and default-size models)
    python bench/cuda_check.py --cpu --sizes tiny    (anywhere: the same script, checks the CPU policy)

For each size (the tests' tiny Llama; the default model's architecture, SmolLM2-135M, with its real tokenizer
and config from `--default-dir` but random weights, since the weights do not travel to a GPU machine):
1. generate: `registry.resolve` places the model by the device policy (GPU, bf16 where native), batched
   sampling; `alignloop.core.sampling` queues comparisons through the CLI;
2. serve: `serve.engine.BatchingEngine` on the same model, greedy, compared with `alignloop.core.sampling`;
3. judge: `alignloop judge run` (the local judge) votes on the queued comparisons;
4. reward: `alignloop reward train` on synthetic pairs (bf16 autocast where native), then scoring through
   `RewardModel.load` (placed by the policy);
5. ppo: `alignloop rl train --algo ppo`: the reward model must be loaded on the policy's device, and the
   actor-critic trains through `accelerator.prepare` (the run records the wrapper and the mixed precision);
then, once: PPO on the tiny model raises a known reward on the GPU through the prepared model and optimizer;
the default-size model in 4 bit (bitsandbytes) loads and generates; a model above `memory_limit_gb` is refused
before loading; a ZeRO-2 two-process reward step and PPO step when two GPUs and DeepSpeed are present
(skipped otherwise, and said so); with `--value-models`, seconds per PPO step for the value adapter vs the
shared head at the default size. The PPO rows changed with the prepared path (2026-11-27) and have not run on
a GPU since: the README's table predates them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))
from conftest import build_tiny_llama, build_tiny_tokenizer  # noqa: E402

from alignloop.cli import main as cli  # noqa: E402
from alignloop.core import (  # noqa: E402
    crud,
    devices,
    registry,
)
from alignloop.core.config import load_settings, new_settings, write_settings  # noqa: E402
from alignloop.core.db import create_schema, make_engine  # noqa: E402
from alignloop.core.sampling import SamplingParams, generate  # noqa: E402

ROWS: list[dict] = []
QUESTIONS = [f"Tell me something useful about topic number {i}, please." for i in range(48)]


def report(check: str, model: str, **values) -> dict:
    row = {"check": check, "model": model, **values}
    ROWS.append(row)
    print(json.dumps(row, default=str), flush=True)
    return row


def timed(check: str, model: str, fn):
    """Run one check; a failure is a row in the table (with its one-line cause), not the end of the script."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    try:
        values = fn() or {}
    except Exception as exc:  # noqa: BLE001 - the table says what failed and why
        traceback.print_exc()
        values = {"ok": False, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"}
    values.setdefault("ok", True)
    values["seconds"] = round(time.perf_counter() - start, 2)
    if torch.cuda.is_available():
        values["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return report(check, model, **values)


def param_placement(model) -> str:
    p = next(model.parameters())
    return f"{p.device.type} {str(p.dtype).removeprefix('torch.')}"


# --- models and workspace ------------------------------------------------------------------------------------


def save_tiny(out: Path) -> Path:
    tok = build_tiny_tokenizer()
    model = build_tiny_llama(tok, initializer_range=0.1)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "README.md").write_text("---\nlicense: apache-2.0\n---\n")
    return out


def save_default_size(out: Path, default_dir: Path | None) -> Path:
    """SmolLM2-135M's architecture (its config, tokenizer and chat template when `default_dir` has them) with
    random weights, saved in bf16 (half the bytes to write; loads cast to the placement's dtype)."""
    from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM

    if default_dir is not None and (default_dir / "config.json").is_file():
        config = AutoConfig.from_pretrained(default_dir)
    else:
        config = LlamaConfig(
            vocab_size=49152,
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            tie_word_embeddings=True,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=2,
        )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.generation_config.eos_token_id = config.eos_token_id
    model.save_pretrained(out)
    if default_dir is not None and (default_dir / "tokenizer.json").is_file():
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "README.md"):
            if (default_dir / name).is_file():
                shutil.copy(default_dir / name, out / name)
    else:
        tok = build_tiny_tokenizer()
        tok.add_tokens([f"<extra_{i}>" for i in range(config.vocab_size - len(tok))])
        tok.save_pretrained(out)
        (out / "README.md").write_text("---\nlicense: apache-2.0\n---\n")
    return out


def make_workspace(root: Path, device: str):
    settings = new_settings(root / "ws", device=device)
    write_settings(settings)
    create_schema(make_engine(settings.db_url))
    ws = ["--workspace", str(settings.workspace)]
    prompts, prefs = root / "prompts.jsonl", root / "prefs.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in QUESTIONS))
    prefs.write_text(
        "".join(
            json.dumps(
                {"prompt": q, "chosen": "Thank you! Here is a careful, friendly answer.", "rejected": "No."}
            )
            + "\n"
            for q in QUESTIONS
        )
    )
    assert cli(["prompts", "import", str(prompts), *ws]) == 0
    assert cli(["prefs", "import", str(prefs), *ws]) == 0
    return load_settings(settings.workspace), ws


# --- the checks ----------------------------------------------------------------------------------------------


def check_size(size: str, model_dir: Path, settings, ws: list[str], expected: devices.Placement, big: bool):
    chats = [[{"role": "user", "content": q}] for q in QUESTIONS[:32]]
    state = {}

    def generate_check():
        loaded = registry.resolve(str(model_dir), settings=settings)
        state["loaded"] = loaded
        placed = param_placement(loaded.model)
        assert placed == f"{torch.device(expected.device).type} {expected.dtype}", placed
        params = SamplingParams(max_new_tokens=32, temperature=0.8, seed=0)
        start = time.perf_counter()
        out = generate(loaded.model, loaded.tokenizer, chats, params=params, batch_size=32, progress=False)
        seconds = time.perf_counter() - start
        tokens = sum(c[0].num_tokens for c in out)
        code = cli(
            [
                "generate",
                "--model",
                str(model_dir),
                "--prompts",
                "8",
                "--samples",
                "2",
                "--max-new-tokens",
                "16",
                *ws,
            ]
        )
        return {
            "placement": placed,
            "tokens_per_s": round(tokens / seconds, 1),
            "cli_generate_exit": code,
            "ok": code == 0,
        }

    def serve_check():
        from serve.engine import BatchingEngine, Request, Stream

        loaded = state["loaded"]
        greedy = SamplingParams(max_new_tokens=24, temperature=0)
        expected_texts = [
            c[0].text
            for c in generate(
                loaded.model, loaded.tokenizer, chats[:16], params=greedy, batch_size=16, progress=False
            )
        ]
        engine = BatchingEngine(loaded.model, loaded.tokenizer, gather_ms=50)
        streams = [Stream() for _ in chats[:16]]
        start = time.perf_counter()
        for messages, stream in zip(chats[:16], streams, strict=True):
            engine.submit(
                Request(prompt_ids=engine.render(messages), max_tokens=24, temperature=0, emit=stream)
            )
        events = [list(s) for s in streams]
        seconds = time.perf_counter() - start
        texts = ["".join(e[1] for e in evs if e[0] == "text") for evs in events]
        tokens = sum(e[2]["completion_tokens"] for evs in events for e in evs if e[0] == "done")
        same = sum(a == b for a, b in zip(texts, expected_texts, strict=True))
        return {
            "placement": param_placement(loaded.model),
            "equal_to_generate": f"{same}/16",
            "tokens_per_s": round(tokens / seconds, 1),
            "batches": engine.batches,
        }

    def judge_check():
        from annotate.judge import LocalJudge

        loaded = state.pop("loaded")
        judge = LocalJudge(loaded.model, loaded.tokenizer)
        p = judge.prefer_first([{"role": "user", "content": "Hi?"}], "Hello! How can I help?", "No.")
        del loaded, judge
        code = cli(
            ["judge", "run", "--model", str(model_dir), "--max-items", "8", "--user", f"judge-{size}", *ws]
        )
        return {"p_first": round(p, 3), "cli_judge_exit": code, "ok": code == 0}

    def reward_check():
        from reward.score import RewardModel

        extra = ["--method", "lora"] if big else []
        code = cli(
            [
                "reward",
                "train",
                "--config",
                "configs/reward/tiny.yaml",
                "--base",
                str(model_dir),
                "--max-steps",
                "20",
                "--name",
                f"rm-{size}",
                *extra,
                *ws,
            ]
        )
        assert code == 0, f"reward train exited {code}"
        from sqlmodel import Session

        with Session(make_engine(settings.db_url)) as session:
            scorer = RewardModel.load(f"rm-{size}", settings=settings, session=session)
            metrics = crud.get_model_version(session, name=f"rm-{size}").metrics
        placed = param_placement(scorer.model)
        start = time.perf_counter()
        scores = scorer.score(
            [q for q in QUESTIONS] * 2, ["Thank you! Here is an answer."] * 48 + ["No."] * 48
        )
        seconds = time.perf_counter() - start
        return {
            "placement": placed,
            "train_pairs_per_s": metrics.get("pairs_per_second"),
            "held_out_accuracy": metrics.get("accuracy"),
            "scored_per_s": round(96 / seconds, 1),
            "n": len(scores),
        }

    def ppo_check():
        from reward.score import RewardModel

        seen, load = {}, RewardModel.load.__func__

        def recording(cls, ref, **kwargs):
            scorer = load(cls, ref, **kwargs)
            seen["scorer"] = param_placement(scorer.model)
            return scorer

        RewardModel.load = classmethod(recording)
        try:
            steps = "4" if big else "6"
            code = cli(
                [
                    "rl",
                    "train",
                    "--config",
                    "configs/rl/tiny.yaml",
                    "--policy",
                    str(model_dir),
                    "--reward-model",
                    f"rm-{size}",
                    "--steps",
                    steps,
                    "--name",
                    f"ppo-{size}",
                    *ws,
                ]
            )
        finally:
            RewardModel.load = classmethod(load)
        from sqlmodel import Session

        from alignloop.core import crud

        with Session(make_engine(settings.db_url)) as session:
            metrics = crud.get_model_version(session, name=f"ppo-{size}").metrics
        scorer_device = seen["scorer"].split()[0]
        return {
            "scorer_placement": seen["scorer"],
            "prepared": metrics.get("prepared"),
            "mixed_precision": metrics.get("mixed_precision"),
            "ok": code == 0
            and scorer_device == torch.device(expected.device).type
            and bool(metrics.get("prepared")),
            "s_per_step": round(metrics["train_seconds"] / metrics["steps"], 2),
            "reward_start": round(metrics["reward_start"], 3),
            "reward_end": round(metrics["reward_end"], 3),
        }

    for name, fn in (
        ("generate", generate_check),
        ("serve", serve_check),
        ("judge", judge_check),
        ("reward", reward_check),
        ("ppo", ppo_check),
    ):
        timed(name, size, fn)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def ppo_learns_tiny(device: str):
    """A known reward (share of token ids divisible by 4) rises under PPO on this device."""
    from rl.ppo import PPOTrainer, load_config

    tok = build_tiny_tokenizer()
    target = {i for i in range(len(tok)) if i % 4 == 0}

    def reward(prompts, completions):
        return [sum(t in target for t in c.token_ids) / max(1, len(c.token_ids)) for c in completions]

    config = load_config(
        None,
        steps=25,
        batch_size=16,
        mini_batch_size=8,
        max_new_tokens=4,
        learning_rate=1e-2,
        missing_eos_penalty=0.0,
        lora_r=8,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj", "o_proj", "down_proj", "lm_head"],
    )
    chats = [[{"role": "user", "content": f"Question {i}?"}] for i in range(6)] * 3
    trainer = PPOTrainer(config, build_tiny_llama(tok, initializer_range=0.1), tok, chats, reward)
    history = trainer.train(progress=False)
    first = sum(h["raw_score"] for h in history[:5]) / 5
    last = sum(h["raw_score"] for h in history[-5:]) / 5
    return {
        "device": str(trainer.accelerator.device),
        "prepared": type(trainer.model).__name__,  # DistributedDataParallel under a multi-GPU launch
        "optimizer": type(trainer.optimizer).__name__,
        "mixed_precision": trainer.accelerator.mixed_precision,
        "reward_first": round(first, 3),
        "reward_last": round(last, 3),
        "ok": last > first and trainer.accelerator.device.type == torch.device(device).type,
    }


def value_model_choice(model_dir: Path, value_model: str):
    """rl.ppo's value-model choice at the default model's size (its docstring cites these figures): seconds per
    step and peak memory with the value as a second LoRA adapter vs a head on the policy."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rl.ppo import PPOTrainer, load_config

    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    chats = [[{"role": "user", "content": q}] for q in QUESTIONS]
    config = load_config(
        None,
        steps=6,
        batch_size=32,
        mini_batch_size=16,
        ppo_epochs=2,
        max_new_tokens=48,
        learning_rate=1e-4,
        value_model=value_model,
        missing_eos_penalty=0.0,
    )
    trainer = PPOTrainer(config, policy, tok, chats, lambda p, c: [float(len(x.token_ids)) / 48 for x in c])
    trainer.train(progress=False)
    steps = trainer.history[2:]
    mean = lambda key: round(sum(h[key] for h in steps) / len(steps), 2)  # noqa: E731
    return {
        "value_model": value_model,
        "s_per_step": mean("step_s"),
        "update_s": mean("update_s"),
        "generate_s": mean("generate_s"),
    }


def quantized_default(model_dir: Path, settings, bits: str):
    from dataclasses import replace

    quantized = replace(settings, quantize={str(model_dir): bits})
    loaded = registry.resolve(str(model_dir), settings=quantized)
    footprint = loaded.model.get_memory_footprint() / 2**20
    chats = [[{"role": "user", "content": q}] for q in QUESTIONS[:16]]
    out = generate(
        loaded.model, loaded.tokenizer, chats, params=SamplingParams(max_new_tokens=16), progress=False
    )
    plain = devices.count_parameters(model_dir) * 2 / 2**20
    return {
        "placement": loaded.placement.describe(),
        "footprint_mib": round(footprint, 1),
        "bf16_mib": round(plain, 1),
        "generated": sum(len(c) for c in out),
    }


def ppo_qlora(model_dir: Path, settings, ws: list[str]):
    """PPO on a 4-bit base (QLoRA): config.yaml's `quantize` for the policy, through `alignloop rl train`."""
    from dataclasses import replace

    from sqlmodel import Session

    from alignloop.core import crud

    write_settings(replace(settings, quantize={str(model_dir): "4bit"}))
    try:
        code = cli(
            [
                "rl",
                "train",
                "--config",
                "configs/rl/tiny.yaml",
                "--policy",
                str(model_dir),
                "--reward-model",
                "rm-default",
                "--steps",
                "3",
                "--name",
                "ppo-qlora",
                *ws,
            ]
        )
    finally:
        write_settings(settings)
    with Session(make_engine(settings.db_url)) as session:
        metrics = crud.get_model_version(session, name="ppo-qlora").metrics
    return {"ok": code == 0, "s_per_step": round(metrics["train_seconds"] / metrics["steps"], 2)}


def refuses_when_too_big(model_dir: Path, settings):
    from dataclasses import replace

    from alignloop.core import AlignloopError

    half = devices.count_parameters(model_dir) * 0.5 / devices.GIB  # GiB: a quarter of the bf16 weights
    try:
        registry.resolve(str(model_dir), settings=replace(settings, memory_limit_gb=half))
    except AlignloopError as exc:
        return {"refusal": str(exc)[:120], "ok": "needs ~" in str(exc)}
    return {"ok": False, "refusal": None}


def zero2_two_process(root: Path, ws: list[str], model_dir: Path):
    import importlib.util
    import subprocess

    gpus = torch.cuda.device_count()
    if gpus < 2 or importlib.util.find_spec("deepspeed") is None:
        return {
            "ok": None,
            "skipped": f"{gpus} GPU(s), deepspeed {'present' if importlib.util.find_spec('deepspeed') else 'missing'}",
        }
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        "configs/accelerate/deepspeed_zero2.yaml",
        "--num_processes",
        "2",
        "-m",
        "alignloop.cli",
        "reward",
        "train",
        "--config",
        "configs/reward/tiny.yaml",
        "--base",
        str(model_dir),
        "--max-steps",
        "5",
        "--name",
        "rm-zero2",
        *ws,
    ]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    if done.returncode:
        return {"ok": False, "tail": done.stderr.strip().splitlines()[-1:]}
    # PPO's own trainer under the same ZeRO-2 config: its actor-critic and optimizer go through prepare.
    ppo = [
        *cmd[: cmd.index("alignloop.cli") + 1],
        "rl",
        "train",
        "--algo",
        "ppo",
        "--config",
        "configs/rl/tiny.yaml",
        "--policy",
        str(model_dir),
        "--reward-model",
        "rm-zero2",
        "--steps",
        "2",
        "--save-every",
        "0",
        "--name",
        "ppo-zero2",
        *ws,
    ]
    done = subprocess.run(ppo, cwd=ROOT, capture_output=True, text=True, timeout=300)
    return {
        "ok": done.returncode == 0,
        "ppo": "trained" if done.returncode == 0 else "failed",
        "tail": done.stderr.strip().splitlines()[-1:] if done.returncode else [],
    }


def table() -> str:
    lines = ["| check | model | ok | seconds | peak GiB | figures |", "| --- | --- | --- | --- | --- | --- |"]
    for row in ROWS:
        rest = {k: v for k, v in row.items() if k not in ("check", "model", "ok", "seconds", "peak_gib")}
        figures = ", ".join(f"{k} {v}" for k, v in rest.items())
        lines.append(
            f"| {row['check']} | {row['model']} | {row.get('ok')} | {row.get('seconds', '')} | "
            f"{row.get('peak_gib', '')} | {figures} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="run on the CPU (to test the script itself)")
    parser.add_argument("--sizes", default="tiny,default", help="tiny, default or both")
    parser.add_argument(
        "--default-dir",
        type=Path,
        default=None,
        help="the materialised default model (config and tokenizer are used, not its weights)",
    )
    parser.add_argument("--value-models", action="store_true", help="also time PPO's two value-model choices")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON rows and the table here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not args.cpu and not torch.cuda.is_available():
        print("no GPU here: run with --cpu to check the script", file=sys.stderr)
        return 2
    device = "cpu" if args.cpu else "cuda"
    expected = devices.pick(device)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    report("device", name, torch=torch.__version__, policy=expected.describe(), ok=True)
    os.chdir(ROOT)  # the configs/ paths the CLI calls name
    root = Path(tempfile.mkdtemp(prefix="cuda-check-"))
    settings, ws = make_workspace(root, device)
    sizes = args.sizes.split(",")
    dirs = {"tiny": save_tiny(root / "tiny")}
    if "default" in sizes:
        dirs["default"] = save_default_size(root / "default", args.default_dir)
    for size in sizes:
        check_size(size, dirs[size], settings, ws, expected, big=size == "default")
    timed("ppo_learns", "tiny", lambda: ppo_learns_tiny(device))
    if "default" in sizes and device == "cuda":
        timed("load_4bit", "default", lambda: quantized_default(dirs["default"], settings, "4bit"))
        timed("load_8bit", "default", lambda: quantized_default(dirs["default"], settings, "8bit"))
        timed("ppo_qlora", "default", lambda: ppo_qlora(dirs["default"], settings, ws))
        if args.value_models:
            for value_model in ("adapter", "shared"):
                timed(
                    "ppo_value_model", "default", lambda v=value_model: value_model_choice(dirs["default"], v)
                )
    timed("refuse_too_big", sizes[-1], lambda: refuses_when_too_big(dirs[sizes[-1]], settings))
    timed("zero2_2proc", "tiny", lambda: zero2_two_process(root, ws, dirs["tiny"]))
    print(table())
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "cuda_check.jsonl").write_text("".join(json.dumps(r, default=str) + "\n" for r in ROWS))
        (args.out / "cuda_check.md").write_text(table() + "\n")
    return 0 if all(r.get("ok") is not False for r in ROWS) else 1


if __name__ == "__main__":
    sys.exit(main())
