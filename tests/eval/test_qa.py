"""QA evaluation on a tiny model: batching does not change answers, metrics follow from predictions, runs resume."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import soundfile as sf
import torch

from textkeep.eval.perplexity import perplexity
from textkeep.eval.qa import eval_qa, evaluate
from textkeep.eval.scoring import SCORERS, summarize
from textkeep.model.speech_llm import Sample


@pytest.fixture
def qa_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TEXTKEEP_CACHE_DIR", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    rows = []
    questions = [
        "What is the capital of France?",
        "Who wrote Hamlet?",
        "How many legs does a spider have?",
        "Hi?",
        "Name a planet.",
    ]
    for i, q in enumerate(questions):
        wav = tmp_path / f"q{i}.wav"
        sf.write(wav, (rng.standard_normal(int(16000 * (0.6 + 0.5 * i))) * 0.1).astype(np.float32), 16000)
        rows.append({"id": f"q{i}", "instruction": q, "answers": ["Paris", "the"][: 1 + i % 2], "audio": str(wav)})
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _predictions(out):
    return [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]


def test_batched_eval_equals_one_by_one(tiny_model, qa_file, tmp_path):
    kw = dict(max_new_tokens=5, progress=False)
    evaluate(tiny_model, [str(qa_file)], ["t2t", "s2t"], tmp_path / "b1", batch_size=1, **kw)
    evaluate(tiny_model, [str(qa_file)], ["t2t", "s2t"], tmp_path / "b4", batch_size=4, **kw)
    key = lambda r: (r["modality"], r["id"])  # noqa: E731
    one, many = sorted(_predictions(tmp_path / "b1"), key=key), sorted(_predictions(tmp_path / "b4"), key=key)
    assert len(one) == 10
    assert [r["prediction"] for r in one] == [r["prediction"] for r in many]


def test_metrics_follow_from_predictions(tiny_model, qa_file, tmp_path):
    metrics = evaluate(tiny_model, [str(qa_file)], ["t2t"], tmp_path / "out", max_new_tokens=5, progress=False)
    rows = _predictions(tmp_path / "out")
    for r in rows:  # each stored verdict is the scorer applied to the stored prediction
        assert r["correct"] == {name: fn(r["prediction"], r["answers"]) for name, fn in SCORERS.items()}
    on_disk = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert on_disk["results"] == summarize(rows) == json.loads(json.dumps(metrics["results"]))
    acc = on_disk["results"][str(qa_file)]["t2t"]["has_answer"]
    assert acc["n"] == 5 and acc["accuracy"] == sum(r["correct"]["has_answer"] for r in rows) / 5


def test_interrupted_run_resumes(tiny_model, qa_file, tmp_path, monkeypatch):
    out = tmp_path / "out"
    evaluate(tiny_model, [str(qa_file)], ["t2t"], out, max_new_tokens=5, batch_size=2, progress=False)
    full = (out / "predictions.jsonl").read_text().splitlines()
    # A kill mid-write: two whole lines and half of the third.
    (out / "predictions.jsonl").write_text(full[0] + "\n" + full[1] + "\n" + full[2][:10])
    asked = []
    original = tiny_model.generate
    monkeypatch.setattr(
        tiny_model, "generate", lambda samples, **kw: asked.extend(s.id for s in samples) or original(samples, **kw)
    )
    evaluate(tiny_model, [str(qa_file)], ["t2t"], out, max_new_tokens=5, batch_size=2, progress=False)
    done_before = {json.loads(full[0])["id"], json.loads(full[1])["id"]}
    assert sorted(asked) == sorted({f"q{i}" for i in range(5)} - done_before)
    assert sorted(_predictions(out), key=lambda r: r["id"]) == sorted(map(json.loads, full), key=lambda r: r["id"])


def test_changed_settings_are_refused(tiny_model, qa_file, tmp_path):
    from textkeep.errors import TextkeepError

    evaluate(tiny_model, [str(qa_file)], ["t2t"], tmp_path / "out", max_new_tokens=5, progress=False, limit=2)
    with pytest.raises(TextkeepError, match="other settings"):
        evaluate(tiny_model, [str(qa_file)], ["t2t"], tmp_path / "out", max_new_tokens=9, progress=False, limit=2)


def test_eval_command_loads_by_name_and_reports(qa_file, tmp_path, capsys):
    out = tmp_path / "out"
    metrics = eval_qa(
        model="tiny-llama",
        sets=[str(qa_file)],
        modes=["t2t", "s2t"],
        out=out,
        max_new_tokens=3,
        encoder="tiny-whisper",
        batch_size=4,
    )
    assert set(metrics["results"][str(qa_file)]) == {"t2t", "s2t"}
    assert len(_predictions(out)) == 10 and (out / "table.md").is_file()
    printed = capsys.readouterr().out
    assert "| tiny-llama |" in printed and f"{qa_file}/s2t: " in printed and f"results in {out}/" in printed


def test_perplexity_is_exp_of_mean_response_token_loss(tiny_model):
    samples = [
        Sample(text="What is the capital of France?", response="Paris."),
        Sample(text="Hi", response="Hello there, friend."),
        Sample(speech=torch.randn(37, 32), response="Eight legs."),
    ]
    got = perplexity(tiny_model, samples, batch_size=2)
    total, count = 0.0, 0
    with torch.no_grad():
        for s in samples:  # by hand: full logits, shift, keep response positions
            batch = tiny_model.tokenize([s])
            logits = tiny_model.logits(batch)[0, :-1]
            targets = batch.labels[0, 1:]
            keep = targets != -100
            logp = torch.log_softmax(logits[keep].double(), -1)
            total -= float(logp.gather(1, targets[keep, None]).sum())
            count += int(keep.sum())
    assert got["n_tokens"] == count
    assert math.isclose(got["ppl"], math.exp(total / count), rel_tol=1e-5)
