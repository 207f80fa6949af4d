"""Layer-selective tuning: only the parameters of chosen decoder layers change (the seed's "only the parameters
in specific layers ... are updated to avoid overfitting").

LoRA gets it from PEFT (`layers_to_transform`: adapters only in those layers), IA3 from a target regex
(`in_layers`; PEFT's IA3Config has no `layers_to_transform`); full fine-tuning gets it
here, by freezing every parameter outside them, embeddings and LM head included, so a full run on layers
[10, 11] updates those two blocks and nothing else. SFT (`sft.train`) and RL (`rl.ppo`, `rl.train`) share it.
Decoder blocks are found by the `.layers.<i>.` in a parameter's name, which every Llama-, Mistral-, Qwen- and
SmolLM-type model in transformers uses; a model without it is refused rather than silently trained whole.
"""

from __future__ import annotations

import re

from alignloop.core import AlignloopError

LAYER = re.compile(r"\.layers\.(\d+)\.")


def check_layers(layers: list[int] | None, num_layers: int) -> None:
    if layers is None:
        return
    if not layers or any(not isinstance(i, int) or not 0 <= i < num_layers for i in layers):
        raise AlignloopError(
            f"layers_to_transform must list layer indexes from 0 to {num_layers - 1}, not {layers}"
        )


def num_layers_of(source) -> int:
    """Decoder layers of a located model (`registry.ModelSource`); adapters count their root model's."""
    from transformers import AutoConfig

    while source.base is not None:
        source = source.base
    config = AutoConfig.from_pretrained(source.path)
    return int(getattr(config, "num_hidden_layers", 0) or getattr(config, "n_layer", 0))


def freeze_outside(model, layers: list[int]) -> int:
    """requires_grad only for the parameters of `layers`; returns how many parameters stay trainable."""
    keep = set(layers)
    trainable = 0
    for name, param in model.named_parameters():
        match = LAYER.search(name)
        param.requires_grad_(match is not None and int(match.group(1)) in keep)
        trainable += param.numel() if param.requires_grad else 0
    if trainable == 0:
        raise AlignloopError(
            f"no parameter of this model belongs to layers {layers} (no '.layers.<i>.' names)"
        )
    return trainable


def in_layers(module_names: list[str], layers: list[int]) -> str:
    """A PEFT target regex (matched against full module names) for `module_names` inside `layers` only."""
    names = "|".join(re.escape(n) for n in module_names)
    return rf".*\.layers\.({'|'.join(str(i) for i in layers)})\.(.*\.)?({names})"


def lora_targets(model, target_modules: list[str] | str, layers: list[int] | None) -> dict:
    """LoraConfig arguments for `target_modules` in `layers`. PEFT refuses `layers_to_transform` with a string
    target, so "all-linear" becomes a regex over the model's linear layers inside the chosen blocks."""
    if layers is None:
        return {"target_modules": target_modules}
    if isinstance(target_modules, list):
        return {"target_modules": target_modules, "layers_to_transform": layers}
    if target_modules != "all-linear":
        raise AlignloopError("with layers_to_transform, give target_modules as a list of module names")
    import torch

    linear = sorted(
        {
            n.rsplit(".", 1)[-1]
            for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and LAYER.search(n + ".")
        }
    )
    return {"target_modules": in_layers(linear, layers)}
