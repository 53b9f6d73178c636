"""Stage-1 training on tiny models: the three strategies, the schedule, resume after SIGKILL, NaN stops, bad
settings."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file, save_file

from textkeep.errors import TextkeepError
from textkeep.model.speech_llm import Sample, SpeechLLM
from textkeep.train.config import TrainConfig
from textkeep.train.strategies import LORA_TARGETS, apply_lora, layer_lr_scales, param_groups
from textkeep.train.trainer import SampleList, fit, merge_lora, train

RESPONSES = [
    "The capital of France is Paris.",
    "A spider has eight legs.",
    "William Shakespeare wrote Hamlet.",
    "Paris.",
]
LAYER_SUMS = [4.0, 1.0, 3.0, 2.0]  # tiny-llama has 4 layers
LAYER_SCALES = [0.6, 1.0, 1 - 0.4 * 2 / 3, 1 - 0.4 / 3]  # Eq. 3 by hand: 1 − 0.4·(I − 1)/(4 − 1)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models gain nothing from threads, and a second one stalls badly on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TEXTKEEP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")


def _data(model, n: int = 4) -> SampleList:
    g = torch.Generator().manual_seed(1)
    d = model.encoder.config.d_model
    return SampleList(
        [
            Sample(speech=torch.randn(25 + 5 * i, d, generator=g), response=RESPONSES[i % 4], id=f"s{i}")
            for i in range(n)
        ]
    )


def _fit(model, out, data=None, **kw):
    kw = {"lr": 3e-3, "batch_size": 2, "grad_accum": 2, "warmup_ratio": 0.0, "max_steps": 3, "save_every": 100, **kw}
    resume = kw.pop("resume", False)
    return fit(model, data or _data(model), out, TrainConfig(**kw), resume=resume)


def _metrics(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def _write_map(llm, path: Path, sums=LAYER_SUMS, names=None) -> Path:
    path.mkdir(parents=True)
    params = dict(llm.named_parameters())
    save_file(
        {n: torch.rand(params[n].shape) if n in params else torch.rand(3) for n in (names or params)},
        str(path / "importance.safetensors"),
    )
    (path / "summary.json").write_text(json.dumps({"layers": [{"layer": i, "sum": s} for i, s in enumerate(sums)]}))
    return path


# ---- Eq. 3 and the layer-lr groups -----------------------------------------------------------------------------------


def test_layer_lr_scales_follow_eq3():
    assert layer_lr_scales(LAYER_SUMS, 0.4) == pytest.approx(LAYER_SCALES)
    assert layer_lr_scales(LAYER_SUMS, 0.0) == [1.0] * 4
    assert layer_lr_scales([2.5] * 3, 0.4) == [1.0] * 3  # all layers equally important
    with pytest.raises(TextkeepError, match=r"\[0, 1\]"):
        layer_lr_scales(LAYER_SUMS, 1.2)


def test_layer_lr_groups_and_schedule(tiny_model, tmp_path):
    groups = param_groups(tiny_model, "layer-lr", 1e-3, LAYER_SCALES)
    by_name = {g["name"]: g for g in groups}
    named = dict(tiny_model.llm.named_parameters())
    for i, s in enumerate(LAYER_SCALES):
        assert by_name[f"layer.{i}"]["lr"] == pytest.approx(1e-3 * s)
        assert {id(p) for p in by_name[f"layer.{i}"]["params"]} == {
            id(p) for n, p in named.items() if n.startswith(f"model.layers.{i}.")
        }
    assert by_name["llm"]["lr"] == by_name["adaptor"]["lr"] == 1e-3  # embeddings, final norm: base rate
    assert {n for n, p in named.items() if any(p is q for q in by_name["llm"]["params"])} == {
        "model.embed_tokens.weight",
        "model.norm.weight",
    }

    imp = _write_map(tiny_model.llm, tmp_path / "map")
    out = _fit(
        tiny_model, tmp_path / "run", strategy="layer-lr", importance=imp, lr=1e-3, max_steps=4, warmup_ratio=0.25
    )
    assert [r["lr_scale"] for r in json.loads((out / "layer_lr.json").read_text())] == pytest.approx(LAYER_SCALES)
    # HF cosine with 1 warm-up step of 4: the update of step k uses factor 0, 1, (1+cos(π/3))/2, (1+cos(2π/3))/2.
    factors = [0.0, 1.0, 0.5 * (1 + math.cos(math.pi / 3)), 0.5 * (1 + math.cos(2 * math.pi / 3))]
    rows = _metrics(out)
    assert len(rows) == 4
    for row, f in zip(rows, factors):
        for i, s in enumerate(LAYER_SCALES):
            assert row["lr"][f"layer.{i}"] == pytest.approx(1e-3 * s * f, abs=1e-12)
        assert row["lr"]["adaptor"] == pytest.approx(1e-3 * f, abs=1e-12)
    assert list((out / "tb").iterdir())  # TensorBoard events written


# ---- LoRA ------------------------------------------------------------------------------------------------------------


def test_lora_targets_and_trainable_set(tiny_model):
    from peft.tuners.lora import LoraLayer

    apply_lora(tiny_model, rank=4)
    trainable = {n for n, p in tiny_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("adaptor.") for n in trainable)
    assert {n for n, _ in tiny_model.adaptor.named_parameters()} == {
        n[len("adaptor.") :] for n in trainable if n.startswith("adaptor.")
    }
    wrapped = {n for n, m in tiny_model.llm.named_modules() if isinstance(m, LoraLayer)}
    layers = tiny_model.llm.config.num_hidden_layers
    expected = {
        f"layers.{i}.{'self_attn' if t.endswith(('q_proj', 'k_proj', 'v_proj', 'o_proj')) else 'mlp'}.{t}"
        for i in range(layers)
        for t in LORA_TARGETS
    }
    assert {n[n.index("layers.") :] for n in wrapped} == expected
    for n, m in tiny_model.llm.named_modules():
        if isinstance(m, LoraLayer):
            assert m.r["default"] == 4 and m.scaling["default"] == 2.0  # α = 2r


# ---- full fine-tuning and loss decrease ------------------------------------------------------------------------------


def test_full_keeps_encoder_and_moves_llm_and_adaptor(tiny_model, tmp_path):
    before = {n: p.detach().clone() for n, p in tiny_model.named_parameters()}
    _fit(tiny_model, tmp_path / "run", strategy="full", max_steps=2)
    after = dict(tiny_model.named_parameters())
    for n, p in before.items():
        if n.startswith("encoder."):
            assert torch.equal(p, after[n]), n
        else:
            assert not torch.equal(p, after[n]), f"{n} did not train"
    assert SpeechLLM.load(tmp_path / "run").config.adaptor_trained


@pytest.mark.parametrize("strategy", ["full", "layer-lr", "lora"])
def test_loss_decreases_on_a_tiny_overfit_set(tiny_model, tmp_path, strategy):
    imp = _write_map(tiny_model.llm, tmp_path / "map") if strategy == "layer-lr" else None
    out = _fit(
        tiny_model, tmp_path / "run", strategy=strategy, importance=imp, max_steps=25, batch_size=4, grad_accum=1
    )
    losses = [r["loss"] for r in _metrics(out)]
    # LoRA cannot move the frozen (tied) embedding and head of a random tiny LLM, so its floor is higher.
    assert np.mean(losses[-3:]) < (0.9 if strategy == "lora" else 0.5) * losses[0], losses


def test_adaptor_warmup_leaves_the_llm_untouched(tiny_model, tmp_path):
    from textkeep.train import trainer

    calls = []
    real_fit_loop_start = trainer.adaptor_warmup

    def spy(accelerator, wrapper, model, *a):
        llm = {n: p.detach().clone() for n, p in model.llm.named_parameters()}
        adaptor = [p.detach().clone() for p in model.adaptor.parameters()]
        real_fit_loop_start(accelerator, wrapper, model, *a)
        calls.append(all(torch.equal(p, llm[n]) for n, p in model.llm.named_parameters()))
        calls.append(any(not torch.equal(p, q) for p, q in zip(model.adaptor.parameters(), adaptor)))

    trainer.adaptor_warmup, saved = spy, trainer.adaptor_warmup
    try:
        _fit(tiny_model, tmp_path / "run", adaptor_warmup_steps=2, max_steps=1)
    finally:
        trainer.adaptor_warmup = saved
    assert calls == [True, True]


def test_gradient_checkpointing_gives_the_same_losses(tiny_model, tiny_parts, tmp_path):
    calls = {"a": 0, "b": 0}
    models = {"a": tiny_model, "b": _fresh_tiny(tiny_parts)}
    for key, m in models.items():  # module hooks do not fire on a recompute, so count the forward calls themselves
        mlp = m.llm.model.layers[0].mlp
        mlp.forward = lambda *a, key=key, f=mlp.forward: calls.__setitem__(key, calls[key] + 1) or f(*a)
    plain = _metrics(_fit(models["a"], tmp_path / "a", max_steps=2))
    checkpointed = _metrics(_fit(models["b"], tmp_path / "b", max_steps=2, gradient_checkpointing=True))
    assert calls == {"a": 4, "b": 8}  # 4 micro-batches; checkpointing recomputes each layer in the backward pass
    assert [r["loss"] for r in checkpointed] == pytest.approx([r["loss"] for r in plain], rel=1e-5)


def test_merge_lora_gives_the_same_model(tiny_model, tmp_path):
    out = _fit(tiny_model, tmp_path / "run", strategy="lora", lr=1e-2, max_steps=2)
    merged = merge_lora(out, tmp_path / "merged")
    a, b = SpeechLLM.load(out), SpeechLLM.load(merged)
    assert not hasattr(b.llm, "peft_config")
    batch = a.tokenize(_data(a).items[:2])
    assert torch.allclose(a.logits(batch), b.logits(batch), atol=1e-4)


# ---- faults ----------------------------------------------------------------------------------------------------------


class _PoisonAfter(SampleList):
    """Frames turn to NaN from the n-th micro-batch on."""

    def __init__(self, base: SampleList, n: int):
        self.items, self.lengths, self.n, self.calls = base.items, base.lengths, n, 0

    def samples(self, idx):
        self.calls += 1
        out = super().samples(idx)
        if self.calls > self.n:
            out = [Sample(speech=torch.full_like(s.speech, float("nan")), response=s.response, id=s.id) for s in out]
        return out


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_model, tiny_parts, tmp_path):
    data = _data(tiny_model)
    with pytest.raises(TextkeepError, match=r"loss is nan at step 3 \(micro-batch of samples s\d, s\d\).*step-2"):
        _fit(
            tiny_model, tmp_path / "run", data=_PoisonAfter(data, 4), max_steps=5, save_every=1
        )  # 2 micro-batches a step
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert ckpts == ["step-1", "step-2"]
    state = load_file(str(tmp_path / "run" / "checkpoints" / "step-2" / "trainable.safetensors"))
    assert all(torch.isfinite(t).all() for t in state.values())
    # The good checkpoint resumes: a fresh model continues from step 2 to the end.
    fresh = _fresh_tiny(tiny_parts)
    out = _fit(fresh, tmp_path / "run", data=data, max_steps=5, save_every=1, resume=True)
    assert [r["step"] for r in _metrics(out)] == [1, 2, 3, 4, 5]


class _Payload:
    """Unpickling this would create a file: the stand-in for code a foreign checkpoint could run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("victim", ["optimizer.pt"])
def test_resume_refuses_a_checkpoint_that_would_run_code(tiny_model, tiny_parts, tmp_path, victim):
    import pickle

    _fit(tiny_model, tmp_path / "run", max_steps=2, save_every=1)
    ckpt = tmp_path / "run" / "checkpoints" / "step-2"  # the last one: what --resume loads
    for name in ("rng.json", "rng.safetensors", "scheduler.json", "optimizer.pt"):  # nothing pickled but tensors
        assert (ckpt / name).is_file(), name
    assert not list(ckpt.glob("rng.pt")) and not list(ckpt.glob("scheduler.pt"))
    marker = tmp_path / "code-ran"
    with open(ckpt / victim, "wb") as f:
        pickle.dump({"state": _Payload(marker)}, f)
    with pytest.raises(TextkeepError, match=f"{victim}.*refuses to unpickle"):
        _fit(_fresh_tiny(tiny_parts), tmp_path / "run", max_steps=2, save_every=1, resume=True)
    assert not marker.exists()


def _fresh_tiny(tiny_parts):
    import copy

    from textkeep.model.adaptor import SpeechAdaptor
    from textkeep.model.speech_llm import SpeechLLMConfig

    tok, llm, enc, fe = tiny_parts
    torch.manual_seed(0)
    config = SpeechLLMConfig(llm="tiny-llama", encoder="tiny-whisper", adaptor_hidden=64)
    adaptor = SpeechAdaptor(enc.config.d_model, llm.config.hidden_size, config.adaptor_k, config.adaptor_hidden)
    return SpeechLLM(copy.deepcopy(llm), copy.deepcopy(tok), copy.deepcopy(enc), fe, adaptor, config)


@pytest.mark.parametrize(
    "bad,match",
    [
        ({"strategy": "layer-lr", "lam": 1.5}, "lam"),
        ({"strategy": "layer-lr", "lam": -0.1}, "lam"),
        ({"strategy": "lora", "lora_rank": 0}, "lora_rank"),
        ({"lr": 0.0}, "lr must be"),
        ({"lr": -1e-5}, "lr must be"),
        ({"strategy": "sgd"}, "unknown"),
        ({"strategy": "layer-lr"}, "needs importance"),
        ({"strategy": "layer-lr", "importance": "missing-dir"}, "does not exist"),
        ({"strategy": "layer-lr", "importance": "wrong-names"}, "does not match this LLM"),
        ({"strategy": "layer-lr", "importance": "wrong-layers"}, "LLM has layers"),
    ],
)
def test_bad_settings_are_refused_before_training(tiny_model, tmp_path, bad, match):
    if bad.get("importance") == "wrong-names":
        bad = {**bad, "importance": _write_map(tiny_model.llm, tmp_path / "map", names=["model.layers.0.attn.weight"])}
    elif bad.get("importance") == "wrong-layers":
        bad = {**bad, "importance": _write_map(tiny_model.llm, tmp_path / "map", sums=[1.0, 2.0])}
    elif bad.get("importance") == "missing-dir":
        bad = {**bad, "importance": tmp_path / "nope"}
    before = {n: p.detach().clone() for n, p in tiny_model.named_parameters()}
    with pytest.raises(TextkeepError, match=match):
        _fit(tiny_model, tmp_path / "run", **bad)
    assert not (tmp_path / "run").exists()
    assert all(torch.equal(p, before[n]) for n, p in tiny_model.named_parameters())


# ---- the command on spoken data: missing audio, resume after SIGKILL -------------------------------------------------


def _spoken_set(root: Path, n: int = 8) -> tuple[Path, Path]:
    """A JSONL instruction set and a TTS-style manifest of short noise/tone WAVs."""
    import hashlib

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows, manifest = [], []
    for i in range(n):
        t = np.arange(int(16000 * (0.4 + 0.1 * i))) / 16000
        audio = (0.3 * np.sin(2 * np.pi * (200 + 40 * i) * t) + 0.05 * rng.standard_normal(len(t))).astype(np.float32)
        wav = root / f"q{i}.wav"
        sf.write(wav, audio, 16000)
        rows.append({"id": f"q{i}", "instruction": f"question {i}", "response": RESPONSES[i % 4]})
        manifest.append(
            {
                "id": f"q{i}",
                "text": f"question {i}",
                "audio": wav.name,
                "voice": "tone",
                "seconds": len(t) / 16000,
                "sha256": hashlib.sha256(wav.read_bytes()).hexdigest(),
            }
        )
    data, man = root / "data.jsonl", root / "manifest.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    man.write_text("".join(json.dumps(r) + "\n" for r in manifest))
    return data, man


def test_train_needs_spoken_records(tmp_path):
    data, _ = _spoken_set(tmp_path / "set", n=2)
    with pytest.raises(TextkeepError, match="textkeep speak"):
        train(model="tiny-llama", encoder="tiny-whisper", data=str(data), out=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_train_uses_the_split_and_limit(tmp_path):
    from textkeep.data.datasets import load_dataset
    from textkeep.data.splits import make_splits, save_split_ids

    data, manifest = _spoken_set(tmp_path / "set")
    splits = make_splits(load_dataset(str(data)), test_size=2, seed=0)
    save_split_ids(splits, tmp_path)
    out = train(
        model="tiny-llama",
        encoder="tiny-whisper",
        data=str(data),
        spoken=manifest,
        split_file=tmp_path / "splits.json",
        limit=4,
        out=tmp_path / "run",
        train=TrainConfig(batch_size=2, grad_accum=1, max_steps=1, lr=1e-3),
    )
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["derived"]["n_examples"] == 4 and saved["args"]["limit"] == 4 and saved["args"]["strategy"] == "full"
    assert set(saved["args"]) >= {
        "model",
        "encoder",
        "data",
        "spoken",
        "split_file",
        "lam",
        "lora_rank",
        "seed",
        "resume",
    }
    assert SpeechLLM.load(out).config.extra["examples"] == 4
    with pytest.raises(TextkeepError, match="--resume"):  # a second run into the same folder
        train(model="tiny-llama", encoder="tiny-whisper", data=str(data), spoken=manifest, out=out)


_SCRIPT = """
import sys, time
from pathlib import Path
import torch
torch.set_num_threads(1)
from textkeep.model.speech_llm import SpeechLLM
loss_sum = SpeechLLM.loss_sum
def slow(self, batch):  # gives the test time to kill the run between checkpoints
    time.sleep(float(sys.argv[3]))
    return loss_sum(self, batch)
SpeechLLM.loss_sum = slow
from textkeep.train.trainer import train
from textkeep.train.config import TrainConfig
train(model="tiny-llama", encoder="tiny-whisper", data=sys.argv[4], spoken=Path(sys.argv[5]), out=Path(sys.argv[1]),
      resume=sys.argv[2] == "1", train=TrainConfig(strategy="lora", lr=1e-2, batch_size=2, grad_accum=2, max_steps=8,
      warmup_ratio=0.2, save_every=2))
"""


def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path):
    from textkeep.model.registry import prepare

    data, manifest = _spoken_set(tmp_path / "set")
    for name in ("tiny-llama", "tiny-whisper"):  # build them once here, not in two processes at once
        prepare(name)
    script = tmp_path / "run_train.py"
    script.write_text(textwrap.dedent(_SCRIPT))
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}

    def start(out, resume, sleep):
        return subprocess.Popen(
            [sys.executable, str(script), str(out), resume, str(sleep), str(data), str(manifest)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    reference = start(tmp_path / "ref", "0", 0)
    victim = start(tmp_path / "killed", "0", 0.3)
    ckpts = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 120
    while not (ckpts / "step-2" / "state.json").is_file():
        assert victim.poll() is None, victim.stderr.read()
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (tmp_path / "killed" / "model").exists()  # it really died mid-run
    killed_at = max(int(p.name[5:]) for p in ckpts.glob("step-*"))
    assert killed_at < 8
    resumed = start(tmp_path / "killed", "1", 0)
    outputs = [proc.communicate(timeout=180) for proc in (reference, resumed)]
    assert reference.returncode == 0 and resumed.returncode == 0, outputs
    assert f"resuming after step {killed_at}" in outputs[1][0]
    for rel in ("model/adaptor.safetensors", "model/llm_adapter/adapter_model.safetensors"):
        a, b = load_file(str(tmp_path / "ref" / rel)), load_file(str(tmp_path / "killed" / rel))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), rel
    assert [r["step"] for r in _metrics(tmp_path / "killed")] == list(range(1, 9))
    assert [r["loss"] for r in _metrics(tmp_path / "killed")] == [r["loss"] for r in _metrics(tmp_path / "ref")]
