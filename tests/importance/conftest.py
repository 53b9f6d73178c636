"""Shared by the analysis tests: importance maps written from synthetic scores shaped like a model's parameters."""

from __future__ import annotations

import pytest
import torch

from textkeep.importance.maps import ImportanceMap, layer_index


def _map_from(scores: dict[str, torch.Tensor], path, n_layers: int = 4):
    return ImportanceMap(scores, {"mode": "paper", "layer_prefix": "model.layers", "n_layers": n_layers}).save(path)


def _synthetic_scores(llm, seed: int, layer_boost: dict[int, float] | None = None) -> dict[str, torch.Tensor]:
    """Exponential scores shaped like the LLM's parameters; `layer_boost` multiplies chosen layers."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, p in llm.named_parameters():
        s = torch.empty(p.shape).exponential_(generator=g)
        layer = layer_index(name, {"layer_prefix": "model.layers"})
        out[name] = s * (layer_boost or {}).get(layer, 1.0)
    return out


@pytest.fixture
def map_from():
    """map_from(scores, path, n_layers=4): save `scores` as a map directory of a model with model.layers."""
    return _map_from


@pytest.fixture
def synthetic_scores():
    """synthetic_scores(llm, seed, layer_boost=None): exponential scores shaped like the LLM's parameters."""
    return _synthetic_scores
