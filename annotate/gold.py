"""Gold items: comparisons with a known answer, served to every annotator (and AI judge) to measure accuracy.

Two ways to make them, besides code:
- `alignloop gold import FILE`: JSON lines `{"prompt": "..." | [messages], "responses": [2..4 texts],
  "gold": "a" | "b" | "tie" | "both_bad" | ["C", "A", "B"]}`; a ranking (K > 2) is given as labels, best first.
  All or nothing: every line is checked before anything is written, and an error names its line.
- "Promote consensus to gold" on /admin/gold: a finished comparison on which every human vote agrees (at
  least `MIN_CONSENSUS_VOTES`) becomes gold and goes back to the queue for everyone else. Only human votes
  count: an AI judge's agreement is not evidence of the right answer, it is what gold items measure.
Gold for K > 2 is stored as positions best first ("2,0,1"); `annotate.quality` counts a ranking vote as
right when it puts the same response first.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from sqlmodel import Session, col, select

from alignloop.core import AlignloopError, crud
from alignloop.core.http import MAX_INT, AdminDep, SessionDep, render, templates_for
from alignloop.core.limits import MAX_RESPONSES
from alignloop.core.models import CHOICES, Comparison, User, Vote
from alignloop.core.prompts import ImportFileError, RecordError, read_json_records
from annotate.queue import LABELS

MIN_CONSENSUS_VOTES = 2
IMPORT_SOURCE_PREFIX = "gold:"


@dataclass
class GoldItem:
    line: int
    messages: list[dict]
    responses: list[str]
    gold: str  # as stored: a choice, or positions best first


def _messages(prompt: object) -> list[dict]:
    if isinstance(prompt, str) and prompt.strip():
        return [{"role": "user", "content": prompt}]
    if (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in prompt)
        and all(m.get("role") in ("system", "user", "assistant") for m in prompt)
        and prompt[-1]["role"] == "user"
    ):
        return [{"role": m["role"], "content": m["content"]} for m in prompt]
    raise AlignloopError("'prompt' must be text or chat messages ending in a user turn")


def to_gold_item(record: object, line: int) -> GoldItem:
    if not isinstance(record, dict):
        raise AlignloopError("each line must be a JSON object")
    messages = _messages(record.get("prompt"))
    responses = record.get("responses")
    if not isinstance(responses, list) or not 2 <= len(responses) <= MAX_RESPONSES:
        raise AlignloopError(f"'responses' must be a list of 2 to {MAX_RESPONSES} texts")
    if not all(isinstance(r, str) and r.strip() for r in responses) or len(set(responses)) != len(responses):
        raise AlignloopError("'responses' must be distinct, non-empty texts")
    gold = record.get("gold")
    labels = list(LABELS[: len(responses)])
    if len(responses) == 2:
        if gold not in CHOICES:
            raise AlignloopError(f"'gold' for two responses must be one of {', '.join(CHOICES)}")
        stored = gold
    else:
        if not isinstance(gold, list) or sorted(str(g).upper() for g in gold) != labels:
            raise AlignloopError(
                f"'gold' for {len(responses)} responses is a ranking of {labels}, best first"
            )
        stored = ",".join(str(labels.index(str(g).upper())) for g in gold)
    return GoldItem(line=line, messages=messages, responses=responses, gold=stored)


def parse_gold_file(path: str | Path) -> list[GoldItem]:
    path = Path(path)
    items, errors = [], []
    for number, record in read_json_records(path):
        try:
            if isinstance(record, RecordError):
                raise AlignloopError(str(record))
            items.append(to_gold_item(record, number))
        except AlignloopError as exc:
            errors.append((number, str(exc)))
    if errors:
        raise ImportFileError(path, errors)
    if not items:
        raise ImportFileError(path, [(0, "no gold items in file")])
    return items


def import_gold(session: Session, *, path: str | Path, round: int = 0) -> int:
    """Parse the whole file, then add its gold items in the caller's transaction; returns how many."""
    items = parse_gold_file(path)
    source = IMPORT_SOURCE_PREFIX + Path(path).name
    for item in items:
        prompt = crud.get_prompt_by_hash(session, content_hash=crud.prompt_hash(item.messages))
        if prompt is None:
            (prompt,), _ = crud.add_prompts(
                session, prompts=[crud.PromptCreate(messages=item.messages)], source=source
            )
        gens = [
            crud.add_generation(session, prompt_id=prompt.id, text=t, params={"imported_from": source})
            for t in item.responses
        ]
        crud.create_comparison(
            session,
            prompt_id=prompt.id,
            generation_ids=[g.id for g in gens],
            round=round,
            source="import",
            gold=item.gold,
        )
    return len(items)


def human_consensus(session: Session, comparison: Comparison) -> tuple[str | None, int]:
    """(the answer every counted human vote gives, number of such votes); None when they disagree.

    Votes of AI judges and of annotators excluded by quality control do not count."""
    rows = session.exec(
        select(Vote)
        .join(User, User.id == Vote.user_id)
        .where(Vote.comparison_id == comparison.id, User.kind == "human", col(User.votes_excluded).is_(False))
    ).all()
    answers = Counter(v.choice if v.choice is not None else ",".join(map(str, v.ranking)) for v in rows)
    if len(answers) != 1:
        return None, len(rows)
    return next(iter(answers)), len(rows)


def promote_to_gold(session: Session, *, comparison_id: int) -> Comparison:
    comparison = session.get(Comparison, comparison_id)
    if comparison is None:
        raise crud.NotFoundError(f"comparison {comparison_id} does not exist")
    if comparison.gold is not None:
        raise AlignloopError(f"comparison {comparison_id} is already gold")
    answer, num_votes = human_consensus(session, comparison)
    if answer is None or num_votes < MIN_CONSENSUS_VOTES:
        raise AlignloopError(
            f"comparison {comparison_id} has no unanimous human answer from at least {MIN_CONSENSUS_VOTES} votes"
        )
    comparison.gold = answer
    comparison.status = "queued"  # gold items are served to everyone who has not answered them yet
    session.add(comparison)
    session.flush()
    return comparison


def consensus_candidates(session: Session, *, limit: int = 50) -> list[tuple[Comparison, str, int]]:
    """Finished, non-gold comparisons with a unanimous human answer: what an admin may promote."""
    out = []
    query = (
        select(Comparison)
        .where(Comparison.status == "done", col(Comparison.gold).is_(None), Comparison.source != "arena")
        .where(Comparison.num_votes >= MIN_CONSENSUS_VOTES)
        .order_by(col(Comparison.id).desc())
        .limit(limit * 4)
    )
    for comparison in session.exec(query).all():
        answer, num_votes = human_consensus(session, comparison)
        if answer is not None and num_votes >= MIN_CONSENSUS_VOTES:
            out.append((comparison, answer, num_votes))
        if len(out) >= limit:
            break
    return out


# --- /admin/gold ---------------------------------------------------------------------------------------------

router = APIRouter(tags=["gold"])
templates = templates_for(Path(__file__).parent / "templates")


def _answer_text(answer: str) -> str:
    if answer in CHOICES:
        return answer
    return " > ".join(LABELS[int(p)] for p in answer.split(","))


@router.get("/admin/gold", response_class=HTMLResponse, include_in_schema=False)
def gold_page(request: Request, user: AdminDep, session: SessionDep):
    num_gold = len(session.exec(select(Comparison.id).where(col(Comparison.gold).is_not(None))).all())
    candidates = []
    for comparison, answer, num_votes in consensus_candidates(session):
        responses = crud.comparison_generations(session, comparison_id=comparison.id)
        candidates.append(
            {
                "id": comparison.id,
                "round": comparison.round,
                "answer": _answer_text(answer),
                "num_votes": num_votes,
                "first": responses[0].text[:80] if responses else "",
            }
        )
    return render(
        templates,
        request,
        "admin_gold.html",
        title="Gold",
        user=user,
        num_gold=num_gold,
        candidates=candidates,
    )


@router.post("/admin/gold/{comparison_id}/promote", include_in_schema=False)
def promote(comparison_id: int, user: AdminDep, session: SessionDep):
    if not 1 <= comparison_id <= MAX_INT:
        raise HTTPException(status_code=404, detail="no such comparison")
    try:
        promote_to_gold(session, comparison_id=comparison_id)
    except crud.NotFoundError as exc:
        raise HTTPException(status_code=404, detail=str(exc)) from None
    except AlignloopError as exc:
        raise HTTPException(status_code=400, detail=str(exc)) from None
    session.commit()
    return RedirectResponse("/admin/gold", status_code=303)
