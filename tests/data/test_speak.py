"""The resumable speak() runner (voice choice, manifest, bad items) and `textkeep speak` on a dataset file."""

from __future__ import annotations

import json
import shutil

import pytest
import soundfile as sf

from textkeep.data import speak as speak_mod
from textkeep.data.records import Record
from textkeep.data.speak import choose_voice, read_jsonl, speak, speak_command
from textkeep.errors import TextkeepError

needs_flite = pytest.mark.skipif(shutil.which("flite") is None, reason="apt-get install flite")
needs_all = pytest.mark.skipif(
    shutil.which("espeak-ng") is None or shutil.which("flite") is None, reason="apt-get install espeak-ng flite"
)


def test_choose_voice_is_deterministic_per_seed():
    voices = ["piper:joe", "flite:kal", "flite:slt", "flite:awb", "flite:rms"]
    ids = [f"item{i}" for i in range(60)]
    seed0 = [choose_voice(i, voices, seed=0) for i in ids]
    assert seed0 == [choose_voice(i, voices, seed=0) for i in ids]
    assert seed0 == [choose_voice(i, voices[::-1], seed=0) for i in ids]  # list order does not matter
    assert seed0 != [choose_voice(i, voices, seed=1) for i in ids]
    assert set(seed0) == set(voices)


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


@needs_flite
def test_speak_command_speaks_a_dataset_file(tmp_path, capsys):
    data = tmp_path / "alpaca.jsonl"
    rows = [
        {"instruction": "Open the door.", "output": "Done."},
        {"instruction": "Close the window now.", "output": "Done."},
        {"instruction": "Tell me a long story about a dragon and a knight.", "output": "Once…"},
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    manifest = speak_command(str(data), out=tmp_path / "spoken", voices=["flite:slt"], max_query_words=4)
    assert manifest == tmp_path / "spoken" / "manifest.jsonl"
    assert [r["text"] for r in read_jsonl(manifest)] == ["Open the door.", "Close the window now."]
    assert {r["voice"] for r in read_jsonl(manifest)} == {"flite:slt"}
    assert capsys.readouterr().out.startswith(f"{manifest}: 2 utterances, ")


@needs_flite
def test_an_item_longer_than_whispers_window_is_refused_or_listed_as_bad(tmp_path, monkeypatch):
    monkeypatch.setattr(speak_mod, "MAX_SECONDS", 1.0)  # a short sentence lasts more than a second in flite
    records = [Record(id="ok", instruction="Hi."), Record(id="long", instruction="Tell me a story about a dragon.")]
    with pytest.raises(TextkeepError, match="'long'.*Whisper hears at most"):
        speak(records, tmp_path, voices=["flite:slt"])
    speak(records, tmp_path, voices=["flite:slt"], skip_bad=True)
    assert [r["id"] for r in read_jsonl(tmp_path / "manifest.jsonl")] == ["ok"]
    (bad,) = read_jsonl(tmp_path / "bad.jsonl")
    assert bad["id"] == "long" and "Whisper" in bad["reason"]
