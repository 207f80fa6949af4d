"""Concurrent chat requests decoded together: one worker thread per loaded model batches whatever is waiting.

A request (messages already rendered to token ids, its own sampling settings and stop strings) is queued. The
worker decodes every request in flight together, one token per step with the KV cache, each row sampled with its
own temperature and top-p from its own seeded generator, and sends each new piece of text straight to the
request's consumer (SSE, the Gradio chat), so replies stream token by token. Batching is continuous: between
two steps, waiting requests are encoded together (prefill) and join the batch (their cache is left-padded to the
batch's length, masked out), and rows that hit EOS, a stop string or their token limit leave it (their cache
rows are dropped, and leading columns nobody uses any more are trimmed). A new request therefore waits one
step, not for the longest reply in flight; `bench/serve_load.py` measures the whole against one request at a
time. Versions with a GGUF file may be served by llama.cpp instead (`serve/backend.py`, `gguf_backend`): it
takes the same `Request` and ends replies through the same `advance` step.
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
import torch.nn.functional as F

from alignloop.core.sampling import render, stop_token_ids

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


@dataclass
class _Row:
    """One request in flight: what it generated, what it has been sent, its sampler."""

    request: Request
    generator: torch.Generator
    generated: list[int] = field(default_factory=list)
    emitted: int = 0
    logits: torch.Tensor | None = None  # for its next token


class EngineFront:
    """What callers use on every backend (this engine, `serve.backend.LlamaCppEngine`): prompts are tokenized
    here, requests go into `self.pending`, which the backend's worker threads drain."""

    tokenizer: object
    pending: queue.Queue

    def render(self, messages: list[dict]) -> list[int]:
        return render(self.tokenizer, messages)

    def encode(self, text: str) -> list[int]:
        """A raw prompt (/v1/completions): the text as is, with the special tokens the tokenizer adds."""
        return self.tokenizer(text)["input_ids"]

    def submit(self, request: Request) -> Request:
        self.pending.put(request)
        return request


class BatchingEngine(EngineFront):
    def __init__(self, model, tokenizer, *, max_batch: int = 16, gather_ms: float = 15.0):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_batch, self.gather_s = max_batch, gather_ms / 1000
        self.stops = stop_token_ids(model, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stops[0]
        self.pending: queue.Queue[Request | None] = queue.Queue()
        self.device = next(model.parameters()).device
        self.batches = 0  # prefills: requests admitted together count once
        # transformers renamed `past_key_values` to `cache` in 5.x; speak whichever this version understands
        parameters = inspect.signature(model.forward).parameters
        self.cache_arg = "cache" if "cache" in parameters else "past_key_values"
        self.keep_last_logits = "logits_to_keep" in parameters
        self.context_length: int | None = getattr(model.config, "max_position_embeddings", None)
        self.closed = False
        threading.Thread(target=self._worker, name="alignloop-engine", daemon=True).start()

    def close(self) -> None:
        self.pending.put(None)  # the worker ends once the requests in flight are done

    # --- the loop ----------------------------------------------------------------------------------------------

    def _worker(self) -> None:
        rows: list[_Row] = []
        cache = mask = None
        while True:
            admitted = []
            try:
                admitted = self._admit(block=not rows)
                if admitted is None and not rows:
                    return
                if admitted:
                    new_rows, new_cache, new_mask = self._prefill(admitted)
                    cache, mask = _merge(cache, mask, new_cache, new_mask)
                    rows += new_rows
                keep = [i for i, row in enumerate(rows) if not self._sample_and_emit(row)]
                if len(keep) < len(rows):
                    rows = [rows[i] for i in keep]
                    cache, mask = _select(cache, mask, keep) if rows else (None, None)
                if rows:
                    cache, mask = self._step(rows, cache, mask)
            except Exception as exc:  # a failing batch ends its requests, never the worker
                log.exception("generation failed")
                joined = {id(row.request) for row in rows}
                for request in [row.request for row in rows] + [
                    r for r in admitted or [] if id(r) not in joined
                ]:
                    request.emit(("error", str(exc)))
                rows, cache, mask = [], None, None

    def _admit(self, *, block: bool) -> list[Request] | None:
        """Waiting requests that fit in the batch; blocks (then waits `gather_ms` for company) when idle.
        None: the engine was closed and nothing is in flight."""
        admitted: list[Request] = []
        if self.closed:
            return None if block else []
        if block:
            first = self.pending.get()
            if first is None or self.closed:
                self.closed = True
                return None
            admitted.append(first)
            deadline = time.monotonic() + self.gather_s
        else:
            deadline = time.monotonic()
        while len(admitted) < self.max_batch:
            try:
                more = (
                    self.pending.get(timeout=max(0.0, deadline - time.monotonic()))
                    if block
                    else self.pending.get_nowait()
                )
            except queue.Empty:
                break
            if more is None:
                self.closed = True
                break
            admitted.append(more)
        return [r for r in admitted if not r.cancelled.is_set()]

    @torch.inference_mode()
    def _prefill(self, requests: list[Request]):
        """Encode new requests together (left-padded); their rows, cache and mask, ready to merge."""
        self.batches += 1
        B, P = len(requests), max(len(r.prompt_ids) for r in requests)
        ids = torch.full((B, P), self.pad_id, dtype=torch.long)
        mask = torch.zeros((B, P), dtype=torch.long)
        for i, r in enumerate(requests):
            ids[i, P - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids)
            mask[i, P - len(r.prompt_ids) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        extra = {"logits_to_keep": 1} if self.keep_last_logits else {}
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **{self.cache_arg: None},
            **extra,
        )
        logits = out.logits[:, -1, :].float().cpu()  # rows sample on the CPU with their own generators
        rows = []
        for i, r in enumerate(requests):
            generator = torch.Generator()
            generator.manual_seed(r.seed if r.seed is not None else torch.seed())
            rows.append(_Row(request=r, generator=generator, logits=logits[i]))
        return rows, _cache_of(out), mask

    @torch.inference_mode()
    def _step(self, rows: list[_Row], cache, mask):
        """One token for every row in flight."""
        tokens = torch.tensor([[row.generated[-1]] for row in rows], device=self.device)
        positions = mask.sum(1, keepdim=True)  # each row's next position: its real tokens so far
        mask = torch.cat([mask, torch.ones((len(rows), 1), dtype=mask.dtype, device=self.device)], dim=1)
        out = self.model(
            input_ids=tokens,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **{self.cache_arg: cache},
        )
        logits = out.logits[:, -1, :].float().cpu()
        for i, row in enumerate(rows):
            row.logits = logits[i]
        return _cache_of(out), mask

    def _sample_and_emit(self, row: _Row) -> bool:
        """Sample the row's next token, send any new text; True when the row is finished."""
        r = row.request
        if r.cancelled.is_set():
            cancelled(r, len(row.generated))
            return True
        token = _sample(row.logits, r.temperature, r.top_p, row.generator)
        row.emitted, finished = advance(
            r, row.generated, row.emitted, token, self.tokenizer, is_stop=token in self.stops
        )
        return finished


def advance(
    r: Request,
    generated: list[int],
    emitted: int,
    token: int,
    tokenizer,
    *,
    is_stop: bool,
    max_tokens: int | None = None,
) -> tuple[int, bool]:
    """Append one sampled token to a reply and send what can be sent: the text not yet emitted (held back where
    it may start a stop string), then ("done", finish_reason, usage) once it ends by EOS, a stop string or
    `max_tokens` (the request's own unless a backend lowers it). Returns (characters emitted, finished?).
    Shared by every backend, so replies end and stream the same whichever engine decoded them."""
    finish = "stop" if is_stop else None
    generated.append(token)
    text_ids = generated[:-1] if finish else generated
    text = tokenizer.decode(text_ids, skip_special_tokens=True)
    cut = _stop_at(text, r.stop)
    if cut is not None:
        text, finish = text[:cut], "stop"
    elif finish is None and len(generated) >= (max_tokens or r.max_tokens):
        finish = "length"
    safe = len(text) if finish else _safe_prefix(text, r.stop)
    if safe > emitted:
        r.emit(("text", text[emitted:safe]))
        emitted = safe
    if finish:
        usage = {"prompt_tokens": len(r.prompt_ids), "completion_tokens": len(generated)}
        r.emit(("done", finish, usage))
    return emitted, finish is not None


def cancelled(r: Request, num_generated: int) -> None:
    """The last event of a reply its consumer gave up on."""
    r.emit(("done", "cancelled", {"prompt_tokens": len(r.prompt_ids), "completion_tokens": num_generated}))


# --- the KV cache of a batch whose rows come and go -----------------------------------------------------------


def _cache_of(out):
    return getattr(out, "cache", None) or out.past_key_values  # outputs were renamed later than inputs


def _layers(cache) -> list:
    layers = getattr(cache, "layers", None)
    if layers is None or not all(hasattr(layer, "keys") and hasattr(layer, "values") for layer in layers):
        raise RuntimeError("this model's cache cannot take rows joining mid-flight")
    return layers


def _merge(cache, mask, new_cache, new_mask):
    """Rows right-aligned on their latest token: left-pad the shorter side (zeros, masked out), stack rows."""
    if cache is None:
        return new_cache, new_mask
    T, Tn = mask.shape[1], new_mask.shape[1]
    for layer, new in zip(_layers(cache), _layers(new_cache), strict=True):
        keys, values, new_keys, new_values = layer.keys, layer.values, new.keys, new.values
        if T < Tn:
            keys, values = (F.pad(t, (0, 0, Tn - T, 0)) for t in (keys, values))
        elif Tn < T:
            new_keys, new_values = (F.pad(t, (0, 0, T - Tn, 0)) for t in (new_keys, new_values))
        layer.keys, layer.values = torch.cat([keys, new_keys]), torch.cat([values, new_values])
    width = max(T, Tn)
    mask = torch.cat([F.pad(mask, (width - T, 0)), F.pad(new_mask, (width - Tn, 0))])
    return cache, mask


def _select(cache, mask, keep: list[int]):
    """Keep some rows; drop leading columns no remaining row uses."""
    index = torch.tensor(keep, device=mask.device)
    mask = mask[index]
    used = mask.any(0).nonzero()
    start = int(used[0]) if len(used) else 0
    for layer in _layers(cache):
        layer.keys, layer.values = layer.keys[index, :, start:], layer.values[index, :, start:]
    return cache, mask[:, start:]


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
    """Loaded engines by model reference, the least recently used unloaded past `capacity`.

    `open_engine(ref)` returns what serves `ref`: a `BatchingEngine`, or another backend with the same surface
    (`render`, `encode`, `submit`, `close`, `context_length`; `serve/backend.py` picks which)."""

    def __init__(self, open_engine: Callable[[str], BatchingEngine], *, capacity: int = 3):
        self.open_engine, self.capacity = open_engine, capacity
        self.engines: OrderedDict[str, BatchingEngine] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, ref: str) -> BatchingEngine:
        with self.lock:
            if ref in self.engines:
                self.engines.move_to_end(ref)
                return self.engines[ref]
            engine = self.open_engine(ref)
            self.engines[ref] = engine
            while len(self.engines) > self.capacity:
                self.engines.popitem(last=False)[1].close()
            return engine
