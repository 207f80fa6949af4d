"""Shared fixtures: hermetic and offline. Tiny models are built from a config with a tokenizer trained here."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers / huggingface_hub are imported anywhere
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
# float32 everywhere, on any chip: on CPUs with native bf16 (AVX512-BF16, AMX) "auto" would load and train in
# bf16, whose rounding moves with every change of a pass's shape, and the exactness checks would depend on the
# machine. tests/test_devices.py covers the bf16 choices; tests that run bf16 set it explicitly.
os.environ["ALIGNLOOP_CPU_BF16"] = "0"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import socket  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from sqlalchemy import text  # noqa: E402
from sqlmodel import Session  # noqa: E402

from alignloop.core.db import create_schema, make_engine  # noqa: E402

# The project's shared data (HH-RLHF and Vicuna-bench samples) lives beside the checkout, never inside it.
SHARED_DATA = Path(
    os.environ.get("ALIGNLOOP_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data"
)
POSTGRES_URL = os.environ.get("ALIGNLOOP_TEST_POSTGRES_URL")
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "The capital of France is Paris.",
    "Write a short poem about the sea and the wind.",
    "Explain what a hash table is to a beginner.",
    "How do I bake bread at home? Mix flour, water, salt and yeast.",
    "Python lists are mutable; tuples are not.",
    "Thank you! Here is a summary of the meeting notes.",
] * 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(workspace, *, env=None) -> tuple:
    """`alignloop serve` on a free port in its own process; returns (process, base URL) once /healthz answers."""
    import shutil
    import subprocess
    import sys

    import httpx

    port = free_port()
    exe = shutil.which("alignloop")
    cmd = [exe] if exe else [sys.executable, "-m", "alignloop.cli"]
    log = open(Path(workspace) / f"serve-{port}.log", "w")  # noqa: SIM115 - the server process writes it
    proc = subprocess.Popen(
        [*cmd, "serve", "--port", str(port), "--workspace", str(workspace)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                return proc, base
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    pytest.fail("server did not start:\n" + (Path(workspace) / f"serve-{port}.log").read_text())


@contextmanager
def running_server(workspace, *, env=None):
    proc, base = start_server(workspace, env=env)
    try:
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@contextmanager
def serve_in_thread(app):
    """Run an ASGI app with uvicorn on a free loopback port in a daemon thread; yields its base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def pytest_sessionstart(session):
    if not (SHARED_DATA / "hh_harmless_dev.jsonl").is_file():
        raise pytest.UsageError(
            f"the tests read the project's shared data from {SHARED_DATA}, which is missing: clone the repository "
            "beside the project's shared/ folder, or set ALIGNLOOP_SHARED_DATA to its data/ directory"
        )


def pytest_collection_modifyitems(config, items):
    if POSTGRES_URL or os.environ.get("ALIGNLOOP_REQUIRE_POSTGRES") == "1":
        return
    skip = pytest.mark.skip(reason="set ALIGNLOOP_TEST_POSTGRES_URL to run against PostgreSQL (.ci/run does)")
    for item in items:
        if "postgres" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def engine(request, tmp_path):
    """A fresh, empty database: a SQLite file (WAL) or the real PostgreSQL server, tables dropped first."""
    if request.param == "sqlite":
        eng = make_engine(f"sqlite:///{tmp_path / 'test.db'}")
    else:
        if not POSTGRES_URL:
            pytest.fail("ALIGNLOOP_REQUIRE_POSTGRES=1 but ALIGNLOOP_TEST_POSTGRES_URL is not set")
        eng = make_engine(POSTGRES_URL)
        with eng.begin() as conn:  # run <-> modelversion refer to each other, so drop the schema whole
            conn.execute(text("DROP SCHEMA public CASCADE"))
            conn.execute(text("CREATE SCHEMA public"))
    create_schema(eng)
    yield eng
    eng.dispose()


@pytest.fixture
def session(engine):
    with Session(engine, expire_on_commit=False) as s:
        yield s


def build_tiny_tokenizer():
    """A small byte-level BPE tokenizer with ChatML special tokens, trained in-process (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    fast.chat_template = CHATML
    return fast


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


def build_tiny_llama(tokenizer, seed: int = 0, **overrides):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    overrides.setdefault(
        "initializer_range", 0.2
    )  # sharper logits than the default 0.02: stable greedy choices
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        **overrides,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval()


@pytest.fixture(scope="session")
def tiny_model(tiny_tokenizer):
    return build_tiny_llama(tiny_tokenizer)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_model, tiny_tokenizer):
    """The tiny model saved as a local directory with an Apache-2.0 model card."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    (path / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny test model\n")
    return path


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """An initialised SQLite workspace; returns (settings, engine, admin password)."""
    from alignloop.core.config import load_settings
    from alignloop.core.workspace import init_workspace

    monkeypatch.delenv("ALIGNLOOP_DATABASE_URL", raising=False)
    path = tmp_path / "ws"
    password = init_workspace(path)
    settings = load_settings(path)
    eng = make_engine(settings.db_url)
    yield settings, eng, password
    eng.dispose()


def web_login(client, name: str, password: str):
    """Log a TestClient in and send the session's CSRF token with its later requests (as a page's form would)."""
    import re

    response = client.post("/login", data={"username": name, "password": password}, follow_redirects=False)
    match = re.search(r'<meta name="csrf-token" content="([^"]*)"', client.get("/login").text)
    client.headers["X-CSRF-Token"] = match.group(1) if match else ""
    return response
