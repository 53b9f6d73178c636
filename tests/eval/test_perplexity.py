"""Perplexity's per-example sums: taken from the batched forward, equal to each example measured alone."""

from __future__ import annotations

import math

import pytest
import torch

from textkeep.eval.perplexity import perplexity
from textkeep.model.speech_llm import Sample


def test_per_example_sums_from_a_batch_equal_each_example_alone_and_add_up(tiny_model):
    g = torch.Generator().manual_seed(0)
    samples = [
        Sample(text="What is the capital of France?", response="Paris.", id="a"),
        Sample(text="Hi", response="Hello there, friend.", id="b"),
        Sample(speech=torch.randn(37, 32, generator=g), response="Eight legs.", id="c"),
        Sample(text="Who wrote Hamlet?", response="William Shakespeare wrote Hamlet, in about 1600.", id="d"),
        Sample(speech=torch.randn(80, 32, generator=g), response="Rome.", id="e"),
    ]
    batched = perplexity(tiny_model, samples, batch_size=3, per_example=True)  # batches of 3 and 2, padded
    each = batched["per_example"]
    assert len(each["losses"]) == len(each["n_tokens"]) == len(samples)
    for s, loss, n in zip(samples, each["losses"], each["n_tokens"]):
        alone = perplexity(tiny_model, [s])
        assert n == alone["n_tokens"] > 0, s.id
        assert loss == pytest.approx(alone["loss"] * alone["n_tokens"], rel=1e-5), s.id  # in the order of samples
    assert sum(each["n_tokens"]) == batched["n_tokens"]
    assert sum(each["losses"]) == pytest.approx(batched["loss"] * batched["n_tokens"], rel=1e-6)
    plain = perplexity(tiny_model, samples, batch_size=3)  # the totals do not depend on asking for per-example sums
    assert "per_example" not in plain and plain["ppl"] == batched["ppl"] and plain["n_tokens"] == batched["n_tokens"]
    assert math.isfinite(batched["ppl"])
