"""Validation of importance scores by deactivation (paper §2.2, Table 1): zero the top, the bottom or a random p% of
the LLM's parameters and measure the perplexity of reference responses, with text and with speech inputs.

Scope. `tensor` (default, as Zhang et al. 2024, the paper's ref [21]): every tensor inside the decoder layers loses
its own p% (rounded half up). `global`: one threshold over all of them, found exactly by the radix select of
`select.select_top` (two streaming 65536-bin histogram passes over the float32 bit patterns, then exact
selection; no sort, no copy of all scores). `include_embeddings` adds the token embeddings and an untied LM head
(a tied head is the embedding matrix itself); `include_norms=False` leaves out the decoder layers' norm weights.
The final norm and the speech front-end are never touched.

Random selection is seeded: every tensor draws uniform scores from a generator seeded by (seed, tensor name), and
the same top-p% machinery picks from those, so a global random pick needs no list of all parameters either.
Ties at a threshold are broken by position (earliest first), so each selection holds exactly its count.

Weights are restored bit for bit: only the zeroed entries are saved (p% of the scope) and written back in a
`finally`, also when the measurement raises.

One result for the command and the study: `deactivate` measures and returns it (Table 1's perplexities plus, per
input and condition, every example's summed response-token loss and token count, from which the report draws its
intervals over examples); `write_deactivation` writes it as deactivation.json and deactivation.md.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Iterator

import torch

from textkeep.errors import TextkeepError
from textkeep.fileio import jsonable, write_json, write_text
from textkeep.importance.maps import check_compatible, decoder_layers, module_type, open_map
from textkeep.importance.select import count_for, seed_of, select_top
from textkeep.model.speech_llm import is_peft

CONDITIONS = ("top", "bottom", "random")
SCOPES = ("tensor", "global")
INPUT_ORDER = ("speech", "text")  # Table 1's row order
INPUTS = ("text", "speech")


class RandomScores(Mapping):
    """Uniform scores in [0, 1) for named shapes, drawn anew on each access from a generator seeded by (seed, name)."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], seed: int):
        self.shapes, self.seed = shapes, seed

    def __getitem__(self, name: str) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed_of(self.seed, name) % 2**63)
        return torch.rand(self.shapes[name], generator=g)

    def __iter__(self):
        return iter(self.shapes)

    def __len__(self):
        return len(self.shapes)


def scope_names(llm, include_embeddings: bool = False, include_norms: bool = True) -> dict[str, tuple[int, ...]]:
    """Name → shape of the parameters that deactivation may touch."""
    if is_peft(llm):
        raise TextkeepError(
            "deactivation needs the bare LLM: merge the LoRA adapter first "
            "(`model.llm = model.llm.merge_and_unload()`)."
        )
    prefix, _ = decoder_layers(llm)
    extra = ("embeddings", "head") if include_embeddings else ()
    return {
        n: tuple(p.shape)
        for n, p in llm.named_parameters()
        if (n.startswith(prefix + ".") and (include_norms or module_type(n) != "norms")) or module_type(n) in extra
    }


def choose(
    scores: Mapping,
    shapes: dict[str, tuple[int, ...]],
    condition: str,
    percent: float,
    scope: str = "tensor",
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Flat indices to zero in each tensor of `shapes`: top / bottom / random `percent`% by `scores`."""
    if condition not in CONDITIONS:
        raise TextkeepError(f"condition must be one of {', '.join(CONDITIONS)}, got {condition!r}")
    if scope not in SCOPES:
        raise TextkeepError(f"scope must be 'tensor' or 'global', got {scope!r}")
    if not 0 <= percent <= 100:
        raise TextkeepError(f"percent must be in 0..100, got {percent}")
    names = sorted(shapes)
    check_compatible(scores, shapes, names=names)
    if condition == "random":
        scores = RandomScores(shapes, seed)
    largest = condition != "bottom"
    if scope == "tensor":
        return {n: next(select_top([scores[n]], count_for(math.prod(shapes[n]), percent), largest)) for n in names}
    k = count_for(sum(math.prod(shapes[n]) for n in names), percent)
    return dict(zip(names, select_top(lambda: (scores[n] for n in names), k, largest)))


@contextlib.contextmanager
def deactivated(llm, indices: dict[str, torch.Tensor]) -> Iterator[None]:
    """Zero the given flat indices of the named parameters for the duration of the block; restore them exactly."""
    params = dict(llm.named_parameters())
    saved: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    try:
        with torch.no_grad():
            for name, idx in indices.items():
                flat = params[name].view(-1)
                idx = idx.to(flat.device)
                saved[name] = (idx, flat[idx].clone())
                flat[idx] = 0
        yield
    finally:
        with torch.no_grad():
            for name, (idx, values) in saved.items():
                params[name].view(-1)[idx] = values


def _measure(
    model,
    importance_map,
    samples_by_input: dict[str, list],
    percent: float,
    scope: str,
    include_embeddings: bool,
    seed: int,
    batch_size: int,
    include_norms: bool,
    precision: str = "fp32",
) -> dict[str, dict[str, dict]]:
    """{input: {condition: the `perplexity` result with per-example sums}} for base, top, bottom and random: the one
    measurement behind `deactivation_table` and `deactivate`."""
    from textkeep.eval.perplexity import perplexity

    if isinstance(importance_map, (str, Path)):
        importance_map = open_map(importance_map)
    scores = getattr(importance_map, "scores", importance_map)
    shapes = scope_names(model.llm, include_embeddings, include_norms)

    def measure(samples):
        return perplexity(model, samples, batch_size, per_example=True, precision=precision)

    runs = {name: {"base": measure(samples)} for name, samples in samples_by_input.items()}
    for condition in CONDITIONS:
        indices = choose(scores, shapes, condition, percent, scope, seed)
        with deactivated(model.llm, indices):
            for name, samples in samples_by_input.items():
                runs[name][condition] = measure(samples)
    return runs


def _table(runs: dict[str, dict[str, dict]]) -> dict[str, dict[str, float]]:
    return {name: {c: r["ppl"] for c, r in per.items()} for name, per in runs.items()}


def deactivation_table(
    model,
    importance_map,
    samples_by_input: dict[str, list],
    percent: float = 3.0,
    scope: str = "tensor",
    include_embeddings: bool = False,
    seed: int = 0,
    batch_size: int = 8,
    include_norms: bool = True,
) -> dict:
    """Perplexity per input kind with nothing removed and with the top, bottom and a random `percent`% removed.

    `importance_map`: a map directory, an `ImportanceMap`, or a name → tensor mapping. Returns
    {input: {"base": ppl, "top": ppl, "bottom": ppl, "random": ppl}}.
    """
    runs = _measure(
        model, importance_map, samples_by_input, percent, scope, include_embeddings, seed, batch_size, include_norms
    )
    return _table(runs)


def n_deactivated(shapes: dict[str, tuple[int, ...]], percent: float, scope: str = "tensor") -> int:
    sizes = [math.prod(s) for s in shapes.values()]
    return sum(count_for(n, percent) for n in sizes) if scope == "tensor" else count_for(sum(sizes), percent)


def _ppl(x: float) -> str:
    if x is None or not math.isfinite(x):
        return "—"
    if x >= 1e4:
        e = int(math.floor(math.log10(x)))
        return f"{x / 10**e:.2f}×10^{e}"
    return f"{x:.2f}"


def deactivation_markdown(tables: dict[str, dict], percent: float = 3.0) -> str:
    """Table 1's layout: a row per (model, input), columns Base and Top / Bottom / Random p% removed.
    `tables`: model label → the dict of `deactivation_table`."""
    head = ["Model", "Input", "Base", *(f"{c.capitalize()} {percent:g}% removed" for c in CONDITIONS)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for model_label, table in tables.items():
        order = [i for i in INPUT_ORDER if i in table] + [i for i in table if i not in INPUT_ORDER]
        for j, name in enumerate(order):
            row = table[name]
            cells = [
                model_label if j == 0 else "",
                name.capitalize(),
                _ppl(row["base"]),
                *(_ppl(row[c]) for c in CONDITIONS),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _check_inputs(inputs: Sequence[str]) -> list[str]:
    wanted = list(inputs)
    if not wanted or any(i not in INPUTS for i in wanted):
        raise TextkeepError(f"inputs must be a comma-separated list of text, speech; got {inputs!r}")
    return wanted


def deactivate(
    model,
    map,
    records: Sequence,
    inputs: Sequence[str] = INPUTS,
    percent: float = 3.0,
    scope: str = "tensor",
    seed: int = 0,
    include_norms: bool = True,
    limit: int | None = None,
    batch_size: int = 8,
    precision: str = "fp32",
) -> dict:
    """Table 1 for one model: measure perplexity with nothing, the top, the bottom and a random `percent`% removed.

    Args:
        model: a SpeechLLM with a bare LLM (merge LoRA first, e.g. `load_speech_llm(..., merge_lora=True)`), on the
            device it should run on; its weights are back bit for bit on return.
        map: the importance map: a directory, an `ImportanceMap` or a name → tensor mapping (of this model).
        records: the examples (data.records.Record with reference responses; with audio for speech inputs).
        inputs: the input kinds to measure, among text and speech.
        percent, scope, seed, include_norms: as `importance_deactivate`.
        limit: measure only the first `limit` records (None or 0: all).
        batch_size: examples per forward.
        precision: fp32, bf16 (bf16 autocast; losses summed in fp32) or auto.

    Returns the JSON-able result that `write_deactivation` writes: "table" ({input: {"base", "top", "bottom",
    "random": perplexity}}), "per_example" ({input: {condition: {"losses": [...], "n_tokens": [...]}}}: each
    example's summed response-token loss (nats) and token count, in the order of "example_ids"), "example_ids",
    "model" (its LLM's name), "map", "inputs", "n_examples", "percent", "scope", "include_norms", "seed",
    "n_scope_parameters", "n_deactivated", "seconds".
    """
    from textkeep.data.samples import make_samples

    wanted = _check_inputs(inputs)
    started = time.time()
    records = list(records[:limit] if limit else records)
    samples = {i: make_samples(model, records, i) for i in wanted}
    runs = _measure(model, map, samples, percent, scope, False, seed, batch_size, include_norms, precision)
    shapes = scope_names(model.llm, include_norms=include_norms)
    return jsonable(
        {
            "table": _table(runs),
            "model": model.config.llm,
            "map": str(map) if isinstance(map, (str, Path)) else None,
            "inputs": wanted,
            "n_examples": len(records),
            "percent": percent,
            "scope": scope,
            "include_norms": include_norms,
            "precision": precision,
            "seed": seed,
            "n_scope_parameters": sum(math.prod(s) for s in shapes.values()),
            "n_deactivated": n_deactivated(shapes, percent, scope),
            "seconds": round(time.time() - started, 1),
            "example_ids": [r.id for r in records],
            "per_example": {name: {c: r["per_example"] for c, r in per.items()} for name, per in runs.items()},
        }
    )


def write_deactivation(out: str | Path, result: dict, label: str) -> Path:
    """`result` (of `deactivate`) as out/deactivation.json, and Table 1's rows as out/deactivation.md, the model
    labelled `label`. Returns `out`."""
    out = Path(out)
    write_json(out / "deactivation.json", jsonable(result))
    write_text(out / "deactivation.md", deactivation_markdown({label: result["table"]}, result["percent"]))
    return out


def importance_deactivate(
    model: str,
    map: Path,
    data: str,
    inputs: list[str] = ["text", "speech"],
    percent: float = 3.0,
    scope: str = "tensor",
    limit: int = 100,
    split: str = "test",
    out: Path = Path("runs/analysis/deactivation"),
    encoder: str = "whisper-base",
    seed: int = 0,
    spoken: Path | None = None,
    include_norms: bool = True,
    precision: str = "fp32",
) -> Path:
    """Validate an importance map (paper Table 1): perplexity of reference responses after zeroing the top, the
    bottom and a random `percent`% of the LLM's parameters, with text and with speech inputs.

    Args:
        model: a textkeep checkpoint directory (LoRA is merged), or an LLM; an LLM has no trained adaptor, so only
            text inputs are measured.
        map: the importance map directory (computed on this model).
        data: the data set (built-in name or file) with reference responses.
        inputs: the input kinds, among text and speech (`text,speech` on the command line).
        percent: the share of parameters zeroed in each condition.
        scope: tensor (each decoder-layer tensor loses its own p%, as Zhang et al. 2024) or global (one threshold).
        limit: at most this many examples of the split.
        split: test, train, importance (seeded splits of `data`) or all.
        out: folder for deactivation.json and deactivation.md.
        encoder: the Whisper encoder when `model` is an LLM (unused then, as only text is measured).
        seed: seed of the splits and of the random selection.
        spoken: a TTS manifest (`textkeep speak`) giving the records their audio, for speech inputs when the data set
            has no recorded audio. With speech inputs only records that have audio are used, for text inputs too, so
            both rows of the table score the same examples.
        include_norms: also zero entries of the decoder layers' norm weights (the default: every tensor in the layers).
            A norm weight's entry scales one channel for every token, so zeroing even its least important entries
            removes whole channels; --include-norms false keeps to the weight matrices.
        precision: fp32, bf16 (bf16 autocast; losses summed in fp32) or auto (bf16 on a GPU, fp32 on a CPU).
    """
    from textkeep.data.datasets import load_dataset, spoken_records
    from textkeep.data.splits import make_splits
    from textkeep.model.speech_llm import is_checkpoint, load_speech_llm
    from textkeep.runtime import on_device

    wanted = _check_inputs(inputs)
    if split not in ("test", "train", "importance", "all"):
        raise TextkeepError(f"split must be test, train, importance or all; got {split!r}")
    started = time.time()
    if not is_checkpoint(model):
        if "speech" in wanted:
            print("note: an LLM without a trained adaptor hears nothing; measuring text inputs only.")
        wanted = ["text"]
    speech_llm = on_device(load_speech_llm(model, None, merge_lora=True))  # an LLM is measured on text only
    records = load_dataset(data)
    if split != "all":
        records = getattr(make_splits(records, seed=seed), split)
    records = spoken_records(records, spoken, "speech" in wanted, f"'{split}' records of '{data}'")
    result = deactivate(
        speech_llm, map, records, wanted, percent, scope, seed, include_norms, limit, precision=precision
    )
    # The command's own provenance, beside what `deactivate` reports.
    result |= {
        "model": model,
        "data": data,
        "spoken": str(spoken) if spoken is not None else None,
        "split": split,
        "seconds": round(time.time() - started, 1),
    }
    write_deactivation(out, result, Path(model).name if is_checkpoint(model) else model)
    print((Path(out) / "deactivation.md").read_text(encoding="utf-8"), end="")
    return Path(out)
