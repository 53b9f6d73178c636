"""The strategies beyond the paper (train/guarded.py, layer-lr+lora), each against a computation done here by hand."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from textkeep.model.speech_llm import Sample
from textkeep.train.config import TrainConfig
from textkeep.train.guarded import Anchor, KdTextObjective
from textkeep.train.strategies import apply_lora, param_groups
from textkeep.train.trainer import SampleList, fit

RESPONSES = ["The capital of France is Paris.", "A spider has eight legs.", "Hamlet.", "Paris."]
QUESTIONS = ["What is the capital of France?", "How many legs?", "Who wrote it?", "Where?"]
LAYER_SCALES = [0.6, 1.0, 1 - 0.4 * 2 / 3, 1 - 0.4 / 3]  # Eq. 3 by hand for the layer sums below
LAYER_SUMS = [4.0, 1.0, 3.0, 2.0]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TEXTKEEP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")


class _Spoken(SampleList):
    """Spoken examples that know their transcripts, as SpeechExamples does through its records."""

    def __init__(self, model, n: int = 4):
        from textkeep.data.records import Record

        g = torch.Generator().manual_seed(1)
        d = model.encoder.config.d_model
        super().__init__(
            [
                Sample(speech=torch.randn(25 + 5 * i, d, generator=g), response=RESPONSES[i % 4], id=f"s{i}")
                for i in range(n)
            ]
        )
        self.records = [Record(id=f"s{i}", instruction=QUESTIONS[i % 4]) for i in range(n)]


def _write_map(llm, path: Path) -> Path:
    path.mkdir(parents=True)
    g = torch.Generator().manual_seed(5)
    scores = {n: torch.rand(p.shape, generator=g) for n, p in llm.named_parameters()}
    save_file(scores, str(path / "importance.safetensors"))
    layers = [{"layer": i, "sum": s} for i, s in enumerate(LAYER_SUMS)]
    (path / "summary.json").write_text(json.dumps({"layers": layers}))
    return path


def _fit(model, out, data, **kw):
    kw = {"lr": 3e-3, "batch_size": 2, "grad_accum": 2, "warmup_ratio": 0.0, "max_steps": 3, "save_every": 100, **kw}
    return fit(model, data, out, TrainConfig(**kw))


def test_masked_entries_stay_bit_identical_to_the_base_and_the_others_move(tiny_model, tmp_path):
    imp = _write_map(tiny_model.llm, tmp_path / "map")
    base = {n: p.detach().clone() for n, p in tiny_model.llm.named_parameters()}
    _fit(tiny_model, tmp_path / "run", _Spoken(tiny_model), strategy="masked", importance=imp, mask_top=0.3)
    scores = load_file(str(imp / "importance.safetensors"))
    for name, p in tiny_model.llm.named_parameters():
        flat = scores[name].flatten()
        k = round(0.3 * flat.numel())
        top = torch.zeros_like(flat, dtype=torch.bool)
        top[flat.argsort(descending=True)[:k]] = True  # the top 30% of this tensor, by sorting
        top = top.view(p.shape)
        same = p.detach() == base[name]
        assert same[top].all(), name
        assert (~same[~top]).float().mean() > 0.5, name  # the rest trained


def test_anchor_adds_the_gradient_of_its_penalty(tiny_model, tmp_path):
    imp = _write_map(tiny_model.llm, tmp_path / "map")
    anchor = Anchor(tiny_model.llm, imp, strength=0.7)
    params = dict(tiny_model.llm.named_parameters())
    base = {n: p.detach().to(torch.bfloat16).float() for n, p in params.items()}  # the anchor, as stored
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in params.values():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
            p.grad = torch.zeros_like(p)
    scores = load_file(str(imp / "importance.safetensors"))
    mean = sum(float(s.double().sum()) for s in scores.values()) / sum(s.numel() for s in scores.values())
    # By hand: s·Σ (I / mean I)(θ − θ⁰)², its gradient by autograd.
    hand = 0.7 * sum(((scores[n] / mean) * (p - base[n]).pow(2)).sum() for n, p in params.items())
    want = torch.autograd.grad(hand, list(params.values()))
    logged = anchor.before_step()["anchor"]
    assert logged == pytest.approx(float(hand.detach()), rel=1e-2)  # w is held in bf16
    for (name, p), w in zip(params.items(), want):
        torch.testing.assert_close(p.grad, w, rtol=1e-2, atol=1e-6, msg=name)


def test_an_anchor_pulls_the_weights_toward_the_base(tiny_model, tmp_path):
    imp = _write_map(tiny_model.llm, tmp_path / "map")
    twin = copy.deepcopy(tiny_model)
    moved = {}
    for model, strategy, strength in ((tiny_model, "full", 1.0), (twin, "anchor", 1e4)):
        base = [p.detach().clone() for p in model.llm.parameters()]
        _fit(model, tmp_path / strategy, _Spoken(model), strategy=strategy, importance=imp, anchor_strength=strength,
             max_steps=6)  # fmt: skip
        moved[strategy] = sum(float((p.detach() - b).pow(2).sum()) for p, b in zip(model.llm.parameters(), base))
    assert moved["anchor"] < 0.5 * moved["full"]


def test_layer_lr_lora_groups_carry_eq3s_scales(tiny_model):
    apply_lora(tiny_model, rank=4)
    groups = {g["name"]: g for g in param_groups(tiny_model, "layer-lr+lora", 1e-3, LAYER_SCALES)}
    named = {n: p for n, p in tiny_model.llm.named_parameters() if p.requires_grad}
    assert named and all("lora_" in n for n in named)
    for i, s in enumerate(LAYER_SCALES):
        assert groups[f"layer.{i}"]["lr"] == pytest.approx(1e-3 * s)
        want = {id(p) for n, p in named.items() if f".layers.{i}." in n}
        assert want and {id(p) for p in groups[f"layer.{i}"]["params"]} == want
    assert groups["adaptor"]["lr"] == 1e-3
    assert set(groups) == {"adaptor", *(f"layer.{i}" for i in range(4))}  # every LoRA weight is in a layer


def test_kd_text_loss_is_the_speech_cross_entropy_plus_the_weighted_text_kl(tiny_model):
    data = _Spoken(tiny_model)
    objective = KdTextObjective(tiny_model, {r.id: r.instruction for r in data.records}, weight=0.5, temperature=2.0)
    base = copy.deepcopy(tiny_model.llm)
    with torch.no_grad():  # the student drifts from the base, so the KL is not zero
        for p in tiny_model.llm.parameters():
            p.add_(0.02 * torch.randn_like(p))
    samples = data.samples([0, 1, 2])
    speech, text = objective.prepare(samples)
    got = objective(objective.prepare(samples))

    def full_logits(llm, batch, embeds=None):
        kw = {"inputs_embeds": embeds} if embeds is not None else {"input_ids": batch.input_ids}
        return llm(**kw, attention_mask=batch.attention_mask).logits[:, :-1].float()

    labels = speech.labels[:, 1:]
    ce = F.cross_entropy(
        full_logits(tiny_model.llm, speech, tiny_model.embed(speech)).flatten(0, 1), labels.flatten(),
        ignore_index=-100, reduction="sum",
    )  # fmt: skip
    keep = text.labels[:, 1:] != -100
    s = full_logits(tiny_model.llm, text)[keep] / 2.0
    t = full_logits(base, text)[keep] / 2.0
    kd = 4.0 * F.kl_div(s.log_softmax(-1), t.log_softmax(-1), log_target=True, reduction="sum")
    torch.testing.assert_close(got, ce + 0.5 * kd, rtol=1e-4, atol=1e-4)
    assert float(kd) > 1e-3


def test_kd_text_starts_at_zero_kl_and_trains(tiny_model, tmp_path):
    out = _fit(tiny_model, tmp_path / "run", _Spoken(tiny_model), strategy="kd-text", max_steps=3)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["parts"]["kd_text"] == pytest.approx(0.0, abs=1e-5)  # the student is the base at step 1
    assert rows[-1]["parts"]["kd_text"] > 0


@pytest.mark.parametrize(
    "bad,match",
    [
        ({"strategy": "masked"}, "strategy 'masked' needs importance"),
        ({"strategy": "anchor"}, "strategy 'anchor' needs importance"),
        ({"strategy": "layer-lr+lora"}, "strategy 'layer-lr\\+lora' needs importance"),
        ({"strategy": "full", "mask_top": 1.0}, "mask_top"),
        ({"strategy": "full", "anchor_strength": 0.0}, "anchor_strength"),
    ],
)
def test_bad_guarded_settings_are_refused(bad, match):
    from textkeep.errors import TextkeepError

    with pytest.raises(TextkeepError, match=match):
        TrainConfig(**bad)


def test_kd_text_refuses_spoken_examples_without_transcripts(tiny_model, tmp_path):
    from textkeep.errors import TextkeepError

    data = _Spoken(tiny_model)
    with pytest.raises(TextkeepError, match="transcripts"):
        _fit(tiny_model, tmp_path / "run", SampleList(list(data.samples(range(4)))), strategy="kd-text")
