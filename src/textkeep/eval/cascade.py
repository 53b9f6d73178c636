"""The cascade reference: Whisper's own transcript, read by the LLM's text path.

    textkeep eval --model smollm2-135m-instruct --modes '[t2t, cascade]' --sets llama-questions

An encoder–adaptor model hears through the same Whisper encoder; the cascade, which lets Whisper's decoder write
down what was said and hands the text to the LLM, is the S2T an encoder–adaptor model of this LLM can aim at.
Transcripts are greedy (English, no timestamps) and cached by the audio file's sha256, one JSONL file per ASR model
in the cache's transcripts/ folder, so a question is transcribed once, ever.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from textkeep.data.records import Record
from textkeep.errors import TextkeepError
from textkeep.fileio import file_sha256
from textkeep.settings import cache_dir


def _cache_file(asr: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in asr)
    return cache_dir() / "transcripts" / f"{safe}.jsonl"


def _read_cache(path: Path) -> dict[str, str]:
    got = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                break  # a line cut by a kill: everything before it is whole
            got[row["sha256"]] = row["text"]
    return got


def transcribe(
    records: Sequence[Record], asr: str = "whisper-base", batch_size: int = 8, progress: bool = True
) -> list[str]:
    """Whisper's greedy transcript of each record's audio (from the cache, or decoded and added to it)."""
    import torch
    from tqdm.auto import tqdm

    from textkeep.model.audio import load_record_audio

    missing = [r.id for r in records if r.audio is None]
    if missing:
        raise TextkeepError(
            f"{len(missing)} records have no audio (first: '{missing[0]}'); the cascade transcribes speech, so "
            "speak them first (`textkeep speak DATASET`)."
        )
    path = _cache_file(asr)
    known = _read_cache(path)
    keys = [file_sha256(Path(r.audio)) for r in records]
    todo = sorted({k: i for i, k in enumerate(keys) if k not in known}.values())
    if todo:
        from transformers import WhisperForConditionalGeneration, WhisperProcessor

        from textkeep.model.registry import resolve

        where = resolve(asr)
        model = WhisperForConditionalGeneration.from_pretrained(where).eval()
        processor = WhisperProcessor.from_pretrained(where)
        # English-only checkpoints (tiny.en) take no language or task; multilingual ones are told English.
        task = {"language": "en", "task": "transcribe"} if model.generation_config.is_multilingual else {}
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as sink, tqdm(total=len(todo), desc="whisper transcripts",
                                                             unit="utt", disable=not progress) as bar:  # fmt: skip
            for start in range(0, len(todo), batch_size):
                idx = todo[start : start + batch_size]
                audios = load_record_audio(records, idx)
                feats = processor.feature_extractor(audios, sampling_rate=16000, return_tensors="pt").input_features
                with torch.no_grad():  # every row is a full 30 s window, so the mask is all ones
                    ids = model.generate(feats, attention_mask=torch.ones(feats.shape[0], feats.shape[-1]), **task)
                for i, text in zip(idx, processor.batch_decode(ids, skip_special_tokens=True)):
                    known[keys[i]] = text.strip()
                    sink.write(json.dumps({"sha256": keys[i], "text": known[keys[i]], "id": records[i].id}) + "\n")
                sink.flush()
                bar.update(len(idx))
    return [known[k] for k in keys]
