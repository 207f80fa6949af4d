"""The device and dtype policy (alignloop.core.devices): what a machine with given abilities picks, overrides from
the command line and config.yaml, refusals, memory estimates, and scoring on the policy's device."""

import json

import pytest
import torch
from sqlmodel import Session, select

from alignloop.cli import main
from alignloop.core import AlignloopError, devices, registry
from alignloop.core.config import load_settings, write_settings
from alignloop.core.devices import Capabilities, Placement, pick
from alignloop.core.models import Run

H100 = Capabilities(cuda=True, cuda_bf16=True, cpu_bf16=True)
T4 = Capabilities(cuda=True, cuda_bf16=False, cpu_bf16=False)  # a GPU without native bf16
SAPPHIRE_RAPIDS = Capabilities(cuda=False, cpu_bf16=True)  # AMX: bf16 native on the CPU
OLD_CPU = Capabilities(cuda=False, cpu_bf16=False)


@pytest.mark.parametrize(
    "caps, expected",
    [
        (H100, Placement("cuda", "bfloat16")),
        (T4, Placement("cuda", "float32")),
        (SAPPHIRE_RAPIDS, Placement("cpu", "bfloat16")),
        (OLD_CPU, Placement("cpu", "float32")),
    ],
)
def test_auto_picks_the_gpu_and_bf16_only_where_native(caps, expected):
    assert pick(caps=caps) == expected


def test_explicit_choices_override_the_machine():
    assert pick("cpu", caps=H100) == Placement("cpu", "bfloat16")  # the CPU's own bf16 ability decides
    assert pick("cpu", caps=T4) == Placement("cpu", "float32")
    assert pick("auto", "float32", caps=H100) == Placement("cuda", "float32")
    assert pick("cuda:1", "float16", caps=T4) == Placement("cuda:1", "float16")
    assert pick("auto", "auto", "4bit", caps=H100) == Placement("cuda", "bfloat16", "4bit")


@pytest.mark.parametrize(
    "args, message",
    [
        (("cuda",), "has no CUDA GPU"),
        (("auto", "auto", "4bit"), "4bit loading needs a CUDA GPU"),
        (("auto", "half"), "dtype must be one of"),
        (("tpu",), "device must be auto, cpu, cuda"),
        (("auto", "auto", "2bit"), "quantize must be one of"),
    ],
)
def test_impossible_choices_are_refused_in_one_line(args, message):
    with pytest.raises(AlignloopError, match=message) as info:
        pick(*args, caps=OLD_CPU)
    assert "\n" not in str(info.value)


def test_config_yaml_sets_device_dtype_and_per_model_quantization(workspace):
    settings, _, _ = workspace
    settings.quantize = {"big-8b": "4bit"}
    settings.dtype = "float32"
    write_settings(settings)
    settings = load_settings(settings.workspace)
    assert devices.placement(settings, "big-8b", caps=H100) == Placement("cuda", "float32", "4bit")
    assert devices.placement(settings, "small", caps=H100) == Placement("cuda", "float32")
    assert devices.placement(settings, "small", dtype="bfloat16", caps=H100).dtype == "bfloat16"
    # Training keeps float32 master weights for Accelerate to place; a quantized base goes on the GPU.
    assert devices.for_training(settings, "small", caps=H100) == Placement("cpu", "float32")
    assert devices.for_training(settings, "big-8b", caps=H100) == Placement("cuda", "bfloat16", "4bit")
    with pytest.raises(AlignloopError, match="needs a CUDA GPU"):
        devices.for_training(settings, "big-8b", caps=OLD_CPU)


def test_bad_placement_settings_in_config_yaml_are_refused(workspace):
    settings, _, _ = workspace
    config = settings.workspace / "config.yaml"
    text = config.read_text()
    for bad, message in (
        ("dtype: fp8", "dtype must be one of"),
        ("device: gpu0", "device must be"),
        ("quantize: {m: 3bit}", "quantize maps"),
        ("memory_limit_gb: -1", "memory_limit_gb"),
    ):
        config.write_text(text + bad + "\n")
        with pytest.raises(AlignloopError, match=message):
            load_settings(settings.workspace)


def test_adapter_quantization_follows_its_base(tmp_path):
    base = registry.ModelSource(ref="big-8b", path=tmp_path, licence=None)
    adapter = registry.ModelSource(ref="round1", path=tmp_path, licence=None, base=base)
    from alignloop.core.config import Settings

    settings = Settings(quantize={"big-8b": "8bit"})
    with pytest.raises(
        AlignloopError, match="8bit loading needs a CUDA GPU"
    ):  # CPU here: refused, not ignored
        registry.placement_for(adapter, settings)


def test_parameters_are_counted_from_the_safetensors_headers(tiny_model_dir, tiny_model):
    assert devices.count_parameters(tiny_model_dir) == sum(
        p.numel() for p in tiny_model.state_dict().values()
    )
    config_only = tiny_model_dir.parent / "config-only"
    config_only.mkdir()
    (config_only / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    assert devices.count_parameters(config_only) > 0  # from the config: the same order of magnitude
    n = 8_000_000_000
    assert devices.estimate_bytes(n, Placement("cuda", "bfloat16")) > 16 * devices.GIB  # an 8B model in bf16
    assert devices.estimate_bytes(n, Placement("cuda", "bfloat16", "4bit")) < 6 * devices.GIB  # ... in 4 bit


def test_loads_follow_the_policy_and_the_command_line(workspace, tiny_model_dir):
    settings, _, _ = workspace
    loaded = registry.resolve(str(tiny_model_dir), settings=settings, dtype="bfloat16")
    assert next(loaded.model.parameters()).dtype == torch.bfloat16
    assert loaded.placement == Placement("cpu", "bfloat16")
    default = registry.resolve(str(tiny_model_dir), settings=settings)
    assert default.placement == pick()  # float32 here unless this CPU does bf16 natively


def test_a_model_that_cannot_fit_is_refused_before_anything_is_written(
    workspace, tiny_model_dir, tmp_path, capsys
):
    settings, engine, _ = workspace
    ws = ["--workspace", str(settings.workspace)]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Question {i}?"}) + "\n" for i in range(3)))
    assert main(["prompts", "import", str(prompts), *ws]) == 0
    settings.memory_limit_gb = 1e-6  # about 1 KiB: far below the tiny model's weights
    write_settings(settings)
    with pytest.raises(AlignloopError, match=r"needs ~.*iB on cpu .* but only .*iB is free"):
        registry.resolve(str(tiny_model_dir), settings=load_settings(settings.workspace))
    code = main(["generate", "--model", str(tiny_model_dir), "--prompts", "2", "--max-new-tokens", "4", *ws])
    err = capsys.readouterr().err.strip()
    assert code != 0 and "needs ~" in err and len(err.splitlines()) == 1
    with Session(engine) as s:
        assert s.exec(select(Run)).all() == []  # no Run opened, nothing generated


@pytest.mark.parametrize("command", ["reward", "rl"])
def test_a_training_run_that_cannot_fit_is_refused_before_its_run_opens(
    workspace, tiny_model_dir, tmp_path, capsys, command
):
    settings, engine, _ = workspace
    ws = ["--workspace", str(settings.workspace)]
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text(
        "".join(
            json.dumps({"prompt": f"Question {i}?", "chosen": "Thank you!", "rejected": "No."}) + "\n"
            for i in range(4)
        )
    )
    assert main(["prompts", "import", str(prefs), *ws]) == 0
    settings.memory_limit_gb = 1e-6
    write_settings(settings)
    if command == "reward":
        args = [
            "reward",
            "train",
            "--config",
            "configs/reward/tiny.yaml",
            "--base",
            str(tiny_model_dir),
            "--data",
            str(prefs),
        ]
    else:  # the reward model is checked after the policy: a missing one would be the error otherwise
        args = [
            "rl",
            "train",
            "--config",
            "configs/rl/tiny.yaml",
            "--policy",
            str(tiny_model_dir),
            "--algo",
            "dpo",
        ]
    code = main([*args, *ws])
    err = capsys.readouterr().err.strip()
    assert code != 0 and "needs ~" in err and len(err.splitlines()) == 1, err
    with Session(engine) as s:
        assert s.exec(select(Run)).all() == []


def test_the_command_lines_device_reaches_the_load(workspace, tiny_model_dir, tmp_path, capsys):
    settings, engine, _ = workspace
    ws = ["--workspace", str(settings.workspace)]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "Question?"}) + "\n")
    assert main(["prompts", "import", str(prompts), *ws]) == 0
    code = main(["generate", "--model", str(tiny_model_dir), "--device", "cuda", "--prompts", "1", *ws])
    err = capsys.readouterr().err.strip()
    if torch.cuda.is_available():
        pytest.skip("a GPU machine honours --device cuda")
    assert code != 0 and "has no CUDA GPU" in err and len(err.splitlines()) == 1
    with Session(engine) as s:
        assert s.exec(select(Run)).all() == []


def test_the_environment_can_keep_a_bf16_cpu_at_float32(monkeypatch):
    native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    monkeypatch.delenv("ALIGNLOOP_CPU_BF16", raising=False)
    assert Capabilities.detect().cpu_bf16 == native
    monkeypatch.setenv("ALIGNLOOP_CPU_BF16", "0")
    assert not Capabilities.detect().cpu_bf16 and pick("cpu") == Placement("cpu", "float32")
    assert not devices.native_bf16("cpu")
