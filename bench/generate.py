"""Benchmark: tokens/s of `alignloop.core.sampling` (batched, left-padded, KV cache) against a naive loop that calls
`model.generate` once per prompt, on the default model and 32 Vicuna-bench prompts, both in this run.

    .venv/bin/python bench/generate.py [--prompts 32] [--max-new-tokens 64] [--batch-size 32]

Prints both throughputs and, last, the ratio batched / naive (the issue's target: at least 4x).

    .venv/bin/python bench/generate.py --hh [--rounds 3]

RL's rollout shape instead: batches of 16 full-context HH conversations (the shared HH harmless dev prompts,
fitted to 256 tokens as `rl train` fits them) x 48 new tokens, `generate` with its grouped prefill and growing
cache against the same call with the library's own prefill and cache (`sampling.prefill` switched off),
alternating in one run; prints seconds per batch (mean +- standard error over rounds) and the ratio.
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from alignloop.core.config import new_settings  # noqa: E402
from alignloop.core.registry import resolve  # noqa: E402
from alignloop.core.sampling import SamplingParams, generate, render, stop_token_ids  # noqa: E402

QUESTIONS = Path(__file__).resolve().parents[2] / "shared" / "data" / "vicuna_bench_questions.jsonl"


@torch.inference_mode()
def naive_loop(model, tokenizer, prompts, params: SamplingParams) -> int:
    """The baseline most scripts start from: one `model.generate` call per prompt, batch size 1."""
    stops = stop_token_ids(model, tokenizer)
    tokens = 0
    torch.manual_seed(params.seed)
    for messages in prompts:
        ids = torch.tensor([render(tokenizer, messages)])
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=True,
            temperature=params.temperature,
            top_p=params.top_p,
            max_new_tokens=params.max_new_tokens,
            eos_token_id=stops,
            pad_token_id=tokenizer.pad_token_id,
        )
        tokens += out.shape[1] - ids.shape[1]
    return tokens


def hh_prefill(model, tokenizer, rounds: int) -> None:
    """Grouped prefill + growing cache against the library's prefill, on RL-shaped HH batches."""
    import statistics
    from unittest import mock

    from ppo_vs_trl import hh_conversations  # the same 64 conversations the PPO benchmark's HH settings use

    from alignloop.core import sampling

    conversations, _ = hh_conversations(tokenizer, 64, 256)
    batches = [conversations[i : i + 16] for i in range(0, 64, 16)]
    params = SamplingParams(max_new_tokens=48, temperature=0.7, top_p=1.0, seed=0)
    times: dict[str, list[float]] = {"grouped prefill": [], "library prefill": []}
    generate(model, tokenizer, batches[0][:2], params=SamplingParams(max_new_tokens=4), progress=False)
    grouped_prefill = sampling.prefill
    for _ in range(rounds):
        for name in times:
            grouped = name == "grouped prefill"
            with mock.patch.object(sampling, "prefill", grouped_prefill if grouped else lambda *a: None):
                start = time.perf_counter()
                for batch in batches:
                    generate(model, tokenizer, batch, params=params, batch_size=16, progress=False)
                times[name].append((time.perf_counter() - start) / len(batches))
    for name, values in times.items():
        se = statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else 0.0
        print(f"{name}: {statistics.mean(values):.2f} +- {se:.2f} s per batch of 16 x 48 tokens")
    ratio = statistics.mean(times["grouped prefill"]) / statistics.mean(times["library prefill"])
    print(f"ratio grouped / library prefill: {ratio:.2f}x time")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--workspace", default=None, help="reuse a workspace's model cache (default: a temp one)"
    )
    parser.add_argument("--hh", action="store_true", help="RL-shaped HH batches: grouped vs library prefill")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.hh:
        with tempfile.TemporaryDirectory() as tmp:
            loaded = resolve("default", settings=new_settings(Path(args.workspace or tmp)))
            print(
                f"model: SmolLM2-135M-Instruct {loaded.model.dtype} on {torch.get_num_threads()} CPU threads"
            )
            hh_prefill(loaded.model, loaded.tokenizer, args.rounds)
        return

    questions = [json.loads(line) for line in QUESTIONS.read_text().splitlines()][: args.prompts]
    prompts = [[{"role": "user", "content": q["turns"][0]}] for q in questions]
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=0.7, top_p=0.9, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        settings = new_settings(Path(args.workspace or tmp))
        loaded = resolve("default", settings=settings)
        model, tokenizer = loaded.model, loaded.tokenizer
        print(
            f"model: SmolLM2-135M-Instruct fp32 on {torch.get_num_threads()} CPU threads; {len(prompts)} prompts, "
            f"max_new_tokens={args.max_new_tokens}, temperature={params.temperature}, top_p={params.top_p}"
        )

        generate(
            model, tokenizer, prompts[:2], params=SamplingParams(max_new_tokens=4), progress=False
        )  # warm-up

        start = time.perf_counter()
        naive_tokens = naive_loop(model, tokenizer, prompts, params)
        naive_s = time.perf_counter() - start
        naive_tps = naive_tokens / naive_s
        print(
            f"naive loop (model.generate per prompt): {naive_tokens} tokens in {naive_s:.1f}s = {naive_tps:.1f} tok/s"
        )

        start = time.perf_counter()
        results = generate(
            model, tokenizer, prompts, params=params, batch_size=args.batch_size, progress=False
        )
        batched_s = time.perf_counter() - start
        batched_tokens = sum(c.num_tokens for samples in results for c in samples)
        batched_tps = batched_tokens / batched_s
        print(
            f"alignloop.core.sampling (batch {args.batch_size}): {batched_tokens} tokens in {batched_s:.1f}s "
            f"= {batched_tps:.1f} tok/s"
        )
    print(f"ratio alignloop.core.sampling / naive loop: {batched_tps / naive_tps:.2f}x")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
