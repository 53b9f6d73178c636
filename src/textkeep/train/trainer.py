"""Stage-1 training as in LLaMA-Omni: frozen Whisper encoder; adaptor + LLM learn spoken instruction → text response.

    train(model=LLM or checkpoint, data=..., strategy=full|layer-lr|lora|masked|anchor|layer-lr+lora|kd-text, out=DIR)

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
import random
import shutil
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from textkeep.errors import TextkeepError
from textkeep.fileio import atomic_dir, write_json, write_text
from textkeep.model.speech_llm import is_peft
from textkeep.runtime import precision_of, speed_up
from textkeep.train.config import TrainConfig
from textkeep.train.guarded import KdTextObjective, make_guard
from textkeep.train.strategies import (
    apply_lora,
    layer_lr_scales,
    param_groups,
    read_layer_importance,
    skip_lora_input_casts,
)

MAX_GRAD_NORM = 1.0  # HF Trainer's default, which LLaMA-Omni's Stage 1 inherits (as weight decay 0 and AdamW's betas)
MEGABATCH = 50  # micro-batches sorted together by length
KEEP_CHECKPOINTS = 2


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
                f"{len(lengths)} examples make fewer micro-batches of {batch_size} than there are processes ({world}); "
                "use more data."
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


def _transcripts(data) -> dict[str, str]:
    """id → transcript of spoken training examples (kd-text's text path)."""
    records = getattr(data, "records", None)
    if records is None:
        raise TextkeepError("strategy 'kd-text' trains on spoken examples with transcripts; this data has none.")
    return {r.id: r.instruction for r in records if r.instruction}


def layer_scales(model, cfg: TrainConfig) -> list[float] | None:
    """Eq. 3 scales from the map (layer-lr), after checking the map belongs to this LLM; None for other strategies."""
    if cfg.strategy not in ("layer-lr", "layer-lr+lora"):
        return None
    llm = model.llm.get_base_model() if is_peft(model.llm) else model.llm
    return layer_lr_scales(read_layer_importance(cfg.importance, llm), cfg.lam)


def check_out(out: Path, cfg: TrainConfig, run_info: dict | None = None, resume: bool = False) -> None:
    """Refuse to overwrite a run, or to resume one with different settings."""
    saved_path = Path(out) / "train_config.json"
    if not saved_path.is_file():
        return
    if not resume:
        raise TextkeepError(
            f"'{out}' already holds a training run; pass --resume to continue it, or choose another --out."
        )
    saved = json.loads(saved_path.read_text())["args"]
    now = _args(cfg, run_info)
    changed = sorted(
        k for k in now.keys() | saved.keys() if k not in ("resume", "save_every", "out") and saved.get(k) != now.get(k)
    )
    if changed:
        raise TextkeepError(
            f"--resume, but {', '.join(f'{k} ({saved.get(k)!r} → {now.get(k)!r})' for k in changed)} "
            f"differ from the run in '{out}'; "
            "resume with the same settings, or train into another --out."
        )


class ResponseObjective(torch.nn.Module):
    """The paper's Stage-1 loss: cross-entropy of the reference responses, summed, normalised by the step's response
    tokens (as if its micro-batches were one batch). An objective is what `fit` wraps (DDP, autocast): `prepare`
    turns samples into its inputs, `count` gives their share of the step's denominator, forward the summed loss.
    Alignment (`train/align.py`) brings its own."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def prepare(self, samples):
        return self.model.tokenize(samples)

    @staticmethod
    def count(batch) -> int:
        return batch.n_response_tokens

    def forward(self, batch, step: int = 0):
        return self.model.loss_sum(batch)[0]


def fit(
    model,
    data,
    out: Path,
    cfg: TrainConfig,
    run_info: dict | None = None,
    resume: bool = False,
    objective=None,
    on_step=None,
) -> Path:
    """Train `model` (a SpeechLLM) on `data` (SampleList / SpeechExamples) into the run directory `out`; with
    `resume`, continue the run there from its last checkpoint (same settings required).

    `objective`: the loss (default `ResponseObjective`, the paper's). `on_step(step, model)`: called on the main
    process after every optimizer step, before its checkpoint (alignment measures its learning curve there)."""
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    out = Path(out)
    scales = layer_scales(model, cfg)
    check_out(out, cfg, run_info, resume)
    if len(data) == 0:
        raise TextkeepError("no training examples; check the data set, split_file and limit.")
    precision = precision_of(cfg.precision)  # accelerate's name for it: "no" or "bf16"
    # On a GPU accelerate's mixed precision; on the CPU torch's bf16 autocast around the forward, since accelerate
    # fixes its precision once per process (a later run with another setting would be refused).
    on_gpu = torch.cuda.is_available()
    # An aligned adaptor's CTC logit scale gets a gradient only from align's ctc objective and from posterior
    # compression, so a loss that uses neither (Stage 1 after `align`, a kd phase) leaves it unused, which DDP
    # refuses unless it looks for unused parameters (one graph walk per step, so only when there is such a head).
    ddp = DistributedDataParallelKwargs(find_unused_parameters=model.adaptor.has_ctc)
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.grad_accum, mixed_precision=precision if on_gpu else "no", kwargs_handlers=[ddp]
    )
    cpu_bf16 = precision == "bf16" and not on_gpu
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
    if cfg.strategy in ("lora", "layer-lr+lora"):
        apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout)
        if precision == "bf16":
            skip_lora_input_casts(model.llm)
    elif cfg.strategy == "adaptor":  # the LLM frozen: no weight gradients, its activations still carry them
        model.llm.requires_grad_(False)
        model.adaptor.requires_grad_(True)
    else:
        model.llm.requires_grad_(True)
        model.adaptor.requires_grad_(True)
    speed_up(model.llm, cfg.attention, cfg.compile, accelerator.device)  # after LoRA: compile what trains
    model.train()
    if model.encoder is not None:
        model.encoder.eval()

    guard = make_guard(model, cfg)  # masked/anchor: from the base weights, so before a resumed run's are loaded
    if objective is None and cfg.strategy == "kd-text":
        objective = KdTextObjective(model, _transcripts(data), cfg.kd_text_weight, cfg.kd_text_temperature)
    ckpt = _last_checkpoint(out) if resume else None
    if ckpt is not None:
        _load_weights(model, ckpt)  # before prepare: DDP copies rank 0's weights to the others there
    # fused: one kernel per step instead of one per tensor; on this CPU 0.12 s against 0.59 s for SmolLM2's 135M.
    groups = param_groups(model, cfg.strategy, cfg.lr, scales)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=0.0, fused=True)
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, total)
    objective = objective if objective is not None else ResponseObjective(model)
    wrapper = accelerator.prepare(objective)
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
                accelerator, wrapper, objective, data, batches, cfg.grad_accum, step + 1, out, cpu_bf16
            )
            guarded = guard.before_step() if guard is not None else {}
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
            if hasattr(objective, "parts"):  # the objective's own terms, averaged over the step
                row["parts"] = objective.parts()
            if guarded:
                row["parts"] = {**row.get("parts", {}), **guarded}
            if main:
                _log(out, writer, row)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{max(lrs.values()):.2e}", ex_s=f"{row['examples_per_s']:.1f}")
                bar.update(1)
            if main and on_step is not None:
                on_step(step, model)
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
        # LoRA runs save their adapter; a frozen LLM is not copied
        weights = {"lora": "lora", "layer-lr+lora": "lora", "adaptor": "base"}.get(cfg.strategy, "full")
        model.save(out / "model", llm_weights=weights)
    accelerator.wait_for_everyone()
    return out


def _accumulate(
    accelerator, wrapper, objective, data, batches, grad_accum, step, out, cpu_bf16: bool = False
) -> tuple[float, int, int]:
    """Forward/backward over one step's micro-batches; returns the mean loss per counted unit (response token for
    the paper's loss), the units and the examples."""
    prepared = [objective.prepare(data.samples(b)) for b in batches]
    n_tokens = max(1, sum(objective.count(p) for p in prepared))
    loss_sum = 0.0
    for idx, batch in zip(batches, prepared):
        with accelerator.accumulate(wrapper):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cpu_bf16):
                loss = wrapper(batch, step)
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
        objective = accelerator.unwrap_model(wrapper)
        _accumulate(accelerator, wrapper, objective, data, batches, cfg.grad_accum, step + 1, out)
        accelerator.clip_grad_norm_(params, MAX_GRAD_NORM)
        opt.step()
        model.zero_grad(set_to_none=True)


def _stop(what: str, step: int, idx: list[int], data, out: Path) -> TextkeepError:
    ids = [s.id for s in data.samples(idx)] if hasattr(data, "samples") else idx
    last = _last_checkpoint(out)
    keep = (
        f"the last good checkpoint is '{last}' (--resume continues from it)"
        if last
        else "no checkpoint was written yet"
    )
    return TextkeepError(
        f"{what} at step {step} (micro-batch of samples {', '.join(map(str, ids[:8]))}"
        f"{'…' if len(ids) > 8 else ''}); training stopped, "
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
            # No pickle: the optimizer's state is tensors and numbers (loaded back with weights_only=True), the
            # scheduler's and the RNGs' are JSON and tensors, so a checkpoint from elsewhere cannot run code on
            # --resume.
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            write_json(tmp / "scheduler.json", scheduler.state_dict())
            _save_rng(tmp)
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
            f"checkpoint '{ckpt}' holds other trainable parameters than this setup (first: '{diff[0]}'); "
            "resume with the run's own settings."
        )
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(state[n])


def _save_rng(folder: Path) -> None:
    from safetensors.torch import save_file

    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(keys.astype(np.int64))}
    if torch.cuda.is_available():
        tensors |= {f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    save_file(tensors, str(folder / "rng.safetensors"))
    write_json(
        folder / "rng.json",
        {"python": [version, list(mt), gauss], "numpy": [kind, int(pos), int(has_gauss), float(cached)]},
    )


def _load_rng(folder: Path) -> None:
    from safetensors.torch import load_file

    tensors, state = load_file(str(folder / "rng.safetensors")), json.loads((folder / "rng.json").read_text())
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    kind, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def _load_tensors(path: Path):
    """A .pt of plain tensors, numbers and containers; anything else (a pickled object that could run code) is
    refused by torch's restricted unpickler, and reported as such."""
    import pickle

    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TextkeepError(
            f"'{path}' is not a plain tensor file ({first}); textkeep refuses to unpickle it, since loading it could "
            "run code. Resume only checkpoints this textkeep wrote, or start the run again without --resume."
        ) from None


def _load_state(ckpt: Path, optimizer, scheduler, stream: _Stream) -> tuple[int, int]:
    if not (ckpt / "rng.json").is_file() or not (ckpt / "scheduler.json").is_file():
        raise TextkeepError(
            f"checkpoint '{ckpt}' was written by an older textkeep (pickled RNG and scheduler state), which is no "
            "longer loaded; start the run again into a new --out."
        )
    optimizer.load_state_dict(_load_tensors(ckpt / "optimizer.pt"))
    scheduler.load_state_dict(json.loads((ckpt / "scheduler.json").read_text()))
    _load_rng(ckpt)
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
    out: Path = Path("runs/train"),
    limit: int | None = None,
    split_file: Path | None = None,
    encoder_policy: str = "pad30",
    resume: bool = False,
    train: TrainConfig = TrainConfig(),
) -> Path:
    """Stage-1 speech training (LLaMA-Omni): spoken instruction in, text response out; encoder frozen.

    The settings are `--train.KEY` (train/config.py); their defaults are LLaMA-Omni's Stage 1. The precision's
    default (`auto`) is bf16 on a GPU and on CPUs with native bf16, fp32 elsewhere.

    Args:
        model: an LLM (registry name, directory or hub id) to wrap with `encoder` and a fresh seeded adaptor, or a
            textkeep checkpoint to continue from.
        encoder: the Whisper encoder when `model` is an LLM.
        data: the instruction data set (name or file); its records get their audio from `spoken`.
        spoken: the TTS manifest (JSONL from `textkeep speak`); default: the cache's spoken/<data>/manifest.jsonl.
            Records without audio are left out.
        out: the run directory (final model in out/model, checkpoints, metrics, TensorBoard logs).
        limit: train on the first N records with audio only.
        split_file: a splits.json (make_splits/save_split_ids): train on its `train` ids only.
        encoder_policy: pad30 or trim (how the frozen encoder sees the audio; see docs/design.md), when `model` is
            an LLM.
        resume: continue the run in `out` from its last checkpoint (same settings required).
        train: strategy, optimizer, schedule and batching (see `--help` for each key).
    """
    from accelerate import PartialState

    cfg = train
    run_info = {"model": model, "encoder": encoder, "data": data, "spoken": spoken, "out": out, "limit": limit,
                "split_file": split_file, "encoder_policy": encoder_policy, "resume": resume}  # fmt: skip
    if limit is not None and limit < 1:
        raise TextkeepError(f"bad training setting: --limit must be ≥ 1 or unset, got {limit}.")
    check_out(Path(out), cfg, run_info, resume)
    speech_llm = _load_model(model, encoder, cfg.strategy, cfg.seed, encoder_policy)
    layer_scales(speech_llm, cfg)  # a map that does not fit is refused before the slow part
    records = _training_records(data, spoken, split_file, limit)
    state = PartialState()
    speech_llm.to(state.device)
    with state.main_process_first():  # the main process fills the feature cache, the others read it
        examples = SpeechExamples(speech_llm, records)
    return fit(speech_llm, examples, Path(out), cfg, run_info, resume)


def _load_model(name: str, encoder: str, strategy: str, seed: int, encoder_policy: str = "pad30"):
    """The model to train: `load_speech_llm`, plus what training needs of a checkpoint (full LLM weights,
    an encoder)."""
    from textkeep.model.speech_llm import CONFIG_FILE, is_checkpoint, load_speech_llm

    model = load_speech_llm(name, encoder, seed=seed, encoder_policy=encoder_policy)
    if not is_checkpoint(name):
        return model
    ckpt = Path(name) if (Path(name) / CONFIG_FILE).is_file() else Path(name) / "model"
    kind = json.loads((ckpt / CONFIG_FILE).read_text())["llm_weights"]
    if kind == "lora":
        raise TextkeepError(
            f"'{name}' is a LoRA checkpoint; merge it first (`textkeep merge {name} DIR`) and train from DIR."
        )
    if model.encoder is None:
        raise TextkeepError(
            f"checkpoint '{name}' has no speech encoder; training needs one (build from an LLM with --encoder)."
        )
    if kind == "full" and strategy in ("lora", "layer-lr+lora"):
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
            f"spoken manifest '{manifest}' does not exist; make it with `textkeep speak {data} --out DIR` "
            "and pass DIR/manifest.jsonl."
        )
    if manifest.is_file():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # counted below
            records = attach_audio(records, manifest)
    with_audio = [r for r in records if r.audio is not None]
    if not with_audio:
        raise TextkeepError(
            f"none of the {len(records)} training records of '{data}' has audio (manifest: '{manifest}'); "
            "synthesize the spoken "
            f"instructions with `textkeep speak {data} --out DIR` and pass --spoken DIR/manifest.jsonl."
        )
    if len(with_audio) < len(records):
        warnings.warn(
            f"{len(records) - len(with_audio)} of {len(records)} records of '{data}' have no audio; "
            f"training on the {len(with_audio)} that do.",
            stacklevel=3,
        )
    return with_audio[:limit] if limit else with_audio


def merge_lora(ckpt_dir: Path, out_dir: Path) -> Path:
    """Turn a LoRA checkpoint (or a LoRA training run) into a full one: the adapter folded into the LLM's weights."""
    from textkeep.model.speech_llm import SpeechLLM

    model = SpeechLLM.load(ckpt_dir)
    if not is_peft(model.llm):
        raise TextkeepError(
            f"'{ckpt_dir}' is not a LoRA checkpoint (its LLM weights are already full); use it as it is."
        )
    model.llm = model.llm.merge_and_unload()
    model.config.extra = {**model.config.extra, "merged_from": str(ckpt_dir)}
    return model.save(out_dir, llm_weights="full")
