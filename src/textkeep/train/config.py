"""The one training config: `textkeep train --train.KEY`, the `train:` section of a study YAML, and `fit(cfg=…)`.

Each field's docstring is its `--help` text. The defaults are LLaMA-Omni's Stage 1 (effective batch 32 =
batch_size × grad_accum, 3 epochs, cosine schedule with 3% warm-up, peak lr 2e-5, AdamW without weight decay,
gradients clipped at 1.0). Every check of a training setting lives in `__post_init__`, so a bad value is refused
before anything is loaded or written, whichever door it came in by.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from textkeep.errors import TextkeepError
from textkeep.runtime import ATTENTIONS

STRATEGIES = ("full", "layer-lr", "lora", "adaptor", "masked", "anchor", "layer-lr+lora", "kd-text")
NEEDS_MAP = ("layer-lr", "layer-lr+lora", "masked", "anchor")  # read the pre-trained LLM's textual importance map
PRECISIONS = ("auto", "fp32", "bf16")


# The checks that library functions (strategies.py) share with TrainConfig: each written once, here.
def check_strategy(strategy: str) -> None:
    if strategy not in STRATEGIES:
        raise TextkeepError(
            f"bad training setting: strategy {strategy!r} is unknown; use one of {', '.join(STRATEGIES)}."
        )


def check_lam(lam: float) -> None:
    if not 0.0 <= lam <= 1.0:
        raise TextkeepError(
            f"bad training setting: lam must be in [0, 1] (λ of Eq. 3), got {lam}; the paper's default is 0.4 "
            "(λ=0 is plain full fine-tuning, λ=1 freezes the most important layer)."
        )


def check_lora(rank: int, alpha: int | None, dropout: float) -> None:
    if rank < 1:
        raise TextkeepError(
            f"bad training setting: lora_rank must be ≥ 1, got {rank}; the paper uses 8 (1B) and 16 (8B)."
        )
    if alpha is not None and alpha <= 0:
        raise TextkeepError(
            f"bad training setting: lora_alpha must be positive, got {alpha}; leave it unset for α = 2·rank."
        )
    if not 0.0 <= dropout < 1.0:
        raise TextkeepError(f"bad training setting: lora_dropout must be in [0, 1), got {dropout}.")


@dataclass(frozen=True)
class TrainConfig:
    """Stage-1 training settings (strategy, optimizer, schedule, batching)."""

    strategy: str = "full"
    """full (adaptor + whole LLM), layer-lr (Eq. 3 per-layer rates), lora (LoRA on all attention and MLP
    projections + adaptor), adaptor (the adaptor alone, the LLM frozen: what `textkeep align` trains), or beyond
    the paper (train/guarded.py): masked (the most text-important entries frozen), anchor (an importance-weighted
    pull to the base weights), layer-lr+lora (Eq. 3's scales on each layer's LoRA) or kd-text (Full-FT plus
    self-distillation of the text path)."""
    importance: Path | None = None
    """layer-lr, layer-lr+lora, masked, anchor: the pre-trained LLM's textual importance map directory
    (`textkeep importance compute`)."""
    lam: float = 0.4
    """layer-lr: λ of Eq. 3, in [0, 1]; the most important layer trains at (1 − λ)·lr. Embeddings, final norm, head
    and adaptor keep lr."""
    lora_rank: int = 8
    """LoRA rank r (the paper: 8 for 1B, 16 for 8B)."""
    lora_alpha: int | None = None
    """LoRA α; unset = 2r, as the paper."""
    lora_dropout: float = 0.05
    """dropout on the LoRA input (PEFT's usual 0.05; the paper does not say)."""
    mask_top: float = 0.05
    """masked: the fraction of each tensor's entries, the most important by the map, that receive no update."""
    anchor_strength: float = 1.0
    """anchor: s in s·Σ w (θ − θ⁰)², with w the map divided by its mean over the LLM."""
    kd_text_weight: float = 1.0
    """kd-text: the weight of the text path's KL to the frozen base, against the speech cross-entropy."""
    kd_text_temperature: float = 1.0
    """kd-text: the distillation temperature T (the term is T²·KL)."""
    lr: float = 2e-5
    """peak learning rate."""
    epochs: float = 3
    """passes over the data (may be fractional)."""
    batch_size: int = 8
    """examples per micro-batch (per process)."""
    grad_accum: int = 4
    """micro-batches per optimizer step."""
    warmup_ratio: float = 0.03
    """fraction of the steps with linearly rising lr."""
    max_steps: int | None = None
    """stop after this many optimizer steps (sets the schedule's length instead of epochs)."""
    save_every: int = 50
    """write a resume checkpoint every N optimizer steps (and at the end); the last 2 are kept."""
    adaptor_warmup_steps: int = 0
    """first train the adaptor alone for N steps (LLM frozen) at adaptor_lr; 0 = off."""
    adaptor_lr: float = 1e-3
    """the adaptor warm-up's constant learning rate."""
    gradient_checkpointing: bool = False
    """recompute LLM activations in the backward pass (less memory, ~30% slower)."""
    seed: int = 0
    """seeds the adaptor's initialisation, LoRA's, the data order and dropout."""
    precision: str = "auto"
    """fp32, bf16 (accelerate's mixed precision: bf16 compute, fp32 master weights and optimizer state; on a CPU
    with AVX-512 BF16 1.5–2.7× faster) or auto (bf16 on a GPU and on a CPU with native bf16, else fp32)."""
    attention: str = "auto"
    """the LLM's attention kernel: eager, sdpa, or auto (sdpa on a GPU, eager on a CPU, where it measures faster)."""
    compile: bool = False
    """torch.compile each decoder layer (dynamic shapes): ~1 min once per run, then faster steps (bench_train.py)."""

    def __post_init__(self):
        """Refuse bad values before anything is loaded or written."""

        def need(ok: bool, what: str) -> None:
            if not ok:
                raise TextkeepError(f"bad training setting: {what}")

        check_strategy(self.strategy)
        need(self.attention in ATTENTIONS, f"attention must be one of {', '.join(ATTENTIONS)}, got {self.attention!r}.")
        need(self.precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}.")
        check_lam(self.lam)
        check_lora(self.lora_rank, self.lora_alpha, self.lora_dropout)
        for name in ("lr", "adaptor_lr", "epochs"):
            value = getattr(self, name)
            need(math.isfinite(value) and value > 0, f"{name} must be a positive number, got {value}.")
        need(
            self.batch_size >= 1 and self.grad_accum >= 1,
            f"batch_size and grad_accum must be ≥ 1, got {self.batch_size} and {self.grad_accum}.",
        )
        need(
            0.0 <= self.warmup_ratio < 1.0,
            f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}; LLaMA-Omni uses 0.03.",
        )
        need(self.max_steps is None or self.max_steps >= 1, f"max_steps must be ≥ 1 or unset, got {self.max_steps}.")
        need(self.save_every >= 1, f"save_every must be ≥ 1 step, got {self.save_every}.")
        need(self.adaptor_warmup_steps >= 0, f"adaptor_warmup_steps must be ≥ 0, got {self.adaptor_warmup_steps}.")
        need(0.0 < self.mask_top < 1.0, f"mask_top must be in (0, 1), got {self.mask_top}.")
        for name in ("anchor_strength", "kd_text_weight", "kd_text_temperature"):
            value = getattr(self, name)
            need(math.isfinite(value) and value > 0, f"{name} must be a positive number, got {value}.")
        if self.strategy in NEEDS_MAP:
            fix = "compute the pre-trained LLM's textual importance map with `textkeep importance compute` first"
            need(
                self.importance is not None,
                f"strategy '{self.strategy}' needs importance (--train.importance DIR); {fix}.",
            )
            need(Path(self.importance).is_dir(), f"importance map directory '{self.importance}' does not exist; {fix}.")
