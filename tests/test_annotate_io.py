"""Preference import (HH-RLHF, TRL) and the export's compatibility with TRL's trainers."""

import json

import pytest
from conftest import SHARED_DATA
from sqlmodel import Session, select

from alignloop.cli import main
from alignloop.core import crud
from alignloop.core.models import Comparison, Vote
from alignloop.core.prompts import ImportFileError
from annotate.io import import_preferences, parse_hh, parse_preference_file


def write_jsonl(path, *records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_parse_hh_turns():
    assert parse_hh("\n\nHuman: hi there\n\nAssistant: hello\n\nHuman: bye\n\nAssistant: ciao") == [
        {"role": "user", "content": "hi there"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "bye"},
        {"role": "assistant", "content": "ciao"},
    ]


def test_hh_harmless_dev_imports_cleanly(session, tmp_path):
    report = import_preferences(session, path=SHARED_DATA / "hh_harmless_dev.jsonl")
    assert report.added + report.duplicates + len(report.skipped) == 1500
    assert report.added >= 1490 and report.duplicates == 0
    assert {reason for _, reason in report.skipped} <= {
        "empty response",
        "chosen and rejected prompts do not match",
    }
    session.flush()
    comparisons = session.exec(select(Comparison).where(Comparison.source == "import")).all()
    assert len(comparisons) == report.added and all(c.status == "done" for c in comparisons)
    # Multi-turn prompts survive as chat messages; chosen sides are spread over both positions.
    pairs = crud.preference_pairs(session)
    assert len(pairs) == report.added
    assert max(len(p["prompt"]) for p in pairs) > 1 and all(p["prompt"][-1]["role"] == "user" for p in pairs)
    votes = session.exec(select(Vote)).all()
    assert 0.4 < sum(v.choice == "a" for v in votes) / len(votes) < 0.6
    again = import_preferences(session, path=SHARED_DATA / "hh_harmless_dev.jsonl")
    assert again.added == 0 and again.duplicates == report.added


def test_trl_formats(session, tmp_path):
    f = write_jsonl(
        tmp_path / "trl.jsonl",
        {"prompt": "Say hi", "chosen": "Hi!", "rejected": "No."},
        {"prompt": [{"role": "user", "content": "Name a colour"}], "chosen": [{"role": "assistant", "content": "Blue"}],
         "rejected": [{"role": "assistant", "content": "Seven"}]},
        {"chosen": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
         "rejected": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "5"}]},
        {"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "x"}],
         "rejected": [{"role": "user", "content": "b"}, {"role": "assistant", "content": "y"}]},
        {"prompt": "Same?", "chosen": "yes", "rejected": "yes"},
    )  # fmt: skip
    report = import_preferences(session, path=f)
    assert report.added == 3
    assert report.skipped == [(4, "chosen and rejected prompts do not match"), (5, "identical responses")]
    chosen = {p["prompt"][-1]["content"]: p["chosen"][0]["content"] for p in crud.preference_pairs(session)}
    assert chosen == {"Say hi": "Hi!", "Name a colour": "Blue", "2+2?": "4"}


@pytest.mark.parametrize(
    "record, reason",
    [
        ('{"chosen": "x"', "invalid JSON"),
        ({"chosen": "\n\nHuman: a\n\nAssistant: b"}, "missing field 'rejected'"),
        ({"chosen": "plain text", "rejected": "other"}, "not HH-RLHF text"),
        ({"prompt": 5, "chosen": "a", "rejected": "b"}, "'prompt' must be a string"),
        (
            {"prompt": "p", "chosen": [{"role": "assistant"}], "rejected": "b"},
            "without a string 'role' and 'content'",
        ),
        ([1, 2], "expected a JSON object"),
    ],
)
def test_malformed_preference_files_import_nothing(workspace, tmp_path, record, reason, capsys):
    settings, engine, _ = workspace
    f = write_jsonl(tmp_path / "prefs.jsonl", {"prompt": "ok", "chosen": "a", "rejected": "b"}, record)
    with pytest.raises(ImportFileError, match=reason):
        parse_preference_file(f)
    assert main(["prefs", "import", str(f), "--workspace", str(settings.workspace)]) == 1
    assert "prefs.jsonl:2: " in capsys.readouterr().err
    with Session(engine) as s:
        assert s.exec(select(Comparison)).first() is None


def test_cli_prefs_import_reports_skips(workspace, tmp_path, capsys):
    settings, _, _ = workspace
    f = write_jsonl(
        tmp_path / "p.jsonl",
        {"prompt": "p", "chosen": "a", "rejected": "b"},
        {"prompt": "q", "chosen": "", "rejected": "b"},
    )
    assert main(["prefs", "import", str(f), "--workspace", str(settings.workspace)]) == 0
    out = capsys.readouterr().out
    assert (
        "imported 1 pairs, 0 already present, 1 skipped (1 empty response)" in out and "skipped line 2" in out
    )


@pytest.fixture
def exported_pairs(session, tmp_path):
    from datasets import load_from_disk

    from alignloop.core.export import write_rows

    import_preferences(session, path=SHARED_DATA / "hh_harmless_dev.jsonl")
    rows = crud.preference_pairs(session)[:16]
    write_rows(rows, tmp_path / "pairs")
    return load_from_disk(str(tmp_path / "pairs"))


def _changed(before: dict, model) -> bool:
    import torch

    return any(not torch.equal(before[n], p.detach()) for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("engine", ["sqlite"], indirect=True)
def test_export_loads_into_trl_reward_trainer(exported_pairs, tiny_tokenizer, tmp_path):
    from transformers import LlamaConfig, LlamaForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    config = LlamaConfig(
        vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_labels=1, pad_token_id=tiny_tokenizer.pad_token_id,
    )  # fmt: skip
    model = LlamaForSequenceClassification(config)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = RewardConfig(
        output_dir=str(tmp_path / "rm"), max_steps=2, per_device_train_batch_size=4, max_length=256,
        report_to=[], logging_steps=1, save_strategy="no", use_cpu=True,
    )  # fmt: skip
    trainer = RewardTrainer(
        model=model, args=args, train_dataset=exported_pairs, processing_class=tiny_tokenizer
    )
    trainer.train()
    assert any("loss" in entry for entry in trainer.state.log_history)
    assert _changed(before, model)


@pytest.mark.parametrize("engine", ["sqlite"], indirect=True)
def test_export_loads_into_trl_dpo_trainer(exported_pairs, tiny_tokenizer, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    model = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir
    )  # from a directory, so TRL can load the reference
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = DPOConfig(
        output_dir=str(tmp_path / "dpo"), max_steps=2, per_device_train_batch_size=4, max_length=256,
        report_to=[], logging_steps=1, save_strategy="no", use_cpu=True,
    )  # fmt: skip
    trainer = DPOTrainer(
        model=model, args=args, train_dataset=exported_pairs, processing_class=tiny_tokenizer
    )
    trainer.train()
    assert any("loss" in entry for entry in trainer.state.log_history)
    assert _changed(before, model)
