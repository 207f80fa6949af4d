"""The command line's grammar: argparse only, importable without the handlers.

`alignloop.cli` maps each parsed command to its handler (`handler` names a `cmd_*` function there); the job
runner (`alignloop.jobs`) parses a job's arguments with the same parser before it starts anything.

The train subcommands are generated from their run configs (`SFTRunConfig`, `RewardRunConfig`, one config per
RL algorithm), the way `HfArgumentParser`/`TrlParser` do it but with argparse alone: one flag per dataclass
field, its type, default, choices and help read from the field (`metadata={"help", "choices", "aliases"}`),
so a setting is declared once. A flag left out is None, so `--config run.yaml` supplies it, else the field's
default: the command line overrides the YAML, which overrides the dataclass.

Every count is bounded here (`alignloop.core.limits.COUNT_BOUNDS`, shared with the configs' own validation),
so `--samples 99999999999999999999` ends at parse time with one line and allocates nothing.
Trade-off: generated flags follow field names (`--max-steps`, `--per-device-train-batch-size`); a friendlier
name is an `aliases` entry in the field's metadata, not a second declaration.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing

from alignloop.core import __version__
from alignloop.core.config import GGUF_BACKENDS
from alignloop.core.limits import MAX_BATCH, MAX_ID, MAX_NEW_TOKENS, MAX_PROMPTS, MAX_RESPONSES, check_bound

# Flags of the train subcommands that are not run-config fields.
NON_CONFIG_FLAGS = {"--config", "--algo", "--resume", "--workspace", "--help", "-h"}


class Parser(argparse.ArgumentParser):
    """argparse, with errors on one line (no usage block): `alignloop: error: argument --samples: ...`.

    `populate` adds arguments on first use: the train subcommands read their config dataclasses from modules
    that import torch and TRL, which `alignloop --help` or `alignloop users add` should not wait for."""

    def __init__(self, *args, populate=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._populate = populate

    def populated(self) -> Parser:
        if self._populate is not None:
            populate, self._populate = self._populate, None
            populate(self)
        return self

    def parse_known_args(self, args=None, namespace=None):
        self.populated()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self.populated()
        return super().format_help()

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def count(name: str, low: int | None = None, high: int | None = None):
    """An argparse type for a bounded integer: `low`..`high` when given, else the table's bound for `name`
    (`COUNT_BOUNDS`, which the config files are checked against too)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, not {text[:30]!r}") from None
        if low is not None and high is not None:
            if not low <= value <= high:
                shown = text if len(text) <= 24 else text[:21] + "..."
                raise argparse.ArgumentTypeError(f"must be between {low:,} and {high:,}, not {shown}")
        elif problem := check_bound(name, value, integer=True):
            raise argparse.ArgumentTypeError(problem.removeprefix(f"{name} "))
        return value

    parse.__name__ = "int"  # argparse names the type in its messages
    return parse


def number(name: str):
    """An argparse type for a number, bounded where the table names it (epochs, seconds, held_out)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, not {text[:30]!r}") from None
        if problem := check_bound(name, value, integer=False):
            raise argparse.ArgumentTypeError(problem.removeprefix(f"{name} "))
        return value

    parse.__name__ = "float"
    return parse


class _ListOrStr(argparse.Action):
    """`list[str] | str` fields: one value stays a string ("all-linear"), several make a list."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values[0] if len(values) == 1 else list(values))


def _members(hint) -> tuple:
    """The types a field may hold: a union's members, or the type itself (`list[str]` stays one type)."""
    return typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_arguments(parser: argparse.ArgumentParser, configs: dict[str, type]) -> None:
    """One flag per field of the given run-config dataclasses (several: the union, each field once, its help
    saying which configs have it). Defaults are None: the YAML and then the dataclass fill what is not given."""
    seen: dict[str, tuple] = {}
    owners: dict[str, list[str]] = {}
    for label, cls in configs.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            owners.setdefault(f.name, []).append(label)
            key = (hints[f.name], tuple(f.metadata.get("choices", ())), tuple(f.metadata.get("aliases", ())))
            if f.name in seen and seen[f.name][0] != key:
                raise TypeError(f"{f.name} has a different type or choices in {label}'s config")
            if f.name not in seen:
                seen[f.name] = (key, f, hints[f.name])
    for name, (_, f, hint) in seen.items():
        only = "" if len(owners[name]) == len(configs) else f" ({', '.join(owners[name])} only)"
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        shown = "" if default is None or default == [] else f" [default: {default}]"
        help_text = f.metadata.get("help", "") + shown + only
        names = [flag(name), *f.metadata.get("aliases", ())]
        options: dict = {"dest": name, "default": None, "help": help_text.replace("%", "%%")}
        args = [a for a in _members(hint) if a is not type(None)]
        if bool in args:
            options["action"] = argparse.BooleanOptionalAction
        else:
            lists = [typing.get_args(a)[0] for a in args if typing.get_origin(a) is list]
            base = lists[0] if lists else args[0]
            options["type"] = count(name) if base is int else number(name) if base is float else str
            if lists:
                options["nargs"] = "+"
                if str in args:
                    options["action"] = _ListOrStr
            if "choices" in f.metadata:
                options["choices"] = list(f.metadata["choices"])
            if base in (int, float):
                options["metavar"] = "N"
        parser.add_argument(*names, **options)


def config_overrides(args: argparse.Namespace, *configs: type) -> dict:
    """The run-config fields given on the command line (a flag left out is not an override)."""
    names = {f.name for cls in configs for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(args).items() if k in names and v is not None}


def _sft_train_flags(p: argparse.ArgumentParser) -> None:
    from sft.train import SFTRunConfig

    p.add_argument("--config", default=None, help="YAML with SFTRunConfig fields (configs/sft/*.yaml)")
    add_config_arguments(p, {"sft": SFTRunConfig})


def _reward_train_flags(p: argparse.ArgumentParser) -> None:
    from reward.train import RewardRunConfig

    p.add_argument("--config", default=None, help="YAML with RewardRunConfig fields (configs/reward/*.yaml)")
    add_config_arguments(p, {"reward": RewardRunConfig})


def _rl_train_flags(p: argparse.ArgumentParser) -> None:
    from rl.configs import CONFIGS

    p.add_argument("--algo", default="ppo", choices=list(CONFIGS))
    p.add_argument(
        "--config", default=None, help="YAML with the algorithm's config fields (configs/rl/*.yaml)"
    )
    p.add_argument(
        "--resume",
        type=count("resume", 1, MAX_ID),
        default=None,
        metavar="RUN",
        help="continue a PPO run from its checkpoint (with the run's saved config)",
    )
    add_config_arguments(p, CONFIGS)


def make_parser() -> argparse.ArgumentParser:
    common = Parser(add_help=False)
    common.add_argument(
        "--workspace", default=None, help="workspace folder (default: $ALIGNLOOP_HOME, else ./alignloop-data)"
    )
    # Commands that run a model for inference take these (training placement is Accelerate's).
    placed = argparse.ArgumentParser(add_help=False, parents=[common])
    placed.add_argument(
        "--device", default=None, help="auto | cpu | cuda | cuda:N (default: config.yaml's device)"
    )
    placed.add_argument(
        "--dtype",
        default=None,
        choices=["auto", "float32", "bfloat16", "float16"],
        help="model precision (default: config.yaml's; auto = bf16 where the device does it natively)",
    )
    parser = Parser(
        prog="alignloop", description="Self-hosted human feedback and RLHF: annotate, reward, align, serve."
    )
    parser.add_argument("--version", action="version", version=f"alignloop {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("init", parents=[common], help="create a workspace: config, database, admin user")
    p.add_argument("--database-url", default="", help="SQLAlchemy URL (default: SQLite in the workspace)")
    p.set_defaults(handler="cmd_init")

    p = sub.add_parser("demo", parents=[placed], help="init, import sample prompts, generate round 0, serve")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=count("port", 1, 65535), default=7860)
    p.add_argument(
        "--prompts", type=count("prompts", 1, 1000), default=40, help="sample prompts to generate for"
    )
    p.add_argument("--max-new-tokens", type=count("max_new_tokens"), default=96)
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

    p = sub.add_parser("generate", parents=[placed], help="sample responses and queue them as comparisons")
    p.add_argument("--model", default=None, help="'default', a registered version, a directory or a hub id")
    p.add_argument("--preset", default=None, help="an L1 prompting preset (name or name@version)")
    p.add_argument(
        "--prompts",
        type=count("prompts", 1, MAX_PROMPTS),
        default=32,
        help="number of prompts (those not yet in this round)",
    )
    p.add_argument(
        "--samples",
        type=count("samples", 2, MAX_RESPONSES),
        default=2,
        help=f"responses per prompt, 2 to {MAX_RESPONSES} (K>2 makes ranking items; the annotation page shows "
        f"at most {MAX_RESPONSES})",
    )
    p.add_argument("--round", type=count("round"), default=0)
    p.add_argument("--split", default="train", choices=["train", "eval"])
    p.add_argument(
        "--target-votes", type=count("target_votes"), default=None, help="votes each comparison needs"
    )
    p.add_argument("--max-new-tokens", type=count("max_new_tokens"), default=None)
    p.add_argument("--temperature", type=number("temperature"), default=None)
    p.add_argument("--top-p", type=number("top_p"), default=None)
    p.add_argument("--top-k", type=count("top_k", 0, 1_000_000), default=0)
    p.add_argument("--seed", type=count("seed"), default=0)
    p.add_argument("--batch-size", type=count("batch_size", 1, MAX_BATCH), default=None)
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
    p.add_argument("--round", type=count("round"), default=0)
    p.set_defaults(handler="cmd_prefs_import")

    gold = sub.add_parser("gold", help="gold items: comparisons with a known answer").add_subparsers(
        dest="gold_command", required=True, metavar="ACTION"
    )
    p = gold.add_parser("import", parents=[common], help="import gold items (all or nothing)")
    p.add_argument(
        "file", help='JSON lines: {"prompt", "responses": [2-4 texts], "gold": "a" | ["C", "A", "B"]}'
    )
    p.add_argument("--round", type=int, default=0)
    p.set_defaults(handler="cmd_gold_import")

    judge = sub.add_parser("judge", help="RLAIF: an AI annotator").add_subparsers(
        dest="judge_command", required=True, metavar="ACTION"
    )
    p = judge.add_parser("run", parents=[placed], help="vote on queued comparisons as an AI judge")
    p.add_argument("--user", default="ai-judge", help="the judge's (AI) user; created if missing")
    p.add_argument("--model", default=None, help="local judge model reference (default: the default policy)")
    p.add_argument("--openai-base-url", default=None, help="use an OpenAI-compatible endpoint instead")
    p.add_argument("--openai-model", default=None)
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    p.add_argument("--max-items", type=count("max_items", 1, 10 * MAX_PROMPTS), default=None)
    p.add_argument(
        "--gold-share", type=number("gold_share"), default=0.05, help="share of its items that are gold items"
    )
    p.add_argument("--constitution", default=None, help="principles for the judge, one per line (text file)")
    p.add_argument(
        "--critique", action="store_true", help="store a written critique as each vote's rationale"
    )
    p.add_argument(
        "--revise",
        action="store_true",
        help="critique and revise: store an improved reply as SFT data (sft train --from-chat-edits)",
    )
    p.add_argument("--round", type=count("round"), default=None, help="only this round's comparisons")
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
            p.add_argument("--round", type=count("round"), default=None)
        p.set_defaults(handler="cmd_argilla")

    sft = sub.add_parser("sft", help="instruction tuning with PEFT (L2)").add_subparsers(
        dest="sft_command", required=True, metavar="ACTION"
    )
    p = sft.add_parser(
        "train",
        parents=[common],
        populate=_sft_train_flags,
        help="tune a model on instruction data; registers the result",
    )
    p.set_defaults(handler="cmd_sft_train")

    reward = sub.add_parser("reward", help="reward models: train and evaluate").add_subparsers(
        dest="reward_command", required=True, metavar="ACTION"
    )
    p = reward.add_parser(
        "train",
        parents=[common],
        populate=_reward_train_flags,
        help="train a reward model on preferences; registers it",
    )
    p.set_defaults(handler="cmd_reward_train")
    p = reward.add_parser(
        "eval", parents=[placed], help="accuracy, calibration, length bias of a reward model"
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
    p = rl.add_parser(
        "train", parents=[common], populate=_rl_train_flags, help="optimise a policy; registers the result"
    )
    p.set_defaults(handler="cmd_rl_train")
    p = rl.add_parser("eval", parents=[placed], help="reward, KL, length and win rate on held-out prompts")
    p.add_argument("policy", help="the policy to evaluate")
    p.add_argument("--baseline", required=True, help="the policy to compare with (e.g. the previous round's)")
    p.add_argument("--reward-model", required=True, help="the reward model used in training")
    p.add_argument("--judge", required=True, help="a different reward model, to judge the win rate")
    p.add_argument("--num-prompts", type=count("num_prompts", 1, MAX_PROMPTS), default=32)
    p.add_argument("--max-new-tokens", type=count("max_new_tokens", 1, MAX_NEW_TOKENS), default=64)
    p.add_argument("--preset", default=None, help="an L1 prompting preset for both policies")
    p.add_argument(
        "--seed",
        type=count("seed", 0, 2**32 - 1),
        default=0,
        help="sampling seed (repeat with others to average the sampling noise)",
    )
    p.set_defaults(handler="cmd_rl_eval")

    report = sub.add_parser("report", help="reports across stages").add_subparsers(
        dest="report_command", required=True, metavar="WHAT"
    )
    p = report.add_parser(
        "levels", parents=[common], help="L1 presets, L2 and L3 versions vs the base: win rate, cost"
    )
    p.add_argument("--judge", default=None, help="reward model that judges (default: the newest registered)")
    p.add_argument(
        "--ai-judge", default=None, help="also judge with this local model as an AI judge (RLAIF's judge)"
    )
    p.add_argument("--ai-judge-base-url", default=None, help="... or with an OpenAI-compatible endpoint")
    p.add_argument("--ai-judge-model", default=None, help="the endpoint's model name")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    p.add_argument(
        "--ai-judge-user",
        default="ai-judge",
        help="the AI judge's annotator name: versions trained on its votes are flagged self-judged",
    )
    p.add_argument("--base", default=None, help="the base model (default: the workspace's default policy)")
    p.add_argument(
        "--prompts",
        type=count("num_prompts", 1, MAX_PROMPTS),
        default=32,
        help="held-out (eval split) prompts to answer",
    )
    p.add_argument("--models", nargs="+", default=None, help="only these SFT/policy versions (default: all)")
    p.add_argument("--max-new-tokens", type=count("max_new_tokens", 1, MAX_NEW_TOKENS), default=64)
    p.add_argument("--temperature", type=number("temperature"), default=0.7)
    p.add_argument("--seed", type=count("seed", 0, 2**32 - 1), default=0)
    p.add_argument("--out", default=None, help="folder for levels.json, levels.md and levels.png")
    p.set_defaults(handler="cmd_report_levels")

    round_ = sub.add_parser("round", help="the RLHF loop").add_subparsers(
        dest="round_command", required=True, metavar="ACTION"
    )
    p = round_.add_parser(
        "next", parents=[common], help="close the round: reward, RL, register, queue the next"
    )
    p.add_argument("--reward-config", default=None, help="reward YAML (default configs/reward/default.yaml)")
    p.add_argument("--rl-config", default=None, help="RL YAML (default configs/rl/default.yaml)")
    p.add_argument("--algo", default="ppo", choices=["ppo", "grpo", "rloo", "dpo"])
    p.add_argument(
        "--prompts",
        type=count("prompts", 1, MAX_PROMPTS),
        default=32,
        help="prompts to queue for the next round",
    )
    p.set_defaults(handler="cmd_round_next")
    p = round_.add_parser(
        "report", parents=[common], help="human win rate of each round's policy against its predecessor"
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler="cmd_round_report")
    p = round_.add_parser("ai-votes", parents=[common], help="AI judge slots per comparison in a round")
    p.add_argument(
        "ai_votes", type=int, help="slots for AI votes, beside the people's target_votes (0 = none)"
    )
    p.add_argument("--round", type=int, default=0)
    p.set_defaults(handler="cmd_round_ai_votes")
    p = round_.add_parser("lineage", parents=[common], help="every model a vote influenced")
    p.add_argument("--vote", type=count("vote", 1, MAX_ID), required=True)
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
    p.add_argument("id", type=count("id", 1, MAX_ID))
    p.set_defaults(handler="cmd_keys")

    licences = sub.add_parser(
        "licences", help="licence review: restricted or undeclared licences"
    ).add_subparsers(dest="licences_command", required=True, metavar="ACTION")
    p = licences.add_parser("list", parents=[common], help="the licence acceptances admins have recorded")
    p.set_defaults(handler="cmd_licences")
    p = licences.add_parser(
        "accept", parents=[common], help="record an admin's acceptance of a model's licence terms"
    )
    p.add_argument("ref", help="the model reference, as you load it (a version name, a folder, a hub id)")
    p.add_argument(
        "--licence",
        default=None,
        help="the licence you accept: must be the one the model declares; for a model that declares none, "
        "a note of the terms you found",
    )
    p.add_argument("--user", default="admin", help="the admin who accepts (recorded with the time)")
    p.set_defaults(handler="cmd_licences")

    presets = sub.add_parser("presets", help="L1 prompting presets").add_subparsers(
        dest="presets_command", required=True, metavar="ACTION"
    )
    p = presets.add_parser("save", parents=[common], help="save a preset (a new version if the name exists)")
    p.add_argument("name")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--examples", default=None, help='JSON file: [{"user": ..., "assistant": ...}, ...]')
    p.add_argument("--cot", default=None, help="chain-of-thought instruction appended to the user's turn")
    p.add_argument(
        "--num-shots",
        type=int,
        default=None,
        help="show the K examples most similar to each prompt (the examples become a pool)",
    )
    p.add_argument("--shot-order", default="similar_last", choices=["similar_last", "similar_first"])
    p.add_argument("--delimiter", default=None, help="users see only the answer after this text (hides CoT)")
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
    p.add_argument("--round", type=count("rounds"), nargs="+", default=None, help="only these rounds")
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

    p = sub.add_parser("serve", parents=[placed], help="run the web app")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=count("port", 1, 65535), default=7860)
    p.add_argument(
        "--workers",
        type=count("workers", 1, 64),
        default=1,
        help="web worker processes (one Python process uses one core)",
    )
    p.add_argument(
        "--gguf-backend",
        choices=GGUF_BACKENDS,
        default=None,
        help="who serves GGUF versions (default: the workspace's gguf_backend setting)",
    )
    p.set_defaults(handler="cmd_serve")
    return parser
