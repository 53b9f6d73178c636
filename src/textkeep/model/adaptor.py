"""The speech adaptor of LLaMA-Omni: stack k encoder frames, then a two-layer MLP into the LLM's embedding space."""

from __future__ import annotations

import torch
from torch import nn


class SpeechAdaptor(nn.Module):
    """(n, d_enc) encoder frames → (n // k, d_llm) LLM input embeddings.

    Every k consecutive frames are concatenated (the remainder n mod k is dropped, as LLaMA-Omni does),
    which turns Whisper's 50 frames/s into 50/k embeddings/s: 10/s for the default k = 5.
    """

    def __init__(self, d_encoder: int, d_llm: int, k: int = 5, hidden: int = 2048, output_scale: float | None = None):
        super().__init__()
        if k < 1 or hidden < 1:
            raise ValueError(f"adaptor k and hidden size must be positive, got k={k}, hidden={hidden}")
        self.k = k
        self.output_scale = output_scale
        self.proj = nn.Sequential(nn.Linear(d_encoder * k, hidden), nn.ReLU(), nn.Linear(hidden, d_llm))

    @staticmethod
    def output_length(n_frames: int, k: int) -> int:
        return n_frames // k

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """frames: (..., n, d_enc) → (..., n // k, d_llm)."""
        *lead, n, d = frames.shape
        n_out = n // self.k
        stacked = frames[..., : n_out * self.k, :].reshape(*lead, n_out, d * self.k)
        out = self.proj(stacked)
        if self.output_scale is None:
            return out
        # Every output at the RMS of the LLM's token embeddings: a fresh adaptor's outputs are ~2.5× that norm for
        # SmolLM2, and an input that loud is one the LLM learns to ignore (Ultravox normalises its projector too).
        return out * (self.output_scale / out.pow(2).mean(-1, keepdim=True).add(1e-12).sqrt())

    # ---- the CTC head (`textkeep align`'s ctc objective) ------------------------------------------------------
    # The head's only weight is a learnt logit scale: an output scores each token by its dot product with the token's
    # embedding row, over a restricted vocabulary `ctc_ids` (index 0 the blank) kept as a buffer so the checkpoint
    # carries it. The scale matters once outputs are normalised to the embedding RMS: the dot products are then
    # capped near the rows' squared norm (~10 for SmolLM2), too flat a softmax over thousands of tokens for CTC to
    # become sharp, so the head learns its temperature (as CLIP learns its logit scale).

    def set_ctc_vocab(self, ids: torch.Tensor) -> None:
        """Score `ids` (index 0 the blank); a head that already has a logit scale keeps it."""
        self.register_buffer("ctc_ids", ids.to(torch.long).cpu().clone())
        if getattr(self, "ctc_log_scale", None) is None:
            self.ctc_log_scale = nn.Parameter(torch.zeros((), device=self.proj[0].weight.device))

    def ctc_scale(self) -> torch.Tensor | float:
        scale = getattr(self, "ctc_log_scale", None)
        return 1.0 if scale is None else scale.float().exp()

    @property
    def has_ctc(self) -> bool:
        return getattr(self, "ctc_ids", None) is not None

    def ctc_segments(self, out: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """(n, d) outputs → (n,) segment of each output: consecutive outputs whose best CTC token is the same non-blank
        token share a segment (0, 1, …), blanks get -1. CTC compression (Gaido et al., 2021; Soundwave's shrinking
        adapter) feeds the LLM one embedding per segment, about one per token heard, instead of 10 per second."""
        best = (out.float() @ table[self.ctc_ids.to(table.device)].float().T).argmax(-1)
        kept = best != 0
        starts = kept & torch.cat([best.new_ones(1, dtype=torch.bool), best[1:] != best[:-1]])
        return torch.where(kept, starts.long().cumsum(0) - 1, -1)

    def ctc_mixture(self, out: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """(n, d) outputs → (n, d) mixtures of real token embeddings, weighted by each output's CTC posterior over the
        non-blank tokens (LegoSLM): what the LLM reads is made of rows it knows."""
        rows = table[self.ctc_ids[1:].to(table.device)]
        return (self.ctc_scale() * (out.float() @ rows.float().T)).softmax(-1).to(rows.dtype) @ rows


def pool_segments(out: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
    """The mean output of each segment (segments from `ctc_segments`; -1 rows dropped): (n_segments, d)."""
    kept = segments >= 0
    n = int(segments.max()) + 1 if bool(kept.any()) else 0
    total = out.new_zeros(n, out.shape[-1]).index_add(0, segments[kept], out[kept])
    count = torch.bincount(segments[kept], minlength=n).clamp_min(1).to(out.dtype)
    return total / count[:, None]
