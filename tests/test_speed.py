"""The speed settings of training (train/config.py `attention`, `compile`; runtime.speed_up) change how a step is
computed, never what it computes: one step with each against the defaults, on a tiny model. And the GPU check
(benchmarks/gpu_check.py) runs its code at tiny shapes on the CPU."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from textkeep.errors import TextkeepError

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("own_cache")


def _step(model, samples, out: Path, **settings):
    """One Full-FT step: (its loss, each LLM parameter's update, the LLM's parameter names)."""
    from textkeep.train.config import TrainConfig
    from textkeep.train.trainer import SampleList, fit

    base = {n: p.detach().clone() for n, p in model.llm.named_parameters()}
    cfg = TrainConfig(strategy="full", lr=1e-3, batch_size=4, grad_accum=1, max_steps=1, warmup_ratio=0.0,
                      precision="fp32", **settings)  # fmt: skip
    fit(model, SampleList(samples), out, cfg)
    loss = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    delta = {n: p.detach() - base[n] for n, p in model.llm.named_parameters()}
    return loss, delta, set(model.llm.state_dict())


@pytest.mark.parametrize("settings", [{"attention": "sdpa"}, {"compile": True}], ids=["sdpa", "compile"])
def test_a_speed_setting_computes_the_same_step_as_the_default(tiny_model, tmp_path, text_qa, settings):
    """Against the default (auto: eager attention on a CPU, not compiled), in fp32: the loss to 1e-5 relative and
    every update at cosine ≥ 0.9999. Compilation leaves the parameter names (checkpoints) as they were."""
    loss0, delta0, names0 = _step(copy.deepcopy(tiny_model), text_qa, tmp_path / "default")
    loss1, delta1, names1 = _step(copy.deepcopy(tiny_model), text_qa, tmp_path / "fast", **settings)
    assert loss1 == pytest.approx(loss0, rel=1e-5)
    assert names1 == names0
    for n, d in delta0.items():
        if d.abs().max() > 0:
            cos = torch.nn.functional.cosine_similarity(d.flatten().double(), delta1[n].flatten().double(), dim=0)
            assert float(cos) >= 0.9999, n


def test_attention_auto_is_eager_on_a_cpu_and_bad_values_are_refused():
    from textkeep.runtime import attention_of
    from textkeep.train.config import TrainConfig

    assert attention_of("auto", "cpu") == "eager"
    assert attention_of("sdpa", "cpu") == "sdpa"
    with pytest.raises(TextkeepError, match="attention must be one of auto, eager, sdpa"):
        TrainConfig(attention="flash")


def test_the_gpu_check_runs_at_tiny_shapes_on_the_cpu(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    out = tmp_path / "check.json"
    result = gpu_check.main(["--tiny", "--skip", "study", "--importance-batches", "2,4", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    t = result["train"]
    assert t["steps_timed"] == 2 and t["tokens_per_s"] > 0 and t["positions_per_example"] > 24
    assert t["mfu"] == pytest.approx(6 * t["parameters"] * t["tokens_per_s"] / (t["peak_tflops"] * 1e12))
    assert [r["batch"] for r in result["importance"]] == [2, 4]
    for r in result["importance"]:
        assert r["ratio"] == pytest.approx(r["importance_s"] / r["plain_s"]) and r["plain_s"] > 0
        assert isinstance(r["per_batch_ratio"], float)  # tiny timings are too noisy to bound
