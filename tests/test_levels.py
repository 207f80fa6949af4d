"""The levels report on tiny models: an SFT version trained to give the answer the judge prefers wins against
the base; a PPO policy trained against the judge itself is flagged self-judged; L1 rows come with and without
CoT; human votes and costs are filled in; the CLI prints the table and /admin/levels shows it with its chart.
Then the L2 -> L3 hand-off: the SFT version is the PPO run's policy, and the result is served over /v1."""

import json

import openai
import pytest
from conftest import serve_in_thread
from fastapi.testclient import TestClient
from sqlmodel import Session

from alignloop.cli import main
from alignloop.core import AlignloopError, crud
from alignloop.core.config import load_settings
from alignloop.core.db import make_engine, session_scope
from alignloop.core.presets import save_preset
from alignloop.core.registry import resolve
from alignloop.core.sampling import SamplingParams, generate
from alignloop.core.workspace import init_workspace
from alignloop.web import create_app
from serve.levels import ai_self_judged, build_report
from sft.train import load_config, train

GOOD = "Thank you! Here is a summary."
WORDS = (
    "capital France Paris poem sea wind hash table beginner bake bread flour water salt yeast lists".split()
)


def word_salad(i: int) -> str:
    """What an untrained tiny model says: fragments of its tokenizer's corpus, run together."""
    return "".join(WORDS[(i * 7 + j * 3) % len(WORDS)][: 2 + (i + j) % 4] for j in range(3 + i % 5))


TRAIN = [f"Tell me about item {i}." for i in range(16)]
HELD = [f"Held-out question {i}?" for i in range(4)]


@pytest.fixture(scope="module")
def levels_ws(tmp_path_factory, tiny_model_dir):
    """Prompts, votes preferring GOOD, a judge reward model trained on them, an SFT version taught GOOD, and a
    PPO policy on top of that SFT version trained against the judge itself."""
    tmp = tmp_path_factory.mktemp("levels")
    password = init_workspace(tmp / "ws")
    settings = load_settings(tmp / "ws")
    engine = make_engine(settings.db_url)
    ws = ["--workspace", str(settings.workspace)]
    (tmp / "train.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in TRAIN))
    (tmp / "held.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in HELD))
    (tmp / "prefs.jsonl").write_text(
        "".join(
            json.dumps({"prompt": p, "chosen": GOOD, "rejected": word_salad(i)}) + "\n"
            for i, p in enumerate(TRAIN)
        )
    )
    (tmp / "sft.jsonl").write_text(
        "".join(json.dumps({"instruction": p, "response": GOOD}) + "\n" for p in TRAIN)
    )
    assert main(["prompts", "import", str(tmp / "train.jsonl"), *ws]) == 0
    assert main(["prompts", "import", str(tmp / "held.jsonl"), "--split", "eval", *ws]) == 0
    assert main(["prefs", "import", str(tmp / "prefs.jsonl"), *ws]) == 0
    # The judge: the embedded encoder (MiniLM) as a reward model, on the workspace's votes. A tiny decoder as
    # judge does not generalise to new prompts; the encoder tells a sentence from word salad at once.
    assert (
        main(
            [
                "reward",
                "train",
                "--config",
                "configs/reward/tiny.yaml",
                "--max-steps",
                "16",
                "--name",
                "judge",
                *ws,
            ]
        )
        == 0
    )
    common = dict(base=str(tiny_model_dir), method="full", learning_rate=3e-3, num_samples=0)
    train(
        engine,
        settings,
        load_config(
            "configs/sft/tiny.yaml", data=[str(tmp / "sft.jsonl")], max_steps=40, name="sft-good", **common
        ),
        progress=False,
    )
    # Tuned on the chosen answers of the very votes the judge learned from: a self-judged L2 version.
    train(
        engine,
        settings,
        load_config("configs/sft/tiny.yaml", from_chosen=True, max_steps=4, name="sft-chosen", **common),
        progress=False,
    )
    assert (
        main(
            [
                "rl",
                "train",
                "--config",
                "configs/rl/tiny.yaml",
                "--policy",
                "sft-good",
                "--reward-model",
                "judge",
                "--steps",
                "2",
                "--name",
                "ppo-on-sft",
                *ws,
            ]
        )
        == 0
    )
    with session_scope(engine) as s:
        save_preset(
            s,
            name="terse",
            system_prompt="Answer briefly.",
            chain_of_thought="Think first, then answer.",
            answer_delimiter="Here is",
        )
        save_preset(s, name="hide", answer_delimiter=" is ")  # the prompt unchanged: only the reply is cut
        # Human votes: three arena battles, all won by the SFT version over the PPO policy.
        sft, ppo = (crud.get_model_version(s, name=n) for n in ("sft-good", "ppo-on-sft"))
        admin = crud.get_user(s, name="admin")
        prompt = crud.list_prompts(s, split="eval")[0]
        for i in range(3):
            a = crud.add_generation(s, prompt_id=prompt.id, text=f"{GOOD} {i}", model_version_id=sft.id)
            b = crud.add_generation(s, prompt_id=prompt.id, text=f"No. {i}", model_version_id=ppo.id)
            c = crud.create_comparison(s, prompt_id=prompt.id, generation_ids=[a.id, b.id], source="arena")
            crud.record_vote(s, comparison_id=c.id, user_id=admin.id, choice="a")
    yield settings, engine, ws, password
    engine.dispose()


def test_levels_report_ranks_flags_and_costs(levels_ws, tiny_model_dir, capsys, tmp_path):
    settings, engine, ws, password = levels_ws
    code = main(
        [
            "report",
            "levels",
            "--judge",
            "judge",
            "--base",
            str(tiny_model_dir),
            "--prompts",
            "4",
            "--max-new-tokens",
            "10",
            "--temperature",
            "0",
            "--out",
            str(tmp_path / "out"),
            *ws,
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    report = json.loads((tmp_path / "out" / "levels.json").read_text())
    rows = {r["name"]: r for r in report["rows"]}
    assert [r["level"] for r in report["rows"]] == ["base", "L1", "L1", "L1", "L2", "L2", "L3"]
    assert set(rows) >= {"preset terse@1", "preset terse@1 (no CoT)", "sft-good", "sft-chosen", "ppo-on-sft"}
    base = rows[str(tiny_model_dir)]
    assert base["win_rate"] == 0.5 and base["stderr"] == 0 and base["self_judged"] is None
    # The version taught the judge's favourite answer wins on every held-out prompt, and fairly.
    sft = rows["sft-good"]
    assert sft["win_rate"] == 1.0 and sft["self_judged"] is None, sft
    assert sft["examples"] == 12 and sft["votes"] == 0 and sft["train_minutes"] > 0 and sft["adapter_mb"] > 0
    assert "votes the judge was also trained on" in rows["sft-chosen"]["self_judged"]
    # Trained against the judge: flagged, with the reason; its cost includes the SFT run and the reward model.
    ppo = rows["ppo-on-sft"]
    assert ppo["self_judged"] and "trained against" in ppo["self_judged"]
    assert ppo["votes"] == 12 and ppo["examples"] > sft["examples"]
    assert ppo["train_minutes"] > sft["train_minutes"] and ppo["device"] == "cpu"
    # Human votes: the arena battles, fitted with Bradley-Terry.
    assert sft["human_battles"] == ppo["human_battles"] == 3 and sft["human_rating"] > ppo["human_rating"]
    assert all(r["tokens_per_s"] > 0 for r in report["rows"])
    assert "self-judged" in out and "| L2 | sft-good | 1.00 ± 0.00 |" in out
    assert (tmp_path / "out" / "levels.png").read_bytes()[:4] == b"\x89PNG"
    # /admin/levels: the same table and its chart, admins only.
    with Session(engine) as s:
        crud.create_user(s, name="ann", role="annotator", password="annotator-pass")
        s.commit()
    with TestClient(create_app(settings, engine)) as client:
        client.post("/login", data={"username": "ann", "password": "annotator-pass"})
        assert client.get("/admin/levels").status_code == 403
        client.post("/logout")
        client.post("/login", data={"username": "admin", "password": password})
        page = client.get("/admin/levels")
        assert page.status_code == 200 and "sft-good" in page.text and "self-judged" in page.text
        png = client.get(f"/admin/levels/{report['run_id']}.png")
        assert png.status_code == 200 and png.content[:4] == b"\x89PNG"
        assert client.get("/admin/levels/999999.png").status_code == 404


def test_levels_report_with_an_ai_judge(levels_ws, tiny_model_dir, capsys, tmp_path):
    """The AI judge's win rate beside the reward model's, and its own self-judged flags: a judge that is the
    version (or an ancestor), or whose votes trained the version or its reward model, cannot referee it."""
    settings, engine, ws, password = levels_ws
    args = ["report", "levels", "--judge", "judge", "--base", str(tiny_model_dir), "--prompts", "4"]
    args += ["--max-new-tokens", "10", "--temperature", "0", "--out", str(tmp_path / "out"), *ws]
    code = main([*args, "--ai-judge", "sft-good", "--ai-judge-user", "import"])
    out = capsys.readouterr().out
    assert code == 0, out
    report = json.loads((tmp_path / "out" / "levels.json").read_text())
    rows = {r["name"]: r for r in report["rows"]}
    assert report["ai_judge"] == "sft-good" and "AI judge win rate" in out
    base = rows[str(tiny_model_dir)]
    assert base["ai_win_rate"] == 0.5 and base["ai_stderr"] == 0 and base["ai_self_judged"] is None
    # Each prompt is a win, a loss or a tie (a verdict that flips with the order), so 4 prompts give quarters.
    assert all(r["ai_win_rate"] * 8 == round(r["ai_win_rate"] * 8) for r in report["rows"])
    assert all(r["ai_stderr"] is not None for r in report["rows"])
    for name in ("sft-good", "ppo-on-sft"):  # the judge, and a version built on it
        assert rows[name]["ai_self_judged"] == "the AI judge is this version or one it was built from"
    assert "chosen answers of the AI judge's votes" in rows["sft-chosen"]["ai_self_judged"]
    assert rows["preset terse@1"]["ai_self_judged"] is None
    with Session(engine) as s:
        ppo = crud.get_model_version(s, name="ppo-on-sft")
        why = ai_self_judged(s, ppo, judge_model=str(tiny_model_dir), judge_user="import")
        assert why == "the reward model 'judge' it was trained against learned from the AI judge's votes"
        assert ai_self_judged(s, ppo, judge_model=str(tiny_model_dir), judge_user="nobody") is None
    with TestClient(create_app(settings, engine)) as client:
        client.post("/login", data={"username": "admin", "password": password})
        page = client.get("/admin/levels").text
        assert "AI judge win rate" in page and "the AI judge is this version" in page
    # Without an AI judge the columns are empty and the table has none.
    assert main(args) == 0
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "out" / "levels.json").read_text())
    assert report["ai_judge"] is None and "AI judge" not in out
    assert all(r["ai_win_rate"] is None for r in report["rows"])
    with TestClient(create_app(settings, engine)) as client:
        client.post("/login", data={"username": "admin", "password": password})
        assert "AI judge" not in client.get("/admin/levels").text


def test_bad_report_input_changes_nothing(levels_ws):
    settings, engine, _, _ = levels_ws
    with Session(engine) as s:
        runs = len(crud.list_runs(s))
    with pytest.raises(AlignloopError, match="must be a registered reward model"):
        build_report(engine, settings, judge="sft-good")
    with pytest.raises(AlignloopError, match="not a registered SFT or policy version"):
        build_report(engine, settings, judge="judge", models=["nope"])
    with Session(engine) as s:
        assert len(crud.list_runs(s)) == runs


def test_an_sft_version_goes_through_ppo_and_is_served(levels_ws):
    """L2 -> L3: the PPO run started from the SFT version (lineage, stacked adapters), and the result answers
    over the OpenAI-compatible API exactly as the library samples it; a preset's delimiter hides the rest."""
    settings, engine, _, _ = levels_ws
    with Session(engine) as s:
        ppo, sft = crud.get_model_version(s, name="ppo-on-sft"), crud.get_model_version(s, name="sft-good")
        assert ppo.base == "sft-good" and ppo.parent_id == sft.id and ppo.kind == "policy"
        loaded = resolve("ppo-on-sft", settings=settings, session=s)
        key, _ = crud.create_api_key(s, user=crud.get_user(s, name="admin"), name="levels")
        s.commit()
    prompt = [{"role": "user", "content": HELD[0]}]
    expected = generate(
        loaded.model,
        loaded.tokenizer,
        [prompt],
        params=SamplingParams(max_new_tokens=10, temperature=0),
        progress=False,
    )[0][0].text
    with serve_in_thread(create_app(settings, engine)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)
        assert "ppo-on-sft" in [m.id for m in client.models.list().data]
        reply = client.chat.completions.create(
            model="ppo-on-sft", messages=prompt, max_tokens=10, temperature=0
        )
        assert reply.choices[0].message.content == expected
        # The SFT version says (about) GOOD; the preset's delimiter (" is ") leaves only what follows it.
        with Session(engine) as s:
            sft_model = resolve("sft-good", settings=settings, session=s)
        raw = generate(
            sft_model.model,
            sft_model.tokenizer,
            [prompt],
            progress=False,
            params=SamplingParams(max_new_tokens=16, temperature=0),
        )[0][0].text
        assert " is " in raw and raw.endswith("a summary.")
        sft_reply = client.chat.completions.create(
            model="sft-good", messages=prompt, max_tokens=16, temperature=0, extra_body={"preset": "hide"}
        )
        assert sft_reply.choices[0].message.content == "a summary."
        streamed = client.chat.completions.create(
            model="sft-good",
            messages=prompt,
            max_tokens=16,
            temperature=0,
            extra_body={"preset": "hide"},
            stream=True,
        )
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == "a summary."


def test_the_chart_plots_the_ai_judge_beside_the_reward_model_judge():
    """With an AI judge each row gets a second point (a square, hollow when the AI judge is self-judged)."""
    import matplotlib.pyplot as plt

    from serve.levels import chart

    row = {
        "level": "L2",
        "name": "sft",
        "train_minutes": 1.0,
        "win_rate": 0.6,
        "stderr": 0.05,
        "self_judged": "",
    }
    plain = chart([row])
    with_ai = chart([row | {"ai_win_rate": 0.7, "ai_stderr": 0.04, "ai_self_judged": "judge is an ancestor"}])

    def squares(fig):  # (rate, filled) of every square data point
        return [
            (line.get_ydata()[0], line.get_markerfacecolor() != "none")
            for line in fig.axes[0].lines
            if line.get_marker() == "s" and len(line.get_ydata())
        ]

    def legend(fig):
        return [t.get_text() for t in fig.axes[0].get_legend().get_texts()]

    assert squares(plain) == [] and "AI judge" not in legend(plain)
    assert squares(with_ai) == [(0.7, False)] and {"AI judge", "reward-model judge"} <= set(legend(with_ai))
    plt.close("all")
