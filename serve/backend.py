"""Which engine serves a model version, and the llama.cpp engine that serves GGUF files.

`bench/export_serve.py` measured an exported GGUF in llama.cpp at 5.6x the tokens/s of `serve/engine.py`
single-stream and 2.15x with 8 clients on a CPU, and through this module the server itself gives 3.5x and 1.3x
(`bench/serve_load.py --gguf q8_0`; README, "Take it home"), so `alignloop serve` runs a version that has a
GGUF file in llama.cpp when the `gguf` extra (llama-cpp-python) is installed. `gguf_backend` in
config.yaml decides:

- ``auto``: llama.cpp when llama_cpp is importable and the version has a GGUF, else torch. The embedded
  `default` model stays on torch: its shipped GGUF is Q4_1, and the float32 model the workspace de-quantised from
  it is what every round was trained and judged against.
- ``llama_cpp``: every version from its GGUF (`default` from its recorded export, else the shipped Q4_1 file);
  a version without one is refused with a one-line error.
- ``torch``: `serve/engine.py` for everything.

A version "has a GGUF" when its reference is a ``.gguf`` file, its `path` is one, or `alignloop export model REF
OUT --format gguf` (the CLI or the /admin button) recorded an export of it (`serve.export.record_export`) whose
file still exists; among several the most faithful quantisation wins (f16, then q8_0, then q4_k_m), the newest
first within one. A version registered as an alias (no `path`) has the GGUF of what it aliases.

`LlamaCppEngine` honours `serve/engine.py`'s contract (`Request` in, ("text", delta) ... ("done", finish, usage)
or ("error", message) out, stop strings, `max_tokens`, temperature/top-p/seed, cancellation) through the same
`advance` step, and renders chats with the same `render` over the tokenizer transformers reads from the GGUF, so
/chat, /arena and /v1 run unchanged on top of it.

Invariants:
- A `llama_cpp.Llama` is not thread-safe: each belongs to one worker thread for its whole life; requests reach
  the workers through one queue. At most `gguf_contexts` contexts per version (the first loaded when the version
  is first asked for, so a bad file fails that request; the others when concurrency first needs them).
- The licence is reviewed as for loading (`registry.review_licence`), from the GGUF's `general.license`.

Trade-offs: a context decodes one reply at a time (llama-cpp-python has no batched sampling API); the torch
engine's continuous batching is what narrows the gap under many clients. More contexts decode more replies at once, at
the cost of splitting the cores between them (`gguf_threads`) and one KV cache each. By default one context
uses every core but one (`default_threads`): the web server needs that one, and llama.cpp's threads, which
wait for each other after every op, collapse when the server preempts one of them. Sampling follows the torch
engine's (temperature, top-p; no top-k, min-p or repeat penalty), but llama.cpp's sampler draws its own random
numbers: a seed repeats a reply within one backend, not across them.
Sources: llama-cpp-python `Llama.generate` and `llama_cpp.server` (one lock per `Llama`); llama.cpp
`llama_vocab_is_eog`.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import queue
import random
import threading
from pathlib import Path

from sqlmodel import Session, col, select

from alignloop.core import AlignloopError, crud, registry
from alignloop.core.config import Settings
from alignloop.core.models import Run
from serve.engine import BatchingEngine, EngineFront, Request, advance, cancelled

log = logging.getLogger(__name__)

QUANT_PREFERENCE = ("f16", "q8_0", "q4_k_m")  # most faithful first
MAX_CONTEXT = 4096  # KV cache per context, in tokens: the model's own context if smaller


# --- which backend -------------------------------------------------------------------------------------------


def llama_cpp_available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def recorded_gguf(session: Session, ref: str) -> Path | None:
    """The best recorded GGUF export of `ref` whose file still exists (see the module docstring)."""
    runs = session.exec(
        select(Run).where(Run.kind == "export", Run.status == "succeeded").order_by(col(Run.id).desc())
    ).all()
    found = [
        (QUANT_PREFERENCE.index(r.config.get("quant")), Path(r.metrics["gguf"]))
        for r in runs
        if r.config.get("ref") == ref
        and r.config.get("format") == "gguf"
        and r.config.get("quant") in QUANT_PREFERENCE
        and r.metrics.get("gguf")
    ]
    return next((path for _, path in sorted(found, key=lambda f: f[0]) if path.is_file()), None)


def find_gguf(ref: str, *, session: Session, include_default: bool = False) -> Path | None:
    """The GGUF file that holds version `ref`, or None. `default` (and aliases of it) only with
    `include_default`: `auto` keeps the embedded model on torch."""
    seen = set()
    while ref not in seen:
        seen.add(ref)
        if ref == registry.DEFAULT_REF and not include_default:
            return None
        local = Path(ref).expanduser()
        if local.suffix == ".gguf" and local.is_file():
            return local.resolve()
        if exported := recorded_gguf(session, ref):
            return exported
        version = crud.get_model_version(session, name=ref)
        if version is None:
            return None
        if version.path is not None:
            path = Path(version.path)
            return path if path.suffix == ".gguf" and path.is_file() else None
        ref = version.base  # an alias: what it names holds its weights
    return None


def choose_backend(ref: str, *, settings: Settings, session: Session) -> tuple[str, Path | None]:
    """("torch", None) or ("llama_cpp", the GGUF file) for model reference `ref`, by `settings.gguf_backend`."""
    mode = settings.gguf_backend
    if mode == "torch":
        return "torch", None
    if mode == "auto":
        gguf = find_gguf(ref, session=session)
        return ("llama_cpp", gguf) if gguf is not None and llama_cpp_available() else ("torch", None)
    gguf = find_gguf(ref, session=session, include_default=True)
    if gguf is None and ref == registry.DEFAULT_REF:
        gguf = registry.default_gguf_path()
    if gguf is None:
        raise AlignloopError(
            f"gguf_backend is llama_cpp but model {ref!r} has no GGUF file: export one (alignloop export model "
            f"{ref} OUT --format gguf) or set gguf_backend: auto in config.yaml"
        )
    if not llama_cpp_available():
        raise AlignloopError(
            "gguf_backend is llama_cpp but llama-cpp-python is not installed: run `make gguf` or "
            "`pip install 'alignloop[gguf]'`, or set gguf_backend: auto in config.yaml"
        )
    return "llama_cpp", gguf


def open_engine(ref: str, *, settings: Settings, db) -> BatchingEngine | LlamaCppEngine:
    """What serves `ref` in `alignloop serve` (`ModelPool`'s `open_engine`); logs which backend it chose."""
    with Session(db) as session:
        backend, gguf = choose_backend(ref, settings=settings, session=session)
        if backend == "torch":
            loaded = registry.resolve(ref, settings=settings, session=session)
        else:
            version = crud.get_model_version(session, name=ref)
            licence = registry.read_licence(gguf) or (version.licence if version is not None else None)
            source = registry.ModelSource(ref=ref, path=gguf, licence=licence)
            registry.review_licence(
                source, settings=settings, session=session, allow_noncommercial=settings.allow_noncommercial
            )
    if backend == "torch":
        model = loaded.model.merge_and_unload() if hasattr(loaded.model, "merge_and_unload") else loaded.model
        log.info("serving %s with serve/engine.py (torch, %s)", ref, loaded.placement)
        return BatchingEngine(model, loaded.tokenizer)
    engine = LlamaCppEngine(gguf, contexts=settings.gguf_contexts, threads=settings.gguf_threads)
    log.info(
        "serving %s with llama.cpp from %s (up to %d contexts x %d threads)",
        ref,
        gguf,
        engine.contexts,
        engine.threads,
    )
    return engine


# --- the llama.cpp engine ------------------------------------------------------------------------------------


def default_threads(contexts: int) -> int:
    """Threads per context when `gguf_threads` is 0: the cores this process may use, less one, shared out.

    The core left over is the web server's (event loop, tokenizer, SSE). llama.cpp's threads meet at a barrier
    after every op, so one of them preempted stalls them all: in `alignloop serve` on 2 cores, 2 threads gave
    2.2-2.6 tokens/s and 1 thread 22-31 (bench/serve_load.py, README)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, (cores - 1) // contexts)


class LlamaCppEngine(EngineFront):
    """Replies decoded by llama.cpp from a GGUF file: up to `contexts` at once, one per worker thread."""

    def __init__(self, gguf: Path, *, contexts: int = 1, threads: int = 0, max_context: int = MAX_CONTEXT):
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            raise AlignloopError(
                "serving a GGUF needs llama-cpp-python (the `gguf` extra): run `make gguf`"
            ) from None
        from gguf import GGUFReader
        from transformers import AutoTokenizer

        self.gguf, self.contexts = Path(gguf), max(1, contexts)
        self.threads = threads or default_threads(self.contexts)
        fields = GGUFReader(self.gguf).fields
        arch = fields["general.architecture"].contents()
        trained = fields.get(f"{arch}.context_length")
        self.context_length = min(int(trained.contents()), max_context) if trained else max_context
        try:
            # transformers reads the tokenizer and chat template from the GGUF metadata: prompts are rendered
            # exactly as the torch engine renders them, and text is decoded the same way.
            self.tokenizer = AutoTokenizer.from_pretrained(self.gguf.parent, gguf_file=self.gguf.name)
        except (OSError, ValueError, KeyError) as exc:
            raise AlignloopError(f"cannot read the tokenizer of {self.gguf}: {exc}") from None
        self.pending: queue.Queue[Request | None] = queue.Queue()
        self.batches = 0  # replies decoded: each is its own batch here
        self.count_lock = threading.Lock()
        first = self._load()  # a broken file fails the request that asked for this version, not a worker
        for i in range(self.contexts):
            threading.Thread(
                target=self._worker,
                args=(first if i == 0 else None,),
                name=f"alignloop-llama-{i}",
                daemon=True,
            ).start()

    def close(self) -> None:
        self.pending.put(None)  # each worker ends after its reply in flight and passes the None on

    def _load(self):
        import llama_cpp

        try:
            llm = llama_cpp.Llama(
                model_path=str(self.gguf),
                n_ctx=self.context_length,
                n_threads=self.threads,
                n_threads_batch=self.threads,
                verbose=False,
            )
        except ValueError as exc:  # llama-cpp-python's "Failed to load model from file"
            raise AlignloopError(f"llama.cpp cannot load {self.gguf}: {exc}") from None
        vocab = llama_cpp.llama_model_get_vocab(llm.model)
        # Every end-of-generation token llama.cpp knows (EOS, EOT, <|im_end|> ...), as the torch engine stops
        # at the tokenizer's EOS and the generation config's.
        stops = {t for t in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, t)}
        return llm, stops | {self.tokenizer.eos_token_id}

    def _worker(self, context) -> None:
        while True:
            request = self.pending.get()
            if request is None:
                self.pending.put(None)
                if context is not None:
                    context[0].close()
                return
            if request.cancelled.is_set():
                continue  # its consumer left while it waited, as `BatchingEngine._admit` drops it
            try:
                if context is None:
                    context = self._load()
                self._decode(*context, request)
            except Exception as exc:  # a failing reply ends that request, never the worker
                log.exception("generation failed (llama.cpp, %s)", self.gguf.name)
                request.emit(("error", str(exc)))

    def _decode(self, llm, stops: set[int], r: Request) -> None:
        with self.count_lock:
            self.batches += 1
        room = self.context_length - len(r.prompt_ids)
        if room < 1:
            raise AlignloopError(
                f"the prompt ({len(r.prompt_ids)} tokens) does not fit this model's context of "
                f"{self.context_length} tokens"
            )
        llm.set_seed(r.seed if r.seed is not None else random.getrandbits(32))
        generated: list[int] = []
        emitted = 0
        for token in llm.generate(
            r.prompt_ids,
            temp=max(r.temperature, 0.0),  # 0: llama.cpp's greedy sampler
            top_p=r.top_p,
            top_k=0,
            min_p=0.0,
            typical_p=1.0,
            repeat_penalty=1.0,
            reset=True,  # reuses the KV cache of the prefix the last reply shared with this prompt
        ):
            if r.cancelled.is_set():
                cancelled(r, len(generated))
                return
            token = int(token)
            emitted, finished = advance(
                r,
                generated,
                emitted,
                token,
                self.tokenizer,
                is_stop=token in stops,
                max_tokens=min(r.max_tokens, room),
            )
            if finished:
                return
