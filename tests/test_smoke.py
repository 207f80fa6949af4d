"""Smoke tests with the real embedded model and a real server process. Kept few: they cost seconds each."""

import os
import re
import shutil
import subprocess
import sys
import time

import httpx
import pytest
import torch
from conftest import free_port

from alignloop.core.registry import DEFAULT_CACHE_NAME, resolve
from alignloop.core.sampling import SamplingParams, generate

pytestmark = pytest.mark.smoke


def test_default_model_answers_and_is_cached_as_safetensors(workspace):
    settings, _, _ = workspace
    loaded = resolve("default", settings=settings)
    cache = settings.cache_dir / "models" / DEFAULT_CACHE_NAME
    assert loaded.path == cache and (cache / "model.safetensors").is_file()
    assert loaded.licence == "apache-2.0"
    assert not getattr(
        loaded.model, "is_quantized", False
    )  # de-quantised floats: trainable, full fine-tuning too
    question = [{"role": "user", "content": "What is the capital of France?"}]
    (answer,), = generate(loaded.model, loaded.tokenizer, [question], params=SamplingParams(max_new_tokens=20, temperature=0), progress=False)  # fmt: skip
    assert "Paris" in answer.text and answer.finished

    # The second load reads the cache: same weights, no GGUF de-quantisation.
    again = resolve("default", settings=settings)
    for (name, a), (_, b) in zip(
        loaded.model.state_dict().items(), again.model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def test_demo_generates_and_serves(tmp_path):
    """`alignloop demo` on a fresh workspace: init, sample prompts, round-0 pairs, a live server with login."""
    ws, port = tmp_path / "ws", free_port()
    env = {**os.environ, "ALIGNLOOP_HOME": str(ws), "PYTHONUNBUFFERED": "1"}
    exe = shutil.which("alignloop") or [sys.executable, "-m", "alignloop.cli"]
    cmd = [exe] if isinstance(exe, str) else exe
    proc = subprocess.Popen(
        [*cmd, "demo", "--prompts", "4", "--max-new-tokens", "12", "--port", str(port)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    output = []
    try:
        deadline = time.time() + 600
        while time.time() < deadline:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                pytest.fail("demo exited early:\n" + "".join(output))
            output.append(line)
            if "serving" in line:
                break
        text = "".join(output)
        password = re.search(r"admin / (\S+)", text).group(1)
        assert re.search(r"queued [1-4] comparisons", text), text
        base = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=base, timeout=10) as client:
            for _ in range(100):
                try:
                    if client.get("/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.1)
            client.post("/login", data={"username": "admin", "password": password})
            page = client.get("/queue")
            assert page.status_code == 200 and "Queued comparisons" in page.text
            assert len(client.get("/api/comparisons").json()) >= 1
        # The embedded model behind the OpenAI-compatible endpoint, through the official client.
        import openai

        keys = subprocess.run(
            [*cmd, "keys", "create", "smoke"], env=env, capture_output=True, text=True, check=True
        )
        chat = openai.OpenAI(
            base_url=base + "/v1", api_key=keys.stdout.strip().splitlines()[-1], max_retries=0
        )
        reply = chat.chat.completions.create(model="default", max_tokens=20, temperature=0,
                                             messages=[{"role": "user", "content": "What is the capital of France?"}])  # fmt: skip
        assert "Paris" in reply.choices[0].message.content and reply.choices[0].finish_reason == "stop"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
