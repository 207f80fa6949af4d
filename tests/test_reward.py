"""Reward models on tiny bases: they learn, save their head, reload exactly, and score across tokenizers."""

import json

import numpy as np
import pytest
import torch
from conftest import web_login
from fastapi.testclient import TestClient
from sqlmodel import Session, select

from alignloop.cli import main
from alignloop.core import AlignloopError, crud
from alignloop.core.models import ModelVersion, Run
from alignloop.core.registry import ModelSource, encoder_path, locate
from reward import evaluate as reward_eval
from reward.data import Pair, RewardFormat, file_pairs, split_by_prompt
from reward.score import RewardModel, load_sequence_classifier
from reward.train import load_config, train

TOPICS = ["the sea", "bread", "hash tables", "Paris", "poems", "tuples", "meetings", "wind", "flour", "lists"]


@pytest.fixture
def separable_file(tmp_path):
    """Preferences a model can learn perfectly: the chosen answer thanks the user, the rejected one refuses."""
    rows = [
        {
            "prompt": f"Tell me about {topic}, question {i}.",
            "chosen": f"Thank you! Here is a summary about {topic}.",
            "rejected": "No.",
        }
        for i in range(4)
        for topic in TOPICS
    ]
    path = tmp_path / "separable.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_prompt_is_cut_from_the_left_and_the_response_kept(tiny_tokenizer):
    fmt = RewardFormat(tiny_tokenizer, max_length=40)
    prompt = [{"role": "user", "content": "word " * 200 + "LAST QUESTION"}]
    response = "Thank you! Here is a summary."
    ids = fmt.encode(prompt, response)
    assert len(ids) == 40
    text = tiny_tokenizer.decode(ids)
    assert text.endswith(response + "<|im_end|>\n") and "LAST QUESTION" in text
    rows, report = fmt.encode_pairs([Pair(prompt=prompt, chosen=response, rejected="No.", source="t")])
    assert (report.pairs, report.prompt_truncated, report.response_truncated) == (1, 1, 0)
    assert report.as_dict()["dropped"] == 0 and rows[0]["length"] == 40
    # A response longer than the whole budget keeps its head and a few prompt tokens; the pair is still there.
    long_rows, long_report = fmt.encode_pairs(
        [Pair(prompt=prompt, chosen="Paris " * 100, rejected="No.", source="t")]
    )
    assert long_report.response_truncated == 1 and len(long_rows[0]["chosen_ids"]) == 40


def test_encoder_format_frames_prompt_and_response():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(encoder_path())
    fmt = RewardFormat(tokenizer, max_length=64)
    ids = fmt.encode([{"role": "user", "content": "Is it safe?"}], "Yes, it is.")
    assert tokenizer.decode(ids) == "[CLS] user : is it safe? assistant : [SEP] yes, it is. [SEP]"


def test_split_keeps_each_prompt_on_one_side(separable_file):
    pairs, _ = file_pairs(separable_file)
    train_pairs, held = split_by_prompt(pairs, held_out=8, seed=1)
    assert len({p.key for p in held}) == 8 and len(train_pairs) + len(held) == len(pairs)
    assert not {p.key for p in held} & {p.key for p in train_pairs}


def test_calibration_and_length_figures():
    pairs = [
        Pair(prompt=[{"role": "user", "content": "q"}], chosen="x" * (i + 2), rejected="y", source="s")
        for i in range(20)
    ]
    confident = reward_eval.evaluate_scores(pairs, np.full(20, 10.0), np.zeros(20))
    assert confident["accuracy"] == 1.0 and confident["ece"] < 1e-3
    coin = reward_eval.evaluate_scores(pairs, np.zeros(20), np.zeros(20))
    assert coin["accuracy"] == 0.5 and coin["ece"] < 1e-9  # says 50/50 and is right half the time
    overconfident_wrong = reward_eval.evaluate_scores(pairs, np.zeros(20), np.full(20, 10.0))
    assert overconfident_wrong["accuracy"] == 0.0 and overconfident_wrong["ece"] > 0.99
    by_length = reward_eval.evaluate_scores(
        pairs, np.array([len(p.chosen) for p in pairs], float), np.ones(20)
    )
    assert by_length["length_correlation"] > 0.9 and by_length["prefers_longer"] == 1.0


def test_learns_a_separable_preference_perfectly(workspace, tiny_model_dir, separable_file):
    settings, engine, _ = workspace
    config = load_config(
        "configs/reward/tiny.yaml",
        data=[str(separable_file)],
        base=str(tiny_model_dir),
        held_out=10,
        max_steps=40,
        learning_rate=3e-3,
        per_device_train_batch_size=8,
        name="rm-tiny",
    )
    before = {
        k: v.clone()
        for k, v in load_sequence_classifier(locate(str(tiny_model_dir), settings=settings))[0]
        .state_dict()
        .items()
    }
    summary = train(engine, settings, config, progress=False)

    assert summary["accuracy"] == 1.0 and summary["held_out_pairs"] == 10
    assert summary["final_loss"] < summary["first_loss"]
    assert summary["encoding"]["dropped"] == 0
    with Session(engine) as s:
        run = s.get(Run, summary["run_id"])
        version = crud.get_model_version(s, name="rm-tiny")
        assert run.status == "succeeded" and version.kind == "reward" and version.run_id == run.id
        assert [h["step"] for h in run.metrics["history"] if "loss" in h][:2] == [
            2,
            4,
        ]  # loss logged per step
        scorer = RewardModel.load("rm-tiny", settings=settings, session=s)
    after = scorer.model.state_dict()
    changed = [k for k in before if k in after and not torch.equal(before[k], after[k])]
    assert "score.weight" in changed and any("layers" in k for k in changed)
    good, bad = scorer.score(
        ["Tell me about rivers."] * 2, ["Thank you! Here is a summary about rivers.", "No."]
    )
    assert good > bad
    logged = [json.loads(line) for line in (settings.runs_dir / f"run{run.id}" / "metrics.jsonl").open()]
    assert all("loss" in e for e in logged if "train_runtime" not in e)


def test_lora_head_is_saved_and_reloads_to_identical_scores(workspace, tiny_model_dir, separable_file):
    settings, engine, _ = workspace
    config = load_config(
        "configs/reward/tiny.yaml",
        data=[str(separable_file)],
        base=str(tiny_model_dir),
        method="lora",
        held_out=10,
        max_steps=10,
        learning_rate=1e-2,
        lora_r=2,
        name="rm-lora",
    )
    summary = train(engine, settings, config, progress=False)
    assert summary["trainable_params"] < summary["total_params"] / 3
    model_dir = settings.runs_dir / f"run{summary['run_id']}" / "model"
    adapter = json.loads((model_dir / "adapter_config.json").read_text())
    assert "score" in adapter["modules_to_save"]
    from safetensors import safe_open

    with safe_open(model_dir / "adapter_model.safetensors", "pt") as f:
        assert any("score" in k for k in f.keys())  # the head travels with the adapter
    saved = json.loads((model_dir.parent / "held_out_scores.json").read_text())
    with Session(engine) as s:
        scorer = RewardModel.load("rm-lora", settings=settings, session=s)
    _, held = split_by_prompt(file_pairs(config.data[0])[0], held_out=10, seed=config.seed)
    chosen, rejected = reward_eval.pair_scores(scorer, held)
    assert np.allclose(chosen, saved["chosen"], atol=1e-5) and np.allclose(
        rejected, saved["rejected"], atol=1e-5
    )


def test_cross_tokenizer_scoring_equals_direct_scoring(tiny_tokenizer):
    """The policy's tokens (a BPE vocabulary) scored by a MiniLM reward model (WordPiece)."""
    model, tokenizer = load_sequence_classifier(
        ModelSource(ref="minilm", path=encoder_path(), licence="apache-2.0")
    )
    scorer = RewardModel(model=model.eval(), tokenizer=tokenizer, max_length=64)
    prompts = [[{"role": "user", "content": "Tell me about bread."}], "What is a hash table?"]
    texts = ["Mix flour, water, salt and yeast.", "A table that maps keys to values."]
    policy_ids = [
        tiny_tokenizer(t, add_special_tokens=False)["input_ids"] + [tiny_tokenizer.eos_token_id]
        for t in texts
    ]
    direct = scorer.score(prompts, texts)
    assert scorer.score_tokens(tiny_tokenizer, prompts, policy_ids) == pytest.approx(direct, abs=1e-6)
    assert direct[0] != direct[1]
    # batching and order do not change a score
    assert scorer.score(prompts[::-1], texts[::-1], batch_size=1) == pytest.approx(direct[::-1], abs=1e-5)


def test_scoring_batches_are_bounded_by_padded_tokens_not_only_by_count():
    """One long conversation among short ones: batches group similar lengths under the token budget (each
    forward pass sees at most `max_tokens` padded tokens, and far fewer than a fixed batch would pad), and
    the scores are those of one sequence at a time."""
    model, tokenizer = load_sequence_classifier(
        ModelSource(ref="minilm", path=encoder_path(), licence="apache-2.0")
    )
    scorer = RewardModel(model=model.eval(), tokenizer=tokenizer, max_length=256)
    words = lambda n: " ".join(f"word{i}" for i in range(n))  # noqa: E731
    sequences = [tokenizer(words(n))["input_ids"] for n in (3, 90, 5, 4, 25, 6, 2, 7)]
    seen = []
    hook = scorer.model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["input_ids"].numel()), with_kwargs=True
    )
    budgeted = scorer.member_scores_ids(sequences, batch_size=16, max_tokens=320)[0]
    hook.remove()
    longest = max(map(len, sequences))
    assert longest <= 320 and max(seen) <= 320 and sum(seen) < len(sequences) * longest / 2
    alone = [scorer.member_scores_ids([s], batch_size=1)[0, 0] for s in sequences]
    assert budgeted == pytest.approx(alone, abs=1e-5)


def test_bad_input_trains_nothing(workspace, tmp_path, capsys):
    settings, engine, _ = workspace
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: minilm\nlearning_rat: 0.1\n")
    with pytest.raises(AlignloopError, match="unknown reward setting"):
        load_config(bad)
    with pytest.raises(AlignloopError, match="method must be one of"):
        load_config(None, method="qlora")
    assert main(["reward", "train", "--workspace", str(settings.workspace)]) == 1
    assert "not enough preference data" in capsys.readouterr().err
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "q", "chosen": "a"}\n')
    assert main(["reward", "train", "--data", str(broken), "--workspace", str(settings.workspace)]) == 1
    assert "broken.jsonl:1:" in capsys.readouterr().err
    with Session(engine) as s:
        assert s.exec(select(Run)).all() == [] and s.exec(select(ModelVersion)).all() == []
    assert not any(settings.runs_dir.iterdir())


def test_cli_train_eval_and_admin_page(workspace, tiny_model_dir, separable_file, tmp_path, capsys):
    settings, engine, password = workspace
    ws = ["--workspace", str(settings.workspace)]
    assert main(["prefs", "import", str(separable_file), *ws]) == 0
    code = main(
        [
            "reward",
            "train",
            "--config",
            "configs/reward/tiny.yaml",
            "--base",
            str(tiny_model_dir),
            "--max-steps",
            "6",
            "--name",
            "rm-cli",
            *ws,
        ]
    )
    out = capsys.readouterr().out
    assert code == 0 and "registered rm-cli" in out and "0 pairs dropped" in out
    assert (
        main(["reward", "eval", "rm-cli", "--data", str(separable_file), "--out", str(tmp_path / "ev"), *ws])
        == 0
    )
    assert "accuracy" in capsys.readouterr().out and (tmp_path / "ev" / "report.png").stat().st_size > 1000
    with Session(engine) as s:
        version = crud.get_model_version(s, name="rm-cli")
        assert version.metrics["encoding"]["by_source"] == {"import": version.metrics["train_pairs"]}
        assert version.round == 0  # imported votes are round 0
    from alignloop.web import create_app

    with TestClient(create_app(settings, engine)) as client:
        web_login(client, "admin", password)
        page = client.get("/admin/reward")
        assert page.status_code == 200 and "rm-cli" in page.text and "held-out accuracy" in page.text
        png = client.get(f"/admin/reward/{version.id}/report.png")
        assert png.status_code == 200 and png.content[:4] == b"\x89PNG"
        assert client.get("/api/reward/models").json()[0]["name"] == "rm-cli"


@pytest.mark.smoke
def test_embedded_encoder_trains_on_hh_pairs(workspace, tmp_path):
    """The real all-MiniLM-L6-v2 base on real HH-RLHF pairs: a few steps, then it scores."""
    from conftest import SHARED_DATA

    settings, engine, _ = workspace
    config = load_config(
        "configs/reward/tiny.yaml",
        data=[str(SHARED_DATA / "hh_harmless_dev.jsonl")],
        max_pairs=48,
        held_out=16,
        max_steps=4,
        from_workspace=False,
    )
    summary = train(engine, settings, config, progress=False)
    assert summary["steps"] == 4 and summary["held_out_pairs"] >= 16 and 0 <= summary["accuracy"] <= 1
    assert summary["encoding"]["prompt_truncated"] > 0 and summary["encoding"]["dropped"] == 0


def test_folds_partition_the_prompts(separable_file):
    from reward.data import fold_by_prompt

    pairs, _ = file_pairs(separable_file)
    held = [fold_by_prompt(pairs, fold=i, folds=4, seed=3)[1] for i in range(1, 5)]
    keys = [p.key for fold in held for p in fold]
    assert sorted(keys) == sorted(p.key for p in pairs)  # every pair held out exactly once
    train_pairs, test = fold_by_prompt(pairs, fold=2, folds=4, seed=3)
    assert not {p.key for p in train_pairs} & {p.key for p in test}
    with pytest.raises(ValueError):
        fold_by_prompt(pairs, fold=5, folds=4)


@pytest.mark.parametrize("fold", ["5/4", "0/3", "1/1", "two/5", "1/2/3"])
def test_bad_cv_fold_is_refused_before_anything_is_written(workspace, separable_file, fold):
    settings, engine, _ = workspace
    with pytest.raises(AlignloopError, match="cv_fold"):
        load_config("configs/reward/tiny.yaml", data=[str(separable_file)], cv_fold=fold)
    with Session(engine) as s:
        assert s.exec(select(Run)).all() == []


def test_queue_keys_put_disputed_and_tied_pairs_first():
    from reward.score import queue_keys

    single = queue_keys(np.array([[1.0, 0.2, -3.0]]), np.array([[0.0, 0.0, 0.0]]))
    assert single.tolist() == pytest.approx([1.0, 0.2, 3.0])
    # Three members, three pairs: agreed and clear; same mean margin but disputed; agreed on a tie.
    a = np.array([[1.0, 3.0, 0.05], [1.0, -1.0, 0.0], [1.0, 1.0, -0.05]])
    keys = queue_keys(a, np.zeros_like(a))
    assert keys[1] < keys[2] < keys[0] + 1e-12 and np.argsort(keys)[0] == 1  # the disputed pair first


def test_ensemble_trains_members_and_scores_their_mean(workspace, tiny_model_dir, separable_file):
    settings, engine, _ = workspace
    config = load_config(
        "configs/reward/tiny.yaml",
        data=[str(separable_file)],
        base=str(tiny_model_dir),
        cv_fold="2/4",
        ensemble=2,
        max_steps=6,
        learning_rate=3e-3,
        per_device_train_batch_size=8,
        name="rm-ensemble",
    )
    summary = train(engine, settings, config, progress=False)
    assert summary["ensemble"] == 2 and len(summary["members"]) == 2
    assert summary["steps"] == 12 and summary["held_out_pairs"] == 10  # fold 2 of 4 over 10 prompts x 4
    held = summary["evaluation"]["held_out"]
    assert len(held["members"]) == 2 and held["disagreement"] > 0
    model_dir = settings.runs_dir / f"run{summary['run_id']}" / "model"
    assert json.loads((model_dir / "alignloop_reward.json").read_text())["members"] == ["member0", "member1"]
    with Session(engine) as s:
        scorer = RewardModel.load("rm-ensemble", settings=settings, session=s)
        history = s.get(Run, summary["run_id"]).metrics["history"]
    assert {h.get("member") for h in history if "loss" in h} == {0, 1}
    assert scorer.size == 2
    first, second = (dict(m.named_parameters())["score.weight"] for m in scorer.members)
    assert not torch.equal(first, second)  # own seeds, own heads
    prompts, responses = ["Tell me about rivers."] * 2, ["Thank you! Here is a summary about rivers.", "No."]
    members = scorer.member_scores(prompts, responses)
    assert members.shape == (2, 2)
    assert scorer.score(prompts, responses) == pytest.approx(members.mean(0).tolist())
    scores = json.loads((model_dir.parent / "held_out_scores.json").read_text())
    assert np.array(scores["members"]["chosen"]).shape == (2, 10)
