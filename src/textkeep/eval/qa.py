"""Spoken QA: text-to-text (T2T, the question typed) and speech-to-text (S2T, the question spoken).

    textkeep eval --model NAME_OR_DIR --sets llama-questions,web-questions --modes t2t,s2t --out DIR

Writes DIR/predictions.jsonl (one row per question and mode, appended as batches finish, so an interrupted
run resumes where it stopped), DIR/metrics.json (accuracy per set × mode × scorer with a 95% bootstrap
interval) and DIR/table.md (laid out like the paper's Table 2). Scoring rules: docs/scoring.md.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from textkeep.errors import TextkeepError
from textkeep.eval.scoring import SCORERS, summarize
from textkeep.fileio import write_json, write_text
from textkeep.settings import cache_dir

QA_SETS = {"llama-questions": "llama-questions", "web-questions": "web-questions:test"}
MODES = {"t2t": "text", "s2t": "speech", "cascade": "transcript"}  # cascade: eval/cascade.py
SET_TITLES = {"llama-questions": "Llama Q", "web-questions": "Web Q"}


def spoken_manifest(set_name: str) -> Path:
    """Where `textkeep speak` puts a synthesized spoken version of a set by default."""
    return cache_dir() / "spoken" / set_name / "manifest.jsonl"


def load_qa_set(
    set_name: str,
    spoken: dict[str, str] | None = None,
    need_audio: bool = False,
    partial: bool = False,
    limit: int | None = None,
):
    """A dataset's records; with need_audio, sets without recorded speech get the audio of their synthesized
    manifest, and every record must have audio (partial=True: keep only those that do)."""
    from textkeep.data.datasets import attach_audio, load_dataset

    records = load_dataset(QA_SETS.get(set_name, set_name))[:limit]
    if need_audio and any(r.audio is None for r in records):
        manifest = Path((spoken or {}).get(set_name) or spoken_manifest(set_name))
        if not manifest.is_file():
            raise TextkeepError(
                f"S2T on '{set_name}' needs its spoken version, and '{manifest}' does not exist. Make it with "
                f"`textkeep speak {set_name} --out {manifest.parent}`, "
                f"or pass --spoken '{{{set_name}: DIR/manifest.jsonl}}'."
            )
        records = attach_audio(records, manifest)
        missing = [r.id for r in records if r.audio is None]
        if partial:
            return [r for r in records if r.audio is not None]
        if missing:
            raise TextkeepError(
                f"{len(missing)} questions of '{set_name}' have no audio in '{manifest}' (first: {missing[0]}); "
                "finish it with `textkeep speak`."
            )
    return records


def _read_predictions(path: Path) -> list[dict]:
    rows = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut by a kill: everything before it is whole
    return rows


def evaluate(
    speech_llm,
    sets: list[str],
    modes: list[str],
    out: Path,
    *,
    limit: int | None = None,
    batch_size: int = 16,
    max_new_tokens: int = 64,
    spoken: dict[str, str] | None = None,
    model_name: str = "",
    show: bool = False,
    progress: bool = True,
    precision: str = "fp32",
) -> dict:
    from tqdm.auto import tqdm

    from textkeep.data.samples import length_grouped_batches, make_samples
    from textkeep.runtime import autocast

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"model": model_name, "max_new_tokens": max_new_tokens, "decoding": "greedy", "limit": limit}
    if precision != "fp32":  # (fp32 folders written before the setting existed stay valid)
        settings["precision"] = precision
    run_file = out / "run.json"
    if run_file.is_file() and json.loads(run_file.read_text()) != settings:
        raise TextkeepError(
            f"'{out}' holds predictions made with other settings ({run_file.read_text().strip()}); "
            "use another --out, or delete the folder to start again."
        )
    write_json(run_file, settings)
    pred_path = out / "predictions.jsonl"
    rows = _read_predictions(pred_path)
    write_text(pred_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))  # drop a cut last line
    done = {(r["set"], r["modality"], r["id"]) for r in rows}
    timings = {}
    with open(pred_path, "a", encoding="utf-8") as sink:
        for set_name in sets:
            for mode in modes:
                if mode not in MODES:
                    raise TextkeepError(f"unknown mode '{mode}'; choose from {', '.join(MODES)}")
                records = load_qa_set(set_name, spoken, need_audio=mode != "t2t", limit=limit)
                todo = [r for r in records if (set_name, mode, r.id) not in done]
                started = time.time()
                if todo:
                    samples = make_samples(speech_llm, todo, MODES[mode], with_response=False, progress=progress)
                    bar = tqdm(total=len(todo), desc=f"{set_name} {mode}", unit="q", disable=not progress)
                    # Fixed batches, no refilled slots (generate_ids `slots`): refilling measured no faster on
                    # this CPU (benchmarks/bench_eval.py --refill 4).
                    for idx in length_grouped_batches(samples, batch_size, speech_llm.config.adaptor_k):
                        with autocast(precision, speech_llm.device):
                            answers = speech_llm.generate([samples[i] for i in idx], max_new_tokens=max_new_tokens)
                        for i, prediction in zip(idx, answers):
                            r = todo[i]
                            row = {
                                "id": r.id,
                                "set": set_name,
                                "modality": mode,
                                "question": r.instruction,
                                "prediction": prediction,
                                "answers": list(r.answers),
                                "correct": {name: fn(prediction, r.answers) for name, fn in SCORERS.items()},
                            }
                            sink.write(json.dumps(row, ensure_ascii=False) + "\n")
                            rows.append(row)
                            if show:
                                mark = "✓" if row["correct"]["has_answer"] else "✗"
                                bar.write(
                                    f"{mark} {r.instruction}\n    → {prediction!r}  (gold: {' | '.join(r.answers)})"
                                )
                        sink.flush()
                        os.fsync(sink.fileno())
                        bar.update(len(idx))
                    bar.close()
                timings[f"{set_name}/{mode}"] = round(time.time() - started, 1)
    wanted = {(s, m) for s in sets for m in modes}
    metrics = {
        "model": model_name,
        "decoding": {"strategy": "greedy", "max_new_tokens": max_new_tokens, "batch_size": batch_size},
        "limit": limit,
        "bootstrap": {"n_boot": 10000, "alpha": 0.05, "seed": 0},
        "seconds": timings,
        "results": summarize([r for r in rows if (r["set"], r["modality"]) in wanted]),
    }
    write_json(out / "metrics.json", metrics)
    write_text(out / "table.md", results_table({model_name or "model": metrics["results"]}))
    return metrics


def results_table(results_by_model: dict[str, dict], scorer: str = "has_answer") -> str:
    """Markdown in the paper's Table 2 layout: one row per model, T2T and S2T under each set; accuracy % [95% CI]."""
    shown = [m for m in MODES if m != "cascade" or any(m in r.get(s, {}) for r in results_by_model.values() for s in r)]
    cols = [(s, m) for s in QA_SETS for m in shown]
    head = "| Model | " + " | ".join(f"{SET_TITLES[s]} {m.upper()}" for s, m in cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 1)]
    for name, res in results_by_model.items():
        cells = []
        for s, m in cols:
            cell = res.get(s, {}).get(m, {}).get(scorer)
            cells.append(
                f"{100 * cell['accuracy']:.1f} [{100 * cell['ci95'][0]:.1f}, "
                f"{100 * cell['ci95'][1]:.1f}] (n={cell['n']})"
                if cell
                else "-"
            )
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\nAccuracy (%) under the `{scorer}` scorer, 95% bootstrap interval in brackets.\n"


def eval_qa(
    model: str = "smollm2-135m-instruct",
    sets: list[str] = list(QA_SETS),
    modes: list[str] = ["t2t", "s2t"],
    out: Path = Path("runs/eval"),
    limit: int | None = None,
    batch_size: int = 16,
    max_new_tokens: int = 64,
    encoder: str = "whisper-base",
    spoken: dict[str, str] | None = None,
    show: bool = False,
    precision: str = "fp32",
) -> dict:
    """Spoken-QA accuracy, text-to-text (t2t) and speech-to-text (s2t), with 95% intervals.

    Args:
        model: a textkeep checkpoint directory, or an LLM (No-FT baseline; s2t then uses an untrained adaptor).
        sets: llama-questions, web-questions, or QA files (`a,b` or `[a, b]`).
        modes: t2t, s2t, cascade (Whisper's own transcript through the text path; eval/cascade.py) (`a,b` or
            `[a, b]`).
        out: folder for predictions.jsonl, metrics.json and table.md; a rerun resumes there.
        limit: only the first N questions of each set.
        batch_size: questions generated together (length-sorted, left-padded).
        max_new_tokens: the longest answer, in tokens.
        encoder: the Whisper encoder when `model` is an LLM and s2t is asked for.
        spoken: set name → TTS manifest for sets without recorded speech (default: the cache's spoken/<set>/).
        show: print every question, answer and verdict.
        precision: fp32, bf16 (generation under bf16 autocast) or auto (bf16 on a GPU, fp32 on a CPU).
    """
    from textkeep.model.speech_llm import load_speech_llm
    from textkeep.runtime import on_device

    started = time.time()
    speech_llm = on_device(load_speech_llm(model, encoder if set(modes) - {"t2t"} else None))
    loaded = time.time()
    metrics = evaluate(
        speech_llm,
        sets,
        modes,
        out,
        limit=limit,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        spoken=spoken,
        model_name=model,
        show=show,
        precision=precision,
    )
    print(results_table({model: metrics["results"]}))
    for scorer in ("has_answer", "contains"):
        parts = [
            f"{s}/{m}: {100 * r[scorer]['accuracy']:.1f}% (n={r[scorer]['n']})"
            for s, by_mode in metrics["results"].items()
            for m, r in by_mode.items()
        ]
        print(f"{scorer:10} " + ", ".join(parts))
    print(f"model load {loaded - started:.1f} s, evaluation {time.time() - loaded:.1f} s; results in {out}/")
    return metrics
