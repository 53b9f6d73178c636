"""Exact top-k: thresholds and selections equal a full sort, ties earliest first, per-matrix masks exact."""

from __future__ import annotations

import pytest
import torch

from textkeep.importance import select as S


def _tied_tensors():
    g = torch.Generator().manual_seed(0)
    return [
        torch.randint(-4, 5, (13, 17), generator=g).float() * 0.25,  # many ties, negatives and zeros
        torch.tensor([0.0, -0.0, 1.0, 1.0, 1.0, -1e-40, 1e-40, float("inf"), -float("inf")]),
        torch.randint(0, 3, (50,), generator=g).float(),
        torch.rand(4, 5, generator=g),
    ]


@pytest.mark.parametrize("chunk", [1 << 24, 7])  # 7: every tensor spans several chunks
@pytest.mark.parametrize("largest", [True, False])
def test_exact_threshold_and_selection_equal_full_sort_with_ties(monkeypatch, chunk, largest):
    monkeypatch.setattr(S, "_CHUNK", chunk)
    tensors = _tied_tensors()
    flat = torch.cat([t.flatten() for t in tensors])
    # A stable sort keeps equal values in position order: the earliest-first tie rule.
    order = torch.sort(flat, descending=largest, stable=True).indices
    offsets = torch.cumsum(torch.tensor([0] + [t.numel() for t in tensors]), 0)
    for k in [1, 2, 3, 10, 57, 150, 221, 300, len(flat) - 1, len(flat)]:
        value, n_beyond = S.kth_largest(tensors, k, largest)
        assert value == float(flat[order[k - 1]])
        assert n_beyond == int((flat > value).sum() if largest else (flat < value).sum())
        picked = torch.cat([idx + offsets[i] for i, idx in enumerate(S.select_top(tensors, k, largest))])
        assert sorted(picked.tolist()) == sorted(order[:k].tolist())


def test_kth_largest_on_many_values_matches_kthvalue():
    x = torch.randn(300_000, generator=torch.Generator().manual_seed(1)).abs()
    parts = [x[:100_000].view(100, 1000), x[100_000:]]
    value, _ = S.kth_largest(parts, 9_000)
    assert value == float(torch.kthvalue(x, x.numel() - 9_000 + 1).values)


def test_top_mask_is_exact_per_matrix():
    s = torch.arange(200.0).view(10, 20)
    m = S.top_mask(s, 5.0)
    assert int(m.sum()) == 10 and bool(m.view(-1)[-10:].all())
    ties = S.top_mask(torch.ones(10, 20), 5.0)  # all tied: exactly 10, the earliest
    assert int(ties.sum()) == 10 and bool(ties.view(-1)[:10].all())
