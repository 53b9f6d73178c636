"""Records → model inputs for either modality, and length-grouped batches."""

from __future__ import annotations

from typing import Sequence

from textkeep.data.records import Record
from textkeep.errors import TextkeepError

MODALITIES = ("text", "speech", "transcript")


def make_samples(
    model, records: Sequence[Record], modality: str, *, with_response: bool = True, cache=None, progress: bool = True
):
    """`text`: the transcript goes through the text path. `speech`: the audio goes through encoder and adaptor
    (frames read from, or added to, the feature cache). `transcript`: Whisper's own transcript of the audio goes
    through the text path (the cascade, eval/cascade.py; the ASR model is the speech LLM's encoder)."""
    from textkeep.data.features import FeatureCache
    from textkeep.model.speech_llm import Sample

    if modality not in MODALITIES:
        raise TextkeepError(f"modality must be one of {MODALITIES}, got {modality!r}")
    if with_response and any(not r.response for r in records):
        bad = next(r.id for r in records if not r.response)
        raise TextkeepError(
            f"record '{bad}' has no reference response; "
            "loss and perplexity need one (check the dataset's response field)"
        )
    response = (lambda r: r.response) if with_response else (lambda r: None)
    if modality == "text":
        return [Sample(text=r.instruction, response=response(r), id=r.id) for r in records]
    if modality == "transcript":
        from textkeep.eval.cascade import transcribe

        heard = transcribe(records, model.config.encoder or "whisper-base", progress=progress)
        return [Sample(text=h or "?", response=response(r), id=r.id) for r, h in zip(records, heard)]
    frames = (cache or FeatureCache(model)).frames(records, progress=progress)
    return [Sample(speech=f, response=response(r), id=r.id) for r, f in zip(records, frames)]


def sample_length(sample, k: int = 5) -> int:
    n = len(sample.text) // 3 if sample.text is not None else sample.speech.shape[0] // k  # ~3 characters a token
    return n + (len(sample.response) // 3 if sample.response else 0)


def length_grouped_batches(samples: Sequence, batch_size: int, k: int = 5) -> list[list[int]]:
    """Index batches of similar length (longest first), so padding wastes little compute."""
    order = sorted(range(len(samples)), key=lambda i: -sample_length(samples[i], k))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
