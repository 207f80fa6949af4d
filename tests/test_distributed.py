"""Training under `accelerate launch --num_processes 2 --cpu`: two real processes, gradients averaged,
one Run and one registered model, replicas identical at the end."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from sqlmodel import Session

from alignloop.cli import main
from alignloop.core import crud

pytestmark = pytest.mark.timeout(600)


def launch(*args, workspace):
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or "accelerate"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [
            accelerate,
            "launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "-m",
            "alignloop.cli",
            *args,
            "--workspace",
            str(workspace),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=500,
    )


def test_reward_and_ppo_train_in_two_processes(workspace, tiny_model_dir, tmp_path):
    settings, engine, _ = workspace
    ws = ["--workspace", str(settings.workspace)]
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text(
        "".join(
            json.dumps(
                {"prompt": f"Tell me about item {i}.", "chosen": "Thank you! Here it is.", "rejected": "No."}
            )
            + "\n"
            for i in range(24)
        )
    )
    assert main(["prefs", "import", str(prefs), *ws]) == 0
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Question {i}?"}) + "\n" for i in range(8)))
    assert main(["prompts", "import", str(prompts), *ws]) == 0

    reward = launch(
        "reward",
        "train",
        "--config",
        "configs/reward/tiny.yaml",
        "--base",
        str(tiny_model_dir),
        "--max-steps",
        "4",
        "--name",
        "rm-ddp",
        workspace=settings.workspace,
    )
    assert reward.returncode == 0, reward.stderr[-3000:]
    assert reward.stdout.count("registered rm-ddp") == 1  # the main process alone registers

    ppo = launch(
        "rl",
        "train",
        "--config",
        "configs/rl/tiny.yaml",
        "--policy",
        str(tiny_model_dir),
        "--reward-model",
        "rm-ddp",
        "--steps",
        "3",
        "--name",
        "ppo-ddp",
        workspace=settings.workspace,
    )
    assert ppo.returncode == 0, ppo.stderr[-3000:]
    with Session(engine) as s:
        rm = crud.get_model_version(s, name="rm-ddp")
        policy = crud.get_model_version(s, name="ppo-ddp")
        assert rm.metrics["processes"] == 2 and policy.metrics["processes"] == 2
        assert policy.metrics["replicas_in_sync"] is True and policy.metrics["steps"] == 3
        assert policy.metrics["prepared"] == "DistributedDataParallel"  # PPO went through accelerator.prepare
        runs = [r for r in crud.list_runs(s) if r.kind in ("reward", "rl")]
        assert [(r.kind, r.status) for r in runs] == [("reward", "succeeded"), ("rl", "succeeded")]

    # The launcher's own CPU flags work too; Accelerate 1.15 then starts one process (without MPI).
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or "accelerate"
    single = subprocess.run(
        [
            accelerate,
            "launch",
            "--num_processes",
            "2",
            "--cpu",
            "-m",
            "alignloop.cli",
            "reward",
            "train",
            "--config",
            "configs/reward/tiny.yaml",
            "--base",
            str(tiny_model_dir),
            "--max-steps",
            "2",
            "--name",
            "rm-cpu-flag",
            "--workspace",
            str(settings.workspace),
        ],
        capture_output=True,
        text=True,
        timeout=500,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert single.returncode == 0, single.stderr[-3000:]
    with Session(engine) as s:
        assert crud.get_model_version(s, name="rm-cpu-flag").metrics["processes"] == 1


def test_ppo_step_under_ddp_with_different_micro_batch_counts_per_rank(tmp_path):
    """PPO through `accelerator.prepare` in two processes: rank 0 splits its minibatches into fewer
    micro-batches than rank 1 (short vs long prompts under the token budget), which must not hang DDP's
    collectives (a hang fails on the timeout); after the update both ranks hold the same trainable weights,
    changed from the start, both adapters and the head included."""
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or "accelerate"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    script = os.path.join(os.path.dirname(__file__), "ppo_ranks.py")
    command = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", script, str(tmp_path)]
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    try:
        _, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and the ranks it started: one process group
        proc.communicate()
        pytest.fail("two-process PPO hung (ranks out of step in DDP's collectives?)")
    assert proc.returncode == 0, err[-3000:]

    for value_model in ("adapter", "shared"):
        ranks = [torch.load(tmp_path / f"rank{r}-{value_model}.pt", weights_only=False) for r in (0, 1)]
        for saved in ranks:
            assert saved["wrapper"] == "DistributedDataParallel"  # went through accelerator.prepare
            assert saved["find_unused"] == (value_model == "adapter") and saved["replicas_in_sync"]
        counts = [saved["counts"] for saved in ranks]
        assert len(counts[0]) == len(counts[1]) == 2 and all(a < b for a, b in zip(*counts, strict=True)), (
            counts
        )
        assert ranks[0]["backwards"] == ranks[1]["backwards"]  # padded to the same number of passes
        start, a, b = ranks[0]["start"], ranks[0]["end"], ranks[1]["end"]
        assert start.keys() == a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), value_model
        # Every trainable tensor moved (AdamW skips a tensor that never got a gradient, decay included).
        assert [k for k in a if torch.equal(a[k], start[k])] == [], value_model
        if value_model == "adapter":
            assert any(".value." in k and not torch.equal(a[k], start[k]) for k in a)


def test_accelerate_configs_parse_and_ppo_hands_its_model_and_optimizer_to_prepare(tiny_tokenizer):
    """The shipped launcher configs load with Accelerate's own loader (the DeepSpeed ones are labelled examples:
    DeepSpeed cannot run here), and PPO's trainer gives its actor-critic and optimizer to `accelerator.prepare`
    (what a ZeRO config shards), then trains through what prepare returned."""
    from accelerate import Accelerator
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.optimizer import AcceleratedOptimizer
    from conftest import build_tiny_llama

    from rl.ppo import ActorCritic, PPOTrainer, load_config

    configs = Path(__file__).resolve().parents[1] / "configs" / "accelerate"
    kinds = {}
    for path in sorted(configs.glob("*.yaml")):
        loaded = load_config_from_file(str(path))
        kinds[path.name] = (loaded.distributed_type.value, loaded.num_processes)
        if loaded.distributed_type == "DEEPSPEED":
            assert path.read_text().startswith("# EXAMPLE, not tested"), path.name
            stage = int(path.stem[-1])
            assert loaded.deepspeed_config["zero_stage"] == stage and loaded.mixed_precision == "bf16"
    assert kinds == {
        "cpu_2proc.yaml": ("MULTI_GPU", 2),
        "deepspeed_zero2.yaml": ("DEEPSPEED", 8),
        "deepspeed_zero3.yaml": ("DEEPSPEED", 8),
        "multi_gpu.yaml": ("MULTI_GPU", 8),
    }

    accelerator, prepared = Accelerator(cpu=True), []
    prepare = accelerator.prepare

    def recording(*objects):
        prepared.append(objects)
        return prepare(*objects)

    accelerator.prepare = recording
    config = load_config(
        None, steps=1, batch_size=4, mini_batch_size=2, max_new_tokens=4, lora_r=4, lora_alpha=8, save_every=0
    )
    prompts = [[{"role": "user", "content": f"Question {i}?"}] for i in range(4)]
    reward = lambda prompts, completions: [1.0 for _ in completions]  # noqa: E731
    trainer = PPOTrainer(
        config, build_tiny_llama(tiny_tokenizer), tiny_tokenizer, prompts, reward, accelerator=accelerator
    )
    ((model, optimizer),) = prepared
    assert isinstance(model, ActorCritic) and trainer.model is model and trainer.ac is model  # one process
    assert isinstance(trainer.optimizer, AcceleratedOptimizer) and trainer.optimizer.optimizer is optimizer
    assert {id(p) for group in optimizer.param_groups for p in group["params"]} == {
        id(p) for p in trainer.ac.trainable_parameters()
    }
    before = trainer.ac.trainable_state()
    trainer.train(progress=False)
    after = trainer.ac.trainable_state()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_a_command_leaves_the_process_group_before_it_exits(tmp_path):
    """`finish` (the CLI calls it after every command) destroys the group, so no rank exits with gloo alive."""
    import torch.distributed as dist

    from alignloop.core import distributed

    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"file://{tmp_path / 'rendezvous'}")
    try:
        distributed.finish(ok=True)
        assert not dist.is_initialized()
        distributed.finish(ok=False)  # nothing left to leave: a no-op
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
