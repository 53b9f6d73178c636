"""The `textkeep` command: each subcommand is a plain function; `--config FILE.yaml` fills its arguments.

Options are written with dashes or underscores alike (`--max-new-tokens` = `--max_new_tokens`);
YAML configs use the Python argument names.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from pathlib import Path

from textkeep.errors import TextkeepError


def models(prepare: str | None = None, force: bool = False) -> None:
    """List the model registry, or convert and cache the named models (`--prepare smollm2-135m-instruct,whisper-base`).

    Args:
        prepare: registry names to convert into the cache now, comma-separated.
        force: convert again even when the cache is up to date.
    """
    from textkeep.model import registry

    names = [n.strip() for n in (prepare or "").split(",") if n.strip()]
    if not names:
        print(f"{'name':24} {'prepared':9} description")
        for m in registry.REGISTRY.values():
            print(f"{m.name:24} {'yes' if registry.is_prepared(m.name) else 'no':9} {m.description}")
        print(f"\ncache: {registry.converted_dir('x').parent}")
        return
    for name in names:
        if name not in registry.REGISTRY:
            raise TextkeepError(f"'{name}' is not in the registry; choose from: {', '.join(registry.REGISTRY)}")
        cached = registry.is_prepared(name) and not force
        started = time.time()
        path = registry.prepare(name, force=force)
        print(f"{name}: {'cached' if cached else 'converted'} in {time.time() - started:.1f} s → {path}")


def answer(
    text: str | None = None,
    audio: Path | None = None,
    model: str = "smollm2-135m-instruct",
    encoder: str = "whisper-base",
    max_new_tokens: int = 64,
) -> str:
    """Answer one question, typed (--text) or spoken (--audio FILE.wav).

    Args:
        text: the question as text (the text-to-text path).
        audio: a WAV/FLAC file of the spoken question (the speech-to-text path).
        model: a textkeep checkpoint directory, or an LLM (registry name, local directory or hub id) to wrap with a new adaptor.
        encoder: the Whisper encoder to use when `model` is an LLM rather than a checkpoint.
        max_new_tokens: the longest answer, in tokens.
    """
    from textkeep.model.audio import load_audio
    from textkeep.model.speech_llm import Sample, SpeechLLM, is_checkpoint

    if (text is None) == (audio is None):
        raise TextkeepError('give exactly one of --text "question" or --audio FILE.wav')
    speech_llm = SpeechLLM.load(model) if is_checkpoint(model) else SpeechLLM.build(model, encoder if audio else None)
    if audio is not None:
        waveform = load_audio(audio)
        if not speech_llm.config.adaptor_trained:
            print(
                "note: this adaptor is untrained (freshly initialised), so the LLM cannot understand the audio yet and the "
                "answer below is noise. Train one with `textkeep train` and pass its checkpoint as --model.",
                file=sys.stderr,
            )
        sample = Sample(speech=speech_llm.encode_audio([waveform])[0], id=str(audio))
    else:
        sample = Sample(text=text)
    reply = speech_llm.generate([sample], max_new_tokens=max_new_tokens)[0]
    print(reply)
    return reply


def load_model(model: str, encoder: str | None):
    """A checkpoint directory loads as saved; an LLM name gets `encoder` and a fresh adaptor."""
    from textkeep.model.speech_llm import SpeechLLM, is_checkpoint

    return SpeechLLM.load(model) if is_checkpoint(model) else SpeechLLM.build(model, encoder)


def eval_qa(
    model: str = "smollm2-135m-instruct",
    sets: str = "llama-questions,web-questions",
    modes: str = "t2t,s2t",
    out: Path = Path("runs/eval"),
    limit: int | None = None,
    batch_size: int = 16,
    max_new_tokens: int = 64,
    encoder: str = "whisper-base",
    spoken: dict[str, str] | None = None,
    show: bool = False,
) -> dict:
    """Spoken-QA accuracy, text-to-text (t2t) and speech-to-text (s2t), with 95% intervals.

    Args:
        model: a textkeep checkpoint directory, or an LLM (No-FT baseline; s2t then uses an untrained adaptor).
        sets: comma-separated: llama-questions, web-questions, or a QA file.
        modes: comma-separated: t2t, s2t.
        out: folder for predictions.jsonl, metrics.json and table.md; a rerun resumes there.
        limit: only the first N questions of each set.
        batch_size: questions generated together (length-sorted, left-padded).
        max_new_tokens: the longest answer, in tokens.
        encoder: the Whisper encoder when `model` is an LLM and s2t is asked for.
        spoken: set name → TTS manifest for sets without recorded speech (default: the cache's spoken/<set>/).
        show: print every question, answer and verdict.
    """
    from textkeep.eval.qa import evaluate, results_table

    mode_list = [m.strip() for m in modes.split(",") if m.strip()]
    set_list = [s.strip() for s in sets.split(",") if s.strip()]
    started = time.time()
    speech_llm = load_model(model, encoder if "s2t" in mode_list else None)
    loaded = time.time()
    metrics = evaluate(
        speech_llm,
        set_list,
        mode_list,
        out,
        limit=limit,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        spoken=spoken,
        model_name=model,
        show=show,
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


def speak(
    data: str,
    out: Path | None = None,
    voices: str = "piper:joe,flite:kal,flite:slt,flite:awb,flite:rms",
    limit: int | None = None,
    max_query_words: int | None = 50,
    seed: int = 0,
    skip_bad: bool = False,
) -> Path:
    """Synthesize a spoken version of a dataset offline (several voices), resumable, with a manifest.

    Args:
        data: a dataset name (web-questions, alpaca, alpaca-gpt4, …) or a JSON/JSONL file of Alpaca or QA records.
        out: output folder (wav/ and manifest.jsonl); default: the cache's spoken/<data>/, where eval and train look.
        voices: comma-separated voices: piper:joe, flite:kal, flite:kal16, flite:awb, flite:rms, flite:slt.
        limit: speak only the first N records (after filtering).
        max_query_words: leave out queries longer than this (Whisper hears at most 30 s; 50 words ≈ 20 s).
        seed: which voice speaks which item (by item id, so adding items reshuffles nothing).
        skip_bad: skip items that cannot be spoken and list them in bad.jsonl, instead of stopping.
    """
    from textkeep.data.datasets import filter_records, load_dataset
    from textkeep.data.speak import speak as speak_records
    from textkeep.eval.qa import spoken_manifest

    records = load_dataset(data, skip_bad=skip_bad)
    if max_query_words is not None:
        records = filter_records(records, max_query_words=max_query_words)
    out = Path(out) if out is not None else spoken_manifest(data).parent
    started = time.time()
    manifest = speak_records(
        records,
        out,
        voices=[v.strip() for v in voices.split(",") if v.strip()],
        seed=seed,
        limit=limit,
        skip_bad=skip_bad,
    )
    print(f"{manifest}: {sum(1 for _ in open(manifest))} utterances, {time.time() - started:.0f} s")
    return manifest


def features(
    data: str,
    spoken: Path | None = None,
    encoder: str = "whisper-base",
    encoder_policy: str = "pad30",
    keep_padding: bool = False,
    checkpoint: str | None = None,
    limit: int | None = None,
    batch_size: int = 8,
) -> None:
    """Fill the speech feature cache ahead of time (the frozen encoder's output for every audio file of a dataset).

    Args:
        data: a dataset with audio (llama-questions) or whose spoken version exists (see `textkeep speak`).
        spoken: the TTS manifest when the dataset has no recorded audio; default: the cache's spoken/<data>/.
        encoder: the Whisper encoder.
        encoder_policy: pad30 (Whisper's 30 s window) or trim (real-length input); see docs/design.md.
        keep_padding: keep all 1500 frames (LLaMA-Omni) instead of those covering the audio.
        checkpoint: a textkeep checkpoint whose encoder and policy to use instead of the three options above.
        limit: only the first N records that have audio.
        batch_size: utterances encoded together.
    """
    from textkeep.data.features import FeatureCache
    from textkeep.eval.qa import load_qa_set
    from textkeep.model.speech_llm import SpeechLLM

    records = load_qa_set(data, {data: str(spoken)} if spoken else None, need_audio=True, partial=True)[:limit]
    if checkpoint:
        speech_llm = SpeechLLM.load(checkpoint)
    else:  # the LLM plays no part in encoding; the tiny one keeps memory and start-up small
        speech_llm = SpeechLLM.build("tiny-llama", encoder, encoder_policy=encoder_policy, keep_padding=keep_padding)
    cache = FeatureCache(speech_llm)
    started = time.time()
    cache.frames(records, batch_size=batch_size)
    print(f"{len(records)} utterances cached in {cache.dir} ({time.time() - started:.0f} s)")


@functools.cache
def _commands() -> dict:
    # Workflow modules are imported lazily by their functions; these imports only fetch the function objects.
    from textkeep.importance.analysis import importance_change, importance_clusters, importance_layers, importance_shift
    from textkeep.importance.compute import importance_compute
    from textkeep.importance.deactivation import importance_deactivate
    from textkeep.study import study
    from textkeep.train.trainer import merge_lora, train

    return {
        "models": models,
        "answer": answer,
        "speak": speak,
        "features": features,
        "importance": {
            "compute": importance_compute,
            "layers": importance_layers,
            "shift": importance_shift,
            "clusters": importance_clusters,
            "deactivate": importance_deactivate,
            "change": importance_change,
        },
        "train": train,
        "merge": merge_lora,
        "eval": eval_qa,
        "study": study,
    }


def __getattr__(name: str):
    # `cli.COMMANDS` is built on first use, so that `import textkeep.cli` (and `--help`) stays light.
    if name == "COMMANDS":
        return _commands()
    raise AttributeError(name)


def _normalise_argv(argv: list[str]) -> list[str]:
    """Accept what users type, then hand jsonargparse its own form:
    `--foo-bar` → `--foo_bar`; a bare boolean flag (`--show`) → `--show true`; and a required argument given as an
    option (`--model X`) → the positional it is (so `importance compute --model X --data Y` and
    `importance compute X Y` are the same command)."""
    import inspect

    out: list[str] = []
    for arg in argv:
        if arg.startswith("--") and len(arg) > 2:
            name, eq, value = arg[2:].partition("=")
            arg = "--" + name.replace("-", "_") + eq + value
        out.append(arg)
    n_cmd = 1
    command = _commands().get(out[0]) if out else None
    if isinstance(command, dict):  # a group: `importance compute …`
        command = command.get(out[1]) if len(out) > 1 else None
        n_cmd = 2
    if command is None or any(a in ("-h", "--help") for a in out):
        return out
    params = inspect.signature(command).parameters
    flags = {f"--{n}" for n, p in params.items() if p.annotation in (bool, "bool")}
    required = [n for n, p in params.items() if p.default is inspect.Parameter.empty]
    given: dict[str, str] = {}
    positional: list[str] = []
    options: list[str] = []
    rest = out[n_cmd:]
    i = 0
    while i < len(rest):
        arg = rest[i]
        if not arg.startswith("--"):
            positional.append(arg)
            i += 1
            continue
        name, eq, value = arg[2:].partition("=")
        following = rest[i + 1] if i + 1 < len(rest) else None
        if (
            arg in flags
            and not eq
            and (following is None or following.lower() not in ("true", "false", "yes", "no", "1", "0"))
        ):
            options += [arg, "true"]
            i += 1
        elif name == "print_config" or eq:
            options.append(arg)
            i += 1
        elif name in required and following is not None:
            given[name] = following
            i += 2
        else:
            options += [arg] + ([following] if following is not None else [])
            i += 2
    fill = iter(positional)
    ordered = [given[n] if n in given else next(fill, None) for n in required]
    ordered = [v for v in ordered if v is not None] + list(fill)
    return out[:n_cmd] + ordered + options


def main(argv: list[str] | None = None) -> None:
    from jsonargparse import auto_cli

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    argv = _normalise_argv(sys.argv[1:] if argv is None else argv)
    try:
        auto_cli(_commands(), args=argv, as_positional=True)
    except TextkeepError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
