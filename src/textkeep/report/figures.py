"""The figure writers of the paper's Section 2: layer-wise distribution (Figs 2, 3) and matrix heatmaps (rank
clustering, Fig 1; parameter change, Fig 4). The importance commands compute the numbers; this module draws them.

Choices:

- Every figure is written as PNG and SVG, with the numbers it draws in a JSON beside it, each file atomically.
- matplotlib's `Figure` without pyplot: no global state, and the Agg canvas is what saves.
- Heatmaps share one 0–1 colour scale (each matrix is normalised by its own maximum before it gets here).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from textkeep.fileio import atomic_path, jsonable, write_json


def save_figure(fig, stem: Path, numbers: dict) -> list[Path]:
    """stem.png, stem.svg and stem.json (the numbers drawn), each written atomically."""
    paths = []
    for ext in ("png", "svg"):
        path = stem.with_name(stem.name + "." + ext)
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=ext, dpi=150, bbox_inches="tight")
        paths.append(path)
    write_json(stem.with_name(stem.name + ".json"), jsonable(numbers))
    return paths + [stem.with_name(stem.name + ".json")]


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Arrays in one compressed .npz, written atomically (the pooled heatmaps, for redrawing without the maps)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)


def _figure(**kw):
    from matplotlib.figure import Figure  # no pyplot: no global state, and the Agg canvas is used for saving

    return Figure(**kw)


def plot_layers(shares: dict[str, np.ndarray], title: str = "Layer-wise distribution of parameter importance"):
    """One line per map: each decoder layer's share of the map's decoder-layer importance (Figs 2, 3)."""
    fig = _figure(figsize=(7, 4), layout="constrained")
    ax = fig.add_subplot()
    for label, s in shares.items():
        ax.plot(np.arange(len(s)), 100 * np.asarray(s), marker="o", markersize=3, label=label)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("share of decoder-layer importance (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def plot_layers_by_module(module_shares: dict[str, dict[str, np.ndarray]]):
    """Small multiples: one panel per module type, one line per map."""
    modules = list(next(iter(module_shares.values())))
    cols = 4
    rows = math.ceil(len(modules) / cols)
    fig = _figure(figsize=(3.2 * cols, 2.6 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, sharex=True, squeeze=False).ravel()
    for ax, m in zip(axes, modules):
        for label, per_module in module_shares.items():
            ax.plot(100 * per_module[m], marker="o", markersize=2, label=label)
        ax.set_title(m)
        ax.grid(alpha=0.3)
    for ax in axes[len(modules) :]:
        ax.set_visible(False)
    for ax in axes[-cols:]:
        ax.set_xlabel("decoder layer")
    for ax in axes[::cols]:
        ax.set_ylabel("share (%)")
    axes[0].legend(fontsize="small")
    fig.suptitle("Layer-wise importance by module type (share of each map's decoder-layer total)")
    return fig


def plot_panels(panels: dict[str, dict[str, dict]], title: str, colour_label: str):
    """A grid of matrix heatmaps: one row per map/checkpoint, one column per module, a shared 0–1 colour bar.
    `panels`: label → module → a panel with "shape", "image" (a 2-D tensor in 0…1) and "score" (with "ratio")."""
    labels = list(panels)
    modules = list(panels[labels[0]])
    fig = _figure(figsize=(2.4 * len(modules) + 1, 2.6 * len(labels) + 0.6), layout="constrained")
    axes = fig.subplots(len(labels), len(modules), squeeze=False)
    im = None
    for i, label in enumerate(labels):
        for j, m in enumerate(modules):
            p, ax = panels[label][m], axes[i, j]
            n_out, n_in = p["shape"]
            im = ax.imshow(
                p["image"].numpy(),
                cmap="viridis",
                vmin=0,
                vmax=1,
                aspect="auto",
                interpolation="nearest",
                extent=(0, n_in, n_out, 0),
            )
            ax.set_title(f"{m}  (clustering ×{p['score']['ratio']:.2f})", fontsize=9)
            ax.tick_params(labelsize=7)
            if i == len(labels) - 1:
                ax.set_xlabel("input dim (column)", fontsize=8)
            if j == 0:
                ax.set_ylabel(f"{label}\noutput dim (row)", fontsize=9)
    fig.colorbar(im, ax=axes, shrink=0.8, label=colour_label)
    fig.suptitle(title)
    return fig


def panel_numbers(panels: dict[str, dict[str, dict]]) -> dict:
    """The panels without their images: what goes into the figure's JSON."""
    return {
        label: {m: {k: v for k, v in p.items() if k != "image"} for m, p in per.items()}
        for label, per in panels.items()
    }


def panel_images(panels: dict[str, dict[str, dict]]) -> dict[str, np.ndarray]:
    """The panels' images keyed "label/module": what goes into the .npz beside the figure."""
    return {f"{label}/{m}": p["image"].numpy() for label, per in panels.items() for m, p in per.items()}


def save_panels(panels: dict[str, dict[str, dict]], out: Path, stem: str, title: str, colour_label: str, numbers: dict):
    """A heatmap grid as stem.png/.svg/.json (the panels' numbers added to `numbers`) and stem_images.npz."""
    save_figure(plot_panels(panels, title, colour_label), out / stem, {**numbers, "panels": panel_numbers(panels)})
    save_npz(out / f"{stem}_images.npz", panel_images(panels))


def pareto_front(points: dict[str, tuple[float, float]]) -> list[str]:
    """The labels of the points that no other point dominates (at least as good on both axes and better on one),
    ordered by the first axis: the trade-off's frontier, higher being better on both."""
    front = [
        a
        for a, (x, y) in points.items()
        if not any(u >= x and v >= y and (u > x or v > y) for b, (u, v) in points.items() if b != a)
    ]
    return sorted(front, key=lambda a: points[a])


def plot_tradeoff(panels: dict[str, dict[str, dict]]):
    """Text kept against speech gained: one panel per QA set, one point per model at (T2T, S2T) accuracy with its
    95% intervals as bars, and the Pareto frontier as a line. panels: set title → label → {"t2t": (acc, lo, hi),
    "s2t": (acc, lo, hi)}, accuracies as fractions."""
    fig = _figure(figsize=(5.2 * len(panels), 4.4), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False).ravel()
    for ax, (title, rows) in zip(axes, panels.items()):
        for label, r in rows.items():
            (x, x0, x1), (y, y0, y1) = (100 * np.asarray(r["t2t"]), 100 * np.asarray(r["s2t"]))
            ax.errorbar(x, y, xerr=[[x - x0], [x1 - x]], yerr=[[y - y0], [y1 - y]], fmt="o", capsize=3, label=label)
        front = pareto_front({k: (r["t2t"][0], r["s2t"][0]) for k, r in rows.items()})
        if len(front) > 1:
            ax.plot([100 * rows[k]["t2t"][0] for k in front], [100 * rows[k]["s2t"][0] for k in front], "k--",
                    lw=1, alpha=0.6, label="Pareto frontier")  # fmt: skip
        ax.set_xlabel("T2T accuracy (%): text kept")
        ax.set_ylabel("S2T accuracy (%): speech gained")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    return fig


def plot_align_curve(rows: list[dict]):
    """The align stage's learning curve (its curve.jsonl): held-out S2T against examples seen, the frozen LLM's T2T
    on the same questions as the reference line, and the CTC head's word error rate where it has one."""
    fig = _figure(figsize=(7, 4), layout="constrained")
    ax = fig.add_subplot()
    x = [r["examples"] for r in rows]
    ax.plot(x, [100 * r["s2t"] for r in rows], marker="o", label="held-out S2T")
    ax.plot(x, [100 * r["t2t"] for r in rows], "k--", lw=1, label="T2T, the frozen LLM (reference)")
    for key, name in (("ctc_t2t", "T2T on what the CTC head heard"),):
        if any(key in r for r in rows):
            ax.plot([r["examples"] for r in rows if key in r], [100 * r[key] for r in rows if key in r], marker="s",
                    label=name)  # fmt: skip
    ax.set_xlabel("training examples seen")
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    if any("ctc_wer" in r for r in rows):
        wer = ax.twinx()
        wer.plot([r["examples"] for r in rows if "ctc_wer" in r], [100 * r["ctc_wer"] for r in rows if "ctc_wer" in r],
                 color="tab:red", marker="^", label="CTC WER (right axis)")  # fmt: skip
        wer.set_ylabel("CTC word error rate (%)")
        wer.legend(loc="upper right", fontsize="small")
    ax.legend(loc="upper left", fontsize="small")
    ax.set_title("Alignment (LLM frozen): what the adaptor makes the LLM understand")
    return fig
