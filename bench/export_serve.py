"""Benchmark: the exported GGUF in llama.cpp vs `serve/engine.py` on CPU, for the default model, in one run.

Exports `default` as GGUF (or takes `--gguf FILE`), then for the same Vicuna-bench prompts, `max_tokens` and
temperature measures generated tokens/s and time to first token for
- `serve/engine.py`'s BatchingEngine over the registry's float32 model (what `alignloop serve` runs for
  versions without a GGUF), and
- llama-cpp-python's `Llama` over the GGUF, with one lock around it: a `Llama` decodes one sequence at a time
  and is not thread-safe, which is also how `llama_cpp.server` serves concurrent requests,
each with one client at a time and with N concurrent clients (default 8). In-process on both sides, so HTTP
costs nothing to either. Prints a table and the llama.cpp / engine ratios last. Also prints the file sizes of
the hf and GGUF exports when `--sizes` is given (exports hf, f16, q8_0 and q4_k_m; slow).

    .venv/bin/python bench/export_serve.py [--quant q8_0] [--clients 8] [--requests 16] [--max-tokens 64] [--sizes]
"""

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = (
    Path(os.environ.get("ALIGNLOOP_SHARED_DATA") or ROOT.parent / "shared" / "data")
    / "vicuna_bench_questions.jsonl"
)


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def run_load(one, prompts: list[str], clients: int) -> dict:
    results, lock, todo = [], threading.Lock(), list(prompts)

    def worker():
        while True:
            with lock:
                if not todo:
                    return
                prompt = todo.pop()
            r = one(prompt)
            with lock:
                results.append(r)

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ttft = [r["ttft"] for r in results]
    return {
        "clients": clients,
        "requests": len(results),
        "wall_s": wall,
        "tokens_per_s": sum(r["tokens"] for r in results) / wall,
        "ttft_p50": percentile(ttft, 0.5),
        "ttft_p99": percentile(ttft, 0.99),
    }


def engine_client(loaded, max_tokens: int, temperature: float):
    from serve.engine import BatchingEngine, Request, Stream

    engine = BatchingEngine(loaded.model, loaded.tokenizer)

    def one(prompt: str) -> dict:
        stream = Stream()
        start, first, tokens = time.perf_counter(), None, 0
        engine.submit(
            Request(
                prompt_ids=engine.render([{"role": "user", "content": prompt}]),
                max_tokens=max_tokens,
                temperature=temperature,
                emit=stream,
            )
        )
        for event in stream:
            if event[0] == "text" and first is None:
                first = time.perf_counter() - start
            if event[0] == "done":
                tokens = event[2]["completion_tokens"]
        return {"ttft": first or 0.0, "tokens": tokens}

    return one


def llama_cpp_client(gguf: Path, tokenizer, max_tokens: int, temperature: float):
    import llama_cpp

    from alignloop.core.sampling import render

    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=2048, n_threads=os.cpu_count(), verbose=False)
    lock = threading.Lock()  # one sequence at a time, as llama_cpp.server does

    def one(prompt: str) -> dict:
        ids = render(tokenizer, [{"role": "user", "content": prompt}])
        start, first, tokens = time.perf_counter(), None, 0  # waiting for the lock counts towards TTFT
        with lock:
            for _chunk in llm.create_completion(
                ids, max_tokens=max_tokens, temperature=temperature, top_p=1.0, stream=True
            ):
                tokens += 1  # one chunk per generated token
                if first is None:
                    first = time.perf_counter() - start
        return {"ttft": first or 0.0, "tokens": tokens}

    return one


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quant", default="q8_0", choices=["f16", "q8_0", "q4_k_m"])
    parser.add_argument("--gguf", default=None, help="an exported GGUF of `default` (skips the export)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--workspace", default=None, help="an existing workspace (its cached default model)")
    parser.add_argument("--sizes", action="store_true", help="also export hf/f16/q8_0/q4_k_m and print sizes")
    args = parser.parse_args()
    prompts = [json.loads(line)["turns"][0] for line in QUESTIONS.open()][: args.requests]

    from alignloop.core.config import load_settings
    from alignloop.core.registry import resolve
    from alignloop.core.workspace import init_workspace
    from serve.export import export_model

    tmp = Path(tempfile.mkdtemp(prefix="export-bench-"))
    if not args.workspace:
        init_workspace(tmp / "ws")
    settings = load_settings(args.workspace or tmp / "ws")
    sizes = {}
    if args.sizes:
        for fmt, quant in (("hf", "f16"), ("gguf", "f16"), ("gguf", "q8_0"), ("gguf", "q4_k_m")):
            r = export_model(settings, "default", tmp / f"{fmt}-{quant}", fmt=fmt, quant=quant)
            sizes[f"{fmt} {quant}" if fmt == "gguf" else "hf (float32 safetensors)"] = sum(r.files.values())
    if args.gguf:
        gguf = Path(args.gguf)
    elif args.sizes:
        gguf = next((tmp / f"gguf-{args.quant}").glob("*.gguf"))
    else:
        gguf = export_model(settings, "default", tmp / "bench", fmt="gguf", quant=args.quant).gguf
    loaded = resolve("default", settings=settings)

    sides = {
        "serve/engine.py (torch, float32)": engine_client(loaded, args.max_tokens, args.temperature),
        f"llama.cpp ({args.quant}, GGUF)": llama_cpp_client(
            gguf, loaded.tokenizer, args.max_tokens, args.temperature
        ),
    }
    results = {}
    for name, one in sides.items():
        one("Hello!")  # warm up
        for clients in (1, args.clients):
            results[(name, clients)] = r = run_load(one, prompts, clients)
            print(name, json.dumps(r), flush=True)

    print("\n| server | clients | requests | tokens/s | TTFT p50 ms | TTFT p99 ms |")
    print("| --- | --- | --- | --- | --- | --- |")
    for (name, clients), r in results.items():
        print(
            f"| {name} | {clients} | {r['requests']} | {r['tokens_per_s']:.1f} | {1000 * r['ttft_p50']:.0f} | "
            f"{1000 * r['ttft_p99']:.0f} |"
        )
    engine_name, llama_name = list(sides)
    for clients in (1, args.clients):
        ratio = (
            results[(llama_name, clients)]["tokens_per_s"] / results[(engine_name, clients)]["tokens_per_s"]
        )
        print(f"{clients} client(s): llama.cpp {ratio:.2f}x the tokens/s of serve/engine.py")
    if sizes:
        print("\n| default model as | size MiB |\n| --- | --- |")
        for what, size in sizes.items():
            print(f"| {what} | {size / 2**20:.1f} |")


if __name__ == "__main__":
    main()
