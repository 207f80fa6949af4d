"""`alignloop ...`: the command line. Each subcommand parses, calls one library function, prints a summary.

Errors the user can act on (`AlignloopError`) print as one line and exit 1; nothing prints a traceback
unless ALIGNLOOP_DEBUG=1. The hub is offline unless the user set HF_HUB_OFFLINE themselves.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import sys
from dataclasses import replace
from importlib import resources
from pathlib import Path

# Before anything imports huggingface_hub: no telemetry, and no downloads the user did not ask for.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from sqlalchemy.exc import SQLAlchemyError  # noqa: E402

from alignloop.core import AlignloopError, __version__, workspace  # noqa: E402
from alignloop.core.config import Settings, is_workspace, workspace_path  # noqa: E402
from alignloop.core.workspace import init_workspace  # noqa: E402
from alignloop.parser import config_overrides, make_parser  # noqa: E402

log = logging.getLogger("alignloop")


# --- commands ------------------------------------------------------------------------------------------------


def cmd_init(args) -> int:
    path = workspace_path(args.workspace)
    if is_workspace(path):
        raise AlignloopError(f"{path} is already an alignloop workspace")
    password = init_workspace(path, database_url=args.database_url)
    print(f"workspace ready at {path}")
    print(f"admin login: admin / {password}   (shown once; `alignloop users passwd admin` sets a new one)")
    return 0


def open_workspace(args) -> tuple[Settings, object]:
    settings, engine = workspace.open_workspace(args.workspace)
    # --device/--dtype override config.yaml for every model this command loads (see alignloop.core.devices).
    overrides = {k: v for k in ("device", "dtype") if (v := getattr(args, k, None))}
    return (replace(settings, **overrides) if overrides else settings), engine


def cmd_prompts_import(args) -> int:
    from alignloop.core import crud
    from alignloop.core.db import session_scope
    from alignloop.core.prompts import parse_prompt_file

    settings, engine = open_workspace(args)
    prompts = parse_prompt_file(args.file, fmt=args.format)  # validates everything before any write
    if args.split:
        for p in prompts:
            p.split = args.split
    with session_scope(engine) as session:
        added, duplicates = crud.add_prompts(
            session, prompts=prompts, source=args.source or Path(args.file).name
        )
    print(f"imported {len(added)} prompts from {args.file} ({duplicates} duplicates skipped)")
    return 0


def cmd_generate(args) -> int:
    from alignloop.core.sampling import SamplingParams
    from annotate.generate import queue_comparisons

    settings, engine = open_workspace(args)
    preset = None
    if args.preset:
        from sqlmodel import Session

        from alignloop.core.presets import get_preset

        with Session(engine, expire_on_commit=False) as session:
            preset = get_preset(session, args.preset)
    params = SamplingParams(
        max_new_tokens=args.max_new_tokens or settings.max_new_tokens,
        temperature=settings.temperature if args.temperature is None else args.temperature,
        top_p=args.top_p or settings.top_p,
        top_k=args.top_k,
        seed=args.seed,
    )
    summary = queue_comparisons(
        engine,
        settings=settings,
        model_ref=args.model or settings.default_policy,
        num_prompts=args.prompts,
        num_samples=args.samples,
        round=args.round,
        target_votes=args.target_votes,
        params=params,
        batch_size=args.batch_size,
        split=args.split,
        allow_noncommercial=args.allow_noncommercial or None,
        preset=preset,
    )
    if summary["prompts"] == 0:
        print(f"no {args.split} prompts left without a comparison in round {args.round}; import more prompts")
        return 0
    print(
        f"queued {summary['comparisons']} comparisons for round {args.round} from {summary['prompts']} prompts"
        f" ({summary['identical']} skipped: identical samples; run {summary['run_id']})"
    )
    return 0


def cmd_users_add(args) -> int:
    from alignloop.core import crud
    from alignloop.core.db import session_scope

    _, engine = open_workspace(args)
    password = sys.stdin.readline().rstrip("\n") if args.password_stdin else secrets.token_urlsafe(12)
    if args.kind == "human" and len(password) < 8:
        raise AlignloopError("a password needs at least 8 characters")
    with session_scope(engine) as session:
        crud.create_user(
            session,
            name=args.name,
            role=args.role,
            kind=args.kind,
            password=password if args.kind == "human" else None,
        )
    print(f"added {args.kind} user {args.name} ({args.role})")
    if args.kind == "human" and not args.password_stdin:
        print(f"password: {password}   (shown once)")
    return 0


def cmd_users_passwd(args) -> int:
    from alignloop.core import crud
    from alignloop.core.db import session_scope

    _, engine = open_workspace(args)
    password = secrets.token_urlsafe(12)
    with session_scope(engine) as session:
        user = crud.get_user(session, name=args.name)
        if user is None:
            raise AlignloopError(f"no user named {args.name!r}")
        crud.set_password(session, user=user, password=password)
    print(f"new password for {args.name}: {password}   (shown once)")
    return 0


def cmd_export_prefs(args) -> int:
    from alignloop.core import crud
    from alignloop.core.db import session_scope
    from alignloop.core.export import write_rows

    _, engine = open_workspace(args)
    with session_scope(engine) as session:
        if args.raw:
            rows = crud.raw_votes(session, rounds=args.round)
        else:
            rows = crud.preference_pairs(
                session,
                include_ties=args.include_ties,
                include_both_bad=args.include_both_bad,
                rounds=args.round,
            )
    if not rows:
        raise AlignloopError("nothing to export: no votes" + (" in the chosen rounds" if args.round else ""))
    fmt = write_rows(rows, Path(args.out), fmt=args.format)
    what = "votes" if args.raw else "preference pairs"
    print(f"exported {len(rows)} {what} to {args.out} ({fmt})")
    return 0


def cmd_export_feedback(args) -> int:
    from sqlmodel import Session

    from alignloop.core import crud
    from alignloop.core.export import write_rows

    _, engine = open_workspace(args)
    with Session(engine) as session:
        rows = crud.feedback_pairs(session)
    if not rows:
        raise AlignloopError("nothing to export: no chat edits or up/down pairs yet")
    fmt = write_rows(rows, Path(args.out), fmt=args.format)
    print(f"exported {len(rows)} preference pairs from chat feedback to {args.out} ({fmt})")
    return 0


def cmd_export_model(args) -> int:
    from sqlmodel import Session

    from alignloop.core.db import session_scope
    from serve.export import export_model, record_export

    settings, engine = open_workspace(args)
    with Session(engine) as session:
        result = export_model(
            settings,
            args.ref,
            args.out,
            session=session,
            fmt=args.format,
            quant=args.quant,
            accept_licence=args.allow_noncommercial,
        )
    with session_scope(engine) as session:
        record_export(session, result)  # `alignloop serve` may run a GGUF export in llama.cpp
    print(
        f"exported {args.ref} ({result.fmt}{f', {result.quant}' if result.quant else ''}, licence "
        f"{result.licence}) to {result.out}:"
    )
    for name, size in result.files.items():
        print(f"  {name:<40} {size / 2**20:10.1f} MiB")
    print("run it:\n" + "\n".join(f"  {line}" for line in result.how_to_run()))
    return 0


def cmd_prefs_import(args) -> int:
    from alignloop.core.db import session_scope
    from annotate.io import import_preferences

    _, engine = open_workspace(args)
    with session_scope(engine) as session:
        report = import_preferences(session, path=args.file, round=args.round)
    print(f"{args.file}: {report.summary()}")
    for line, reason in report.skipped[:20]:
        print(f"  skipped line {line}: {reason}")
    return 0


def cmd_gold_import(args) -> int:
    from alignloop.core.db import session_scope
    from annotate.gold import import_gold

    _, engine = open_workspace(args)
    with session_scope(engine) as session:
        added = import_gold(session, path=args.file, round=args.round)
    print(f"{args.file}: added {added} gold items to round {args.round}")
    return 0


def make_judge(settings, engine, *, model, base_url, openai_model, api_key_env, instructions=None):
    """An AI judge: an OpenAI-compatible endpoint when `base_url` is given, else a local causal LM."""
    from annotate.judge import JUDGE_INSTRUCTIONS, LocalJudge, OpenAIJudge

    instructions = instructions or JUDGE_INSTRUCTIONS
    if base_url:
        if not openai_model:
            raise AlignloopError("an endpoint judge needs its model name (--openai-model / --ai-judge-model)")
        return OpenAIJudge(
            base_url=base_url,
            model=openai_model,
            api_key=os.environ.get(api_key_env),
            instructions=instructions,
        )
    from sqlmodel import Session

    from alignloop.core import registry

    with Session(engine) as session:
        source = registry.locate(model or settings.default_policy, settings=settings, session=session)
        placement = registry.placement_for(source, settings)
    loaded = registry.load_causal_lm(source, placement=placement, settings=settings)
    return LocalJudge(loaded.model, loaded.tokenizer, instructions=instructions)


def cmd_judge_run(args) -> int:
    from annotate.judge import Constitution, run_judge

    settings, engine = open_workspace(args)
    constitution = Constitution.load(args.constitution) if args.constitution else None
    judge = make_judge(
        settings,
        engine,
        model=args.model,
        base_url=args.openai_base_url,
        openai_model=args.openai_model,
        api_key_env=args.api_key_env,
        instructions=constitution.instructions() if constitution else None,
    )
    counts = run_judge(
        engine,
        judge=judge,
        user_name=args.user,
        max_items=args.max_items,
        gold_share=args.gold_share,
        round=args.round,
        critique=args.critique,
        revise=args.revise,
        constitution=constitution,
    )
    print(
        f"judge {args.user}: {counts['votes']} votes (a {counts['a']}, b {counts['b']}, tie {counts['tie']}, "
        f"ranked {counts['ranked']}; {counts['lost']} taken by others meanwhile)"
    )
    return 0


def cmd_argilla(args) -> int:
    from annotate.argilla_sync import connect, pull, push

    _, engine = open_workspace(args)
    api_key = os.environ.get(args.api_key_env)
    if not api_key:
        raise AlignloopError(f"set ${args.api_key_env} to your Argilla API key")
    client = connect(args.url, api_key)
    if args.argilla_command == "push":
        summary = push(
            engine, client, dataset_name=args.dataset, workspace=args.argilla_workspace, round=args.round
        )
        print(
            f"pushed {summary.pushed} pairs and {summary.pushed_rankings} rankings ({summary.already_pushed} "
            f"already in Argilla, {summary.skipped_k_way} with too many responses skipped)"
        )
    else:
        summary = pull(engine, client, dataset_name=args.dataset, workspace=args.argilla_workspace)
        print(
            f"pulled {summary.pulled} votes ({summary.already_present} already present, "
            f"{summary.not_counted} on comparisons that were already complete)"
        )
    return 0


def cmd_sft_train(args) -> int:
    from sft.train import SFTRunConfig, load_config, train

    settings, engine = open_workspace(args)
    config = load_config(args.config, **config_overrides(args, SFTRunConfig))
    summary = train(engine, settings, config)
    losses = summary["held_out_loss"]
    held = ", ".join(f"{k} {v:.3f}" for k, v in losses.items()) or "none held out"
    print(
        f"registered {summary['model']} (run {summary['run_id']}): {summary['method']}, "
        f"{summary['trainable_params']:,} of {summary['total_params']:,} parameters trained, "
        f"loss {summary['first_loss']:.3f} -> {summary['final_loss']:.3f}; held-out loss: {held}"
    )
    return 0


def cmd_reward_train(args) -> int:
    from reward.train import RewardRunConfig, load_config, train

    settings, engine = open_workspace(args)
    config = load_config(args.config, **config_overrides(args, RewardRunConfig))
    summary = train(engine, settings, config)
    if "model" not in summary:
        return 0  # a non-main process of a multi-process launch
    enc = summary["encoding"]
    accuracy = (
        "no held-out pairs"
        if summary["accuracy"] is None
        else (f"held-out accuracy {summary['accuracy']:.3f}, ECE {summary['ece']:.3f}")
    )
    print(
        f"registered {summary['model']} (run {summary['run_id']}): {summary['train_pairs']} pairs, "
        f"{summary['steps']} steps in {summary['train_seconds']:.0f} s; {accuracy}; "
        f"truncated: {enc['prompt_truncated']} prompts, {enc['response_truncated']} responses, 0 pairs dropped"
        + (f"; report {summary['report']}" if summary["report"] else "")
    )
    return 0


def cmd_reward_score_queue(args) -> int:
    from reward.score import score_queue

    settings, engine = open_workspace(args)
    count = score_queue(engine, settings, args.model)
    print(f"scored {count} queued comparisons with {args.model}: the least certain come first in the queue")
    return 0


def cmd_reward_eval(args) -> int:
    from sqlmodel import Session

    from reward import evaluate as reward_eval
    from reward.data import file_pairs, workspace_pairs
    from reward.score import RewardModel

    settings, engine = open_workspace(args)
    with Session(engine) as session:
        pairs = (
            [p for path in args.data for p in file_pairs(path)[0]] if args.data else workspace_pairs(session)
        )
        if not pairs:
            raise AlignloopError("nothing to evaluate on: no voted pairs in the workspace and no --data file")
        scorer = RewardModel.load(args.model, settings=settings, session=session)
    metrics = reward_eval.evaluate(scorer, pairs)
    print(
        f"{args.model}: accuracy {metrics['accuracy']:.3f} on {metrics['pairs']} pairs, ECE {metrics['ece']:.3f}, "
        f"reward~length correlation {metrics['length_correlation']:.2f} (prefers the longer side "
        f"{metrics['prefers_longer']:.0%}, humans {metrics['humans_prefer_longer']:.0%})"
    )
    for source, m in metrics["by_source"].items():
        print(f"  {source}: accuracy {m['accuracy']:.3f} on {m['pairs']} pairs")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "evaluation.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
        reward_eval.save_report(metrics, out / "report.png", title=args.model)
        print(f"report: {out / 'report.png'}")
    return 0


def cmd_rl_train(args) -> int:
    from rl.configs import CONFIGS
    from rl.train import load_config, train

    settings, engine = open_workspace(args)
    config = None  # a resumed run takes its saved config
    if args.resume is None:
        config = load_config(args.algo, args.config, **config_overrides(args, *CONFIGS.values()))
    summary = train(engine, settings, args.algo, config, resume=args.resume)
    if "model" not in summary:
        return 0  # a non-main process of a multi-process launch
    detail = (
        f"reward {summary['reward_start']:.3f} -> {summary['reward_end']:.3f}"
        if summary.get("reward_start") is not None
        else f"loss {summary.get('first_loss') or 0:.3f} -> {summary.get('final_loss') or 0:.3f}"
    )
    kl = f", KL {summary['kl_end']:.2f}" if "kl_end" in summary else ""
    print(
        f"registered {summary['model']} (run {summary['run_id']}, {args.algo}): {summary['steps']} steps in "
        f"{summary['train_seconds']:.0f} s, {detail}{kl}"
    )
    return 0


def cmd_rl_eval(args) -> int:
    from rl.evaluate import evaluate_policy

    settings, engine = open_workspace(args)
    result = evaluate_policy(
        engine,
        settings,
        policy=args.policy,
        baseline=args.baseline,
        reward_model=args.reward_model,
        judge=args.judge,
        num_prompts=args.num_prompts,
        max_new_tokens=args.max_new_tokens,
        preset=args.preset,
        seed=args.seed,
    )
    print(json.dumps(result["summary"], indent=2))
    return 0


def cmd_report_levels(args) -> int:
    from serve.levels import build_report, markdown_table

    settings, engine = open_workspace(args)
    ai_judge = None
    if args.ai_judge or args.ai_judge_base_url:
        ai_judge = make_judge(
            settings,
            engine,
            model=args.ai_judge,
            base_url=args.ai_judge_base_url,
            openai_model=args.ai_judge_model,
            api_key_env=args.api_key_env,
        )
    report = build_report(
        engine,
        settings,
        judge=args.judge,
        ai_judge=ai_judge,
        ai_judge_name=args.ai_judge_model if args.ai_judge_base_url else args.ai_judge,
        ai_judge_user=args.ai_judge_user,
        base=args.base,
        num_prompts=args.prompts,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        seed=args.seed,
        models=args.models,
        out=args.out,
    )
    print(markdown_table(report), end="")
    print(
        f"stored as run {report['run_id']} (/admin/levels)" + (f"; files in {args.out}" if args.out else "")
    )
    return 0


def cmd_round_next(args) -> int:
    from alignloop.rounds import RoundPlan, next_round

    settings, engine = open_workspace(args)
    plan = RoundPlan(
        reward_config=args.reward_config, rl_config=args.rl_config, algo=args.algo, num_prompts=args.prompts
    )
    result = next_round(engine, settings, plan)
    print(
        f"closed round {result['round']}: reward model {result['reward_model'] or '- (dpo)'}, new policy "
        f"{result['policy']}; queued {result['queued']} comparisons for round {result['next_round']} (run {result['run_id']})"
    )
    return 0


def cmd_round_report(args) -> int:
    from sqlmodel import Session

    from annotate.evidence import report_json, report_text, round_over_round

    _, engine = open_workspace(args)
    with Session(engine) as session:
        results = round_over_round(session)
    print(json.dumps(report_json(results), indent=2) if args.json else report_text(results))
    return 0


def cmd_round_ai_votes(args) -> int:
    from alignloop.core.db import session_scope
    from alignloop.rounds import set_ai_votes

    _, engine = open_workspace(args)
    with session_scope(engine) as session:
        changed = set_ai_votes(session, round=args.round, ai_votes=args.ai_votes)
    print(
        f"round {args.round}: {args.ai_votes} AI slots per comparison ({changed} queued comparisons updated)"
    )
    return 0


def cmd_round_lineage(args) -> int:
    from sqlmodel import Session

    from alignloop.rounds import models_influenced_by_vote

    _, engine = open_workspace(args)
    with Session(engine) as session:
        models = models_influenced_by_vote(session, vote_id=args.vote)
        for m in models:
            print(f"{m.name}\t{m.kind}\tround {m.round}\tparent {m.parent_id}")
    if not models:
        print(f"vote {args.vote} has not reached any model yet")
    return 0


def cmd_keys(args) -> int:
    from alignloop.core import crud
    from alignloop.core.db import session_scope

    _, engine = open_workspace(args)
    with session_scope(engine) as session:
        if args.keys_command == "create":
            user = crud.get_user(session, name=args.user)
            if user is None:
                raise AlignloopError(f"no user {args.user!r}")
            key, row = crud.create_api_key(session, user=user, name=args.name)
            print(f"API key {row.id} ({row.name}, acts as {user.name}); shown once, store it now:\n{key}")
        elif args.keys_command == "revoke":
            row = crud.revoke_api_key(session, key_id=args.id)
            print(f"revoked API key {row.id} ({row.name})")
        else:
            for row in crud.list_api_keys(session):
                state = "revoked" if row.revoked else "active"
                print(
                    f"{row.id}\t{row.name}\t{row.prefix}...\tuser {row.user_id}\t{state}\t{row.created_at:%Y-%m-%d}"
                )
    return 0


def cmd_licences(args) -> int:
    from alignloop.core import licences, registry
    from alignloop.core.db import session_scope

    settings, engine = open_workspace(args)
    with session_scope(engine) as session:
        if args.licences_command == "accept":
            row, new, source = registry.accept_licence(
                args.ref, settings=settings, session=session, user=args.user, licence=args.licence
            )
            what = repr(source.licence) if row.licence else "no declared licence"
            verb = "accepted" if new else "already accepted"
            print(f"{verb}: {row.model_ref} ({what}) by {args.user} at {row.accepted_at:%Y-%m-%d %H:%M} UTC")
        else:
            rows = licences.list_acceptances(session)
            if not rows:
                print("no licence acceptances recorded")
            for row, name in rows:
                what = row.licence or f"(none declared{': ' + row.note if row.note else ''})"
                print(f"{row.model_ref}\t{what}\t{name}\t{row.accepted_at:%Y-%m-%d %H:%M} UTC")
    return 0


def cmd_presets(args) -> int:
    from alignloop.core.db import session_scope
    from alignloop.core.presets import list_presets, save_preset

    _, engine = open_workspace(args)
    with session_scope(engine) as session:
        if args.presets_command == "save":
            examples = _read_examples(args.examples) if args.examples else []
            preset = save_preset(
                session,
                name=args.name,
                system_prompt=args.system or "",
                examples=examples,
                chain_of_thought=args.cot,
                num_shots=args.num_shots,
                shot_order=args.shot_order,
                answer_delimiter=args.delimiter,
            )
            print(f"saved preset {preset.name}@{preset.version}")
        else:
            for p in list_presets(session):
                print(
                    f"{p.name}@{p.version}\t{len(p.examples)} examples\t{'cot' if p.chain_of_thought else ''}"
                    f"\t{p.system_prompt[:60]!r}"
                )
    return 0


def _read_examples(path: str) -> list:
    from alignloop.core.prompts import RecordError, loads

    try:
        examples = loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise AlignloopError(f"{path}: cannot read the examples ({exc.__class__.__name__})") from None
    except (ValueError, RecordError) as exc:
        raise AlignloopError(f"{path}: not valid JSON ({str(exc).splitlines()[0]})") from None
    if not isinstance(examples, list):
        raise AlignloopError(f'{path}: expected a JSON list of {{"user": ..., "assistant": ...}}')
    return examples


def cmd_backup(args) -> int:
    from alignloop.core.backup import backup

    settings, _ = open_workspace(args)
    manifest = backup(settings, Path(args.out))
    print(f"backed up the database and {len(manifest['models'])} model folders to {args.out}")
    return 0


def cmd_restore(args) -> int:
    from alignloop.core.backup import restore

    result = restore(Path(args.backup), workspace_path(args.workspace), database_url=args.database_url or "")
    print(f"restored {args.backup} into {result['restored_to']} ({len(result['models'])} model folders)")
    return 0


def cmd_serve(args) -> int:
    import uvicorn

    from alignloop.core import logins
    from alignloop.web import create_app

    settings, engine = open_workspace(args)
    if getattr(args, "gguf_backend", None):
        settings.gguf_backend = args.gguf_backend
    workers = getattr(args, "workers", 1)
    print(f"alignloop {__version__} serving {settings.workspace} on http://{args.host}:{args.port}")
    # Browsers hold Gradio's event streams open; without a bound, a shutdown waits for them indefinitely.
    options = {"host": args.host, "port": args.port, "log_level": "info", "server_header": False}
    options["timeout_graceful_shutdown"] = 5
    options.update(logins.proxy_options(settings))  # X-Forwarded-For only from the configured proxies
    if workers > 1:  # separate processes, each building the app from the workspace named in the environment
        os.environ["ALIGNLOOP_HOME"] = str(settings.workspace)
        os.environ["ALIGNLOOP_DEVICE"], os.environ["ALIGNLOOP_DTYPE"] = settings.device, settings.dtype
        os.environ["ALIGNLOOP_GGUF_BACKEND"] = settings.gguf_backend
        uvicorn.run("alignloop.web:app_from_env", factory=True, workers=workers, **options)
    else:
        uvicorn.run(create_app(settings, engine), **options)
    return 0


def cmd_demo(args) -> int:
    from alignloop.core import crud
    from alignloop.core.db import session_scope
    from alignloop.core.prompts import parse_prompt_file
    from alignloop.core.sampling import SamplingParams
    from annotate.generate import queue_comparisons

    path = workspace_path(args.workspace)
    if not is_workspace(path):
        password = init_workspace(path)
        print(f"workspace ready at {path}")
        print(
            f"admin login: admin / {password}   (shown once; `alignloop users passwd admin` sets a new one)"
        )
    else:
        print(f"using workspace {path} (forgot the admin password? `alignloop users passwd admin`)")
    settings, engine = open_workspace(args)
    with resources.as_file(resources.files("alignloop") / "samples" / "prompts.jsonl") as sample:
        prompts = parse_prompt_file(sample)
    with session_scope(engine) as session:
        added, _ = crud.add_prompts(session, prompts=prompts, source="alignloop-samples")
        queued = crud.count_comparisons(session, round=0)
    print(f"sample prompts: {len(added)} new, {len(prompts) - len(added)} already there")
    if queued == 0:
        print(
            "generating round-0 comparisons with the embedded default model (SmolLM2-135M-Instruct, CPU)..."
        )
        summary = queue_comparisons(
            engine,
            settings=settings,
            model_ref="default",
            num_prompts=args.prompts,
            num_samples=2,
            round=0,
            params=SamplingParams(max_new_tokens=args.max_new_tokens, temperature=0.8, top_p=0.95, seed=0),
        )
        print(
            f"queued {summary['comparisons']} comparisons ({summary['identical']} skipped: identical samples)"
        )
    else:
        print(f"round 0 already has {queued} comparisons")
    if args.no_serve:
        return 0
    return cmd_serve(args)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "transformers", "huggingface_hub", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args = make_parser().parse_args(argv)
    # Everything this process creates (database, WAL, backups, run logs, checkpoints) is the owner's only;
    # the modules that create files also chmod them (alignloop.core.files), for other entry points.
    os.umask(0o077)
    from alignloop.core import distributed, runguard

    opened, ok = runguard.mark(), False
    try:
        try:
            code = globals()[args.handler](args)
            ok = True
            return code
        except BaseException as exc:  # a Run this command opened and left running fails with the reason
            runguard.fail_unfinished(exc, since=opened)
            raise
        finally:  # under `accelerate launch`: every rank leaves the process group together
            distributed.finish(ok=ok)
    except AlignloopError as exc:
        if os.environ.get("ALIGNLOOP_DEBUG") == "1":
            raise
        print(f"alignloop: error: {exc}", file=sys.stderr)
        return 1
    except SQLAlchemyError as exc:
        if os.environ.get("ALIGNLOOP_DEBUG") == "1":
            raise
        reason = str(getattr(exc, "orig", None) or exc).splitlines()[0]
        print(f"alignloop: error: database: {reason} (ALIGNLOOP_DEBUG=1 shows the details)", file=sys.stderr)
        return 1
    except OverflowError:  # an integer argument beyond what the database stores (--round 10**20)
        print("alignloop: error: a number is too large", file=sys.stderr)
        return 1
    except OSError as exc:  # a file or folder the command needs: one line, not a traceback
        if os.environ.get("ALIGNLOOP_DEBUG") == "1":
            raise
        where = f": {exc.filename}" if exc.filename else ""
        print(f"alignloop: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("alignloop: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
