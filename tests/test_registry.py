"""The model registry: licences, every kind of reference, and clear refusals."""

import json

import pytest
from sqlmodel import Session

from alignloop.core import AlignloopError, crud
from alignloop.core.registry import default_gguf_path, is_noncommercial, locate, read_licence, resolve


def test_default_gguf_declares_apache(tmp_path):
    assert read_licence(default_gguf_path()) == "apache-2.0"


@pytest.mark.parametrize(
    "licence, refused",
    [
        ("apache-2.0", False),
        ("mit", False),
        ("llama3.1", False),
        ("cc-by-nc-4.0", True),
        ("CC-BY-NC-SA-4.0", True),
        ("Research-only licence", True),
        ("Non-Commercial Use Only", True),
        ("cc-by-4.0", False),
    ],
)
def test_noncommercial_detection(licence, refused):
    assert is_noncommercial(licence) is refused


def model_dir(tmp_path, src, card: str | None = None, config_licence: str | None = None):
    import shutil

    path = tmp_path / "model"
    shutil.copytree(src, path)
    if card is None:
        (path / "README.md").unlink()
    else:
        (path / "README.md").write_text(card)
    if config_licence:
        config = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps(config | {"license": config_licence}))
    return path


def test_licence_from_model_card_and_config(tmp_path, tiny_model_dir):
    assert read_licence(tiny_model_dir) == "apache-2.0"
    other = model_dir(tmp_path, tiny_model_dir, card="---\nlicense: other\nlicense_name: acme-nc\n---\n")
    assert read_licence(other) == "acme-nc"
    (other / "README.md").unlink()
    assert read_licence(other) is None
    cfg = model_dir(tmp_path / "b", tiny_model_dir, card=None, config_licence="cc-by-nc-4.0")
    assert read_licence(cfg) == "cc-by-nc-4.0"


def test_noncommercial_model_is_refused_unless_overridden(workspace, tmp_path, tiny_model_dir):
    settings, _, _ = workspace
    path = model_dir(tmp_path, tiny_model_dir, card="---\nlicense: cc-by-nc-4.0\n---\n")
    with pytest.raises(AlignloopError, match=r"licensed 'cc-by-nc-4.0', which forbids commercial use"):
        locate(str(path), settings=settings)
    assert locate(str(path), settings=settings, allow_noncommercial=True).licence == "cc-by-nc-4.0"


def test_local_directory_resolves(workspace, tiny_model_dir):
    settings, _, _ = workspace
    loaded = resolve(str(tiny_model_dir), settings=settings)
    assert loaded.licence == "apache-2.0" and loaded.tokenizer.pad_token is not None
    assert not loaded.model.training


def test_registered_version_resolves_including_adapters(workspace, tmp_path, tiny_model_dir):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    settings, engine, _ = workspace
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft_model = get_peft_model(
        base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    with Session(engine) as s:
        parent = crud.register_model(
            s, name="base-v0", kind="policy", base=str(tiny_model_dir), path=str(tiny_model_dir)
        )
        crud.register_model(
            s, name="round1", kind="policy", base=str(tiny_model_dir), path=str(adapter), parent_id=parent.id
        )
        crud.register_model(s, name="alias", kind="policy", base=str(tiny_model_dir))
        s.commit()
        loaded = resolve("round1", settings=settings, session=s)
        assert loaded.licence == "apache-2.0"
        ids = torch.tensor([[1, 5, 9, 12]])
        with torch.no_grad():
            expected = peft_model(input_ids=ids).logits
            assert torch.allclose(loaded.model(input_ids=ids).logits, expected, atol=1e-5)
        assert resolve("alias", settings=settings, session=s).ref == "alias"


def test_missing_models_give_one_clear_line(workspace, tmp_path):
    settings, _, _ = workspace
    with pytest.raises(AlignloopError, match="not found: not 'default'"):
        locate("no-such-model", settings=settings)
    with pytest.raises(AlignloopError, match="not in the local hub cache"):
        locate("someorg/some-model-that-is-not-cached", settings=settings)
    (tmp_path / "empty").mkdir()
    with pytest.raises(AlignloopError, match="holds no model"):
        locate(str(tmp_path / "empty"), settings=settings)


def test_hub_id_resolves_from_the_local_hub_cache(workspace, tmp_path, tiny_model_dir):
    """A hub id the user downloaded earlier loads offline from the standard hub cache layout."""
    import os
    import shutil
    import subprocess
    import sys

    settings, _, _ = workspace
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--acme--tiny-chat"
    shutil.copytree(tiny_model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    code = (
        "from alignloop.core.config import load_settings; from alignloop.core.registry import resolve;"
        f"m = resolve('acme/tiny-chat', settings=load_settings({str(settings.workspace)!r}));"
        "print(m.licence, type(m.model).__name__, m.path.name)"
    )
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["apache-2.0", "LlamaForCausalLM", commit]
