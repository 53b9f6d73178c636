"""SpeechLLM on tiny random-init models: adaptor arithmetic, the <speech> splice, labels, batching, checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from textkeep.errors import TextkeepError
from textkeep.model.adaptor import SpeechAdaptor
from textkeep.model.prompt import IGNORE_INDEX, SPEECH_PLACEHOLDER
from textkeep.model.speech_llm import Sample, SpeechLLM, n_speech_embeddings


def _frames(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("n,k,expected", [(50, 5, 10), (52, 5, 10), (4, 5, 0), (1500, 5, 300), (7, 3, 2), (9, 1, 9)])
def test_adaptor_output_length(n, k, expected):
    adaptor = SpeechAdaptor(8, 6, k=k, hidden=16)
    assert adaptor(torch.randn(n, 8)).shape == (expected, 6)
    assert adaptor(torch.randn(2, n, 8)).shape == (2, expected, 6)
    assert SpeechAdaptor.output_length(n, k) == expected


def test_adaptor_stacks_consecutive_frames():
    adaptor = SpeechAdaptor(2, 3, k=2, hidden=4)
    frames = torch.arange(10.0).reshape(5, 2)  # the 5th frame is the dropped remainder
    first_layer_input = []
    adaptor.proj[0].register_forward_hook(lambda m, i, o: first_layer_input.append(i[0]))
    adaptor(frames)
    assert torch.equal(first_layer_input[0], torch.tensor([[0.0, 1, 2, 3], [4, 5, 6, 7]]))


@pytest.mark.parametrize(
    "seconds,keep_padding,expected",
    [
        (1.0, False, 10),
        (3.0, False, 30),
        (2.99, False, 30),
        (2.97, False, 29),
        (0.1, False, 1),
        (3.0, True, 300),
        (30.0, False, 300),
    ],
)
def test_speech_embedding_count(seconds, keep_padding, expected):
    assert n_speech_embeddings(int(seconds * 16000), 5, keep_padding) == expected


def test_encode_audio_crops_to_real_length(tiny_model):
    audio = [np.zeros(16000, np.float32), np.zeros(48000, np.float32)]
    frames = tiny_model.encode_audio(audio)
    assert [f.shape[0] for f in frames] == [50, 150]
    tiny_model.config.keep_padding = True
    assert [f.shape[0] for f in tiny_model.encode_audio(audio)] == [1500, 1500]


def test_splice_puts_adaptor_outputs_where_the_placeholder_stood(tiny_model):
    m = tiny_model
    frames = _frames(23, m.encoder.config.d_model, 0)  # 23 frames → 4 embeddings
    batch = m.tokenize([Sample(speech=frames)])
    rendered = m.tokenizer.apply_chat_template(
        [{"role": "system", "content": m.config.system_prompt}, {"role": "user", "content": m.config.user_template}],
        tokenize=False,
        add_generation_prompt=True,
    )
    before, after = rendered.split(SPEECH_PLACEHOLDER)
    ids_before = m.tokenizer(before, add_special_tokens=False)["input_ids"]
    ids_after = m.tokenizer(after, add_special_tokens=False)["input_ids"]
    row, mask = batch.input_ids[0].tolist(), batch.speech_mask[0].tolist()
    n = len(ids_before)
    assert row[:n] == ids_before and row[n + 4 :] == ids_after
    assert mask == [False] * n + [True] * 4 + [False] * len(ids_after)

    embeds = m.embed(batch)[0]
    assert torch.allclose(embeds[n : n + 4], m.adaptor(frames), atol=1e-6)
    token_embeds = m.llm.get_input_embeddings()(batch.input_ids[0])
    assert torch.equal(embeds[:n], token_embeds[:n]) and torch.equal(embeds[n + 4 :], token_embeds[n + 4 :])


def test_text_path_uses_the_same_template_with_the_transcript(tiny_model):
    m = tiny_model
    batch = m.tokenize([Sample(text="Who wrote Hamlet?")])
    expected = m.tokenizer.apply_chat_template(
        [
            {"role": "system", "content": m.config.system_prompt},
            {"role": "user", "content": m.config.user_template.replace(SPEECH_PLACEHOLDER, "Who wrote Hamlet?")},
        ],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert m.tokenizer.decode(batch.input_ids[0]) == expected
    assert not batch.speech_mask.any()


def test_labels_cover_only_the_response_and_its_end_of_turn(tiny_model):
    m = tiny_model
    for sample in [
        Sample(text="What is the capital of France?", response="Paris."),
        Sample(speech=_frames(30, 32, 1), response="A spider has eight legs."),
    ]:
        batch = m.tokenize([sample])
        labels, ids = batch.labels[0].tolist(), batch.input_ids[0].tolist()
        response_ids = m.tokenizer(sample.response, add_special_tokens=False)["input_ids"]
        eot = m.tokenizer.convert_tokens_to_ids("<|im_end|>")
        n_resp = len(response_ids) + 1
        assert labels[-n_resp:] == response_ids + [eot]
        assert ids[-n_resp:] == response_ids + [eot]
        assert all(label == IGNORE_INDEX for label in labels[:-n_resp])


def test_padding_is_ignored_in_labels(tiny_model):
    batch = tiny_model.tokenize(
        [Sample(text="Hi", response="Hello"), Sample(text="A much longer question about spiders?", response="Eight.")]
    )
    pad_positions = batch.attention_mask == 0
    assert pad_positions.any()
    assert (batch.labels[pad_positions] == IGNORE_INDEX).all()


def _mixed_samples(d_enc: int) -> list[Sample]:
    return [
        Sample(text="What is the capital of France?", response="Paris."),
        Sample(speech=_frames(47, d_enc, 2), response="Eight legs."),
        Sample(text="Hi", response="Hello there, how can I help you today?"),
        Sample(speech=_frames(151, d_enc, 3), response="William Shakespeare."),
    ]


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_batched_logits_equal_one_by_one(tiny_model, padding_side):
    m = tiny_model
    samples = _mixed_samples(m.encoder.config.d_model)
    batch = m.tokenize(samples, padding_side=padding_side)
    with torch.no_grad():
        logits = m.logits(batch)
        for i, s in enumerate(samples):
            single = m.logits(m.tokenize([s]))[0]
            real = batch.attention_mask[i].bool()
            torch.testing.assert_close(logits[i][real], single, atol=1e-4, rtol=0)


def test_loss_sum_equals_full_logits_cross_entropy(tiny_model):
    m = tiny_model
    batch = m.tokenize(_mixed_samples(m.encoder.config.d_model))
    with torch.no_grad():
        loss, n = m.loss_sum(batch)
        logits = m.logits(batch)
    expected = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), batch.labels[:, 1:].reshape(-1), reduction="sum"
    )
    assert n == int((batch.labels != IGNORE_INDEX).sum())
    torch.testing.assert_close(loss, expected, atol=1e-3, rtol=1e-5)


def test_frozen_llm_passes_share_the_prompt_head_with_the_same_loss_and_adaptor_gradient(tiny_model):
    from textkeep.model.speech_llm import shared_prefix

    m = tiny_model
    d = m.encoder.config.d_model
    batch = m.tokenize([Sample(speech=_frames(n, d, n), response=r) for n, r in [(47, "Paris."), (151, "Eight legs.")]])

    def loss_and_grads():
        m.adaptor.zero_grad()
        loss, n = m.loss_sum(batch)
        loss.backward()
        return loss.detach(), n, [p.grad.clone() for p in m.adaptor.parameters()]

    assert shared_prefix(m.llm, batch) == 0  # the LLM trains: its head needs its own gradients
    alone = loss_and_grads()
    m.llm.requires_grad_(False)
    assert shared_prefix(m.llm, batch) == len(m.prompt.encode(None).before)  # system prompt and user header
    shared = loss_and_grads()
    torch.testing.assert_close(shared[0], alone[0], atol=1e-5, rtol=1e-5)
    assert shared[1] == alone[1]
    for a, b in zip(shared[2], alone[2]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def _talkative(m: SpeechLLM) -> SpeechLLM:
    """At init scale the tiny LLM says one token whatever it hears; larger weights make its answers depend on the
    input."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.llm.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.5, generator=g)
    return m


def test_batched_greedy_generation_equals_one_by_one(tiny_model):
    m = _talkative(tiny_model)
    samples = [Sample(text=s.text, speech=s.speech) for s in _mixed_samples(m.encoder.config.d_model)]
    batched = m.generate_ids(samples, max_new_tokens=6, min_new_tokens=6)
    single = [m.generate_ids([s], max_new_tokens=6, min_new_tokens=6)[0] for s in samples]
    assert batched == single
    assert all(len(ids) == 6 for ids in batched)
    assert len({tuple(ids) for ids in batched}) == len(samples)  # the answers differ, so the comparison means something


def test_rows_that_finish_early_leave_the_batch_and_answers_match_transformers_generate(tiny_model, monkeypatch):
    m = _talkative(tiny_model)
    samples = [Sample(text=s.text, speech=s.speech) for s in _mixed_samples(m.encoder.config.d_model)]
    free = m.generate_ids(samples, max_new_tokens=8, min_new_tokens=8)
    # A stop token that some rows emit mid-answer and others never: rows end at different steps.
    stop = next(t for row in free for t in row[1:] if t not in row[:1] and any(t not in other for other in free))
    monkeypatch.setattr(SpeechLLM, "stop_ids", property(lambda self: [stop]))
    ours = m.generate_ids(samples, max_new_tokens=8)
    assert min(len(a) for a in ours) < 8 and max(len(a) for a in ours) == 8  # the batch really shrank mid-way
    batch = m.tokenize(samples, padding_side="left")
    with torch.no_grad():
        reference = m.llm.generate(
            inputs_embeds=m.embed(batch),
            attention_mask=batch.attention_mask,
            max_new_tokens=8,
            do_sample=False,
            eos_token_id=[stop],
            pad_token_id=m.tokenizer.pad_token_id,
        ).tolist()
    assert ours == [row[: row.index(stop)] if stop in row else row for row in reference]
    assert ours == [m.generate_ids([s], max_new_tokens=8)[0] for s in samples]


@pytest.mark.parametrize("slots", [1, 2, 3])
def test_refilled_slots_give_the_answers_of_one_by_one(tiny_model, monkeypatch, slots):
    """With fewer slots than prompts, waiting prompts join the running batch as rows finish (their KV cache
    left-padded to the running one's length, or the running one's to theirs): every answer is still the one the
    prompt gets alone, and prompts really joined a batch mid-run."""
    m = _talkative(tiny_model)
    d = m.encoder.config.d_model
    samples = [Sample(text=s.text, speech=s.speech) for s in _mixed_samples(d)]
    samples += [Sample(speech=_frames(90, d, 7)), Sample(text="Who wrote Hamlet and when did he write it?")]
    free = m.generate_ids(samples, max_new_tokens=8, min_new_tokens=8)
    stop = next(t for row in free for t in row[1:] if t not in row[:1] and any(t not in other for other in free))
    monkeypatch.setattr(SpeechLLM, "stop_ids", property(lambda self: [stop]))
    prefills = []  # the rows of each prompt pass (inputs_embeds): the first batch, then each refill
    forward = m.llm.forward

    def counting(*args, **kwargs):
        if kwargs.get("inputs_embeds") is not None:
            prefills.append(len(kwargs["inputs_embeds"]))
        return forward(*args, **kwargs)

    monkeypatch.setattr(m.llm, "forward", counting)
    ours = m.generate_ids(samples, max_new_tokens=8, slots=slots)
    monkeypatch.setattr(m.llm, "forward", forward)
    assert ours == [m.generate_ids([s], max_new_tokens=8)[0] for s in samples]
    assert prefills[0] == slots and sum(prefills) == len(samples) and len(prefills) > 1
    assert len({len(a) for a in ours}) > 1  # rows ended at different steps
    assert m.generate_ids(samples, max_new_tokens=8, min_new_tokens=3, slots=slots) == [
        m.generate_ids([s], max_new_tokens=8, min_new_tokens=3)[0] for s in samples
    ]


def test_gradient_reaches_adaptor_not_encoder(tiny_model):
    m = tiny_model
    loss, _ = m.loss_sum(m.tokenize([Sample(speech=_frames(40, 32, 4), response="Paris.")]))
    loss.backward()
    assert m.adaptor.proj[0].weight.grad is not None and m.adaptor.proj[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in m.encoder.parameters())


def test_too_short_speech_is_refused(tiny_model):
    with pytest.raises(TextkeepError, match="shorter than 5 encoder frames"):
        tiny_model.tokenize([Sample(speech=_frames(4, 32, 0), id="clip-7")])


def test_checkpoint_round_trip_full(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("TEXTKEEP_CACHE_DIR", str(tmp_path / "cache"))
    m = tiny_model
    with torch.no_grad():
        m.llm.model.layers[0].mlp.up_proj.weight.add_(0.5)  # a "fine-tuned" LLM must come back as saved
    m.save(tmp_path / "ckpt")
    loaded = SpeechLLM.load(tmp_path / "ckpt")
    batch = m.tokenize(_mixed_samples(32))
    with torch.no_grad():
        torch.testing.assert_close(loaded.logits(batch), m.logits(batch), atol=1e-6, rtol=0)
    assert not list(tmp_path.glob("**/*.bin")) and not list(tmp_path.glob("**/*.pt"))  # safetensors only, no pickle


def test_checkpoint_round_trip_lora(tiny_model, tmp_path, monkeypatch):
    from peft import LoraConfig, get_peft_model

    monkeypatch.setenv("TEXTKEEP_CACHE_DIR", str(tmp_path / "cache"))
    m = tiny_model
    m.llm = get_peft_model(
        m.llm, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    m.save(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "llm_adapter" / "adapter_model.safetensors").is_file()
    loaded = SpeechLLM.load(tmp_path / "ckpt")
    batch = m.tokenize(_mixed_samples(32))
    with torch.no_grad():
        torch.testing.assert_close(loaded.logits(batch), m.logits(batch), atol=1e-5, rtol=0)


@pytest.mark.parametrize("missing", ["adaptor.safetensors", "textkeep_config.json", "llm/config.json"])
def test_checkpoint_missing_file_is_named(tiny_model, tmp_path, missing):
    tiny_model.save(tmp_path / "ckpt")
    (tmp_path / "ckpt" / missing).unlink()
    with pytest.raises(TextkeepError, match=missing.replace(".", r"\.")):
        SpeechLLM.load(tmp_path / "ckpt")


def _compressing(m: SpeechLLM, mode: str = "mean") -> SpeechLLM:
    """The tiny model with a three-token CTC head (blank = pad) and CTC compression on."""
    m.adaptor.set_ctc_vocab(torch.tensor([m.tokenizer.pad_token_id, 5, 6]))
    m.config.speech_compress = mode
    return m


def test_ctc_compression_feeds_one_embedding_per_heard_segment(tiny_model):
    from textkeep.model.adaptor import pool_segments

    m = _compressing(tiny_model)
    d = m.encoder.config.d_model
    frames = _frames(151, d, 3)
    with torch.no_grad():
        out = m.adaptor(frames[None])[0]
        table = m.llm.get_input_embeddings().weight
        best = (out @ table[m.adaptor.ctc_ids].T).argmax(-1).tolist()
    # By hand: a new segment wherever a non-blank best token differs from the frame before it.
    seg, n = [], -1
    for i, b in enumerate(best):
        n += b != 0 and (i == 0 or b != best[i - 1])
        seg.append(n if b != 0 else -1)
    assert -1 in seg and 0 < n + 1 < len(best)  # some frames dropped, some merged: the test can tell
    batch = m.tokenize([Sample(speech=frames, response="Eight legs.")])
    assert int(batch.speech_mask.sum()) == n + 1
    with torch.no_grad():
        spliced = m.embed(batch)[batch.speech_mask]
    torch.testing.assert_close(spliced, pool_segments(out, torch.tensor(seg)))
    # Batched (mixed with text and another utterance) equals one by one, and a saved checkpoint compresses the same.
    samples = _mixed_samples(d)
    batch = m.tokenize(samples)
    with torch.no_grad():
        logits = m.logits(batch)
        for i, s in enumerate(samples):
            torch.testing.assert_close(logits[i][batch.attention_mask[i].bool()], m.logits(m.tokenize([s]))[0])


def test_compressing_checkpoint_round_trip_and_refusal_without_ctc_head(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("TEXTKEEP_CACHE_DIR", str(tmp_path / "cache"))
    m = _compressing(tiny_model)
    m.save(tmp_path / "ckpt", llm_weights="full")
    loaded = SpeechLLM.load(tmp_path / "ckpt")
    assert loaded.config.speech_compress and loaded.adaptor.ctc_ids.tolist() == m.adaptor.ctc_ids.tolist()
    batch = m.tokenize(_mixed_samples(32))
    with torch.no_grad():
        torch.testing.assert_close(loaded.logits(batch), m.logits(batch), atol=1e-6, rtol=0)
    plain = SpeechAdaptor(32, m.llm.config.hidden_size, 5, 64)
    with pytest.raises(TextkeepError, match="CTC head"):
        SpeechLLM(m.llm, m.tokenizer, m.encoder, m.feature_extractor, plain, m.config)


def test_posterior_compression_mixes_real_token_embeddings_by_the_ctc_posterior(tiny_model):
    m = _compressing(tiny_model, "posterior")
    with torch.no_grad():
        m.adaptor.ctc_log_scale.fill_(1.1)  # the head's learnt temperature sharpens the posterior
    frames = _frames(151, m.encoder.config.d_model, 3)
    table = m.llm.get_input_embeddings().weight
    batch = m.tokenize([Sample(speech=frames)])
    with torch.no_grad():
        out = m.adaptor(frames[None])[0]
        seg = m.speech_segments(frames)
        rows = table[m.adaptor.ctc_ids[1:]]  # tokens 5 and 6: the blank (pad) never enters the mixture
        want = []
        for j in range(int(seg.max()) + 1):
            post = (torch.exp(torch.tensor(1.1)) * (out[seg == j] @ rows.T)).softmax(-1).mean(0)
            want.append(post[0] * rows[0] + post[1] * rows[1])
        torch.testing.assert_close(m.embed(batch)[batch.speech_mask], torch.stack(want))
    with pytest.raises(TextkeepError, match="speech_compress must be one of"):
        type(m.config)(speech_compress="max")
