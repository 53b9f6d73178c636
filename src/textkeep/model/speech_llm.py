"""SpeechLLM: frozen Whisper encoder → adaptor → causal LM (LLaMA-Omni's encoder–adaptor design).

Data flow, and where each step lives:
    audio ──load_audio──▶ 16 kHz ──Whisper features + frozen encoder (encode_audio)──▶ frames (n, d_enc), 50/s
    frames ──SpeechAdaptor (adaptor.py)──▶ n//k embeddings ──spliced at <speech> (embed)──▶ LLM
    text   ──PromptFormatter (prompt.py)──▶ the same chat template with the transcript where <speech> stood

Encoder frames are the unit the feature cache stores: the encoder is frozen, so they never change.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from textkeep.errors import TextkeepError
from textkeep.model.adaptor import SpeechAdaptor, pool_segments
from textkeep.model.audio import SAMPLE_RATE
from textkeep.model.prompt import DEFAULT_SYSTEM_PROMPT, DEFAULT_USER_TEMPLATE, IGNORE_INDEX, PromptFormatter

CHECKPOINT_FORMAT = 1
CONFIG_FILE = "textkeep_config.json"
ADAPTOR_FILE = "adaptor.safetensors"
ENCODER_FRAMES_PER_SECOND = 50  # Whisper: 100 mel frames/s, halved by the second conv's stride
WHISPER_WINDOW_FRAMES = 1500  # 30 s
ENCODER_POLICIES = ("pad30", "trim")
COMPRESSIONS = (None, "mean", "posterior")
CHAIN_QUESTION, CHAIN_ANSWER = "Question: ", "\nAnswer: "  # the chain-of-modality response layout
CHAIN_TRANSCRIPT_TOKENS = 48  # the transcript's share of a chain response's generation budget
SHARE_HEAD = True  # frozen-LLM passes share the prompt head's KV (`shared_prefix`); benchmarks turn it off to compare


def chain_response(transcript: str, answer: str) -> str:
    """What a chain-of-modality model says to a spoken prompt: the transcript, then the answer."""
    return f"{CHAIN_QUESTION}{transcript}{CHAIN_ANSWER}{answer}"


@dataclass
class SpeechLLMConfig:
    llm: str = "smollm2-135m-instruct"
    encoder: str = "whisper-base"
    adaptor_k: int = 5
    adaptor_hidden: int = 2048
    # False: keep only the encoder frames that cover the real audio. True: all 1500 (300 embeddings), as LLaMA-Omni.
    keep_padding: bool = False
    # pad30: the encoder sees Whisper's 30 s window (LLaMA-Omni). trim: only the real audio's mel, with the
    # positional table sliced to match (Ultravox). See docs/design.md for the measured trade-off.
    encoder_policy: str = "pad30"
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT
    user_template: str = DEFAULT_USER_TEMPLATE
    adaptor_trained: bool = False
    # Normalise each adaptor output to this RMS (set to the LLM's token-embedding RMS by `textkeep align`); None: off.
    adaptor_output_scale: float | None = None
    # Chain of modality (SpeechGPT): a spoken prompt is answered "Question: <transcript>\nAnswer: <answer>", so the
    # LLM answers from its own transcript; generate() returns the answer part. Set by `align`'s `chain` objective.
    speech_chain: bool = False
    # CTC compression: the speech slots get one embedding per segment the adaptor's CTC head hears (about one per
    # token) instead of one per k frames: "mean", the segment's mean adaptor output (Soundwave, Gaido et al. 2021);
    # "posterior", its mean CTC posterior over the non-blank tokens times their embedding rows, a mixture of real
    # token embeddings (LegoSLM). None: off. Needs an adaptor with a CTC vocabulary (`align`'s ctc objective).
    speech_compress: str | None = None
    extra: dict = field(default_factory=dict)  # training provenance (strategy, steps, …), kept with the checkpoint

    def __post_init__(self):
        if self.adaptor_k < 1:
            raise TextkeepError(f"adaptor_k must be ≥ 1, got {self.adaptor_k}")
        if self.adaptor_hidden < 1:
            raise TextkeepError(f"adaptor_hidden must be ≥ 1, got {self.adaptor_hidden}")
        if self.encoder_policy not in ENCODER_POLICIES:
            raise TextkeepError(f"encoder_policy must be one of {ENCODER_POLICIES}, got {self.encoder_policy!r}")
        if self.speech_compress not in COMPRESSIONS:
            raise TextkeepError(f"speech_compress must be one of {COMPRESSIONS}, got {self.speech_compress!r}")
        if self.keep_padding and self.encoder_policy == "trim":
            raise TextkeepError("--keep-padding needs --encoder-policy pad30 (trim never computes the padding frames)")


@dataclass
class Sample:
    """One input: a transcript (text path) or encoder frames (speech path), with the target response if training."""

    text: str | None = None
    speech: torch.Tensor | None = None  # (n_frames, d_encoder)
    response: str | None = None
    id: str = ""

    def __post_init__(self):
        if (self.text is None) == (self.speech is None):
            raise ValueError("a Sample has either text or speech, not both and not neither")


@dataclass
class TokenBatch:
    """A padded batch before embedding: token ids with slots where speech embeddings go."""

    input_ids: torch.Tensor  # (B, T), pad id in padding and speech slots
    speech_mask: torch.Tensor  # (B, T) bool: slots filled by the adaptor
    attention_mask: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T), IGNORE_INDEX except response tokens
    speech: list[torch.Tensor]  # encoder frames of the speech samples, in batch order
    segments: list[torch.Tensor] | None = None  # speech_compress: each adaptor output's CTC segment (-1: dropped)

    def to(self, device) -> "TokenBatch":
        return TokenBatch(
            self.input_ids.to(device),
            self.speech_mask.to(device),
            self.attention_mask.to(device),
            self.labels.to(device),
            [s.to(device) for s in self.speech],
            None if self.segments is None else [g.to(device) for g in self.segments],
        )

    @property
    def n_response_tokens(self) -> int:
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())


def n_speech_embeddings(n_samples: int, k: int, keep_padding: bool) -> int:
    """How many embeddings an utterance of n_samples (16 kHz) becomes: frames covering it, then ÷ k."""
    n_frames = (
        WHISPER_WINDOW_FRAMES
        if keep_padding
        else min(WHISPER_WINDOW_FRAMES, math.ceil(n_samples * ENCODER_FRAMES_PER_SECOND / SAMPLE_RATE))
    )
    return n_frames // k


def shared_prefix(llm, batch: TokenBatch) -> int:
    """How many leading columns of a right-padded batch can run once for all rows (0: none).

    Every training prompt opens with the template's head (system prompt, user header). When no gradient reaches the
    LLM's weights (align's frozen LLM, a teacher pass, perplexity under no_grad), the head's keys and values are the
    same for every row and carry no gradient, so `decode` computes them once at batch 1 and shares them. A column
    qualifies if every row has the same real text token there, and neither it nor the column after it is a label
    (the head's last position predicts the first token after it)."""
    ids = batch.input_ids
    if not SHARE_HEAD or len(ids) < 2 or (torch.is_grad_enabled() and any(p.requires_grad for p in llm.parameters())):
        return 0
    checkpointing = next(
        (a for a in ("is_activation_checkpointing", "is_gradient_checkpointing") if hasattr(type(llm), a)), None
    )
    if llm.training and checkpointing and getattr(llm, checkpointing):
        return 0  # checkpointed layers drop the cache (transformers 5 renamed the flag)
    same = (ids == ids[:1]).all(0) & (batch.attention_mask == 1).all(0) & ~batch.speech_mask.any(0)
    no_label = (batch.labels == IGNORE_INDEX).all(0)
    return max(0, min(int(same.long().cumprod(0).sum()), int(no_label.long().cumprod(0).sum()) - 1))


def decode(llm, batch: TokenBatch, inputs_embeds: torch.Tensor | None = None, **kwargs):
    """The decoder's output over `batch` from column h on (h from `shared_prefix`: the first h positions predict no
    label), and the labels its positions predict: output position j's target is column j of the labels returned, so
    `out[:, :-1]` lines up with them. Written here because transformers shares a prompt's cache only in generation."""
    decoder = llm.get_decoder()
    mask = batch.attention_mask
    positions = SpeechLLM.position_ids(mask)
    h = shared_prefix(llm, batch)
    inputs = {"inputs_embeds": inputs_embeds} if inputs_embeds is not None else {"input_ids": batch.input_ids}
    if not h:
        return decoder(**inputs, attention_mask=mask, position_ids=positions, use_cache=False, **kwargs), batch.labels[
            :, 1:
        ]
    head = {k: v[:1, :h] for k, v in inputs.items()}
    with torch.no_grad():
        cache = decoder(**head, attention_mask=mask[:1, :h], position_ids=positions[:1, :h], use_cache=True)
    cache = cache.past_key_values
    cache.batch_repeat_interleave(len(mask))
    rest = {k: v[:, h:] for k, v in inputs.items()}
    out = decoder(
        **rest, attention_mask=mask, position_ids=positions[:, h:], past_key_values=cache, use_cache=True, **kwargs
    )
    return out, batch.labels[:, h + 1 :]


def _join_caches(cache, mask, other, other_mask):
    """One KV cache (and 2-D attention mask) of the rows of two, the shorter left-padded with masked zero columns.
    Masked columns are never attended to, and position ids come from the mask, so every row computes what it did
    alone. Needs a DynamicCache with per-layer `keys`/`values` (transformers ≥ 4.56)."""
    layers, others = getattr(cache, "layers", None), getattr(other, "layers", None)
    if layers is None or others is None or not all(hasattr(x, "keys") for x in list(layers) + list(others)):
        raise TextkeepError(
            f"refilling a running batch needs transformers' per-layer DynamicCache (≥ 4.56); got "
            f"{type(cache).__name__}. Generate without `slots`, or upgrade transformers."
        )
    length = max(mask.shape[1], other_mask.shape[1])

    def pad(t, n):  # (batch, heads, seq, dim) or (batch, seq): n masked columns on the left
        return torch.cat([t.new_zeros(*t.shape[:-2], n, t.shape[-1]), t], dim=-2) if n else t

    for a, b in zip(layers, others):
        na, nb = length - a.keys.shape[-2], length - b.keys.shape[-2]
        a.keys = torch.cat([pad(a.keys, na), pad(b.keys, nb)])
        a.values = torch.cat([pad(a.values, na), pad(b.values, nb)])
    masks = [torch.cat([m.new_zeros(len(m), length - m.shape[1]), m], dim=1) for m in (mask, other_mask)]
    return cache, torch.cat(masks)


class SpeechLLM(nn.Module):
    def __init__(self, llm, tokenizer, encoder, feature_extractor, adaptor: SpeechAdaptor, config: SpeechLLMConfig):
        super().__init__()
        self.llm = llm
        self.encoder = encoder
        self.adaptor = adaptor
        self.tokenizer = tokenizer
        self.feature_extractor = feature_extractor
        self.config = config
        self.prompt = PromptFormatter(tokenizer, config.system_prompt, config.user_template)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        if encoder is not None:
            encoder.requires_grad_(False)
            encoder.eval()
        if config.speech_compress and not adaptor.has_ctc:
            raise TextkeepError(
                "speech_compress needs an adaptor with a CTC head; align it with the ctc objective first "
                "(textkeep align --config configs/align/ctc.yaml)."
            )

    # ---- construction -------------------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        llm: str = "smollm2-135m-instruct",
        encoder: str | None = "whisper-base",
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        **options,
    ) -> "SpeechLLM":
        """A new speech LLM from a causal LM and a Whisper encoder; the adaptor is freshly initialised (seeded)."""
        config = SpeechLLMConfig(llm=llm, encoder=encoder or "", **options)
        llm_model, tokenizer = load_llm(llm, dtype)
        enc, fe = load_encoder(encoder, dtype) if encoder else (None, None)
        d_enc = enc.config.d_model if enc is not None else 1
        torch.manual_seed(seed)
        adaptor = SpeechAdaptor(
            d_enc, llm_model.config.hidden_size, config.adaptor_k, config.adaptor_hidden, config.adaptor_output_scale
        ).to(dtype)
        return cls(llm_model, tokenizer, enc, fe, adaptor, config)

    @property
    def device(self) -> torch.device:
        return self.adaptor.proj[0].weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.adaptor.proj[0].weight.dtype

    # ---- speech front-end -----------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_audio(self, audios: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """16 kHz mono arrays → encoder frames (n_i, d_enc) on CPU in float32, cropped to the real audio unless
        keep_padding."""
        if self.encoder is None:
            raise TextkeepError(
                "this SpeechLLM has no speech encoder; build it with --encoder whisper-base (or another Whisper)"
            )
        for a in audios:
            if len(a) == 0:
                raise TextkeepError("empty audio given to encode_audio; every utterance needs samples")
            if len(a) > 30 * SAMPLE_RATE:
                raise TextkeepError(
                    f"audio of {len(a) / SAMPLE_RATE:.1f} s given to encode_audio; Whisper takes at most 30 s"
                )
        # The extractor pads to 30 s; its log-mel values for the real frames do not depend on the padding.
        mel = self.feature_extractor(list(audios), sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features
        mel = mel.to(self.device, self.dtype)
        lengths = [n_speech_embeddings(len(a), 1, self.config.keep_padding) for a in audios]
        if self.config.encoder_policy == "pad30":
            hidden = self.encoder(mel).last_hidden_state
            return [h[:n].float().cpu().clone() for h, n in zip(hidden, lengths)]
        return [self._encode_trimmed(m[None, :, : 2 * n])[0].float().cpu() for m, n in zip(mel, lengths)]

    def _encode_trimmed(self, mel: torch.Tensor) -> torch.Tensor:
        """Whisper's encoder on a mel shorter than 30 s. transformers' forward insists on 3000 mel frames,
        so this repeats its few steps with the positional table cut to the input length."""
        enc = self.encoder
        x = nn.functional.gelu(enc.conv1(mel))
        x = nn.functional.gelu(enc.conv2(x)).permute(0, 2, 1)
        x = x + enc.embed_positions.weight[: x.shape[1]]
        for layer in enc.layers:
            x = layer(x, None)
            x = x[0] if isinstance(x, tuple) else x  # transformers 4.x layers return a tuple
        return enc.layer_norm(x)

    # ---- batching ---------------------------------------------------------------------------------------------
    def tokenize(self, samples: Sequence[Sample], padding_side: str = "right", skip: int = 0) -> TokenBatch:
        """Token ids, labels and speech slots for a batch; `right` padding for training, `left` for generation.
        `skip` leaves out the first tokens of every row (a prompt head that `shared_head` found common to all)."""
        k = self.config.adaptor_k
        rows, segments = [], []
        for s in samples:
            enc = self.prompt.encode(s.text if s.speech is None else None, s.response)
            n_slots = s.speech.shape[0] // k if s.speech is not None else 0
            if s.speech is not None and n_slots and self.config.speech_compress:
                segments.append(self.speech_segments(s.speech))
                n_slots = int(segments[-1].max()) + 1
            if s.speech is not None and n_slots == 0:
                raise TextkeepError(
                    f"speech of sample '{s.id}' is shorter than {k} encoder frames ({k * 20} ms); "
                    "it gives the LLM nothing to hear"
                )
            ids = enc.before + [self.tokenizer.pad_token_id] * n_slots + enc.after + enc.response
            is_speech = [False] * len(enc.before) + [True] * n_slots + [False] * (len(enc.after) + len(enc.response))
            labels = [IGNORE_INDEX] * (len(ids) - len(enc.response)) + enc.response
            rows.append((ids[skip:], is_speech[skip:], labels[skip:]))
        T = max(len(r[0]) for r in rows)
        B = len(rows)
        input_ids = torch.full((B, T), self.tokenizer.pad_token_id, dtype=torch.long)
        speech_mask = torch.zeros((B, T), dtype=torch.bool)
        attention_mask = torch.zeros((B, T), dtype=torch.long)
        labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
        for i, (ids, is_speech, lab) in enumerate(rows):
            sl = slice(T - len(ids), T) if padding_side == "left" else slice(0, len(ids))
            input_ids[i, sl] = torch.tensor(ids)
            speech_mask[i, sl] = torch.tensor(is_speech)
            attention_mask[i, sl] = 1
            labels[i, sl] = torch.tensor(lab)
        speech = [s.speech for s in samples if s.speech is not None]
        return TokenBatch(
            input_ids, speech_mask, attention_mask, labels, speech, segments if self.config.speech_compress else None
        )

    @torch.no_grad()
    def speech_segments(self, frames: torch.Tensor) -> torch.Tensor:
        """The CTC segment of each adaptor output of one utterance (speech_compress); an utterance in which the head
        hears nothing becomes one segment, so the LLM still gets an input."""
        out = self.adaptor(frames.to(self.device, self.dtype)[None])[0]
        seg = self.adaptor.ctc_segments(out, self.llm.get_input_embeddings().weight)
        return seg if bool((seg >= 0).any()) else torch.zeros_like(seg)

    def embed(self, batch: TokenBatch) -> torch.Tensor:
        """Token embeddings with the adaptor's outputs written into the speech slots (gradients flow to the adaptor)."""
        embeds = self.llm.get_input_embeddings()(batch.input_ids)
        if not batch.speech:
            return embeds
        k = self.config.adaptor_k
        n_max = max(s.shape[0] for s in batch.speech)
        frames = torch.zeros(len(batch.speech), n_max, batch.speech[0].shape[-1], device=self.device, dtype=self.dtype)
        for i, s in enumerate(batch.speech):
            frames[i, : s.shape[0]] = s.to(self.device, self.dtype)
        # One adaptor call for the whole batch: it maps each group of k frames on its own, so padding
        # frames only produce rows that are dropped here.
        projected = self.adaptor(frames)
        rows = [projected[i, : s.shape[0] // k] for i, s in enumerate(batch.speech)]
        if batch.segments is not None:
            if self.config.speech_compress == "posterior":
                rows = [self.adaptor.ctc_mixture(r, self.llm.get_input_embeddings().weight) for r in rows]
            rows = [pool_segments(r, g) for r, g in zip(rows, batch.segments)]
        speech_embeds = torch.cat(rows)
        return embeds.masked_scatter(batch.speech_mask.unsqueeze(-1), speech_embeds.to(embeds.dtype))

    @staticmethod
    def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
        return (attention_mask.cumsum(-1) - 1).clamp(min=0)

    # ---- forward ----------------------------------------------------------------------------------------------
    def logits(self, batch: TokenBatch) -> torch.Tensor:
        batch = batch.to(self.device)
        return self.llm(
            inputs_embeds=self.embed(batch),
            attention_mask=batch.attention_mask,
            position_ids=self.position_ids(batch.attention_mask),
            use_cache=False,
        ).logits

    def loss_sum(self, batch: TokenBatch, per_row: bool = False):
        """Sum of next-token cross-entropy over response tokens, and their count; with per_row, also each row's
        summed loss (float64, on the CPU), from the same forward.

        The LM head runs only on positions that predict a response token: a 49k-word vocabulary times every
        prompt and speech position is most of the activation memory otherwise.
        """
        batch = batch.to(self.device)
        out, targets = decode(self.llm, batch, self.embed(batch))
        hidden = out.last_hidden_state
        keep = targets != IGNORE_INDEX
        logits = self.llm.get_output_embeddings()(hidden[:, :-1][keep]).float()
        loss = nn.functional.cross_entropy(logits, targets[keep], reduction="sum")
        if not per_row:
            return loss, int(keep.sum())
        # The total stays the reduction above, so asking for rows changes no number; the rows come on top.
        token_loss = nn.functional.cross_entropy(logits.detach(), targets[keep], reduction="none")
        rows = torch.zeros(len(keep), dtype=torch.float64, device=token_loss.device)
        rows.index_add_(0, keep.nonzero()[:, 0], token_loss.double())  # each scored token's row, in mask order
        return loss, int(keep.sum()), rows.cpu()

    # ---- generation -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate_ids(
        self, samples: Sequence[Sample], max_new_tokens: int = 64, min_new_tokens: int = 0, slots: int | None = None
    ) -> list[list[int]]:
        """Greedy continuations, as token ids cut before end-of-turn: left padding, the KV cache.

        A row that has finished leaves the batch (its rows of the KV cache are dropped), so a batch costs the sum of
        its answers' lengths, not its longest answer times its size. With `slots` (the running batch's width) below
        the number of samples, the rest wait, and each freed slot is refilled with the next waiting prompt: its
        prefill joins the running batch's KV cache, the shorter of the two left-padded with masked columns, so the
        decode does not run its tail at a few rows while prompts wait (on this CPU a step at batch 1 costs a third
        of one at batch 32, so evaluation measured no gain and does not refill). Written here because
        transformers' generate() keeps finished rows to the end, and its continuous batching takes token ids, not
        the inputs_embeds a spoken prompt needs. min_new_tokens forbids stopping before that many tokens (as
        generate()'s option).
        """
        samples = [
            Sample(text=s.text, speech=s.speech, id=s.id) for s in samples
        ]  # responses are not part of the prompt
        # Every prompt opens with the template's head (system prompt, user header): its keys and values are computed
        # once and shared by all rows, and padding goes after it. A prompt splits at the same place alone as in a
        # batch of its own modality (evaluation batches hold one), so a question gets the same answer either way.
        head = self.shared_head(samples)
        stop = torch.tensor(self.stop_ids, device=self.device)
        answers: list[list[int]] = [[] for _ in samples]
        head_cache = None
        if head:
            head_cache = self.llm(
                input_ids=torch.tensor([head], device=self.device), use_cache=True, logits_to_keep=1
            ).past_key_values

        def prefill(idx: list[int]):
            """The prompts' last logits, their KV cache and attention mask (head | left padding | prompt)."""
            batch = self.tokenize([samples[i] for i in idx], padding_side="left", skip=len(head)).to(self.device)
            mask, cache = batch.attention_mask, None
            if head:
                cache = copy.deepcopy(head_cache)
                cache.batch_repeat_interleave(len(idx))
                mask = torch.cat([mask.new_ones(len(idx), len(head)), mask], dim=1)
            out = self.llm(
                inputs_embeds=self.embed(batch),
                attention_mask=mask,
                position_ids=self.position_ids(mask)[:, len(head) :],
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            return out.logits[:, -1], out.past_key_values, mask

        slots = len(samples) if slots is None else max(1, slots)
        waiting = list(range(len(samples)))
        rows, waiting = waiting[:slots], waiting[slots:]  # rows: the sample each row of the running batch answers
        logits, cache, mask = prefill(rows)
        n_new = [0] * len(rows)
        while rows:
            early = [i for i, n in enumerate(n_new) if n < min_new_tokens]
            if early:
                logits[early] = logits[early].index_fill(-1, stop, float("-inf"))
            token = logits.argmax(-1)
            finished = torch.isin(token, stop).tolist()
            for j, (row, t) in enumerate(zip(rows, token.tolist())):
                n_new[j] += 1
                if not finished[j]:
                    answers[row].append(t)
                finished[j] = finished[j] or n_new[j] >= max_new_tokens
            if any(finished):
                keep = [j for j, f in enumerate(finished) if not f]
                if keep:
                    cache.batch_select_indices(torch.tensor(keep, device=self.device))
                rows, n_new = [rows[j] for j in keep], [n_new[j] for j in keep]
                mask, token = mask[keep], token[keep]
            if rows:
                mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
                out = self.llm(
                    input_ids=token[:, None],
                    attention_mask=mask,
                    position_ids=mask.sum(-1, keepdim=True) - 1,
                    past_key_values=cache,
                    use_cache=True,
                )
                logits, cache = out.logits[:, -1], out.past_key_values
            if waiting and len(rows) < slots:
                take, waiting = waiting[: slots - len(rows)], waiting[slots - len(rows) :]
                new_logits, new_cache, new_mask = prefill(take)
                if rows:
                    cache, mask = _join_caches(cache, mask, new_cache, new_mask)
                    logits = torch.cat([logits, new_logits])
                else:
                    logits, cache, mask = new_logits, new_cache, new_mask
                rows, n_new = rows + take, n_new + [0] * len(take)
        return answers

    def generate(
        self, samples: Sequence[Sample], max_new_tokens: int = 64, min_new_tokens: int = 0, slots: int | None = None
    ) -> list[str]:
        """Greedy answers as text (`slots`: see generate_ids). Under speech_chain a spoken prompt first gets its
        transcript, with a budget of CHAIN_TRANSCRIPT_TOKENS more tokens; the answer after it is returned, cut to
        max_new_tokens tokens."""
        chain = self.config.speech_chain and any(s.speech is not None for s in samples)
        budget = max_new_tokens + (CHAIN_TRANSCRIPT_TOKENS if chain else 0)
        texts = [
            self.tokenizer.decode(ids, skip_special_tokens=True).strip()
            for ids in self.generate_ids(samples, budget, min_new_tokens, slots)
        ]
        if not chain:
            return texts
        return [self.chain_answer(t, max_new_tokens) if s.speech is not None else t for s, t in zip(samples, texts)]

    def chain_answer(self, text: str, max_new_tokens: int) -> str:
        """The answer part of a chain-of-modality response (all of it if the transcript never closed)."""
        answer = text.split(CHAIN_ANSWER, 1)[1] if CHAIN_ANSWER in text else text
        ids = self.tokenizer(answer.strip(), add_special_tokens=False)["input_ids"][:max_new_tokens]
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def shared_head(self, samples: Sequence[Sample]) -> list[int]:
        """The longest start of the template's head (the prompt before the user's words) that every sample's prompt
        begins with, keeping at least one token of each prompt after it."""
        head = self.prompt.encode(None).before  # a speech prompt's whole head: nothing to compare for those
        n = len(head)
        for s in samples:
            if s.speech is None:
                before = self.prompt.encode(s.text).before
                same = next((i for i, (a, b) in enumerate(zip(before, head)) if a != b), min(len(before), len(head)))
                n = min(n, same, len(before) - 1)
        return head[:n]

    @property
    def stop_ids(self) -> list[int]:
        eos = self.tokenizer.eos_token_id
        return [self.prompt.end_of_turn_id] + ([eos] if eos is not None and eos != self.prompt.end_of_turn_id else [])

    # ---- checkpoints -----------------------------------------------------------------------------------------
    def save(self, out_dir: str | Path, llm_weights: str | None = None) -> Path:
        """Write a checkpoint directory (atomically). llm_weights: 'full', 'lora' (PEFT adapter) or 'base'
        (unchanged LLM, not copied)."""
        from safetensors.torch import save_file

        from textkeep.fileio import atomic_dir, write_json

        if llm_weights is None:
            llm_weights = "lora" if is_peft(self.llm) else "full"
        if llm_weights not in ("full", "lora", "base"):
            raise ValueError(f"llm_weights must be full, lora or base, got {llm_weights!r}")
        with atomic_dir(out_dir) as tmp:
            save_file(
                {k: v.detach().contiguous().cpu() for k, v in self.adaptor.state_dict().items()},
                str(tmp / ADAPTOR_FILE),
            )
            if llm_weights == "full":
                llm = self.llm.merge_and_unload() if is_peft(self.llm) else self.llm
                llm.save_pretrained(tmp / "llm", safe_serialization=True)
                self.tokenizer.save_pretrained(tmp / "llm")
            elif llm_weights == "lora":
                self.llm.save_pretrained(tmp / "llm_adapter")
            write_json(
                tmp / CONFIG_FILE,
                {"format": CHECKPOINT_FORMAT, "llm_weights": llm_weights, "config": asdict(self.config)},
            )
        return Path(out_dir)

    @classmethod
    def load(cls, ckpt_dir: str | Path, dtype: torch.dtype = torch.float32) -> "SpeechLLM":
        from safetensors.torch import load_file

        ckpt_dir = Path(ckpt_dir)
        if not (ckpt_dir / CONFIG_FILE).is_file() and (ckpt_dir / "model" / CONFIG_FILE).is_file():
            ckpt_dir = ckpt_dir / "model"  # a training run: its final model
        meta = _read_checkpoint_config(ckpt_dir)
        config = SpeechLLMConfig(
            **{f.name: meta["config"][f.name] for f in fields(SpeechLLMConfig) if f.name in meta["config"]}
        )
        kind = meta["llm_weights"]
        needed = [ADAPTOR_FILE] + {
            "full": ["llm/config.json"],
            "lora": ["llm_adapter/adapter_config.json"],
            "base": [],
        }[kind]
        for rel in needed:
            if not (ckpt_dir / rel).exists():
                raise TextkeepError(
                    f"checkpoint '{ckpt_dir}' is missing '{rel}'; it was not fully written. "
                    "Re-save or re-train it, or point to another checkpoint."
                )
        if kind == "full":
            llm, tokenizer = load_llm(str(ckpt_dir / "llm"), dtype)
        else:
            llm, tokenizer = load_llm(config.llm, dtype)
            if kind == "lora":
                from peft import PeftModel

                llm = PeftModel.from_pretrained(llm, str(ckpt_dir / "llm_adapter"))
        enc, fe = load_encoder(config.encoder, dtype) if config.encoder else (None, None)
        d_enc = enc.config.d_model if enc is not None else 1
        adaptor = SpeechAdaptor(
            d_enc, llm.config.hidden_size, config.adaptor_k, config.adaptor_hidden, config.adaptor_output_scale
        )
        state = load_file(str(ckpt_dir / ADAPTOR_FILE))
        if "ctc_ids" in state:
            adaptor.set_ctc_vocab(state["ctc_ids"])
            state.setdefault("ctc_log_scale", torch.zeros(()))  # saved before the head learnt its scale
        try:
            adaptor.load_state_dict(state)
        except RuntimeError as e:
            raise TextkeepError(
                f"'{ckpt_dir / ADAPTOR_FILE}' does not fit the adaptor described in {CONFIG_FILE} ({e}); "
                "the checkpoint is inconsistent."
            ) from None
        return cls(llm, tokenizer, enc, fe, adaptor.to(dtype), config)


def is_checkpoint(path: str | Path) -> bool:
    """A checkpoint directory, or a training run directory whose final model is in model/."""
    return (Path(path) / CONFIG_FILE).is_file() or (Path(path) / "model" / CONFIG_FILE).is_file()


def _read_checkpoint_config(ckpt_dir: Path) -> dict:
    if not ckpt_dir.is_dir():
        raise TextkeepError(f"checkpoint directory '{ckpt_dir}' does not exist; check the path.")
    cfg = ckpt_dir / CONFIG_FILE
    if not cfg.is_file():
        raise TextkeepError(
            f"checkpoint '{ckpt_dir}' is missing '{CONFIG_FILE}'; "
            "it is not a textkeep checkpoint or was not fully written."
        )
    try:
        meta = json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise TextkeepError(f"'{cfg}' is not valid JSON ({e}); the checkpoint is damaged.") from None
    if meta.get("format") != CHECKPOINT_FORMAT or meta.get("llm_weights") not in ("full", "lora", "base"):
        raise TextkeepError(
            f"'{cfg}' has format {meta.get('format')!r}/{meta.get('llm_weights')!r}; "
            f"this textkeep reads format {CHECKPOINT_FORMAT}."
        )
    return meta


def is_peft(model) -> bool:
    """Whether an LLM is wrapped by peft (LoRA): textkeep's one test of it."""
    return hasattr(model, "peft_config")


def load_speech_llm(
    spec: str | Path,
    encoder: str | None = "whisper-base",
    *,
    seed: int = 0,
    merge_lora: bool = False,
    dtype: torch.dtype = torch.float32,
    **options,
) -> SpeechLLM:
    """The one way a command gets its model from what the user typed.

    A textkeep checkpoint (or a training run, whose final model is in model/) loads as saved, its own encoder
    included. Anything else is an LLM (registry name, local directory or hub id), wrapped with `encoder` (None:
    text only) and a fresh adaptor seeded by `seed`; `options` go to SpeechLLMConfig (encoder_policy, …).
    merge_lora folds a LoRA adapter into the LLM's weights, for tools that need the bare LLM.
    """
    if is_checkpoint(spec):
        model = SpeechLLM.load(spec, dtype)
    else:
        model = SpeechLLM.build(str(spec), encoder, seed=seed, dtype=dtype, **options)
    if merge_lora and is_peft(model.llm):
        model.llm = model.llm.merge_and_unload()
    return model


class LossModule(nn.Module):
    """forward(batch) = model.loss_sum(batch), (summed response-token loss, token count).

    The one root module that accelerate wraps for training (DDP, autocast) and FSDP shards for importance:
    running the loss through it is what lets FSDP gather the parameters outside the decoder layers (embeddings,
    final norm, head, adaptor) before they are used.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch):
        return self.model.loss_sum(batch)


def load_llm(name_or_path: str, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from textkeep.model.registry import resolve

    path = resolve(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model, tokenizer


def load_encoder(name_or_path: str, dtype: torch.dtype = torch.float32):
    """The Whisper encoder alone (the decoder is dropped) and its feature extractor."""
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration

    from textkeep.model.registry import resolve

    path = resolve(name_or_path)
    whisper = WhisperForConditionalGeneration.from_pretrained(path, dtype=dtype)
    return whisper.get_encoder(), WhisperFeatureExtractor.from_pretrained(path)
