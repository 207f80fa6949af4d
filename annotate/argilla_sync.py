"""Argilla 2.x sync, for teams that already label in Argilla.

`push` sends open pairwise comparisons to an Argilla dataset: a chat field with the conversation, the two
responses as text fields, a label question `preference` (a / b / tie / both_bad), a task distribution that
asks for `target_votes` submissions per record, and metadata (round, model version ids, shown order).
Argilla shows every annotator the same order, so the order is randomised per comparison here and stored as
metadata; `pull` maps each label back through it.

`pull` reads submitted responses and records them as votes of users named `argilla-<username>` (created on
first sight, unable to log in to alignloop). Pulling twice adds nothing: one vote per (comparison, user) is
the store's own constraint. Comparisons of more than two responses are not pushed (Argilla's label question
is pairwise); they are counted in the summary.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from sqlmodel import Session, select

from alignloop.core import AlignloopError, crud
from alignloop.core.db import session_scope
from alignloop.core.models import Comparison, Prompt

LABELS = ["a", "b", "tie", "both_bad"]
RECORD_PREFIX = "alignloop-comparison-"


@dataclass
class SyncSummary:
    pushed: int = 0
    skipped_k_way: int = 0
    pulled: int = 0
    already_present: int = 0
    not_counted: int = 0  # the comparison had all its votes already


def connect(api_url: str, api_key: str):
    import argilla as rg

    try:
        return rg.Argilla(api_url=api_url, api_key=api_key)
    except Exception as exc:  # the SDK raises several kinds; the user needs one line
        raise AlignloopError(f"cannot reach Argilla at {api_url}: {exc}") from None


def dataset_settings(*, target_votes: int):
    import argilla as rg

    return rg.Settings(
        guidelines="Which response is better for the conversation? Tie if equal, both_bad if neither is acceptable.",
        fields=[
            rg.ChatField(name="conversation", title="Conversation"),
            rg.TextField(name="response_a", title="Response A"),
            rg.TextField(name="response_b", title="Response B"),
        ],
        questions=[rg.LabelQuestion(name="preference", title="Which response is better?", labels=LABELS)],
        metadata=[
            rg.IntegerMetadataProperty(name="round"),
            rg.TermsMetadataProperty(name="model_ids"),
            rg.TermsMetadataProperty(name="shown_order"),
        ],
        distribution=rg.TaskDistribution(min_submitted=target_votes),
    )


def push(
    engine, client, *, dataset_name: str, workspace: str, round: int | None = None, seed: int = 0
) -> SyncSummary:
    import argilla as rg

    summary = SyncSummary()
    rng = random.Random(seed)
    records = []
    target_votes = 1
    with Session(engine) as session:
        query = select(Comparison).where(Comparison.status == "queued", Comparison.source != "arena")
        if round is not None:
            query = query.where(Comparison.round == round)
        for comparison in session.exec(query.order_by(Comparison.id)).all():
            generations = crud.comparison_generations(session, comparison_id=comparison.id)
            if len(generations) != 2:
                summary.skipped_k_way += 1
                continue
            order = [0, 1] if rng.random() < 0.5 else [1, 0]
            prompt = session.get(Prompt, comparison.prompt_id)
            target_votes = max(target_votes, comparison.target_votes)
            records.append(
                rg.Record(
                    id=f"{RECORD_PREFIX}{comparison.id}",
                    fields={
                        "conversation": [
                            {"role": m["role"], "content": m["content"]} for m in prompt.messages
                        ],
                        "response_a": generations[order[0]].text,
                        "response_b": generations[order[1]].text,
                    },
                    metadata={
                        "round": comparison.round,
                        "model_ids": sorted({str(g.model_version_id) for g in generations}),
                        "shown_order": ",".join(map(str, order)),
                    },
                )
            )
    dataset = client.datasets(name=dataset_name, workspace=workspace)
    if dataset is None:
        dataset = rg.Dataset(
            name=dataset_name,
            workspace=workspace,
            settings=dataset_settings(target_votes=target_votes),
            client=client,
        )
        dataset.create()
    if records:
        dataset.records.log(records)
    summary.pushed = len(records)
    return summary


def pull(engine, client, *, dataset_name: str, workspace: str) -> SyncSummary:
    summary = SyncSummary()
    dataset = client.datasets(name=dataset_name, workspace=workspace)
    if dataset is None:
        raise AlignloopError(f"no Argilla dataset {dataset_name!r} in workspace {workspace!r}")
    usernames: dict[str, str] = {}
    for record in dataset.records(with_responses=True):
        if not str(record.id).startswith(RECORD_PREFIX):
            continue
        comparison_id = int(str(record.id).removeprefix(RECORD_PREFIX))
        order = [int(x) for x in str(record.metadata["shown_order"]).split(",")]
        for response in record.responses["preference"] or []:
            if getattr(response.status, "value", response.status) != "submitted":
                continue  # drafts and discarded responses are not votes
            user_id = str(response.user_id)
            if user_id not in usernames:
                usernames[user_id] = client.users(id=response.user_id).username
            choice = response.value
            if choice not in LABELS:
                continue
            if choice in ("a", "b"):
                choice = "ab"[order["ab".index(choice)]]
            with session_scope(engine) as session:
                user = _argilla_user(session, usernames[user_id])
                try:
                    crud.record_vote(
                        session, comparison_id=comparison_id, user_id=user.id, choice=choice, shown_order=order,
                        rationale="via Argilla",
                    )  # fmt: skip
                    summary.pulled += 1
                except crud.DuplicateVoteError:
                    session.rollback()
                    summary.already_present += 1
                except crud.ComparisonClosedError:
                    session.rollback()
                    summary.not_counted += 1
    return summary


def _argilla_user(session: Session, username: str):
    name = f"argilla-{username}"[:64]
    user = crud.get_user(session, name=name)
    if user is None:
        user = crud.create_user(session, name=name, role="annotator")  # no password: it can never log in
    return user
