"""Exact top-k over many tensors: the selection engine behind deactivation (Table 1), the top-k% IoUs of the shift
table and the top-p% masks of Figs 1 and 4.

Choices:

- A two-pass radix select on the float32 bit patterns, 16 bits a pass, streaming over the tensors in chunks: nothing
  is sorted and no copy of all scores is kept (an 8B map is 32 GB in fp32).
- Ties at the threshold go to the earliest elements (tensor order, then flat index), so a selection holds exactly k
  elements and two maps with tied scores select alike.
- Runs on `textkeep.runtime.device()` (the GPU when there is one); indices come back on the CPU.
"""

from __future__ import annotations

import hashlib
import math
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from textkeep.errors import TextkeepError
from textkeep.runtime import device

_HALF = 1 << 16
_CHUNK = 1 << 24  # elements keyed at once (64 MB of int32 keys)


def seed_of(*parts) -> int:
    """A 64-bit seed from any parts (stable across runs and machines, unlike `hash`)."""
    return int.from_bytes(hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()[:8], "little")


def _as_source(tensors) -> Callable[[], Iterable[torch.Tensor]]:
    return tensors if callable(tensors) else (lambda: tensors)


def chunks(t: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
    """(flat offset, chunk on the selection device) over a tensor, at most `_CHUNK` elements each."""
    flat = t.detach().reshape(-1)
    where = device()
    for start in range(0, flat.numel(), _CHUNK):
        yield start, flat[start : start + _CHUNK].to(where)


def sort_keys(values: torch.Tensor, largest: bool) -> torch.Tensor:
    """int32 keys that order like the float32 values (reversed when not `largest`)."""
    bits = (values.float() + 0.0).contiguous().view(torch.int32)  # -0.0 + 0.0 is +0.0: equal floats share a key
    # Non-negative floats order like their bit patterns; negative ones in reverse, so flip their magnitude bits.
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return key if largest else ~key


def _key_value(key: int, largest: bool) -> float:
    key = key if largest else ~key
    bits = key if key >= 0 else key ^ 0x7FFFFFFF
    return float(np.array([bits], dtype=np.int32).view(np.float32)[0])


def kth_keys(tensors, ks: Sequence[int], largest: bool) -> list[tuple[int, int]]:
    """For each k: (key of the k-th largest element, how many elements have a larger key). Two streaming passes
    for all ks together: pass 1 histograms the high 16 bits of the keys and so finds the bucket holding each
    k-th element; pass 2 histograms the low 16 bits inside those buckets, which pins the exact key."""
    source = _as_source(tensors)
    hist = torch.zeros(_HALF, dtype=torch.long, device=device())
    total = 0
    for t in source():
        for _, c in chunks(t):
            if torch.isnan(c).any():
                raise TextkeepError("scores contain NaN; the importance map is damaged — compute it again.")
            hist += torch.bincount((sort_keys(c, largest) >> 16) + _HALF // 2, minlength=_HALF)
            total += c.numel()
    if not all(1 <= k <= total for k in ks):
        raise ValueError(f"every k must be in 1..{total}, got {list(ks)}")
    above = hist.cpu().flip(0).cumsum(0)  # above[j]: elements in the j+1 highest buckets
    first = []
    for k in ks:
        j = int(torch.searchsorted(above, k))
        first.append((_HALF - 1 - j - _HALF // 2, int(above[j - 1]) if j else 0))  # (high bits, elements above)
    low = {high: torch.zeros(_HALF, dtype=torch.long, device=device()) for high, _ in first}
    for t in source():
        for _, c in chunks(t):
            key = sort_keys(c, largest)
            high_of = key >> 16
            for high, h in low.items():
                h += torch.bincount(key[high_of == high] & 0xFFFF, minlength=_HALF)
    out = []
    for k, (high, n_above) in zip(ks, first):
        above = low[high].cpu().flip(0).cumsum(0)
        j = int(torch.searchsorted(above, k - n_above))
        out.append((high * _HALF + (_HALF - 1 - j), n_above + (int(above[j - 1]) if j else 0)))
    return out


class Cut:
    """The k largest keys as a stream of chunk masks: keys above the k-th, plus ties at it, earliest first.
    `key`, `n_beyond`: one entry of `kth_keys`. Feed it the chunks of the selection in order, once."""

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
    [(key, n_beyond)] = kth_keys(tensors, [k], largest)
    return _key_value(key, largest), n_beyond


def select_top(tensors, k: int, largest: bool = True) -> Iterator[torch.Tensor]:
    """Flat indices (on the CPU) of the k largest (smallest) elements, one index tensor per input tensor, in
    order. Exactly k in all: elements tied at the threshold are taken earliest first. Lazy: tensor by tensor."""
    source = _as_source(tensors)
    cut = Cut(*kth_keys(source, [k], largest)[0], k) if k > 0 else None
    for t in source():
        if cut is None:
            yield torch.zeros(0, dtype=torch.long)
            continue
        yield torch.cat([cut.take(sort_keys(c, largest)).nonzero().squeeze(1).cpu() + start for start, c in chunks(t)])


def count_for(n: int, percent: float) -> int:
    """Elements in `percent`% of n, rounded half up."""
    return int(math.floor(n * percent / 100 + 0.5))


def top_mask(scores: torch.Tensor, percent: float) -> torch.Tensor:
    """Boolean mask of the top `percent`% entries of one tensor (at least one)."""
    k = max(1, count_for(scores.numel(), percent))
    mask = torch.zeros(scores.numel(), dtype=torch.bool)
    mask[next(select_top([scores], k))] = True
    return mask.view(scores.shape)
