"""The loop on tiny models: one command closes a round, and picks up where an interruption left it."""

import json

import pytest
from sqlmodel import Session, col, select

from alignloop.cli import main
from alignloop.core import AlignloopError, crud
from alignloop.core.models import Comparison, Generation, Round, Run, Vote
from alignloop.rounds import RoundPlan, models_influenced_by_vote, next_round
from rl.ppo import PPOTrainer


@pytest.fixture
def round0(workspace, tiny_model_dir, tmp_path):
    """Round 0 queued from the tiny model and voted on; a reward config on the tiny base."""
    settings, engine, _ = workspace
    ws = ["--workspace", str(settings.workspace)]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Tell me about item {i}."}) + "\n" for i in range(12)))
    assert main(["prompts", "import", str(prompts), *ws]) == 0
    assert (
        main(["generate", "--model", str(tiny_model_dir), "--prompts", "12", "--max-new-tokens", "6", *ws])
        == 0
    )
    admin = None
    with Session(engine) as s:
        admin = crud.get_user(s, name="admin")
        comparisons = s.exec(select(Comparison).where(Comparison.round == 0)).all()
        assert len(comparisons) >= 6
        for i, c in enumerate(comparisons):
            crud.record_vote(s, comparison_id=c.id, user_id=admin.id, choice="a" if i % 3 else "b")
        s.commit()
    reward_yaml = tmp_path / "reward.yaml"
    reward_yaml.write_text(f"base: {tiny_model_dir}\nmax_length: 64\nmax_steps: 3\nheld_out: 0.2\n"
                           "per_device_train_batch_size: 4\nlogging_steps: 1\n")  # fmt: skip
    return settings, engine, RoundPlan(reward_config=str(reward_yaml), rl_config="configs/rl/tiny.yaml",
                                       num_prompts=12, progress=False)  # fmt: skip


def test_round_next_closes_the_loop(round0, tiny_model_dir):
    settings, engine, plan = round0
    result = next_round(engine, settings, plan)
    assert (result["round"], result["next_round"], result["reward_model"]) == (0, 1, "reward-round0")
    assert result["queued"] > 0
    with Session(engine) as s:
        rounds = {r.number: r for r in s.exec(select(Round)).all()}
        assert rounds[0].status == "closed" and rounds[1].status == "open"
        policy = crud.get_model_version(s, name="policy-round1")
        assert rounds[0].reward_id == crud.get_model_version(s, name="reward-round0").id
        assert rounds[1].policy_id == policy.id and policy.round == 1
        assert policy.parent_id == crud.get_model_version(s, name=str(tiny_model_dir)).id
        # Next round: each comparison is the new policy against the old one, in random order.
        firsts = []
        for c in s.exec(select(Comparison).where(Comparison.round == 1)).all():
            versions = [g.model_version_id for g in crud.comparison_generations(s, comparison_id=c.id)]
            assert sorted(versions) == sorted([policy.id, rounds[0].policy_id])
            firsts.append(versions[0])
        assert len(firsts) == result["queued"]
        # The new reward model scored them: the queue serves the least certain first.
        margins = [c.reward_margin for c in s.exec(select(Comparison).where(Comparison.round == 1)).all()]
        assert margins and all(m is not None and m >= 0 for m in margins)
        # Lineage: a round-0 vote reached the reward model and the policy trained against it.
        trained_on = s.exec(select(Run).where(Run.kind == "reward")).one().config["comparison_ids"]
        votes = s.exec(select(Vote)).all()
        used = next(v for v in votes if v.comparison_id in trained_on)
        names = [m.name for m in models_influenced_by_vote(s, vote_id=used.id)]
        assert names == ["reward-round0", "policy-round1"]
        held_out = next(
            v for v in votes if v.comparison_id not in trained_on
        )  # evaluated on, not learned from
        assert [m.name for m in models_influenced_by_vote(s, vote_id=held_out.id)] == []
        assert s.exec(select(Run).where(Run.kind == "round")).one().status == "succeeded"
    with pytest.raises(AlignloopError, match="no usable votes"):
        next_round(engine, settings, plan)  # round 1 has no votes yet


def test_an_interrupted_round_resumes_where_it_stopped(round0, monkeypatch):
    settings, engine, plan = round0
    real_save = PPOTrainer.save_checkpoint

    def save_then_die(self):
        real_save(self)
        raise KeyboardInterrupt  # the machine goes down right after the first checkpoint

    monkeypatch.setattr(PPOTrainer, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        next_round(engine, settings, plan)
    with Session(engine) as s:
        rl_runs = s.exec(select(Run).where(Run.kind == "rl")).all()
        assert [r.status for r in rl_runs] == ["failed"]
        assert s.exec(select(Run).where(Run.kind == "round")).one().status == "failed"
    monkeypatch.setattr(PPOTrainer, "save_checkpoint", real_save)
    result = next_round(engine, settings, plan)
    with Session(engine) as s:
        assert len(s.exec(select(Run).where(Run.kind == "reward")).all()) == 1  # not retrained
        rl_runs = s.exec(select(Run).where(Run.kind == "rl")).all()
        assert len(rl_runs) == 1 and rl_runs[0].status == "succeeded"  # the same run, resumed
        steps = [h["step"] for h in rl_runs[0].metrics["history"]]
        assert steps == [1, 2, 3, 4]
        assert result["queued"] == len(s.exec(select(Comparison).where(Comparison.round == 1)).all())
        assert s.exec(select(Generation).where(col(Generation.model_version_id).is_(None))).all() == []
