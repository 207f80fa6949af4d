"""Concurrent chat requests decoded together: one worker thread per loaded model batches whatever is waiting.

A request (messages already rendered to token ids, its own sampling settings and stop strings) is queued; the
worker takes every waiting request (up to `max_batch`, after waiting at most `gather_ms` for company), left-pads
them into one batch and decodes step by step with the KV cache, sampling each row with its own temperature and
top-p from its own seeded generator. Each new piece of text goes straight to the request's consumer (SSE, the
Gradio chat), so replies stream token by token; a row that hits EOS, a stop string or its token limit drops
out of the output while the others go on. Requests arriving mid-batch wait for the next one (static batching:
simple, and on a CPU the batch's matrix products are where the speed-up comes from; `bench/serve_load.py`
measures it against one request at a time).
"""

from __future__ import annotations

import inspect
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from alignloop.generate import render, stop_token_ids

log = logging.getLogger(__name__)


@dataclass
class Request:
    prompt_ids: list[int]
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    emit: Callable[[tuple], None] | None = None  # ("text", delta) ... then ("done", finish_reason, usage)
    cancelled: threading.Event = field(default_factory=threading.Event)


class Stream:
    """A blocking iterator over one request's events, for threads (the Gradio handlers)."""

    def __init__(self):
        self.queue: queue.Queue = queue.Queue()

    def __call__(self, event: tuple) -> None:
        self.queue.put(event)

    def __iter__(self):
        while True:
            event = self.queue.get()
            yield event
            if event[0] in ("done", "error"):
                return


class BatchingEngine:
    def __init__(self, model, tokenizer, *, max_batch: int = 16, gather_ms: float = 15.0):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_batch, self.gather_s = max_batch, gather_ms / 1000
        self.stops = stop_token_ids(model, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stops[0]
        self.pending: queue.Queue[Request] = queue.Queue()
        self.device = next(model.parameters()).device
        self.batches = 0
        # transformers renamed `past_key_values` to `cache` in 5.x; speak whichever this version understands
        self.cache_arg = (
            "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        )
        threading.Thread(target=self._worker, name="alignloop-engine", daemon=True).start()

    def render(self, messages: list[dict]) -> list[int]:
        return render(self.tokenizer, messages)

    def submit(self, request: Request) -> Request:
        self.pending.put(request)
        return request

    def close(self) -> None:
        self.pending.put(None)  # the worker ends after the batch in hand

    def _worker(self) -> None:
        while True:
            first = self.pending.get()
            if first is None:
                return
            batch = [first]
            deadline = time.monotonic() + self.gather_s
            while len(batch) < self.max_batch:
                try:
                    more = self.pending.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if more is None:
                    self.pending.put(None)
                    break
                batch.append(more)
            batch = [r for r in batch if not r.cancelled.is_set()]
            if not batch:
                continue
            try:
                self._decode(batch)
            except Exception as exc:  # one bad batch must not kill the worker
                log.exception("generation failed")
                for r in batch:
                    r.emit(("error", str(exc)))

    @torch.inference_mode()
    def _decode(self, batch: list[Request]) -> None:
        self.batches += 1
        B, P = len(batch), max(len(r.prompt_ids) for r in batch)
        ids = torch.full((B, P), self.pad_id, dtype=torch.long)
        mask = torch.zeros((B, P), dtype=torch.long)
        for i, r in enumerate(batch):
            ids[i, P - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids)
            mask[i, P - len(r.prompt_ids) :] = 1
        generators = []
        for r in batch:
            g = torch.Generator()
            g.manual_seed(r.seed if r.seed is not None else torch.seed())
            generators.append(g)
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        generated: list[list[int]] = [[] for _ in batch]
        emitted = [0] * B  # characters already sent
        active = [True] * B
        past, step_ids, step_pos = None, ids, positions
        for _ in range(max(r.max_tokens for r in batch)):
            out = self.model(input_ids=step_ids, attention_mask=mask, position_ids=step_pos, use_cache=True,
                             **{self.cache_arg: past})  # fmt: skip
            past = (
                getattr(out, "cache", None) or out.past_key_values
            )  # outputs were renamed later than inputs
            logits = out.logits[:, -1, :].float().cpu()  # rows sample on the CPU with their own generators
            next_ids = torch.full((B,), self.pad_id, dtype=torch.long)
            for i, r in enumerate(batch):
                if not active[i]:
                    continue
                if r.cancelled.is_set():
                    active[i] = False
                    continue
                token = _sample(logits[i], r.temperature, r.top_p, generators[i])
                next_ids[i] = token
                finish = None
                if token in self.stops:
                    finish = "stop"
                else:
                    generated[i].append(token)
                text = self.tokenizer.decode(generated[i], skip_special_tokens=True)
                cut = _stop_at(text, r.stop)
                if cut is not None:
                    text, finish = text[:cut], "stop"
                elif finish is None and len(generated[i]) >= r.max_tokens:
                    finish = "length"
                safe = len(text) if finish else _safe_prefix(text, r.stop)
                if safe > emitted[i]:
                    r.emit(("text", text[emitted[i] : safe]))
                    emitted[i] = safe
                if finish:
                    active[i] = False
                    eos = 1 if token in self.stops else 0  # the end-of-turn token was generated too
                    usage = {"prompt_tokens": len(r.prompt_ids), "completion_tokens": len(generated[i]) + eos}
                    r.emit(("done", finish, usage))
            if not any(active):
                break
            step_ids = next_ids.to(self.device)[:, None]
            step_pos = step_pos[:, -1:] + 1
            mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype, device=self.device)], dim=1)
        for i, r in enumerate(batch):  # cancelled rows still get their end
            if active[i] or r.cancelled.is_set():
                r.emit(("done", "cancelled" if r.cancelled.is_set() else "length",
                        {"prompt_tokens": len(r.prompt_ids), "completion_tokens": len(generated[i])}))  # fmt: skip


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(0) - sorted_probs < top_p  # the smallest set whose mass reaches top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


def _stop_at(text: str, stops: list[str]) -> int | None:
    hits = [text.find(s) for s in stops if s and s in text]
    return min(hits) if hits else None


def _safe_prefix(text: str, stops: list[str]) -> int:
    """How much of `text` can be sent: hold back a tail that may be the start of a stop string, and a
    trailing replacement character (half a multi-byte character)."""
    end = len(text.rstrip("\ufffd"))
    for s in stops:
        for k in range(min(len(s) - 1, end), 0, -1):
            if text[:end].endswith(s[:k]):
                end -= k
                break
    return end


class ModelPool:
    """Loaded engines by model reference, the least recently used unloaded past `capacity`."""

    def __init__(self, loader: Callable[[str], tuple], *, capacity: int = 3, max_batch: int = 16):
        self.loader, self.capacity, self.max_batch = loader, capacity, max_batch
        self.engines: OrderedDict[str, BatchingEngine] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, ref: str) -> BatchingEngine:
        with self.lock:
            if ref in self.engines:
                self.engines.move_to_end(ref)
                return self.engines[ref]
            model, tokenizer = self.loader(ref)
            engine = BatchingEngine(model, tokenizer, max_batch=self.max_batch)
            self.engines[ref] = engine
            while len(self.engines) > self.capacity:
                self.engines.popitem(last=False)[1].close()
            return engine
