"""Take a model home: any version (or `default`) as standalone merged weights or as GGUF, with its model card.

    alignloop export model REF OUT --format hf|gguf [--quant f16|q8_0|q4_k_m]

- ``hf``: the adapter stack is merged into the base (each RLHF round's LoRA on top of the one before, as the
  registry loads it) and saved as safetensors with the tokenizer, its chat template and the generation config,
  so `AutoModelForCausalLM.from_pretrained(OUT)` loads it without alignloop.
- ``gguf``: the same merged folder is converted by llama.cpp's own converter (`convert_hf_to_gguf.py` with its
  `conversion/` package and `gguf-py`, taken from the pinned llama-cpp-python sdist by `make gguf`, see
  `install_converter`) to f16 or q8_0; q4_k_m is quantised from the f16 file by llama.cpp itself
  (`llama_model_quantize`, from the optional `llama-cpp-python` extra). The converter writes the chat template
  and the licence (from the model card) into the GGUF metadata. An Ollama `Modelfile` sits beside it.
- Both carry a `README.md` model card with YAML front matter (licence, base model) and the lineage read from
  the database: every version from the base up, the run that made it (algorithm, config), the reward model it
  was optimised against, the rounds and how many votes those reward models learned from, SFT data, and the
  latest `rl eval` figures.

Invariants:
- Nothing is written to OUT unless the whole export worked: files go to a hidden folder beside OUT, which is
  renamed into place at the end; a bad reference, format, quant or OUT raises `AlignloopError` first.
- `session` is only read, and its transaction is ended (rolled back) before the slow part.
- A base whose licence forbids commercial use is refused unless the same override as loading is given
  (`allow_noncommercial` in the workspace config, or `accept_licence=True` / `--allow-noncommercial`).
- The converter runs in a subprocess: its vendored `gguf-py` must match it exactly and may differ from the
  `gguf` package this process imported (the registry reads GGUF licences with that one).

Trade-offs: the HF export keeps the weights in float32, as the registry loads and trains them, so greedy
decoding is identical to the registered version; bf16 would halve the size at the cost of that guarantee.
The GGUF quantisations are lossy; tests assert token equality only at f16 and report agreement below.
Sources: llama.cpp `convert_hf_to_gguf.py` and `tools/quantize`; Ollama's Modelfile reference; the Hugging Face
model card spec (YAML front matter: `license`, `base_model`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from sqlmodel import Session, col, func, select

from alignloop.core import AlignloopError, crud, devices
from alignloop.core.config import Settings
from alignloop.core.models import ModelVersion, Run, Vote
from alignloop.core.registry import DEFAULT_REF, ModelSource, load_causal_lm, locate

log = logging.getLogger(__name__)

FORMATS = ("hf", "gguf")
QUANTS = ("f16", "q8_0", "q4_k_m")
LLAMA_CPP_PYTHON = "0.3.36"  # the sdist the converter is taken from; keep equal to the Makefile's pin
CONVERTER_ENV = "ALIGNLOOP_GGUF_CONVERTER"  # a folder holding convert_hf_to_gguf.py, conversion/, gguf-py/
# The members of the llama-cpp-python sdist that make up llama.cpp's converter (MIT, like llama.cpp).
CONVERTER_MEMBERS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")


@dataclass
class ExportResult:
    ref: str
    out: Path
    fmt: str
    quant: str | None
    licence: str | None
    files: dict[str, int] = field(default_factory=dict)  # file name -> bytes

    @property
    def gguf(self) -> Path | None:
        return next((self.out / n for n in self.files if n.endswith(".gguf")), None)

    def how_to_run(self) -> list[str]:
        if self.fmt == "hf":
            return [
                f'python -c "from transformers import pipeline; '
                f"print(pipeline('text-generation', '{self.out}')([{{'role': 'user', 'content': 'Hi!'}}]))\"",
            ]
        name = self.out.name.lower().replace("_", "-")
        return [
            f"llama-cli -m {self.gguf} -cnv",
            f"cd {self.out} && ollama create {name} -f Modelfile && ollama run {name}",
        ]


def export_model(
    settings: Settings,
    ref: str,
    out: str | Path,
    *,
    session: Session | None = None,
    fmt: str = "hf",
    quant: str = "f16",
    accept_licence: bool = False,
) -> ExportResult:
    """Write model version `ref` to the new folder `out` (see the module docstring); returns what was written."""
    if fmt not in FORMATS:
        raise AlignloopError(f"format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    if quant not in QUANTS:
        raise AlignloopError(f"quant must be one of {', '.join(QUANTS)}, not {quant!r}")
    if fmt == "hf" and quant != "f16":
        raise AlignloopError("--quant applies to --format gguf only (hf keeps the float32 weights)")
    out = Path(out).expanduser().absolute()
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise AlignloopError(f"{out} already exists; choose a new or empty folder")
    if not out.parent.is_dir():
        raise AlignloopError(f"{out.parent} does not exist; create it first")
    if not os.access(out.parent, os.W_OK):
        raise AlignloopError(f"{out.parent} is not writable")
    allow = accept_licence or settings.allow_noncommercial
    source = locate(ref, settings=settings, session=session, allow_noncommercial=allow)
    converter = find_converter() if fmt == "gguf" else None
    if fmt == "gguf" and quant == "q4_k_m":
        _llama_cpp()  # fails now, before the slow part, if the extra is missing

    card = model_card(session, source, fmt=fmt, quant=quant if fmt == "gguf" else None)
    if session is not None:
        # The database is done with. On SQLite every transaction holds the write lock (BEGIN IMMEDIATE), so a
        # read transaction left open through minutes of merging and converting would stall the server.
        session.rollback()
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        merged = staging / "hf" if fmt == "gguf" else staging
        _write_hf(source, merged, card)
        if fmt == "gguf":
            gguf_dir = staging / "gguf"
            gguf_dir.mkdir()
            gguf_file = _write_gguf(converter, merged, gguf_dir, name=out.name, quant=quant)
            (gguf_dir / "README.md").write_text(card, encoding="utf-8")
            (gguf_dir / "Modelfile").write_text(modelfile(merged, gguf_file.name), encoding="utf-8")
            shutil.rmtree(merged)
            final = gguf_dir
        else:
            final = staging
        if out.exists():
            out.rmdir()  # the empty folder the user named
        final.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    files = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}
    return ExportResult(
        ref=ref, out=out, fmt=fmt, quant=quant if fmt == "gguf" else None, licence=source.licence, files=files
    )


# --- merged Hugging Face folder ------------------------------------------------------------------------------


def _write_hf(source: ModelSource, out: Path, card: str) -> None:
    # Merged weights are written in float32 on the CPU whatever this machine serves with (devices policy).
    loaded = load_causal_lm(source, placement=devices.Placement(device="cpu", dtype="float32"))
    model = loaded.model
    if hasattr(model, "merge_and_unload"):
        if getattr(getattr(model, "active_peft_config", None), "is_prompt_learning", False):
            raise AlignloopError(
                f"{source.ref!r} is a prompt-learning adapter (virtual tokens), which cannot be merged into "
                "weights; export its base, or train a LoRA adapter instead"
            )
        model = model.merge_and_unload()
    tokenizer = loaded.tokenizer
    # The turn-ending tokens the registry's engine stops at, so `generate()` elsewhere stops at the same place.
    stops = sorted(
        {
            i
            for i in _as_list(model.generation_config.eos_token_id) + [tokenizer.eos_token_id]
            if i is not None
        }
    )
    model.generation_config.eos_token_id = stops[0] if len(stops) == 1 else stops
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "README.md").write_text(card, encoding="utf-8")


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


# --- GGUF ----------------------------------------------------------------------------------------------------


def converter_home() -> Path:
    """Where `install_converter` puts llama.cpp's converter: beside this Python's packages (the venv)."""
    return Path(sys.prefix) / "share" / "alignloop" / f"llama.cpp-convert-{LLAMA_CPP_PYTHON}"


def find_converter() -> Path:
    home = Path(os.environ.get(CONVERTER_ENV) or converter_home())
    if not (home / "convert_hf_to_gguf.py").is_file() or not (home / "gguf-py" / "gguf").is_dir():
        raise AlignloopError(
            f"GGUF export needs llama.cpp's converter, not found in {home}: run `make gguf` (it installs the "
            "`gguf` extra and unpacks the converter), or set " + CONVERTER_ENV
        )
    return home


def install_converter(sdist: str | Path, dest: Path | None = None) -> Path:
    """Unpack llama.cpp's converter (convert_hf_to_gguf.py, conversion/, gguf-py/) from a llama-cpp-python sdist."""
    dest = dest or converter_home()
    prefix = None
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            parts = member.name.split("/vendor/llama.cpp/", 1)
            if len(parts) != 2 or not parts[1].startswith(CONVERTER_MEMBERS):
                continue
            prefix = parts[0]
            if member.isfile():
                target = tmp / parts[1]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(tar.extractfile(member).read())
    if prefix is None or not (tmp / "convert_hf_to_gguf.py").is_file():
        shutil.rmtree(tmp, ignore_errors=True)
        raise AlignloopError(f"{sdist} holds no vendor/llama.cpp/convert_hf_to_gguf.py")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def _write_gguf(converter: Path, merged: Path, out_dir: Path, *, name: str, quant: str) -> Path:
    outtype = "q8_0" if quant == "q8_0" else "f16"
    converted = out_dir / f"{name}-{outtype}.gguf"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(converter / "gguf-py"), str(converter)]),
        "NO_LOCAL_GGUF": "",
        "HF_HUB_OFFLINE": "1",
    }
    done = subprocess.run(
        [
            sys.executable,
            str(converter / "convert_hf_to_gguf.py"),
            str(merged),
            "--outfile",
            str(converted),
            "--outtype",
            outtype,
            "--model-name",
            name,
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        reason = _last_error(done.stderr + done.stdout)
        raise AlignloopError(f"llama.cpp's converter failed: {reason}")
    if quant != "q4_k_m":
        return converted
    quantised = out_dir / f"{name}-q4_k_m.gguf"
    quantize(converted, quantised, "q4_k_m")
    converted.unlink()
    return quantised


def _last_error(output: str) -> str:
    lines = [line for line in output.strip().splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or "error" in line]
    return (errors or lines or ["no output"])[-1][:400]


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise AlignloopError(
            "this needs llama-cpp-python (the `gguf` extra): run `make gguf` or `pip install 'alignloop[gguf]'`"
        ) from None
    return llama_cpp


def quantize(src: Path, dst: Path, quant: str) -> None:
    """llama.cpp's own quantiser (tools/quantize) through llama-cpp-python."""
    llama_cpp = _llama_cpp()
    ftype = {"q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M}[quant]
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = os.cpu_count() or 1
    code = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if code != 0 or not dst.is_file():
        raise AlignloopError(f"llama.cpp could not quantise {src.name} to {quant} (code {code})")


def modelfile(model_dir: Path, gguf_name: str) -> str:
    """An Ollama Modelfile. ChatML models get an explicit TEMPLATE (Ollama's Go templates cannot run the Jinja
    template in the GGUF); others rely on Ollama reading the template from the GGUF metadata."""
    config = _read_json(model_dir / "tokenizer_config.json")
    template = config.get("chat_template") or ""
    jinja = model_dir / "chat_template.jinja"
    if not template and jinja.is_file():
        template = jinja.read_text(encoding="utf-8")
    generation = _read_json(model_dir / "generation_config.json")
    lines = [f"FROM ./{gguf_name}", ""]
    if "<|im_start|>" in template:
        lines += [
            'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}',
            "{{ .Content }}<|im_end|>",
            "{{ end }}<|im_start|>assistant",
            '"""',
            'PARAMETER stop "<|im_end|>"',
        ]
    else:
        lines.append("# the chat template is read from the GGUF metadata (tokenizer.chat_template)")
    for key, parameter in (("temperature", "temperature"), ("top_p", "top_p")):
        if generation.get(key) is not None:
            lines.append(f"PARAMETER {parameter} {generation[key]}")
    return "\n".join(lines) + "\n"


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


# --- model card ----------------------------------------------------------------------------------------------


def model_card(session: Session | None, source: ModelSource, *, fmt: str, quant: str | None) -> str:
    """README.md with YAML front matter (licence, base model) and the lineage the database records."""
    chain = _version_chain(session, source.ref)
    root = source
    while root.base is not None:
        root = root.base
    base_ref = chain[0].base if chain else root.ref
    if base_ref == DEFAULT_REF:
        base_ref = "HuggingFaceTB/SmolLM2-135M-Instruct"
    front = {
        "license": source.licence or "other",
        "base_model": base_ref,
        "library_name": "gguf" if fmt == "gguf" else "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["alignloop", "rlhf"] + (["gguf", quant] if fmt == "gguf" else []),
    }
    lines = [f"---\n{yaml.safe_dump(front, sort_keys=False)}---", f"# {source.ref}", ""]
    what = f"GGUF ({quant})" if fmt == "gguf" else "merged safetensors (float32)"
    lines += [f"Exported by alignloop as {what}. Base model: `{base_ref}`, licence `{source.licence}`.", ""]
    lines += ["## Lineage", ""]
    if not chain:
        lines += [f"No training recorded: this is the base model `{root.ref}` itself.", ""]
    for version in chain:
        lines += _version_section(session, version)
    lines += ["## Evaluation", ""]
    lines += _eval_lines(session, source.ref)
    lines += [
        "## Intended use",
        "",
        "A small chat model aligned on one team's preferences with alignloop (human and AI votes, a reward "
        "model, RLHF rounds). For research, demos and the use its annotators had in mind; it inherits the "
        "limitations and licence of its base model, has had no safety review beyond its own votes, and should "
        "not be relied on for facts, medical, legal or financial advice.",
        "",
    ]
    return "\n".join(lines)


def _version_chain(session: Session | None, ref: str) -> list[ModelVersion]:
    """The registered versions from the first (closest to the base) to `ref`, following `parent_id`."""
    if session is None:
        return []
    version = session.exec(select(ModelVersion).where(ModelVersion.name == ref)).first()
    chain = []
    while version is not None and version not in chain:
        chain.append(version)
        version = session.get(ModelVersion, version.parent_id) if version.parent_id else None
    return chain[::-1]


def _version_section(session: Session, version: ModelVersion) -> list[str]:
    run = session.get(Run, version.run_id) if version.run_id else None
    head = f"### {version.name} ({version.kind}" + (
        f", round {version.round}" if version.round is not None else ""
    )
    lines = [head + ")", "", f"- from `{version.base}`" + (f", run {run.id} ({run.kind})" if run else "")]
    if run is not None:
        config = dict(run.config)
        algo = config.pop("algo", None)
        if algo:
            lines.append(f"- algorithm: {algo}")
        if config.get("data"):
            lines.append(f"- SFT data: {', '.join(map(str, config['data']))}")
        reward = config.get("reward_model")
        if reward:
            lines.append(f"- reward model: `{reward}`" + _reward_votes(session, reward))
        comparisons = config.pop("comparison_ids", None)
        if comparisons is not None:
            lines.append(
                f"- learned from {len(comparisons)} comparisons, {_count_votes(session, comparisons)} votes"
            )
        config.pop("job", None)
        lines += ["- config:", "", "```yaml", yaml.safe_dump(config, sort_keys=True).strip(), "```"]
    figures = {
        k: v for k, v in version.metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)
    }
    if figures:
        lines.append("- figures: " + ", ".join(f"{k} {_fmt(v)}" for k, v in sorted(figures.items())))
    return lines + [""]


def _reward_votes(session: Session, name: str) -> str:
    reward = session.exec(select(ModelVersion).where(ModelVersion.name == name)).first()
    run = session.get(Run, reward.run_id) if reward is not None and reward.run_id else None
    if run is None or "comparison_ids" not in run.config:
        return ""
    ids = run.config["comparison_ids"]
    rounds = reward.metrics.get("rounds") or ([reward.round] if reward.round is not None else [])
    where = f", rounds {', '.join(map(str, rounds))}" if rounds else ""
    return f" (run {run.id}: {len(ids)} comparisons, {_count_votes(session, ids)} votes{where})"


def _count_votes(session: Session, comparison_ids: list[int]) -> int:
    if not comparison_ids:
        return 0
    return session.exec(select(func.count(Vote.id)).where(col(Vote.comparison_id).in_(comparison_ids))).one()


def _eval_lines(session: Session | None, ref: str) -> list[str]:
    if session is None:
        return ["No evaluation recorded.", ""]
    evals = session.exec(
        select(Run).where(Run.kind == "eval", Run.status == "succeeded").order_by(col(Run.id).desc())
    ).all()
    latest = next((r for r in evals if r.metrics.get("policy") == ref), None)
    if latest is None:
        return [f"No `alignloop rl eval` of `{ref}` recorded yet.", ""]
    m = latest.metrics
    return [
        f"Latest `alignloop rl eval` (run {latest.id}) against `{m.get('baseline')}` on {m.get('prompts')} "
        f"held-out prompts, reward model `{m.get('reward_model')}`:",
        "",
        "| | this model | baseline |",
        "| --- | --- | --- |",
        f"| reward | {_fmt(m.get('reward'))} | {_fmt(m.get('baseline_reward'))} |",
        f"| length (tokens) | {_fmt(m.get('length'))} | {_fmt(m.get('baseline_length'))} |",
        "",
        f"KL to baseline {_fmt(m.get('kl_to_baseline'))}; win rate by judge `{m.get('judge')}`: "
        f"{_fmt(m.get('win_rate_by_judge'))}.",
        "",
    ]


def _fmt(value) -> str:
    return "–" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


# --- recording, for serving --------------------------------------------------------------------------------


def record_export(session: Session, result: ExportResult) -> Run:
    """Record a finished export as a `Run` of kind "export": `alignloop serve` runs a version from its recorded
    GGUF in llama.cpp (`serve/backend.py`). The caller commits."""
    run = crud.create_run(
        session, kind="export", config={"ref": result.ref, "format": result.fmt, "quant": result.quant}
    )
    metrics = {"out": str(result.out), "files": result.files}
    if result.gguf is not None:
        metrics["gguf"] = str(result.gguf)
    return crud.finish_run(session, run=run, status="succeeded", metrics=metrics)


# --- listing (for /admin) ------------------------------------------------------------------------------------


def exports_dir(settings: Settings) -> Path:
    return settings.workspace / "exports"


def list_exports(settings: Settings) -> list[tuple[str, dict[str, int]]]:
    """Finished exports under the workspace's exports/ folder: (folder name, {file: bytes})."""
    root = exports_dir(settings)
    if not root.is_dir():
        return []
    return [
        (d.name, {f.name: f.stat().st_size for f in sorted(d.iterdir()) if f.is_file()})
        for d in sorted(root.iterdir())
        if d.is_dir() and not d.name.startswith(".")
    ]


def main(argv: list[str] | None = None) -> int:
    """`python -m serve.export install-converter SDIST`: used by `make gguf`."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] != "install-converter":
        print(
            "usage: python -m serve.export install-converter LLAMA_CPP_PYTHON_SDIST.tar.gz", file=sys.stderr
        )
        return 2
    print(f"llama.cpp converter unpacked into {install_converter(args[1])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
