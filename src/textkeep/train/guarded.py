"""Importance-guided fine-tuning: strategies beyond the paper that protect the text-critical parameters directly.

The paper turns its importance analysis into one coarse lever, a learning rate per layer (Eq. 3). Its Fig. 1 says
the text-critical parameters are a small set clustered in rows and columns, and freezing such regions keeps a
model's linguistic competence (Zhang et al. 2024, "Unveiling Linguistic Regions in Large Language Models"). With
the pre-trained LLM's textual map I (`textkeep importance compute`, the map layer-lr reads), these strategies act
per parameter:

masked        Full-FT, except that the top p% of each tensor's entries by I (`--train.mask-top`) get no update:
              their gradients are zeroed before clipping and the optimizer step, so AdamW's moments stay 0 and, with
              no weight decay, the entries stay bit-identical to the base.
anchor        Full-FT plus s·Σ_i w_i (θ_i − θ⁰_i)², w = I / mean(I) over the whole LLM (`--train.anchor-strength` s):
              EWC (Kirkpatrick et al. 2017) with the Taylor map (or the `fisher` one) in place of the Fisher
              diagonal. Its gradient 2·s·w·(θ − θ⁰) is added to each tensor's gradient in place after backward,
              so no autograd graph over the parameters is built.
kd-text       Full-FT on speech plus a text-path self-distillation term (`--train.kd-text-weight`): the transcripts
              of the same batch go through the text path, whose next-token distributions over the reference
              response are pulled (T²·KL at `--train.kd-text-temperature`) to those of the frozen base LLM
              (Learning without Forgetting, Li & Hoiem 2016, with the base model as its own teacher).
layer-lr+lora lives in strategies.py: Eq. 3's per-layer scales on each layer's LoRA parameters.

Memory: `masked` holds one bool per LLM parameter; `anchor` holds w and θ⁰ in bf16, together one fp32 copy of the
LLM. Rounding θ⁰ to bf16 (relative 2⁻⁹) only moves the anchor within the precision the model is run at.
"""

from __future__ import annotations

from pathlib import Path

import torch

from textkeep.errors import TextkeepError
from textkeep.train.objectives import kd_loss

GUARDED = ("masked", "anchor", "kd-text")


def _map_tensors(map_dir: Path, llm):
    """(parameter, its importance) for every LLM parameter the map scores, read one tensor at a time; the map is
    first checked to belong to this LLM."""
    from textkeep.importance.maps import check_compatible, open_map

    fix = "compute the pre-trained LLM's textual importance map with `textkeep importance compute` for this LLM"
    scores = open_map(map_dir)
    check_compatible(scores, llm, fix=f"It was computed on another model; {fix}")
    for name, p in llm.named_parameters():
        if name in scores:
            yield name, p, scores[name].abs()


class GradMask:
    """`masked`: the top `top` fraction of each tensor's entries by importance never receive an update."""

    def __init__(self, llm, map_dir: Path, top: float):
        self.masks: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
        self.n_masked = 0
        for _, p, score in _map_tensors(map_dir, llm):
            k = round(top * score.numel())
            if k == 0:
                continue
            mask = torch.zeros(score.numel(), dtype=torch.bool)
            mask[score.flatten().topk(k).indices] = True  # exactly k entries, ties broken by topk
            self.masks.append((p, mask.view(score.shape).to(p.device)))
            self.n_masked += k

    def before_step(self) -> dict[str, float]:
        for p, mask in self.masks:
            if p.grad is not None:
                p.grad.masked_fill_(mask, 0.0)
        return {}


class Anchor:
    """`anchor`: the gradient of s·Σ w (θ − θ⁰)², added in place; w = I / mean(I) over the whole LLM."""

    def __init__(self, llm, map_dir: Path, strength: float):
        self.strength = strength
        total, count = 0.0, 0
        for _, _, score in _map_tensors(map_dir, llm):
            total, count = total + float(score.double().sum()), count + score.numel()
        mean = total / max(count, 1)
        if not mean > 0:
            raise TextkeepError(f"importance map '{map_dir}' is all zeros; recompute it on more examples.")
        self.terms = [
            (p, (score / mean).to(torch.bfloat16).to(p.device), p.detach().to(torch.bfloat16).clone())
            for _, p, score in _map_tensors(map_dir, llm)
        ]

    def penalty(self) -> torch.Tensor:
        """s·Σ w (θ − θ⁰)², differentiable in θ (for tests and logging; training adds its gradient in place)."""
        return self.strength * sum((w.float() * (p - p0.float()).pow(2)).sum() for p, w, p0 in self.terms)

    @torch.no_grad()
    def before_step(self) -> dict[str, float]:
        value = 0.0
        for p, w, p0 in self.terms:
            delta = p.detach().float() - p0.float()
            value += float((w.float() * delta.pow(2)).sum())
            if p.grad is not None:
                p.grad.add_((2 * self.strength * w.float() * delta).to(p.grad.dtype))
        return {"anchor": self.strength * value}


def make_guard(model, cfg):
    """The before-step hook of a guarded strategy (None for the others), built from the base weights."""
    if cfg.strategy == "masked":
        return GradMask(model.llm, cfg.importance, cfg.mask_top)
    if cfg.strategy == "anchor":
        return Anchor(model.llm, cfg.importance, cfg.anchor_strength)
    return None


class KdTextObjective(torch.nn.Module):
    """`kd-text`: the paper's loss on the spoken batch + weight · T²·KL(base ‖ current) on its transcripts.

    Both terms are sums over the same reference-response tokens, so the step's response-token count divides both.
    The teacher is a frozen copy of the LLM taken when training starts (the base, or the model passed by --model).
    """

    def __init__(self, model, transcripts: dict[str, str], weight: float, temperature: float):
        import copy

        super().__init__()
        self.model, self.transcripts = model, transcripts
        self.weight, self.temperature = weight, temperature
        teacher = copy.deepcopy(model.llm).requires_grad_(False).eval()
        self.__dict__["teacher"] = teacher  # not a submodule: DDP and the optimizer never see it
        self._parts: dict[str, list[float]] = {}

    def prepare(self, samples):
        from textkeep.model.speech_llm import Sample

        missing = [s.id for s in samples if s.id not in self.transcripts]
        if missing:
            raise TextkeepError(
                f"kd-text needs the transcript of every spoken example; '{missing[0]}' has none. Train on spoken "
                "records with their instruction text (a `textkeep speak` manifest)."
            )
        text = [Sample(text=self.transcripts[s.id], response=s.response, id=s.id) for s in samples]
        return self.model.tokenize(samples), self.model.tokenize(text)

    @staticmethod
    def count(batch) -> int:
        return batch[0].n_response_tokens

    def parts(self) -> dict[str, float]:
        out = {k: sum(v) / len(v) for k, v in self._parts.items() if v}
        self._parts = {}
        return out

    def forward(self, batch, step: int = 0):
        speech, text = batch
        ce = self.model.loss_sum(speech)[0]
        student = response_logits(self.model.llm, text.to(self.model.device))
        with torch.no_grad():
            teacher = response_logits(self.teacher, text.to(self.model.device))
        kd = kd_loss(student, teacher, self.temperature)
        self._parts.setdefault("ce", []).append(float(ce.detach()))
        self._parts.setdefault("kd_text", []).append(float(kd.detach()))
        return ce + self.weight * kd


def response_logits(llm, batch) -> torch.Tensor:
    """A text-only batch's logits (fp32) at the positions that predict its response tokens."""
    from textkeep.model.speech_llm import IGNORE_INDEX, decode

    out, targets = decode(llm, batch)  # the frozen teacher's pass shares the prompt head's KV
    keep = targets != IGNORE_INDEX
    return llm.get_output_embeddings()(out.last_hidden_state[:, :-1][keep]).float()
