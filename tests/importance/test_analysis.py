"""Section 2 analyses: layer shares, shift, rank clustering, parameter change, and their figures."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from textkeep.importance import analysis as A
from textkeep.importance.maps import ImportanceMap


def _map_from(scores: dict[str, torch.Tensor], path, n_layers: int = 4):
    return ImportanceMap(scores, {"mode": "paper", "layer_prefix": "model.layers", "n_layers": n_layers}).save(path)


def _synthetic_scores(llm, seed: int, layer_boost: dict[int, float] | None = None) -> dict[str, torch.Tensor]:
    """Exponential scores shaped like the LLM's parameters; `layer_boost` multiplies chosen layers."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, p in llm.named_parameters():
        s = torch.empty(p.shape).exponential_(generator=g)
        layer = A.layer_index(name, {"layer_prefix": "model.layers"})
        out[name] = s * (layer_boost or {}).get(layer, 1.0)
    return out


# ---- layer distribution -------------------------------------------------------------------------------------------
def test_layer_shares_sum_to_one_and_match_hand_computation():
    shares = A.layer_shares([1.0, 2.0, 3.0, 4.0])
    np.testing.assert_allclose(shares, [0.1, 0.2, 0.3, 0.4])
    assert shares.sum() == pytest.approx(1.0)


def test_layer_shares_from_a_written_map(tiny_model, tmp_path):
    scores = _synthetic_scores(tiny_model.llm, 0)
    _map_from(scores, tmp_path / "m")
    shares = A.layer_shares(A.layer_sums_of(A.open_map(tmp_path / "m").summary()))
    by_hand = np.array(
        [
            sum(float(t.double().sum()) for k, t in scores.items() if k.startswith(f"model.layers.{i}."))
            for i in range(4)
        ]
    )
    np.testing.assert_allclose(shares, by_hand / by_hand.sum(), rtol=1e-6)
    assert shares.sum() == pytest.approx(1.0)
    per_module = A.module_layer_shares(A.open_map(tmp_path / "m").summary())
    np.testing.assert_allclose(sum(per_module.values()), shares, rtol=1e-6)  # every layer parameter has a listed type
    q0 = float(scores["model.layers.0.self_attn.q_proj.weight"].double().sum()) / by_hand.sum()
    assert per_module["q_proj"][0] == pytest.approx(q0, rel=1e-6)


# ---- shift ------------------------------------------------------------------------------------------------------------
def test_js_divergence_zero_for_identical_positive_for_shifted_and_symmetric():
    p, q = [1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]
    assert A.js_divergence(p, [2 * x for x in p]) == pytest.approx(0.0, abs=1e-12)  # scale does not matter
    assert A.js_divergence(p, q) > 0.05
    assert A.js_divergence(p, q) == pytest.approx(A.js_divergence(q, p), abs=1e-15)
    assert A.js_divergence([1, 0], [0, 1]) == pytest.approx(1.0)  # disjoint supports: one bit
    # p = (½, ½), q = (1, 0): m = (¾, ¼); JS = ½[½ log2(⅔) + ½ log2 2] + ½ log2(4/3)
    by_hand = 0.5 * (0.5 * math.log2(0.5 / 0.75) + 0.5 * math.log2(0.5 / 0.25)) + 0.5 * math.log2(1 / 0.75)
    assert A.js_divergence([0.5, 0.5], [1.0, 0.0]) == pytest.approx(by_hand, abs=1e-12)


def test_profile_shift_spearman_and_peaks_by_hand():
    r = A.profile_shift([1, 2, 3, 4, 5], [2, 1, 4, 3, 5])
    assert r["spearman"] == pytest.approx(1 - 6 * 4 / (5 * (25 - 1)))  # Σd² = 4
    assert (r["peak_base"], r["peak_other"]) == (4, 4)
    assert A.profile_shift([1, 5, 2], [3, 2, 1])["peak_other"] == 0


def test_topk_iou_by_hand():
    # 200 decoder-layer scores over two tensors; top 5% = 10 entries. a's top: values 190..199 (all in tensor 1);
    # b moves four of them into tensor 0, so 6 of 10 are shared: IoU = 6 / 14.
    a = {"model.layers.0.x.weight": torch.arange(100.0), "model.layers.1.x.weight": torch.arange(100.0, 200.0)}
    b = {k: v.clone() for k, v in a.items()}
    b["model.layers.1.x.weight"][96:] = 0.0
    b["model.layers.0.x.weight"][:4] = torch.tensor([500.0, 501.0, 502.0, 503.0])
    names = sorted(a)
    assert A.topk_iou(a, b, names, 5) == pytest.approx(6 / 14)
    assert A.topk_iou(a, a, names, 5) == 1.0
    # Ties: all equal scores → the same earliest-first pick in both maps.
    flat = {k: torch.ones(100) for k in names}
    assert A.topk_iou(flat, flat, names, 1) == 1.0


def test_shift_command_writes_json_and_table(tiny_model, tmp_path):
    base = _synthetic_scores(tiny_model.llm, 0)
    _map_from(base, tmp_path / "base")
    _map_from({k: v.clone() for k, v in base.items()}, tmp_path / "same")
    _map_from(_synthetic_scores(tiny_model.llm, 1, {0: 5.0}), tmp_path / "shifted")
    out = A.importance_shift(tmp_path / "base", [tmp_path / "same", tmp_path / "shifted"], out=tmp_path / "shift")
    rows = json.loads((out / "shift.json").read_text())["rows"]
    assert rows["same"]["js_divergence"] == pytest.approx(0.0, abs=1e-12)
    assert rows["same"]["iou_top1"] == rows["same"]["iou_top5"] == 1.0
    assert rows["same"]["total_ratio"] == pytest.approx(1.0)
    assert rows["shifted"]["js_divergence"] > 0.05 and rows["shifted"]["peak_other"] == 0
    assert rows["shifted"]["iou_top5"] < 0.5
    md = (out / "shift.md").read_text()
    assert "| shifted |" in md and "IoU top 5%" in md


# ---- rank clustering --------------------------------------------------------------------------------------------------
def test_vicinity_average_by_hand():
    mask = torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 1]], dtype=torch.bool)
    by_hand = torch.tensor([[1, 1, 0, 0], [1, 2, 2, 2], [0, 1, 2, 2]], dtype=torch.float32) / 9
    torch.testing.assert_close(A.vicinity_average(mask), by_hand)
    # 'nearest' repeats the edges: the corner 1 at (0, 0) is seen 4 times from itself.
    assert float(A.vicinity_average(mask, "nearest")[0, 0]) == pytest.approx(4 / 9)
    torch.testing.assert_close(A.normalise01(by_hand), by_hand / (2 / 9))


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
    planted = A.clustering_score(_planted_mask(seed=seed))
    g = torch.Generator().manual_seed(seed)
    random = A.clustering_score(torch.rand(256, 384, generator=g) < 0.05)
    assert planted["ratio"] > 3 and planted["ratio_row"] > 2.5 and planted["ratio_col"] > 2
    assert 0.85 < random["ratio"] < 1.15 and 0.8 < random["ratio_row"] < 1.25 and 0.8 < random["ratio_col"] < 1.25
    rows_only = torch.zeros(256, 384, dtype=torch.bool)
    rows_only[:13] = True  # 13 of 256 rows = 5%: all ones in the top-10% rows
    s = A.clustering_score(rows_only)
    assert s["row"] == 1.0 and s["ratio_row"] > 4
    assert s["col"] == pytest.approx(39 / 384) and s["ratio_col"] < 1  # every column holds 13: more even than random


def test_concentration_by_hand():
    assert A.concentration([5, 1, 1, 1, 1, 1, 0, 0, 0, 0]) == pytest.approx(5 / 10)  # top ⌈10%·10⌉ = 1 row
    assert A.concentration([1] * 20) == pytest.approx(2 / 20)


def test_top_mask_is_exact_per_matrix():
    s = torch.arange(200.0).view(10, 20)
    m = A.top_mask(s, 5.0)
    assert int(m.sum()) == 10 and bool(m.view(-1)[-10:].all())
    ties = A.top_mask(torch.ones(10, 20), 5.0)  # all tied: exactly 10, the earliest
    assert int(ties.sum()) == 10 and bool(ties.view(-1)[:10].all())


def test_block_max_pooling_keeps_a_thin_row():
    x = torch.zeros(2048, 1000)
    x[777] = 1.0
    img, block = A.pool_for_display(x)
    assert block == (4, 2) and img.shape == (512, 500)
    assert float(img[777 // 4].min()) == 1.0 and float(img.sum()) == 500


def test_cluster_command_writes_figure_with_numbers(tiny_model, tmp_path):
    text = _synthetic_scores(tiny_model.llm, 0)
    speech = _synthetic_scores(tiny_model.llm, 1)
    q = "model.layers.2.self_attn.q_proj.weight"
    text[q][5] *= 50  # one hot row in the text map's layer-2 q_proj
    _map_from(text, tmp_path / "text")
    _map_from(speech, tmp_path / "speech")
    out = A.importance_clusters([tmp_path / "text", tmp_path / "speech"], out=tmp_path / "clusters")
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


def test_layers_command_writes_figures_with_numbers(tiny_model, tmp_path):
    _map_from(_synthetic_scores(tiny_model.llm, 0), tmp_path / "base")
    _map_from(_synthetic_scores(tiny_model.llm, 1, {0: 4.0}), tmp_path / "full-ft")
    out = A.importance_layers(
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


# ---- parameter change ----------------------------------------------------------------------------------------------
def test_change_command_full_and_lora(tiny_model, tmp_path, monkeypatch):
    from peft import LoraConfig, get_peft_model

    monkeypatch.setenv("TEXTKEEP_CACHE_DIR", str(tmp_path / "cache"))
    tiny_model.save(tmp_path / "base")
    with torch.no_grad():  # a "full fine-tune" that moved 3 rows and 2 columns of layer 2's v_proj
        w = tiny_model.llm.model.layers[2].self_attn.v_proj.weight
        w[[1, 7, 9]] += 0.3
        w[:, [4, 40]] += 0.3
    tiny_model.save(tmp_path / "full")
    lora = get_peft_model(
        tiny_model.llm, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    tiny_model.llm = lora
    tiny_model.save(tmp_path / "lora")
    out = A.importance_change(
        str(tmp_path / "base"),
        [str(tmp_path / "full"), str(tmp_path / "lora")],
        labels=["Full-FT", "LoRA"],
        out=tmp_path / "change",
    )
    for ext in ("png", "svg", "json"):
        assert (out / f"change.{ext}").stat().st_size > 0
    panels = json.loads((out / "change.json").read_text())["panels"]
    v = panels["Full-FT"]["v_proj"]
    assert v["max_abs_change"] == pytest.approx(0.6, abs=1e-5) and v["score"]["ratio_row"] > 3
    assert panels["Full-FT"]["q_proj"]["max_abs_change"] == 0.0
    assert panels["Full-FT"]["q_proj"]["score"]["ratio"] is None  # no change: no top set to score
    assert panels["LoRA"]["q_proj"]["max_abs_change"] > 0  # merged LoRA moved q and v ...
    assert panels["LoRA"]["up_proj"]["max_abs_change"] == 0.0  # ... and nothing else
