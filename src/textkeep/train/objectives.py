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
    high for the tokens whose embedding it points along, so what CTC teaches is to output token embeddings."""
    return scale * (adaptor_out.float() @ embeddings[vocab.ids.to(embeddings.device)].float().T)


def ctc_loss(logits: Sequence[torch.Tensor], targets: Sequence[Sequence[int]]) -> torch.Tensor:
    """Summed CTC loss (blank = 0) of utterances given their (n_i, |vocab|) logits and restricted-vocab targets."""
    n = max(x.shape[0] for x in logits)
    padded = torch.zeros(n, len(logits), logits[0].shape[1], device=logits[0].device)
    for i, x in enumerate(logits):
        padded[: x.shape[0], i] = x.log_softmax(-1)
    flat = torch.tensor([t for tgt in targets for t in tgt], dtype=torch.long)
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
