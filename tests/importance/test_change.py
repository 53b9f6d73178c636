"""Parameter change (Fig 4): full fine-tuning and merged LoRA against the base."""

from __future__ import annotations

import json

import pytest
import torch

from textkeep.importance import change as G


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
    out = G.importance_change(
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
