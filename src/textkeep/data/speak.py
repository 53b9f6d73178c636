"""Speak records' instructions into a resumable folder of 16 kHz WAVs.

Layout of `out_dir`: `wav/<id>.wav` (mono PCM16), `manifest.jsonl` (one row per spoken item:
id, text, audio, voice, seconds, sha256) and `bad.jsonl` (items of the latest run that could not be spoken).
`speak()` works on records; `speak_command()` is `textkeep speak`, which loads and filters a dataset first.
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import soundfile as sf
from tqdm import tqdm

from textkeep.data.datasets import filter_records, load_dataset
from textkeep.data.records import Record
from textkeep.data.tts import SAMPLE_RATE, get_voice, synthesize
from textkeep.errors import TextkeepError
from textkeep.eval.qa import spoken_manifest
from textkeep.fileio import atomic_path, write_text
from textkeep.model.audio import MAX_SECONDS  # Whisper's window, one owner

DEFAULT_VOICES = ("piper:joe", "flite:kal", "flite:slt", "flite:awb", "flite:rms")
MANIFEST, BAD = "manifest.jsonl", "bad.jsonl"
# Synthesis is ONNX inference or a flite/espeak-ng subprocess, both outside the GIL, so threads give
# real parallelism without a second copy of the model (2 threads ~1.5-2x one on 2 cores, see bench_tts).
WORKERS = min(2, os.cpu_count() or 1)

_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,150}")


def choose_voice(item_id: str, voices: Sequence[str], seed: int = 0) -> str:
    """The voice for an item, from (seed, id) alone.

    Rendezvous hashing: each voice gets a hash score and the highest wins, so adding items changes nothing,
    and adding a voice only moves the items that the new voice wins.
    """
    if not voices:
        raise TextkeepError("no voices given: pass at least one of textkeep.data.tts.VOICES")
    return max(voices, key=lambda v: hashlib.sha256(f"{seed}\0{item_id}\0{v}".encode()).digest())


def wav_name(item_id: str) -> str:
    if _SAFE_ID.fullmatch(item_id):
        return f"{item_id}.wav"
    # Ids with "/" or other odd characters must not escape wav/; the hash keeps cleaned names distinct.
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", item_id)[:100].strip("._-") or "item"
    return f"{stem}-{hashlib.sha256(item_id.encode()).hexdigest()[:10]}.wav"


def read_jsonl(path: Path) -> list[dict]:
    """Rows of an append-only JSONL file. A last line without its newline is the remains of a killed append:
    it is ignored and cut off the file, so the next append starts on a fresh line."""
    if not path.exists():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        os.truncate(path, end)
    rows = []
    for n, line in enumerate(data[:end].splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise TextkeepError(f"{path} line {n} is not valid JSON ({e}): delete that line and rerun") from None
    return rows


def _append(f, row: dict) -> None:
    # One write of a whole line, then fsync: a kill leaves at most a partial last line, which read_jsonl drops.
    f.write((json.dumps(row, ensure_ascii=False) + "\n").encode())
    f.flush()
    os.fsync(f.fileno())


def _sha256(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def _is_done(row: dict | None, rec: Record, voice: str, out_dir: Path) -> bool:
    """Spoken before with the same text and voice, and the file is the one that was written."""
    return (
        row is not None
        and row.get("text") == rec.instruction
        and row.get("voice") == voice
        and _sha256(out_dir / row.get("audio", "")) == row.get("sha256")
    )


def _try(job: tuple[Record, str]) -> np.ndarray | TextkeepError:
    rec, voice = job
    try:
        audio = synthesize(rec.instruction, voice)
    except TextkeepError as e:
        return e
    if len(audio) > MAX_SECONDS * SAMPLE_RATE:  # Whisper's window: such an item could never be heard whole
        return TextkeepError(
            f"spoken, it lasts {len(audio) / SAMPLE_RATE:.1f} s, and Whisper hears at most {MAX_SECONDS:.0f} s; "
            "lower --max_query_words or drop the item"
        )
    return audio


def _in_order(fn: Callable, jobs: Iterable, workers: int) -> Iterator[tuple]:
    """(job, fn(job)) in job order, with at most a few jobs ahead of the consumer."""
    with ThreadPoolExecutor(workers) as ex:
        pending: collections.deque = collections.deque()
        for job in jobs:
            pending.append((job, ex.submit(fn, job)))
            if len(pending) > 2 * workers:
                job0, fut = pending.popleft()
                yield job0, fut.result()
        while pending:
            job0, fut = pending.popleft()
            yield job0, fut.result()


def speak(
    records: list[Record],
    out_dir: Path,
    *,
    voices: Sequence[str] = DEFAULT_VOICES,
    seed: int = 0,
    limit: int | None = None,
    skip_bad: bool = False,
) -> Path:
    """Synthesize each record's `instruction` into `out_dir/wav/`; returns the manifest's path.

    Resumable: items whose manifest row has the same text and voice and whose WAV still has the recorded
    sha256 are skipped; everything else (no row, missing or changed file) is spoken again. Bad items (text
    that gives no speech) stop the run with an error naming the item, or with `skip_bad` go to bad.jsonl.
    """
    out_dir = Path(out_dir)
    records = list(records)[:limit] if limit is not None else list(records)
    seen: set[str] = set()
    for rec in records:
        if rec.id in seen:
            raise TextkeepError(f"item id {rec.id!r} occurs twice: give every record a unique id")
        seen.add(rec.id)

    for voice in voices:
        get_voice(voice)  # unknown names fail before any work
    manifest, bad_path = out_dir / MANIFEST, out_dir / BAD
    rows = read_jsonl(manifest)
    latest = {row["id"]: row for row in rows}
    todo = []
    for rec in records:
        voice = choose_voice(rec.id, voices, seed)
        if not _is_done(latest.get(rec.id), rec, voice, out_dir):
            todo.append((rec, voice))
    for voice in sorted({v for _, v in todo}):
        get_voice(voice).load()

    (out_dir / "wav").mkdir(parents=True, exist_ok=True)
    for stray in (out_dir / "wav").glob(".*.tmp"):  # left by a killed run's atomic_path
        stray.unlink()
    bad_path.unlink(missing_ok=True)  # bad items are retried, so the list is of this run only
    bad_ids = set()
    desc = f"speaking ({len(records) - len(todo)} already done)"
    with open(manifest, "ab") as mf, tqdm(total=len(todo), desc=desc, unit="utt", dynamic_ncols=True) as bar:
        for (rec, voice), result in _in_order(_try, todo, WORKERS):
            if isinstance(result, TextkeepError):
                if not skip_bad:
                    raise TextkeepError(
                        f"cannot speak item {rec.id!r} with {voice}: {result} "
                        f"(or rerun with --skip-bad to list such items in {bad_path})"
                    )
                with open(bad_path, "ab") as bf:
                    _append(bf, {"id": rec.id, "text": rec.instruction, "voice": voice, "reason": str(result)})
                bad_ids.add(rec.id)
            else:
                row = _write_wav(out_dir, rec, voice, result)
                _append(mf, row)
                latest[rec.id] = row
                rows.append(row)
            bar.update()

    # Redone items appended a second row; rewrite once so readers see one row per id.
    if len(rows) != len(latest) or bad_ids & latest.keys():
        kept = [row for row in latest.values() if row["id"] not in bad_ids]
        write_text(manifest, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))
    return manifest


def _write_wav(out_dir: Path, rec: Record, voice: str, audio: np.ndarray) -> dict:
    buf = io.BytesIO()
    sf.write(buf, audio, SAMPLE_RATE, subtype="PCM_16", format="WAV")
    data = buf.getvalue()
    rel = Path("wav") / wav_name(rec.id)
    with atomic_path(out_dir / rel) as tmp:  # a killed item leaves a stray temp file, never a short WAV
        tmp.write_bytes(data)
    seconds = round(len(audio) / SAMPLE_RATE, 3)
    sha = hashlib.sha256(data).hexdigest()
    return {
        "id": rec.id,
        "text": rec.instruction,
        "audio": rel.as_posix(),
        "voice": voice,
        "seconds": seconds,
        "sha256": sha,
    }


def speak_command(
    data: str,
    out: Path | None = None,
    voices: list[str] = list(DEFAULT_VOICES),
    limit: int | None = None,
    max_query_words: int | None = 50,
    seed: int = 0,
    skip_bad: bool = False,
) -> Path:
    """Synthesize a spoken version of a dataset offline (several voices), resumable, with a manifest.

    Args:
        data: a dataset name (web-questions, alpaca, alpaca-gpt4, …) or a JSON/JSONL file of Alpaca or QA records.
        out: output folder (wav/ and manifest.jsonl); default: the cache's spoken/<data>/, where eval and train look.
        voices: piper:joe, flite:kal, flite:kal16, flite:awb, flite:rms, flite:slt (`a,b` or `[a, b]`).
        limit: speak only the first N records (after filtering).
        max_query_words: leave out queries longer than this (Whisper hears at most 30 s; 50 words ≈ 20 s).
        seed: which voice speaks which item (by item id, so adding items reshuffles nothing).
        skip_bad: skip items that cannot be spoken and list them in bad.jsonl, instead of stopping.
    """
    records = load_dataset(data, skip_bad=skip_bad)
    if max_query_words is not None:
        records = filter_records(records, max_query_words=max_query_words)
    out = Path(out) if out is not None else spoken_manifest(data).parent
    started = time.time()
    manifest = speak(records, out, voices=voices, seed=seed, limit=limit, skip_bad=skip_bad)
    print(f"{manifest}: {len(read_jsonl(manifest))} utterances, {time.time() - started:.0f} s")
    return manifest
