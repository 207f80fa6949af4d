"""Where a model goes and in what precision: one policy for every load (generation, serving, judge, reward
scoring, evaluation, training bases), plus a memory estimate that refuses a load before it runs out.

    placement = devices.placement(settings, ref, device=args.device, dtype=args.dtype)
    devices.check_fits(ref, devices.estimate_bytes(source.path, placement), placement, settings)

Policy (`pick`), in order of who decides: the command's `--device` / `--dtype`, then `config.yaml`'s `device`,
`dtype` and per-model `quantize`, then the machine:
- device "auto" is the first CUDA GPU when there is one, else the CPU;
- dtype "auto" is bfloat16 where that device does bf16 matrix products natively (Ampere and later GPUs; CPUs
  with AVX512-BF16 or AMX, where oneDNN runs them about twice as fast as float32), else float32. bf16 keeps
  float32's exponent range, so no loss scaling is needed; float16 is offered only when asked for;
- quantize "4bit" (NF4, bf16 compute: QLoRA) or "8bit" (LLM.int8) loads through bitsandbytes, which needs
  CUDA: on a machine without it the load is refused with one line instead of falling back silently.
Training keeps float32 master weights (`for_training`): the trainers autocast to bf16 themselves, and an
optimizer stepping bf16 weights loses small updates to rounding.

The machine's abilities come in as a `Capabilities` value, so tests can ask "what would a GPU machine pick"
on a CPU. `ALIGNLOOP_CPU_BF16=0` in the environment makes a bf16-capable CPU count as float32-only (every
"auto" load and every trainer's autocast then runs float32): for results that must not depend on the chip,
such as the test suite, which pins it so that its exactness checks hold on AVX512-BF16 / AMX machines and AVX2
ones alike. Memory estimates count parameters from the safetensors headers (exact, no weights read), else from
config.json; they are estimates (activations and KV cache are a fixed share on top), meant to turn a certain
OOM ten minutes into a run into a one-line refusal before it starts.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from alignloop.core import AlignloopError

log = logging.getLogger(__name__)

DTYPES = ("auto", "float32", "bfloat16", "float16")
QUANTIZE = ("none", "4bit", "8bit")
BYTES_PER_PARAM = {"float32": 4.0, "bfloat16": 2.0, "float16": 2.0, "4bit": 0.5 + 0.07, "8bit": 1.0 + 0.03}
# Activations, KV cache and allocator slack on top of the weights when only running the model.
INFERENCE_OVERHEAD = 1.2
# Per trainable parameter when training: float32 weight, gradient and two AdamW moments.
TRAIN_BYTES_PER_TRAINABLE = 16.0
GIB = 2**30
CPU_BF16_ENV = "ALIGNLOOP_CPU_BF16"  # "0": treat the CPU as float32-only (see the module's docstring)


@dataclass(frozen=True)
class Capabilities:
    """What this machine can do, as far as placement cares."""

    cuda: bool
    cuda_bf16: bool = False
    cpu_bf16: bool = False

    @classmethod
    def detect(cls) -> Capabilities:
        import torch

        cuda = torch.cuda.is_available()
        return cls(
            cuda=cuda,
            cuda_bf16=cuda and torch.cuda.is_bf16_supported(including_emulation=False),
            cpu_bf16=os.environ.get(CPU_BF16_ENV, "").strip().lower() not in ("0", "false", "no", "off")
            and bool(getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)()),
        )


@dataclass(frozen=True)
class Placement:
    device: str  # "cpu", "cuda", "cuda:1"
    dtype: str  # one of DTYPES but "auto"
    quantize: str = "none"  # one of QUANTIZE

    @property
    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)

    @property
    def is_cuda(self) -> bool:
        return self.device.startswith("cuda")

    def describe(self) -> str:
        return f"{self.device} {self.dtype}" + (f" {self.quantize}" if self.quantize != "none" else "")


def autocast_bf16(configured: bool | None) -> bool:
    """A trainer's `bf16` setting resolved: as configured, else (None) where this machine does bf16 natively."""
    return native_bf16() if configured is None else configured


def native_bf16(device: str = "auto", caps: Capabilities | None = None) -> bool:
    """Does `device` do bf16 matrix products natively? (reward/sft training use this for autocast too)."""
    caps = caps or Capabilities.detect()
    if device == "auto":
        device = "cuda" if caps.cuda else "cpu"
    return caps.cuda_bf16 if device.startswith("cuda") else caps.cpu_bf16


def pick(
    device: str | None = "auto",
    dtype: str | None = "auto",
    quantize: str | None = "none",
    *,
    caps: Capabilities | None = None,
) -> Placement:
    """The placement for these (possibly "auto") choices on a machine with `caps`; bad choices are refused."""
    device, dtype, quantize = device or "auto", dtype or "auto", quantize or "none"
    if device.startswith("cpu:"):  # Accelerate names a process's CPU "cpu:0" in a multi-process group
        device = "cpu"
    if dtype not in DTYPES:
        raise AlignloopError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    if quantize not in QUANTIZE:
        raise AlignloopError(f"quantize must be one of {', '.join(QUANTIZE)}, not {quantize!r}")
    if device != "auto" and device != "cpu" and not _is_cuda_name(device):
        raise AlignloopError(f"device must be auto, cpu, cuda or cuda:N, not {device!r}")
    caps = caps or Capabilities.detect()
    if device == "auto":
        device = "cuda" if caps.cuda else "cpu"
    if device.startswith("cuda") and not caps.cuda:
        raise AlignloopError(
            f"device {device!r} asked for, but this machine has no CUDA GPU (use --device cpu)"
        )
    if quantize != "none" and not device.startswith("cuda"):
        raise AlignloopError(
            f"{quantize} loading needs a CUDA GPU (bitsandbytes); on {device} set quantize: none for this model"
        )
    if dtype == "auto":
        dtype = "bfloat16" if native_bf16(device, caps) else "float32"
    return Placement(device=device, dtype=dtype, quantize=quantize)


def _is_cuda_name(device: str) -> bool:
    head, _, index = device.partition(":")
    return head == "cuda" and (index == "" or index.isdigit())


def placement(
    settings,
    ref: str | None = None,
    *,
    device: str | None = None,
    dtype: str | None = None,
    quantize: str | None = None,
    caps: Capabilities | None = None,
) -> Placement:
    """Inference placement for model `ref`: the command's choices over config.yaml's over the machine's."""
    chosen_quantize = quantize or (settings.quantize.get(ref, "none") if ref is not None else "none")
    return pick(device or settings.device, dtype or settings.dtype, chosen_quantize, caps=caps)


def for_training(
    settings, ref: str | None = None, *, quantize: str | None = None, caps: Capabilities | None = None
) -> Placement:
    """A base to train on: float32 master weights where the trainer puts them (accelerate moves unquantized
    models itself); a 4/8-bit base (QLoRA) must be loaded on the GPU, in bf16 compute where it is native."""
    chosen = quantize or (settings.quantize.get(ref, "none") if ref is not None else "none")
    if chosen == "none":
        return Placement(device="cpu", dtype="float32")
    quantized = pick(settings.device, "auto", chosen, caps=caps)
    return Placement(device=quantized.device, dtype=quantized.dtype, quantize=chosen)


def quantization_config(placement: Placement):
    """bitsandbytes settings for a quantized placement (None for a plain one)."""
    if placement.quantize == "none":
        return None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise AlignloopError(
            f"{placement.quantize} loading needs bitsandbytes: pip install bitsandbytes"
        ) from None
    from transformers import BitsAndBytesConfig

    if placement.quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=placement.torch_dtype,
    )


def load_kwargs(placement: Placement) -> dict:
    """Keyword arguments for `from_pretrained` that load straight onto the placement (no float32 CPU copy)."""
    kwargs = {"dtype": placement.torch_dtype}
    if placement.quantize != "none":
        kwargs["quantization_config"] = quantization_config(placement)
    if placement.is_cuda:
        kwargs["device_map"] = {"": placement.device}
    return kwargs


# --- memory --------------------------------------------------------------------------------------------------


def count_parameters(path: Path) -> int | None:
    """Parameters of the model at `path`, from its safetensors headers (no weights read), else config.json."""
    path = Path(path)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else []
    if files:
        total = 0
        for file in files:
            with open(file, "rb") as f:
                (size,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(size))
            for name, entry in header.items():
                if name != "__metadata__":
                    numel = 1
                    for dim in entry["shape"]:
                        numel *= dim
                    total += numel
        return total
    config_file = path / "config.json" if path.is_dir() else None
    if config_file is None or not config_file.is_file():
        return None
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config = config.get("text_config", config)
    hidden, layers = config.get("hidden_size"), config.get("num_hidden_layers")
    vocab, inter = config.get("vocab_size"), config.get("intermediate_size") or 4 * (hidden or 0)
    if not (hidden and layers and vocab):
        return None
    return layers * (4 * hidden * hidden + 3 * hidden * inter) + vocab * hidden  # attention + MLP, embeddings


def estimate_bytes(num_params: int, placement: Placement, *, trainable: int = 0) -> int:
    """Memory a model of `num_params` needs on its device: weights in the placement's precision times the
    inference overhead, plus float32 weight, gradient and AdamW moments for each trainable parameter."""
    per_param = BYTES_PER_PARAM[placement.quantize if placement.quantize != "none" else placement.dtype]
    return int(num_params * per_param * INFERENCE_OVERHEAD + trainable * TRAIN_BYTES_PER_TRAINABLE)


def available_bytes(device: str, settings=None) -> int:
    """Free memory on `device` (a GPU's free memory, or the host's available RAM), capped by `memory_limit_gb`."""
    limit = getattr(settings, "memory_limit_gb", None)
    if device.startswith("cuda"):
        import torch

        index = int(device.partition(":")[2] or torch.cuda.current_device())
        free = torch.cuda.mem_get_info(index)[0]
    else:
        free = _host_available()
    return min(free, int(limit * GIB)) if limit else free


def _host_available() -> int:
    try:
        import psutil

        return psutil.virtual_memory().available
    except ImportError:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_fits(
    ref: str, path: Path, placement: Placement, settings=None, *, trainable: int = 0
) -> int | None:
    """Print the estimate and refuse (one line, nothing loaded) when it exceeds what the device has free.
    Returns the estimate in bytes, or None when the model's size cannot be read."""
    num_params = count_parameters(path)
    if num_params is None:
        return None
    need = estimate_bytes(num_params, placement, trainable=trainable)
    free = available_bytes(placement.device, settings)
    log.info(
        "memory: %s (%.2fB params) needs ~%s on %s; %s free",
        ref,
        num_params / 1e9,
        _size(need),
        placement.describe(),
        _size(free),
    )
    if need > free:
        hint = "" if placement.quantize == "4bit" else "; try quantize: 4bit for it in config.yaml"
        if not placement.is_cuda:
            hint += " or a GPU machine"
        raise AlignloopError(
            f"model {ref!r} needs ~{_size(need)} on {placement.describe()} but only {_size(free)} is free{hint}"
        )
    return need


def check_training_fits(
    ref: str, path: Path, settings, *, full: bool, caps: Capabilities | None = None
) -> int | None:
    """`check_fits` for a training run, before it opens its Run: float32 master weights (or the base's 4/8 bits)
    on the device Accelerate will use, plus weight, gradient and AdamW moments for what trains (everything
    for full fine-tuning, about 1% for LoRA)."""
    caps = caps or Capabilities.detect()
    quantize = settings.quantize.get(ref, "none")
    device = "cuda" if caps.cuda else "cpu"
    placement = Placement(device, "float32" if quantize == "none" else "bfloat16", quantize)
    num_params = count_parameters(path)
    if num_params is None:
        return None
    return check_fits(ref, path, placement, settings, trainable=num_params if full else num_params // 100)


def _size(num_bytes: float) -> str:
    return f"{num_bytes / GIB:.1f} GiB" if num_bytes >= GIB / 10 else f"{num_bytes / 2**20:.1f} MiB"
