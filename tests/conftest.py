"""Shared fixtures: tiny random-init models built in code (seconds), and the real data when it is there."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Keep the suite's caches away from the user's: converted real weights are cached per CI machine
# (TEXTKEEP_CACHE_DIR from the Makefile), tiny models in a temporary folder.
os.environ.setdefault("TEXTKEEP_CACHE_DIR", str(Path.home() / ".cache" / "textkeep"))
torch.set_num_threads(min(2, os.cpu_count() or 1))

from transformers.utils import logging as hf_logging  # noqa: E402

hf_logging.disable_progress_bar()
hf_logging.set_verbosity_error()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    value = os.environ.get("TEXTKEEP_DATA_DIR")
    if not value or not Path(value).is_dir():
        pytest.skip("TEXTKEEP_DATA_DIR is not set to the shared data folder (the Makefile sets it)")
    return Path(value)


@pytest.fixture(scope="session")
def tiny_parts():
    from textkeep.model.tiny import build_tiny_llama, build_tiny_tokenizer, build_tiny_whisper

    tok = build_tiny_tokenizer()
    llm = build_tiny_llama(tok)
    whisper, fe = build_tiny_whisper()
    return tok, llm, whisper.get_encoder(), fe


@pytest.fixture
def tiny_model(tiny_parts):
    """A fresh tiny SpeechLLM (deep copies, so a test may train or corrupt it)."""
    import copy

    from textkeep.model.adaptor import SpeechAdaptor
    from textkeep.model.speech_llm import SpeechLLM, SpeechLLMConfig

    tok, llm, enc, fe = tiny_parts
    torch.manual_seed(0)
    config = SpeechLLMConfig(llm="tiny-llama", encoder="tiny-whisper", adaptor_hidden=64)
    adaptor = SpeechAdaptor(enc.config.d_model, llm.config.hidden_size, config.adaptor_k, config.adaptor_hidden)
    return SpeechLLM(copy.deepcopy(llm), copy.deepcopy(tok), copy.deepcopy(enc), fe, adaptor, config)


@pytest.fixture(scope="session")
def real_model():
    """SmolLM2-135M-Instruct + Whisper base from the packaged weights (converted once, cached)."""
    from textkeep.model.speech_llm import SpeechLLM

    return SpeechLLM.build("smollm2-135m-instruct", "whisper-base")


QA_PAIRS = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Who wrote Hamlet?", "William Shakespeare wrote Hamlet."),
    ("How many legs does a spider have?", "Eight legs."),
    ("Hi.", "Hello!"),
]


@pytest.fixture
def text_qa():
    """Four typed questions with reference responses, as text-path samples."""
    from textkeep.model.speech_llm import Sample

    return [Sample(text=q, response=a, id=f"s{i}") for i, (q, a) in enumerate(QA_PAIRS)]


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    """A fresh feature/model cache and no precision forced from the environment, for one test."""
    monkeypatch.setenv("TEXTKEEP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
