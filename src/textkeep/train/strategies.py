"""The paper's three Stage-1 strategies as optimizer parameter groups (§3.1), and alignment's adaptor-only one.

full      the adaptor and every LLM parameter at the base learning rate.
layer-lr  as full, but decoder layer i at lr·(1 − λ·(I_i − min I)/(max I − min I)) (Eq. 3), with I_i the
          layer's summed |importance| in the PRE-TRAINED LLM's textual map. Embeddings, final norm, LM head and adaptor
          are not in any decoder layer and keep the base rate.
lora      PEFT LoRA (rank r, α = 2r) on q/k/v/o/gate/up/down_proj of every decoder layer; the adaptor is trained fully
          and everything else is frozen.
adaptor   the adaptor alone; the LLM is frozen (no weight gradients), so text-to-text is unchanged by construction.
layer-lr+lora  as lora, but the LoRA parameters of decoder layer i train at lr·scale_i (Eq. 3's scales): the
          paper's two mitigations combined (beyond the paper; the others are in guarded.py).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from textkeep.errors import TextkeepError
from textkeep.importance.maps import PROJ, decoder_layers, layer_index
from textkeep.train.config import check_lam, check_lora, check_strategy

LORA_TARGETS = PROJ  # the paper's "all attention and MLP modules": the seven projections importance maps score


def layer_lr_scales(layer_sums: list[float], lam: float) -> list[float]:
    """Eq. 3: scale_i = 1 − λ·(I_i − min I)/(max I − min I). Equal importances everywhere give all 1 (no layer
    is more important)."""
    check_lam(lam)
    if not layer_sums or not all(math.isfinite(s) for s in layer_sums):
        raise TextkeepError(
            f"layer importances must be finite numbers, got {layer_sums[:5]}…; recompute the importance map."
        )
    lo, hi = min(layer_sums), max(layer_sums)
    if hi == lo:
        return [1.0] * len(layer_sums)
    return [1.0 - lam * (s - lo) / (hi - lo) for s in layer_sums]


def read_layer_importance(map_dir: Path | None, llm) -> list[float]:
    """Per-layer Σ|I| from an importance map directory, after checking that the map was computed on this LLM."""
    from textkeep.importance.maps import SUMMARY_FILE, WEIGHTS_FILE, check_compatible, open_map

    fix = (
        "compute the pre-trained LLM's textual importance map (`textkeep importance`) and pass its directory as "
        "--train.importance"
    )
    if map_dir is None:
        raise TextkeepError(f"strategy 'layer-lr' needs an importance map; {fix}.")
    map_dir = Path(map_dir)
    for name in (SUMMARY_FILE, WEIGHTS_FILE):
        if not (map_dir / name).is_file():
            raise TextkeepError(f"importance map '{map_dir}' has no {name}; {fix}.")
    check_compatible(open_map(map_dir), llm, fix=f"It was computed on another model; {fix} for the LLM being trained")
    summary = map_dir / SUMMARY_FILE
    try:
        layers = sorted(json.loads(summary.read_text())["layers"], key=lambda r: r["layer"])
        sums = [float(r["sum"]) for r in layers]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise TextkeepError(
            f'\'{summary}\' lacks a valid "layers": [{{"layer": i, "sum": x}}, …] list ({e}); recompute the map.'
        ) from None
    _, n_layers = decoder_layers(llm)
    if [r["layer"] for r in layers] != list(range(n_layers)):
        raise TextkeepError(
            f"'{summary}' lists layers {[r['layer'] for r in layers][:8]}…, "
            f"the LLM has layers 0…{n_layers - 1}; recompute the map."
        )
    return sums


def param_groups(model, strategy: str, base_lr: float, scales: list[float] | None = None) -> list[dict]:
    """AdamW groups over the parameters that require grad: `adaptor`, `llm`, and for layer-lr one `layer.i` per
    decoder layer."""
    check_strategy(strategy)
    per_layer = strategy in ("layer-lr", "layer-lr+lora")
    if per_layer and scales is None:
        raise TextkeepError(
            f"strategy '{strategy}' needs the per-layer scales (layer_lr_scales of the importance map)."
        )
    groups: dict[str, list] = {"adaptor": [p for p in model.adaptor.parameters() if p.requires_grad]}
    where = {"layer_prefix": decoder_layers(model.llm)[0]}
    for name, p in model.llm.named_parameters():
        if p.requires_grad:
            i = layer_index(name, where) if per_layer else None
            groups.setdefault("llm" if i is None else f"layer.{i}", []).append(p)
    out = []
    for key, params in groups.items():
        if params:
            scale = scales[int(key.split(".")[1])] if key.startswith("layer.") else 1.0
            out.append({"name": key, "params": params, "lr": base_lr * scale})
    return out


def skip_lora_input_casts(llm) -> None:
    """Under bf16 autocast, peft's LoRA layers cast each input to their fp32 weights' dtype and autocast casts it
    straight back for the matmul: two copies of every activation per adapted module, for identical values. Turned
    off as peft's own `helpers.disable_input_dtype_casting` does (peft ≥ 0.15; older versions ignore the flag)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in llm.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = False


def apply_lora(model, rank: int = 8, alpha: int | None = None, dropout: float = 0.05):
    """Wrap model.llm with LoRA on the seven projections of every layer (α = 2r unless given); freeze all but LoRA and
    adaptor."""
    from peft import LoraConfig, get_peft_model

    check_lora(rank, alpha, dropout)
    config = LoraConfig(
        r=rank, lora_alpha=alpha or 2 * rank, lora_dropout=dropout, target_modules=list(LORA_TARGETS), bias="none"
    )
    model.llm = get_peft_model(model.llm, config)  # freezes the base weights
    if model.encoder is not None:
        model.encoder.requires_grad_(False)
    model.adaptor.requires_grad_(True)
    return model
