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
Then, for each variant (a precision with options, below) and strategy (the paper's full, layer-lr, lora and those
beyond it: masked, anchor, layer-lr+lora, kd-text), seconds per optimizer step (B × grad_accum examples) via
`train()`, tokens/s over every position the LLM runs, and the fraction of this machine's training limit: 6 FLOPs
per LLM parameter per token at the bf16 matmul peak measured in the same run (a 2048² matmul, at the start and at
the end; the higher). The strategies that read a map get a seeded random placeholder map with the model's
parameter names (timing does not depend on its values). The memory that masked and anchor hold beyond Full-FT is
counted from their tensors, against one fp32 copy of the LLM.

Each variant is a precision with options: `bf16+compile` compiles each decoder layer (TrainConfig.compile; the
one-time compilation is left out of s/step and printed apart), `bf16+sdpa` / `+eager` sets the attention kernel
(default auto: eager on a CPU), and `+noshare` turns off the prompt head's shared KV in frozen-LLM passes
(`--strategies adaptor`, align's case: the LLM frozen, only the adaptor trains). `--compile-strategies` names the
strategies those variants run (default full and lora, the target's). Every run's first step is a warm-up
(allocations, compilation) and is not timed.

Data: the synthesized spoken Alpaca when `textkeep speak alpaca` (or alpaca-gpt4) has made it, else LLaMA
Questions' recorded WAVs ($TEXTKEEP_DATA_DIR), question → answer.
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

    for name in ("alpaca", "alpaca-gpt4"):
        manifest = spoken_manifest(name)
        if manifest.is_file():
            records = [r for r in attach_audio(load_dataset(name), manifest) if r.audio is not None]
            if len(records) >= n:
                return name, manifest, records[:n]
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


def _train_job(out: Path, common: dict, kw: dict, threads: int | None, share_head: bool = True) -> list[dict]:
    """One `train()` run (in its own process); its metrics rows."""
    if threads:
        torch.set_num_threads(threads)
    import textkeep.model.speech_llm as speech_llm

    speech_llm.SHARE_HEAD = share_head
    from transformers.utils import logging as hf_logging

    from textkeep.train.config import TrainConfig
    from textkeep.train.trainer import train

    hf_logging.set_verbosity_error()
    out = train(out=out, **common, train=TrainConfig(lr=2e-5, save_every=10**6, **kw))
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _placeholder_map(model_name: str, root: Path) -> Path:
    """An importance map with the LLM's parameter names and shapes (seeded uniform values) and made-up layer sums."""
    from safetensors.torch import save_file

    from textkeep.model.speech_llm import load_llm

    llm, _ = load_llm(model_name)
    n_layers = llm.config.num_hidden_layers
    root.mkdir(parents=True, exist_ok=True)
    if (root / "summary.json").is_file():
        return root
    g = torch.Generator().manual_seed(0)
    scores = {n: torch.rand(p.shape, generator=g) for n, p in llm.named_parameters()}
    save_file(scores, str(root / "importance.safetensors"))
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


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 20) -> float:
    """GFLOP/s of an n×n matmul in `dtype` on this device: the ceiling a training step is measured against."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync()
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync()
    return 2 * n**3 * repeats / (time.perf_counter() - started) / 1e9


def _tokens_per_example(model_name: str, encoder: str, records, policy: str) -> tuple[float, int]:
    """The mean number of positions the LLM runs per example (prompt, speech embeddings, response), and the LLM's
    parameter count."""
    from textkeep.data.samples import make_samples
    from textkeep.model.speech_llm import SpeechLLM

    model = SpeechLLM.build(model_name, encoder, encoder_policy=policy)
    samples = make_samples(model, records, "speech", progress=False)
    batch = model.tokenize(samples)
    return float(batch.attention_mask.sum()) / len(samples), sum(p.numel() for p in model.llm.parameters())


def guard_bytes(model_name: str, map_dir: Path) -> dict[str, float]:
    """What masked and anchor hold beyond Full-FT, as a fraction of one fp32 copy of the LLM."""
    from textkeep.model.speech_llm import load_llm
    from textkeep.train.guarded import Anchor, GradMask

    llm, _ = load_llm(model_name)
    copy_bytes = 4 * sum(p.numel() for p in llm.parameters())
    mask = GradMask(llm, map_dir, 0.05)
    anchor = Anchor(llm, map_dir, 1.0)
    held = {
        "masked": sum(m.numel() * m.element_size() for _, m in mask.masks),
        "anchor": sum(w.numel() * w.element_size() + a.numel() * a.element_size() for _, w, a in anchor.terms),
    }
    return {k: v / copy_bytes for k, v in held.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=32, help="spoken instructions")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--encoder", default="whisper-base")
    parser.add_argument("--encoder-policy", default="pad30", help="pad30 (the paper's) or trim (align's)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--grad-accum", type=int, default=4, help="for the per-strategy step timing")
    parser.add_argument("--steps", type=int, default=1, help="optimizer steps timed per strategy")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each variant, interleaved; the mean is shown")
    parser.add_argument("--skip-omni", action="store_true", help="only the per-strategy timing")
    parser.add_argument(
        "--strategies", default="full,layer-lr,lora,masked,anchor,layer-lr+lora,kd-text", help="comma-separated"
    )
    parser.add_argument(
        "--variants",
        default="fp32+sdpa,fp32,bf16,bf16+sdpa,bf16+compile",
        help="comma-separated precision[+compile][+sdpa|+eager]",
    )
    parser.add_argument(
        "--compile-strategies", default="full,lora", help="strategies the +compile/+attention variants run"
    )
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
    from textkeep.train.config import NEEDS_MAP

    data, manifest, records = _records(args.n)
    n = len(records)
    root = Path(tempfile.mkdtemp(prefix="textkeep-bench-train-"))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    common = dict(
        model=args.model, encoder=args.encoder, data=data, spoken=manifest, limit=n, encoder_policy=args.encoder_policy
    )

    def run(name: str, share: bool = True, **kw) -> list[dict]:
        # Each run in a fresh process: in one long-lived process later runs measured up to 35% slower (the same
        # 2048² matmul did too), which would bias whichever variant runs last.
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
            return pool.submit(_train_job, root / name, common, kw, args.threads, share).result()

    peak = {"bf16": matmul_peak(torch.bfloat16), "fp32": matmul_peak(torch.float32)}
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
        steps, compile_s = {}, {}
        strategies = args.strategies.split(",")
        # --repeats interleaves the variants (a, b, a, b): the machine's speed drifts over minutes
        for variant, r in [(v, r) for r in range(args.repeats) for v in args.variants.split(",")]:
            precision, *opts = variant.split("+")
            names = strategies if not opts else [s for s in args.compile_strategies.split(",") if s in strategies]
            for strategy in names:
                extra = {"importance": _placeholder_map(args.model, root / "map")} if strategy in NEEDS_MAP else {}
                attention = next((o for o in opts if o in ("sdpa", "eager")), "auto")
                metrics = run(
                    f"{strategy}-{variant}-{r}",
                    share="noshare" not in opts,
                    strategy=strategy,
                    max_steps=args.steps + 1,  # the first step warms up (allocations; compilation with +compile)
                    batch_size=args.batch_size,
                    grad_accum=args.grad_accum,
                    precision=precision,
                    attention=attention,
                    compile="compile" in opts,
                    **extra,
                )
                if "compile" in opts:
                    compile_s[strategy, variant] = metrics[0]["seconds"] - metrics[-1]["seconds"]
                metrics = metrics[1:]
                steps.setdefault((strategy, variant), []).append(sum(m["seconds"] for m in metrics) / len(metrics))
        per_example, n_params = _tokens_per_example(args.model, args.encoder, records, args.encoder_policy)
        # the peak, again at the end: the higher of the two (a long run's process measured up to 20% lower)
        peak = {k: max(v, matmul_peak(dtype)) for (k, v), dtype in zip(peak.items(), (torch.bfloat16, torch.float32))}
        held = guard_bytes(args.model, _placeholder_map(args.model, root / "map")) if set(strategies) & {
            "masked", "anchor"} else {}  # fmt: skip
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print(f"\n{n} spoken instructions from {data}, {args.model} + {args.encoder}, {device}\n")
    if rows:
        print(f"| full fine-tuning, batch {args.batch_size}, one epoch | examples/s | × LLaMA-Omni style |")
        print("|---|---|---|")
        for name, ex_s in rows:
            print(f"| {name} | {ex_s:.2f} | {ex_s / rows[-1][1]:.1f} |")
        print()
    limit = peak["bf16"] * 1e9 / (6 * n_params)
    print(
        f"matmul peak (2048²): bf16 {peak['bf16']:.0f} GFLOP/s, fp32 {peak['fp32']:.0f} GFLOP/s; training limit "
        f"6 × {n_params / 1e6:.0f}M parameters per token at the bf16 peak = {limit:.0f} tokens/s; "
        f"{per_example:.0f} positions per example\n"
    )
    step_examples = args.batch_size * args.grad_accum
    spread = {key: f" ({min(v):.2f}–{max(v):.2f})" if len(v) > 1 else "" for key, v in steps.items()}
    steps = {key: sum(v) / len(v) for key, v in steps.items()}
    print(
        f"| strategy | variant | s / step ({step_examples} examples, mean of {args.steps} steps × {args.repeats} runs) "
        "| examples/s | tokens/s | "
        "× Full-FT's time, same variant | × fp32's speed | fraction of the limit |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for (strategy, variant), s in steps.items():
        tok_s = step_examples * per_example / s
        vs_full = f"{s / steps[('full', variant)]:.2f}" if ("full", variant) in steps else "–"
        ref = next(((strategy, v) for v in ("fp32", "fp32+eager") if (strategy, v) in steps), None)
        vs_fp32 = f"{steps[ref] / s:.2f}" if ref else "–"
        print(
            f"| {strategy} | {variant} | {s:.2f}{spread[strategy, variant]} | {step_examples / s:.2f} | {tok_s:.0f} "
            f"| {vs_full} | {vs_fp32} "
            f"| {tok_s / limit:.2f} |"
        )
    for (strategy, variant), s in compile_s.items():
        print(f"\n{strategy} {variant}: one-time compilation {s:.0f} s", end="")
    for name, frac in held.items():
        print(f"\n{name} holds {frac:.2f} of one fp32 copy of the LLM beyond Full-FT (bound: 1.00)", end="")
    print()


if __name__ == "__main__":
    main()
