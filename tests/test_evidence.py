"""Round over round: the human win rate of each round's policy against its predecessor, with its interval, on
`round report`, /admin/rounds and in the leaderboard beside arena battles."""

import pytest
from fastapi.testclient import TestClient

from alignloop.cli import main
from alignloop.core import crud
from alignloop.core.db import session_scope
from alignloop.web import create_app
from annotate.evidence import round_over_round, wilson


def battle_round(s, number, new, old, outcomes, voters, tag=""):
    """Comparisons new-vs-old in round `number`, sides alternating; `outcomes` says who won each (per voter)."""
    crud.get_or_create_round(s, number=number, policy_id=new.id)
    for i, outcome in enumerate(outcomes):
        (p,), _ = crud.add_prompts(
            s,
            prompts=[crud.PromptCreate(messages=[{"role": "user", "content": f"r{number}{tag} q{i}"}])],
            source="t",
        )
        pair = [new, old] if i % 2 == 0 else [old, new]
        gens = [
            crud.add_generation(s, prompt_id=p.id, model_version_id=v.id, text=f"{v.name} {i}") for v in pair
        ]
        c = crud.create_comparison(
            s, prompt_id=p.id, generation_ids=[g.id for g in gens], round=number, target_votes=len(voters)
        )
        for voter in voters:
            choice = "tie" if outcome == "tie" else "ab"[pair.index(new if outcome == "new" else old)]
            crud.record_vote(s, comparison_id=c.id, user_id=voter.id, choice=choice)


def test_wilson_interval_by_hand():
    low, high = wilson(8, 10)  # textbook: 0.490 - 0.943
    assert low == pytest.approx(0.4902, abs=1e-3) and high == pytest.approx(0.9433, abs=1e-3)


def test_round_over_round_win_rates_report_admin_and_leaderboard(workspace, capsys):
    settings, engine, password = workspace
    with session_scope(engine) as s:
        p0, p1, p2 = (
            crud.register_model(s, name=f"policy-round{i}", kind="policy", base="b") for i in range(3)
        )
        crud.get_or_create_round(s, number=0, policy_id=p0.id)
        human = crud.create_user(s, name="h", role="annotator")
        judge = crud.create_user(s, name="judge", role="annotator", kind="ai")
        careless = crud.create_user(s, name="careless", role="annotator")
        careless.votes_excluded = True
        battle_round(s, 1, p1, p0, ["new"] * 8 + ["old", "tie"], [human])  # 8.5 of 10
        battle_round(s, 2, p2, p1, ["old"] * 3 + ["new"], [human])  # 1 of 4: round 2 regressed
        battle_round(s, 2, p2, p1, ["new"] * 4, [judge, careless], tag="ai")  # neither counts
    with session_scope(engine) as s:
        r1, r2 = round_over_round(s)
    assert (r1.round, r1.policy, r1.predecessor, r1.battles) == (1, "policy-round1", "policy-round0", 10)
    assert (r1.wins, r1.losses, r1.ties, r1.win_rate) == (8, 1, 1, 0.85)
    assert r1.ci_low < 0.85 < r1.ci_high and r1.ci_low > 0.5  # a real improvement
    assert (r2.win_rate, r2.battles) == (0.25, 4) and r2.ci_low < 0.5  # not distinguishable from a loss

    ws = ["--workspace", str(settings.workspace)]
    assert main(["round", "report", *ws]) == 0
    out = capsys.readouterr().out
    assert "policy-round1" in out and "85.0%" in out and "25.0%" in out
    assert main(["round", "report", "--json", *ws]) == 0
    assert '"win_rate": 0.85' in capsys.readouterr().out

    with TestClient(create_app(settings, engine)) as client:
        client.post("/login", data={"username": "admin", "password": password})
        page = client.get("/admin/rounds").text
        assert "id='round-over-round'" in page and "85% of 10" in page
        rounds = {r["round"]: r for r in client.get("/api/rounds").json()}
        assert rounds[1]["vs_predecessor"]["win_rate"] == 0.85 and rounds[0]["vs_predecessor"] is None
        board = client.get("/api/leaderboard").json()
        assert (board["arena_battles"], board["round_battles"]) == (0, 14)
        assert [m["model"] for m in board["models"]][0] == "policy-round1"
