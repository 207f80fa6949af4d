"""Nothing phones home: init, import, generation and a serving web app (Gradio UIs mounted and visited) run
with every outbound connection refused, and not one is attempted."""

import json
import os
import shutil
import subprocess
import sys
import time

import httpx
from conftest import running_server

GUARD = """
import os, socket
_real = socket.socket.connect
def _guarded(self, address):
    host = address[0] if isinstance(address, tuple) else address
    if isinstance(host, str) and not (host.startswith("127.") or host in ("localhost", "::1") or host.startswith("/")):
        with open(os.environ["ALIGNLOOP_NET_LOG"], "a") as f:
            f.write(repr(address) + "\\n")
        raise OSError("outbound network blocked by the test")
    return _real(self, address)
socket.socket.connect = _guarded
"""


def test_startup_generation_and_serving_make_no_outbound_connection(tmp_path, tiny_model_dir):
    guard = tmp_path / "guard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(GUARD)
    attempts = tmp_path / "net.log"
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("HF_", "GRADIO_"))
    }  # the defaults must hold
    env |= {
        "PYTHONPATH": f"{guard}{os.pathsep}{env.get('PYTHONPATH', '')}",
        "ALIGNLOOP_NET_LOG": str(attempts),
    }
    probe = subprocess.run(
        [sys.executable, "-c", "import socket; socket.create_connection(('192.0.2.1', 80), 1)"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert probe.returncode != 0 and "blocked by the test" in probe.stderr  # the guard is really in place
    attempts.unlink()
    exe = shutil.which("alignloop")
    cli = [exe] if exe else [sys.executable, "-m", "alignloop.cli"]
    ws = ["--workspace", str(tmp_path / "ws")]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Question {i}?"}) + "\n" for i in range(3)))
    for args in (
        ["init"],
        ["prompts", "import", str(prompts)],
        ["generate", "--model", str(tiny_model_dir), "--prompts", "3", "--max-new-tokens", "6"],
    ):
        done = subprocess.run([*cli, *args, *ws], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
    with running_server(tmp_path / "ws", env=env) as base:
        for path in ("/login", "/annotate/", "/chat/", "/arena/"):
            assert httpx.get(base + path, timeout=30).status_code in (200, 303)
        time.sleep(2)  # time for any background "phone home" thread to try
    assert not attempts.exists(), attempts.read_text()
