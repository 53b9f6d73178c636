"""Perplexity of reference responses given the input (text or speech), as the paper's Table 1 measures it.

Protocol: teacher forcing on the prompt + reference response; only the response tokens and the end-of-turn
token that closes them are scored; perplexity = exp(Σ token losses / Σ tokens) over the whole set (token-weighted,
not a mean of per-example perplexities).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from textkeep.data.samples import length_grouped_batches


@torch.no_grad()
def perplexity(model, samples: Sequence, batch_size: int = 8) -> dict:
    """`samples` carry responses (see data.samples.make_samples). Returns ppl, mean token loss and token count."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for idx in length_grouped_batches(samples, batch_size, model.config.adaptor_k):
        loss, n = model.loss_sum(model.tokenize([samples[i] for i in idx]))
        total += float(loss)
        count += n
    model.train(was_training)
    mean = total / max(count, 1)
    return {"ppl": math.exp(mean) if count else float("nan"), "loss": mean, "n_tokens": count}
