"""First-order Taylor importance of the LLM's parameters (paper §2, Eq. 1–2).

Eq. 1 defines I_i = |L(D, θ) − L(D, θ|θ_i=0)|; Eq. 2 approximates it to first order. With L the mean
cross-entropy over response tokens (`SpeechLLM.loss_sum`), the modes are:

    paper   I = |θ ⊙ ∇θ L(D)|,               L(D) = Σ_b S_b / N              (default; Eq. 2 on the whole set)
    abs     I = (1/B) Σ_b |θ ⊙ ∇θ L_b|,        L_b = S_b / n_b
    fisher  I = (1/B) Σ_b (θ ⊙ ∇θ L_b)²

S_b is batch b's summed token loss, n_b its response-token count, N = Σ_b n_b and B the number of batches.
Only the LLM is scored (not the encoder or adaptor), but speech batches still run through the adaptor.

Memory. `paper` backwards S_b for every batch and lets `.grad` sum them: the gradient buffers are the
accumulator, and at the end they are turned in place into |θ ⊙ G/N|, so the pass costs what a plain
forward+backward costs. `abs`/`fisher` need a per-batch non-linearity: a post-accumulate-grad hook folds each
parameter's gradient into its own fp32 buffer as soon as backward has produced it and drops `.grad`, so the peak
is a plain pass plus one fp32 copy of the parameters. bf16/fp16 weights always take the hook path, so sums over
batches are kept in fp32. Gradient checkpointing (`llm.gradient_checkpointing_enable()`) stays in effect.

LoRA (peft) models are scored on a merged deep copy (one more copy of the LLM while it runs), so every map is keyed by
the bare causal LM's `named_parameters()` and maps of full and LoRA fine-tunes compare name by name.

Distributed (accelerate, one process per device): each process takes every world_size-th batch (batches are
sorted longest first, so interleaving balances the work), and at the end the gradient sums or accumulators and
the token/batch counts are summed with `accelerator.reduce`. No optimizer step happens, so no DDP wrapper is
needed. Under FSDP (accelerate's `fsdp_version: 2`) every process holds a shard: the loss runs through the
sharded `LossModule` root (so FSDP gathers the embeddings, head and adaptor too), FSDP's reduce-scatter
sums the processes' batch gradients into each shard (`paper` mode is exactly that sum), each process scores
its shard, and the full map is gathered at the end. `abs`/`fisher` need each batch's own gradient, which
FSDP has already summed across processes before any hook sees it, so they are refused there.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from pathlib import Path
from typing import Sequence

import torch

from textkeep.data.samples import length_grouped_batches
from textkeep.errors import TextkeepError
from textkeep.importance.maps import ImportanceMap, decoder_layers
from textkeep.model.speech_llm import LossModule, is_peft
from textkeep.runtime import autocast

MODES = ("paper", "abs", "fisher")
SPLITS = ("importance", "train", "test", "all")


@contextlib.contextmanager
def _scoring(model, merge: bool = True):
    """Swap in the LLM to score (merged if LoRA), with only its parameters requiring grad, no dropout, and
    gradient checkpointing still active (transformers checkpoints only layers in training mode)."""
    original = model.llm
    llm = copy.deepcopy(original).merge_and_unload() if merge and is_peft(original) else original
    flags = [(p, p.requires_grad) for p in model.parameters()]
    modes = [(m, m.training) for m in model.modules()]
    model.llm = llm
    try:
        model.requires_grad_(False)
        llm.requires_grad_(True)
        model.eval()
        for m in llm.modules():
            if getattr(m, "gradient_checkpointing", False) is True:
                m.training = True  # the layer itself only; its dropouts stay in eval
        llm.zero_grad(set_to_none=True)
        yield llm
    finally:
        llm.zero_grad(set_to_none=True)
        model.llm = original
        for p, f in flags:
            p.requires_grad_(f)
        for m, t in modes:
            m.training = t


def _fold_hook(buf: torch.Tensor, mode: str, n_tokens: list[int]):
    """Fold a parameter's fresh gradient of S_b into its fp32 buffer, then free it. θ is the same in every batch,
    so it is applied once at the end: Σ|θ ⊙ g_b| = |θ| ⊙ Σ|g_b| and Σ(θ ⊙ g_b)² = θ² ⊙ Σ g_b². That
    saves a pass over memory per parameter and batch, which is most of the cost of these modes over a plain backward."""

    def hook(p):
        # The fp32 buffer takes the bf16/fp16 gradient directly: mixed-dtype add_/addcmul_ compute in fp32 without an
        # fp32 copy of the gradient. abs_ may work in place: the gradient is dropped below.
        g = p.grad
        if mode == "paper":
            buf.add_(g)
        elif mode == "abs":
            buf.add_(g.abs_(), alpha=1 / n_tokens[0])
        else:
            buf.addcmul_(g, g, value=1 / n_tokens[0] ** 2)
        p.grad = None

    return hook


def _is_sharded(module) -> bool:
    return any(type(p).__name__ == "DTensor" for p in module.parameters())


def compute_importance(
    model,
    samples: Sequence,
    *,
    mode: str = "paper",
    batch_size: int = 8,
    progress: bool = True,
    accelerator=None,
    sharded_loss=None,
    precision: str = "fp32",
) -> ImportanceMap:
    """Score every parameter of `model.llm` on `samples` (text or speech `Sample`s with responses).

    Batches are length-grouped (deterministic). With an `accelerate.Accelerator` of several processes, each runs
    its share and the results are summed across processes; every process returns the full map. The model must
    already be on the process's device. DDP is unnecessary. Under FSDP2 pass `sharded_loss`, the sharded
    `LossModule(model)` (`importance_compute` gets it from `accelerator.prepare`); only `paper` mode is
    possible there (see the module docstring). A NaN/inf loss raises a TextkeepError naming the batch's sample ids.
    `precision` (fp32, bf16, auto: TrainConfig's) runs the forward under bf16 autocast; the weights, their gradients
    and the map stay fp32.
    """
    from tqdm.auto import tqdm

    from textkeep import __version__

    if mode not in MODES:
        raise TextkeepError(f"importance mode must be one of {', '.join(MODES)}, got {mode!r}")
    if not samples:
        raise TextkeepError("compute_importance got no samples; check the data set, split and limit.")
    if batch_size < 1:
        raise TextkeepError(f"batch_size must be ≥ 1, got {batch_size}")
    batches = [[samples[i] for i in b] for b in length_grouped_batches(samples, batch_size, model.config.adaptor_k)]
    sharded = sharded_loss is not None
    if sharded:
        import torch.distributed as dist

        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
    mine = batches[rank::world]
    if sharded:
        if mode != "paper":
            raise TextkeepError(
                f"mode '{mode}' needs each batch's own gradient, "
                "and FSDP sums the processes' gradients before any hook sees "
                "them; use --mode paper under FSDP, or run without sharding (DDP: every process holds a full copy)."
            )
        if is_peft(model.llm):
            raise TextkeepError(
                "a LoRA model cannot be merged once FSDP has sharded it; merge it first (`textkeep merge`), "
                "then score the merged checkpoint."
            )
        # Every process must run as many backward passes as the others (each one is a collective): the ones with
        # fewer batches repeat one with its loss multiplied by zero.
        mine += [None] * (math.ceil(len(batches) / world) - len(mine))
    elif _is_sharded(model.llm):
        raise TextkeepError(
            "the LLM is FSDP-sharded; pass sharded_loss=LossModule(model) as FSDP wrapped it (see compute_importance)."
        )

    with _scoring(model, merge=not sharded) as llm:
        params = dict(llm.named_parameters())  # tied weights appear once
        if any("_fsdp_wrapped_module" in k for k in params):
            raise TextkeepError(
                "FSDP1 flattens the parameters, so a map could not keep their names; "
                "use FSDP2 (fsdp_version: 2 in the accelerate config)."
            )
        layer_prefix, n_layers = decoder_layers(llm)
        n_b = [1]
        acc = {
            k: torch.zeros_like(p, dtype=torch.float32)
            for k, p in params.items()
            if not sharded and (mode != "paper" or p.dtype != torch.float32)
        }
        hooks = [params[k].register_post_accumulate_grad_hook(_fold_hook(buf, mode, n_b)) for k, buf in acc.items()]
        n_tok = n_batches = n_ex = 0
        try:
            bar = tqdm(
                total=sum(len(b) for b in mine if b),
                unit="ex",
                desc=f"importance ({mode})",
                disable=not progress or rank != 0,
            )
            for i, batch in enumerate(mine):
                if batch is None:  # FSDP: a stand-in pass that keeps the collectives in step and adds nothing
                    loss, _ = sharded_loss(model.tokenize(mine[0] or batches[0]))
                    (loss * 0).backward()
                    continue
                with autocast(precision, model.device):
                    loss, n = (sharded_loss if sharded else model.loss_sum)(model.tokenize(batch))
                if not torch.isfinite(loss):
                    ids = ", ".join(s.id or "?" for s in batch)
                    raise TextkeepError(
                        f"loss is {loss.item()} on importance batch {i} (samples: {ids}); "
                        "check these samples and the model's "
                        "weights (fp16/bf16 overflow? load the model in float32)."
                    )
                if n > 0:  # a batch without response tokens has no L_b; it only counts as seen
                    n_b[0] = n
                    # FSDP's reduce-scatter averages over processes; scaled by their number, it sums.
                    (loss * world if sharded else loss).backward()
                    n_tok, n_batches = n_tok + n, n_batches + 1
                elif sharded:  # the other processes' backward waits for this one's collectives
                    (loss * 0).backward()
                n_ex += len(batch)
                bar.update(len(batch))
            bar.close()
        finally:
            for h in hooks:
                h.remove()

        device = next(iter(params.values())).device
        counts = torch.tensor([n_tok, n_batches, n_ex], dtype=torch.int64, device=device)
        if sharded:
            dist.all_reduce(counts)
        elif world > 1:
            counts = accelerator.reduce(counts, reduction="sum")
        n_tok, n_batches, n_ex = counts.tolist()
        if n_tok == 0:
            raise TextkeepError(
                "the importance samples have no response tokens; every sample needs a non-empty response."
            )
        scores = {}
        for k, p in params.items():
            total = acc.pop(k, None)
            if total is None:  # paper mode, fp32: the summed .grad becomes the score in place
                total = p.grad if p.grad is not None else torch.zeros_like(p)
                p.grad = None
            if sharded:  # this process's shard of Σ_b ∇S_b, scored here, then the whole tensor gathered
                scores[k] = (total / n_tok * p.detach()).abs().full_tensor().float().cpu()
                continue
            if world > 1:
                total = accelerator.reduce(total, reduction="sum")
            total = total.div_(n_tok if mode == "paper" else n_batches).mul_(p.detach())
            total = total.mul_(p.detach()) if mode == "fisher" else total.abs_()
            scores[k] = total.cpu()

    kinds = {"text" if s.speech is None else "speech" for s in samples}
    meta = {
        "mode": mode,
        "modality": kinds.pop() if len(kinds) == 1 else "mixed",
        "n_examples": n_ex,
        "n_tokens": n_tok,
        "n_batches": n_batches,
        "batch_size": batch_size,
        "model": model.config.llm,
        "layer_prefix": layer_prefix,
        "n_layers": n_layers,
        "textkeep_version": __version__,
    }
    return ImportanceMap(scores, meta)


def importance_of(
    model,
    records: Sequence,
    *,
    modality: str = "text",
    mode: str = "paper",
    batch_size: int = 8,
    meta: dict | None = None,
    accelerator=None,
    progress: bool = True,
    precision: str = "fp32",
) -> ImportanceMap:
    """The map of `model` on `records` (their transcripts, or their audio for modality speech): the one code path of
    `textkeep importance compute` and the study's importance stages. `meta`: provenance stored with the map
    (model, dataset, split, seed). Under FSDP (an `accelerator` whose plugin shards) the loss runs through the
    sharded `LossModule` root."""
    from accelerate import DistributedType

    from textkeep.data.samples import make_samples

    samples = make_samples(model, records, modality, progress=progress)
    sharded_loss = None
    if accelerator is not None and accelerator.distributed_type == DistributedType.FSDP:
        sharded_loss = accelerator.prepare(LossModule(model))
    imap = compute_importance(
        model,
        samples,
        mode=mode,
        batch_size=batch_size,
        accelerator=accelerator,
        sharded_loss=sharded_loss,
        progress=progress,
        precision=precision,
    )
    imap.meta |= {**(meta or {}), "modality": modality, "precision": precision}
    return imap


def importance_compute(
    model: str,
    data: str,
    modality: str = "text",
    mode: str = "paper",
    out: Path = Path("runs/importance"),
    split: str = "importance",
    split_file: Path | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    seed: int = 0,
    encoder: str = "whisper-base",
    spoken: Path | None = None,
    precision: str = "fp32",
) -> Path:
    """Compute a parameter-importance map (paper Eq. 2) of an LLM on a data set and write it to `out`.

    Args:
        model: a textkeep checkpoint directory, or an LLM (registry name, local directory or hub id) scored as is.
        data: a data set name (alpaca, alpaca-gpt4, …) or a JSON/JSONL/CSV file of records.
        modality: `text` (the transcript through the text path) or `speech` (the audio through encoder and adaptor).
        mode: `paper` = |θ ⊙ ∇L(D)| on the whole set; `abs` = mean over batches of |θ ⊙ ∇L_b|; `fisher` = mean
            of (θ ⊙ ∇L_b)².
        out: the map directory to write (importance.safetensors + summary.json).
        split: which records to score: `importance` (1/30 of train, as in the paper), `train`, `test` or `all`.
        split_file: a splits.json to take the split from, instead of making splits with `seed`.
        limit: score at most this many records of the split.
        batch_size: examples per forward/backward pass.
        seed: the seed of the train/test/importance split.
        encoder: the Whisper encoder to use when `model` is an LLM and modality is `speech`.
        spoken: a TTS manifest (`textkeep speak`) giving the records their audio when the data set has none; with
            modality `speech` only the split's records that have audio are scored.
        precision: fp32, bf16 (the forward under bf16 autocast; gradients and the map stay fp32) or auto (bf16 on
            a GPU, fp32 on a CPU).
    """
    import warnings

    from accelerate import Accelerator

    from textkeep.data.datasets import load_dataset, spoken_records
    from textkeep.data.samples import MODALITIES
    from textkeep.data.splits import apply_split_ids, make_splits
    from textkeep.model.speech_llm import is_checkpoint, load_speech_llm

    if mode not in MODES:
        raise TextkeepError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    if modality not in MODALITIES:
        raise TextkeepError(f"--modality must be one of {', '.join(MODALITIES)}, got {modality!r}")
    if split not in SPLITS:
        raise TextkeepError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    if limit is not None and limit < 1:
        raise TextkeepError(f"--limit must be ≥ 1, got {limit}")
    torch.manual_seed(seed)
    accelerator = Accelerator()
    if modality == "speech" and not is_checkpoint(model):
        warnings.warn(
            f"'{model}' is an LLM, not a checkpoint: its speech adaptor is freshly initialised, so speech importance "
            "reflects a random adaptor.",
            stacklevel=2,
        )
    speech_llm = load_speech_llm(model, encoder if modality == "speech" else None, seed=seed)
    speech_llm.to(accelerator.device)

    records = load_dataset(data)
    if split != "all":
        splits = apply_split_ids(records, split_file) if split_file else make_splits(records, seed=seed)
        records = getattr(splits, split)
    records = spoken_records(records, spoken, modality == "speech", f"'{split}' records of '{data}'")[:limit]
    started = time.perf_counter()
    meta = {
        "model": str(model),
        "dataset": data,
        "split": split if not split_file else f"{split} ({split_file})",
        "seed": seed,
    }
    imap = importance_of(
        speech_llm,
        records,
        modality=modality,
        mode=mode,
        batch_size=batch_size,
        meta=meta,
        accelerator=accelerator,
        progress=accelerator.is_main_process,
        precision=precision,
    )
    seconds = time.perf_counter() - started
    if accelerator.is_main_process:
        imap.save(out)
        print(
            f"importance ({mode}, {modality}) of {len(records)} examples in {seconds:.1f} s "
            f"({len(records) / seconds:.2f} examples/s) → {out}"
        )
    accelerator.wait_for_everyone()
    return Path(out)
