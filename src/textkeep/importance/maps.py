"""Importance maps on disk: the contract between `importance compute` and the tools that read maps.

A map directory holds two files, written together atomically:

- `importance.safetensors`: one float32 tensor per LLM parameter, keyed and shaped exactly as the bare Hugging Face
  causal LM's `named_parameters()` (e.g. `model.layers.0.self_attn.q_proj.weight`; tied weights once). Its
  string metadata: mode, modality, n_examples, n_tokens, model, dataset, split, seed, textkeep_version (plus
  layer_prefix and n_layers, which locate the decoder layers).
- `summary.json`: sums of |I| for quick reading::

    {"meta": {...}, "total": float,
     "layers": [{"layer": i, "sum": float}, ...],
     "modules": {"q_proj": f, "k_proj": f, "v_proj": f, "o_proj": f, "gate_proj": f, "up_proj": f,
                 "down_proj": f, "norms": f, "embeddings": f, "head": f},
     "layer_modules": [{"layer": i, "q_proj": f, ..., "down_proj": f, "norms": f}, ...]}

  A parameter of no listed module type (say a bias-only adapter) is counted under "other", a key that appears
  only when it is non-zero.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from textkeep.errors import TextkeepError

WEIGHTS_FILE = "importance.safetensors"
SUMMARY_FILE = "summary.json"
META_KEYS = ("mode", "modality", "n_examples", "n_tokens", "model", "dataset", "split", "seed", "textkeep_version")
INT_META = ("n_examples", "n_tokens", "n_batches", "n_layers", "seed", "batch_size")
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MODULES = (*PROJ, "norms", "embeddings", "head")
LAYER_MODULES = (*PROJ, "norms")
_LAYERS = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass
class ImportanceMap:
    scores: dict[str, torch.Tensor]  # name → float32 tensor (CPU), the parameter's shape
    meta: dict = field(default_factory=dict)

    def save(self, out_dir: str | Path) -> Path:
        """Write `importance.safetensors` and `summary.json` into `out_dir` (replaced atomically as a whole)."""
        from safetensors.torch import save_file

        from textkeep.fileio import atomic_dir, write_json

        meta = {k: str(self.meta.get(k, "")) for k in META_KEYS} | {k: str(v) for k, v in self.meta.items()}
        with atomic_dir(out_dir) as tmp:
            save_file(
                {k: v.detach().float().contiguous().cpu() for k, v in self.scores.items()},
                str(tmp / WEIGHTS_FILE),
                metadata=meta,
            )
            write_json(tmp / SUMMARY_FILE, summarize(self))
        return Path(out_dir)

    @property
    def total(self) -> float:
        return sum(_sum(t) for t in self.scores.values())


def load_map(map_dir: str | Path) -> ImportanceMap:
    from safetensors import safe_open

    path = Path(map_dir) / WEIGHTS_FILE
    if not path.is_file():
        raise TextkeepError(
            f"'{map_dir}' holds no {WEIGHTS_FILE}; point at a directory written by `textkeep importance compute`."
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            scores = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise TextkeepError(f"'{path}' cannot be read ({e}); it is damaged: compute the map again.") from None
    for k in INT_META:
        if meta.get(k, "").lstrip("-").isdigit():
            meta[k] = int(meta[k])
    return ImportanceMap(scores, meta)


# ---- layers and module types --------------------------------------------------------------------------------------
def decoder_layers(llm: nn.Module) -> tuple[str, int]:
    """The qualified name of the decoder-layer list (`model.layers` for Llama/Qwen/Mistral) and its length.

    Found as the ModuleList inside `get_decoder()` whose length is the config's num_hidden_layers.
    """
    n = llm.config.get_text_config().num_hidden_layers
    decoder = llm.get_decoder()
    names = {id(m): name for name, m in llm.named_modules()}
    for m in decoder.modules():
        if isinstance(m, nn.ModuleList) and len(m) == n:
            return names[id(m)], n
    raise TextkeepError(
        f"no list of {n} decoder layers found in {type(llm).__name__}; this architecture is not supported by "
        "importance maps."
    )


def module_type(name: str) -> str:
    """q_proj … down_proj, norms, embeddings, head or other, from the name of the module that owns the parameter."""
    owner = name.rsplit(".", 1)[0].rsplit(".", 1)[-1]
    if owner in PROJ:
        return owner
    if "norm" in owner:
        return "norms"
    return {"embed_tokens": "embeddings", "lm_head": "head"}.get(owner, "other")


def layer_index(name: str, meta: dict | None = None) -> int | None:
    """The decoder layer a parameter belongs to (`model.layers.7.mlp.up_proj.weight` → 7), or None (embeddings,
    final norm, head). textkeep's one reading of layer numbers.

    `meta` carries `layer_prefix`, the qualified name of the decoder-layer list (a map's metadata, or
    `{"layer_prefix": decoder_layers(llm)[0]}`); without it, a `layers.N.` component is looked for, the
    Llama/Qwen/Mistral layout.
    """
    prefix = (meta or {}).get("layer_prefix")
    m = re.match(re.escape(prefix) + r"\.(\d+)\.", name) if prefix else _LAYERS.search(name)
    return int(m.group(1)) if m else None


def _n_layers(imap: ImportanceMap) -> int:
    if str(imap.meta.get("n_layers", "")).isdigit():
        return int(imap.meta["n_layers"])
    found = [layer_index(k, imap.meta) for k in imap.scores]
    return max((i for i in found if i is not None), default=-1) + 1


def _sum(t: torch.Tensor) -> float:
    return float(t.double().abs().sum())


def layer_sums(imap: ImportanceMap) -> list[float]:
    """Σ|I| of every decoder layer's parameters, in layer order (the paper's I_layer(i))."""
    sums = [0.0] * _n_layers(imap)
    for k, t in imap.scores.items():
        i = layer_index(k, imap.meta)
        if i is not None:
            sums[i] += _sum(t)
    return sums


def summarize(imap: ImportanceMap) -> dict:
    n = _n_layers(imap)
    modules = dict.fromkeys(MODULES, 0.0)
    per_layer = [{"layer": i, **dict.fromkeys(LAYER_MODULES, 0.0)} for i in range(n)]
    for k, t in imap.scores.items():
        s, kind, i = _sum(t), module_type(k), layer_index(k, imap.meta)
        modules[kind] = modules.get(kind, 0.0) + s
        if i is not None:
            per_layer[i][kind] = per_layer[i].get(kind, 0.0) + s
    if not modules.get("other"):
        modules.pop("other", None)
    return {
        "meta": imap.meta,
        "total": imap.total,
        "layers": [{"layer": i, "sum": s} for i, s in enumerate(layer_sums(imap))],
        "modules": modules,
        "layer_modules": per_layer,
    }


# ---- reading maps --------------------------------------------------------------------------------------------------
class MapFile(Mapping):
    """An importance map directory, its tensors read from disk only when asked for (an 8B map is 32 GB in fp32)."""

    def __init__(self, path: str | Path):
        from safetensors import safe_open

        self.path = Path(path)
        file = self.path / WEIGHTS_FILE
        if not file.is_file():
            raise TextkeepError(
                f"'{path}' holds no {WEIGHTS_FILE}; point at a directory written by `textkeep importance compute`."
            )
        self._file = safe_open(str(file), framework="pt")
        self.meta = dict(self._file.metadata() or {})
        self._keys = list(self._file.keys())
        self._known = set(self._keys)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._known:
            raise KeyError(name)
        return self._file.get_tensor(name).float()

    def __contains__(self, name) -> bool:
        return name in self._known

    def __iter__(self):
        return iter(self._keys)

    def __len__(self):
        return len(self._keys)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._file.get_slice(name).get_shape())

    def summary(self) -> dict:
        return read_summary(self.path)


def open_map(path: str | Path) -> MapFile:
    """A map directory, opened lazily: the one reader of maps (`load_map` reads every tensor at once)."""
    return MapFile(path)


def shape_of(scores: Mapping, name: str) -> tuple | None:
    """A score tensor's shape without reading it where the mapping allows; None when it is absent."""
    if name not in scores:
        return None
    return scores.shape(name) if isinstance(scores, MapFile) else tuple(scores[name].shape)


def decoder_names(scores: Mapping, meta: dict | None = None) -> list[str]:
    """The map's decoder-layer parameter names, sorted (the order that breaks ties in selections)."""
    meta = meta if meta is not None else getattr(scores, "meta", {})
    return sorted(k for k in scores if layer_index(k, meta) is not None)


def default_labels(paths: Sequence, labels: Sequence[str] | None) -> list[str]:
    """The given labels of map (or checkpoint) directories, checked one per path; or names from the paths:
    the directory's name (its parent's for a run's `model/`), or its last two parts where names repeat."""
    if labels:
        if len(labels) != len(paths):
            raise TextkeepError(
                f"{len(labels)} labels for {len(paths)} maps/checkpoints; give one label each, or none."
            )
        return list(labels)
    names = [Path(p).name if Path(p).name != "model" else Path(p).parent.name for p in paths]
    if len(set(names)) < len(names):  # e.g. runs/a/importance and runs/b/importance
        names = ["/".join(Path(p).parts[-2:]) for p in paths]
    return names


# ---- compatibility -------------------------------------------------------------------------------------------------
def bare_parameter_shapes(llm: nn.Module) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the bare causal LM's parameters; for a peft model, those of the merged model."""
    from textkeep.model.speech_llm import is_peft

    llm = getattr(llm, "llm", llm)  # a SpeechLLM is fine too
    if not is_peft(llm):
        return {k: tuple(p.shape) for k, p in llm.named_parameters()}
    shapes = {}
    for k, p in llm.get_base_model().named_parameters():
        if ".lora_" in k or ".modules_to_save." in k:
            continue  # the adapter's own weights; merged away
        shapes[k.replace(".base_layer.", ".").replace(".original_module.", ".")] = tuple(p.shape)
    return shapes


def check_compatible(scores, llm: nn.Module | Mapping, names=None, fix: str | None = None) -> None:
    """Raise a TextkeepError naming the first mismatches when a map does not fit the LLM parameter by parameter:
    textkeep's one check of map against model (layer-lr, deactivation, importance).

    `scores`: an ImportanceMap, a MapFile or a name → tensor mapping. `llm`: the model (a SpeechLLM or its LLM), or
    its bare parameters' shapes (name → shape) where a caller holds those already. `names`: the parameters that must
    fit (default: every parameter of the bare LLM, and then the map may hold no others). `fix`: what the user should
    do instead.
    """
    meta = getattr(scores, "meta", {})
    scores = getattr(scores, "scores", scores)
    bare = {k: tuple(v) for k, v in llm.items()} if isinstance(llm, Mapping) else bare_parameter_shapes(llm)
    want = bare if names is None else {k: bare[k] for k in names if k in bare}
    have = {k: shape_of(scores, k) for k in scores}
    missing = [k for k in want if k not in have]
    extra = [k for k in have if k not in want] if names is None else []
    shape = [f"{k} (map {have[k]}, model {want[k]})" for k in want if k in have and have[k] != want[k]]
    if not (missing or extra or shape):
        return
    problems = [
        f"{len(v)} {what}: {', '.join(v[:3])}{', …' if len(v) > 3 else ''}"
        for what, v in (("missing from the map", missing), ("not in the model", extra), ("of another shape", shape))
        if v
    ]
    model = meta.get("model") or "?"
    fix = (
        fix
        or "compute the map on this model (`textkeep importance compute --model …`) or load the model it was "
        "computed on"
    )
    raise TextkeepError(
        f"importance map (of model {model}) does not match this LLM — parameters " + "; ".join(problems) + f". {fix}."
    )


def check_same_parameters(a: MapFile, b: MapFile) -> None:
    """Raise a TextkeepError unless two maps score the same decoder-layer parameters with the same shapes:
    textkeep's one check of map against map (maps are compared on their decoder layers)."""
    names = decoder_names(a)
    if decoder_names(b) != names or any(shape_of(a, k) != shape_of(b, k) for k in names):
        raise TextkeepError(
            f"'{b.path}' and '{a.path}' do not score the same parameters; compare maps of one architecture."
        )


def read_summary(map_dir: str | Path) -> dict:
    path = Path(map_dir) / SUMMARY_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TextkeepError(
            f"'{map_dir}' holds no {SUMMARY_FILE}; point at a directory written by `textkeep importance compute`."
        ) from None
