"""`alignloop report levels`: the three levels side by side — which one pays for this data?

On the same held-out prompts (split `eval`), with the same sampling, every way of answering is run:

    base        the base model as it is
    L1          the base model with each preset (latest version), with and without its CoT instruction
    L2          each SFT version
    L3          each policy version (PPO, GRPO, RLOO, DPO)

and judged against the base's answers, prompt by prompt, by a reward model (`--judge`): the win rate
(a tie counts half) and its standard error (sd of the per-prompt outcomes / sqrt(n)). What users would be
shown is judged: a preset's reasoning before its answer delimiter is cut off first.

A judge that helped make a version cannot referee it. Walking the version's lineage (`parent_id`, and each
ancestor's `Run.config`), a row is flagged `self-judged` when the judge is a reward model some ancestor was
trained against, or one derived from such a model, or when the judge learned from the same comparisons the
version was tuned on (SFT `from_chosen`, DPO: the workspace's votes at that time). Flagged rows stay in the
table and the chart (hollow marker) with the reason: never silently compared.

The AI judge (`--ai-judge MODEL`, or `--ai-judge-base-url URL --ai-judge-model NAME`: RLAIF's judge,
`annotate.judge`) adds a second win rate: each row's answer against the base's, asked in both orders, a verdict
that flips with the order counting as a tie. Its flag: the judge is the version or an ancestor of it, or its
votes (as the annotator `--ai-judge-user`) trained a reward model in the version's lineage or the version itself
(DPO, SFT on chosen answers).

Human votes, where they exist, come next to it: every voted comparison between two registered versions (arena
battles and the loop's new-vs-old comparisons) is fitted with Bradley-Terry as `serve.leaderboard` does,
with its bootstrap 95% interval.

Cost, per row, cumulative over the lineage (an L3 policy on an L2 version pays for both, and for the reward
model it was trained against): training minutes (run wall time x processes, by device), votes (the reward
models' and DPO's training pairs) and examples (distinct SFT examples the steps reached, RL rollouts) used, adapter size on disk, and
serving tokens/s measured on the report's own batched generation (the same batch size for every row).

The result is stored as a `Run` of kind `levels` (table in `metrics`, chart at runs/run<ID>/levels.png),
which /admin/levels shows; `--out DIR` also writes levels.json, levels.md and levels.png there.
"""

from __future__ import annotations

import io
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

from sqlmodel import Session, col, select

from alignloop.core import AlignloopError, crud, registry
from alignloop.core.config import Settings
from alignloop.core.db import session_scope
from alignloop.core.models import Comparison, ModelVersion, Preset, Run, Vote
from alignloop.core.presets import apply_preset, final_answer, list_presets
from alignloop.core.sampling import SamplingParams, generate
from annotate.judge import Judge, verdict
from reward.score import RewardModel
from serve.leaderboard import Battle, leaderboard

LEVELS = ("base", "L1", "L2", "L3")
COLOURS = {"base": "black", "L1": "tab:blue", "L2": "tab:green", "L3": "tab:red"}


@dataclass
class Entry:
    name: str  # the row's label
    level: str  # base | L1 | L2 | L3
    ref: str  # the model reference that answers
    preset: Preset | None = None
    chain_of_thought: bool = True
    version: ModelVersion | None = None


# --- what is compared ----------------------------------------------------------------------------------------


def entries(session: Session, base: str, models: list[str] | None) -> list[Entry]:
    rows = [Entry(name=base, level="base", ref=base)]
    for preset in list_presets(session):
        label = f"preset {preset.name}@{preset.version}"
        rows.append(Entry(name=label, level="L1", ref=base, preset=preset))
        if preset.chain_of_thought:
            rows.append(
                Entry(name=label + " (no CoT)", level="L1", ref=base, preset=preset, chain_of_thought=False)
            )
    for version in crud.list_model_versions(session):
        if (
            version.kind in ("sft", "policy")
            and version.name != base
            and (models is None or version.name in models)
        ):
            rows.append(
                Entry(
                    name=version.name,
                    level="L2" if version.kind == "sft" else "L3",
                    ref=version.name,
                    version=version,
                )
            )
    rows.sort(key=lambda e: LEVELS.index(e.level))  # stable: registration order within a level
    if models is not None:
        unknown = set(models) - {e.name for e in rows}
        if unknown:
            raise AlignloopError(f"not a registered SFT or policy version: {', '.join(sorted(unknown))}")
    return rows


def lineage(session: Session, version: ModelVersion) -> list[ModelVersion]:
    """The version and every version it was built from, through `parent_id` or a registered `base` name."""
    chain, seen, current = [], set(), version
    while current is not None and current.id not in seen:
        chain.append(current)
        seen.add(current.id)
        parent = session.get(ModelVersion, current.parent_id) if current.parent_id else None
        current = parent or crud.get_model_version(session, name=current.base)
    return chain


def _run(session: Session, version: ModelVersion) -> Run | None:
    return session.get(Run, version.run_id) if version.run_id else None


def _reward_models_used(session: Session, chain: list[ModelVersion]) -> list[ModelVersion]:
    used = []
    for version in chain:
        run = _run(session, version)
        name = (run.config if run else {}).get("reward_model")
        if name and (rm := crud.get_model_version(session, name=name)) is not None and rm not in used:
            used.append(rm)
    return used


def self_judged(session: Session, version: ModelVersion | None, judge: ModelVersion) -> str | None:
    """Why `judge` cannot referee `version` (see the module docstring), or None."""
    if version is None:
        return None
    chain = lineage(session, version)
    judge_chain = {v.id for v in lineage(session, judge)}
    for rm in _reward_models_used(session, chain):
        if rm.id in judge_chain:
            how = "is" if rm.id == judge.id else f"is derived from {rm.name!r},"
            return f"the judge {how} the reward model this version was trained against"
    judge_run = _run(session, judge)
    judged_on = (judge_run.config if judge_run else {}).get("comparison_ids") or []
    if judged_on:
        tuned = _tuned_on(session, chain, col(Vote.comparison_id).in_(judged_on))
        if tuned is not None:
            return f"{tuned.name!r} was tuned on votes the judge was also trained on"
    return None


def _tuned_on(session: Session, chain: list[ModelVersion], votes) -> ModelVersion | None:
    """The first version in `chain` tuned directly on votes (SFT on chosen answers, DPO: the workspace's votes
    when its run started) that include one matching the `votes` condition."""
    for ancestor in chain:
        run = _run(session, ancestor)
        config = run.config if run else {}
        if config.get("from_chosen") or config.get("algo") == "dpo":
            started = run.started_at or run.created_at
            if (
                session.exec(select(Vote.id).where(votes).where(Vote.created_at <= started)).first()
                is not None
            ):
                return ancestor
    return None


def ai_self_judged(
    session: Session, version: ModelVersion | None, *, judge_model: str | None, judge_user: str | None
) -> str | None:
    """Why the AI judge cannot referee `version`: it is the version or one of its ancestors, or its votes (as
    the annotator `judge_user`) trained a reward model the version was trained against, or the version itself."""
    if version is None:
        return None
    chain = lineage(session, version)
    if judge_model and judge_model in {v.name for v in chain}:
        return "the AI judge is this version or one it was built from"
    user = crud.get_user(session, name=judge_user) if judge_user else None
    if user is None:
        return None
    voted = set(session.exec(select(Vote.comparison_id).where(Vote.user_id == user.id)).all())
    for rm in _reward_models_used(session, chain):
        run = _run(session, rm)
        if voted & set((run.config if run else {}).get("comparison_ids") or []):
            return f"the reward model {rm.name!r} it was trained against learned from the AI judge's votes"
    tuned = _tuned_on(session, chain, Vote.user_id == user.id)
    if tuned is not None:
        chosen = _run(session, tuned).config.get("from_chosen")
        return f"{tuned.name!r} was tuned on {'the chosen answers of ' if chosen else ''}the AI judge's votes"
    return None


# --- cost ----------------------------------------------------------------------------------------------------


def _minutes(run: Run) -> float:
    end, start = run.finished_at, run.started_at or run.created_at
    if end is None or start is None:
        return 0.0
    return (end - start).total_seconds() / 60 * int(run.metrics.get("processes") or 1)


def _size_mb(path: str | None) -> float | None:
    if not path or not Path(path).exists():
        return None
    target = Path(path)
    files = [target] if target.is_file() else [f for f in target.rglob("*") if f.is_file()]
    return sum(f.stat().st_size for f in files) / 2**20


def cost(session: Session, version: ModelVersion | None) -> dict:
    """Training minutes (by device), votes and examples over the lineage and the reward models it used."""
    out = {"train_minutes": 0.0, "device": "", "votes": 0, "examples": 0, "adapter_mb": None}
    if version is None:
        return out
    chain = lineage(session, version)
    runs = {}
    for member in chain + _reward_models_used(session, chain):
        if (run := _run(session, member)) is not None:
            runs[run.id] = run
    devices = set()
    for run in runs.values():
        m = run.metrics
        out["train_minutes"] += _minutes(run)
        devices.add(m.get("device", "?"))
        if run.kind == "reward":
            out["votes"] += int(m.get("train_pairs") or 0)
        elif run.kind == "sft":
            out["examples"] += int(m.get("examples_seen", m.get("train_examples")) or 0)
        elif run.kind == "rl":
            if run.config.get("algo") == "dpo":
                out["votes"] += int(m.get("pairs") or 0)
            else:
                out["examples"] += int(m.get("steps") or 0) * int(run.config.get("batch_size") or 0)
    out["train_minutes"] = round(out["train_minutes"], 3)
    out["device"] = "+".join(sorted(devices))
    out["adapter_mb"] = _size_mb(version.path)
    return out


# --- human votes ---------------------------------------------------------------------------------------------


def human_ratings(session: Session) -> dict[str, dict]:
    """Bradley-Terry ratings of registered versions from every voted comparison between two of them."""
    names = {v.id: v.name for v in session.exec(select(ModelVersion)).all()}
    battles = []
    for comparison, vote in session.exec(
        select(Comparison, Vote).join(Vote, Vote.comparison_id == Comparison.id)
    ):
        generations = crud.comparison_generations(session, comparison_id=comparison.id)
        ids = [g.model_version_id for g in generations]
        if len(ids) != 2 or None in ids or ids[0] == ids[1] or vote.choice is None:
            continue
        battles.append(
            Battle(a=names[ids[0]], b=names[ids[1]], score_a={"a": 1.0, "b": 0.0}.get(vote.choice, 0.5))
        )
    return {row["model"]: row for row in leaderboard(battles)}


# --- the report ----------------------------------------------------------------------------------------------


def win_rate(scores: list[float], base_scores: list[float]) -> tuple[float, float | None]:
    wins = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores, base_scores, strict=True)]
    return mean_se(wins)


def mean_se(wins: list[float]) -> tuple[float, float | None]:
    """Mean of per-prompt outcomes (1 win, 0.5 tie, 0 loss) and its standard error."""
    n = len(wins)
    mean = sum(wins) / n
    if n < 2:
        return mean, None
    sd = math.sqrt(sum((w - mean) ** 2 for w in wins) / (n - 1))
    return mean, sd / math.sqrt(n)


def build_report(
    engine,
    settings: Settings,
    *,
    judge: str | None = None,
    ai_judge: Judge | None = None,
    ai_judge_name: str | None = None,
    ai_judge_user: str | None = "ai-judge",
    base: str | None = None,
    num_prompts: int = 32,
    max_new_tokens: int = 64,
    temperature: float = 0.7,
    seed: int = 0,
    batch_size: int = 8,
    models: list[str] | None = None,
    out: str | Path | None = None,
    progress: bool = False,
) -> dict:
    """Run every row, judge it against the base, store the result as a `levels` Run. Returns the report."""
    base = base or settings.default_policy
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    # 1. Everything that can be wrong is found before any model loads.
    with Session(engine) as session:
        prompts = [p.messages for p in crud.list_prompts(session, split="eval", limit=num_prompts)]
        if not prompts:
            raise AlignloopError(
                "no held-out prompts: import some with `alignloop prompts import FILE --split eval`"
            )
        if judge is None:
            rms = crud.list_model_versions(session, kind="reward")
            if not rms:
                raise AlignloopError(
                    "no reward model to judge with: `alignloop reward train`, or pass --judge"
                )
            judge = rms[-1].name
        judge_version = crud.get_model_version(session, name=judge)
        if judge_version is None or judge_version.kind != "reward":
            raise AlignloopError(f"--judge must be a registered reward model, not {judge!r}")
        rows = entries(session, base, models)
        flags = {e.name: self_judged(session, e.version, judge_version) for e in rows}
        ai_flags = {
            e.name: ai_self_judged(session, e.version, judge_model=ai_judge_name, judge_user=ai_judge_user)
            for e in rows
        }
        costs = {e.name: cost(session, e.version) for e in rows}
        humans = human_ratings(session)
        scorer = RewardModel.load(judge, settings=settings, session=session)

    # 2. Answer: one model in memory at a time; the base and every preset share one load.
    answers: dict[str, list[str]] = {}
    speed: dict[str, float] = {}
    for ref in dict.fromkeys(e.ref for e in rows):
        with Session(engine) as session:
            loaded = registry.resolve(ref, settings=settings, session=session)
        model = loaded.model.merge_and_unload() if hasattr(loaded.model, "merge_and_unload") else loaded.model
        for entry in (e for e in rows if e.ref == ref):
            shown = [apply_preset(entry.preset, p, chain_of_thought=entry.chain_of_thought) for p in prompts]
            start = time.perf_counter()
            completions = [
                c[0]
                for c in generate(
                    model, loaded.tokenizer, shown, params=params, batch_size=batch_size, progress=progress
                )
            ]
            seconds = time.perf_counter() - start
            speed[entry.name] = sum(c.num_tokens for c in completions) / max(seconds, 1e-9)
            answers[entry.name] = [final_answer(entry.preset, c.text) for c in completions]
        del model, loaded

    # 3. Judge every row against the base, on the original prompts (what the user asked).
    scores = {name: scorer.score(prompts, texts) for name, texts in answers.items()}
    # The AI judge (optional): each answer against the base's, both orders; a verdict that flips is a tie.
    ai = {}
    if ai_judge is not None:
        for entry in rows:
            ai[entry.name] = (
                (0.5, 0.0)
                if entry.name == base
                else mean_se(
                    [
                        (verdict(ai_judge, p, mine, theirs) + 1) / 2
                        for p, mine, theirs in zip(prompts, answers[entry.name], answers[base], strict=True)
                    ]
                )
            )
    table = []
    for entry in rows:
        rate, se = win_rate(scores[entry.name], scores[base])
        ai_rate, ai_se = ai.get(entry.name, (None, None))
        human = humans.get(entry.version.name if entry.version else entry.name)
        table.append(
            {
                "name": entry.name,
                "level": entry.level,
                "win_rate": round(rate, 4),
                "stderr": None if se is None else round(se, 4),
                "mean_judge_score": round(sum(scores[entry.name]) / len(prompts), 4),
                "self_judged": flags[entry.name],
                "ai_win_rate": None if ai_rate is None else round(ai_rate, 4),
                "ai_stderr": None if ai_se is None else round(ai_se, 4),
                "ai_self_judged": ai_flags[entry.name] if ai_judge is not None else None,
                "human_rating": human and human["rating"],
                "human_ci": human and [human["ci_low"], human["ci_high"]],
                "human_battles": human and human["battles"],
                **costs[entry.name],
                "tokens_per_s": round(speed[entry.name], 1),
            }
        )
    report = {
        "judge": judge,
        "ai_judge": (ai_judge_name or "default") if ai_judge is not None else None,
        "base": base,
        "prompts": len(prompts),
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "seed": seed,
        "rows": table,
        "samples": [
            {"prompt": p[-1]["content"], **{n: a[i] for n, a in answers.items()}}
            for i, p in enumerate(prompts[:5])
        ],
    }

    # 4. Store: the Run row (the admin page reads it) and its chart; optionally files in `out`.
    png = chart_png(table, title=f"{len(prompts)} held-out prompts, judge {judge}")
    with session_scope(engine) as session:
        run = crud.create_run(
            session,
            kind="levels",
            config={
                "judge": judge,
                "ai_judge": report["ai_judge"],
                "base": base,
                "prompts": len(prompts),
                "models": models,
                "max_new_tokens": max_new_tokens,
                "seed": seed,
            },
        )
        crud.finish_run(session, run=run, status="succeeded", metrics=report)
    run_dir = settings.runs_dir / f"run{run.id}"
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "levels.png").write_bytes(png)
    report["run_id"] = run.id
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "levels.png").write_bytes(png)
        (out / "levels.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
        (out / "levels.md").write_text(markdown_table(report), encoding="utf-8")
    return report


# --- presentation --------------------------------------------------------------------------------------------


def _num(value, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def markdown_table(report: dict) -> str:
    ai = report.get("ai_judge")
    lines = [
        f"Judge: reward model `{report['judge']}`"
        + (f", AI judge `{ai}`" if ai else "")
        + f" · {report['prompts']} held-out prompts · base `{report['base']}`",
        "",
        "| level | version | win rate vs base ± s.e. |"
        + (" AI judge win rate ± s.e. |" if ai else "")
        + " human BT rating [95% CI] (battles) | train min (device) | votes | examples | adapter MB | tokens/s |",
        "| --- | --- | --- |" + (" --- |" if ai else "") + " --- | --- | --- | --- | --- | --- |",
    ]
    for r in report["rows"]:
        win = f"{r['win_rate']:.2f} ± {_num(r['stderr'], '.2f')}"
        if r["self_judged"]:
            win += f" **self-judged**: {r['self_judged']}"
        if ai:
            win += f" | {_num(r.get('ai_win_rate'), '.2f')} ± {_num(r.get('ai_stderr'), '.2f')}"
            if r.get("ai_self_judged"):
                win += f" **self-judged**: {r['ai_self_judged']}"
        human = (
            f"{r['human_rating']:.0f} [{r['human_ci'][0]:.0f}, {r['human_ci'][1]:.0f}] ({r['human_battles']})"
            if r["human_rating"] is not None
            else "–"
        )
        minutes = f"{r['train_minutes']:.2f} ({r['device']})" if r["device"] else "0"
        lines.append(
            f"| {r['level']} | {r['name']} | {win} | {human} | {minutes} | {r['votes']} | {r['examples']} "
            f"| {_num(r['adapter_mb'], '.2f')} | {r['tokens_per_s']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def chart_png(rows: list[dict], *, title: str = "") -> bytes:
    import matplotlib.pyplot as plt

    fig = chart(rows, title=title)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    return buffer.getvalue()


def chart(rows: list[dict], *, title: str = ""):
    """Win rate against training minutes, one point per row and judge (circle: the reward model, square: the AI
    judge when there is one), coloured by level; self-judged points hollow."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    ai = any(r.get("ai_win_rate") is not None for r in rows)
    for level in LEVELS:
        for r in (r for r in rows if r["level"] == level):
            hollow = bool(r["self_judged"])
            points = [("o", r["win_rate"], r["stderr"], hollow)]
            if r.get("ai_win_rate") is not None:
                points.append(("s", r["ai_win_rate"], r.get("ai_stderr"), bool(r.get("ai_self_judged"))))
            for marker, rate, stderr, hollow_point in points:
                ax.errorbar(
                    r["train_minutes"],
                    rate,
                    yerr=stderr or 0,
                    fmt=marker,
                    capsize=3,
                    color=COLOURS[level],
                    mfc="none" if hollow_point else COLOURS[level],
                    ms=8,
                )
            ax.annotate(
                r["name"] + (" (self-judged)" if hollow else ""),
                (r["train_minutes"], r["win_rate"]),
                textcoords="offset points",
                xytext=(5, 4),
                fontsize=7,
            )
    for level in LEVELS:
        ax.plot([], [], "o", color=COLOURS[level], label=level)
    if ai:
        ax.plot([], [], "o", color="grey", mfc="none", label="reward-model judge")
        ax.plot([], [], "s", color="grey", mfc="none", label="AI judge")
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xscale("symlog", linthresh=0.1)  # L1 and the base cost no training: they sit at 0
    ax.set_xlim(left=-0.03)  # costs are never negative: no empty negative half
    ax.set_xlabel("training minutes, cumulative over the lineage (symlog)")
    ax.set_ylabel("win rate vs base (judge), ± s.e.")
    ax.set_ylim(-0.05, 1.05)
    ax.legend(loc="lower right")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def latest_report(session: Session) -> Run | None:
    return session.exec(
        select(Run).where(Run.kind == "levels", Run.status == "succeeded").order_by(col(Run.id).desc())
    ).first()
