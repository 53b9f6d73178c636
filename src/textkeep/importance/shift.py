"""The shift of the importance distribution between two maps (the paper's §2 comparison of the base LLM's map with
those after Full-FT, Layer-LR and LoRA; the Figs 2–3 discussion in numbers).

Choices: layer profiles are compared by Jensen–Shannon divergence in bits (0 … 1, symmetric, finite where a layer
has no importance) and Spearman ρ (rank agreement, blind to scale); total magnitudes by their ratio; parameter sets
by the IoU of each map's exact top-k% over the decoder layers (one global threshold per map, found by the radix
select of `select`, ties earliest first, so both sets hold exactly k). Maps are compared only when they score the
same decoder-layer parameters (`maps.check_same_parameters`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Sequence

import numpy as np

from textkeep.errors import TextkeepError
from textkeep.fileio import jsonable, write_json, write_text
from textkeep.importance.layers import layer_shares, layer_sums_of
from textkeep.importance.maps import MapFile, check_same_parameters, decoder_names, default_labels, open_map, shape_of
from textkeep.importance.select import Cut, chunks, count_for, kth_keys, sort_keys


def js_divergence(p: Sequence[float], q: Sequence[float]) -> float:
    """Jensen–Shannon divergence in bits (0 … 1) of two profiles, each normalised to sum 1; 0·log 0 = 0."""
    p, q = layer_shares(p), layer_shares(q)
    if p.shape != q.shape:
        raise TextkeepError(
            f"profiles of {len(p)} and {len(q)} layers cannot be compared; the maps come from different architectures."
        )
    m = (p + q) / 2

    def kl(a, b):
        nz = a > 0
        return float(np.sum(a[nz] * np.log2(a[nz] / b[nz])))

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def profile_shift(base_sums: Sequence[float], other_sums: Sequence[float]) -> dict:
    """JS divergence, Spearman correlation and peak layers of two layer profiles."""
    from scipy.stats import spearmanr

    rho, pvalue = spearmanr(base_sums, other_sums)
    return {
        "js_divergence": js_divergence(base_sums, other_sums),
        "spearman": float(rho),
        "spearman_p": float(pvalue),
        "peak_base": int(np.argmax(base_sums)),
        "peak_other": int(np.argmax(other_sums)),
    }


def _top_counts(scores: Mapping, names: Sequence[str], percents: Sequence[float]) -> list[int]:
    n = sum(math.prod(shape_of(scores, x)) for x in names)
    return [max(1, count_for(n, p)) for p in percents]


def top_cuts(scores: Mapping, names: Sequence[str], percents: Sequence[float]) -> list[tuple[int, int]]:
    """The exact top-p% threshold of `scores` over `names`, for each p (`select.kth_keys` entries): computed once
    for a reference map, it serves each comparison with it."""
    return kth_keys(lambda: (scores[x] for x in names), _top_counts(scores, names, percents), True)


def topk_ious(
    a: Mapping, b: Mapping, names: Sequence[str], percents: Sequence[float], a_cuts: list | None = None
) -> dict[float, float]:
    """|A ∩ B| / |A ∪ B| of the top p% parameters of two maps over `names`, for each p (one exact global threshold
    per map and p; both sets hold exactly k elements). `a_cuts`: `top_cuts(a, names, percents)`, to reuse."""
    ks = _top_counts(a, names, percents)
    a_cuts = a_cuts or top_cuts(a, names, percents)
    b_cuts = top_cuts(b, names, percents)
    cuts = [(Cut(*ca, k), Cut(*cb, k)) for ca, cb, k in zip(a_cuts, b_cuts, ks)]
    inter = [0] * len(ks)
    for name in names:
        for (_, ca), (_, cb) in zip(chunks(a[name]), chunks(b[name])):
            ka, kb = sort_keys(ca, True), sort_keys(cb, True)
            for i, (cut_a, cut_b) in enumerate(cuts):
                inter[i] += int((cut_a.take(ka) & cut_b.take(kb)).sum())
    return {p: n / (2 * k - n) for p, n, k in zip(percents, inter, ks)}


def topk_iou(a: Mapping, b: Mapping, names: Sequence[str], percent: float) -> float:
    """The IoU of the top `percent`% of two maps over `names` (see `topk_ious`)."""
    return topk_ious(a, b, names, [percent])[percent]


def shift_row(
    base: MapFile, other: MapFile, top_percent: Sequence[float] = (1, 5), base_cuts: list | None = None
) -> dict:
    """One row of the shift table: profile shift, ratio of total magnitudes, top-k% IoUs."""
    check_same_parameters(base, other)
    bs, os_ = base.summary(), other.summary()
    row = profile_shift(layer_sums_of(bs), layer_sums_of(os_))
    row["total_ratio"] = os_["total"] / bs["total"]
    row["layer_total_ratio"] = float(layer_sums_of(os_).sum() / layer_sums_of(bs).sum())
    for p, iou in topk_ious(base, other, decoder_names(base), top_percent, base_cuts).items():
        row[f"iou_top{p:g}"] = iou
    return row


def shift_markdown(rows: dict[str, dict], base_label: str, top_percent: Sequence[float]) -> str:
    """The shift table in Markdown, a row per compared map."""
    head = [
        "Map",
        "JS div. (bits)",
        "Spearman ρ",
        f"Peak layer ({base_label} → map)",
        "Total ratio",
        *(f"IoU top {p:g}%" for p in top_percent),
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, r in rows.items():
        cells = [
            label,
            f"{r['js_divergence']:.4f}",
            f"{r['spearman']:.3f}",
            f"{r['peak_base']} → {r['peak_other']}",
            f"{r['total_ratio']:.3f}",
        ]
        cells += [f"{r[f'iou_top{p:g}']:.3f}" for p in top_percent]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def importance_shift(
    base: Path,
    others: list[Path],
    labels: list[str] | None = None,
    out: Path = Path("runs/analysis/shift"),
    top_percent: list[float] = [1, 5],
) -> Path:
    """Shift of the importance distribution between a reference map and others: JS divergence (bits) and Spearman
    ρ of the layer profiles, peak layers, ratio of total magnitudes, IoU of the top-k% decoder-layer parameters.

    Args:
        base: the reference importance map (e.g. of the base LLM).
        others: maps to compare with it (e.g. after Full-FT, Layer-LR, LoRA); one table row each.
        labels: a label per map in `others` (default: the directory names).
        out: folder for shift.json and shift.md.
        top_percent: the k of the top-k% IoUs.
    """
    if not others:
        raise TextkeepError("give at least one map to compare with the base map")
    labels = default_labels(others, labels)
    ref = open_map(base)
    cuts = top_cuts(ref, decoder_names(ref), top_percent)  # the base's thresholds serve every row
    rows = {label: shift_row(ref, open_map(p), top_percent, cuts) for label, p in zip(labels, others)}
    base_label = default_labels([base], None)[0]
    out = Path(out)
    write_json(
        out / "shift.json",
        jsonable(
            {
                "base": str(base),
                "others": {lab: str(p) for lab, p in zip(labels, others)},
                "top_percent": list(top_percent),
                "rows": rows,
            }
        ),
    )
    table = shift_markdown(rows, base_label, top_percent)
    write_text(out / "shift.md", f"Importance shift relative to `{base}`\n\n" + table)
    print(table, end="")
    return out
