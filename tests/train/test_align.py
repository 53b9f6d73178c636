"""Alignment on tiny models: it overfits four utterances until the speech path says what the text path says, the
LLM never moves, an interrupted run resumes bit-exactly, and bad input is refused by name."""

from __future__ import annotations

import json

import pytest
import torch

from textkeep.errors import TextkeepError
from textkeep.model.speech_llm import Sample
from textkeep.train.align import ALIGN_TRAIN, AlignConfig, AlignItem, AlignObjective, Phase, Teacher
from textkeep.train.config import TrainConfig
from textkeep.train.objectives import CtcVocab
from textkeep.train.trainer import fit

QUESTIONS = [
    "What is the capital of France?",
    "Who wrote Hamlet?",
    "How many legs does a spider have?",
    "What is the capital of the spider?",
]
ANSWERS = ["Paris.", "William Shakespeare wrote Hamlet.", "Eight legs.", "The spider has no capital."]


@pytest.fixture
def taught(tiny_model, tmp_path):
    """The tiny model after its LLM has learnt, by text, to answer the four questions (a random LLM's greedy
    answers are empty, which would make "speech answers as text does" trivial)."""
    from textkeep.train.trainer import SampleList

    texts = SampleList([Sample(text=q, response=a, id=f"t{i}") for i, (q, a) in enumerate(zip(QUESTIONS, ANSWERS))])
    cfg = TrainConfig(
        strategy="full", lr=5e-3, batch_size=4, grad_accum=1, max_steps=80, warmup_ratio=0.0, save_every=1000
    )
    fit(tiny_model, texts, tmp_path / "taught", cfg)
    tiny_model.eval()
    assert tiny_model.generate([Sample(text=q) for q in QUESTIONS], max_new_tokens=12) == ANSWERS
    return tiny_model


class _Items:
    """Four utterances held in memory (fit reads `lengths` and `samples`)."""

    def __init__(self, model, n_frames=(40, 45, 50, 55)):
        g = torch.Generator().manual_seed(0)
        d = model.encoder.config.d_model
        self.items = [
            AlignItem(torch.randn(n, d, generator=g), q, None, f"u{i}")
            for i, (n, q) in enumerate(zip(n_frames, QUESTIONS))
        ]
        self.lengths = [it.speech.shape[0] // 5 for it in self.items]

    def __len__(self):
        return len(self.items)

    def samples(self, idx):
        return [self.items[i] for i in idx]


def _align(model, out, cfg: AlignConfig, teacher_path=None, on_step=None, resume=False, **train):
    kw = {"batch_size": 4, "max_steps": 150, "lr": 3e-3, "warmup_ratio": 0.0, "save_every": 1000, "precision": "fp32"}
    tcfg = TrainConfig(**{**ALIGN_TRAIN.__dict__, **kw, **train})
    teacher = Teacher(model, teacher_path, cfg.answer_tokens, "fp32")
    data = _Items(model)
    fit(model, data, out, tcfg, resume=resume, objective=AlignObjective(model, cfg, teacher), on_step=on_step)
    return data, teacher


def _speech_answers(model, data):
    model.eval()
    return model.generate([Sample(speech=it.speech) for it in data.items], max_new_tokens=12)


def test_align_overfits_four_utterances_until_speech_answers_as_text_does(taught, tmp_path):
    llm_before = {n: p.detach().clone() for n, p in taught.llm.named_parameters()}
    cfg = AlignConfig(phases=[Phase({"self": 1.0, "kd": 1.0})], answer_tokens=12)
    data, teacher = _align(taught, tmp_path / "run", cfg, teacher_path=tmp_path / "teacher.jsonl")
    want = [teacher.answers[it.id] for it in data.items]
    assert want == ANSWERS  # the text path's own answers
    assert _speech_answers(taught, data) == want
    # The LLM is bit-identical: only the adaptor trained, and the checkpoint does not copy the LLM.
    assert all(torch.equal(p, llm_before[n]) for n, p in taught.llm.named_parameters())
    saved = json.loads((tmp_path / "run" / "model" / "textkeep_config.json").read_text())
    assert saved["llm_weights"] == "base" and saved["config"]["adaptor_trained"]
    # The teacher's answers were generated once each and kept with the run.
    cached = [json.loads(x)["id"] for x in (tmp_path / "teacher.jsonl").read_text().splitlines()]
    assert sorted(cached) == ["u0", "u1", "u2", "u3"]


class _Kill(Exception):
    pass


@pytest.mark.parametrize("masks", [{}, {"mask_time": 0.2, "mask_span": 3, "mask_channels": 0.1}])
def test_interrupted_alignment_resumes_bit_exactly(tiny_model, tiny_parts, tmp_path, masks):
    from tests.train.test_train import _fresh_tiny

    cfg = AlignConfig(
        phases=[Phase({"asr": 1.0}, steps=2), Phase({"kd": 1.0, "hidden": 0.5})], answer_tokens=4, **masks
    )
    kw = {"max_steps": 6, "save_every": 2, "batch_size": 2}
    _align(tiny_model, tmp_path / "whole", cfg, tmp_path / "whole.jsonl", **kw)

    def die(step, model):
        if step == 5:
            raise _Kill

    killed = _fresh_tiny(tiny_parts)
    with pytest.raises(_Kill):
        _align(killed, tmp_path / "cut", cfg, tmp_path / "cut.jsonl", on_step=die, **kw)
    resumed = _fresh_tiny(tiny_parts)  # a new process: nothing but the run folder carries over
    _align(resumed, tmp_path / "cut", cfg, tmp_path / "cut.jsonl", resume=True, **kw)
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "whole" / "model" / "adaptor.safetensors"))
    b = load_file(str(tmp_path / "cut" / "model" / "adaptor.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = lambda run: [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert [r["loss"] for r in rows("whole")] == [r["loss"] for r in rows("cut")]
    assert set(rows("whole")[0]["parts"]) == {"asr"} and set(rows("whole")[-1]["parts"]) == {"kd", "hidden"}


def test_nan_loss_stops_the_run_and_names_the_utterance(tiny_model, tmp_path):
    cfg = AlignConfig(phases=[Phase({"asr": 1.0})])
    data = _Items(tiny_model)
    data.items[2].speech[:] = float("nan")
    objective = AlignObjective(tiny_model, cfg, Teacher(tiny_model, None, 4, "fp32"))
    tcfg = TrainConfig(**{**ALIGN_TRAIN.__dict__, "batch_size": 1, "max_steps": 8, "precision": "fp32"})
    with pytest.raises(TextkeepError, match=r"loss is nan .*u2"):
        fit(tiny_model, data, tmp_path / "run", tcfg, objective=objective)


def test_a_record_without_transcript_is_refused_by_name(tiny_model):
    from textkeep.data.records import Record
    from textkeep.train.align import AlignExamples

    with pytest.raises(TextkeepError, match="record 'q7' has no transcript"):
        AlignExamples(tiny_model, [Record(id="q6", instruction="Hi"), Record(id="q7", instruction="  ")])


def test_ctc_skips_and_counts_utterances_shorter_than_their_transcript(tiny_model):
    tok = tiny_model.tokenizer
    ids = [t for q in QUESTIONS for t in tok(q, add_special_tokens=False)["input_ids"]]
    cfg = AlignConfig(phases=[Phase({"ctc": 1.0})])
    objective = AlignObjective(tiny_model, cfg, None, CtcVocab(ids, tok.pad_token_id))
    data = _Items(tiny_model, n_frames=(200, 10, 200, 200))  # u1: 2 adaptor outputs for a longer question
    loss = objective(data.items, 1)
    assert torch.isfinite(loss) and loss.requires_grad
    assert objective.parts()["ctc_skipped"] == 1.0


@pytest.mark.parametrize(
    "phases,match",
    [
        ([Phase({"magic": 1.0})], "magic"),
        ([Phase({"asr": 1.0}), Phase({"kd": 1.0})], "phase 0 needs steps"),
        ([], "at least one phase"),
    ],
)
def test_bad_alignment_settings_are_refused(phases, match):
    with pytest.raises(TextkeepError, match=match):
        AlignConfig(phases=phases)


def test_the_schedule_picks_each_steps_phase():
    cfg = AlignConfig(phases=[Phase({"asr": 1.0}, steps=3), Phase({"kd": 1.0}, steps=2), Phase({"self": 1.0})])
    assert [next(iter(cfg.mix_at(s))) for s in range(1, 9)] == ["asr"] * 3 + ["kd"] * 2 + ["self"] * 3


def test_chain_of_modality_answers_with_the_part_after_the_transcript(tiny_model, monkeypatch):
    from textkeep.model.speech_llm import CHAIN_TRANSCRIPT_TOKENS, chain_response

    tok = tiny_model.tokenizer
    said = chain_response("What is the capital of France?", "The capital of France is Paris.")
    budgets = []

    def generate_ids(samples, budget, min_new_tokens=0, slots=None):
        budgets.append(budget)
        return [tok(said, add_special_tokens=False)["input_ids"] for _ in samples]

    monkeypatch.setattr(tiny_model, "generate_ids", generate_ids)
    speech = Sample(speech=torch.zeros(30, tiny_model.encoder.config.d_model))
    assert tiny_model.generate([speech, Sample(text="Hi")], max_new_tokens=4) == [said, said]  # chain off
    tiny_model.config.speech_chain = True
    got = tiny_model.generate([speech, Sample(text="Hi")], max_new_tokens=4)
    first4 = tok.decode(tok("The capital of France is Paris.", add_special_tokens=False)["input_ids"][:4]).strip()
    assert got == [first4, said]  # the answer part, cut to the budget; a typed prompt is left alone
    assert budgets == [4, 4 + CHAIN_TRANSCRIPT_TOKENS]


def test_ctc_transcripts_are_the_heads_best_paths_decoded(tiny_model):
    from textkeep.train.align import ctc_transcripts
    from textkeep.train.objectives import ctc_greedy, ctc_logits

    m = tiny_model
    vocab = CtcVocab([5, 6, 7, 9], blank_id=m.tokenizer.pad_token_id)
    m.adaptor.set_ctc_vocab(vocab.ids)
    frames = [it.speech for it in _Items(m).items]
    table = m.llm.get_input_embeddings().weight
    with torch.no_grad():
        want = [m.tokenizer.decode(ctc_greedy(ctc_logits(m.adaptor(f[None])[0], table, vocab), vocab)) for f in frames]
    got = ctc_transcripts(m, frames, vocab)
    assert got == want and len(got) == 4 and any(got)


def test_batched_ctc_equals_the_loss_of_each_utterance_alone(tiny_model):
    from textkeep.train.objectives import ctc_logits, ctc_loss

    tok = tiny_model.tokenizer
    ids = [t for q in QUESTIONS for t in tok(q, add_special_tokens=False)["input_ids"]]
    vocab = CtcVocab(ids, tok.pad_token_id)
    tiny_model.adaptor.set_ctc_vocab(vocab.ids)
    with torch.no_grad():
        tiny_model.adaptor.ctc_log_scale.fill_(0.7)
    objective = AlignObjective(tiny_model, AlignConfig(phases=[Phase({"ctc": 1.0})]), None, vocab)
    items = _Items(tiny_model, n_frames=(203, 77, 161, 96)).items  # lengths not multiples of k, padded unevenly
    got = objective(items, 1)
    table, scale = tiny_model.llm.get_input_embeddings().weight, tiny_model.adaptor.ctc_scale()
    total, n_tokens = 0.0, 0
    for it in items:  # one utterance at a time, as the objective used to
        target = tok(it.transcript, add_special_tokens=False)["input_ids"]
        logits = ctc_logits(tiny_model.adaptor(it.speech[None])[0], table, vocab, scale)
        total = total + ctc_loss([logits], [vocab.targets(target)])
        n_tokens += len(target)
    torch.testing.assert_close(got, total / n_tokens, rtol=1e-5, atol=1e-5)
    (g_got,) = torch.autograd.grad(got, tiny_model.adaptor.proj[0].weight)
    (g_want,) = torch.autograd.grad(total / n_tokens, tiny_model.adaptor.proj[0].weight)
    torch.testing.assert_close(g_got, g_want, rtol=1e-4, atol=1e-6)


def test_a_continued_ctc_head_keeps_its_rows_and_scale_and_adds_the_new_transcripts_tokens(tiny_model):
    from textkeep.data.records import Record
    from textkeep.train.align import ctc_vocabulary

    tok = tiny_model.tokenizer
    first = [Record(id="a", instruction=QUESTIONS[0]), Record(id="b", instruction=QUESTIONS[1])]
    vocab = ctc_vocabulary(tiny_model, first, training_ctc=True)
    with torch.no_grad():
        tiny_model.adaptor.ctc_log_scale.fill_(1.3)
    old = set(vocab.ids.tolist())
    more = [Record(id="c", instruction=QUESTIONS[2])]
    assert ctc_vocabulary(tiny_model, more, training_ctc=False).ids.tolist() == vocab.ids.tolist()  # kd: unchanged
    grown = ctc_vocabulary(tiny_model, more, training_ctc=True)
    new = set(tok(QUESTIONS[2], add_special_tokens=False)["input_ids"])
    assert set(grown.ids.tolist()) == old | new and grown.ids[0] == vocab.ids[0]  # same blank, union of rows
    assert tiny_model.adaptor.ctc_ids.tolist() == grown.ids.tolist()
    assert tiny_model.adaptor.ctc_log_scale.item() == pytest.approx(1.3)


def test_utterances_longer_than_whispers_window_are_left_out_and_counted(tmp_path, capsys):
    import numpy as np
    import soundfile as sf

    from textkeep.data.records import Record
    from textkeep.train.align import fitting_window

    records = []
    for i, seconds in enumerate((1.0, 31.0, 29.5)):
        path = tmp_path / f"u{i}.wav"
        sf.write(path, np.zeros(int(16000 * seconds), dtype=np.float32), 16000)
        records.append(Record(id=f"u{i}", instruction="hello", audio=str(path)))
    assert [r.id for r in fitting_window(records)] == ["u0", "u2"]
    assert "left out 1 utterances longer than Whisper's 30 s window" in capsys.readouterr().out


def test_spec_augment_fills_spans_and_channels_with_the_mean_and_draws_by_key():
    from textkeep.train.align import spec_augment

    frames = torch.randn(200, 40, dtype=torch.float64)
    cfg = AlignConfig(mask_time=0.3, mask_span=10, mask_channels=0.1)
    out = spec_augment(frames, cfg, "utt-1:7")
    mean = frames.mean(0)
    masked_channels = [c for c in range(40) if torch.equal(out[:, c], mean[c].expand(200))]
    assert len(masked_channels) == 4  # round(0.1 · 40)
    rest = [c for c in range(40) if c not in masked_channels]
    masked_rows = (out[:, rest] == mean[rest]).all(1)
    assert 10 <= int(masked_rows.sum()) <= 60  # 6 spans of 10 frames, which may overlap
    assert torch.equal(out[~masked_rows][:, rest], frames[~masked_rows][:, rest])  # the rest untouched
    runs = masked_rows.int().diff().ne(0).sum()  # span edges: every masked stretch is at least one whole span
    assert int(runs) <= 12
    assert torch.equal(spec_augment(frames, cfg, "utt-1:7"), out)  # the same utterance and step: the same masks
    assert not torch.equal(spec_augment(frames, cfg, "utt-1:8"), out)
    assert torch.equal(spec_augment(frames, AlignConfig(), "utt-1:7"), frames)  # off by default


@pytest.mark.parametrize("bad", [{"mask_time": 1.0}, {"mask_channels": -0.1}, {"mask_span": 0}])
def test_bad_mask_settings_are_refused(bad):
    with pytest.raises(TextkeepError, match="mask_"):
        AlignConfig(**bad)


def test_a_question_spoken_in_several_voices_is_held_out_in_every_voice():
    from pathlib import Path

    from textkeep.data.records import Record
    from textkeep.train.align import split_heldout

    def spoken(voice):
        return [Record(f"q{i}", f"question {i}?", "a", Path(f"{voice}/q{i}.wav"), ("a",)) for i in range(20)]

    alpaca = [Record(f"i{i}", f"instruction {i}", "r") for i in range(5)]  # no gold answers: never held out
    one_train, one_held = split_heldout(spoken("kal") + alpaca, 6, seed=3)
    train, held = split_heldout(spoken("kal") + alpaca + spoken("joe") + spoken("slt"), 6, seed=3)
    assert held == one_held  # the same questions, in their first copy's voice
    assert {r.id for r in held}.isdisjoint(r.id for r in train)
    assert len(train) == len(one_train) + 2 * (20 - 6)
    # an answer spoken in a frame leaves training with any question it answers
    framed = [Record(f"a{i}", f"who is a{i}?", meta={"of": [f"q{i}", f"q{i + 1}"]}) for i in range(19)]
    train, held = split_heldout(spoken("kal") + framed, 6, seed=3)
    gone = {int(r.id[1:]) for r in held}
    assert {r.id for r in train if r.id.startswith("a")} == {f"a{i}" for i in range(19) if not {i, i + 1} & gone}
