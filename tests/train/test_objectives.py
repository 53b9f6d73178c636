"""Alignment's losses against torch's references and a brute-force CTC."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from textkeep.train.objectives import CtcVocab, ctc_greedy, ctc_logits, ctc_loss, hidden_loss, kd_loss


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_kd_equals_torch_kl_div_at_the_temperature(temperature):
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(5, 11, generator=g), 3 * torch.randn(5, 11, generator=g)
    ref = F.kl_div(
        F.log_softmax(student / temperature, -1),
        F.log_softmax(teacher / temperature, -1),
        log_target=True,
        reduction="sum",
    )
    assert kd_loss(student, teacher, temperature) == pytest.approx(float(temperature**2 * ref), rel=1e-5)
    assert float(kd_loss(teacher, teacher, temperature)) == pytest.approx(0.0, abs=1e-6)


def _collapse(path: tuple[int, ...]) -> list[int]:
    out = [t for i, t in enumerate(path) if i == 0 or t != path[i - 1]]
    return [t for t in out if t != 0]


def test_ctc_on_the_restricted_vocabulary_equals_the_sum_over_every_path():
    # LLM vocabulary of 9 tokens; the transcripts use only tokens 2, 5 and 7; blank is token 0 (the pad row).
    g = torch.Generator().manual_seed(1)
    table = torch.randn(9, 6, generator=g)
    vocab = CtcVocab([5, 2, 7, 5], blank_id=0)
    assert vocab.ids.tolist() == [0, 2, 5, 7] and vocab.targets([7, 2]) == [3, 1]
    frames = torch.randn(4, 6, generator=g)  # four adaptor outputs
    logits = ctc_logits(frames, table, vocab)
    assert torch.allclose(logits, frames @ table[[0, 2, 5, 7]].T)  # scored against the vocabulary's own rows
    target = vocab.targets([7, 2])
    logp = logits.log_softmax(-1)
    total = sum(
        math.exp(sum(float(logp[t, c]) for t, c in enumerate(path)))
        for path in itertools.product(range(len(vocab)), repeat=4)
        if _collapse(path) == target
    )
    assert float(ctc_loss([logits], [target])) == pytest.approx(-math.log(total), rel=1e-5)
    # Two utterances of different lengths in one call add up.
    short = ctc_logits(torch.randn(2, 6, generator=g), table, vocab)
    both = ctc_loss([logits, short], [target, vocab.targets([5])])
    assert float(both) == pytest.approx(float(ctc_loss([logits], [target]) + ctc_loss([short], [[2]])), rel=1e-5)


def test_hidden_loss_is_zero_on_equal_states_and_scale_free_per_layer():
    g = torch.Generator().manual_seed(2)
    t = [torch.randn(7, 5, generator=g), 100 * torch.randn(7, 5, generator=g)]
    assert float(hidden_loss(t, t)) == 0.0
    s = [x + 0.1 * x.abs().mean() * torch.randn(7, 5, generator=g) for x in t]
    per_layer = [float((a - b).pow(2).mean() / b.pow(2).mean()) for a, b in zip(s, t)]
    assert float(hidden_loss(s, t)) == pytest.approx(sum(per_layer) / 2, rel=1e-5)


def test_ctc_greedy_decodes_the_collapsed_best_path_into_llm_token_ids():
    vocab = CtcVocab([5, 2, 7], blank_id=0)  # restricted index: 0 blank, 1 → 2, 2 → 5, 3 → 7
    best = [1, 1, 0, 1, 3, 3, 0, 0, 2]
    logits = F.one_hot(torch.tensor(best), len(vocab)).float() * 3 + 0.1 * torch.randn(len(best), len(vocab))
    assert ctc_greedy(logits, vocab) == [int(vocab.ids[i]) for i in _collapse(best)] == [2, 2, 7, 5]
    assert ctc_greedy(torch.zeros(3, 4).index_fill(1, torch.tensor([0]), 1.0), vocab) == []  # all blank


def test_ctc_segments_pool_one_embedding_per_heard_token():
    from textkeep.model.adaptor import SpeechAdaptor, pool_segments

    table = torch.eye(6) * 4  # token i's embedding points along axis i, so an output's best token is its argmax
    adaptor = SpeechAdaptor(1, 6, k=1, hidden=1)
    adaptor.set_ctc_vocab(torch.tensor([0, 3, 4]))  # blank = token 0
    best = [3, 3, 0, 3, 4, 4, 0]  # heard: 3 | 3 4 — the blank splits the repeat, as CTC's collapse does
    out = F.one_hot(torch.tensor(best), 6).float() + 0.01 * torch.randn(len(best), 6)
    seg = adaptor.ctc_segments(out, table)
    assert seg.tolist() == [0, 0, -1, 1, 2, 2, -1]
    pooled = pool_segments(out, seg)
    want = torch.stack([out[[0, 1]].mean(0), out[3], out[[4, 5]].mean(0)])
    torch.testing.assert_close(pooled, want)


@pytest.mark.parametrize("vocab_size", [9, 200])  # 9: the targets use every token, the rest column is empty
def test_ctc_loss_and_its_gradient_equal_torchs_over_the_full_vocabulary(vocab_size):
    g = torch.Generator().manual_seed(3)
    lengths = [13, 7, 10]
    targets = [[1, 4, 4, 2, 8], [3], [5, 6, 7, 1, 2, 3, 4, 8]]  # repeats need a blank between them
    logits = [(3 * torch.randn(n, vocab_size, generator=g)).requires_grad_() for n in lengths]
    got = ctc_loss(logits, targets)
    padded = torch.nn.utils.rnn.pad_sequence([x.log_softmax(-1) for x in logits])  # (T, B, V), torch's reference
    want = torch.nn.functional.ctc_loss(
        padded,
        torch.tensor([t for tgt in targets for t in tgt]),
        torch.tensor(lengths),
        torch.tensor([len(t) for t in targets]),
        blank=0,
        reduction="sum",
        zero_infinity=True,
    )
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    g_got = torch.autograd.grad(got, logits)
    g_want = torch.autograd.grad(want, logits)
    for a, b in zip(g_got, g_want):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
