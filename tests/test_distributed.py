"""Training under `accelerate launch --num_processes 2 --cpu`: two real processes, gradients averaged,
one Run and one registered model, replicas identical at the end."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from sqlmodel import Session

from alignloop.cli import main
from alignloop.core import crud

pytestmark = pytest.mark.timeout(600)


def launch(*args, workspace):
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or "accelerate"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([accelerate, "launch", "--multi_gpu", "--num_processes", "2", "-m", "alignloop.cli", *args,
                           "--workspace", str(workspace)], capture_output=True, text=True, env=env, timeout=500)  # fmt: skip


def test_reward_and_ppo_train_in_two_processes(workspace, tiny_model_dir, tmp_path):
    settings, engine, _ = workspace
    ws = ["--workspace", str(settings.workspace)]
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("".join(json.dumps({"prompt": f"Tell me about item {i}.", "chosen": "Thank you! Here it is.",
                                         "rejected": "No."}) + "\n" for i in range(24)))  # fmt: skip
    assert main(["prefs", "import", str(prefs), *ws]) == 0
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Question {i}?"}) + "\n" for i in range(8)))
    assert main(["prompts", "import", str(prompts), *ws]) == 0

    reward = launch("reward", "train", "--config", "configs/reward/tiny.yaml", "--base", str(tiny_model_dir),
                    "--max-steps", "4", "--name", "rm-ddp", workspace=settings.workspace)  # fmt: skip
    assert reward.returncode == 0, reward.stderr[-3000:]
    assert reward.stdout.count("registered rm-ddp") == 1  # the main process alone registers

    ppo = launch("rl", "train", "--config", "configs/rl/tiny.yaml", "--policy", str(tiny_model_dir), "--reward-model",
                 "rm-ddp", "--steps", "3", "--name", "ppo-ddp", workspace=settings.workspace)  # fmt: skip
    assert ppo.returncode == 0, ppo.stderr[-3000:]
    with Session(engine) as s:
        rm = crud.get_model_version(s, name="rm-ddp")
        policy = crud.get_model_version(s, name="ppo-ddp")
        assert rm.metrics["processes"] == 2 and policy.metrics["processes"] == 2
        assert policy.metrics["replicas_in_sync"] is True and policy.metrics["steps"] == 3
        runs = [r for r in crud.list_runs(s) if r.kind in ("reward", "rl")]
        assert [(r.kind, r.status) for r in runs] == [("reward", "succeeded"), ("rl", "succeeded")]

    # The launcher's own CPU flags work too; Accelerate 1.15 then starts one process (without MPI).
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or "accelerate"
    single = subprocess.run([accelerate, "launch", "--num_processes", "2", "--cpu", "-m", "alignloop.cli", "reward",
                             "train", "--config", "configs/reward/tiny.yaml", "--base", str(tiny_model_dir),
                             "--max-steps", "2", "--name", "rm-cpu-flag", "--workspace", str(settings.workspace)],
                            capture_output=True, text=True, timeout=500, env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert single.returncode == 0, single.stderr[-3000:]
    with Session(engine) as s:
        assert crud.get_model_version(s, name="rm-cpu-flag").metrics["processes"] == 1
