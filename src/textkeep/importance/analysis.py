"""The analyses of the paper's Section 2 on importance maps: layer-wise distribution (Figs 2–3), the shift between
two maps, rank clustering (Fig 1) and parameter change (Fig 4). Pure functions compute numbers; the writers draw
figures (PNG + SVG) and put their numbers in a JSON beside them.

Choices, in brief (the functions say more):

- Exact top-k over many tensors (`kth_largest`, `select_top`): a two-pass radix select on the float32 bit patterns,
  16 bits a pass, streaming over the tensors in chunks; nothing is sorted and no copy of all scores is kept. Ties at
  the threshold go to the earliest elements (tensor order, then flat index), so a selection has exactly k elements.
- Rank clustering score (`clustering_score`): the share of a mask's ones that lie in the 10% of rows (columns) with
  the most ones, divided by the same share for a uniformly random mask with as many ones.
- 3×3 vicinity (`vicinity_average`): zero padding by default (cells outside the matrix count as not-top), so every
  value is "ones among the 9 cells centred here / 9", as in Fig 1's caption; 'nearest' repeats the edge instead.
- Display (`pool_for_display`): block-max pooling down to ≤ 512 px a side, so a single bright row or column
  survives the downsampling (a block mean would dilute it into the background). Numbers are computed at full size.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from textkeep.errors import TextkeepError
from textkeep.fileio import atomic_path, write_json, write_text
from textkeep.importance.maps import LAYER_MODULES, PROJ, WEIGHTS_FILE, layer_index, module_type, read_summary

DISPLAY_PX = 512
TOP_FRACTION = 0.1  # the rows/columns that count as "the top rows" in the clustering score
_HALF = 1 << 16
_CHUNK = 1 << 24  # elements keyed at once (64 MB of int32 keys)


# ---- reading maps -------------------------------------------------------------------------------------------------
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
    """The one place maps are opened (switch here to `importance.maps` if its loader becomes lazy)."""
    return MapFile(path)


def decoder_names(scores: Mapping, meta: dict | None = None) -> list[str]:
    """The map's decoder-layer parameter names, sorted (the order that breaks ties in selections)."""
    meta = meta if meta is not None else getattr(scores, "meta", {})
    return sorted(k for k in scores if layer_index(k, meta) is not None)


def n_layers_of(summary: dict) -> int:
    return len(summary["layers"])


def default_labels(paths: Sequence, labels: Sequence[str] | None) -> list[str]:
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


# ---- exact selection ----------------------------------------------------------------------------------------------
def _as_source(tensors) -> Callable[[], Iterable[torch.Tensor]]:
    return tensors if callable(tensors) else (lambda: tensors)


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _chunks(t: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
    flat = t.detach().reshape(-1)
    for start in range(0, flat.numel(), _CHUNK):
        yield start, flat[start : start + _CHUNK].to(_device())


def _keys(values: torch.Tensor, largest: bool) -> torch.Tensor:
    """int32 keys that order like the float32 values (reversed when not `largest`)."""
    bits = (values.float() + 0.0).contiguous().view(torch.int32)  # -0.0 + 0.0 is +0.0: equal floats share a key
    # Non-negative floats order like their bit patterns; negative ones in reverse, so flip their magnitude bits.
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return key if largest else ~key


def _key_value(key: int, largest: bool) -> float:
    key = key if largest else ~key
    bits = key if key >= 0 else key ^ 0x7FFFFFFF
    return float(np.array([bits], dtype=np.int32).view(np.float32)[0])


def _kth_keys(tensors, ks: Sequence[int], largest: bool) -> list[tuple[int, int]]:
    """For each k: (key of the k-th largest element, how many elements have a larger key). Two streaming passes
    for all ks together: pass 1 histograms the high 16 bits of the keys and so finds the bucket holding each
    k-th element; pass 2 histograms the low 16 bits inside those buckets, which pins the exact key."""
    source = _as_source(tensors)
    hist = torch.zeros(_HALF, dtype=torch.long, device=_device())
    total = 0
    for t in source():
        for _, c in _chunks(t):
            if torch.isnan(c).any():
                raise TextkeepError("scores contain NaN; the importance map is damaged — compute it again.")
            hist += torch.bincount((_keys(c, largest) >> 16) + _HALF // 2, minlength=_HALF)
            total += c.numel()
    if not all(1 <= k <= total for k in ks):
        raise ValueError(f"every k must be in 1..{total}, got {list(ks)}")
    above = hist.cpu().flip(0).cumsum(0)  # above[j]: elements in the j+1 highest buckets
    first = []
    for k in ks:
        j = int(torch.searchsorted(above, k))
        first.append((_HALF - 1 - j - _HALF // 2, int(above[j - 1]) if j else 0))  # (high bits, elements above)
    low = {high: torch.zeros(_HALF, dtype=torch.long, device=_device()) for high, _ in first}
    for t in source():
        for _, c in _chunks(t):
            key = _keys(c, largest)
            high_of = key >> 16
            for high, h in low.items():
                h += torch.bincount(key[high_of == high] & 0xFFFF, minlength=_HALF)
    out = []
    for k, (high, n_above) in zip(ks, first):
        above = low[high].cpu().flip(0).cumsum(0)
        j = int(torch.searchsorted(above, k - n_above))
        out.append((high * _HALF + (_HALF - 1 - j), n_above + (int(above[j - 1]) if j else 0)))
    return out


class _Cut:
    """The k largest keys as a stream of chunk masks: keys above the k-th, plus ties at it, earliest first."""

    def __init__(self, key: int, n_beyond: int, k: int):
        self.key, self.ties = key, k - n_beyond

    def take(self, keys: torch.Tensor) -> torch.Tensor:
        take = keys > self.key
        if self.ties:
            eq = keys == self.key
            n_eq = int(eq.sum())
            if n_eq > self.ties:
                eq &= eq.cumsum(0) <= self.ties
            self.ties -= min(n_eq, self.ties)
            take |= eq
        return take


def kth_largest(tensors, k: int, largest: bool = True) -> tuple[float, int]:
    """The k-th largest (1-based; smallest with largest=False) value over all elements of `tensors`, and the
    number of elements strictly beyond it. Exact: a radix select over the float32 bit patterns in two streaming
    passes (each a 65536-bin histogram), never sorting or copying all scores. `tensors`: a sequence, or a
    callable returning a fresh iterable (it is read twice). Runs on the GPU when there is one.
    """
    [(key, n_beyond)] = _kth_keys(tensors, [k], largest)
    return _key_value(key, largest), n_beyond


def select_top(tensors, k: int, largest: bool = True) -> Iterator[torch.Tensor]:
    """Flat indices (on the CPU) of the k largest (smallest) elements, one index tensor per input tensor, in
    order. Exactly k in all: elements tied at the threshold are taken earliest first. Lazy: tensor by tensor."""
    source = _as_source(tensors)
    cut = _Cut(*_kth_keys(source, [k], largest)[0], k) if k > 0 else None
    for t in source():
        if cut is None:
            yield torch.zeros(0, dtype=torch.long)
            continue
        yield torch.cat([cut.take(_keys(c, largest)).nonzero().squeeze(1).cpu() + start for start, c in _chunks(t)])


def count_for(n: int, percent: float) -> int:
    """Elements in `percent`% of n, rounded half up."""
    return int(math.floor(n * percent / 100 + 0.5))


def top_mask(scores: torch.Tensor, percent: float) -> torch.Tensor:
    """Boolean mask of the top `percent`% entries of one tensor (at least one)."""
    k = max(1, count_for(scores.numel(), percent))
    mask = torch.zeros(scores.numel(), dtype=torch.bool)
    mask[next(select_top([scores], k))] = True
    return mask.view(scores.shape)


# ---- layer-wise distribution (Figs 2, 3) --------------------------------------------------------------------------
def layer_sums_of(summary: dict) -> np.ndarray:
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


# ---- shift between two maps ---------------------------------------------------------------------------------------
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


def topk_ious(
    a: Mapping, b: Mapping, names: Sequence[str], percents: Sequence[float], a_cuts: list | None = None
) -> dict[float, float]:
    """|A ∩ B| / |A ∪ B| of the top p% parameters of two maps over `names`, for each p (one exact global threshold
    per map and p; both sets hold exactly k elements). `a_cuts`: `top_cuts(a, names, percents)`, to reuse."""
    ks = [max(1, count_for(sum(math.prod(shape_of(a, x)) for x in names), p)) for p in percents]
    a_cuts = a_cuts or top_cuts(a, names, percents)
    b_cuts = top_cuts(b, names, percents)
    cuts = [(_Cut(*ca, k), _Cut(*cb, k)) for ca, cb, k in zip(a_cuts, b_cuts, ks)]
    inter = [0] * len(ks)
    for name in names:
        for (_, ca), (_, cb) in zip(_chunks(a[name]), _chunks(b[name])):
            ka, kb = _keys(ca, True), _keys(cb, True)
            for i, (cut_a, cut_b) in enumerate(cuts):
                inter[i] += int((cut_a.take(ka) & cut_b.take(kb)).sum())
    return {p: n / (2 * k - n) for p, n, k in zip(percents, inter, ks)}


def top_cuts(scores: Mapping, names: Sequence[str], percents: Sequence[float]) -> list[tuple[int, int]]:
    ks = [max(1, count_for(sum(math.prod(shape_of(scores, x)) for x in names), p)) for p in percents]
    return _kth_keys(lambda: (scores[x] for x in names), ks, True)


def topk_iou(a: Mapping, b: Mapping, names: Sequence[str], percent: float) -> float:
    return topk_ious(a, b, names, [percent])[percent]


def shape_of(scores: Mapping, name: str) -> tuple | None:
    """A score tensor's shape without reading it where the mapping allows; None when it is absent."""
    if name not in scores:
        return None
    return scores.shape(name) if isinstance(scores, MapFile) else tuple(scores[name].shape)


def shift_row(
    base: MapFile, other: MapFile, top_percent: Sequence[float] = (1, 5), base_cuts: list | None = None
) -> dict:
    """One row of the shift table: profile shift, ratio of total magnitudes, top-k% IoUs."""
    bs, os_ = base.summary(), other.summary()
    names = decoder_names(base)
    if decoder_names(other) != names or any(shape_of(base, k) != shape_of(other, k) for k in names):
        raise TextkeepError(
            f"'{other.path}' and '{base.path}' do not score the same parameters; compare maps of one architecture."
        )
    row = profile_shift(layer_sums_of(bs), layer_sums_of(os_))
    row["total_ratio"] = os_["total"] / bs["total"]
    row["layer_total_ratio"] = float(layer_sums_of(os_).sum() / layer_sums_of(bs).sum())
    for p, iou in topk_ious(base, other, names, top_percent, base_cuts).items():
        row[f"iou_top{p:g}"] = iou
    return row


def shift_markdown(rows: dict[str, dict], base_label: str, top_percent: Sequence[float]) -> str:
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


# ---- rank clustering (Fig 1) --------------------------------------------------------------------------------------
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


def seed_of(*parts) -> int:
    return int.from_bytes(hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()[:8], "little")


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
    """module type → name of that module's 2-D weight in `layer`."""
    meta = meta if meta is not None else getattr(scores, "meta", {})
    found = {}
    for name in scores:
        if name.endswith(".weight") and layer_index(name, meta) == layer and module_type(name) in modules:
            found[module_type(name)] = name
    missing = [m for m in modules if m not in found]
    if missing:
        raise TextkeepError(
            f"layer {layer} has no {', '.join(missing)} weight; choose modules among {', '.join(PROJ)} and a layer the model has."
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


# ---- parameter change (Fig 4) -------------------------------------------------------------------------------------
def parameter_change(base: torch.Tensor, tuned: torch.Tensor) -> torch.Tensor:
    """|θ_ft − θ_base| in float32."""
    if base.shape != tuned.shape:
        raise TextkeepError(
            f"weights of shape {tuple(tuned.shape)} and {tuple(base.shape)} cannot be compared; the checkpoints come from different base models."
        )
    return (tuned.float() - base.float()).abs()


def change_panel(base: torch.Tensor, tuned: torch.Tensor, top_percent: float = 5.0) -> dict:
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


# ---- writers --------------------------------------------------------------------------------------------------------
def jsonable(obj):
    """JSON-ready: numpy and torch values to Python, NaN/inf to None."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (np.ndarray, torch.Tensor)):
        return jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


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


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)


def _figure(**kw):
    from matplotlib.figure import Figure  # no pyplot: no global state, and the Agg canvas is used for saving

    return Figure(**kw)


def plot_layers(shares: dict[str, np.ndarray], title: str = "Layer-wise distribution of parameter importance"):
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
    """A grid of matrix heatmaps: one row per map/checkpoint, one column per module, a shared 0–1 colour bar."""
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


def _panel_numbers(panels: dict[str, dict[str, dict]]) -> dict:
    return {
        label: {m: {k: v for k, v in p.items() if k != "image"} for m, p in per.items()}
        for label, per in panels.items()
    }


def _panel_images(panels: dict[str, dict[str, dict]]) -> dict[str, np.ndarray]:
    return {f"{label}/{m}": p["image"].numpy() for label, per in panels.items() for m, p in per.items()}


# ---- commands -------------------------------------------------------------------------------------------------------
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
    out = Path(out)
    title = (
        f"Top {top_percent:g}% importance, layer {layer} (3×3 vicinity share, normalised; block-max pooled for display)"
    )
    numbers = {
        "maps": {lab: str(p) for lab, p in zip(labels, maps)},
        "layer": layer,
        "top_percent": top_percent,
        "padding": "zero",
        "panels": _panel_numbers(panels),
    }
    save_figure(plot_panels(panels, title, "share of top entries in 3×3 vicinity (÷ max)"), out / "clusters", numbers)
    _save_npz(out / "clusters_images.npz", _panel_images(panels))
    for label, per in panels.items():
        print(f"{label}: " + ", ".join(f"{m} ×{p['score']['ratio']:.2f}" for m, p in per.items()))
    return out


def _llm_weights(spec: str, layer: int | None, modules: Sequence[str]) -> tuple[dict[str, torch.Tensor], int]:
    """The chosen layer's module weights of a checkpoint (LoRA merged) or an LLM, and the layer used."""
    from textkeep.importance.maps import decoder_layers
    from textkeep.model.speech_llm import SpeechLLM, is_checkpoint, load_llm

    llm = SpeechLLM.load(spec).llm if is_checkpoint(spec) else load_llm(spec)[0]
    if hasattr(llm, "peft_config"):
        llm = llm.merge_and_unload()
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
    out = Path(out)
    title = f"|θ_ft − θ_base|, layer {layer} (÷ max per matrix; block-max pooled for display)"
    numbers = {
        "base": base,
        "checkpoints": dict(zip(labels, checkpoints)),
        "layer": layer,
        "top_percent": 5.0,
        "panels": _panel_numbers(panels),
    }
    save_figure(plot_panels(panels, title, "|Δθ| / max |Δθ|"), out / "change", numbers)
    _save_npz(out / "change_images.npz", _panel_images(panels))
    for label, per in panels.items():
        print(f"{label}: " + ", ".join(f"{m} ×{p['score']['ratio']:.2f}" for m, p in per.items()))
    return out
