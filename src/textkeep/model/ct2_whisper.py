"""Read CTranslate2 Whisper models and convert them to a transformers `WhisperForConditionalGeneration` directory.

CTranslate2 `model.bin` (binary version 6, little endian; a "string" is a uint16 length that counts a trailing
NUL, then the bytes):

    uint32 version, string spec name ("WhisperSpec"), uint32 spec revision, uint32 n_variables,
    n_variables x (string name, uint8 rank, rank x uint32 dims, uint8 dtype, uint32 n_bytes, bytes),
    uint32 n_aliases, n_aliases x (string alias, string target)

Name mapping, CT2 -> transformers (`{i}` a layer index, `{p}` weight|bias, `gamma`/`beta` -> `weight`/`bias`):

    encoder/conv1/{p}                                   model.encoder.conv1.{p}
    encoder/conv2/{p}                                   model.encoder.conv2.{p}
    encoder/position_encodings/encodings                model.encoder.embed_positions.weight
    encoder/layer_{i}/self_attention/linear_0/{p}       model.encoder.layers.{i}.self_attn.{q,k,v}_proj.{p}
                                                          (rows fused as q|k|v; k has no bias, CT2 stores zeros)
    encoder/layer_{i}/self_attention/linear_1/{p}       model.encoder.layers.{i}.self_attn.out_proj.{p}
    encoder/layer_{i}/self_attention/layer_norm/*       model.encoder.layers.{i}.self_attn_layer_norm.*
    encoder/layer_{i}/ffn/linear_0/{p}                  model.encoder.layers.{i}.fc1.{p}
    encoder/layer_{i}/ffn/linear_1/{p}                  model.encoder.layers.{i}.fc2.{p}
    encoder/layer_{i}/ffn/layer_norm/*                  model.encoder.layers.{i}.final_layer_norm.*
    encoder/layer_norm/*                                model.encoder.layer_norm.*
    decoder/embeddings/weight                           model.decoder.embed_tokens.weight
    decoder/projection/weight (alias of the above)      proj_out.weight (tied to embed_tokens)
    decoder/position_encodings/encodings                model.decoder.embed_positions.weight
    decoder/layer_{i}/self_attention/...                model.decoder.layers.{i}.self_attn... (as in the encoder)
    decoder/layer_{i}/attention/linear_0/{p}            model.decoder.layers.{i}.encoder_attn.q_proj.{p}
    decoder/layer_{i}/attention/linear_1/{p}            model.decoder.layers.{i}.encoder_attn.{k,v}_proj.{p}
                                                          (rows fused as k|v; k has no bias)
    decoder/layer_{i}/attention/linear_2/{p}            model.decoder.layers.{i}.encoder_attn.out_proj.{p}
    decoder/layer_{i}/attention/layer_norm/*            model.decoder.layers.{i}.encoder_attn_layer_norm.*
    decoder/layer_{i}/ffn/...                           model.decoder.layers.{i}.fc1/fc2/final_layer_norm (as above)
    decoder/layer_norm/*                                model.decoder.layer_norm.*

Rank-0 variables (`encoder/num_heads`, `decoder/num_heads`, `decoder/activation`, `decoder/pre_norm`, ...) are
settings, not weights. The head counts come from `*/num_heads` when present, else `d_model // 64`: every
released Whisper size (tiny 384/6, base 512/8, small 768/12, medium 1024/16, large 1280/20) has 64-wide heads.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from textkeep.errors import TextkeepError
from textkeep.fileio import atomic_dir

if TYPE_CHECKING:
    import torch
    from transformers import WhisperConfig

BINARY_VERSION = 6
_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16, 5: "bfloat16"}
# Settings whose other values would mean a different architecture than transformers' Whisper.
_WHISPER_FLAGS = {"decoder/activation": 3, "decoder/pre_norm": 1, "decoder/scale_embeddings": 0, "decoder/alibi": 0}


class _PartsReader:
    """Reads several files as one byte stream, so a split model.bin never needs a joined copy."""

    def __init__(self, parts: list[Path]):
        self.parts = [Path(p) for p in parts]
        self.pos = 0
        self._index = -1
        self._file = None
        self._next_file()

    def _next_file(self) -> bool:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._index += 1
        if self._index >= len(self.parts):
            return False
        try:
            self._file = open(self.parts[self._index], "rb")
        except OSError as e:
            raise TextkeepError(f"Cannot read CTranslate2 model file '{self.parts[self._index]}': {e}") from e
        return True

    def describe(self) -> str:
        return " + ".join(f"'{p}'" for p in self.parts)

    def readinto(self, buf: memoryview, what: str) -> None:
        got = 0
        while got < len(buf):
            n = self._file.readinto(buf[got:]) if self._file else 0
            if n:
                got += n
            elif not self._next_file():
                raise TextkeepError(
                    f"CTranslate2 model {self.describe()} is truncated: it ends at byte {self.pos + got} "
                    f"while reading {what}. Reinstall or re-download the model files."
                )
        self.pos += got

    def read(self, n: int, what: str) -> bytes:
        buf = bytearray(n)
        self.readinto(memoryview(buf), what)
        return bytes(buf)

    def unpack(self, fmt: str, what: str):
        return struct.unpack("<" + fmt, self.read(struct.calcsize("<" + fmt), what))

    def string(self, what: str) -> str:
        (n,) = self.unpack("H", what)
        return self.read(n, what).rstrip(b"\0").decode("utf-8")

    def at_end(self) -> bool:
        while self._file is not None:
            if self._file.read(1):
                return False
            self._next_file()
        return True

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_ct2(parts: list[Path]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Tensors by name (in their stored dtype; bfloat16 is widened to float32, which is exact) and aliases.

    `parts` are the byte pieces of one model.bin, in order (a single file is a list of one).
    """
    if not parts:
        raise TextkeepError("read_ct2 needs at least one model file; got an empty list")
    reader = _PartsReader(parts)
    try:
        (version,) = reader.unpack("I", "the binary version")
        if version != BINARY_VERSION:
            raise TextkeepError(
                f"{reader.describe()} is not a CTranslate2 model of binary version {BINARY_VERSION} "
                f"(first 4 bytes read as version {version}): a wrong file, wrong part order, or an unsupported "
                "CTranslate2 version. Re-convert the model with CTranslate2 >= 3."
            )
        reader.string("the spec name")
        reader.unpack("I", "the spec revision")
        (n_vars,) = reader.unpack("I", "the variable count")
        tensors: dict[str, np.ndarray] = {}
        for _ in range(n_vars):
            name = reader.string("a variable name")
            (rank,) = reader.unpack("B", f"the rank of '{name}'")
            dims = reader.unpack("I" * rank, f"the shape of '{name}'")
            (dtype_id,) = reader.unpack("B", f"the dtype of '{name}'")
            (n_bytes,) = reader.unpack("I", f"the size of '{name}'")
            if dtype_id not in _DTYPES:
                raise TextkeepError(f"{reader.describe()}: variable '{name}' has unknown dtype id {dtype_id}")
            dtype = np.dtype(np.uint16 if dtype_id == 5 else _DTYPES[dtype_id])
            if n_bytes != int(np.prod(dims, dtype=np.int64)) * dtype.itemsize:
                raise TextkeepError(
                    f"{reader.describe()}: variable '{name}' of shape {dims} declares {n_bytes} bytes, "
                    "which does not match its shape and dtype; the file is corrupt"
                )
            array = np.empty(dims, dtype=dtype)
            reader.readinto(memoryview(array.reshape(-1).view(np.uint8)), f"the data of '{name}'")
            if dtype_id == 5:
                array = (array.astype(np.uint32) << 16).view(np.float32)
            tensors[name] = array
        (n_aliases,) = reader.unpack("I", "the alias count")
        aliases = {}
        for _ in range(n_aliases):
            alias = reader.string("an alias name")
            aliases[alias] = reader.string(f"the target of alias '{alias}'")
        if not reader.at_end():
            raise TextkeepError(
                f"{reader.describe()} has bytes after the end of the model (at byte {reader.pos}): "
                "the parts are wrong or in the wrong order"
            )
        return tensors, aliases
    finally:
        reader.close()


def ct2_to_hf_state_dict(
    tensors: dict[str, np.ndarray], aliases: dict[str, str]
) -> tuple[WhisperConfig, dict[str, torch.Tensor]]:
    """(WhisperConfig, fp32 state dict of `WhisperForConditionalGeneration`) from CT2 Whisper variables.

    Token ids and suppress lists are left at WhisperConfig's defaults; `convert_ct2_whisper` fills them from the
    tokenizer and the CT2 config.json.
    """
    import torch
    from transformers import WhisperConfig

    named = dict(tensors)
    for alias, target in aliases.items():
        if target in named:
            named.setdefault(alias, named[target])
    for required in ("encoder/conv1/weight", "decoder/embeddings/weight"):
        if required not in named:
            raise TextkeepError(f"Not a CTranslate2 Whisper model: variable '{required}' is missing")
    for flag, expected in _WHISPER_FLAGS.items():
        if flag in named and named[flag].item() != expected:
            raise TextkeepError(
                f"CTranslate2 Whisper variant not supported: '{flag}' is {named[flag].item()}, Whisper uses {expected}"
            )
    used: set[str] = set()

    def take(name: str) -> torch.Tensor:
        if name not in named:
            raise TextkeepError(f"CTranslate2 Whisper model lacks variable '{name}'")
        used.add(name)
        if named[name].dtype == np.int8 or name + "_scale" in named:
            raise TextkeepError(
                f"'{name}' is int8-quantized, which is not supported; convert the model with quantization 'float16'"
            )
        # numpy widens float16 about 3x faster than torch on CPU.
        return torch.from_numpy(named[name].astype(np.float32, copy=False))

    def layer_count(stack: str) -> int:
        return len({m.group(1) for n in named if (m := re.match(rf"{stack}/layer_(\d+)/", n))})

    conv1 = named["encoder/conv1/weight"]
    d_model, n_mels = int(conv1.shape[0]), int(conv1.shape[1])
    heads = {
        stack: int(named[f"{stack}/num_heads"].item()) if f"{stack}/num_heads" in named else d_model // 64
        for stack in ("encoder", "decoder")
    }
    config = WhisperConfig(
        vocab_size=int(named["decoder/embeddings/weight"].shape[0]),
        num_mel_bins=n_mels,
        d_model=d_model,
        encoder_layers=layer_count("encoder"),
        decoder_layers=layer_count("decoder"),
        encoder_attention_heads=heads["encoder"],
        decoder_attention_heads=heads["decoder"],
        encoder_ffn_dim=int(named["encoder/layer_0/ffn/linear_0/weight"].shape[0]),
        decoder_ffn_dim=int(named["decoder/layer_0/ffn/linear_0/weight"].shape[0]),
        max_source_positions=int(named["encoder/position_encodings/encodings"].shape[0]),
        max_target_positions=int(named["decoder/position_encodings/encodings"].shape[0]),
    )
    config.architectures = ["WhisperForConditionalGeneration"]

    sd: dict[str, torch.Tensor] = {}

    def norm(src: str, dst: str) -> None:
        sd[f"{dst}.weight"] = take(f"{src}/gamma")
        sd[f"{dst}.bias"] = take(f"{src}/beta")

    def linear(src: str, dst: str) -> None:
        sd[f"{dst}.weight"] = take(f"{src}/weight")
        sd[f"{dst}.bias"] = take(f"{src}/bias")

    def fused(src: str, dst: str, projections: str) -> None:
        # Slices are cloned so that no two saved tensors share storage (safetensors refuses that).
        weights, biases = take(f"{src}/weight").chunk(len(projections)), take(f"{src}/bias").chunk(len(projections))
        for p, w, b in zip(projections, weights, biases):
            sd[f"{dst}.{p}_proj.weight"] = w.clone()
            if p != "k":
                sd[f"{dst}.{p}_proj.bias"] = b.clone()

    def ffn(src: str, dst: str) -> None:
        linear(f"{src}/ffn/linear_0", f"{dst}.fc1")
        linear(f"{src}/ffn/linear_1", f"{dst}.fc2")
        norm(f"{src}/ffn/layer_norm", f"{dst}.final_layer_norm")

    def self_attention(src: str, dst: str) -> None:
        fused(f"{src}/self_attention/linear_0", f"{dst}.self_attn", "qkv")
        linear(f"{src}/self_attention/linear_1", f"{dst}.self_attn.out_proj")
        norm(f"{src}/self_attention/layer_norm", f"{dst}.self_attn_layer_norm")

    for conv in ("conv1", "conv2"):
        linear(f"encoder/{conv}", f"model.encoder.{conv}")
    for stack in ("encoder", "decoder"):
        sd[f"model.{stack}.embed_positions.weight"] = take(f"{stack}/position_encodings/encodings")
        norm(f"{stack}/layer_norm", f"model.{stack}.layer_norm")
    for i in range(config.encoder_layers):
        src, dst = f"encoder/layer_{i}", f"model.encoder.layers.{i}"
        self_attention(src, dst)
        ffn(src, dst)
    for i in range(config.decoder_layers):
        src, dst = f"decoder/layer_{i}", f"model.decoder.layers.{i}"
        self_attention(src, dst)
        linear(f"{src}/attention/linear_0", f"{dst}.encoder_attn.q_proj")
        fused(f"{src}/attention/linear_1", f"{dst}.encoder_attn", "kv")
        linear(f"{src}/attention/linear_2", f"{dst}.encoder_attn.out_proj")
        norm(f"{src}/attention/layer_norm", f"{dst}.encoder_attn_layer_norm")
        ffn(src, dst)
    sd["model.decoder.embed_tokens.weight"] = take("decoder/embeddings/weight")
    if "decoder/projection/weight" in named:
        if not np.array_equal(named["decoder/projection/weight"], named["decoder/embeddings/weight"]):
            raise TextkeepError(
                "This CT2 Whisper has an output projection that differs from its embeddings; transformers ties them"
            )
        used.add("decoder/projection/weight")
    sd["proj_out.weight"] = sd["model.decoder.embed_tokens.weight"]

    left = sorted(n for n, a in named.items() if n not in used and a.ndim > 0)
    if left:
        raise TextkeepError(f"CTranslate2 Whisper variables with no transformers counterpart: {left[:8]}")
    return config, sd


def convert_ct2_whisper(
    src_dir_files: list[Path], ct2_config: Path, tokenizer_json: Path, out_dir: Path, *, english_only: bool
) -> Path:
    """Write a transformers Whisper directory (fp32 safetensors, configs, tokenizer, feature extractor) to out_dir.

    `src_dir_files` are the byte parts of model.bin in order; `ct2_config` and `tokenizer_json` are the
    config.json and tokenizer.json that CTranslate2's converter writes next to it.
    """
    from safetensors.torch import save_file
    from tokenizers import AddedToken
    from transformers import GenerationConfig, WhisperFeatureExtractor, WhisperTokenizerFast

    ct2_cfg = json.loads(Path(ct2_config).read_text(encoding="utf-8"))
    tok_json = json.loads(Path(tokenizer_json).read_text(encoding="utf-8"))
    config, sd = ct2_to_hf_state_dict(*read_ct2(src_dir_files))
    ids = {t["content"]: t["id"] for t in tok_json["added_tokens"]}
    names = {v: k for k, v in ids.items()}
    # English-only Whisper vocabularies have 51864 ids, the multilingual ones 51865 (51866 for large-v3).
    if english_only != (config.vocab_size < 51865):
        kind = "English-only" if config.vocab_size < 51865 else "multilingual"
        raise TextkeepError(
            f"'{src_dir_files[0]}' is a {kind} Whisper (vocabulary {config.vocab_size}) but english_only={english_only}"
        )
    try:
        eot, sot, no_ts = ids["<|endoftext|>"], ids["<|startoftranscript|>"], ids["<|notimestamps|>"]
        prev_sot, transcribe, translate = ids["<|startofprev|>"], ids["<|transcribe|>"], ids["<|translate|>"]
    except KeyError as e:
        raise TextkeepError(f"'{tokenizer_json}' lacks the Whisper special token {e}: not a Whisper tokenizer") from e

    token_ids = dict(bos_token_id=eot, eos_token_id=eot, pad_token_id=eot, decoder_start_token_id=sot)
    suppress = dict(suppress_tokens=ct2_cfg["suppress_ids"], begin_suppress_tokens=ct2_cfg["suppress_ids_begin"])
    config.update({**token_ids, **suppress})
    gen: dict = dict(
        **token_ids,
        **suppress,
        alignment_heads=ct2_cfg.get("alignment_heads"),
        is_multilingual=not english_only,
        max_initial_timestamp_index=50,
        max_length=config.max_target_positions,
        no_timestamps_token_id=no_ts,
        prev_sot_token_id=prev_sot,
        return_timestamps=False,
    )
    # forced_decoder_ids as in transformers' own Whisper checkpoints: generate() reads it when neither language
    # nor task is given (position 1 None = detect the language).
    if english_only:
        gen["forced_decoder_ids"] = [[1, no_ts]]
    else:
        gen["forced_decoder_ids"] = [[1, None], [2, transcribe]]
        gen["lang_to_id"] = {names[i]: i for i in ct2_cfg["lang_ids"]}
        gen["task_to_id"] = {"transcribe": transcribe, "translate": translate}

    specials = [t["content"] for t in tok_json["added_tokens"] if t["special"] and t["content"] != "<|endoftext|>"]
    tokenizer = WhisperTokenizerFast(
        tokenizer_file=str(tokenizer_json), pad_token="<|endoftext|>", additional_special_tokens=specials
    )
    # tokenizer.json stops at <|notimestamps|>; the model's remaining ids are the 0.02 s timestamp tokens.
    n_timestamps = config.vocab_size - len(tokenizer)
    tokenizer.add_tokens(
        [AddedToken(f"<|{i * 0.02:.2f}|>", special=False, normalized=False) for i in range(n_timestamps)]
    )
    if len(tokenizer) != config.vocab_size:
        raise TextkeepError(f"'{tokenizer_json}' has {len(tokenizer)} tokens, the model {config.vocab_size}")

    with atomic_dir(out_dir) as tmp:
        config.save_pretrained(tmp)
        GenerationConfig(**gen).save_pretrained(tmp)
        # proj_out.weight is tied to embed_tokens; transformers re-ties it on load.
        save_file(
            {k: v.contiguous() for k, v in sd.items() if k != "proj_out.weight"},
            tmp / "model.safetensors",
            metadata={"format": "pt"},
        )
        tokenizer.save_pretrained(tmp)
        WhisperFeatureExtractor(feature_size=config.num_mel_bins).save_pretrained(tmp)
    return Path(out_dir)
