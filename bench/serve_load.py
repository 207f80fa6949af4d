"""Benchmark: concurrent chat completions against a live server with the default model.

Starts `alignloop serve` on a fresh workspace, creates an API key, warms the model, then with the official
`openai` client and streaming requests measures, for the same prompts (Vicuna-bench questions) and the same
`max_tokens`:
- the baseline: one request at a time;
- N concurrent clients (default 8), each sending its requests back to back.
Reports requests/s, generated tokens/s and time to first token (p50/p99). The ratio of concurrent to
sequential tokens/s is printed last (target: at least 3x with 8 clients, i.e. batched, not serialised).

With `--gguf QUANT` the same load runs a second time against the same server configuration with `default`
exported to GGUF (`alignloop export model default OUT --format gguf --quant QUANT`, which records the export) and
`gguf_backend: llama_cpp`, so llama.cpp serves it through `serve/backend.py`; the llama.cpp / torch ratios are
printed last (the torch engine is the named baseline).

    .venv/bin/python bench/serve_load.py [--clients 8] [--requests 32] [--max-tokens 64] [--gguf q8_0]
"""

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import openai
import yaml

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = (
    Path(os.environ.get("ALIGNLOOP_SHARED_DATA") or ROOT.parent / "shared" / "data")
    / "vicuna_bench_questions.jsonl"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def one_request(client, prompt: str, max_tokens: int) -> dict:
    start = time.perf_counter()
    first, tokens = None, 0
    stream = client.chat.completions.create(
        model="default",
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        temperature=0.7,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content and first is None:
            first = time.perf_counter() - start
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return {"seconds": time.perf_counter() - start, "ttft": first or 0.0, "tokens": tokens}


def run_load(client, prompts: list[str], clients: int, max_tokens: int) -> dict:
    results, lock, todo = [], threading.Lock(), list(prompts)

    def worker():
        while True:
            with lock:
                if not todo:
                    return
                prompt = todo.pop()
            r = one_request(client, prompt, max_tokens)
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
        "requests_per_s": len(results) / wall,
        "tokens_per_s": sum(r["tokens"] for r in results) / wall,
        "ttft_p50": percentile(ttft, 0.5),
        "ttft_p99": percentile(ttft, 0.99),
    }


def measure(alignloop: str, workspace: Path, key: str, prompts: list[str], args) -> tuple[dict, dict]:
    """Start `alignloop serve` on the workspace, warm it, run the load sequentially then concurrently."""
    port = free_port()
    log = open(workspace / "serve.log", "a")  # noqa: SIM115
    server = subprocess.Popen(
        [alignloop, "serve", "--port", str(port), "--workspace", str(workspace)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "OMP_NUM_THREADS": str(os.cpu_count())},
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        client = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=600)
        print("warming up (the first request loads the model) ...", flush=True)
        one_request(client, "Hello!", 8)
        sequential = run_load(client, prompts, 1, args.max_tokens)
        print("sequential:", json.dumps(sequential), flush=True)
        concurrent = run_load(client, prompts, args.clients, args.max_tokens)
        print(f"{args.clients} clients:", json.dumps(concurrent), flush=True)
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
    return sequential, concurrent


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument(
        "--gguf", choices=["f16", "q8_0", "q4_k_m"], default=None, help="also serve a GGUF export"
    )
    args = parser.parse_args()
    prompts = [json.loads(line)["turns"][0] for line in QUESTIONS.open()][: args.requests]

    workspace = Path(tempfile.mkdtemp(prefix="serve-bench-")) / "ws"
    alignloop = shutil.which("alignloop", path=str(Path(sys.executable).parent)) or "alignloop"
    ws = ["--workspace", str(workspace)]
    subprocess.run([alignloop, "init", *ws], check=True, capture_output=True)
    out = subprocess.run(
        [alignloop, "keys", "create", "bench", *ws], check=True, capture_output=True, text=True
    ).stdout
    key = out.strip().splitlines()[-1]
    runs = {"serve/engine.py (torch)": measure(alignloop, workspace, key, prompts, args)}
    if args.gguf:
        print(f"exporting default as GGUF {args.gguf} ...", flush=True)
        export = workspace.parent / f"default-{args.gguf}"
        subprocess.run(
            [
                alignloop,
                "export",
                "model",
                "default",
                str(export),
                "--format",
                "gguf",
                "--quant",
                args.gguf,
                *ws,
            ],
            check=True,
            capture_output=True,
        )
        config = workspace / "config.yaml"
        config.write_text(yaml.safe_dump({**yaml.safe_load(config.read_text()), "gguf_backend": "llama_cpp"}))
        runs[f"llama.cpp ({args.gguf} GGUF)"] = measure(alignloop, workspace, key, prompts, args)
        served = [
            line for line in (workspace / "serve.log").read_text().splitlines() if "serving default" in line
        ]
        print("\n".join(served))

    print("\n| server | load | requests | req/s | tokens/s | TTFT p50 ms | TTFT p99 ms |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for server, (sequential, concurrent) in runs.items():
        for name, r in (
            ("1 client (sequential)", sequential),
            (f"{args.clients} concurrent clients", concurrent),
        ):
            print(
                f"| {server} | {name} | {r['requests']} | {r['requests_per_s']:.2f} | {r['tokens_per_s']:.1f} | "
                f"{1000 * r['ttft_p50']:.0f} | {1000 * r['ttft_p99']:.0f} |"
            )
    for server, (sequential, concurrent) in runs.items():
        ratio = concurrent["tokens_per_s"] / sequential["tokens_per_s"]
        print(
            f"{server}: {args.clients} concurrent clients give {ratio:.2f}x the tokens/s of sequential requests"
        )
    if args.gguf:
        (torch_seq, torch_conc), (gguf_seq, gguf_conc) = runs.values()
        print(
            f"llama.cpp / torch engine tokens/s: {gguf_seq['tokens_per_s'] / torch_seq['tokens_per_s']:.2f}x "
            f"for 1 client, {gguf_conc['tokens_per_s'] / torch_conc['tokens_per_s']:.2f}x for {args.clients}"
        )


if __name__ == "__main__":
    main()
