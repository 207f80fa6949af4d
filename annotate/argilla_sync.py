"""Argilla 2.x sync, for teams that already label in Argilla.

`push` sends open comparisons to Argilla. Pairs go to the dataset named on the command line: a chat field with
the conversation, the two responses as text fields, a label question `preference` (a / b / tie / both_bad), a
task distribution that asks for `target_votes` submissions per record, and metadata (round, model version ids,
shown order). Comparisons of K > 2 responses go to a companion dataset per K, `<name>-rank<K>`, with K text
fields and a ranking question `ranking` (Argilla's questions have a fixed set of values, so one dataset cannot
hold rankings of different lengths).

Invariants, because a vote that comes back inverted is worse than one that never comes back:
- Argilla shows every annotator the same order, so the order is drawn per comparison from a generator seeded
  with the comparison's id alone: it never depends on which other comparisons are still queued.
- A record already in Argilla is never sent again. Argilla upserts by id, and re-sending a record would
  replace its fields (and stored order) under the responses already given to it.
`pull` maps each label or ranking back through the record's own `shown_order` metadata.

`pull` reads submitted responses and records them as votes of users named `argilla-<username>` (created on
first sight, unable to log in to alignloop). Pulling twice adds nothing: one vote per (comparison, user) is
the store's own constraint. Guidelines: the workspace's version in force heads each new dataset's guidelines,
and pulled votes carry the version in force for their comparison's round, like votes cast in alignloop.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from sqlmodel import Session, select

from alignloop.core import AlignloopError, crud
from alignloop.core.db import session_scope
from alignloop.core.limits import MAX_RESPONSES
from alignloop.core.models import Comparison, Guidelines, Prompt

LABELS = ["a", "b", "tie", "both_bad"]
RECORD_PREFIX = "alignloop-comparison-"
MAX_RANKED = MAX_RESPONSES  # what the annotation page shows


@dataclass
class SyncSummary:
    pushed: int = 0
    pushed_rankings: int = 0
    already_pushed: int = 0  # records already in Argilla: never re-sent (their responses would be remapped)
    skipped_k_way: int = 0  # more responses than the page (and the ranking dataset) shows
    pulled: int = 0
    already_present: int = 0
    not_counted: int = 0  # the comparison had all its votes already


def connect(api_url: str, api_key: str):
    import argilla as rg

    try:
        return rg.Argilla(api_url=api_url, api_key=api_key)
    except Exception as exc:  # the SDK raises several kinds; the user needs one line
        raise AlignloopError(f"cannot reach Argilla at {api_url}: {exc}") from None


def ranking_dataset_name(dataset_name: str, num_items: int) -> str:
    return f"{dataset_name}-rank{num_items}"


def dataset_settings(*, target_votes: int, num_items: int = 2, guidelines: Guidelines | None = None):
    """Pairs: a label question. K > 2: one text field per response and a ranking question over them.
    The workspace's guidelines (the version in force when the dataset is made) head Argilla's own."""
    import argilla as rg

    guidelines_row = guidelines
    labels = [chr(ord("a") + i) for i in range(num_items)]
    if num_items == 2:
        guidelines = (
            "Which response is better for the conversation? Tie if equal, both_bad if neither is acceptable."
        )
        questions = [rg.LabelQuestion(name="preference", title="Which response is better?", labels=LABELS)]
    else:
        guidelines = "Rank the responses from best to worst for the conversation."
        questions = [
            rg.RankingQuestion(
                name="ranking",
                title="Rank the responses, best first",
                values={label: f"Response {label.upper()}" for label in labels},
            )
        ]
    if guidelines_row is not None:
        guidelines = f"{guidelines_row.text}\n\n(alignloop guidelines version {guidelines_row.version})\n\n{guidelines}"
    return rg.Settings(
        guidelines=guidelines,
        fields=[rg.ChatField(name="conversation", title="Conversation")]
        + [rg.TextField(name=f"response_{label}", title=f"Response {label.upper()}") for label in labels],
        questions=questions,
        metadata=[
            rg.IntegerMetadataProperty(name="round"),
            rg.TermsMetadataProperty(name="model_ids"),
            rg.TermsMetadataProperty(name="shown_order"),
        ],
        distribution=rg.TaskDistribution(min_submitted=target_votes),
    )


def shown_order(comparison_id: int, num_items: int) -> list[int]:
    """The order Argilla shows a comparison in: a function of the comparison alone (see the invariants)."""
    order = list(range(num_items))
    random.Random(f"alignloop-argilla:{comparison_id}").shuffle(order)
    return order


def _dataset(client, rg, *, name: str, workspace: str, target_votes: int, num_items: int, guidelines=None):
    dataset = client.datasets(name=name, workspace=workspace)
    if dataset is None:
        dataset = rg.Dataset(
            name=name,
            workspace=workspace,
            client=client,
            settings=dataset_settings(target_votes=target_votes, num_items=num_items, guidelines=guidelines),
        )
        dataset.create()
    return dataset


def _pushed_ids(dataset) -> set[str]:
    return {str(record.id) for record in dataset.records(with_responses=False)}


def push(engine, client, *, dataset_name: str, workspace: str, round: int | None = None) -> SyncSummary:
    import argilla as rg

    summary = SyncSummary()
    by_k: dict[int, list] = {}  # number of responses -> records
    target_votes: dict[int, int] = {}
    with Session(engine) as session:
        query = select(Comparison).where(Comparison.status == "queued", Comparison.source != "arena")
        if round is not None:
            query = query.where(Comparison.round == round)
        for comparison in session.exec(query.order_by(Comparison.id)).all():
            generations = crud.comparison_generations(session, comparison_id=comparison.id)
            k = len(generations)
            if k > MAX_RANKED:
                summary.skipped_k_way += 1
                continue
            order = shown_order(comparison.id, k)
            prompt = session.get(Prompt, comparison.prompt_id)
            target_votes[k] = max(target_votes.get(k, 1), comparison.target_votes)
            fields = {"conversation": [{"role": m["role"], "content": m["content"]} for m in prompt.messages]}
            for shown, position in enumerate(order):
                fields[f"response_{chr(ord('a') + shown)}"] = generations[position].text
            by_k.setdefault(k, []).append(
                rg.Record(
                    id=f"{RECORD_PREFIX}{comparison.id}",
                    fields=fields,
                    metadata={
                        "round": comparison.round,
                        "model_ids": sorted({str(g.model_version_id) for g in generations}),
                        "shown_order": ",".join(map(str, order)),
                    },
                )
            )
    with Session(engine) as session:
        guidelines = crud.guidelines_for_round(session, round=round)
    for k in sorted(by_k.keys() | {2}):
        name = dataset_name if k == 2 else ranking_dataset_name(dataset_name, k)
        if k not in by_k and client.datasets(name=name, workspace=workspace) is not None:
            continue
        dataset = _dataset(
            client,
            rg,
            name=name,
            workspace=workspace,
            target_votes=target_votes.get(k, 1),
            num_items=k,
            guidelines=guidelines,
        )
        pushed = _pushed_ids(dataset)
        records = [r for r in by_k.get(k, []) if str(r.id) not in pushed]
        summary.already_pushed += len(by_k.get(k, [])) - len(records)
        if records:
            dataset.records.log(records)
        if k == 2:
            summary.pushed += len(records)
        else:
            summary.pushed_rankings += len(records)
    return summary


def pull(engine, client, *, dataset_name: str, workspace: str) -> SyncSummary:
    summary = SyncSummary()
    datasets = [client.datasets(name=dataset_name, workspace=workspace)]
    if datasets[0] is None:
        raise AlignloopError(f"no Argilla dataset {dataset_name!r} in workspace {workspace!r}")
    for k in range(3, MAX_RANKED + 1):
        datasets.append(client.datasets(name=ranking_dataset_name(dataset_name, k), workspace=workspace))
    usernames: dict[str, str] = {}
    for dataset in datasets:
        if dataset is None:
            continue
        for record in dataset.records(with_responses=True):
            if not str(record.id).startswith(RECORD_PREFIX):
                continue
            comparison_id = int(str(record.id).removeprefix(RECORD_PREFIX))
            order = [int(x) for x in str(record.metadata["shown_order"]).split(",")]
            question = "preference" if len(order) == 2 else "ranking"
            for response in record.responses[question] or []:
                if getattr(response.status, "value", response.status) != "submitted":
                    continue  # drafts and discarded responses are not votes
                vote = _vote(response.value, order)
                if vote is None:
                    continue
                user_id = str(response.user_id)
                if user_id not in usernames:
                    usernames[user_id] = client.users(id=response.user_id).username
                _record(engine, summary, comparison_id, usernames[user_id], order, **vote)
    return summary


def _vote(value, order: list[int]) -> dict | None:
    """A submitted Argilla answer as stored positions: {"choice": ...} or {"ranking": [...]}; None if unusable."""
    if len(order) == 2:
        if value not in LABELS:
            return None
        return {"choice": "ab"[order["ab".index(value)]] if value in ("a", "b") else value}
    # A ranking arrives as the values best first, or as [{"value": label, "rank": n}] (the wire format).
    if value and isinstance(value[0], dict):
        value = [v["value"] for v in sorted(value, key=lambda v: v["rank"])]
    labels = [chr(ord("a") + i) for i in range(len(order))]
    if sorted(value or []) != labels:
        return None  # ties in rank or missing responses: not a full ranking
    return {"ranking": [order[labels.index(label)] for label in value]}


def _record(
    engine, summary: SyncSummary, comparison_id: int, username: str, order: list[int], **vote
) -> None:
    with session_scope(engine) as session:
        user = _argilla_user(session, username)
        comparison = session.get(Comparison, comparison_id)
        in_force = crud.guidelines_for_round(session, round=comparison.round) if comparison else None
        try:
            crud.record_vote(
                session,
                comparison_id=comparison_id,
                user_id=user.id,
                shown_order=order,
                rationale="via Argilla",
                guidelines_version=in_force.version if in_force else None,
                **vote,
            )
            summary.pulled += 1
        except crud.DuplicateVoteError:
            session.rollback()
            summary.already_present += 1
        except crud.ComparisonClosedError:
            session.rollback()
            summary.not_counted += 1


def _argilla_user(session: Session, username: str):
    name = f"argilla-{username}"[:64]
    user = crud.get_user(session, name=name)
    if user is None:
        user = crud.create_user(session, name=name, role="annotator")  # no password: it can never log in
    return user
