"""The losses alignment is built from, each a plain function that tests check against torch's reference.

ce      cross-entropy of reference responses to the spoken instruction: the paper's Stage-1 loss (LLaMA-Omni).
asr     cross-entropy of the transcript under a transcription prompt: ASR pre-alignment (SLAM-ASR, Qwen-Audio).
kd      T²·KL(teacher ‖ student) at temperature T between the text path's (teacher, the same frozen LLM reading the
        transcript) and the speech path's next-token distributions over the teacher's own greedy answer (Ultravox).
self    cross-entropy of the text path's own greedy answer from the speech path (BLSP's behaviour alignment).
chain   cross-entropy of "Question: <transcript>\nAnswer: <the text path's answer>" from the speech path: SpeechGPT's
        chain of modality, so the frozen LLM answers from its own transcript (the checkpoint's speech_chain is set).
hidden  the speech path's hidden states at the answer positions pulled to the text path's, every layer, each
        normalised by the teacher's mean square (DiVA distils the text path's response too; matching states is
        its dense cousin).
ctc     CTC of the transcript's tokens from the adaptor's outputs scored against the LLM's own embedding table
        (restricted to the tokens of the training transcripts, plus a blank row), no LLM forward at all
        (Soundwave, LegoSLM).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

OBJECTIVES = ("ce", "asr", "kd", "self", "chain", "hidden", "ctc")


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 2.0) -> torch.Tensor:
    """Σ over rows of T²·KL(softmax(teacher/T) ‖ softmax(student/T)), in fp32. T² keeps the gradient's scale
    independent of T (Hinton et al., 2015). Rows: the positions that predict answer tokens."""
    t = temperature
    log_p = (teacher_logits.float() / t).log_softmax(-1)
    log_q = (student_logits.float() / t).log_softmax(-1)
    return t * t * (log_p.exp() * (log_p - log_q)).sum()


class CtcVocab:
    """The restricted CTC vocabulary: index 0 is the blank (a token row of the LLM's table, by default its pad or
    end-of-text token), then every token that occurs in the training transcripts. Scoring against ~10k rows
    instead of the whole 49k table is what makes `ctc` cheap."""

    def __init__(self, token_ids: Sequence[int], blank_id: int):
        rows = sorted(set(token_ids) - {blank_id})
        self.ids = torch.tensor([blank_id, *rows], dtype=torch.long)
        self.index = {t: i for i, t in enumerate(self.ids.tolist())}

    def __len__(self) -> int:
        return len(self.ids)

    def targets(self, token_ids: Sequence[int]) -> list[int]:
        return [self.index[t] for t in token_ids]


def ctc_logits(adaptor_out: torch.Tensor, embeddings: torch.Tensor, vocab: CtcVocab, scale=1.0) -> torch.Tensor:
    """scale · (n, d) adaptor outputs · the vocabulary's embedding rows → (n, |vocab|) logits: an output frame scores
    high for the tokens whose embedding it points along, so what CTC teaches is to output token embeddings.
    The product runs in the ambient precision (bf16 under autocast, as an LM head does) and the logits are fp32."""
    rows = embeddings[vocab.ids.to(embeddings.device)]
    return scale * (adaptor_out @ rows.to(adaptor_out.dtype).T).float()


def ctc_loss(logits: Sequence[torch.Tensor], targets: Sequence[Sequence[int]]) -> torch.Tensor:
    """Summed CTC loss (blank = 0) of utterances given their (n_i, |vocab|) logits and restricted-vocab targets.

    Exact, and cheap however large the vocabulary: CTC's paths only ever visit the blank and the utterance's own
    tokens, so each utterance's log-probabilities are cut down to those columns plus one column holding the rest of
    the mass (log Σ of the other columns). The cut-down rows are still normalised, which torch's CTC gradient
    assumes, so values and gradients are those of the full-vocabulary loss (a test checks both against it), while
    torch's CPU kernel, whose cost grows with the vocabulary, runs on ~30 columns instead of ~10k.
    Written by hand: torch, torchaudio and k2 have no such reduction."""
    n = max(x.shape[0] for x in logits)
    cols = [sorted({0, *t}) for t in targets]
    width = max(len(c) for c in cols) + 1  # + the rest-of-vocabulary column
    padded = logits[0].new_full((n, len(logits), width), -1e4, dtype=torch.float32)  # absent: never on a path
    local = []
    for i, (x, c, t) in enumerate(zip(logits, cols, targets)):
        lp = x.float().log_softmax(-1)
        idx = torch.tensor(c, device=x.device)
        keep = torch.zeros(x.shape[-1], dtype=torch.bool, device=x.device).index_fill(0, idx, True)
        # -1e4, not -inf: when the utterance's tokens are the whole vocabulary the rest is empty, and a finite
        # fill keeps its gradient at zero instead of NaN.
        rest = lp.masked_fill(keep, -1e4).logsumexp(-1, keepdim=True)
        padded[: x.shape[0], i, : len(c) + 1] = torch.cat([lp[:, idx], rest], -1)
        where = {tok: j for j, tok in enumerate(c)}
        local.append([where[tok] for tok in t])
    flat = torch.tensor([t for tgt in local for t in tgt], dtype=torch.long)
    return F.ctc_loss(
        padded,
        flat,
        torch.tensor([x.shape[0] for x in logits]),
        torch.tensor([len(t) for t in targets]),
        blank=0,
        reduction="sum",
        zero_infinity=True,
    )


def ctc_greedy(logits: torch.Tensor, vocab: CtcVocab) -> list[int]:
    """Best-path CTC decoding of one utterance's (n, |vocab|) logits: the argmax of each frame, repeats merged,
    blanks dropped, as LLM token ids. What the adaptor 'hears', without the LLM."""
    best = logits.argmax(-1).tolist()
    kept = [b for i, b in enumerate(best) if b != 0 and (i == 0 or b != best[i - 1])]
    return vocab.ids[kept].tolist() if kept else []


def hidden_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ over layers of mean squared distance between the student's and the teacher's states (rows × width),
    each divided by the teacher's mean square so that every layer weighs the same."""
    total = torch.zeros((), device=student[0].device)
    for s, t in zip(student, teacher):
        t = t.float()
        total = total + (s.float() - t).pow(2).mean() / t.pow(2).mean().clamp_min(1e-12)
    return total / len(student)
