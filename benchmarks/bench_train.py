"""Stage-1 training throughput: textkeep's loop vs a LLaMA-Omni-style loop, and seconds per step for each strategy.

    python benchmarks/bench_train.py [--n 32] [--batch-size 8] [--grad-accum 4] [--steps 1]
                                     [--model smollm2-135m-instruct] [--threads 1]

Side by side in one run, on the same N spoken instructions and the same model (full fine-tuning, lr 2e-5, batch B):
- textkeep: `train()` for one epoch: encoder frames from the feature cache (cropped to the real audio), length-grouped
  micro-batches, the LM head only on response tokens. Reported twice: the training loop alone (cache warm, as in every
  epoch after the first and every later run) and with the one-time encoding of the N clips added.
- LLaMA-Omni style (written here): every clip padded to 30 s and run through the encoder at every step, all 1500 frames
  kept (300 speech embeddings, keep_padding), random batches with no length grouping, the HF forward computing logits
  at every position.
Then seconds per optimizer step (B × grad_accum examples) for full, layer-lr and lora via `train()`; layer-lr reads a
placeholder importance map with the model's parameter names (timing does not depend on its values).

Data: the synthesized Spoken-Alpaca-GPT4 when `textkeep speak alpaca-gpt4` has made it, else LLaMA Questions' recorded
WAVs ($TEXTKEEP_DATA_DIR), question → answer.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _records(n: int):
    from textkeep.data.datasets import attach_audio, load_dataset
    from textkeep.eval.qa import spoken_manifest

    manifest = spoken_manifest("alpaca-gpt4")
    if manifest.is_file():
        records = [r for r in attach_audio(load_dataset("alpaca-gpt4"), manifest) if r.audio is not None]
        if len(records) >= n:
            return "alpaca-gpt4", manifest, records[:n]
    return "llama-questions", None, load_dataset("llama-questions")[:n]


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def omni_style(model_name: str, encoder: str, records, batch_size: int, seed: int = 0) -> float:
    """LLaMA-Omni's Stage-1 step: load, pad to 30 s, encode, 300 embeddings, full-sequence logits. Returns seconds."""
    from textkeep.model.audio import load_audio
    from textkeep.model.prompt import IGNORE_INDEX
    from textkeep.model.speech_llm import Sample, SpeechLLM

    model = SpeechLLM.build(model_name, encoder, seed=seed, keep_padding=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).train()
    model.encoder.eval()
    params = [p for p in list(model.llm.parameters()) + list(model.adaptor.parameters())]
    opt = torch.optim.AdamW(params, lr=2e-5, weight_decay=0.0)
    order = np.random.default_rng(seed).permutation(len(records))
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    )
    _sync()
    started = time.perf_counter()
    for i in range(0, len(order), batch_size):
        batch = [records[j] for j in order[i : i + batch_size]]
        with autocast:
            frames = model.encode_audio([load_audio(r.audio) for r in batch])  # (1500, d) each: the 30 s window
            tokens = model.tokenize([Sample(speech=f, response=r.response, id=r.id) for f, r in zip(frames, batch)])
            logits = model.logits(tokens)
        labels = tokens.labels[:, 1:].to(device)
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    _sync()
    seconds = time.perf_counter() - started
    del model, opt
    return seconds


def _placeholder_map(model_name: str, root: Path) -> Path:
    """An importance map with the LLM's parameter names and shapes (zeros) and made-up layer sums."""
    from safetensors.torch import save_file

    from textkeep.model.speech_llm import load_llm

    llm, _ = load_llm(model_name)
    n_layers = llm.config.num_hidden_layers
    root.mkdir(parents=True, exist_ok=True)
    save_file({n: torch.zeros(p.shape) for n, p in llm.named_parameters()}, str(root / "importance.safetensors"))
    (root / "summary.json").write_text(
        json.dumps({"layers": [{"layer": i, "sum": float(1 + (i * 7) % n_layers)} for i in range(n_layers)]})
    )
    return root


def _encode_seconds(model_name: str, encoder: str, records, root: Path) -> float:
    """The one-time cost: the N clips through the encoder into an empty feature cache."""
    from textkeep.data.features import FeatureCache
    from textkeep.model.speech_llm import SpeechLLM

    model = SpeechLLM.build(model_name, encoder)
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    cache = FeatureCache(model, root=root)
    _sync()
    started = time.perf_counter()
    cache.frames(records, progress=False)
    _sync()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=32, help="spoken instructions")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--encoder", default="whisper-base")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--grad-accum", type=int, default=4, help="for the per-strategy step timing")
    parser.add_argument("--steps", type=int, default=1, help="optimizer steps timed per strategy")
    parser.add_argument("--skip-omni", action="store_true", help="only the per-strategy timing")
    parser.add_argument(
        "--threads", type=int, default=None, help="CPU threads for torch (1 is fastest on a busy shared CPU)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    from textkeep.train.config import TrainConfig
    from textkeep.train.trainer import train

    data, manifest, records = _records(args.n)
    n = len(records)
    root = Path(tempfile.mkdtemp(prefix="textkeep-bench-train-"))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    common = dict(model=args.model, encoder=args.encoder, data=data, spoken=manifest, limit=n)

    def run(name: str, **kw) -> list[dict]:
        out = train(out=root / name, **common, train=TrainConfig(lr=2e-5, save_every=10**6, **kw))
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    try:
        rows = []
        if not args.skip_omni:
            encode_s = _encode_seconds(args.model, args.encoder, records, root / "cold-cache")
            metrics = run(
                "throughput", strategy="full", epochs=1, batch_size=args.batch_size, grad_accum=1, warmup_ratio=0.0
            )
            loop_s = sum(r["seconds"] for r in metrics)
            omni_s = omni_style(args.model, args.encoder, records, args.batch_size)
            rows = [
                ("textkeep, feature cache warm", n / loop_s),
                ("textkeep, incl. one-time encoding", n / (loop_s + encode_s)),
                ("LLaMA-Omni style (30 s pad, encoder every step)", n / omni_s),
            ]
        steps = {}
        for strategy in ("full", "layer-lr", "lora"):
            extra = {"importance": _placeholder_map(args.model, root / "map")} if strategy == "layer-lr" else {}
            metrics = run(
                strategy,
                strategy=strategy,
                max_steps=args.steps,
                batch_size=args.batch_size,
                grad_accum=args.grad_accum,
                **extra,
            )
            steps[strategy] = sum(r["seconds"] for r in metrics) / len(metrics)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print(f"\n{n} spoken instructions from {data}, {args.model} + {args.encoder}, {device}\n")
    if rows:
        print(f"| full fine-tuning, batch {args.batch_size}, one epoch | examples/s | × LLaMA-Omni style |")
        print("|---|---|---|")
        for name, ex_s in rows:
            print(f"| {name} | {ex_s:.2f} | {ex_s / rows[-1][1]:.1f} |")
        print()
    print(f"| strategy | s / optimizer step ({args.batch_size} × {args.grad_accum} examples, mean of {args.steps}) |")
    print("|---|---|")
    for strategy, s in steps.items():
        print(f"| {strategy} | {s:.2f} |")


if __name__ == "__main__":
    main()
