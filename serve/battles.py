"""Storing a battle (arena or side by side): one comparison of two versions' answers plus the reviewer's vote.

Shared by /arena and the chat's side-by-side tab. The comparison is filed under the round open now (per-round
figures stay per round), its responses in a fixed order (by model version id), and the vote carries the order
the sides were actually shown in, so position bias is measurable like anywhere else.
"""

from __future__ import annotations

from sqlmodel import Session, col, select

from alignloop.core import AlignloopError, crud
from alignloop.core.config import Settings
from alignloop.core.db import session_scope
from alignloop.core.models import Round, User

CHOICE_LABELS = {"a": "A is better", "b": "B is better", "tie": "Tie", "both_bad": "Both bad"}


def record_battle(
    engine,
    user: User,
    *,
    prompt: str,
    models: tuple[str, str],
    texts: tuple[str, str],
    choice: str,
    settings: Settings,
) -> int:
    """Store the battle as an arena comparison with the user's vote; returns the comparison id."""
    if choice not in CHOICE_LABELS:
        raise AlignloopError(f"choice must be one of {', '.join(CHOICE_LABELS)}")
    with session_scope(engine) as session:
        from alignloop.core.crud import ensure_model_version

        messages = [{"role": "user", "content": prompt}]
        existing = crud.get_prompt_by_hash(session, content_hash=crud.prompt_hash(messages))
        if existing is None:
            (existing,), _ = crud.add_prompts(
                session, prompts=[crud.PromptCreate(messages=messages)], source="arena"
            )
        versions = [
            ensure_model_version(session, ref=settings.default_policy if m == "default" else m, licence=None)
            for m in models
        ]
        generations = [
            crud.add_generation(
                session, prompt_id=existing.id, model_version_id=v.id, text=t, params={"arena": True}
            )
            for v, t in zip(versions, texts, strict=True)
        ]
        # Stored by model version id; shown_order[i] = stored position of the side shown i-th (A, then B).
        shown = sorted(range(2), key=lambda i: versions[i].id)
        stored = [generations[i] for i in shown]
        shown_order = [shown.index(0), shown.index(1)]
        comparison = crud.create_comparison(
            session,
            prompt_id=existing.id,
            generation_ids=[g.id for g in stored],
            round=current_round(session),
            source="arena",
            target_votes=1,
        )
        if choice in ("a", "b"):
            choice = "ab"[shown_order["ab".index(choice)]]
        crud.record_vote(
            session, comparison_id=comparison.id, user_id=user.id, choice=choice, shown_order=shown_order
        )
        return comparison.id


def current_round(session: Session) -> int:
    """The newest round not closed yet (0 before the first round exists)."""
    row = session.exec(
        select(Round).where(Round.status != "closed").order_by(col(Round.number).desc())
    ).first()
    return row.number if row is not None else 0
