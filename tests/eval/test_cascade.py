"""The cascade reference: Whisper base's transcripts of real LLaMA Questions WAVs, cached by audio hash."""

from __future__ import annotations

import pytest


@pytest.mark.real
def test_cascade_transcribes_real_questions_once_and_feeds_the_text_path(data_dir, tmp_path, monkeypatch):
    import transformers

    from textkeep.data.samples import make_samples
    from textkeep.eval.cascade import _cache_file, transcribe
    from textkeep.eval.qa import load_qa_set
    from textkeep.eval.scoring import word_error_rate
    from textkeep.model.registry import resolve
    from textkeep.settings import cache_dir

    resolve("whisper-base")  # converted into the suite's cache first, if this is the first test to need it
    models = cache_dir() / "models"  # the converted weights the suite already has; transcripts go elsewhere
    monkeypatch.setenv("TEXTKEEP_CACHE_DIR", str(tmp_path))
    (tmp_path / "models").symlink_to(models)
    records = load_qa_set("llama-questions", None, need_audio=True, limit=3)
    heard = transcribe(records, progress=False)
    assert word_error_rate([r.instruction for r in records], heard) < 0.1
    assert len(_cache_file("whisper-base").read_text().splitlines()) == 3

    def no_model(*a, **k):
        raise AssertionError("a cached transcript was decoded again")

    monkeypatch.setattr(transformers.WhisperForConditionalGeneration, "from_pretrained", no_model)
    assert transcribe(records, progress=False) == heard

    class _Model:  # make_samples needs only the encoder's name for the cascade
        class config:
            encoder = "whisper-base"

    samples = make_samples(_Model, records, "transcript", with_response=False, progress=False)
    assert [s.text for s in samples] == heard and all(s.speech is None for s in samples)
