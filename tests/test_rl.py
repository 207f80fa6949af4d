"""RL on tiny models: PPO learns a known reward under a KL bound and resumes exactly; GRPO/RLOO/DPO train."""

import json

import pytest
import torch
from conftest import build_tiny_llama
from sqlmodel import Session

from alignloop.cli import main
from alignloop.core import AlignloopError, crud
from alignloop.core.models import Run
from alignloop.core.registry import resolve
from rl.ppo import PPOTrainer, gae, load_config, masked_whiten

PROMPTS = [[{"role": "user", "content": f"Tell me about item {i}."}] for i in range(16)]


def target_share(tokenizer):
    """A known reward: the share of response tokens from a fixed quarter of the vocabulary."""
    target = {i for i in range(len(tokenizer)) if i % 4 == 0}
    return lambda prompts, completions: [
        sum(t in target for t in c.token_ids) / max(1, len(c.token_ids)) for c in completions
    ]


def ppo_config(**overrides):
    base = dict(batch_size=16, mini_batch_size=8, ppo_epochs=2, max_new_tokens=4, learning_rate=1e-2,
                kl_coef=0.05, missing_eos_penalty=0.0, lora_r=8, lora_alpha=16,
                target_modules=["q_proj", "v_proj", "o_proj", "down_proj", "lm_head"])  # fmt: skip
    return load_config(None, **(base | overrides))


def test_gae_and_whitening_by_hand():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.5, 0.5, 9.0]])  # the last position is padding: its value must not leak
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert advantages.tolist() == [[0.5, 0.5, 0.5, 0.0]] and returns.tolist() == [[1.0, 1.0, 1.0, 0.0]]
    whitened = masked_whiten(torch.tensor([[1.0, 2.0, 3.0, 100.0]]), mask)
    assert abs(float((whitened * mask).sum())) < 1e-5


def test_ppo_raises_a_known_reward_within_a_kl_bound(tiny_tokenizer):
    model = build_tiny_llama(tiny_tokenizer, initializer_range=0.1)
    trainer = PPOTrainer(ppo_config(steps=25), model, tiny_tokenizer, PROMPTS, target_share(tiny_tokenizer))
    history = trainer.train(progress=False)
    start = sum(h["raw_score"] for h in history[:5]) / 5
    end = sum(h["raw_score"] for h in history[-5:]) / 5
    assert end > start + 0.2, (start, end)  # about 0.25 by chance at the start
    assert max(h["kl"] for h in history) < 15
    for key in (
        "kl",
        "entropy",
        "clipfrac",
        "value_loss",
        "response_length",
        "generate_s",
        "score_s",
        "update_s",
    ):
        assert key in history[-1]
    # The reference really is the untouched base: the adapter switched off gives the original logits.
    ids = torch.tensor([[1, 20, 30, 40]])
    fresh = build_tiny_llama(tiny_tokenizer, initializer_range=0.1)
    with torch.no_grad(), trainer.ac.model.disable_adapter():
        assert torch.allclose(trainer.ac.model(input_ids=ids).logits, fresh(input_ids=ids).logits, atol=1e-6)


@pytest.mark.parametrize("value_model", ["adapter", "shared"])
def test_resume_from_a_checkpoint_reproduces_the_uninterrupted_run(tiny_tokenizer, tmp_path, value_model):
    config = ppo_config(steps=4, save_every=2, value_model=value_model)
    reward = target_share(tiny_tokenizer)

    straight = PPOTrainer(config, build_tiny_llama(tiny_tokenizer, initializer_range=0.1), tiny_tokenizer,
                          PROMPTS, reward, run_dir=tmp_path / "a")  # fmt: skip
    straight.train(progress=False)

    class Crash(Exception):
        pass

    def crash_at_3(entry):
        if entry["step"] == 3:
            raise Crash

    first = PPOTrainer(config, build_tiny_llama(tiny_tokenizer, initializer_range=0.1), tiny_tokenizer, PROMPTS,
                       reward, run_dir=tmp_path / "b", on_step=crash_at_3)  # fmt: skip
    with pytest.raises(Crash):
        first.train(progress=False)
    resumed = PPOTrainer(config, build_tiny_llama(tiny_tokenizer, initializer_range=0.1), tiny_tokenizer,
                         PROMPTS, reward, run_dir=tmp_path / "b")  # fmt: skip
    resumed.load_checkpoint(resumed.latest_checkpoint())
    assert resumed.step == 2
    resumed.train(progress=False)

    timing = {"generate_s", "score_s", "update_s", "step_s"}
    strip = lambda h: [{k: v for k, v in e.items() if k not in timing} for e in h]  # noqa: E731
    assert strip(resumed.history) == strip(straight.history)
    a, b = straight.ac.trainable_state(), resumed.ac.trainable_state()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_rl_input_is_refused(workspace):
    settings, engine, _ = workspace
    with pytest.raises(AlignloopError, match="temperature"):
        load_config(None, temperature=0)
    from rl.train import load_config as load_rl

    with pytest.raises(AlignloopError, match="needs a reward model"):
        load_rl("ppo", None)
    with pytest.raises(AlignloopError, match="algo must be one of"):
        load_rl("a2c", None)


@pytest.fixture
def rl_workspace(workspace, tiny_model_dir, tmp_path):
    """A workspace with prompts, votes and a (quickly trained) tiny reward model named rm."""
    settings, engine, password = workspace
    ws = ["--workspace", str(settings.workspace)]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": m[0]["content"]}) + "\n" for m in PROMPTS))
    assert main(["prompts", "import", str(prompts), *ws]) == 0
    held = tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps({"prompt": f"Held-out question {i}?"}) + "\n" for i in range(3)))
    assert main(["prompts", "import", str(held), "--split", "eval", *ws]) == 0
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("".join(json.dumps({"prompt": m[0]["content"], "chosen": "Thank you! Here is a summary.",
                                         "rejected": "No."}) + "\n" for m in PROMPTS))  # fmt: skip
    assert main(["prefs", "import", str(prefs), *ws]) == 0
    for name in ("rm", "rm-judge"):
        assert main(["reward", "train", "--config", "configs/reward/tiny.yaml", "--base", str(tiny_model_dir),
                     "--max-steps", "3", "--name", name, *ws]) == 0  # fmt: skip
    return settings, engine, ws, password


@pytest.mark.parametrize("algo", ["ppo", "grpo", "rloo", "dpo"])
def test_each_algorithm_trains_and_registers_a_policy(rl_workspace, tiny_model_dir, algo, capsys):
    settings, engine, ws, password = rl_workspace
    extra = [] if algo == "dpo" else ["--reward-model", "rm"]
    code = main(["rl", "train", "--algo", algo, "--config", "configs/rl/tiny.yaml", "--policy",
                 str(tiny_model_dir), "--steps", "2", "--name", f"pol-{algo}", *extra, *ws])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert f"registered pol-{algo}" in capsys.readouterr().out
    with Session(engine) as s:
        version = crud.get_model_version(s, name=f"pol-{algo}")
        assert version.kind == "policy" and version.metrics["algo"] == algo and version.run_id
        run = s.get(Run, version.run_id)
        assert run.status == "succeeded" and run.metrics["history"]
        tuned = resolve(f"pol-{algo}", settings=settings, session=s).model
        base = resolve(str(tiny_model_dir), settings=settings, session=s).model
    ids = torch.tensor([[1, 20, 30, 40, 50]])
    with torch.no_grad():
        assert not torch.allclose(tuned(input_ids=ids).logits, base(input_ids=ids).logits)


def test_ppo_cli_resume_stacked_rounds_and_eval(rl_workspace, tiny_model_dir, capsys):
    settings, engine, ws, password = rl_workspace
    args = ["rl", "train", "--config", "configs/rl/tiny.yaml", "--reward-model", "rm", *ws]
    assert main([*args, "--policy", str(tiny_model_dir), "--name", "round1"]) == 0
    # A second round starts from the first round's adapter: the registry stacks them when loading.
    assert main([*args, "--policy", "round1", "--name", "round2", "--steps", "2"]) == 0
    with Session(engine) as s:
        round2 = crud.get_model_version(s, name="round2")
        assert round2.base == "round1" and round2.parent_id == crud.get_model_version(s, name="round1").id
        assert resolve("round2", settings=settings, session=s).model is not None
    # Resuming a finished run is refused; an unknown one too.
    assert main([*args, "--resume", str(round2.run_id)]) == 1
    assert "already finished" in capsys.readouterr().err
    capsys.readouterr()
    assert main(["rl", "eval", "round2", "--baseline", "round1", "--reward-model", "rm", "--judge", "rm-judge",
                 "--num-prompts", "3", "--max-new-tokens", "6", *ws]) == 0  # fmt: skip
    summary = json.loads(capsys.readouterr().out)
    assert (
        summary["prompts"] == 3
        and 0 <= summary["win_rate_by_judge"] <= 1
        and summary["kl_to_baseline"] is not None
    )
    # /admin/rl shows the runs with their curves and the evaluation; annotators get 403.
    from fastapi.testclient import TestClient

    from alignloop.web import create_app

    with Session(engine) as s:
        crud.create_user(s, name="ann", role="annotator", password="annotator-pass")
        s.commit()
    with TestClient(create_app(settings, engine)) as client:
        client.post("/login", data={"username": "ann", "password": "annotator-pass"})
        assert client.get("/admin/rl").status_code == 403
        client.post("/logout")
        client.post("/login", data={"username": "admin", "password": password})
        page = client.get("/admin/rl")
        assert page.status_code == 200 and "round2" in page.text and "win rate" in page.text
        png = client.get(f"/admin/runs/{round2.run_id}/metrics.png")
        assert png.status_code == 200 and png.content[:4] == b"\x89PNG"
        assert {r["kind"] for r in client.get("/api/rl/runs").json()} == {"rl", "eval"}


def test_sigkilled_ppo_run_resumes_from_its_last_checkpoint(rl_workspace, tiny_model_dir):
    """A real `alignloop rl train` process killed with SIGKILL mid-run; `--resume RUN` finishes it."""
    import os
    import shutil
    import signal
    import subprocess
    import sys
    import time

    settings, engine, ws, _ = rl_workspace
    exe = shutil.which("alignloop")
    cli = [exe] if exe else [sys.executable, "-m", "alignloop.cli"]
    args = ["rl", "train", "--config", "configs/rl/tiny.yaml", "--policy", str(tiny_model_dir), "--reward-model",
            "rm", "--steps", "60", "--name", "killed", *ws]  # fmt: skip
    proc = subprocess.Popen([*cli, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    checkpoints = []
    while time.time() < deadline and not checkpoints:
        checkpoints = list(settings.runs_dir.glob("run*/checkpoints/step-000004.pt"))
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert checkpoints, "no checkpoint appeared"
    run_id = int(checkpoints[0].parts[-3].removeprefix("run"))
    with Session(engine) as s:
        assert s.get(Run, run_id).status == "running"  # the process died without a word
    assert main(["rl", "train", "--resume", str(run_id), *ws]) == 0
    with Session(engine) as s:
        run = s.get(Run, run_id)
        steps = [h["step"] for h in run.metrics["history"]]
        assert run.status == "succeeded" and steps == list(range(1, 61))
        assert crud.get_model_version(s, name="killed").run_id == run_id
