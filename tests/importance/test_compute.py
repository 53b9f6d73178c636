"""Taylor importance: the modes against brute-force autograd, the on-disk contract, LoRA, DDP, dtypes, checkpointing."""

import copy
import json

import pytest
import torch

from textkeep.data.samples import length_grouped_batches
from textkeep.errors import TextkeepError
from textkeep.importance.compute import compute_importance, importance_compute
from textkeep.importance.maps import MODULES, check_compatible, layer_sums, load_map
from textkeep.model.speech_llm import Sample

QUESTIONS = [
    "What is the capital of France?",
    "Who wrote Hamlet?",
    "How many legs does a spider have? Please answer with a number and explain why.",
    "Name a color.",
    "What is two plus two, and what is three plus three?",
    "Say hello.",
    "Which city is the capital of France and what river runs through it?",
]
ANSWERS = [
    "The capital of France is Paris.",
    "William Shakespeare wrote Hamlet.",
    "A spider has eight legs.",
    "Blue.",
    "Four and six.",
    "Hello to you too, how are you doing today?",
    "Paris, on the Seine.",
]


def _text(n=len(QUESTIONS)):
    return [Sample(text=q, response=a, id=f"s{i}") for i, (q, a) in enumerate(zip(QUESTIONS[:n], ANSWERS[:n]))]


def _speech(d_enc, n=len(QUESTIONS)):
    g = torch.Generator().manual_seed(1)
    return [
        Sample(speech=torch.randn(10 + 7 * i, d_enc, generator=g), response=a, id=f"s{i}")
        for i, a in enumerate(ANSWERS[:n])
    ]


def _grads(model, samples, scale):
    """Plain autograd on one batch: ∂(scale · summed token loss)/∂θ of the LLM."""
    llm = model.llm
    llm.zero_grad(set_to_none=True)
    flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    llm.requires_grad_(True)
    loss, n = model.loss_sum(model.tokenize(samples))
    (loss * scale(n)).backward()
    grads = {k: p.grad.clone() for k, p in llm.named_parameters()}
    llm.zero_grad(set_to_none=True)
    for p, f in zip(model.parameters(), flags):
        p.requires_grad_(f)
    return grads, n


def _close(got, want, rtol):
    assert got.keys() == want.keys()
    for k in want:
        scale = want[k].abs().max().item()
        torch.testing.assert_close(got[k], want[k], rtol=rtol, atol=rtol * scale, msg=lambda m: f"{k}: {m}")


def _params(model):
    return dict(model.llm.named_parameters())


@pytest.mark.parametrize("batch_size", [1, 3])
def test_paper_mode_equals_brute_force_on_the_whole_set(tiny_model, batch_size):
    samples = _text()  # mixed lengths: padding inside batches
    grads, _ = _grads(tiny_model, samples, lambda n: 1 / n)
    want = {k: (grads[k] * p.detach()).abs() for k, p in _params(tiny_model).items()}
    got = compute_importance(tiny_model, samples, mode="paper", batch_size=batch_size, progress=False)
    _close(got.scores, want, 1e-5)
    assert got.meta["n_tokens"] == sum(tiny_model.tokenize([s]).n_response_tokens for s in samples)
    assert all(p.grad is None for p in tiny_model.parameters())


@pytest.mark.parametrize("mode", ["abs", "fisher"])
def test_batch_modes_equal_per_batch_loops(tiny_model, mode):
    samples = _text()
    batches = length_grouped_batches(samples, 3, tiny_model.config.adaptor_k)
    want = {k: torch.zeros_like(p) for k, p in _params(tiny_model).items()}
    for b in batches:
        grads, _ = _grads(tiny_model, [samples[i] for i in b], lambda n: 1 / n)
        for k, p in _params(tiny_model).items():
            t = grads[k] * p.detach()
            want[k] += t.abs() if mode == "abs" else t**2
    want = {k: v / len(batches) for k, v in want.items()}
    got = compute_importance(tiny_model, samples, mode=mode, batch_size=3, progress=False)
    _close(got.scores, want, 1e-5)
    assert got.meta["n_batches"] == len(batches)


def test_speech_flows_through_the_adaptor(tiny_model):
    d_enc = tiny_model.adaptor.proj[0].in_features // tiny_model.config.adaptor_k
    speech, text = _speech(d_enc), _text()
    adaptor_flags = [p.requires_grad for p in tiny_model.adaptor.parameters()]
    m_speech = compute_importance(tiny_model, speech, batch_size=3, progress=False)
    m_text = compute_importance(tiny_model, text, batch_size=3, progress=False)
    assert m_speech.meta["modality"] == "speech" and m_text.meta["modality"] == "text"
    assert m_speech.scores.keys() == m_text.scores.keys()
    assert not torch.allclose(
        m_speech.scores["model.layers.0.self_attn.q_proj.weight"],
        m_text.scores["model.layers.0.self_attn.q_proj.weight"],
    )
    # brute force through the adaptor
    grads, _ = _grads(tiny_model, speech, lambda n: 1 / n)
    _close(m_speech.scores, {k: (grads[k] * p.detach()).abs() for k, p in _params(tiny_model).items()}, 1e-5)
    # the adaptor's output reaches the LLM: changing the adaptor changes the speech map only
    with torch.no_grad():
        tiny_model.adaptor.proj[-1].weight.mul_(2)
    again = compute_importance(tiny_model, speech, batch_size=3, progress=False)
    assert not torch.allclose(
        again.scores["model.layers.0.mlp.up_proj.weight"], m_speech.scores["model.layers.0.mlp.up_proj.weight"]
    )
    assert all(
        torch.equal(a, b)
        for a, b in zip(
            compute_importance(tiny_model, text, batch_size=3, progress=False).scores.values(), m_text.scores.values()
        )
    )
    assert [p.requires_grad for p in tiny_model.adaptor.parameters()] == adaptor_flags
    assert all(p.grad is None for p in tiny_model.adaptor.parameters())


def test_keys_round_trip_and_summary(tiny_model, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    imap = compute_importance(tiny_model, _text(), mode="abs", batch_size=4, progress=False)
    params = _params(tiny_model)
    assert list(imap.scores) == list(params)  # tied embeddings/head appear once
    assert all(imap.scores[k].shape == p.shape and imap.scores[k].dtype == torch.float32 for k, p in params.items())
    imap.meta |= {"dataset": "unit", "split": "all", "seed": 3}
    imap.save(tmp_path / "map")

    back = load_map(tmp_path / "map")
    assert back.scores.keys() == imap.scores.keys() and all(torch.equal(back.scores[k], imap.scores[k]) for k in params)
    assert back.meta["n_tokens"] == imap.meta["n_tokens"] and back.meta["mode"] == "abs" and back.meta["seed"] == 3
    with safe_open(str(tmp_path / "map" / "importance.safetensors"), "pt") as f:
        assert {
            "mode",
            "modality",
            "n_examples",
            "n_tokens",
            "model",
            "dataset",
            "split",
            "seed",
            "textkeep_version",
        } <= f.metadata().keys()

    raw = load_file(str(tmp_path / "map" / "importance.safetensors"))
    summary = json.loads((tmp_path / "map" / "summary.json").read_text())
    n_layers = tiny_model.llm.config.num_hidden_layers
    want_layers = [
        sum(float(v.double().sum()) for k, v in raw.items() if k.startswith(f"model.layers.{i}."))
        for i in range(n_layers)
    ]
    assert [row["layer"] for row in summary["layers"]] == list(range(n_layers))
    assert [row["sum"] for row in summary["layers"]] == pytest.approx(want_layers, rel=1e-12)
    assert layer_sums(back) == pytest.approx(want_layers, rel=1e-12)
    assert summary["total"] == pytest.approx(sum(float(v.double().sum()) for v in raw.values()), rel=1e-12)
    assert set(summary["modules"]) == set(MODULES)
    assert summary["modules"]["q_proj"] == pytest.approx(
        sum(float(v.double().sum()) for k, v in raw.items() if ".q_proj." in k), rel=1e-12
    )
    assert summary["modules"]["norms"] == pytest.approx(
        sum(float(v.double().sum()) for k, v in raw.items() if "norm" in k), rel=1e-12
    )
    assert summary["modules"]["embeddings"] == pytest.approx(
        float(raw["model.embed_tokens.weight"].double().sum()), rel=1e-12
    )
    assert summary["modules"]["head"] == 0.0  # tied: the head's weight is embed_tokens.weight
    row = summary["layer_modules"][2]
    assert row["layer"] == 2 and row["down_proj"] == pytest.approx(
        float(raw["model.layers.2.mlp.down_proj.weight"].double().sum()), rel=1e-12
    )
    assert sum(v for k, v in row.items() if k != "layer") == pytest.approx(want_layers[2], rel=1e-12)


def test_check_compatible_names_the_mismatch(tiny_model):
    imap = compute_importance(tiny_model, _text(2), progress=False)
    check_compatible(imap, tiny_model.llm)
    imap.scores["model.layers.1.mlp.up_proj.weight"] = torch.zeros(3, 3)
    del imap.scores["model.norm.weight"]
    with pytest.raises(TextkeepError, match=r"model\.norm\.weight.*up_proj\.weight \(map \(3, 3\)"):
        check_compatible(imap, tiny_model.llm)


def test_lora_is_scored_on_the_merged_weights(tiny_model):
    from peft import LoraConfig, get_peft_model

    samples = _text()
    plain = copy.deepcopy(tiny_model)
    base_map = compute_importance(plain, samples, batch_size=3, progress=False)
    torch.manual_seed(0)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    tiny_model.llm = get_peft_model(tiny_model.llm, cfg)
    before = {k: v.clone() for k, v in tiny_model.llm.state_dict().items()}
    # the equivalent plain model, merged by hand: W + (alpha / r) B A
    for name, m in tiny_model.llm.get_base_model().named_modules():
        if hasattr(m, "lora_A"):
            delta = 2.0 * m.lora_B["default"].weight @ m.lora_A["default"].weight
            plain.llm.get_submodule(name).weight.data += delta.detach()
    want = compute_importance(plain, samples, batch_size=3, progress=False)
    got = compute_importance(tiny_model, samples, batch_size=3, progress=False)
    assert list(got.scores) == list(want.scores)
    _close(got.scores, want.scores, 1e-5)
    assert not torch.allclose(
        got.scores["model.layers.0.self_attn.q_proj.weight"], base_map.scores["model.layers.0.self_attn.q_proj.weight"]
    )
    after = tiny_model.llm.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the adapter model is untouched
    assert not any(p.requires_grad for k, p in tiny_model.llm.named_parameters() if "lora_" not in k)
    check_compatible(got, tiny_model.llm)


def test_two_runs_are_bit_identical(tiny_model):
    a = compute_importance(tiny_model, _text(), mode="fisher", batch_size=2, progress=False)
    b = compute_importance(tiny_model, _text(), mode="fisher", batch_size=2, progress=False)
    assert all(torch.equal(a.scores[k], b.scores[k]) for k in a.scores)


def test_command_writes_the_same_map_twice(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text(
        "".join(
            json.dumps({"id": f"r{i}", "instruction": q, "response": a}) + "\n"
            for i, (q, a) in enumerate(zip(QUESTIONS, ANSWERS))
        )
    )
    outs = [
        importance_compute("tiny-llama", str(data), split="all", limit=5, batch_size=2, out=tmp_path / f"run{i}")
        for i in range(2)
    ]
    a, b = (load_map(o) for o in outs)
    assert a.meta["n_examples"] == 5 and a.meta["dataset"] == str(data) and a.meta["split"] == "all"
    assert all(torch.equal(a.scores[k], b.scores[k]) for k in a.scores)


def test_command_scores_speech_of_the_records_a_manifest_gives_audio(tmp_path, monkeypatch):
    import numpy as np
    import soundfile as sf

    monkeypatch.setenv("TEXTKEEP_CACHE_DIR", str(tmp_path / "cache"))
    data = tmp_path / "data.jsonl"
    data.write_text(
        "".join(
            json.dumps({"id": f"r{i}", "instruction": q, "response": a}) + "\n"
            for i, (q, a) in enumerate(zip(QUESTIONS, ANSWERS))
        )
    )
    rng = np.random.default_rng(0)
    for i in (0, 2, 3):
        sf.write(tmp_path / f"r{i}.wav", (0.1 * rng.standard_normal(12000)).astype("float32"), 16000)
    (tmp_path / "manifest.jsonl").write_text(
        "".join(json.dumps({"id": f"r{i}", "audio": f"r{i}.wav"}) + "\n" for i in (0, 2, 3))
    )
    args = dict(
        model="tiny-llama", data=str(data), modality="speech", split="all", batch_size=2, encoder="tiny-whisper"
    )
    with pytest.raises(TextkeepError, match="--spoken MANIFEST"):
        importance_compute(**args, out=tmp_path / "none")
    got = load_map(importance_compute(**args, spoken=tmp_path / "manifest.jsonl", out=tmp_path / "speech"))
    assert got.meta["n_examples"] == 3 and got.meta["modality"] == "speech"


def test_bf16_accumulates_in_fp32(tiny_model):
    samples = _text()
    ref = compute_importance(tiny_model, samples, mode="paper", batch_size=2, progress=False)
    model = tiny_model.to(torch.bfloat16)
    got = compute_importance(model, samples, mode="paper", batch_size=2, progress=False)
    # what an fp32 accumulator of the bf16 per-batch gradients gives (a bf16 one drifts by ~1e-3)
    want = {k: torch.zeros_like(p, dtype=torch.float32) for k, p in _params(model).items()}
    n_total = 0
    for b in length_grouped_batches(samples, 2, model.config.adaptor_k):
        grads, n = _grads(model, [samples[i] for i in b], lambda n: 1)
        n_total += n
        for k in want:
            want[k] += grads[k].float()
    want = {k: (v / n_total * p.float()).abs() for (k, v), p in zip(want.items(), _params(model).values())}
    assert all(v.dtype == torch.float32 for v in got.scores.values())
    _close(got.scores, want, 1e-5)
    for k, v in ref.scores.items():  # and near the fp32 map
        assert torch.linalg.vector_norm(got.scores[k] - v) <= 0.1 * torch.linalg.vector_norm(v), k


@pytest.mark.parametrize("mode,reentrant", [("paper", False), ("abs", True)])
def test_gradient_checkpointing_gives_the_same_map(tiny_model, mode, reentrant):
    samples = _text()
    ref = compute_importance(tiny_model, samples, mode=mode, batch_size=3, progress=False)
    tiny_model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    tiny_model.llm.eval()
    calls = []
    tiny_model.llm.model.layers[0].self_attn.register_forward_hook(lambda *a: calls.append(1))
    got = compute_importance(tiny_model, samples, mode=mode, batch_size=3, progress=False)
    assert len(calls) == 2 * got.meta["n_batches"]  # recomputed in backward: checkpointing was active
    assert not any(m.training for m in tiny_model.llm.modules())  # modes restored
    _close(got.scores, ref.scores, 1e-4)


def test_nan_loss_names_the_samples(tiny_model):
    with torch.no_grad():
        tiny_model.llm.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(TextkeepError, match=r"samples: .*s1"):
        compute_importance(tiny_model, _text(4), mode="abs", batch_size=4, progress=False)
    assert all(p.grad is None for p in tiny_model.parameters())
    assert not any(p.requires_grad for p in tiny_model.encoder.parameters())


def _ddp_worker(rank: int, out: str, world: int):
    """One of `world` spawned processes: a gloo group (file rendezvous, no port to collide on), then Accelerator()."""
    import os

    from accelerate import Accelerator

    from textkeep.model.tiny import build_tiny_llama, build_tiny_tokenizer

    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        ACCELERATE_USE_CPU="yes",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT="0",
    )
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", rank=rank, world_size=world, store=torch.distributed.FileStore(f"{out}/rdv", world)
    )
    acc = Accelerator(cpu=True)
    assert acc.num_processes == world and acc.process_index == rank
    model = _tiny_text_model(build_tiny_tokenizer, build_tiny_llama)
    for mode in ("paper", "abs"):
        imap = compute_importance(model, _text(), mode=mode, batch_size=2, progress=False, accelerator=acc)
        torch.save(imap.scores, f"{out}/{mode}-{rank}.pt")


def _fsdp_worker(rank: int, out: str, world: int):
    """One of `world` spawned processes: a gloo group, then the tiny model sharded with FSDP2 (decoder layers, then
    the LossModule root), as accelerate's FSDP2 plugin shards it on GPUs (accelerate offers FSDP on GPUs only)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from textkeep.model.speech_llm import LossModule
    from textkeep.model.tiny import build_tiny_llama, build_tiny_tokenizer

    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", rank=rank, world_size=world, store=torch.distributed.FileStore(f"{out}/rdv-fsdp", world)
    )
    mesh = init_device_mesh("cpu", (world,))
    model = _tiny_text_model(build_tiny_tokenizer, build_tiny_llama)
    loss = LossModule(model)
    for layer in model.llm.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(loss, mesh=mesh)
    assert all(type(p).__name__ == "DTensor" for p in model.llm.parameters())
    # 3 batches of 2 over 2 processes: the second process repeats a zero-weighted batch to keep in step.
    imap = compute_importance(model, _text(6), mode="paper", batch_size=2, progress=False, sharded_loss=loss)
    torch.save(imap.scores, f"{out}/fsdp-{rank}.pt")
    with pytest.raises(TextkeepError, match="--mode paper under FSDP"):
        compute_importance(model, _text(6), mode="abs", batch_size=2, progress=False, sharded_loss=loss)


def _tiny_text_model(build_tiny_tokenizer, build_tiny_llama):
    from textkeep.model.adaptor import SpeechAdaptor
    from textkeep.model.speech_llm import SpeechLLM, SpeechLLMConfig

    tok = build_tiny_tokenizer()
    return SpeechLLM(
        build_tiny_llama(tok),
        tok,
        None,
        None,
        SpeechAdaptor(1, 64, 5, 8),
        SpeechLLMConfig(llm="tiny-llama", encoder=""),
    )


def test_ddp_two_cpu_processes_match_one(tmp_path):
    """Two gloo processes, each with an Accelerator, give the single-process map. The processes are spawned
    by a fresh interpreter running this file: forking pytest after torch has run ops deadlocks the children."""
    import subprocess
    import sys

    from textkeep.model.tiny import build_tiny_llama, build_tiny_tokenizer

    proc = subprocess.run([sys.executable, __file__, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    model = _tiny_text_model(build_tiny_tokenizer, build_tiny_llama)
    for mode in ("paper", "abs"):
        want = compute_importance(model, _text(), mode=mode, batch_size=2, progress=False).scores
        for rank in range(2):
            _close(torch.load(tmp_path / f"{mode}-{rank}.pt"), want, 1e-5)


def test_fsdp2_two_cpu_processes_match_one(tmp_path):
    """Two gloo processes holding FSDP2 shards give the single-process `paper` map, gathered whole on each."""
    import subprocess
    import sys

    from textkeep.model.tiny import build_tiny_llama, build_tiny_tokenizer

    proc = subprocess.run(
        [sys.executable, __file__, str(tmp_path), "fsdp"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    model = _tiny_text_model(build_tiny_tokenizer, build_tiny_llama)
    want = compute_importance(model, _text(6), mode="paper", batch_size=2, progress=False).scores
    for rank in range(2):
        _close(torch.load(tmp_path / f"fsdp-{rank}.pt"), want, 1e-5)


if __name__ == "__main__":  # the multi-process tests' launcher: this process is rank 0, a spawned one rank 1
    import multiprocessing
    import sys

    worker = _fsdp_worker if sys.argv[2:] == ["fsdp"] else _ddp_worker
    other = multiprocessing.get_context("spawn").Process(target=worker, args=(1, sys.argv[1], 2))
    other.start()
    worker(0, sys.argv[1], 2)
    other.join()
    sys.exit(other.exitcode)
