"""Instruction tuning on a tiny model: every PEFT method learns, touches only its own parameters, reloads exactly."""

import json

import pytest
import torch
from sqlmodel import Session, select

from alignloop.cli import main
from alignloop.core import crud
from alignloop.core.models import ChatFeedback, ModelVersion, Run
from alignloop.core.prompts import ImportFileError
from alignloop.core.registry import resolve
from alignloop.core.sampling import SamplingParams, generate
from sft.data import Example, parse_instruction_file, split_held_out
from sft.train import fit_examples, load_config, train

CATEGORIES = ["open_qa", "brainstorming"]


@pytest.fixture
def dolly_file(tmp_path):
    rows = [
        {
            "instruction": f"What is item {i}?",
            "context": "" if i % 2 else f"Item {i} is blue.",
            "response": f"Item {i} is a blue thing.",
            "category": CATEGORIES[i % 2],
        }
        for i in range(12)
    ]
    path = tmp_path / "dolly.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_formats_become_prompt_completion(tmp_path):
    f = tmp_path / "mixed.jsonl"
    f.write_text(
        json.dumps({"instruction": "Add", "input": "2 and 3", "output": "5"})
        + "\n"
        + json.dumps(
            {
                "instruction": "Summarise",
                "context": "Long text.",
                "response": "Short.",
                "category": "summarization",
            }
        )
        + "\n"
        + json.dumps(
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
        )
        + "\n"
    )
    alpaca, dolly, chat = parse_instruction_file(f)
    assert alpaca.row() == {
        "prompt": [{"role": "user", "content": "Add\n\n2 and 3"}],
        "completion": [{"role": "assistant", "content": "5"}],
    }
    assert (dolly.prompt[0]["content"], dolly.category) == ("Summarise\n\nLong text.", "summarization")
    assert (chat.prompt, chat.completion) == ([{"role": "user", "content": "Hi"}], "Hello!")


@pytest.mark.parametrize(
    "line, reason",
    [
        ('{"instruction": "x"', "invalid JSON"),
        ('{"instruction": "Do it"}', "missing field 'response' \\(dolly\\) or 'output'"),
        ('{"messages": [{"role": "user", "content": "only a question"}]}', "must hold the conversation"),
        (
            '{"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q2"}]}',
            "assistant's",
        ),
        ('{"text": "free text"}', "no instruction data"),
    ],
)
def test_malformed_data_trains_nothing(workspace, tmp_path, line, reason, capsys):
    settings, engine, _ = workspace
    f = tmp_path / "bad.jsonl"
    f.write_text('{"instruction": "ok", "response": "fine"}\n' + line + "\n")
    with pytest.raises(ImportFileError, match=reason):
        parse_instruction_file(f)
    assert main(["sft", "train", "--data", str(f), "--workspace", str(settings.workspace)]) == 1
    assert "bad.jsonl:2:" in capsys.readouterr().err
    with Session(engine) as s:
        assert s.exec(select(Run)).all() == [] and s.exec(select(ModelVersion)).all() == []
    assert not any(settings.runs_dir.iterdir())


def test_held_out_split_is_by_prompt_and_per_category(dolly_file):
    examples = parse_instruction_file(dolly_file)
    train_set, held = split_held_out(examples, fraction=0.25, seed=0)
    assert {e.category for e in held} == set(CATEGORIES)
    assert not {crud.prompt_hash(e.prompt) for e in held} & {crud.prompt_hash(e.prompt) for e in train_set}


def base_weights(model_dir) -> dict:
    from transformers import AutoModelForCausalLM

    return {k: v.clone() for k, v in AutoModelForCausalLM.from_pretrained(model_dir).state_dict().items()}


@pytest.mark.parametrize("method", ["lora", "prefix", "ia3", "full"])
def test_each_method_learns_and_reloads_exactly(workspace, tiny_model_dir, dolly_file, method):
    settings, engine, _ = workspace
    config = load_config(
        "configs/sft/tiny.yaml",
        data=[str(dolly_file)],
        base=str(tiny_model_dir),
        method=method,
        max_steps=30,
        learning_rate=3e-2 if method != "full" else 3e-3,
        name=f"tiny-{method}",
    )
    summary = train(engine, settings, config, progress=False)

    assert summary["final_loss"] < summary["first_loss"]  # it learns on a small overfit set
    assert set(summary["held_out_loss"]) == {*CATEGORIES, "all"}
    assert len(summary["samples_before"]) == len(summary["samples_after"]) == 2
    before = base_weights(tiny_model_dir)
    with Session(engine) as s:
        version = crud.get_model_version(s, name=f"tiny-{method}")
        run = s.get(Run, summary["run_id"])
        assert version.kind == "sft" and version.run_id == run.id and run.status == "succeeded"
        assert [h["step"] for h in run.metrics["history"] if "loss" in h][:2] == [2, 4]
        loaded = resolve(f"tiny-{method}", settings=settings, session=s)
    if method == "full":
        assert summary["trainable_params"] == summary["total_params"]
        assert any(not torch.equal(before[k], v) for k, v in loaded.model.state_dict().items() if k in before)
    else:
        assert summary["trainable_params"] < summary["total_params"] / 5
        # Only the adapter changed: the base weights under it are the originals (LoRA keeps them as base_layer).
        base = {
            k.replace(".base_layer", ""): v for k, v in loaded.model.get_base_model().state_dict().items()
        }
        for key, value in before.items():
            assert torch.equal(base[key], value), key
    # Batched generation gives what one-at-a-time generation gives, prefix tuning included.
    prompts = [
        [{"role": "user", "content": "Hi"}],
        [{"role": "user", "content": "What is item 3? Tell me more."}],
    ]
    greedy = SamplingParams(max_new_tokens=6, temperature=0)
    batched = generate(loaded.model, loaded.tokenizer, prompts, params=greedy, batch_size=2, progress=False)
    single = [
        generate(loaded.model, loaded.tokenizer, [p], params=greedy, progress=False)[0] for p in prompts
    ]
    assert [b[0].token_ids for b in batched] == [s[0].token_ids for s in single]
    # The saved model reloads to the outputs the trained one gave: compare with the registry's second load.
    with Session(engine) as s:
        again = resolve(f"tiny-{method}", settings=settings, session=s)
    ids = torch.tensor([[1, 20, 30, 40, 50]])
    with torch.no_grad():
        assert torch.allclose(
            loaded.model(input_ids=ids).logits, again.model(input_ids=ids).logits, atol=1e-5
        )
        reference = loaded.model.get_base_model() if method != "full" else None
        if reference is not None and method != "prefix":  # the adapter really changes the outputs
            with loaded.model.disable_adapter():
                plain = loaded.model(input_ids=ids).logits
            assert not torch.allclose(plain, again.model(input_ids=ids).logits, atol=1e-4)


def test_sft_on_chosen_and_chat_edits_via_cli(workspace, tiny_model_dir, capsys):
    from test_queue import seed, users

    settings, engine, _ = workspace
    with Session(engine) as s:
        comparisons = seed(s, 6)
        (ann,) = users(s, 1)
        for c in comparisons:
            crud.record_vote(s, comparison_id=c.id, user_id=ann.id, choice="a")
        s.add(
            ChatFeedback(
                user_id=ann.id,
                messages=[{"role": "user", "content": "Hi?"}],
                response="meh",
                rating=-1,
                edited="Hello! How can I help?",
            )
        )
        s.commit()
    code = main(
        [
            "sft",
            "train",
            "--config",
            "configs/sft/tiny.yaml",
            "--from-chosen",
            "--from-chat-edits",
            "--base",
            str(tiny_model_dir),
            "--max-steps",
            "4",
            "--name",
            "tiny-chosen",
            "--workspace",
            str(settings.workspace),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0 and "registered tiny-chosen" in out
    with Session(engine) as s:
        metrics = crud.get_model_version(s, name="tiny-chosen").metrics
    assert metrics["train_examples"] + metrics["held_out_examples"] == 7


def test_a_short_run_counts_the_examples_it_reached(workspace, tiny_model_dir, dolly_file):
    """The levels report's "examples used" is what the steps saw, not the size of the data set."""
    settings, engine, _ = workspace
    config = load_config(
        "configs/sft/tiny.yaml",
        data=[str(dolly_file)],
        base=str(tiny_model_dir),
        max_steps=1,
        per_device_train_batch_size=2,
        num_samples=0,
        name="tiny-one-step",
    )
    summary = train(engine, settings, config, progress=False)
    assert summary["train_examples"] == 8 and summary["examples_seen"] == 2  # 1 step x batch 2


def test_bad_sft_settings_are_refused():
    from alignloop.core import AlignloopError

    with pytest.raises(AlignloopError, match="method must be one of"):
        load_config(None, method="adapterz")
    with pytest.raises(AlignloopError, match="--merge works for lora and ia3"):
        load_config(None, method="prefix", merge=True)


def test_merged_lora_is_a_standalone_model_with_the_adapters_outputs(workspace, tiny_model_dir, dolly_file):
    settings, engine, _ = workspace
    common = {
        "data": [str(dolly_file)],
        "base": str(tiny_model_dir),
        "method": "lora",
        "max_steps": 10,
        "learning_rate": 3e-2,
    }
    adapter = train(
        engine, settings, load_config("configs/sft/tiny.yaml", name="as-adapter", **common), progress=False
    )
    merged = train(
        engine,
        settings,
        load_config("configs/sft/tiny.yaml", name="merged", merge=True, **common),
        progress=False,
    )
    merged_dir = settings.runs_dir / f"run{merged['run_id']}" / "model"
    assert (merged_dir / "config.json").is_file() and not (merged_dir / "adapter_config.json").exists()
    ids = torch.tensor([[1, 20, 30, 40, 50]])
    with Session(engine) as s, torch.no_grad():
        a = resolve("as-adapter", settings=settings, session=s).model(input_ids=ids).logits
        m = resolve("merged", settings=settings, session=s).model(input_ids=ids).logits
    assert torch.allclose(
        a, m, atol=1e-4
    )  # same seed, same data: merging changes the packaging, not the model
    assert adapter["trainable_params"] == merged["trainable_params"]


def test_long_conversations_keep_their_answers_through_trls_truncation(tmp_path, tiny_model, tiny_tokenizer):
    """TRL cuts prompt + completion from the end (and drops a row whose prompt alone fills max_length);
    `fit_examples` cuts the prompt's oldest turns instead, so TRL's own preparation keeps every answer whole."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    turns = [
        {
            "role": ("user", "assistant")[t % 2],
            "content": f"turn {t} " + " ".join(f"w{t}x{i}" for i in range(30)),
        }
        for t in range(11)
    ]
    answer = "The answer, kept whole."
    examples = [
        Example(prompt=turns + [{"role": "user", "content": "And the last question?"}], completion=answer),
        Example(prompt=[{"role": "user", "content": "A short one?"}], completion=answer),
    ]
    fitted, report = fit_examples(tiny_tokenizer, examples, 96)
    assert report.truncated == 1 and report.turns_dropped > 0 and fitted[1] == examples[1]
    assert fitted[0].prompt[-1]["content"] == "And the last question?"

    def prepared(rows):
        args = SFTConfig(output_dir=str(tmp_path), max_length=96, use_cpu=True, bf16=False, report_to=[])
        data = Dataset.from_list([e.row() for e in rows])
        return SFTTrainer(
            model=tiny_model, args=args, train_dataset=data, processing_class=tiny_tokenizer
        ).train_dataset

    def learned(row):
        return tiny_tokenizer.decode([t for t in row["labels"] if t != -100])

    assert (
        len(prepared(examples)) == 1
    )  # unfitted: the long conversation's answer is cut away, the row dropped
    rows = prepared(fitted)
    assert len(rows) == 2 and all(answer in learned(row) for row in rows)
