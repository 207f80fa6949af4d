"""The OpenAI-compatible endpoint, driven by the official `openai` client against a live server."""

import threading

import openai
import pytest
from conftest import serve_in_thread
from sqlmodel import Session

from alignloop.cli import main
from alignloop.core import crud
from alignloop.core.db import session_scope
from alignloop.core.presets import apply_preset, get_preset, save_preset
from alignloop.core.registry import resolve
from alignloop.core.sampling import SamplingParams, generate
from alignloop.web import create_app
from serve.engine import BatchingEngine, Request, Stream

HELLO = [{"role": "user", "content": "Write a short poem about the sea."}]


@pytest.fixture
def live(workspace, tiny_model_dir):
    """A running server with the tiny model registered as 'tiny' and an API key."""
    settings, engine, _ = workspace
    with session_scope(engine) as s:
        crud.register_model(s, name="tiny", kind="policy", base=str(tiny_model_dir), licence="apache-2.0")
        crud.register_model(s, name="rm", kind="reward", base="minilm")
        key, _ = crud.create_api_key(s, user=crud.get_user(s, name="admin"), name="tests")
    with serve_in_thread(create_app(settings, engine)) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0), url, settings, engine


def test_models_and_completions_with_the_official_client(live, tiny_model_dir):
    client, _, settings, engine = live
    assert [m.id for m in client.models.list().data] == [
        "default",
        "tiny",
    ]  # reward models are not chat models
    reply = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=8, temperature=0)
    assert reply.object == "chat.completion" and reply.choices[0].message.role == "assistant"
    assert reply.usage.completion_tokens <= 8 and reply.usage.prompt_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    # Greedy decoding through the batching engine gives what `alignloop.core.sampling` gives.
    with Session(engine) as s:
        loaded = resolve("tiny", settings=settings, session=s)
    expected = generate(loaded.model, loaded.tokenizer, [HELLO], params=SamplingParams(max_new_tokens=8, temperature=0),
                        progress=False)[0][0]  # fmt: skip
    assert reply.choices[0].message.content == expected.text
    assert reply.choices[0].finish_reason == ("stop" if expected.finished else "length")

    # Streaming: chunks arrive one by one and add up to the same text; usage on request.
    chunks = list(client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=8, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected.text and len([c for c in chunks if c.choices and c.choices[0].delta.content]) >= 2
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens
    # Sampling is honoured: a seed repeats, max_tokens caps, stop cuts.
    a = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=12, temperature=1.5, seed=7)
    b = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=12, temperature=1.5, seed=7)
    assert a.choices[0].message.content == b.choices[0].message.content
    one = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=1, temperature=0)
    assert one.usage.completion_tokens == 1 and one.choices[0].finish_reason == "length"
    if len(expected.text) > 3:
        stop = expected.text[2:4]
        cut = client.chat.completions.create(
            model="tiny", messages=HELLO, max_tokens=8, temperature=0, stop=[stop]
        )
        assert cut.choices[0].message.content == expected.text[: expected.text.find(stop)]


def test_errors_are_openai_shaped(live):
    client, url, _, _ = live
    bad_key = openai.OpenAI(base_url=url + "/v1", api_key="al-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        bad_key.models.list()
    assert err.value.status_code == 401 and err.value.body["code"] == "invalid_api_key"
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="nope", messages=HELLO)
    assert err.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="rm", messages=HELLO)  # a reward model cannot chat
    for bad in ({"temperature": 5}, {"n": 2}, {"max_tokens": 0}, {"top_p": 0}, {"stop": ["a"] * 5}):
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model="tiny", messages=HELLO, **bad)
        assert err.value.status_code == 400 and "Traceback" not in str(err.value.body)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[{"role": "assistant", "content": "hi"}])
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=HELLO, extra_body={"preset": "missing"})
    assert err.value.body["param"] == "preset"


def test_revoked_keys_and_disabled_users_are_refused(live, capsys):
    client, url, settings, engine = live
    ws = ["--workspace", str(settings.workspace)]
    assert main(["keys", "create", "script", *ws]) == 0
    key = capsys.readouterr().out.strip().splitlines()[-1]
    fresh = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)
    assert fresh.models.list().data
    with Session(engine) as s:
        key_id = max(k.id for k in crud.list_api_keys(s))
    assert main(["keys", "revoke", str(key_id), *ws]) == 0
    with pytest.raises(openai.AuthenticationError):
        fresh.models.list()
    assert key not in capsys.readouterr().out + "".join(
        f"{k.key_hash}{k.prefix}" for k in crud.list_api_keys(Session(engine))
    )


def test_concurrent_requests_share_batches(tiny_model, tiny_tokenizer):
    engine = BatchingEngine(tiny_model, tiny_tokenizer, max_batch=8, gather_ms=200)
    prompts = [[{"role": "user", "content": f"Question {i}?"}] for i in range(6)]
    streams = [Stream() for _ in prompts]
    results = [None] * len(prompts)

    def ask(i):
        engine.submit(
            Request(prompt_ids=engine.render(prompts[i]), max_tokens=6, temperature=0, emit=streams[i])
        )
        results[i] = "".join(e[1] for e in streams[i] if e[0] == "text")

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert engine.batches <= 2  # decoded together, not one by one
    single = [c[0].text for c in generate(tiny_model, tiny_tokenizer, prompts, progress=False,
                                          params=SamplingParams(max_new_tokens=6, temperature=0))]  # fmt: skip
    assert results == single  # batching changes nothing in what each request gets


def test_presets_version_and_apply(workspace):
    _, engine, _ = workspace
    with session_scope(engine) as s:
        save_preset(s, name="support", system_prompt="You are terse.")
        v2 = save_preset(s, name="support", system_prompt="You are kind.", chain_of_thought="Think step by step.",
                         examples=[{"user": "2+2?", "assistant": "4"}])  # fmt: skip
        assert v2.version == 2 and get_preset(s, "support@1").system_prompt == "You are terse."
        messages = apply_preset(get_preset(s, "support"), [{"role": "user", "content": "Hi"}])
        assert messages == [
            {"role": "system", "content": "You are kind."}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"}, {"role": "user", "content": "Hi\n\nThink step by step."},
        ]  # fmt: skip
        for bad in ({"examples": [{"user": "x"}]}, {"name": "a@b"}, {"name": " "}):
            with pytest.raises(crud.AlignloopError):
                save_preset(s, **({"name": "ok"} | bad))


def test_generate_with_a_preset(workspace, tiny_model_dir, tmp_path, capsys):
    from sqlmodel import select

    from alignloop.core.models import Generation

    settings, engine, _ = workspace
    ws = ["--workspace", str(settings.workspace)]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "Hi there"}\n{"prompt": "Tell me a story"}\n')
    assert main(["prompts", "import", str(prompts), *ws]) == 0
    assert (
        main(["presets", "save", "terse", "--system", "Answer in one word.", "--cot", "Think first.", *ws])
        == 0
    )
    assert main(["generate", "--model", str(tiny_model_dir), "--prompts", "2", "--max-new-tokens", "4",
                 "--preset", "terse", *ws]) == 0  # fmt: skip
    assert main(["generate", "--model", str(tiny_model_dir), "--prompts", "2", "--preset", "nope", *ws]) == 1
    assert "no preset 'nope'" in capsys.readouterr().err
    with Session(engine) as s:
        assert {g.params["preset"] for g in s.exec(select(Generation)).all()} == {"terse@1"}


def test_requests_join_and_leave_a_running_batch(tiny_model, tiny_tokenizer):
    """Continuous batching: a request arriving mid-decode joins the batch in flight (it does not wait for the
    longest reply), short replies leave early, and every reply equals its one-at-a-time greedy decoding."""
    engine = BatchingEngine(tiny_model, tiny_tokenizer, max_batch=8, gather_ms=0)
    prompts = [[{"role": "user", "content": f"Question {i}, tell me more?"}] for i in range(4)]
    limits = [40, 3, 25, 5]
    streams = [Stream() for _ in prompts]
    finished, started = [], threading.Event()

    def recorder(i):
        def emit(event):
            if event[0] == "done":
                finished.append(i)
            if event[0] == "text":
                started.set()
            streams[i](event)

        return emit

    engine.submit(Request(prompt_ids=engine.render(prompts[0]), max_tokens=limits[0], temperature=0,
                          emit=recorder(0)))  # fmt: skip
    started.wait(timeout=60)  # the long request is decoding: the others arrive mid-flight
    for i in range(1, 4):
        engine.submit(Request(prompt_ids=engine.render(prompts[i]), max_tokens=limits[i], temperature=0,
                              emit=recorder(i)))  # fmt: skip
    results = []
    for s in streams:
        events = list(s)
        results.append("".join(e[1] for e in events if e[0] == "text"))
        assert events[-1][0] == "done"
    single = [generate(tiny_model, tiny_tokenizer, [p], progress=False,
                       params=SamplingParams(max_new_tokens=n, temperature=0))[0][0].text
              for p, n in zip(prompts, limits, strict=True)]  # fmt: skip
    assert results == single
    assert finished[-1] == 0 and engine.batches >= 2  # late short requests finished while the long one ran
    engine.close()
