"""Layer-wise distribution (Figs 2, 3): layer shares from maps and their figures."""

from __future__ import annotations

import json

import numpy as np
import pytest

from textkeep.importance import layers as L
from textkeep.importance.maps import open_map


def test_layer_shares_sum_to_one_and_match_hand_computation():
    shares = L.layer_shares([1.0, 2.0, 3.0, 4.0])
    np.testing.assert_allclose(shares, [0.1, 0.2, 0.3, 0.4])
    assert shares.sum() == pytest.approx(1.0)


def test_layer_shares_from_a_written_map(tiny_model, tmp_path, map_from, synthetic_scores):
    scores = synthetic_scores(tiny_model.llm, 0)
    map_from(scores, tmp_path / "m")
    shares = L.layer_shares(L.layer_sums_of(open_map(tmp_path / "m").summary()))
    by_hand = np.array(
        [
            sum(float(t.double().sum()) for k, t in scores.items() if k.startswith(f"model.layers.{i}."))
            for i in range(4)
        ]
    )
    np.testing.assert_allclose(shares, by_hand / by_hand.sum(), rtol=1e-6)
    assert shares.sum() == pytest.approx(1.0)
    per_module = L.module_layer_shares(open_map(tmp_path / "m").summary())
    np.testing.assert_allclose(sum(per_module.values()), shares, rtol=1e-6)  # every layer parameter has a listed type
    q0 = float(scores["model.layers.0.self_attn.q_proj.weight"].double().sum()) / by_hand.sum()
    assert per_module["q_proj"][0] == pytest.approx(q0, rel=1e-6)


def test_layers_command_writes_figures_with_numbers(tiny_model, tmp_path, map_from, synthetic_scores):
    map_from(synthetic_scores(tiny_model.llm, 0), tmp_path / "base")
    map_from(synthetic_scores(tiny_model.llm, 1, {0: 4.0}), tmp_path / "full-ft")
    out = L.importance_layers(
        [tmp_path / "base", tmp_path / "full-ft"], labels=["Base", "Full-FT"], out=tmp_path / "layers", by_module=True
    )
    for stem in ("layers", "layers_by_module"):
        for ext in ("png", "svg", "json"):
            assert (out / f"{stem}.{ext}").stat().st_size > 0
    numbers = json.loads((out / "layers.json").read_text())
    assert sum(numbers["shares"]["Base"]) == pytest.approx(1.0)
    assert numbers["peak_layer"]["Full-FT"] == 0
    assert set(json.loads((out / "layers_by_module.json").read_text())["module_shares"]["Base"]) >= {
        "q_proj",
        "down_proj",
        "norms",
    }
