"""Parameter change (paper Fig 4): |θ_ft − θ_base| of one decoder layer's weight matrices, for fine-tuned
checkpoints against the base. Reads no importance map: it compares weights.

Choices: LoRA checkpoints are merged first, so a LoRA run's change is its update B·A in the weights it touched;
each matrix's |Δ| is normalised by its own maximum (the figure shows where a matrix changed, not by how much
against the others) and block-max pooled for display like Fig 1; its top 5% gets the rank-clustering score of
`clusters.clustering_score`, with entries that did not move never counted as top.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from textkeep.errors import TextkeepError
from textkeep.importance.clusters import (
    clustering_score,
    layer_module_names,
    normalise01,
    pool_for_display,
    print_scores,
)
from textkeep.importance.maps import PROJ, decoder_layers, default_labels
from textkeep.importance.select import top_mask
from textkeep.report.figures import save_panels

TOP_PERCENT = 5.0  # the top share of |Δ| each matrix's clustering score is computed on


def parameter_change(base: torch.Tensor, tuned: torch.Tensor) -> torch.Tensor:
    """|θ_ft − θ_base| in float32."""
    if base.shape != tuned.shape:
        raise TextkeepError(
            f"weights of shape {tuple(tuned.shape)} and {tuple(base.shape)} cannot be compared; the checkpoints come "
            "from different base models."
        )
    return (tuned.float() - base.float()).abs()


def change_panel(base: torch.Tensor, tuned: torch.Tensor, top_percent: float = TOP_PERCENT) -> dict:
    """Fig 4 for one matrix: normalised |Δ| pooled for display, and the clustering score of its top-p% mask."""
    delta = parameter_change(base, tuned)
    mask = top_mask(delta, top_percent) & (delta > 0)
    image, block = pool_for_display(normalise01(delta))
    return {
        "shape": list(delta.shape),
        "max_abs_change": float(delta.max()),
        "mean_abs_change": float(delta.mean()),
        "relative_change": float(delta.norm() / base.float().norm().clamp_min(1e-30)),
        "score": clustering_score(mask),
        "block": list(block),
        "image": image,
    }


def _llm_weights(spec: str, layer: int | None, modules: Sequence[str]) -> tuple[dict[str, torch.Tensor], int]:
    """The chosen layer's module weights of a checkpoint (LoRA merged) or an LLM, and the layer used."""
    from textkeep.model.speech_llm import load_speech_llm

    llm = load_speech_llm(spec, None, merge_lora=True).llm  # no encoder: only the LLM's weights are read
    prefix, n = decoder_layers(llm)
    layer = n // 2 if layer is None else layer
    params = dict(llm.named_parameters())
    names = layer_module_names(params, layer, modules, {"layer_prefix": prefix})
    return {m: params[name].detach().float().clone() for m, name in names.items()}, layer


def importance_change(
    base: str,
    checkpoints: list[str],
    labels: list[str] | None = None,
    layer: int | None = None,
    modules: list[str] | None = None,
    out: Path = Path("runs/analysis/change"),
) -> Path:
    """Parameter change (paper Fig 4): |θ_ft − θ_base| of each module's weights, normalised to [0, 1] per matrix,
    for fine-tuned checkpoints (LoRA merged) against the base, with the rank-clustering score of its top 5%.

    Args:
        base: the base LLM (registry name, directory or hub id) or a checkpoint directory.
        checkpoints: fine-tuned checkpoint directories, one figure row each.
        labels: a row label per checkpoint (default: the directory names).
        layer: the decoder layer (default: the middle one).
        modules: module types (default: q_proj k_proj v_proj o_proj gate_proj up_proj down_proj).
        out: folder for change.png/.svg/.json and change_images.npz (the pooled heatmaps).
    """
    if not checkpoints:
        raise TextkeepError("give at least one fine-tuned checkpoint to compare with the base")
    labels = default_labels(checkpoints, labels)
    modules = list(modules or PROJ)
    base_w, layer = _llm_weights(base, layer, modules)
    panels = {}
    for label, ckpt in zip(labels, checkpoints):
        tuned, _ = _llm_weights(ckpt, layer, modules)
        panels[label] = {m: change_panel(base_w[m], tuned[m]) for m in modules}
    title = f"|θ_ft − θ_base|, layer {layer} (÷ max per matrix; block-max pooled for display)"
    numbers = {"base": base, "checkpoints": dict(zip(labels, checkpoints)), "layer": layer, "top_percent": TOP_PERCENT}
    out = Path(out)
    save_panels(panels, out, "change", title, "|Δθ| / max |Δθ|", numbers)
    print_scores(panels)
    return out
