"""The precision setting (fp32 | bf16 | auto) through its one mechanism (runtime.autocast / fit's autocast): a bf16
training step, importance map, perplexity and greedy generation against fp32, within stated tolerances."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from textkeep.errors import TextkeepError
from textkeep.model.speech_llm import Sample
from textkeep.runtime import precision_of

pytestmark = pytest.mark.usefixtures("own_cache")


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def test_a_bf16_training_step_matches_fp32_within_tolerance(tiny_model, tmp_path, text_qa):
    """Tolerances: the loss within 2% and each LLM tensor's update at cosine ≥ 0.95 to fp32's (bf16 keeps 8 bits
    of mantissa; master weights and AdamW's state stay fp32, so the update differs only through the gradient)."""
    from textkeep.train.config import TrainConfig
    from textkeep.train.trainer import SampleList, fit

    runs = {}
    for precision in ("fp32", "bf16"):
        model = copy.deepcopy(tiny_model)
        base = {n: p.detach().clone() for n, p in model.llm.named_parameters()}
        cfg = TrainConfig(strategy="full", lr=1e-3, batch_size=4, grad_accum=1, max_steps=1, warmup_ratio=0.0,
                          precision=precision)  # fmt: skip
        out = fit(model, SampleList(text_qa), tmp_path / precision, cfg)
        row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
        delta = {n: p.detach() - base[n] for n, p in model.llm.named_parameters()}
        assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32
        runs[precision] = (row["loss"], delta)
    (loss32, d32), (loss16, d16) = runs["fp32"], runs["bf16"]
    assert loss16 == pytest.approx(loss32, rel=0.02)
    assert loss16 != loss32  # bf16 really ran
    moved = [n for n in d32 if d32[n].abs().max() > 0]
    assert moved
    for n in moved:
        assert _cos(d16[n], d32[n]) >= 0.95, n


def test_a_bf16_importance_map_matches_fp32_within_tolerance(tiny_model, text_qa):
    """Tolerances: every decoder layer's summed importance within 5% and each tensor's map at cosine ≥ 0.98."""
    from textkeep.importance.compute import compute_importance
    from textkeep.importance.maps import layer_sums

    maps = {
        p: compute_importance(tiny_model, text_qa, batch_size=2, progress=False, precision=p) for p in ("fp32", "bf16")
    }
    assert all(t.dtype == torch.float32 for t in maps["bf16"].scores.values())  # accumulated in fp32
    for a, b in zip(layer_sums(maps["bf16"]), layer_sums(maps["fp32"])):
        assert a == pytest.approx(b, rel=0.05)
    for name, s32 in maps["fp32"].scores.items():
        assert _cos(maps["bf16"].scores[name], s32) >= 0.98, name
    assert maps["bf16"].scores.keys() == maps["fp32"].scores.keys()
    assert any(not torch.equal(maps["bf16"].scores[n], s) for n, s in maps["fp32"].scores.items())  # bf16 ran


def test_bf16_perplexity_and_greedy_answers_are_close_to_fp32(tiny_model, text_qa):
    from textkeep.eval.perplexity import perplexity
    from textkeep.runtime import autocast

    p32 = perplexity(tiny_model, text_qa, batch_size=2, per_example=True)
    p16 = perplexity(tiny_model, text_qa, batch_size=2, per_example=True, precision="bf16")
    assert p16["n_tokens"] == p32["n_tokens"]
    assert p16["loss"] == pytest.approx(p32["loss"], rel=0.02)
    assert p16["loss"] != p32["loss"]  # bf16 really ran
    prompts = [Sample(text=s.text) for s in text_qa]
    with autocast("bf16", tiny_model.device):
        answers16 = tiny_model.generate(prompts, max_new_tokens=6)
    assert len(answers16) == len(prompts) and all(isinstance(a, str) for a in answers16)


def test_a_bad_precision_is_refused_by_name():
    with pytest.raises(TextkeepError, match="precision must be fp32, bf16 or auto"):
        precision_of("fp16")
    assert precision_of("fp32") == "no" and precision_of("bf16") == "bf16"


@pytest.mark.parametrize("native", [True, False])
def test_auto_is_bf16_on_a_cpu_only_where_it_multiplies_bf16_natively(monkeypatch, native):
    import textkeep.runtime as runtime

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: native)
    assert precision_of("auto") == ("bf16" if native else "no")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # accelerate's own setting wins
    assert precision_of("auto") == "no"
