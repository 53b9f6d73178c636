"""Reading speech: any common audio file → 16 kHz mono float32, or a clear error."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from textkeep.errors import TextkeepError

SAMPLE_RATE = 16_000
MAX_SECONDS = 30.0  # Whisper's window: the encoder never sees more


def to_16k_mono(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    """Downmix (mean of channels) and resample with soxr's high-quality filter."""
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim == 2:
        audio = audio.mean(axis=1)
    if sample_rate != SAMPLE_RATE:
        import soxr

        audio = soxr.resample(audio, sample_rate, SAMPLE_RATE, quality="HQ").astype(np.float32)
    return audio


def load_record_audio(records, idx) -> list[np.ndarray]:
    """The audio of records[i] for each i in idx; a file that cannot be read is named with its record's id."""
    audios = []
    for i in idx:
        try:
            audios.append(load_audio(records[i].audio))
        except TextkeepError as e:
            raise TextkeepError(f"record '{records[i].id}': {e}") from None
    return audios


def load_audio(path: str | Path, max_seconds: float = MAX_SECONDS) -> np.ndarray:
    """Read an audio file (WAV, FLAC, OGG, … through libsndfile) as 16 kHz mono float32 in [-1, 1]."""
    import soundfile as sf

    path = Path(path)
    if not path.is_file():
        raise TextkeepError(
            f"Audio file '{path}' does not exist; "
            "check the path (relative paths resolve against the current directory)."
        )
    try:
        audio, sr = sf.read(str(path), dtype="float32", always_2d=False)
    except Exception as e:  # libsndfile raises its own error types, which differ across soundfile versions
        raise TextkeepError(
            f"Audio file '{path}' cannot be decoded ({e}); it is corrupt or not an audio format libsndfile reads. "
            "Re-export it as 16 kHz mono WAV (e.g. `sox in.xxx -r 16000 -c 1 out.wav`)."
        ) from None
    if audio.size == 0:
        raise TextkeepError(f"Audio file '{path}' holds no samples; replace it with a recording of the spoken query.")
    seconds = (audio.shape[0]) / sr
    if seconds > max_seconds:
        raise TextkeepError(
            f"Audio file '{path}' lasts {seconds:.1f} s; the Whisper encoder takes at most {max_seconds:.0f} s. "
            "Cut it into shorter clips or drop it from the dataset."
        )
    audio = to_16k_mono(audio, sr)
    if not np.isfinite(audio).all():
        raise TextkeepError(f"Audio file '{path}' contains NaN or infinite samples; re-export it.")
    return audio
