"""Rank clustering (Fig 1): vicinity averages, the clustering score, display pooling, and the figure."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from textkeep.importance import clusters as C


def test_vicinity_average_by_hand():
    mask = torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 1]], dtype=torch.bool)
    by_hand = torch.tensor([[1, 1, 0, 0], [1, 2, 2, 2], [0, 1, 2, 2]], dtype=torch.float32) / 9
    torch.testing.assert_close(C.vicinity_average(mask), by_hand)
    # 'nearest' repeats the edges: the corner 1 at (0, 0) is seen 4 times from itself.
    assert float(C.vicinity_average(mask, "nearest")[0, 0]) == pytest.approx(4 / 9)
    torch.testing.assert_close(C.normalise01(by_hand), by_hand / (2 / 9))


def _planted_mask(n_rows=256, n_cols=384, seed=0):
    """5% density, all of it on 8 rows and 8 columns (a rank-clustered pattern) at random positions."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(n_rows, n_cols, dtype=torch.bool)
    mask[torch.randperm(n_rows, generator=g)[:8]] = True
    mask[:, torch.randperm(n_cols, generator=g)[:8]] = True
    surplus = int(mask.sum()) - round(0.05 * mask.numel())  # the lines hold a little more than 5%: drop a few
    ones = mask.flatten().nonzero().squeeze(1)
    mask.view(-1)[ones[torch.randperm(len(ones), generator=g)[:surplus]]] = False
    return mask


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_clustering_score_sees_planted_rows_and_columns_not_random(seed):
    planted = C.clustering_score(_planted_mask(seed=seed))
    g = torch.Generator().manual_seed(seed)
    random = C.clustering_score(torch.rand(256, 384, generator=g) < 0.05)
    assert planted["ratio"] > 3 and planted["ratio_row"] > 2.5 and planted["ratio_col"] > 2
    assert 0.85 < random["ratio"] < 1.15 and 0.8 < random["ratio_row"] < 1.25 and 0.8 < random["ratio_col"] < 1.25
    rows_only = torch.zeros(256, 384, dtype=torch.bool)
    rows_only[:13] = True  # 13 of 256 rows = 5%: all ones in the top-10% rows
    s = C.clustering_score(rows_only)
    assert s["row"] == 1.0 and s["ratio_row"] > 4
    assert s["col"] == pytest.approx(39 / 384) and s["ratio_col"] < 1  # every column holds 13: more even than random


def test_concentration_by_hand():
    assert C.concentration([5, 1, 1, 1, 1, 1, 0, 0, 0, 0]) == pytest.approx(5 / 10)  # top ⌈10%·10⌉ = 1 row
    assert C.concentration([1] * 20) == pytest.approx(2 / 20)


def test_block_max_pooling_keeps_a_thin_row():
    x = torch.zeros(2048, 1000)
    x[777] = 1.0
    img, block = C.pool_for_display(x)
    assert block == (4, 2) and img.shape == (512, 500)
    assert float(img[777 // 4].min()) == 1.0 and float(img.sum()) == 500


def test_cluster_command_writes_figure_with_numbers(tiny_model, tmp_path, map_from, synthetic_scores):
    text = synthetic_scores(tiny_model.llm, 0)
    speech = synthetic_scores(tiny_model.llm, 1)
    q = "model.layers.2.self_attn.q_proj.weight"
    text[q][5] *= 50  # one hot row in the text map's layer-2 q_proj
    map_from(text, tmp_path / "text")
    map_from(speech, tmp_path / "speech")
    out = C.importance_clusters([tmp_path / "text", tmp_path / "speech"], out=tmp_path / "clusters")
    for ext in ("png", "svg", "json"):
        assert (out / f"clusters.{ext}").stat().st_size > 0
    numbers = json.loads((out / "clusters.json").read_text())
    assert numbers["layer"] == 2  # the middle of 4
    assert set(numbers["panels"]) == {"text", "speech"} and len(numbers["panels"]["text"]) == 7
    assert (
        numbers["panels"]["text"]["q_proj"]["score"]["ratio_row"]
        > numbers["panels"]["speech"]["q_proj"]["score"]["ratio_row"]
    )
    images = np.load(out / "clusters_images.npz")
    assert images["text/q_proj"].shape == (64, 64) and float(images["text/q_proj"].max()) == 1.0
