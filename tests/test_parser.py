"""The command line's grammar: train flags generated from the run configs (each declared once), bounded counts
(issue 13, M4) that neither a flag nor a YAML can get past, and the old flag names still working."""

import argparse
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from alignloop.core import AlignloopError
from alignloop.parser import NON_CONFIG_FLAGS, flag, make_parser

ROOT = Path(__file__).resolve().parents[1]


def _subparsers(parser: argparse.ArgumentParser, path=()):
    """Every (command words, parser) pair, the lazily filled train parsers included."""
    parser.populated()
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _subparsers(sub, (*path, name))


def _train_configs():
    from reward.train import RewardRunConfig
    from rl.configs import CONFIGS
    from sft.train import SFTRunConfig

    return {
        ("sft", "train"): [SFTRunConfig],
        ("reward", "train"): [RewardRunConfig],
        ("rl", "train"): list(CONFIGS.values()),
    }


def test_no_flag_is_declared_twice_and_every_config_field_has_exactly_one():
    commands = dict(_subparsers(make_parser()))
    for path, parser in commands.items():
        options = [o for a in parser._actions for o in a.option_strings]
        assert len(options) == len(set(options)), path
    for path, configs in _train_configs().items():
        parser = commands[path]
        by_dest = {}
        for action in parser._actions:
            if action.option_strings and not set(action.option_strings) <= NON_CONFIG_FLAGS:
                assert action.dest not in by_dest, f"{path}: {action.dest} declared twice"
                by_dest[action.dest] = action
        fields = {}
        for cls in configs:  # a field several RL configs share reads its help from the first (PPO's)
            fields |= {f.name: f for f in dataclasses.fields(cls) if f.name not in fields}
        assert set(by_dest) == set(fields), path  # no hand-written extras, no field without its flag
        for name, f in fields.items():
            action = by_dest[name]
            assert flag(name) in action.option_strings and action.default is None
            assert action.help.replace("%%", "%").startswith(f.metadata["help"]), (
                path,
                name,
            )  # the dataclass's own help
            if "choices" in f.metadata:
                assert list(action.choices) == list(f.metadata["choices"])


def test_the_flags_people_already_use_still_parse_to_the_same_settings():
    from alignloop.parser import config_overrides
    from rl.configs import CONFIGS

    parser = make_parser()
    args = parser.parse_args(["rl", "train", "--config", "X", "--reward-model", "Y", "--resume", "7"])
    assert (args.config, args.reward_model, args.resume, args.algo) == ("X", "Y", 7, "ppo")
    args = parser.parse_args(
        [
            "rl",
            "train",
            "--algo",
            "grpo",
            "--policy",
            "p",
            "--prompts",
            "f.jsonl",
            "--steps",
            "3",
            "--name",
            "n",
        ]
    )
    assert config_overrides(args, *CONFIGS.values()) == {
        "policy": "p",
        "prompts": "f.jsonl",
        "steps": 3,
        "name": "n",
    }
    args = parser.parse_args(
        [
            "reward",
            "train",
            "--no-votes",
            "--gold-weights",
            "--data",
            "a",
            "b",
            "--eval-data",
            "c",
            "--base",
            "minilm",
            "--method",
            "lora",
            "--max-steps",
            "5",
            "--max-seconds",
            "1.5",
            "--name",
            "rm",
        ]
    )
    assert (args.from_workspace, args.gold_weights, args.data, args.eval_data) == (
        False,
        True,
        ["a", "b"],
        ["c"],
    )
    assert (args.method, args.max_steps, args.max_seconds) == ("lora", 5, 1.5)
    args = parser.parse_args(
        [
            "sft",
            "train",
            "--data",
            "d.jsonl",
            "--from-chosen",
            "--from-chat-edits",
            "--method",
            "ia3",
            "--base",
            "b",
            "--max-steps",
            "2",
            "--name",
            "s",
            "--merge",
        ]
    )
    assert (args.from_chosen, args.from_chat_edits, args.merge, args.method) == (True, True, True, "ia3")
    # One value of a `list[str] | str` field stays a string: peft reads "all-linear" only as a string.
    assert parser.parse_args(["rl", "train", "--target-modules", "all-linear"]).target_modules == "all-linear"


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "--samples", "99999999999999999999"],
        ["generate", "--samples", "5"],
        ["generate", "--prompts", "10000000"],
        ["generate", "--batch-size", "100000"],
        ["generate", "--max-new-tokens", "1000000"],
        ["generate", "--round", "99999999999999999999"],
        ["demo", "--prompts", "99999999"],
        ["rl", "train", "--steps", "99999999999999999999"],
        ["rl", "train", "--batch-size", "0"],
        [
            "rl",
            "eval",
            "a",
            "--baseline",
            "b",
            "--reward-model",
            "r",
            "--judge",
            "j",
            "--num-prompts",
            "1000000000",
        ],
        ["reward", "train", "--num-train-epochs", "1e12"],
        ["reward", "train", "--per-device-train-batch-size", "99999999"],
        ["sft", "train", "--max-steps", "99999999999"],
        ["round", "next", "--prompts", "99999999999999"],
        ["judge", "run", "--max-items", "99999999999999"],
        ["serve", "--workers", "100000"],
        ["round", "lineage", "--vote", "99999999999999999999999"],
        [
            "rl",
            "eval",
            "a",
            "--baseline",
            "b",
            "--reward-model",
            "r",
            "--judge",
            "j",
            "--seed",
            "1" + "0" * 40,
        ],
        ["rl", "eval", "a", "--baseline", "b", "--reward-model", "r", "--judge", "j", "--seed", "-1"],
        ["report", "levels", "--prompts", "99999999999999"],
    ],
)
def test_counts_out_of_bounds_end_at_parse_time_with_one_line(argv, capsys):
    with pytest.raises(SystemExit) as info:
        make_parser().parse_args(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error: argument --" in err and "must be between" in err, err


def test_generate_with_absurd_samples_exits_before_touching_anything(tmp_path):
    """The attack from issue 13 (M4), as a real process: one line, exit 2, no workspace, no model loaded."""
    ws = tmp_path / "ws"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "alignloop.cli",
            "generate",
            "--samples",
            "99999999999999999999",
            "--workspace",
            str(ws),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "--samples: must be between 2 and 4" in proc.stderr
    assert proc.stdout == "" and not ws.exists()


def test_a_yaml_cannot_bypass_the_bounds(tmp_path):
    from reward.train import load_config as reward_config
    from rl.train import load_config as rl_config
    from sft.train import load_config as sft_config

    cases = [
        (sft_config, "max_steps: 100000000000\n", "max_steps must be between"),
        (reward_config, "per_device_train_batch_size: 99999999\n", "per_device_train_batch_size must be"),
        (reward_config, "rounds: [1, 99999999999999999999]\n", "rounds must be between"),
        (reward_config, "lora_r: 'many'\n", "lora_r must be an integer"),
        (lambda p: rl_config("ppo", p, reward_model="rm"), "steps: 100000000000\n", "steps must be between"),
        (
            lambda p: rl_config("grpo", p, reward_model="rm"),
            "max_new_tokens: 10000000\n",
            "max_new_tokens must",
        ),
        (lambda p: rl_config("dpo", p), "mini_batch_size: 1.5\n", "mini_batch_size must be an integer"),
    ]
    for i, (load, text, message) in enumerate(cases):
        path = tmp_path / f"c{i}.yaml"
        path.write_text(text)
        with pytest.raises(AlignloopError, match=message):
            load(path)


def test_a_workspace_config_cannot_bypass_the_bounds(workspace):
    from alignloop.core.config import load_settings

    settings, _, _ = workspace
    config = settings.workspace / "config.yaml"
    config.write_text(config.read_text() + "batch_size: 100000000000\n")
    with pytest.raises(AlignloopError, match="batch_size must be between 1 and 1,024"):
        load_settings(settings.workspace)


def test_each_rl_algorithm_has_its_own_config(tmp_path):
    from rl.train import load_config

    dpo = dataclasses.asdict(load_config("dpo", ROOT / "configs/rl/default.yaml"))
    assert "cliprange" not in dpo and "value_model" not in dpo and dpo["beta"] == 0.1
    grpo = dataclasses.asdict(load_config("grpo", ROOT / "configs/rl/tiny.yaml", reward_model="rm"))
    assert "ppo_epochs" not in grpo and grpo["steps"] == 4 and grpo["num_generations"] == 4
    ppo = dataclasses.asdict(load_config("ppo", ROOT / "configs/rl/tiny.yaml", reward_model="rm"))
    assert ppo["cliprange"] == 0.2 and ppo["ppo_epochs"] == 1
    with pytest.raises(AlignloopError, match="--cliprange: not a setting of dpo"):
        load_config("dpo", None, cliprange=0.1)
    bad = tmp_path / "bad.yaml"
    bad.write_text("clip_range: 0.1\n")  # no RL algorithm has it: a typo, not another algorithm's setting
    with pytest.raises(AlignloopError, match="unknown RL setting"):
        load_config("ppo", bad, reward_model="rm")
