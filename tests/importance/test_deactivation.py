"""Deactivation (Table 1): exact selection, exact restoration, and top > random > bottom on a memorising model."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from textkeep.errors import TextkeepError
from textkeep.importance import deactivation as D
from textkeep.importance import select as S
from textkeep.model.speech_llm import Sample

QA = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Who wrote Hamlet?", "William Shakespeare wrote Hamlet."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What is the capital of Italy?", "The capital of Italy is Rome."),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci painted it."),
    ("How many days are in a week?", "A week has seven days."),
]


def _bits(llm) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone().view(torch.int32) for k, p in llm.named_parameters()}  # -0.0 ≠ +0.0 here


def _brute_force_importance(model, samples) -> dict[str, torch.Tensor]:
    """|θ · ∂L/∂θ| with L the mean response-token loss over `samples`, in one batch."""
    model.llm.zero_grad(set_to_none=True)
    loss, n = model.loss_sum(model.tokenize(samples))
    (loss / n).backward()
    scores = {k: (p.detach() * p.grad).abs() for k, p in model.llm.named_parameters()}
    model.llm.zero_grad(set_to_none=True)
    return scores


# ---- choosing what to zero -------------------------------------------------------------------------------------------
def test_choose_counts_per_tensor_and_global(tiny_model):
    shapes = D.scope_names(tiny_model.llm)
    assert shapes and all(k.startswith("model.layers.") for k in shapes)
    assert "model.embed_tokens.weight" in D.scope_names(tiny_model.llm, include_embeddings=True)
    scores = {k: torch.rand(s, generator=torch.Generator().manual_seed(i)) for i, (k, s) in enumerate(shapes.items())}
    per_tensor = D.choose(scores, shapes, "top", 3.0, "tensor")
    for k, idx in per_tensor.items():
        assert len(idx) == S.count_for(scores[k].numel(), 3.0) and len(idx.unique()) == len(idx)
        assert float(scores[k].view(-1)[idx].min()) >= float(
            scores[k].view(-1).kthvalue(scores[k].numel() - len(idx) + 1).values
        )
    total = sum(s.numel() for s in scores.values())
    glob = D.choose(scores, shapes, "bottom", 3.0, "global")
    assert sum(len(i) for i in glob.values()) == S.count_for(total, 3.0) == D.n_deactivated(shapes, 3.0, "global")
    r0, r0_again, r1 = (D.choose(scores, shapes, "random", 3.0, "global", seed=s) for s in (0, 0, 1))
    assert all(torch.equal(r0[k], r0_again[k]) for k in shapes)  # seeded
    assert any(not torch.equal(r0[k], r1[k]) for k in shapes)


def test_choose_refuses_a_map_of_another_model(tiny_model):
    shapes = D.scope_names(tiny_model.llm)
    scores = {k: torch.rand(s) for k, s in shapes.items()}
    scores.pop("model.layers.1.mlp.up_proj.weight")
    with pytest.raises(TextkeepError, match="model.layers.1.mlp.up_proj.weight"):
        D.choose(scores, shapes, "top", 3.0)


# ---- restoration -----------------------------------------------------------------------------------------------------
def test_deactivation_restores_bit_for_bit_also_on_exception(tiny_model):
    llm = tiny_model.llm
    before = _bits(llm)
    shapes = D.scope_names(llm, include_embeddings=True)
    indices = D.choose({k: torch.rand(s) for k, s in shapes.items()}, shapes, "top", 30.0, "global")
    with D.deactivated(llm, indices):
        params = dict(llm.named_parameters())
        assert all(bool((params[k].view(-1)[i] == 0).all()) for k, i in indices.items())
    assert all(torch.equal(before[k], v) for k, v in _bits(llm).items())
    with pytest.raises(RuntimeError, match="measurement failed"):
        with D.deactivated(llm, indices):
            raise RuntimeError("measurement failed")
    assert all(torch.equal(before[k], v) for k, v in _bits(llm).items())
    # A failure while zeroing (the second tensor's indices are out of range) restores the first tensor too.
    first, second = list(shapes)[:2]
    with pytest.raises(IndexError):
        with D.deactivated(llm, {first: torch.arange(10), second: torch.tensor([10**9])}):
            pass
    assert all(torch.equal(before[k], v) for k, v in _bits(llm).items())


def test_lora_model_must_be_merged(tiny_model):
    from peft import LoraConfig, get_peft_model

    with pytest.raises(TextkeepError, match="merge"):
        D.scope_names(get_peft_model(tiny_model.llm, LoraConfig(r=2, target_modules=["q_proj"])))


# ---- the Table 1 experiment on a memorising tiny model ---------------------------------------------------------------
@pytest.fixture(scope="module")
def memorised(tiny_parts):
    """The tiny LLM after 60 clipped Adam steps on six QA pairs (mean response loss ≈ 0.07), and its
    brute-force importance map on them."""
    from textkeep.model.adaptor import SpeechAdaptor
    from textkeep.model.speech_llm import SpeechLLM, SpeechLLMConfig

    tok, llm, enc, fe = tiny_parts
    torch.manual_seed(0)
    config = SpeechLLMConfig(llm="tiny-llama", encoder="tiny-whisper", adaptor_hidden=64)
    model = SpeechLLM(
        copy.deepcopy(llm),
        copy.deepcopy(tok),
        copy.deepcopy(enc),
        fe,
        SpeechAdaptor(enc.config.d_model, llm.config.hidden_size, 5, 64),
        config,
    )
    samples = [Sample(text=q, response=a, id=str(i)) for i, (q, a) in enumerate(QA)]
    batch = model.tokenize(samples)
    opt = torch.optim.Adam(model.llm.parameters(), lr=3e-3)
    for _ in range(60):
        loss, n = model.loss_sum(batch)
        opt.zero_grad()
        (loss / n).backward()
        torch.nn.utils.clip_grad_norm_(model.llm.parameters(), 1.0)
        opt.step()
    assert loss.item() / n < 0.3, "the tiny model did not memorise its responses"
    return model, samples, _brute_force_importance(model, samples)


# p = 5%: across 8 random seeds and three training variants (40/60 steps, 4/6 pairs, lr 2e-3/3e-3) random stayed
# ≥ 4% above bottom in perplexity with this p; at 3% the per-tensor margin shrank to ~1%.
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("scope", ["tensor", "global"])
def test_top_removal_hurts_more_than_random_more_than_bottom(memorised, seed, scope):
    model, samples, importance = memorised
    before = _bits(model.llm)
    row = D.deactivation_table(model, importance, {"text": samples}, percent=5.0, scope=scope, seed=seed)["text"]
    assert row["top"] > 1.3 * row["random"], row
    assert row["random"] > row["bottom"] * 1.01, row
    assert row["bottom"] >= row["base"] * 0.999, row
    assert all(torch.equal(before[k], v) for k, v in _bits(model.llm).items())


def test_table_has_every_input_and_condition_and_markdown_like_table_1(tiny_model):
    from textkeep.eval.perplexity import perplexity

    g = torch.Generator().manual_seed(0)
    text = [Sample(text=q, response=a, id=str(i)) for i, (q, a) in enumerate(QA[:2])]
    speech = [
        Sample(speech=torch.randn(50, 32, generator=g), response=a, id=f"s{i}") for i, (_, a) in enumerate(QA[:2])
    ]
    scores = {k: torch.rand(p.shape, generator=g) for k, p in tiny_model.llm.named_parameters()}
    table = D.deactivation_table(tiny_model, scores, {"text": text, "speech": speech}, percent=3.0)
    assert set(table) == {"text", "speech"} and all(
        set(r) == {"base", "top", "bottom", "random"} for r in table.values()
    )
    assert table["speech"]["base"] == perplexity(tiny_model, speech)["ppl"]
    md = D.deactivation_markdown(
        {"tiny": table, "tiny-2": {"text": {"base": 3.65, "top": 2.68e5, "bottom": 3.81, "random": 6.39}}}, 3.0
    )
    lines = md.splitlines()
    assert lines[0] == "| Model | Input | Base | Top 3% removed | Bottom 3% removed | Random 3% removed |"
    assert lines[2].startswith("| tiny | Speech |") and lines[3].startswith("|  | Text |")  # speech first, as Table 1
    assert lines[4] == "| tiny-2 | Text | 3.65 | 2.68×10^5 | 3.81 | 6.39 |"


def test_deactivate_command_writes_json_and_markdown(tiny_model, tmp_path, monkeypatch):
    from textkeep.importance.maps import ImportanceMap

    monkeypatch.setenv("TEXTKEEP_CACHE_DIR", str(tmp_path / "cache"))
    tiny_model.save(tmp_path / "ckpt")
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"instruction": q, "response": a}) + "\n" for q, a in QA))
    samples = [Sample(text=q, response=a) for q, a in QA]
    ImportanceMap(_brute_force_importance(tiny_model, samples), {"layer_prefix": "model.layers", "n_layers": 4}).save(
        tmp_path / "map"
    )
    out = D.importance_deactivate(
        str(tmp_path / "ckpt"),
        tmp_path / "map",
        str(data),
        inputs=["text"],
        split="all",
        limit=4,
        out=tmp_path / "deact",
    )
    result = json.loads((out / "deactivation.json").read_text())
    assert result["n_examples"] == 4 and set(result["table"]) == {"text"}
    assert result["n_deactivated"] == D.n_deactivated(D.scope_names(tiny_model.llm), 3.0)
    assert "| ckpt | Text |" in (out / "deactivation.md").read_text()
    # Per-example sums for intervals over examples: in example order, adding up to each condition's perplexity.
    per = result["per_example"]["text"]
    assert set(per) == {"base", "top", "bottom", "random"} and len(result["example_ids"]) == 4
    for condition, r in per.items():
        assert len(r["losses"]) == len(r["n_tokens"]) == 4 and min(r["n_tokens"]) > 0
        ppl = math.exp(sum(r["losses"]) / sum(r["n_tokens"]))
        assert ppl == pytest.approx(result["table"]["text"][condition], rel=1e-5)


def test_deactivate_speech_inputs_use_the_records_with_audio(tiny_model, tmp_path, monkeypatch):
    import numpy as np
    import soundfile as sf

    from textkeep.importance.maps import ImportanceMap

    monkeypatch.setenv("TEXTKEEP_CACHE_DIR", str(tmp_path / "cache"))
    tiny_model.save(tmp_path / "ckpt")
    data = tmp_path / "qa.jsonl"
    data.write_text(
        "".join(json.dumps({"id": f"q{i}", "instruction": q, "response": a}) + "\n" for i, (q, a) in enumerate(QA))
    )
    rng = np.random.default_rng(0)
    rows = []
    for i in (1, 3):  # two of the four questions are spoken
        sf.write(tmp_path / f"q{i}.wav", (0.1 * rng.standard_normal(8000)).astype("float32"), 16000)
        rows.append({"id": f"q{i}", "audio": f"q{i}.wav"})
    (tmp_path / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    samples = [Sample(text=q, response=a) for q, a in QA]
    ImportanceMap(_brute_force_importance(tiny_model, samples), {"layer_prefix": "model.layers", "n_layers": 4}).save(
        tmp_path / "map"
    )
    with pytest.raises(TextkeepError, match="--spoken MANIFEST"):
        D.importance_deactivate(str(tmp_path / "ckpt"), tmp_path / "map", str(data), split="all", out=tmp_path / "none")
    out = D.importance_deactivate(
        str(tmp_path / "ckpt"),
        tmp_path / "map",
        str(data),
        split="all",
        spoken=tmp_path / "manifest.jsonl",
        out=tmp_path / "deact",
    )
    result = json.loads((out / "deactivation.json").read_text())
    assert result["n_examples"] == 2 and set(result["table"]) == {"text", "speech"}
    spoken_text = [Sample(text=QA[i][0], response=QA[i][1]) for i in (1, 3)]
    from textkeep.eval.perplexity import perplexity

    assert result["table"]["text"]["base"] == pytest.approx(perplexity(tiny_model, spoken_text)["ppl"], rel=1e-6)


def test_scope_without_norms_keeps_to_the_weight_matrices(tiny_model):
    every = D.scope_names(tiny_model.llm)
    matrices = D.scope_names(tiny_model.llm, include_norms=False)
    assert set(every) - set(matrices) == {n for n in every if "norm" in n} != set()
    assert all(len(shape) == 2 for shape in matrices.values())
