"""Benchmark: concurrent annotators against a live `alignloop serve` (SQLite), through the real HTTP API.

Each simulated annotator logs in (before the clock starts: argon2 is slow on purpose and a login is once a
day), fetches an item (GET /api/annotate/next), then loops on POST /api/annotate/vote, whose reply carries
the next item (fetch-and-vote in one round trip). Three runs against one server, each with its own annotators:
- sequential: one annotator alone, the baseline;
- saturation: 50 annotators with no think time at all, the most the server takes. In a closed loop the mean
  latency is annotators / throughput (Little's law), so latency there is queueing by construction;
- paced: 50 annotators together offering `--rate` votes/s (default 200), each voting on a fixed schedule.
  This is issue #3's target: at least 200 votes/s sustained with p99 under 250 ms, on this 2-core machine
  with SQLite, the load generator running on the same two cores.
Afterwards the database is checked: every acknowledged vote is there, none is duplicated, no comparison has
more votes than its target.

    .venv/bin/python bench/annotate_load.py [--annotators 50] [--votes 3000] [--rate 200] [--workers 2]

Prints votes/s and request latency p50/p99 per run, and last the ratio saturation / sequential votes/s.
"""

import argparse
import asyncio
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from sqlmodel import Session, select

from alignloop.core import crud
from alignloop.core.config import load_settings
from alignloop.core.db import make_engine, session_scope
from alignloop.core.models import Comparison, Vote
from alignloop.core.workspace import init_workspace

PASSWORD = "bench-password"


def seed(engine, *, num_comparisons: int, target_votes: int, num_users: int) -> None:
    with session_scope(engine) as s:
        for i in range(num_users):
            crud.create_user(s, name=f"ann{i}", role="annotator", password=PASSWORD)
        questions = [
            crud.PromptCreate(messages=[{"role": "user", "content": f"Question {i}?"}])
            for i in range(num_comparisons)
        ]
        prompts, _ = crud.add_prompts(s, prompts=questions, source="bench")
        for p in prompts:
            gens = [
                crud.add_generation(s, prompt_id=p.id, text=f"Answer {k} to {p.id}. " * 20) for k in range(2)
            ]
            crud.create_comparison(
                s, prompt_id=p.id, generation_ids=[g.id for g in gens], target_votes=target_votes
            )


async def login(client: httpx.AsyncClient, name: str) -> None:
    r = await client.post("/login", data={"username": name, "password": PASSWORD})
    if r.status_code not in (200, 303):
        raise RuntimeError(f"login failed for {name}: {r.status_code}")


async def annotator(client, name: str, stop_at: int, acked: list, latencies: list, interval: float) -> None:
    """Vote until the run's budget is spent: on a fixed schedule (one vote per `interval` seconds, catching up
    at once when behind), or with `interval` 0 as fast as the server answers."""
    t = time.perf_counter()
    r = await client.get("/api/annotate/next")
    latencies.append(time.perf_counter() - t)
    item = r.json() if r.status_code == 200 else None
    due = time.perf_counter() + random.random() * interval  # spread the first votes over one interval
    while item is not None and len(acked) < stop_at:
        if interval:
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            due += interval
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


async def run_load(base: str, names: list[str], num_votes: int, rate: float = 0) -> tuple[float, list, list]:
    acked, latencies = [], []
    interval = len(names) / rate if rate else 0.0
    limits = httpx.Limits(max_connections=len(names) + 4)
    clients = [
        httpx.AsyncClient(base_url=base, timeout=30, limits=limits, follow_redirects=False) for _ in names
    ]
    await asyncio.gather(*(login(c, n) for c, n in zip(clients, names, strict=True)))
    start = time.perf_counter()
    runs = (
        annotator(c, n, num_votes, acked, latencies, interval) for c, n in zip(clients, names, strict=True)
    )
    await asyncio.gather(*runs)
    elapsed = time.perf_counter() - start
    for c in clients:
        await c.aclose()
    return elapsed, acked, latencies


def pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1] * 1000 if len(values) > 1 else values[0] * 1000


def report(label: str, elapsed: float, acked: list, latencies: list) -> float:
    rate = len(acked) / elapsed
    print(
        f"{label}: {len(acked)} votes in {elapsed:.1f}s = {rate:.0f} votes/s, "
        f"request p50 {pct(latencies, 50):.1f} ms, p99 {pct(latencies, 99):.1f} ms"
    )
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--annotators", type=int, default=50)
    parser.add_argument("--votes", type=int, default=3000, help="votes in each concurrent run")
    parser.add_argument("--sequential-votes", type=int, default=300)
    parser.add_argument("--rate", type=float, default=200, help="votes/s offered in the paced run")
    parser.add_argument("--target-votes", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="server worker processes")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        ws = Path(tmp) / "ws"
        init_workspace(ws)
        engine = make_engine(load_settings(ws).db_url)
        total_votes = 2 * args.votes + args.sequential_votes
        seed(
            engine,
            num_comparisons=total_votes // args.target_votes + 2 * args.annotators,
            target_votes=args.target_votes,
            num_users=2 * args.annotators + 1,
        )
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        log = open(os.environ.get("BENCH_SERVER_LOG", ws / "serve.log"), "w")  # noqa: SIM115
        server = subprocess.Popen(
            [sys.executable, "-m", "alignloop.cli", "serve", "--port", str(port), "--workspace", str(ws),
             "--workers", str(args.workers)],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )  # fmt: skip
        base = f"http://127.0.0.1:{port}"
        try:
            for _ in range(600):
                try:
                    if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.1)
            group = [f"ann{i}" for i in range(1, args.annotators + 1)]
            paced_group = [f"ann{i}" for i in range(args.annotators + 1, 2 * args.annotators + 1)]
            sequential = asyncio.run(run_load(base, ["ann0"], args.sequential_votes))
            saturation = asyncio.run(run_load(base, group, args.votes))
            paced = asyncio.run(run_load(base, paced_group, args.votes, rate=args.rate))
        finally:
            server.terminate()
            server.wait(timeout=30)
            log.close()

        print(f"server: {args.workers} worker process(es), SQLite; load generator on the same machine")
        seq_rate = report("sequential, 1 annotator", *sequential)
        sat_rate = report(f"saturation, {args.annotators} annotators, no think time", *saturation)
        paced_rate = report(f"paced, {args.annotators} annotators offering {args.rate:.0f} votes/s", *paced)
        met = paced_rate >= 0.97 * args.rate and pct(paced[2], 99) < 250
        print(f"target {args.rate:.0f} votes/s sustained with p99 < 250 ms: {'met' if met else 'NOT met'}")

        acked = sequential[1] + saturation[1] + paced[1]
        with Session(engine) as s:
            votes = s.exec(select(Vote)).all()
            stored = {v.id for v in votes}
            pairs = [(v.comparison_id, v.user_id) for v in votes]
            comparisons = s.exec(select(Comparison)).all()
        missing = [a for a in acked if a[2] not in stored]
        over = [c.id for c in comparisons if c.num_votes > c.target_votes]
        counted = sum(c.num_votes for c in comparisons)
        duplicated = len(pairs) - len(set(pairs))
        ok = not missing and not over and not duplicated and counted == len(stored)
        print(
            f"integrity: {len(acked)} acknowledged, {len(missing)} missing, {duplicated} duplicated, "
            f"{len(over)} over target, {counted} counted = {len(stored)} stored: {'OK' if ok else 'FAILED'}"
        )
        print(f"ratio saturation / sequential votes/s: {sat_rate / seq_rate:.2f}x")


if __name__ == "__main__":
    main()
