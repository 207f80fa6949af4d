"""Benchmark: concurrent annotators against a live `alignloop serve` (SQLite), through the real HTTP API.

Each simulated annotator logs in, fetches an item (GET /api/annotate/next), then loops on POST /api/annotate/vote,
whose reply carries the next item (fetch-and-vote in one round trip). The baseline is
one annotator doing the same alone, in the same run. Afterwards the database is checked: every acknowledged
vote is there, none is duplicated, no comparison has more votes than its target.

    .venv/bin/python bench/annotate_load.py [--annotators 50] [--votes 3000] [--target-votes 3]

Prints votes/s and request latency p50/p99 for both, and last the ratio concurrent / sequential votes/s.
Target (issue #3): at least 200 votes/s with p99 under 250 ms with 50 annotators on a 2-core machine.
"""

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from sqlmodel import Session, select

from alignloop import crud
from alignloop.cli import init_workspace
from alignloop.config import load_settings
from alignloop.db import make_engine, session_scope
from alignloop.models import Comparison, Vote

PASSWORD = "bench-password"


def seed(engine, *, num_comparisons: int, target_votes: int, num_annotators: int) -> None:
    with session_scope(engine) as s:
        for i in range(num_annotators + 1):
            crud.create_user(s, name=f"ann{i}", role="annotator", password=PASSWORD)
        prompts, _ = crud.add_prompts(
            s, prompts=[crud.PromptCreate(messages=[{"role": "user", "content": f"Question {i}?"}]) for i in range(num_comparisons)],
            source="bench",
        )  # fmt: skip
        for p in prompts:
            gens = [
                crud.add_generation(s, prompt_id=p.id, text=f"Answer {k} to {p.id}. " * 20) for k in range(2)
            ]
            crud.create_comparison(
                s, prompt_id=p.id, generation_ids=[g.id for g in gens], target_votes=target_votes
            )


async def annotator(client: httpx.AsyncClient, name: str, stop_at: list[int], acked: list, latencies: list):
    r = await client.post("/login", data={"username": name, "password": PASSWORD})
    if r.status_code not in (200, 303):
        raise RuntimeError(f"login failed for {name}: {r.status_code}")
    t = time.perf_counter()
    r = await client.get("/api/annotate/next")
    latencies.append(time.perf_counter() - t)
    item = r.json() if r.status_code == 200 else None
    while item is not None and len(acked) < stop_at[0]:
        t = time.perf_counter()
        r = await client.post(
            "/api/annotate/vote", json={"comparison_id": item["comparison_id"], "choice": "a", "seconds": 1.0}
        )
        latencies.append(time.perf_counter() - t)
        if r.status_code == 201:
            body = r.json()
            acked.append((name, item["comparison_id"], body["vote_id"]))
            item = body["next"]
        elif r.status_code == 409:  # someone else completed it (a lease expired): fetch a fresh item
            r = await client.get("/api/annotate/next")
            item = r.json() if r.status_code == 200 else None
        else:
            raise RuntimeError(f"vote failed: {r.status_code} {r.text}")


async def run_load(base: str, names: list[str], num_votes: int) -> tuple[float, list, list]:
    acked, latencies, stop_at = [], [], [num_votes]
    limits = httpx.Limits(max_connections=len(names) + 4)
    clients = [
        httpx.AsyncClient(base_url=base, timeout=30, limits=limits, follow_redirects=False) for _ in names
    ]
    start = time.perf_counter()
    await asyncio.gather(
        *(annotator(c, n, stop_at, acked, latencies) for c, n in zip(clients, names, strict=True))
    )
    elapsed = time.perf_counter() - start
    for c in clients:
        await c.aclose()
    return elapsed, acked, latencies


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[q - 1] * 1000 if len(values) > 1 else values[0] * 1000


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--annotators", type=int, default=50)
    parser.add_argument("--votes", type=int, default=3000)
    parser.add_argument("--sequential-votes", type=int, default=300)
    parser.add_argument("--target-votes", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="server worker processes")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        ws = Path(tmp) / "ws"
        init_workspace(ws)
        settings = load_settings(ws)
        engine = make_engine(settings.db_url)
        num_comparisons = (args.votes + args.sequential_votes) // args.target_votes + args.annotators
        seed(
            engine,
            num_comparisons=num_comparisons,
            target_votes=args.target_votes,
            num_annotators=args.annotators,
        )

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        log = open(os.environ.get("BENCH_SERVER_LOG", ws / "serve.log"), "w")  # noqa: SIM115
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        server = subprocess.Popen(
            [sys.executable, "-m", "alignloop.cli", "serve", "--port", str(port), "--workspace", str(ws),
             "--workers", str(args.workers)],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
        base = f"http://127.0.0.1:{port}"
        try:
            for _ in range(600):
                try:
                    if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.1)
            import logging

            logging.disable(logging.INFO)
            seq_s, seq_acked, seq_lat = asyncio.run(run_load(base, ["ann0"], args.sequential_votes))
            names = [f"ann{i}" for i in range(1, args.annotators + 1)]
            con_s, con_acked, con_lat = asyncio.run(run_load(base, names, args.votes))
        finally:
            server.terminate()
            server.wait(timeout=30)
            log.close()

        acked = seq_acked + con_acked
        with Session(engine) as s:
            votes = {v.id for v in s.exec(select(Vote)).all()}
            missing = [a for a in acked if a[2] not in votes]
            pairs = [(v.comparison_id, v.user_id) for v in s.exec(select(Vote)).all()]
            over = [c.id for c in s.exec(select(Comparison)).all() if c.num_votes > c.target_votes]
            counted = sum(c.num_votes for c in s.exec(select(Comparison)).all())
        seq_rate, con_rate = len(seq_acked) / seq_s, len(con_acked) / con_s
        print(
            f"sequential, 1 annotator: {len(seq_acked)} votes in {seq_s:.1f}s = {seq_rate:.0f} votes/s, "
            f"request p50 {pct(seq_lat, 50):.1f} ms, p99 {pct(seq_lat, 99):.1f} ms"
        )
        print(
            f"concurrent, {args.annotators} annotators: {len(con_acked)} votes in {con_s:.1f}s = {con_rate:.0f} votes/s, "
            f"request p50 {pct(con_lat, 50):.1f} ms, p99 {pct(con_lat, 99):.1f} ms"
        )
        print(
            f"integrity: {len(acked)} acknowledged, {len(missing)} missing, "
            f"{len(pairs) - len(set(pairs))} duplicated, {len(over)} over target, "
            f"{counted} counted = {len(votes)} stored: {'OK' if not missing and not over and counted == len(votes) and len(pairs) == len(set(pairs)) else 'FAILED'}"
        )
        print(f"ratio concurrent / sequential votes/s: {con_rate / seq_rate:.2f}x")


if __name__ == "__main__":
    main()
