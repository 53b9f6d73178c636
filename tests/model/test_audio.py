"""Reading audio: resampling and downmixing against a known tone, and a clear error for each kind of bad file."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from textkeep.errors import TextkeepError
from textkeep.model.audio import load_audio


def _dominant_hz(x: np.ndarray, sr: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / sr)[spectrum.argmax()])


def test_8k_stereo_is_resampled_and_downmixed(tmp_path):
    sr, seconds = 8000, 1.0
    t = np.arange(int(sr * seconds)) / sr
    left = 0.5 * np.sin(2 * np.pi * 440 * t)
    right = 0.3 * np.sin(2 * np.pi * 440 * t)  # same tone, other level: the mean is 0.4 amplitude
    sf.write(tmp_path / "tone.wav", np.stack([left, right], axis=1), sr, subtype="PCM_16")
    audio = load_audio(tmp_path / "tone.wav")
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert abs(len(audio) - 16000) <= 2
    assert abs(_dominant_hz(audio, 16000) - 440) < 2
    middle = audio[2000:-2000]  # away from the resampler's edge transients
    assert abs(np.sqrt(np.mean(middle**2)) - 0.4 / np.sqrt(2)) < 0.01


def test_16k_mono_passes_through_unchanged(tmp_path):
    x = (np.random.default_rng(0).uniform(-0.5, 0.5, 8000) * 32767).astype(np.int16)
    sf.write(tmp_path / "a.wav", x, 16000, subtype="PCM_16")
    np.testing.assert_array_equal(load_audio(tmp_path / "a.wav"), x.astype(np.float32) / 32768)


def test_missing_file(tmp_path):
    with pytest.raises(TextkeepError, match="nope.wav.*does not exist"):
        load_audio(tmp_path / "nope.wav")


def test_corrupt_file(tmp_path):
    (tmp_path / "bad.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunkjunkjunk")
    with pytest.raises(TextkeepError, match="bad.wav.*cannot be decoded.*16 kHz mono"):
        load_audio(tmp_path / "bad.wav")


def test_empty_file(tmp_path):
    sf.write(tmp_path / "empty.wav", np.zeros(0, np.int16), 16000, subtype="PCM_16")
    with pytest.raises(TextkeepError, match="empty.wav.*no samples"):
        load_audio(tmp_path / "empty.wav")


def test_too_long(tmp_path):
    sf.write(tmp_path / "long.wav", np.zeros(40 * 16000, np.int16), 16000, subtype="PCM_16")
    with pytest.raises(TextkeepError, match=r"long.wav.*40\.0 s.*at most 30 s"):
        load_audio(tmp_path / "long.wav")
