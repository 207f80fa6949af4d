"""Model export: merged HF folders decode like the registered version; GGUF loads in llama.cpp and decodes the
same at f16; licences, bad input and the /admin button.

The tiny models here use SmolLM2's tokenizer (read from the default model's GGUF), because llama.cpp's converter
only accepts tokenizers whose pre-tokenizer it recognises; the weights are a 2-layer, 32-wide Llama.
"""

import os
import re
import shutil
import time

import pytest
import torch
from conftest import build_tiny_llama, web_login
from fastapi.testclient import TestClient
from sqlmodel import Session
from transformers import AutoModelForCausalLM, AutoTokenizer

from alignloop.cli import main
from alignloop.core import AlignloopError, crud
from alignloop.core.models import Run
from alignloop.core.registry import DEFAULT_GGUF, default_gguf_path, read_licence, resolve
from alignloop.core.sampling import render
from serve.export import export_model

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
NEW_TOKENS = 12


def gguf_ready() -> bool:
    """llama-cpp-python and the converter (`make gguf`); CI sets ALIGNLOOP_REQUIRE_GGUF=1 so a missing one fails."""
    from serve.export import find_converter

    try:
        import llama_cpp  # noqa: F401

        find_converter()
    except (ImportError, AlignloopError):
        if os.environ.get("ALIGNLOOP_REQUIRE_GGUF") == "1":
            raise
        return False
    return True


needs_gguf = pytest.mark.skipif("not gguf_ready()", reason="needs `make gguf` (llama-cpp-python + converter)")


@pytest.fixture(scope="module")
def smol_tokenizer():
    path = default_gguf_path()
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=DEFAULT_GGUF)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, smol_tokenizer):
    path = tmp_path_factory.mktemp("smol-tiny")
    build_tiny_llama(smol_tokenizer, seed=1).save_pretrained(path)
    smol_tokenizer.save_pretrained(path)
    (path / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny\n")
    return path


def lora(model_dir, out, seed):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    peft_model = get_peft_model(
        model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False)
    )
    for name, p in peft_model.named_parameters():  # big enough to change the greedy tokens
        if "lora_" in name:
            p.data.mul_(8.0)
    peft_model.save_pretrained(out)
    return out


@pytest.fixture
def versions(workspace, tmp_path, base_dir):
    """base-v0 (full weights) <- sft-v1 (LoRA) <- rl-v2 (LoRA over the merged SFT model, round 1, with a run)."""
    settings, engine, _ = workspace
    sft = lora(base_dir, tmp_path / "sft", seed=2)
    from peft import PeftModel

    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), sft).merge_and_unload()
    merged.save_pretrained(tmp_path / "sft-merged")  # what the RL round trained on
    rl = lora(tmp_path / "sft-merged", tmp_path / "rl", seed=3)
    with Session(engine) as s:
        base = crud.register_model(s, name="base-v0", kind="policy", base=str(base_dir), path=str(base_dir))
        sft_run = crud.create_run(s, kind="sft", config={"data": ["dolly.jsonl"], "method": "lora"})
        sft_v = crud.register_model(
            s,
            name="sft-v1",
            kind="sft",
            base="base-v0",
            path=str(sft),
            parent_id=base.id,
            run_id=sft_run.id,
            metrics={"final_loss": 1.25},
        )
        rl_run = crud.create_run(
            s, kind="rl", config={"algo": "ppo", "reward_model": "rm-v1", "kl_coef": 0.05}
        )
        crud.register_model(
            s,
            name="rl-v2",
            kind="policy",
            base="sft-v1",
            path=str(rl),
            parent_id=sft_v.id,
            run_id=rl_run.id,
            round=1,
            metrics={"reward_end": 0.5},
        )
        ev = crud.create_run(s, kind="eval", config={})
        crud.finish_run(
            s,
            run=ev,
            status="succeeded",
            metrics={
                "policy": "rl-v2",
                "baseline": "sft-v1",
                "reward": 0.75,
                "baseline_reward": 0.25,
                "prompts": 8,
                "judge": "rm-v1",
            },
        )
        s.commit()
    return settings, engine


def greedy_hf(model, tokenizer, n=NEW_TOKENS) -> list[int]:
    ids = torch.tensor([render(tokenizer, MESSAGES)])
    with torch.no_grad():
        out = model.generate(
            ids, max_new_tokens=n, do_sample=False, eos_token_id=None, attention_mask=torch.ones_like(ids)
        )
    return out[0, ids.shape[1] :].tolist()


def greedy_llama_cpp(gguf_path, prompt_ids, n=NEW_TOKENS) -> list[int]:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=256, n_threads=2, verbose=False)
    tokens = []
    for token in llm.generate(prompt_ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
        tokens.append(int(token))
        if len(tokens) == n:
            break
    return tokens


@pytest.mark.parametrize("ref", ["base-v0", "sft-v1", "rl-v2"])
def test_hf_export_decodes_like_the_registered_version(versions, tmp_path, ref):
    settings, engine = versions
    with Session(engine) as s:
        registered = resolve(ref, settings=settings, session=s)
        expected = greedy_hf(registered.model, registered.tokenizer)
        result = export_model(settings, ref, tmp_path / "out", session=s, fmt="hf")
    assert {
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "generation_config.json",
        "README.md",
    } <= set(result.files)
    assert not (tmp_path / "out" / "adapter_config.json").exists()  # merged, not an adapter
    # plain transformers, no registry
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tokenizer.chat_template
    assert greedy_hf(model, tokenizer) == expected
    if ref != "base-v0":  # the adapters really change the model: an unmerged export would not pass
        base = resolve("base-v0", settings=settings, session=Session(engine))
        assert greedy_hf(base.model, base.tokenizer) != expected
    assert read_licence(tmp_path / "out") == "apache-2.0"


def test_model_card_carries_the_lineage(versions, tmp_path, base_dir):
    settings, engine = versions
    with Session(engine) as s:
        export_model(settings, "rl-v2", tmp_path / "out", session=s)
    card = (tmp_path / "out" / "README.md").read_text()
    front = card.split("---")[1]
    assert "license: apache-2.0" in front and f"base_model: {base_dir}" in front
    for expected in (
        "### base-v0",
        "### sft-v1",
        "### rl-v2 (policy, round 1)",
        "algorithm: ppo",
        "reward model: `rm-v1`",
        "SFT data: dolly.jsonl",
        "kl_coef: 0.05",
        "| reward | 0.750 | 0.250 |",
        "## Intended use",
    ):
        assert expected in card, expected
    assert card.index("### base-v0") < card.index("### sft-v1") < card.index("### rl-v2")


@needs_gguf
def test_gguf_export_runs_in_llama_cpp(versions, tmp_path, capsys):
    settings, engine = versions
    with Session(engine) as s:
        registered = resolve("rl-v2", settings=settings, session=s)
        prompt_ids = render(registered.tokenizer, MESSAGES)
        expected = greedy_hf(registered.model, registered.tokenizer)
        result = export_model(settings, "rl-v2", tmp_path / "f16", session=s, fmt="gguf", quant="f16")
    assert set(result.files) == {"f16-f16.gguf", "Modelfile", "README.md"}
    from gguf import GGUFReader

    fields = GGUFReader(result.gguf).fields
    assert "<|im_start|>" in fields["tokenizer.chat_template"].contents()
    assert fields["general.license"].contents() == "apache-2.0"
    modelfile = (tmp_path / "f16" / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./f16-f16.gguf") and 'PARAMETER stop "<|im_end|>"' in modelfile

    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(result.gguf), n_ctx=256, n_threads=2, verbose=False)
    text = registered.tokenizer.decode(prompt_ids)
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == prompt_ids  # same tokenizer
    del llm
    assert greedy_llama_cpp(result.gguf, prompt_ids)[:8] == expected[:8]

    agreement = {}
    for quant in ("q8_0", "q4_k_m"):
        with Session(engine) as s:
            r = export_model(settings, "rl-v2", tmp_path / quant, session=s, fmt="gguf", quant=quant)
        assert r.gguf.name == f"{quant}-{quant}.gguf" and r.gguf.stat().st_size > 0
        got = greedy_llama_cpp(r.gguf, prompt_ids)
        agreement[quant] = sum(a == b for a, b in zip(got, expected, strict=True)) / len(expected)
    with capsys.disabled():  # reported, not asserted: quantisation is lossy
        print(f"\ngreedy-token agreement with the registered version: {agreement}")


def test_noncommercial_base_is_refused_without_the_override(workspace, tmp_path, base_dir):
    settings, engine, _ = workspace
    nc = tmp_path / "nc"
    shutil.copytree(base_dir, nc)
    (nc / "README.md").write_text("---\nlicense: cc-by-nc-4.0\n---\n")
    with Session(engine) as s:
        crud.register_model(s, name="nc-v0", kind="policy", base=str(nc), path=str(nc))
        s.commit()
        with pytest.raises(AlignloopError, match="forbids commercial use"):
            export_model(settings, "nc-v0", tmp_path / "out", session=s)
        assert not (tmp_path / "out").exists()
        result = export_model(settings, "nc-v0", tmp_path / "out", session=s, accept_licence=True)
    assert "license: cc-by-nc-4.0" in (result.out / "README.md").read_text()


def test_bad_input_gives_one_line_and_writes_nothing(workspace, tmp_path, capsys):
    settings, _, _ = workspace
    ws = ["--workspace", str(settings.workspace)]
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    cases = [
        (["export", "model", "no-such-model", str(tmp_path / "a")], "not found"),
        (["export", "model", "default", str(taken)], "already exists"),
        (["export", "model", "default", str(tmp_path / "missing" / "x")], "does not exist"),
        (["export", "model", "default", str(tmp_path / "b"), "--quant", "q8_0"], "--format gguf only"),
    ]
    before = sorted(p.name for p in tmp_path.iterdir())
    for argv, reason in cases:
        assert main([*argv, *ws]) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and reason in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output, no leftover staging folder
    assert (taken / "keep.txt").read_text() == "mine" and len(list(taken.iterdir())) == 1


def test_admin_export_button_runs_a_job_and_shows_sizes(versions, workspace):
    settings, engine = versions
    password = workspace[2]
    from alignloop.web import create_app

    with TestClient(create_app(settings, engine)) as client:
        web_login(client, "admin", password)
        page = client.get("/admin/models")
        assert page.status_code == 200 and page.text.count("<button>Export</button>") == 4  # default + 3
        response = client.post(
            "/admin/models/export", data={"ref": "sft-v1", "choice": "hf"}, follow_redirects=False
        )
        assert response.status_code == 303
        job_id = int(re.search(r"/admin/jobs/(\d+)", response.headers["location"]).group(1))
        deadline = time.time() + 600
        while time.time() < deadline:
            with Session(engine) as s:
                if s.get(Run, job_id).status != "running":
                    break
            time.sleep(0.5)
        job = client.get(f"/api/jobs/{job_id}").json()
        assert job["status"] == "succeeded", job["log"]
        assert "run it:" in job["log"]
        page = client.get("/admin/models").text
        assert re.search(r"sft-v1-hf-\d{8}-\d{6}", page) and re.search(
            r"model\.safetensors: [\d.]+ MiB", page
        )
        assert client.post("/admin/models/export", data={"ref": "sft-v1", "choice": "zip"}).status_code == 400
