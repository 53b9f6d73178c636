"""Validation of importance scores by deactivation (paper §2.2, Table 1): zero the top, the bottom or a random p% of
the LLM's parameters and measure the perplexity of reference responses, with text and with speech inputs.

Scope. `tensor` (default, as Zhang et al. 2024, the paper's ref [21]): every tensor inside the decoder layers loses
its own p% (rounded half up). `global`: one threshold over all of them, found exactly by the radix select of
`analysis.select_top` (two streaming 65536-bin histogram passes over the float32 bit patterns, then exact
selection; no sort, no copy of all scores). `include_embeddings` adds the token embeddings and an untied LM head
(a tied head is the embedding matrix itself); `include_norms=False` leaves out the decoder layers' norm weights.
The final norm and the speech front-end are never touched.

Random selection is seeded: every tensor draws uniform scores from a generator seeded by (seed, tensor name), and
the same top-p% machinery picks from those, so a global random pick needs no list of all parameters either.
Ties at a threshold are broken by position (earliest first), so each selection holds exactly its count.

Weights are restored bit for bit: only the zeroed entries are saved (p% of the scope) and written back in a
`finally`, also when the measurement raises.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Iterator

import torch

from textkeep.errors import TextkeepError
from textkeep.importance.analysis import count_for, jsonable, open_map, seed_of, select_top, shape_of
from textkeep.importance.maps import decoder_layers, module_type

CONDITIONS = ("top", "bottom", "random")
SCOPES = ("tensor", "global")
INPUT_ORDER = ("speech", "text")  # Table 1's row order


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
    if hasattr(llm, "peft_config"):
        raise TextkeepError(
            "deactivation needs the bare LLM: merge the LoRA adapter first (`model.llm = model.llm.merge_and_unload()`)."
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
    for n in names:
        have = shape_of(scores, n)
        if have != shapes[n]:
            raise TextkeepError(
                f"the importance map has {'no ' + n if have is None else f'{n} of shape {have}'} (model: {shapes[n]}); "
                "compute the map on this model (`textkeep importance compute`)."
            )
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
    from textkeep.eval.perplexity import perplexity

    if isinstance(importance_map, (str, Path)):
        importance_map = open_map(importance_map)
    scores = getattr(importance_map, "scores", importance_map)
    shapes = scope_names(model.llm, include_embeddings, include_norms)
    table = {
        name: {"base": perplexity(model, samples, batch_size)["ppl"]} for name, samples in samples_by_input.items()
    }
    for condition in CONDITIONS:
        indices = choose(scores, shapes, condition, percent, scope, seed)
        with deactivated(model.llm, indices):
            for name, samples in samples_by_input.items():
                table[name][condition] = perplexity(model, samples, batch_size)["ppl"]
    return table


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


def importance_deactivate(
    model: str,
    map: Path,
    data: str,
    inputs: str = "text,speech",
    percent: float = 3.0,
    scope: str = "tensor",
    limit: int = 100,
    split: str = "test",
    out: Path = Path("runs/analysis/deactivation"),
    encoder: str = "whisper-base",
    seed: int = 0,
    spoken: Path | None = None,
    include_norms: bool = True,
) -> Path:
    """Validate an importance map (paper Table 1): perplexity of reference responses after zeroing the top, the
    bottom and a random `percent`% of the LLM's parameters, with text and with speech inputs.

    Args:
        model: a textkeep checkpoint directory (LoRA is merged), or an LLM; an LLM has no trained adaptor, so only text inputs are measured.
        map: the importance map directory (computed on this model).
        data: the data set (built-in name or file) with reference responses.
        inputs: comma-separated: text, speech.
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
    """
    from textkeep.data.datasets import load_dataset, spoken_records
    from textkeep.data.samples import make_samples
    from textkeep.data.splits import make_splits
    from textkeep.fileio import write_json, write_text
    from textkeep.model.speech_llm import SpeechLLM, is_checkpoint

    wanted = [i.strip() for i in inputs.split(",") if i.strip()]
    if not wanted or any(i not in ("text", "speech") for i in wanted):
        raise TextkeepError(f"inputs must be a comma-separated list of text, speech; got {inputs!r}")
    if split not in ("test", "train", "importance", "all"):
        raise TextkeepError(f"split must be test, train, importance or all; got {split!r}")
    started = time.time()
    if is_checkpoint(model):
        speech_llm = SpeechLLM.load(model)
    else:
        if "speech" in wanted:
            print("note: an LLM without a trained adaptor hears nothing; measuring text inputs only.")
        wanted = ["text"]
        speech_llm = SpeechLLM.build(model, None)
    if hasattr(speech_llm.llm, "peft_config"):
        speech_llm.llm = speech_llm.llm.merge_and_unload()
    if torch.cuda.is_available():
        speech_llm.to("cuda")
    records = load_dataset(data)
    if split != "all":
        records = getattr(make_splits(records, seed=seed), split)
    records = spoken_records(records, spoken, "speech" in wanted, f"'{split}' records of '{data}'")
    records = records[:limit] if limit else records
    samples = {i: make_samples(speech_llm, records, i) for i in wanted}
    table = deactivation_table(
        speech_llm, map, samples, percent=percent, scope=scope, seed=seed, include_norms=include_norms
    )
    shapes = scope_names(speech_llm.llm, include_norms=include_norms)
    out = Path(out)
    md = deactivation_markdown({Path(model).name if is_checkpoint(model) else model: table}, percent)
    write_json(
        out / "deactivation.json",
        jsonable(
            {
                "table": table,
                "model": model,
                "map": str(map),
                "data": data,
                "spoken": str(spoken) if spoken is not None else None,
                "inputs": wanted,
                "split": split,
                "n_examples": len(records),
                "percent": percent,
                "scope": scope,
                "include_norms": include_norms,
                "seed": seed,
                "n_scope_parameters": sum(math.prod(s) for s in shapes.values()),
                "n_deactivated": n_deactivated(shapes, percent, scope),
                "seconds": round(time.time() - started, 1),
            }
        ),
    )
    write_text(out / "deactivation.md", md)
    print(md, end="")
    return out
