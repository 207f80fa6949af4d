"""The command line's grammar: argparse only, importable without the handlers.

`alignloop.cli` maps each parsed command to its handler (`handler` names a `cmd_*` function there); the job
runner (`alignloop.jobs`) parses a job's arguments with the same parser before it starts anything.
"""

from __future__ import annotations

import argparse

from alignloop.core import __version__


def make_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--workspace", default=None, help="workspace folder (default: $ALIGNLOOP_HOME, else ./alignloop-data)"
    )
    parser = argparse.ArgumentParser(
        prog="alignloop", description="Self-hosted human feedback and RLHF: annotate, reward, align, serve."
    )
    parser.add_argument("--version", action="version", version=f"alignloop {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("init", parents=[common], help="create a workspace: config, database, admin user")
    p.add_argument("--database-url", default="", help="SQLAlchemy URL (default: SQLite in the workspace)")
    p.set_defaults(handler="cmd_init")

    p = sub.add_parser("demo", parents=[common], help="init, import sample prompts, generate round 0, serve")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--prompts", type=int, default=40, help="sample prompts to generate for")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--no-serve", action="store_true", help="stop after generating")
    p.set_defaults(handler="cmd_demo")

    prompts = sub.add_parser("prompts", help="manage the prompt pool").add_subparsers(
        dest="prompts_command", required=True, metavar="ACTION"
    )
    p = prompts.add_parser("import", parents=[common], help="import prompts (all or nothing)")
    p.add_argument("file", help=".jsonl, .json or .csv")
    p.add_argument(
        "--format", default="auto", choices=["auto", "chat", "plain", "dolly", "alpaca", "mtbench"]
    )
    p.add_argument("--source", default=None, help="label stored with each prompt (default: file name)")
    p.add_argument("--split", default=None, choices=["train", "eval"], help="override every record's split")
    p.set_defaults(handler="cmd_prompts_import")

    p = sub.add_parser("generate", parents=[common], help="sample responses and queue them as comparisons")
    p.add_argument("--model", default=None, help="'default', a registered version, a directory or a hub id")
    p.add_argument("--preset", default=None, help="an L1 prompting preset (name or name@version)")
    p.add_argument("--prompts", type=int, default=32, help="number of prompts (those not yet in this round)")
    p.add_argument("--samples", type=int, default=2, help="responses per prompt (K>2 makes ranking items)")
    p.add_argument("--round", type=int, default=0)
    p.add_argument("--split", default="train", choices=["train", "eval"])
    p.add_argument("--target-votes", type=int, default=None, help="votes each comparison needs")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--allow-noncommercial", action="store_true", help="accept a non-commercial licence")
    p.set_defaults(handler="cmd_generate")

    users = sub.add_parser("users", help="manage users").add_subparsers(
        dest="users_command", required=True, metavar="ACTION"
    )
    p = users.add_parser("add", parents=[common], help="add a user (a random password is printed once)")
    p.add_argument("name")
    p.add_argument("--role", required=True, choices=["admin", "annotator", "reviewer"])
    p.add_argument("--kind", default="human", choices=["human", "ai"])
    p.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    p.set_defaults(handler="cmd_users_add")
    p = users.add_parser("passwd", parents=[common], help="set a new random password (printed once)")
    p.add_argument("name")
    p.set_defaults(handler="cmd_users_passwd")

    prefs = sub.add_parser("prefs", help="external preference data").add_subparsers(
        dest="prefs_command", required=True, metavar="ACTION"
    )
    p = prefs.add_parser("import", parents=[common], help="import HH-RLHF or TRL preference pairs as votes")
    p.add_argument("file", help=".jsonl: HH-RLHF chosen/rejected text, or TRL prompt/chosen/rejected")
    p.add_argument("--round", type=int, default=0)
    p.set_defaults(handler="cmd_prefs_import")

    judge = sub.add_parser("judge", help="RLAIF: an AI annotator").add_subparsers(
        dest="judge_command", required=True, metavar="ACTION"
    )
    p = judge.add_parser("run", parents=[common], help="vote on queued comparisons as an AI judge")
    p.add_argument("--user", default="ai-judge", help="the judge's (AI) user; created if missing")
    p.add_argument("--model", default=None, help="local judge model reference (default: the default policy)")
    p.add_argument("--openai-base-url", default=None, help="use an OpenAI-compatible endpoint instead")
    p.add_argument("--openai-model", default=None)
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    p.add_argument("--max-items", type=int, default=None)
    p.set_defaults(handler="cmd_judge_run")

    argilla = sub.add_parser("argilla", help="sync with an Argilla 2.x server").add_subparsers(
        dest="argilla_command", required=True, metavar="ACTION"
    )
    for action, text in (
        ("push", "send open pairwise comparisons"),
        ("pull", "record submitted responses as votes"),
    ):
        p = argilla.add_parser(action, parents=[common], help=text)
        p.add_argument("--url", required=True, help="Argilla API URL, e.g. http://argilla.internal:6900")
        p.add_argument(
            "--api-key-env", default="ARGILLA_API_KEY", help="environment variable holding the key"
        )
        p.add_argument("--dataset", required=True, help="Argilla dataset name")
        p.add_argument("--argilla-workspace", required=True, help="Argilla workspace name")
        if action == "push":
            p.add_argument("--round", type=int, default=None)
        p.set_defaults(handler="cmd_argilla")

    sft = sub.add_parser("sft", help="instruction tuning with PEFT (L2)").add_subparsers(
        dest="sft_command", required=True, metavar="ACTION"
    )
    p = sft.add_parser(
        "train", parents=[common], help="tune a model on instruction data; registers the result"
    )
    p.add_argument("--config", default=None, help="YAML with SFTRunConfig fields (configs/sft/*.yaml)")
    p.add_argument("--data", nargs="+", default=None, help="dolly / alpaca / chat .jsonl files")
    p.add_argument("--from-chosen", action="store_true", help="add chosen responses of voted comparisons")
    p.add_argument("--from-chat-edits", action="store_true", help="add reviewers' edited chat answers")
    p.add_argument("--method", default=None, choices=["lora", "prefix", "ia3", "full"])
    p.add_argument(
        "--base", default=None, help="model reference to tune (default: the config's, else 'default')"
    )
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--name", default=None, help="name of the registered model version")
    p.add_argument("--merge", action="store_true", help="save a merged standalone model (lora, ia3)")
    p.set_defaults(handler="cmd_sft_train")

    reward = sub.add_parser("reward", help="reward models: train and evaluate").add_subparsers(
        dest="reward_command", required=True, metavar="ACTION"
    )
    p = reward.add_parser("train", parents=[common], help="train a reward model on preferences; registers it")
    p.add_argument("--config", default=None, help="YAML with RewardRunConfig fields (configs/reward/*.yaml)")
    p.add_argument("--data", nargs="+", default=None, help="extra preference files (HH-RLHF, TRL)")
    p.add_argument("--no-votes", action="store_true", help="leave out the workspace's votes")
    p.add_argument("--gold-weights", action="store_true", help="weight pairs by voters' gold accuracy")
    p.add_argument("--eval-data", nargs="+", default=None, help="preference files to evaluate on too")
    p.add_argument("--base", default=None, help="minilm | default | a model reference")
    p.add_argument("--method", default=None, choices=["full", "lora"])
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--max-seconds", type=float, default=None, help="stop training after this long")
    p.add_argument("--name", default=None, help="name of the registered model version")
    p.set_defaults(handler="cmd_reward_train")
    p = reward.add_parser(
        "eval", parents=[common], help="accuracy, calibration, length bias of a reward model"
    )
    p.add_argument("model", help="a registered reward model")
    p.add_argument(
        "--data", nargs="+", default=None, help="preference files (default: the workspace's votes)"
    )
    p.add_argument("--out", default=None, help="folder for evaluation.json and report.png")
    p.set_defaults(handler="cmd_reward_eval")

    rl = sub.add_parser("rl", help="reinforcement learning: PPO, GRPO, RLOO, DPO").add_subparsers(
        dest="rl_command", required=True, metavar="ACTION"
    )
    p = rl.add_parser("train", parents=[common], help="optimise a policy; registers the result")
    p.add_argument("--algo", default="ppo", choices=["ppo", "grpo", "rloo", "dpo"])
    p.add_argument("--config", default=None, help="YAML with PPOConfig fields (configs/rl/*.yaml)")
    p.add_argument("--policy", default=None, help="model reference to start from")
    p.add_argument("--reward-model", default=None, help="registered reward model (ppo, grpo, rloo)")
    p.add_argument("--prompts", default=None, help="'workspace' (default) or a prompt file")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--name", default=None, help="name of the registered model version")
    p.add_argument(
        "--resume", type=int, default=None, metavar="RUN", help="continue a PPO run from its checkpoint"
    )
    p.set_defaults(handler="cmd_rl_train")
    p = rl.add_parser("eval", parents=[common], help="reward, KL, length and win rate on held-out prompts")
    p.add_argument("policy", help="the policy to evaluate")
    p.add_argument("--baseline", required=True, help="the policy to compare with (e.g. the previous round's)")
    p.add_argument("--reward-model", required=True, help="the reward model used in training")
    p.add_argument("--judge", required=True, help="a different reward model, to judge the win rate")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--preset", default=None, help="an L1 prompting preset for both policies")
    p.set_defaults(handler="cmd_rl_eval")

    round_ = sub.add_parser("round", help="the RLHF loop").add_subparsers(
        dest="round_command", required=True, metavar="ACTION"
    )
    p = round_.add_parser(
        "next", parents=[common], help="close the round: reward, RL, register, queue the next"
    )
    p.add_argument("--reward-config", default=None, help="reward YAML (default configs/reward/default.yaml)")
    p.add_argument("--rl-config", default=None, help="RL YAML (default configs/rl/default.yaml)")
    p.add_argument("--algo", default="ppo", choices=["ppo", "grpo", "rloo", "dpo"])
    p.add_argument("--prompts", type=int, default=32, help="prompts to queue for the next round")
    p.set_defaults(handler="cmd_round_next")
    p = round_.add_parser("lineage", parents=[common], help="every model a vote influenced")
    p.add_argument("--vote", type=int, required=True)
    p.set_defaults(handler="cmd_round_lineage")

    keys = sub.add_parser("keys", help="API keys for /v1 (OpenAI-compatible) and scripts").add_subparsers(
        dest="keys_command", required=True, metavar="ACTION"
    )
    p = keys.add_parser("create", parents=[common], help="create a key (printed once)")
    p.add_argument("name", help="what the key is for")
    p.add_argument("--user", default="admin", help="the user the key acts as")
    p.set_defaults(handler="cmd_keys")
    p = keys.add_parser("list", parents=[common], help="list keys (never the keys themselves)")
    p.set_defaults(handler="cmd_keys")
    p = keys.add_parser("revoke", parents=[common], help="revoke a key")
    p.add_argument("id", type=int)
    p.set_defaults(handler="cmd_keys")

    presets = sub.add_parser("presets", help="L1 prompting presets").add_subparsers(
        dest="presets_command", required=True, metavar="ACTION"
    )
    p = presets.add_parser("save", parents=[common], help="save a preset (a new version if the name exists)")
    p.add_argument("name")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--examples", default=None, help='JSON file: [{"user": ..., "assistant": ...}, ...]')
    p.add_argument("--cot", default=None, help="chain-of-thought instruction appended to the user's turn")
    p.set_defaults(handler="cmd_presets")
    p = presets.add_parser("list", parents=[common], help="the latest version of each preset")
    p.set_defaults(handler="cmd_presets")

    export = sub.add_parser("export", help="export data and models").add_subparsers(
        dest="export_command", required=True, metavar="WHAT"
    )
    p = export.add_parser("prefs", parents=[common], help="preference pairs (TRL format) or raw votes")
    p.add_argument("out", help="file (.jsonl, .parquet) or folder (a `datasets` dataset on disk)")
    p.add_argument("--raw", action="store_true", help="every vote with its annotator, order, ratings, timing")
    p.add_argument("--format", default="auto", choices=["auto", "jsonl", "parquet", "dataset"])
    p.add_argument("--include-ties", action="store_true")
    p.add_argument("--include-both-bad", action="store_true")
    p.add_argument("--round", type=int, nargs="+", default=None, help="only these rounds")
    p.set_defaults(handler="cmd_export_prefs")

    p = export.add_parser(
        "feedback", parents=[common], help="chat feedback (edits, up/down) as preference pairs"
    )
    p.add_argument("out", help="file (.jsonl, .parquet) or folder")
    p.add_argument("--format", default="auto", choices=["auto", "jsonl", "parquet", "dataset"])
    p.set_defaults(handler="cmd_export_feedback")

    p = export.add_parser(
        "model", parents=[common], help="a model version as merged weights or GGUF, with a card"
    )
    p.add_argument("ref", help="'default' or a registered model version")
    p.add_argument("out", help="a new (or empty) folder")
    p.add_argument(
        "--format", default="hf", choices=["hf", "gguf"], help="hf: safetensors; gguf: llama.cpp/Ollama"
    )
    p.add_argument("--quant", default="f16", choices=["f16", "q8_0", "q4_k_m"], help="GGUF weight type")
    p.add_argument("--allow-noncommercial", action="store_true", help="export a non-commercial base anyway")
    p.set_defaults(handler="cmd_export_model")

    p = sub.add_parser("backup", parents=[common], help="a consistent copy of the database and models (live)")
    p.add_argument("out", help="a new, empty folder")
    p.set_defaults(handler="cmd_backup")
    p = sub.add_parser("restore", parents=[common], help="fill a new workspace from a backup")
    p.add_argument("backup", help="a folder written by `alignloop backup`")
    p.add_argument(
        "--database-url", default=None, help="an empty PostgreSQL database (for PostgreSQL backups)"
    )
    p.set_defaults(handler="cmd_restore")

    p = sub.add_parser("serve", parents=[common], help="run the web app")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument(
        "--workers", type=int, default=1, help="web worker processes (one Python process uses one core)"
    )
    p.set_defaults(handler="cmd_serve")
    return parser
