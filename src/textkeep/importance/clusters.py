"""Rank clustering (paper Fig 1): where the top-p% parameters of a weight matrix lie, and how much they gather in a
few rows and columns. Its score and display serve Fig 4 (parameter change) too.

Choices:

- Rank clustering score (`clustering_score`): the share of a mask's ones that lie in the 10% of rows (columns) with
  the most ones, divided by the same share for a uniformly random mask with as many ones.
- 3×3 vicinity (`vicinity_average`): zero padding by default (cells outside the matrix count as not-top), so every
  value is "ones among the 9 cells centred here / 9", as in Fig 1's caption; 'nearest' repeats the edge instead.
- Display (`pool_for_display`): block-max pooling down to ≤ 512 px a side, so a single bright row or column
  survives the downsampling (a block mean would dilute it into the background). Numbers are computed at full size.
- The top-p% of each matrix is exact (`select.top_mask`, ties earliest first); zeros never count as top.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from textkeep.errors import TextkeepError
from textkeep.importance.layers import n_layers_of
from textkeep.importance.maps import PROJ, default_labels, layer_index, module_type, open_map
from textkeep.importance.select import seed_of, top_mask
from textkeep.report.figures import save_panels

DISPLAY_PX = 512
TOP_FRACTION = 0.1  # the rows/columns that count as "the top rows" in the clustering score


def vicinity_average(mask: torch.Tensor, padding: str = "zero") -> torch.Tensor:
    """Share of top entries among the 3×3 cells centred on each entry, same shape as `mask`.
    padding 'zero': cells outside the matrix count as not-top (the divisor stays 9); 'nearest': the edge repeats."""
    x = mask.float()[None, None]
    if padding == "zero":
        return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=True)[0, 0]
    if padding == "nearest":
        return F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)[0, 0]
    raise TextkeepError(f"padding must be 'zero' or 'nearest', got {padding!r}")


def normalise01(x: torch.Tensor) -> torch.Tensor:
    """x / max(x): 0 stays "nothing here", the densest spot becomes 1."""
    m = float(x.max()) if x.numel() else 0.0
    return x / m if m > 0 else torch.zeros_like(x)


def pool_for_display(x: torch.Tensor, max_px: int = DISPLAY_PX) -> tuple[torch.Tensor, tuple[int, int]]:
    """Block-max pooling to at most max_px a side; returns the image and the block size (rows, columns)."""
    block = (math.ceil(x.shape[0] / max_px), math.ceil(x.shape[1] / max_px))
    if block == (1, 1):
        return x.float(), block
    return F.max_pool2d(x.float()[None, None], block, ceil_mode=True)[0, 0], block


def concentration(counts: Sequence[float] | np.ndarray, fraction: float = TOP_FRACTION) -> float:
    """Share of the total held by the ⌈fraction·n⌉ largest counts."""
    c = np.sort(np.asarray(counts, dtype=float))[::-1]
    total = c.sum()
    return float(c[: math.ceil(fraction * len(c))].sum() / total) if total > 0 else float("nan")


def clustering_score(mask: torch.Tensor, fraction: float = TOP_FRACTION, seed: int = 0) -> dict:
    """How strongly a 2-D mask's ones gather in a few rows and columns.

    C_row = (ones in the ⌈fraction·R⌉ rows with the most ones) / (all ones), C_col likewise over columns. The
    reference is the same statistic for a uniformly random mask with as many ones: its row counts are
    multivariate-hypergeometric (each row an urn of `columns` cells), drawn directly (seeded) instead of building
    the random mask. ratio_row = C_row / C_row_random, ratio_col likewise, and
    ratio = (C_row + C_col) / (C_row_random + C_col_random): about 1 for scattered ones, up to 1/fraction when
    all ones sit in a tenth of the rows and of the columns.
    """
    mask = mask.bool()
    n_rows, n_cols = mask.shape  # an empty mask scores NaN
    ones = int(mask.sum())
    rng = np.random.default_rng(seed_of(seed, n_rows, n_cols, ones))
    rand_rows = rng.multivariate_hypergeometric(np.full(n_rows, n_cols), ones)
    rand_cols = rng.multivariate_hypergeometric(np.full(n_cols, n_rows), ones)
    c_row, c_col = concentration(mask.sum(1).numpy(), fraction), concentration(mask.sum(0).numpy(), fraction)
    r_row, r_col = concentration(rand_rows, fraction), concentration(rand_cols, fraction)
    return {
        "row": c_row,
        "col": c_col,
        "row_random": r_row,
        "col_random": r_col,
        "ratio_row": c_row / r_row,
        "ratio_col": c_col / r_col,
        "ratio": (c_row + c_col) / (r_row + r_col),
    }


def layer_module_names(scores: Mapping, layer: int, modules: Sequence[str], meta: dict | None = None) -> dict[str, str]:
    """module type → name of that module's 2-D weight in `layer` (of a map, or of a model's named parameters)."""
    meta = meta if meta is not None else getattr(scores, "meta", {})
    found = {}
    for name in scores:
        if name.endswith(".weight") and layer_index(name, meta) == layer and module_type(name) in modules:
            found[module_type(name)] = name
    missing = [m for m in modules if m not in found]
    if missing:
        raise TextkeepError(
            f"layer {layer} has no {', '.join(missing)} weight; choose modules among {', '.join(PROJ)} and a layer "
            "the model has."
        )
    return {m: found[m] for m in modules}


def cluster_panel(scores: torch.Tensor, top_percent: float, padding: str = "zero") -> dict:
    """Fig 1 for one matrix: the top-p% mask, its normalised 3×3 vicinity average pooled for display, the score."""
    mask = top_mask(scores, top_percent) & (scores > 0)  # zeros are never "top", even when k exceeds the non-zeros
    image, block = pool_for_display(normalise01(vicinity_average(mask, padding)))
    return {
        "shape": list(mask.shape),
        "n_top": int(mask.sum()),
        "score": clustering_score(mask),
        "row_counts": mask.sum(1).tolist(),
        "col_counts": mask.sum(0).tolist(),
        "block": list(block),
        "image": image,
    }


def print_scores(panels: dict[str, dict[str, dict]]) -> None:
    """One line per figure row: each module's clustering ratio."""
    for label, per in panels.items():
        print(f"{label}: " + ", ".join(f"{m} ×{p['score']['ratio']:.2f}" for m, p in per.items()))


def importance_clusters(
    maps: list[Path],
    labels: list[str] | None = None,
    layer: int | None = None,
    modules: list[str] | None = None,
    top_percent: float = 5.0,
    out: Path = Path("runs/analysis/clusters"),
) -> Path:
    """Rank clustering (paper Fig 1): heatmaps of the top-p% parameters of each module's weight matrix, averaged
    over 3×3 vicinities and normalised to [0, 1], with a score of how much they gather in rows and columns.

    Args:
        maps: importance map directories, one figure row each (e.g. text-input and speech-input maps).
        labels: a row label per map (default: the directory names).
        layer: the decoder layer (default: the middle one).
        modules: module types to draw (default: q_proj k_proj v_proj o_proj gate_proj up_proj down_proj).
        top_percent: the top share of each matrix that forms the mask.
        out: folder for clusters.png/.svg/.json and clusters_images.npz (the pooled heatmaps).
    """
    if not maps:
        raise TextkeepError("give at least one importance map directory")
    labels = default_labels(maps, labels)
    modules = list(modules or PROJ)
    opened = [open_map(p) for p in maps]
    if layer is None:
        layer = n_layers_of(opened[0].summary()) // 2
    panels = {}
    for label, m in zip(labels, opened):
        names = layer_module_names(m, layer, modules)
        panels[label] = {mod: cluster_panel(m[name], top_percent) for mod, name in names.items()}
    title = (
        f"Top {top_percent:g}% importance, layer {layer} (3×3 vicinity share, normalised; block-max pooled for display)"
    )
    numbers = {
        "maps": {lab: str(p) for lab, p in zip(labels, maps)},
        "layer": layer,
        "top_percent": top_percent,
        "padding": "zero",
    }
    out = Path(out)
    save_panels(panels, out, "clusters", title, "share of top entries in 3×3 vicinity (÷ max)", numbers)
    print_scores(panels)
    return out
