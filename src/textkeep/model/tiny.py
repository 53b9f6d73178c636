"""Tiny random-init models built in code: a Llama with a ChatML tokenizer, and a Whisper.

They exist so that tests and smoke runs of every workflow take seconds and need no weights.
The registry serves them as `tiny-llama` and `tiny-whisper`; they are deterministic for a seed.
"""

from __future__ import annotations

from pathlib import Path

import torch

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_CORPUS = [
    "You are a helpful language and speech assistant. Please directly answer the questions in the user's speech.",
    "What is the capital of France? The capital of France is Paris.",
    "Who wrote Hamlet? William Shakespeare wrote Hamlet.",
    "How many legs does a spider have? A spider has eight legs.",
    "system user assistant the a of to and in is was for on that with as",
]


def build_tiny_tokenizer(vocab_size: int = 384):
    """A byte-level BPE (every string is encodable) trained on a few sentences, with ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def build_tiny_llama(tokenizer, seed: int = 0, hidden: int = 64, layers: int = 4, heads: int = 4, kv_heads: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config).eval()


def build_tiny_whisper(seed: int = 0, d_model: int = 32, layers: int = 2, heads: int = 2):
    """A Whisper of the real input shape (80 mels, 30 s window, 1500 frames) but tiny width."""
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

    torch.manual_seed(seed)
    config = WhisperConfig(
        vocab_size=64,
        num_mel_bins=80,
        d_model=d_model,
        encoder_layers=layers,
        encoder_attention_heads=heads,
        decoder_layers=1,
        decoder_attention_heads=heads,
        encoder_ffn_dim=d_model * 2,
        decoder_ffn_dim=d_model * 2,
        max_source_positions=1500,
        max_target_positions=64,
        decoder_start_token_id=1,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return WhisperForConditionalGeneration(config).eval(), WhisperFeatureExtractor(feature_size=80)


def save_tiny(name: str, out: Path) -> None:
    """Write a tiny model as a transformers directory (what the registry caches)."""
    if name == "tiny-llama":
        tok = build_tiny_tokenizer()
        build_tiny_llama(tok).save_pretrained(out, safe_serialization=True)
        tok.save_pretrained(out)
    elif name == "tiny-whisper":
        model, fe = build_tiny_whisper()
        model.save_pretrained(out, safe_serialization=True)
        fe.save_pretrained(out)
    else:
        raise KeyError(name)
