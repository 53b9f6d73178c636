"""Layer-wise distribution of importance (paper Figs 2, 3): each decoder layer's share of the importance of all
decoder layers, per map and per module type.

Choices: the numbers come from the maps' summary.json (sums of |I| written with the map), so no tensor is read;
shares are of the decoder layers' total (embeddings, final norm and head left out, as the figures' layer axis);
maps of different depths are refused rather than stretched onto one axis.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from textkeep.errors import TextkeepError
from textkeep.importance.maps import LAYER_MODULES, default_labels, open_map
from textkeep.report.figures import plot_layers, plot_layers_by_module, save_figure


def n_layers_of(summary: dict) -> int:
    """The number of decoder layers of a map, from its summary."""
    return len(summary["layers"])


def layer_sums_of(summary: dict) -> np.ndarray:
    """Σ|I| of each decoder layer, in layer order, from a map's summary."""
    return np.array([r["sum"] for r in sorted(summary["layers"], key=lambda r: r["layer"])], dtype=float)


def layer_shares(layer_sums: Sequence[float]) -> np.ndarray:
    """Each layer's share of the importance of all decoder layers: s_i / Σ_j s_j."""
    s = np.asarray(layer_sums, dtype=float)
    if s.sum() <= 0:
        raise TextkeepError("the map's layer sums are all zero; the importance map is empty or damaged.")
    return s / s.sum()


def module_layer_shares(summary: dict, modules: Sequence[str] = LAYER_MODULES) -> dict[str, np.ndarray]:
    """Per module type, each layer's share of all decoder-layer importance (so the modules of a layer add up to
    that layer's share, up to parameters of no listed type)."""
    rows = sorted(summary["layer_modules"], key=lambda r: r["layer"])
    total = layer_sums_of(summary).sum()
    return {m: np.array([r.get(m, 0.0) for r in rows], dtype=float) / total for m in modules}


def importance_layers(
    maps: list[Path], labels: list[str] | None = None, out: Path = Path("runs/analysis/layers"), by_module: bool = False
) -> Path:
    """Layer-wise distribution of importance (paper Figs 2, 3): each layer's share of the decoder layers' total.

    Args:
        maps: importance map directories (e.g. base, Full-FT, Layer-LR, LoRA), drawn in one figure.
        labels: a legend label per map (default: the directory names).
        out: folder for layers.png/.svg/.json (and layers_by_module.* with --by_module).
        by_module: also draw one panel per module type (q, k, v, o, gate, up, down, norms).
    """
    if not maps:
        raise TextkeepError("give at least one importance map directory")
    labels = default_labels(maps, labels)
    summaries = {label: open_map(p).summary() for label, p in zip(labels, maps)}
    depth = {n_layers_of(s) for s in summaries.values()}
    if len(depth) > 1:
        raise TextkeepError(
            f"the maps have different layer counts ({sorted(depth)}); compare maps of one architecture."
        )
    shares = {label: layer_shares(layer_sums_of(s)) for label, s in summaries.items()}
    out = Path(out)
    numbers = {
        "maps": {label: str(p) for label, p in zip(labels, maps)},
        "shares": shares,
        "layer_sums": {label: layer_sums_of(s) for label, s in summaries.items()},
        "peak_layer": {label: int(np.argmax(s)) for label, s in shares.items()},
    }
    save_figure(plot_layers(shares), out / "layers", numbers)
    if by_module:
        per_module = {label: module_layer_shares(s) for label, s in summaries.items()}
        save_figure(
            plot_layers_by_module(per_module),
            out / "layers_by_module",
            {"maps": numbers["maps"], "module_shares": per_module},
        )
    print(f"layer distribution of {len(maps)} map(s) → {out}/layers.png")
    return out
