"""Layer-selective tuning (L2 depth): LoRA/IA3 adapters only in the chosen layers, full fine-tuning that changes
nothing outside them, the same option in PPO, and bad layer lists refused before anything is written."""

import json

import pytest
import torch
from conftest import build_tiny_llama
from sqlmodel import Session, select

from alignloop.core import AlignloopError, crud
from alignloop.core.models import Run
from alignloop.core.registry import resolve
from rl.ppo import ActorCritic
from rl.ppo import load_config as load_ppo
from sft.train import load_config, train


@pytest.fixture
def data_file(tmp_path):
    rows = [
        {"instruction": f"What is item {i}?", "response": f"Item {i} is a blue thing."} for i in range(12)
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def weights(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_adapters_only_in_the_chosen_layers(workspace, tiny_model_dir, data_file, method):
    settings, engine, _ = workspace
    config = load_config(
        "configs/sft/tiny.yaml",
        data=[str(data_file)],
        base=str(tiny_model_dir),
        method=method,
        max_steps=3,
        layers_to_transform=[1],
        name=f"top-{method}",
        num_samples=0,
    )
    summary = train(engine, settings, config, progress=False)
    with Session(engine) as s:
        model = resolve(f"top-{method}", settings=settings, session=s).model
    adapted = {n for n, _ in model.named_parameters() if "lora_" in n or "ia3_" in n}
    assert adapted and all(".layers.1." in n for n in adapted), sorted(adapted)
    assert summary["layers"] == [1]


def test_full_fine_tuning_leaves_the_other_layers_untouched(workspace, tiny_model_dir, data_file, tiny_model):
    settings, engine, _ = workspace
    config = load_config(
        "configs/sft/tiny.yaml",
        data=[str(data_file)],
        base=str(tiny_model_dir),
        method="full",
        max_steps=3,
        learning_rate=1e-2,
        layers_to_transform=[1],
        name="full-top",
        num_samples=0,
    )
    summary = train(engine, settings, config, progress=False)
    before = weights(tiny_model)
    with Session(engine) as s:
        after = weights(resolve("full-top", settings=settings, session=s).model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".layers.1." in k for k in changed), sorted(changed)
    assert summary["trainable_params"] < summary["total_params"] / 2


def test_bad_layer_lists_are_refused_before_anything_is_written(workspace, tiny_model_dir, data_file):
    settings, engine, _ = workspace
    with pytest.raises(AlignloopError, match="not prefix"):
        load_config(None, method="prefix", layers_to_transform=[0])
    config = load_config(
        "configs/sft/tiny.yaml", data=[str(data_file)], base=str(tiny_model_dir), layers_to_transform=[0, 2]
    )  # the tiny model has layers 0 and 1
    with pytest.raises(AlignloopError, match="from 0 to 1"):
        train(engine, settings, config, progress=False)
    with Session(engine) as s:
        assert s.exec(select(Run)).all() == [] and crud.list_model_versions(s) == []


@pytest.mark.parametrize("method", ["lora", "full"])
def test_ppo_trains_only_the_chosen_layers(tiny_tokenizer, method):
    config = load_ppo(None, method=method, layers_to_transform=[0], lora_r=4, lora_alpha=8)
    ac = ActorCritic(build_tiny_llama(tiny_tokenizer), config)
    policy = {id(p) for p in ac.trainable_parameters()} - {id(p) for p in ac.value_head.parameters()}
    names = [n for n, p in ac.model.named_parameters() if id(p) in policy]
    assert names and all(".layers.0." in n for n in names), names
