"""`textkeep answer`: one question, typed or spoken, answered by a speech LLM."""

from __future__ import annotations

import sys
from pathlib import Path

from textkeep.errors import TextkeepError


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
        model: a textkeep checkpoint directory, or an LLM (registry name, local directory or hub id) to wrap with a new
            adaptor.
        encoder: the Whisper encoder to use when `model` is an LLM rather than a checkpoint.
        max_new_tokens: the longest answer, in tokens.
    """
    from textkeep.model.audio import load_audio
    from textkeep.model.speech_llm import Sample, load_speech_llm
    from textkeep.runtime import on_device

    if (text is None) == (audio is None):
        raise TextkeepError('give exactly one of --text "question" or --audio FILE.wav')
    speech_llm = on_device(load_speech_llm(model, encoder if audio is not None else None))
    if audio is not None:
        waveform = load_audio(audio)
        if not speech_llm.config.adaptor_trained:
            print(
                "note: this adaptor is untrained (freshly initialised), so the LLM cannot understand the audio yet and "
                "the answer below is noise. Train one with `textkeep train` and pass its checkpoint as --model.",
                file=sys.stderr,
            )
        sample = Sample(speech=speech_llm.encode_audio([waveform])[0], id=str(audio))
    else:
        sample = Sample(text=text)
    reply = speech_llm.generate([sample], max_new_tokens=max_new_tokens)[0]
    print(reply)
    return reply
