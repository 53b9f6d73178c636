"""Shift between two maps: JS divergence, Spearman ρ and peaks, top-k% IoU, and the shift table."""

from __future__ import annotations

import json
import math

import pytest
import torch

from textkeep.importance import shift as H


def test_js_divergence_zero_for_identical_positive_for_shifted_and_symmetric():
    p, q = [1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]
    assert H.js_divergence(p, [2 * x for x in p]) == pytest.approx(0.0, abs=1e-12)  # scale does not matter
    assert H.js_divergence(p, q) > 0.05
    assert H.js_divergence(p, q) == pytest.approx(H.js_divergence(q, p), abs=1e-15)
    assert H.js_divergence([1, 0], [0, 1]) == pytest.approx(1.0)  # disjoint supports: one bit
    # p = (½, ½), q = (1, 0): m = (¾, ¼); JS = ½[½ log2(⅔) + ½ log2 2] + ½ log2(4/3)
    by_hand = 0.5 * (0.5 * math.log2(0.5 / 0.75) + 0.5 * math.log2(0.5 / 0.25)) + 0.5 * math.log2(1 / 0.75)
    assert H.js_divergence([0.5, 0.5], [1.0, 0.0]) == pytest.approx(by_hand, abs=1e-12)


def test_profile_shift_spearman_and_peaks_by_hand():
    r = H.profile_shift([1, 2, 3, 4, 5], [2, 1, 4, 3, 5])
    assert r["spearman"] == pytest.approx(1 - 6 * 4 / (5 * (25 - 1)))  # Σd² = 4
    assert (r["peak_base"], r["peak_other"]) == (4, 4)
    assert H.profile_shift([1, 5, 2], [3, 2, 1])["peak_other"] == 0


def test_topk_iou_by_hand():
    # 200 decoder-layer scores over two tensors; top 5% = 10 entries. a's top: values 190..199 (all in tensor 1);
    # b moves four of them into tensor 0, so 6 of 10 are shared: IoU = 6 / 14.
    a = {"model.layers.0.x.weight": torch.arange(100.0), "model.layers.1.x.weight": torch.arange(100.0, 200.0)}
    b = {k: v.clone() for k, v in a.items()}
    b["model.layers.1.x.weight"][96:] = 0.0
    b["model.layers.0.x.weight"][:4] = torch.tensor([500.0, 501.0, 502.0, 503.0])
    names = sorted(a)
    assert H.topk_iou(a, b, names, 5) == pytest.approx(6 / 14)
    assert H.topk_iou(a, a, names, 5) == 1.0
    # Ties: all equal scores → the same earliest-first pick in both maps.
    flat = {k: torch.ones(100) for k in names}
    assert H.topk_iou(flat, flat, names, 1) == 1.0


def test_shift_command_writes_json_and_table(tiny_model, tmp_path, map_from, synthetic_scores):
    base = synthetic_scores(tiny_model.llm, 0)
    map_from(base, tmp_path / "base")
    map_from({k: v.clone() for k, v in base.items()}, tmp_path / "same")
    map_from(synthetic_scores(tiny_model.llm, 1, {0: 5.0}), tmp_path / "shifted")
    out = H.importance_shift(tmp_path / "base", [tmp_path / "same", tmp_path / "shifted"], out=tmp_path / "shift")
    rows = json.loads((out / "shift.json").read_text())["rows"]
    assert rows["same"]["js_divergence"] == pytest.approx(0.0, abs=1e-12)
    assert rows["same"]["iou_top1"] == rows["same"]["iou_top5"] == 1.0
    assert rows["same"]["total_ratio"] == pytest.approx(1.0)
    assert rows["shifted"]["js_divergence"] > 0.05 and rows["shifted"]["peak_other"] == 0
    assert rows["shifted"]["iou_top5"] < 0.5
    md = (out / "shift.md").read_text()
    assert "| shifted |" in md and "IoU top 5%" in md
