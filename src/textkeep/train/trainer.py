"""Stage-1 training as in LLaMA-Omni: frozen Whisper encoder; adaptor + LLM learn spoken instruction → text response.

    train(model=LLM or checkpoint, data=..., strategy=full|layer-lr|lora, out=DIR)

A run directory DIR holds:
    model/                the final SpeechLLM checkpoint (a LoRA adapter for lora, the full LLM otherwise)
    train_config.json     every argument, plus the derived step counts
    layer_lr.json         layer-lr only: [{"layer": i, "lr_scale": s}, …]
    metrics.jsonl         one row per optimizer step (loss, lr per group, grad norm, throughput)
    tb/                   the same as TensorBoard scalars
    checkpoints/step-N/   resume state: trainable weights, optimizer, scheduler, RNG states, data position (last 2 kept)

Batches. Each epoch the examples are shuffled, cut into mega-batches of 50 micro-batches, sorted by length inside
each (so a micro-batch holds similar lengths and little padding) and the micro-batches shuffled again, all seeded
by (seed, epoch). Epochs follow each other as one stream, so every optimizer step accumulates exactly grad_accum
micro-batches and a fractional `epochs` simply stops early. The loss of a step is the mean over the response tokens
of all its micro-batches, as if they were one batch of batch_size × grad_accum.

Distributed runs need no code here: `accelerate launch --config_file X.yaml -m textkeep.cli train …` gives DDP,
FSDP or DeepSpeed; each process takes every world_size-th micro-batch, so the effective batch is
batch_size × grad_accum × processes. Checkpoints hold the main process's RNG states only.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from torch import nn

from textkeep.errors import TextkeepError
from textkeep.fileio import atomic_dir, write_json, write_text
from textkeep.train.strategies import STRATEGIES, apply_lora, layer_lr_scales, param_groups, read_layer_importance

MAX_GRAD_NORM = 1.0  # HF Trainer's default, which LLaMA-Omni's Stage 1 inherits (as weight decay 0 and AdamW's betas)
MEGABATCH = 50  # micro-batches sorted together by length
KEEP_CHECKPOINTS = 2


@dataclass
class TrainConfig:
    """What the training loop needs; the defaults are LLaMA-Omni's Stage 1 (effective batch 32, 3 epochs, 2e-5, 3% warm-up)."""

    strategy: str = "full"
    importance: Path | None = None
    lam: float = 0.4
    lora_rank: int = 8
    lora_alpha: int | None = None
    lora_dropout: float = 0.05
    lr: float = 2e-5
    epochs: float = 3
    batch_size: int = 8
    grad_accum: int = 4
    warmup_ratio: float = 0.03
    max_steps: int | None = None
    save_every: int = 50
    adaptor_warmup_steps: int = 0
    adaptor_lr: float = 1e-3
    gradient_checkpointing: bool = False
    seed: int = 0
    resume: bool = False

    def __post_init__(self):
        """Refuse bad values before anything is loaded or written."""

        def need(ok: bool, what: str) -> None:
            if not ok:
                raise TextkeepError(f"bad training setting: {what}")

        need(self.strategy in STRATEGIES, f"strategy {self.strategy!r} is unknown; use one of {', '.join(STRATEGIES)}.")
        need(0.0 <= self.lam <= 1.0, f"lam (λ of Eq. 3) must be in [0, 1], got {self.lam}; the paper's default is 0.4.")
        need(self.lora_rank >= 1, f"lora_rank must be ≥ 1, got {self.lora_rank}; the paper uses 8 (1B) and 16 (8B).")
        need(
            self.lora_alpha is None or self.lora_alpha > 0,
            f"lora_alpha must be positive, got {self.lora_alpha}; leave it unset for α = 2·rank.",
        )
        need(0.0 <= self.lora_dropout < 1.0, f"lora_dropout must be in [0, 1), got {self.lora_dropout}.")
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
        if self.strategy == "layer-lr":
            need(
                self.importance is not None,
                "strategy 'layer-lr' needs importance=DIR, the pre-trained LLM's textual importance map (`textkeep importance`).",
            )
            need(
                Path(self.importance).is_dir(),
                f"importance map directory '{self.importance}' does not exist; compute it with `textkeep importance` first.",
            )


# ---- data --------------------------------------------------------------------------------------------------------


class SampleList:
    """Training examples held in memory (tests, benchmarks)."""

    def __init__(self, samples, k: int = 5):
        from textkeep.data.samples import sample_length

        self.items = list(samples)
        self.lengths = [sample_length(s, k) for s in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def samples(self, idx: list[int]):
        return [self.items[i] for i in idx]


class SpeechExamples(SampleList):
    """Spoken instructions whose encoder frames live in the feature cache and are read one micro-batch at a time,
    so a large set never sits in memory. Frames missing from the cache are encoded here, once."""

    def __init__(self, model, records, chunk: int = 256):
        from tqdm.auto import tqdm

        from textkeep.data.features import FeatureCache
        from textkeep.data.samples import make_samples, sample_length

        self.model, self.records, self.cache = model, list(records), FeatureCache(model)
        self.lengths = []
        for start in tqdm(
            range(0, len(self.records), chunk), desc="speech features", unit="chunk", disable=len(self.records) <= chunk
        ):
            for s in make_samples(model, self.records[start : start + chunk], "speech", cache=self.cache):
                self.lengths.append(sample_length(s, model.config.adaptor_k))

    def __len__(self) -> int:
        return len(self.records)

    def samples(self, idx: list[int]):
        from textkeep.data.samples import make_samples

        return make_samples(self.model, [self.records[i] for i in idx], "speech", cache=self.cache, progress=False)


class _Stream:
    """Micro-batches (lists of example indices) of consecutive epochs, addressed by one running index."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.lengths, self.batch_size, self.seed, self.rank, self.world = lengths, batch_size, seed, rank, world
        self._orders: dict[int, list[list[int]]] = {}
        self.per_epoch = len(self.order(0))
        if self.per_epoch == 0:
            raise TextkeepError(
                f"{len(lengths)} examples make fewer micro-batches of {batch_size} than there are processes ({world}); use more data."
            )

    def order(self, epoch: int) -> list[list[int]]:
        if epoch not in self._orders:
            rng = np.random.default_rng([self.seed, epoch])
            perm = rng.permutation(len(self.lengths)).tolist()
            size = self.batch_size * MEGABATCH
            batches = []
            for start in range(0, len(perm), size):
                mega = sorted(perm[start : start + size], key=lambda i: -self.lengths[i])
                batches += [mega[i : i + self.batch_size] for i in range(0, len(mega), self.batch_size)]
            batches = [batches[i] for i in rng.permutation(len(batches))]
            n = len(batches) // self.world
            self._orders = {epoch: batches[self.rank :: self.world][:n]}  # only the current epoch is kept
        return self._orders[epoch]

    def set_order(self, epoch: int, order: list[list[int]]) -> None:
        self._orders = {epoch: order}

    def __getitem__(self, m: int) -> list[int]:
        epoch, j = divmod(m, self.per_epoch)
        return self.order(epoch)[j]


# ---- the loop ----------------------------------------------------------------------------------------------------


class _LossModule(nn.Module):
    """What accelerate wraps (DDP, autocast): forward = the summed response-token loss of one micro-batch."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch):
        return self.model.loss_sum(batch)[0]


def layer_scales(model, cfg: TrainConfig) -> list[float] | None:
    """Eq. 3 scales from the map (layer-lr), after checking the map belongs to this LLM; None for other strategies."""
    if cfg.strategy != "layer-lr":
        return None
    llm = model.llm.get_base_model() if hasattr(model.llm, "peft_config") else model.llm
    return layer_lr_scales(read_layer_importance(cfg.importance, llm), cfg.lam)


def check_out(out: Path, cfg: TrainConfig, run_info: dict | None = None) -> None:
    """Refuse to overwrite a run, or to resume one with different settings."""
    saved_path = Path(out) / "train_config.json"
    if not saved_path.is_file():
        return
    if not cfg.resume:
        raise TextkeepError(
            f"'{out}' already holds a training run; pass resume=True to continue it, or choose another out."
        )
    saved = json.loads(saved_path.read_text())["args"]
    now = _args(cfg, run_info)
    changed = sorted(
        k for k in now.keys() | saved.keys() if k not in ("resume", "save_every", "out") and saved.get(k) != now.get(k)
    )
    if changed:
        raise TextkeepError(
            f"resume=True, but {', '.join(f'{k} ({saved.get(k)!r} → {now.get(k)!r})' for k in changed)} differ from the run in '{out}'; "
            "resume with the same settings, or train into another out."
        )


def fit(model, data, out: Path, cfg: TrainConfig, run_info: dict | None = None) -> Path:
    """Train `model` (a SpeechLLM) on `data` (SampleList / SpeechExamples) into the run directory `out`."""
    from accelerate import Accelerator
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    out = Path(out)
    scales = layer_scales(model, cfg)
    check_out(out, cfg, run_info)
    if len(data) == 0:
        raise TextkeepError("no training examples; check the data set, split_file and limit.")
    precision = os.environ.get("ACCELERATE_MIXED_PRECISION") or ("bf16" if torch.cuda.is_available() else "no")
    accelerator = Accelerator(gradient_accumulation_steps=cfg.grad_accum, mixed_precision=precision)
    main = accelerator.is_main_process
    stream = _Stream(data.lengths, cfg.batch_size, cfg.seed, accelerator.process_index, accelerator.num_processes)
    total = cfg.max_steps or math.ceil(cfg.epochs * stream.per_epoch / cfg.grad_accum)
    warmup = math.ceil(cfg.warmup_ratio * total)

    # The model's trainable set: LoRA init draws from the global RNG, so seed it first.
    torch.manual_seed(cfg.seed)
    if cfg.gradient_checkpointing:
        # transformers ≥ 5.x renamed it; non-reentrant checkpointing needs no input that requires grad (LoRA).
        enable = getattr(model.llm, "activation_checkpointing_enable", None)
        if enable is not None:
            enable({"use_reentrant": False})
        else:
            model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.strategy == "lora":
        apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout)
    else:
        model.llm.requires_grad_(True)
        model.adaptor.requires_grad_(True)
    model.train()
    if model.encoder is not None:
        model.encoder.eval()

    ckpt = _last_checkpoint(out) if cfg.resume else None
    if ckpt is not None:
        _load_weights(model, ckpt)  # before prepare: DDP copies rank 0's weights to the others there
    optimizer = torch.optim.AdamW(param_groups(model, cfg.strategy, cfg.lr, scales), lr=cfg.lr, weight_decay=0.0)
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, total)
    wrapper = accelerator.prepare(_LossModule(model))
    optimizer = accelerator.prepare(optimizer)
    step, micro = 0, 0
    if ckpt is not None:
        step, micro = _load_state(ckpt, optimizer, scheduler, stream)

    if main:
        _clean_stale(out)
        info = {
            "n_examples": len(data),
            "micro_batches_per_epoch": stream.per_epoch,
            "total_steps": total,
            "warmup_steps": warmup,
            "effective_batch": cfg.batch_size * cfg.grad_accum * accelerator.num_processes,
            "processes": accelerator.num_processes,
            "mixed_precision": precision,
            "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        }
        if ckpt is None:
            write_json(out / "train_config.json", {"args": _args(cfg, run_info), "derived": info})
            if (out / "metrics.jsonl").exists():
                (out / "metrics.jsonl").unlink()
        else:
            _truncate_metrics(out / "metrics.jsonl", step)
        if scales is not None:
            write_json(out / "layer_lr.json", [{"layer": i, "lr_scale": s} for i, s in enumerate(scales)])
            print(_scales_table(scales, cfg.lr))
        print(
            f"training {info['trainable_parameters']:,} parameters ({cfg.strategy}) on {len(data)} examples: "
            f"{total} steps of {info['effective_batch']}"
            + (f", resuming after step {step} ({ckpt.name})" if ckpt else "")
        )

    if ckpt is None and cfg.adaptor_warmup_steps:
        adaptor_warmup(accelerator, wrapper, model, data, stream, cfg, out)

    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(out / "tb"), purge_step=step + 1 if ckpt else None) if main else None
    bar = tqdm(total=total, initial=step, desc=f"train [{cfg.strategy}]", unit="step", disable=not main)
    trainable = [p for p in model.parameters() if p.requires_grad]
    try:
        while step < total:
            started = time.perf_counter()
            lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}  # the rates this step's update uses
            batches = [stream[micro + j] for j in range(cfg.grad_accum)]
            loss, n_tokens, n_examples = _accumulate(
                accelerator, wrapper, model, data, batches, cfg.grad_accum, step + 1, out
            )
            grad_norm = float(accelerator.clip_grad_norm_(trainable, MAX_GRAD_NORM))
            if not math.isfinite(grad_norm):
                raise _stop(f"gradient norm is {grad_norm}", step + 1, [i for b in batches for i in b], data, out)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step, micro = step + 1, micro + cfg.grad_accum
            seconds = time.perf_counter() - started
            row = {
                "step": step,
                "epoch": round(micro / stream.per_epoch, 4),
                "loss": loss,
                "grad_norm": grad_norm,
                "lr": lrs,
                "examples_per_s": n_examples / seconds,
                "tokens_per_s": n_tokens / seconds,
                "seconds": seconds,
            }
            if main:
                _log(out, writer, row)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{max(lrs.values()):.2e}", ex_s=f"{row['examples_per_s']:.1f}")
                bar.update(1)
            if step % cfg.save_every == 0 or step == total:
                _save_checkpoint(accelerator, out, model, optimizer, scheduler, step, micro, stream)
    finally:
        bar.close()
        if writer is not None:
            writer.close()

    model.config.adaptor_trained = True
    model.config.extra = {
        **model.config.extra,
        "strategy": cfg.strategy,
        "steps": step,
        "examples": len(data),
        "train_dir": str(out),
    }
    if main:
        model.save(out / "model", llm_weights="lora" if cfg.strategy == "lora" else "full")
    accelerator.wait_for_everyone()
    return out


def _accumulate(accelerator, wrapper, model, data, batches, grad_accum, step, out) -> tuple[float, int, int]:
    """Forward/backward over one step's micro-batches; returns the mean loss per response token, tokens, examples."""
    tokenized = [model.tokenize(data.samples(b)) for b in batches]
    n_tokens = max(1, sum(t.n_response_tokens for t in tokenized))
    loss_sum = 0.0
    for idx, batch in zip(batches, tokenized):
        with accelerator.accumulate(wrapper):
            loss = wrapper(batch)
            if not torch.isfinite(loss):
                raise _stop(f"loss is {loss.item()}", step, idx, data, out)
            # accelerate divides by grad_accum; the step's response-token count is the right denominator.
            accelerator.backward(loss * (grad_accum / n_tokens))
            loss_sum += loss.item()
    return loss_sum / n_tokens, n_tokens, sum(len(b) for b in batches)


def adaptor_warmup(accelerator, wrapper, model, data, stream: _Stream, cfg: TrainConfig, out: Path) -> None:
    """Train the adaptor alone for a few steps at its own constant rate; the LLM is never updated.

    The LLM keeps requires_grad (DDP fixed its gradient set when it wrapped the model), so its gradients are computed
    and dropped: only the adaptor's optimizer steps.
    """
    from tqdm.auto import tqdm

    opt = accelerator.prepare(torch.optim.AdamW(model.adaptor.parameters(), lr=cfg.adaptor_lr, weight_decay=0.0))
    params = list(model.adaptor.parameters())
    for step in tqdm(
        range(cfg.adaptor_warmup_steps), desc="adaptor warm-up", unit="step", disable=not accelerator.is_main_process
    ):
        batches = [stream[step * cfg.grad_accum + j] for j in range(cfg.grad_accum)]
        _accumulate(accelerator, wrapper, model, data, batches, cfg.grad_accum, step + 1, out)
        accelerator.clip_grad_norm_(params, MAX_GRAD_NORM)
        opt.step()
        model.zero_grad(set_to_none=True)


def _stop(what: str, step: int, idx: list[int], data, out: Path) -> TextkeepError:
    ids = [s.id for s in data.samples(idx)] if hasattr(data, "samples") else idx
    last = _last_checkpoint(out)
    keep = (
        f"the last good checkpoint is '{last}' (resume=True continues from it)"
        if last
        else "no checkpoint was written yet"
    )
    return TextkeepError(
        f"{what} at step {step} (micro-batch of samples {', '.join(map(str, ids[:8]))}{'…' if len(ids) > 8 else ''}); training stopped, "
        f"{keep}. Lower lr (or add adaptor warm-up), or check those samples' audio and response."
    )


# ---- checkpoints -------------------------------------------------------------------------------------------------


def _trainable(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _checkpoints(out: Path) -> list[Path]:
    found = [
        p for p in (Path(out) / "checkpoints").glob("step-*") if (p / "state.json").is_file() and p.name[5:].isdigit()
    ]
    return sorted(found, key=lambda p: int(p.name[5:]))


def _last_checkpoint(out: Path) -> Path | None:
    found = _checkpoints(out)
    return found[-1] if found else None


def _save_checkpoint(
    accelerator, out: Path, model, optimizer, scheduler, step: int, micro: int, stream: _Stream
) -> None:
    from safetensors.torch import save_file

    if accelerator.is_main_process:
        epoch, batch = divmod(micro, stream.per_epoch)
        with atomic_dir(out / "checkpoints" / f"step-{step}") as tmp:
            save_file(
                {n: p.detach().cpu().contiguous() for n, p in _trainable(model).items()},
                str(tmp / "trainable.safetensors"),
            )
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
            if torch.cuda.is_available():
                rng["cuda"] = torch.cuda.get_rng_state_all()
            torch.save(rng, tmp / "rng.pt")
            write_json(
                tmp / "state.json",
                {"step": step, "micro": micro, "epoch": epoch, "batch": batch, "order": stream.order(epoch)},
            )
        for old in _checkpoints(out)[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _load_weights(model, ckpt: Path) -> None:
    from safetensors.torch import load_file

    state, params = load_file(str(ckpt / "trainable.safetensors")), _trainable(model)
    if state.keys() != params.keys():
        diff = sorted(state.keys() ^ params.keys())
        raise TextkeepError(
            f"checkpoint '{ckpt}' holds other trainable parameters than this setup (first: '{diff[0]}'); resume with the run's own settings."
        )
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(state[n])


def _load_state(ckpt: Path, optimizer, scheduler, stream: _Stream) -> tuple[int, int]:
    optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=False))
    scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=False))
    rng = torch.load(ckpt / "rng.pt", weights_only=False)
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    state = json.loads((ckpt / "state.json").read_text())
    stream.set_order(state["epoch"], state["order"])
    return state["step"], state["micro"]


def _clean_stale(out: Path) -> None:
    """Temporary directories of checkpoints whose writing was interrupted."""
    for tmp in (out / "checkpoints").glob(".step-*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True)


# ---- logging -----------------------------------------------------------------------------------------------------


def _args(cfg: TrainConfig, run_info: dict | None) -> dict:
    return json.loads(json.dumps({**(run_info or {}), **asdict(cfg)}, default=str))


def _log(out: Path, writer, row: dict) -> None:
    with open(out / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
    step = row["step"]
    for key in ("loss", "grad_norm", "examples_per_s", "tokens_per_s"):
        writer.add_scalar(f"train/{key}", row[key], step)
    for name, lr in row["lr"].items():
        writer.add_scalar(f"lr/{name}", lr, step)


def _truncate_metrics(path: Path, step: int) -> None:
    """After a resume, drop the rows of steps the killed run took after its last checkpoint (they are redone)."""
    if path.is_file():
        rows = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        write_text(path, "".join(r + "\n" for r in rows))


def _scales_table(scales: list[float], lr: float) -> str:
    lines = ["layer-wise learning rates (Eq. 3)", f"{'layer':>5}  {'scale':>6}  {'lr':>9}"]
    lines += [f"{i:>5}  {s:>6.3f}  {s * lr:>9.3e}" for i, s in enumerate(scales)]
    return "\n".join(lines)


# ---- the command -------------------------------------------------------------------------------------------------


def train(
    model: str = "smollm2-135m-instruct",
    encoder: str = "whisper-base",
    data: str = "alpaca-gpt4",
    spoken: Path | None = None,
    strategy: str = "full",
    out: Path = Path("runs/train"),
    importance: Path | None = None,
    lam: float = 0.4,
    lora_rank: int = 8,
    lora_alpha: int | None = None,
    lora_dropout: float = 0.05,
    lr: float = 2e-5,
    epochs: float = 3,
    batch_size: int = 8,
    grad_accum: int = 4,
    warmup_ratio: float = 0.03,
    max_steps: int | None = None,
    save_every: int = 50,
    limit: int | None = None,
    split_file: Path | None = None,
    adaptor_warmup_steps: int = 0,
    adaptor_lr: float = 1e-3,
    gradient_checkpointing: bool = False,
    seed: int = 0,
    resume: bool = False,
    encoder_policy: str = "pad30",
) -> Path:
    """Stage-1 speech training (LLaMA-Omni): spoken instruction in, text response out; encoder frozen.

    Defaults are LLaMA-Omni's Stage 1: effective batch 32 (batch_size × grad_accum), 3 epochs, cosine schedule with 3%
    warm-up, peak lr 2e-5, AdamW without weight decay, gradients clipped at 1.0; fp32 on CPU, bf16 mixed precision on GPU.

    Args:
        model: an LLM (registry name, directory or hub id) to wrap with `encoder` and a fresh seeded adaptor, or a textkeep checkpoint to continue from.
        encoder: the Whisper encoder when `model` is an LLM.
        data: the instruction data set (name or file); its records get their audio from `spoken`.
        spoken: the TTS manifest (JSONL from `textkeep speak`); default: the cache's spoken/<data>/manifest.jsonl. Records without audio are left out.
        strategy: full (adaptor + whole LLM), layer-lr (Eq. 3 per-layer rates) or lora (LoRA on all attention and MLP projections + adaptor).
        out: the run directory (final model in out/model, checkpoints, metrics, TensorBoard logs).
        importance: layer-lr: the pre-trained LLM's textual importance map directory (importance.safetensors + summary.json).
        lam: layer-lr: λ of Eq. 3, in [0, 1]; the most important layer trains at (1 − λ)·lr. Embeddings, final norm, head and adaptor keep lr.
        lora_rank: LoRA rank r.
        lora_alpha: LoRA α; default 2r, as the paper.
        lora_dropout: dropout on the LoRA input (PEFT's usual 0.05; the paper does not say).
        lr: peak learning rate.
        epochs: passes over the data (may be fractional).
        batch_size: examples per micro-batch (per process).
        grad_accum: micro-batches per optimizer step.
        warmup_ratio: fraction of the steps with linearly rising lr.
        max_steps: stop after this many optimizer steps (overrides epochs for the schedule's length).
        save_every: write a resume checkpoint every N optimizer steps (and at the end); the last 2 are kept.
        limit: train on the first N records with audio only.
        split_file: a splits.json (make_splits/save_split_ids): train on its `train` ids only.
        adaptor_warmup_steps: first train the adaptor alone for N steps (LLM frozen) at adaptor_lr; 0 = off.
        adaptor_lr: the adaptor warm-up's constant learning rate.
        gradient_checkpointing: recompute LLM activations in the backward pass (less memory, ~30% slower).
        seed: seeds the adaptor's initialisation, LoRA's, the data order and dropout.
        resume: continue the run in `out` from its last checkpoint (same settings required).
        encoder_policy: pad30 or trim (how the frozen encoder sees the audio; see docs/design.md), when `model` is an LLM.
    """
    args = dict(locals())
    from accelerate import PartialState

    names = {f.name for f in fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in args.items() if k in names})
    run_info = {k: v for k, v in args.items() if k not in names}
    if limit is not None and limit < 1:
        raise TextkeepError(f"bad training setting: limit must be ≥ 1 or unset, got {limit}.")
    check_out(Path(out), cfg, run_info)
    speech_llm = _load_model(model, encoder, strategy, seed, encoder_policy)
    layer_scales(speech_llm, cfg)  # a map that does not fit is refused before the slow part
    records = _training_records(data, spoken, split_file, limit)
    state = PartialState()
    speech_llm.to(state.device)
    with state.main_process_first():  # the main process fills the feature cache, the others read it
        examples = SpeechExamples(speech_llm, records)
    return fit(speech_llm, examples, Path(out), cfg, run_info)


def _load_model(name: str, encoder: str, strategy: str, seed: int, encoder_policy: str = "pad30"):
    from textkeep.model.speech_llm import CONFIG_FILE, SpeechLLM, is_checkpoint

    if not is_checkpoint(name):
        return SpeechLLM.build(name, encoder, seed=seed, encoder_policy=encoder_policy)
    ckpt = Path(name) if (Path(name) / CONFIG_FILE).is_file() else Path(name) / "model"
    kind = json.loads((ckpt / CONFIG_FILE).read_text())["llm_weights"]
    if kind == "lora":
        raise TextkeepError(
            f"'{name}' is a LoRA checkpoint; merge it first (merge_lora('{name}', DIR)) and train from DIR."
        )
    model = SpeechLLM.load(ckpt)
    if model.encoder is None:
        raise TextkeepError(
            f"checkpoint '{name}' has no speech encoder; training needs one (build from an LLM with encoder=…)."
        )
    if kind == "full" and strategy == "lora":
        model.config.llm = str((ckpt / "llm").resolve())  # the LoRA checkpoint's base is this LLM, not the original one
    return model


def _training_records(data: str, spoken: Path | None, split_file: Path | None, limit: int | None):
    from textkeep.data.datasets import attach_audio, load_dataset
    from textkeep.data.splits import apply_split_ids
    from textkeep.eval.qa import spoken_manifest

    records = load_dataset(data)
    if split_file is not None:
        records = apply_split_ids(records, Path(split_file)).train
    manifest = Path(spoken) if spoken is not None else spoken_manifest(data)
    if spoken is not None and not manifest.is_file():
        raise TextkeepError(
            f"spoken manifest '{manifest}' does not exist; make it with `textkeep speak {data} --out DIR` and pass DIR/manifest.jsonl."
        )
    if manifest.is_file():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # counted below
            records = attach_audio(records, manifest)
    with_audio = [r for r in records if r.audio is not None]
    if not with_audio:
        raise TextkeepError(
            f"none of the {len(records)} training records of '{data}' has audio (manifest: '{manifest}'); synthesize the spoken "
            f"instructions with `textkeep speak {data} --out DIR` and pass spoken=DIR/manifest.jsonl."
        )
    if len(with_audio) < len(records):
        warnings.warn(
            f"{len(records) - len(with_audio)} of {len(records)} records of '{data}' have no audio; training on the {len(with_audio)} that do.",
            stacklevel=3,
        )
    return with_audio[:limit] if limit else with_audio


def merge_lora(ckpt_dir: Path, out_dir: Path) -> Path:
    """Turn a LoRA checkpoint (or a LoRA training run) into a full one: the adapter folded into the LLM's weights."""
    from textkeep.model.speech_llm import SpeechLLM

    model = SpeechLLM.load(ckpt_dir)
    if not hasattr(model.llm, "peft_config"):
        raise TextkeepError(
            f"'{ckpt_dir}' is not a LoRA checkpoint (its LLM weights are already full); use it as it is."
        )
    model.llm = model.llm.merge_and_unload()
    model.config.extra = {**model.config.extra, "merged_from": str(ckpt_dir)}
    return model.save(out_dir, llm_weights="full")
