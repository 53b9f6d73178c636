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
        f"no list of {n} decoder layers found in {type(llm).__name__}; this architecture is not supported by importance maps."
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
    """The decoder layer a parameter belongs to, or None (embeddings, final norm, head)."""
    prefix = (meta or {}).get("layer_prefix")
    m = re.match(re.escape(prefix) + r"\.(\d+)\." if prefix else r".*?\.(\d+)\.", name)
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


# ---- compatibility -------------------------------------------------------------------------------------------------
def bare_parameter_shapes(llm: nn.Module) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the bare causal LM's parameters; for a peft model, those of the merged model."""
    llm = getattr(llm, "llm", llm)  # a SpeechLLM is fine too
    if not hasattr(llm, "peft_config"):
        return {k: tuple(p.shape) for k, p in llm.named_parameters()}
    shapes = {}
    for k, p in llm.get_base_model().named_parameters():
        if ".lora_" in k or ".modules_to_save." in k:
            continue  # the adapter's own weights; merged away
        shapes[k.replace(".base_layer.", ".").replace(".original_module.", ".")] = tuple(p.shape)
    return shapes


def check_compatible(imap: ImportanceMap, llm: nn.Module) -> None:
    """Raise a TextkeepError naming the first mismatches when the map does not fit the LLM parameter by parameter."""
    want = bare_parameter_shapes(llm)
    have = {k: tuple(v.shape) for k, v in imap.scores.items()}
    missing = [k for k in want if k not in have]
    extra = [k for k in have if k not in want]
    shape = [f"{k} (map {have[k]}, model {want[k]})" for k in want if k in have and have[k] != want[k]]
    if not (missing or extra or shape):
        return
    problems = [
        f"{len(v)} {what}: {', '.join(v[:3])}{', …' if len(v) > 3 else ''}"
        for what, v in (("missing from the map", missing), ("not in the model", extra), ("of another shape", shape))
        if v
    ]
    raise TextkeepError(
        f"importance map (of model {imap.meta.get('model') or '?'}) does not fit this LLM — parameters "
        + "; ".join(problems)
        + ". Compute the map on this model (`textkeep importance compute --model …`) or load the model it was computed on."
    )


def read_summary(map_dir: str | Path) -> dict:
    path = Path(map_dir) / SUMMARY_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TextkeepError(
            f"'{map_dir}' holds no {SUMMARY_FILE}; point at a directory written by `textkeep importance compute`."
        ) from None
