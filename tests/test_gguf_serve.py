"""`alignloop serve` runs versions with a GGUF file in llama.cpp (serve/backend.py): the OpenAI endpoints through
the official client, streaming or not, give the torch engine's greedy text at f16; concurrent clients are all
answered; `gguf_backend` picks the backend and refuses what it cannot do in one line.

One tiny model (SmolLM2's tokenizer, a 2-layer Llama; the fixtures of test_model_export) is exported to an f16
GGUF once for the module, through the CLI, which records the export the server finds.
"""

import dataclasses
import threading

import openai
import pytest
import yaml
from conftest import serve_in_thread
from sqlmodel import Session
from test_model_export import base_dir, gguf_ready, needs_gguf, smol_tokenizer  # noqa: F401

from alignloop.cli import main
from alignloop.core import AlignloopError, crud
from alignloop.core.config import load_settings
from alignloop.core.db import make_engine, session_scope
from alignloop.core.registry import default_gguf_path
from alignloop.core.workspace import init_workspace
from alignloop.web import create_app
from serve.backend import LlamaCppEngine, choose_backend
from serve.chat import stream_text
from serve.engine import BatchingEngine, Request, Stream

HELLO = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def ws(tmp_path_factory, base_dir):  # noqa: F811
    """A workspace with `tiny-v0` (exported to GGUF f16 by the CLI) and `plain-v0` (the same weights, no GGUF)."""
    if not gguf_ready():
        pytest.skip("needs `make gguf` (llama-cpp-python + converter)")
    root = tmp_path_factory.mktemp("gguf-serve")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("ALIGNLOOP_DATABASE_URL", raising=False)
        init_workspace(root / "ws")
        settings = load_settings(root / "ws")
    engine = make_engine(settings.db_url)
    with session_scope(engine) as s:
        for name in ("tiny-v0", "plain-v0"):
            crud.register_model(s, name=name, kind="policy", base=str(base_dir), path=str(base_dir))
        key, _ = crud.create_api_key(s, user=crud.get_user(s, name="admin"), name="tests")
    out = root / "tiny-gguf"
    argv = [
        "export",
        "model",
        "tiny-v0",
        str(out),
        "--format",
        "gguf",
        "--workspace",
        str(settings.workspace),
    ]
    assert main(argv) == 0
    yield settings, engine, key, out / "tiny-gguf-f16.gguf"
    engine.dispose()


def client_for(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)


def replies(client: openai.OpenAI, model: str) -> dict:
    """Greedy chat and text completions, whole and streamed, from one server."""
    chat = client.chat.completions.create(model=model, messages=HELLO, max_tokens=8, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model=model,
            messages=HELLO,
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = client.completions.create(
        model=model, prompt="The capital of France is", max_tokens=6, temperature=0
    )
    text_chunks = list(
        client.completions.create(
            model=model, prompt="The capital of France is", max_tokens=6, temperature=0, stream=True
        )
    )
    return {
        "chat": chat,
        "chat_streamed": "".join(c.choices[0].delta.content or "" for c in chunks if c.choices),
        "chat_pieces": sum(1 for c in chunks if c.choices and c.choices[0].delta.content),
        "chat_usage": chunks[-1].usage,
        "text": text,
        "text_streamed": "".join(c.choices[0].text for c in text_chunks),
    }


@needs_gguf
def test_openai_client_against_a_gguf_version_matches_the_torch_engine(ws):
    settings, engine, key, gguf = ws
    torch_settings = dataclasses.replace(settings, gguf_backend="torch")
    with serve_in_thread(create_app(torch_settings, engine)) as url:
        expected = replies(client_for(url, key), "tiny-v0")

    app = create_app(settings, engine)  # gguf_backend: auto
    with serve_in_thread(app) as url:
        client = client_for(url, key)
        got = replies(client, "tiny-v0")
        served = app.state.model_pool.engines["tiny-v0"]
        assert isinstance(served, LlamaCppEngine) and served.gguf == gguf

        # Greedy f16 in llama.cpp gives the torch engine's text, through both endpoints, whole and streamed.
        assert got["chat"].choices[0].message.content == expected["chat"].choices[0].message.content != ""
        assert got["chat"].choices[0].finish_reason == expected["chat"].choices[0].finish_reason
        assert got["chat"].usage.prompt_tokens == expected["chat"].usage.prompt_tokens
        assert got["chat"].usage.completion_tokens == expected["chat"].usage.completion_tokens
        assert got["chat_streamed"] == got["chat"].choices[0].message.content and got["chat_pieces"] >= 2
        assert got["chat_usage"].completion_tokens == got["chat"].usage.completion_tokens
        assert got["text"].object == "text_completion"
        assert got["text"].choices[0].text == expected["text"].choices[0].text != ""
        assert got["text_streamed"] == got["text"].choices[0].text
        assert got["text"].usage.prompt_tokens == expected["text"].usage.prompt_tokens

        # Sampling settings are honoured: a seed repeats, max_tokens caps, a stop string cuts.
        sampled = [
            client.chat.completions.create(
                model="tiny-v0", messages=HELLO, max_tokens=12, temperature=1.5, top_p=0.9, seed=7
            ).choices[0]
            for _ in range(2)
        ]
        assert sampled[0].message.content == sampled[1].message.content
        one = client.chat.completions.create(model="tiny-v0", messages=HELLO, max_tokens=1, temperature=0)
        assert one.usage.completion_tokens == 1 and one.choices[0].finish_reason == "length"
        full = got["chat"].choices[0].message.content
        stop = full[3:6]
        cut = client.chat.completions.create(
            model="tiny-v0", messages=HELLO, max_tokens=8, temperature=0, stop=[stop]
        )
        assert cut.choices[0].message.content == full[: full.find(stop)]
        assert cut.choices[0].finish_reason == "stop"

        # Bad input gets the same OpenAI-shaped one-line errors as on the torch engine.
        too_long = [{"role": "user", "content": "word " * 600}]  # the tiny model's context is 512 tokens
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model="tiny-v0", messages=too_long, max_tokens=8)
        assert (
            err.value.body["code"] == "context_length_exceeded" and "512 tokens" in err.value.body["message"]
        )
        for bad in ({"temperature": 5}, {"max_tokens": 0}, {"n": 2}):
            with pytest.raises(openai.BadRequestError):
                client.chat.completions.create(model="tiny-v0", messages=HELLO, **bad)
            with pytest.raises(openai.BadRequestError):
                client.completions.create(model="tiny-v0", prompt="Hi", **bad)
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model="tiny-v0", prompt=["a", "b"])

        # /chat and /arena stream through the same pool: their replies come from llama.cpp too.
        stream, _ = stream_text(app.state.model_pool, settings, "tiny-v0", HELLO, temperature=0, max_tokens=8)
        events = list(stream)
        assert "".join(e[1] for e in events if e[0] == "text") == full and events[-1][0] == "done"


@needs_gguf
def test_concurrent_clients_are_all_answered(ws):
    settings, engine, key, _ = ws
    app = create_app(dataclasses.replace(settings, gguf_contexts=2), engine)
    results, errors = {}, []
    with serve_in_thread(app) as url:
        client = client_for(url, key)

        def ask(i: int) -> None:
            try:
                if i % 2:
                    chunks = client.chat.completions.create(
                        model="tiny-v0", messages=HELLO, max_tokens=8, temperature=0, stream=True
                    )
                    results[i] = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
                else:
                    reply = client.chat.completions.create(
                        model="tiny-v0", messages=HELLO, max_tokens=8, temperature=0
                    )
                    results[i] = reply.choices[0].message.content
            except Exception as exc:  # reported below: a thread's exception would otherwise vanish
                errors.append(repr(exc))

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        served = app.state.model_pool.engines["tiny-v0"]
    assert not errors, errors
    assert len(results) == 6 and len(set(results.values())) == 1 and results[0]  # greedy: one answer for all
    assert isinstance(served, LlamaCppEngine) and served.contexts == 2 and served.batches == 6


@needs_gguf
def test_cancelled_requests_end_and_the_engine_goes_on(ws):
    _, _, _, gguf = ws
    engine = LlamaCppEngine(gguf, contexts=1)
    stream = Stream()
    request = Request(prompt_ids=engine.render(HELLO), max_tokens=400, temperature=0, emit=stream)
    engine.submit(request)
    events = []
    for event in stream:
        events.append(event)
        if len(events) == 2:
            request.cancelled.set()  # the client hung up
    assert events[-1][0] == "done" and events[-1][1] == "cancelled"
    assert events[-1][2]["completion_tokens"] < 400
    after = Stream()
    engine.submit(Request(prompt_ids=engine.render(HELLO), max_tokens=3, temperature=0, emit=after))
    assert list(after)[-1] == (
        "done",
        "length",
        {"prompt_tokens": len(request.prompt_ids), "completion_tokens": 3},
    )
    engine.close()


@needs_gguf
def test_gguf_backend_setting_picks_the_engine(ws, tmp_path):
    settings, engine, key, gguf = ws
    with session_scope(engine) as s:
        crud.register_model(s, name="alias-v0", kind="policy", base="tiny-v0")  # no path: what it names
        crud.register_model(s, name="file-v0", kind="policy", base="tiny-v0", path=str(gguf))
    auto, torch_only = settings, dataclasses.replace(settings, gguf_backend="torch")
    llama = dataclasses.replace(settings, gguf_backend="llama_cpp")
    with Session(engine) as s:
        for ref in ("tiny-v0", "alias-v0", "file-v0", str(gguf)):
            assert choose_backend(ref, settings=auto, session=s) == ("llama_cpp", gguf), ref
            assert choose_backend(ref, settings=torch_only, session=s) == ("torch", None), ref
        # The embedded default model stays on torch unless llama_cpp is asked for (then its shipped GGUF).
        assert choose_backend("default", settings=auto, session=s) == ("torch", None)
        assert choose_backend("default", settings=llama, session=s) == ("llama_cpp", default_gguf_path())
        assert choose_backend("plain-v0", settings=auto, session=s) == ("torch", None)
        with pytest.raises(
            AlignloopError, match="gguf_backend is llama_cpp but model 'plain-v0' has no GGUF"
        ) as err:
            choose_backend("plain-v0", settings=llama, session=s)
        assert "\n" not in str(err.value)

    # Through the server: torch forced, and llama_cpp without a GGUF refused in one line (OpenAI's shape).
    app = create_app(torch_only, engine)
    with serve_in_thread(app) as url:
        client_for(url, key).chat.completions.create(model="tiny-v0", messages=HELLO, max_tokens=2)
        assert isinstance(app.state.model_pool.engines["tiny-v0"], BatchingEngine)
    with serve_in_thread(create_app(llama, engine)) as url:
        with pytest.raises(openai.InternalServerError) as err:
            client_for(url, key).chat.completions.create(model="plain-v0", messages=HELLO, max_tokens=2)
    message = err.value.body["message"]
    assert "has no GGUF file" in message and "\n" not in message and "Traceback" not in message


def test_gguf_settings_are_validated(tmp_path, monkeypatch):
    monkeypatch.delenv("ALIGNLOOP_DATABASE_URL", raising=False)
    init_workspace(tmp_path / "ws")
    config = tmp_path / "ws" / "config.yaml"
    original = yaml.safe_load(config.read_text())
    assert original["gguf_backend"] == "auto"  # what `init` writes
    for change, reason in (
        ({"gguf_backend": "vllm"}, "gguf_backend must be one of auto, llama_cpp, torch, not 'vllm'"),
        ({"gguf_contexts": 0}, "gguf_contexts must be in [1, 64]"),
        ({"gguf_threads": -1}, "gguf_threads must be in [0, 1024]"),
    ):
        config.write_text(yaml.safe_dump({**original, **change}))
        with pytest.raises(AlignloopError) as err:
            load_settings(tmp_path / "ws")
        assert reason in str(err.value) and "\n" not in str(err.value)
    config.write_text(yaml.safe_dump({**original, "gguf_backend": "torch", "gguf_contexts": 2}))
    settings = load_settings(tmp_path / "ws")
    assert settings.gguf_backend == "torch" and settings.gguf_contexts == 2 and settings.gguf_threads == 0
    # `serve --gguf-backend` overrides the setting, and reaches `--workers` processes through the environment.
    monkeypatch.setenv("ALIGNLOOP_GGUF_BACKEND", "llama_cpp")
    assert load_settings(tmp_path / "ws").gguf_backend == "llama_cpp"
    monkeypatch.setenv("ALIGNLOOP_GGUF_BACKEND", "vllm")
    with pytest.raises(AlignloopError, match="ALIGNLOOP_GGUF_BACKEND must be one of"):
        load_settings(tmp_path / "ws")
    with pytest.raises(SystemExit):  # argparse refuses an unknown backend before anything runs
        main(["serve", "--workspace", str(tmp_path / "ws"), "--gguf-backend", "vllm"])
