"""Perplexity of reference responses given the input (text or speech), as the paper's Table 1 measures it.

Protocol: teacher forcing on the prompt + reference response; only the response tokens and the end-of-turn
token that closes them are scored; perplexity = exp(Σ token losses / Σ tokens) over the whole set (token-weighted,
not a mean of per-example perplexities). Per-example sums (`per_example=True`) come from the same batched forward,
so that intervals over examples (a paired bootstrap of perplexity ratios) can be drawn from one measurement.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from textkeep.data.samples import length_grouped_batches
from textkeep.model.prompt import IGNORE_INDEX
from textkeep.runtime import autocast


@torch.no_grad()
def perplexity(
    model, samples: Sequence, batch_size: int = 8, per_example: bool = False, precision: str = "fp32"
) -> dict:
    """`samples` carry responses (see data.samples.make_samples). Returns ppl, mean token loss and token count.
    `precision`: fp32, bf16 (bf16 autocast; the losses are summed in fp32) or auto.

    per_example: also "per_example": {"losses": [...], "n_tokens": [...]}, each example's summed response-token
    loss (nats) and its token count, in the order of `samples`; they add up to the totals behind "loss".
    """
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    losses, counts = [0.0] * len(samples), [0] * len(samples)
    for idx in length_grouped_batches(samples, batch_size, model.config.adaptor_k):
        batch = model.tokenize([samples[i] for i in idx])
        with autocast(precision, model.device):
            if per_example:
                loss, n, row_losses = model.loss_sum(batch, per_row=True)
            else:
                loss, n = model.loss_sum(batch)
        if per_example:
            row_counts = (batch.labels[:, 1:] != IGNORE_INDEX).sum(1)
            for i, row_loss, row_count in zip(idx, row_losses.tolist(), row_counts.tolist()):
                losses[i], counts[i] = row_loss, row_count
        total += float(loss)
        count += n
    model.train(was_training)
    mean = total / max(count, 1)
    result = {"ppl": math.exp(mean) if count else float("nan"), "loss": mean, "n_tokens": count}
    if per_example:
        result["per_example"] = {"losses": losses, "n_tokens": counts}
    return result
