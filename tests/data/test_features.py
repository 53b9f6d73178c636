"""The speech feature cache: computed once, read back equal, damaged entries recomputed, keys follow the policy."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch

from textkeep.data.features import FeatureCache
from textkeep.data.records import Record


@pytest.fixture
def records(tmp_path, monkeypatch):
    monkeypatch.setenv("TEXTKEEP_CACHE_DIR", str(tmp_path / "cache"))
    rng = np.random.default_rng(1)
    out = []
    for i, seconds in enumerate([0.5, 1.3, 2.0]):
        path = tmp_path / f"{i}.wav"
        sf.write(path, (rng.standard_normal(int(16000 * seconds)) * 0.1).astype(np.float32), 16000)
        out.append(Record(id=f"r{i}", instruction="x", audio=path))
    return out


def test_cache_computes_once_and_reads_back(tiny_model, records, monkeypatch):
    cache = FeatureCache(tiny_model)
    first = cache.frames(records, progress=False)
    assert [f.shape for f in first] == [(25, 32), (65, 32), (100, 32)]
    from textkeep.model.audio import load_audio

    direct = tiny_model.encode_audio([load_audio(r.audio) for r in records])
    for a, b in zip(first, direct):
        torch.testing.assert_close(a, b, atol=2e-3, rtol=1e-3)  # fp16 storage
    monkeypatch.setattr(tiny_model, "encode_audio", lambda audios: pytest.fail("cache miss on a warm cache"))
    second = FeatureCache(tiny_model).frames(records, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_damaged_entry_is_recomputed(tiny_model, records):
    cache = FeatureCache(tiny_model)
    good = cache.frames(records, progress=False)
    entries = sorted(cache.dir.glob("*/*.safetensors"))
    assert len(entries) == 3
    entries[0].write_bytes(entries[0].read_bytes()[:50])  # truncated
    again = FeatureCache(tiny_model).frames(records, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(good, again))


def test_policy_and_padding_change_the_key(tiny_model):
    base = FeatureCache(tiny_model).dir
    tiny_model.config.encoder_policy = "trim"
    trimmed = FeatureCache(tiny_model).dir
    tiny_model.config.encoder_policy = "pad30"
    tiny_model.config.keep_padding = True
    padded = FeatureCache(tiny_model).dir
    assert len({base, trimmed, padded}) == 3


def test_trim_equals_pad30_on_a_full_window(tiny_model):
    audio = (np.random.default_rng(2).standard_normal(30 * 16000) * 0.1).astype(np.float32)
    padded = tiny_model.encode_audio([audio])[0]
    tiny_model.config.encoder_policy = "trim"
    trimmed = tiny_model.encode_audio([audio])[0]
    torch.testing.assert_close(trimmed, padded, atol=1e-5, rtol=1e-5)
    short = tiny_model.encode_audio([audio[:16000]])[0]
    assert short.shape == (50, 32)
    assert not torch.allclose(short, padded[:50], atol=1e-3)  # attention over padding differs


def test_features_command_fills_the_cache(records, tmp_path, capsys):
    import json

    from textkeep.data.features import features

    data = tmp_path / "qa.jsonl"
    data.write_text(
        "".join(json.dumps({"id": r.id, "instruction": "x", "audio": str(r.audio)}) + "\n" for r in records)
    )
    features(str(data), encoder="tiny-whisper", encoder_policy="trim", batch_size=2)
    printed = capsys.readouterr().out
    assert printed.startswith("3 utterances cached in ") and "trim-" in printed
    assert len(list((tmp_path / "cache" / "features").glob("trim-*/*/*.safetensors"))) == 3


def test_features_command_refuses_a_path_that_is_no_checkpoint(tmp_path):
    from textkeep.data.features import features
    from textkeep.errors import TextkeepError

    with pytest.raises(TextkeepError, match="--checkpoint .* is not a textkeep checkpoint"):
        features("llama-questions", checkpoint=str(tmp_path))
