"""The paper's sizes on one GPU, numbers to a JSON: what `benchmarks/gpu_check.sh` runs (≤ 8 minutes on one H200).

    python benchmarks/gpu_check.py --out gpu_check.json        # on a GPU: Llama-3.2-1B and Llama-3.1-8B shapes
    python benchmarks/gpu_check.py --tiny --out check.json     # on a CPU: the same code at tiny shapes (the test)

1. **train**: a Llama-3.2-1B-shaped model (random init: shapes need no weights) trained by textkeep's own `fit`
   (Full-FT, bf16 mixed precision, fp32 master weights; text samples of a fixed length). tokens/s counts every
   position the LLM runs; MFU = 6 · parameters · tokens/s ÷ the chip's dense bf16 peak (--peak-tflops; H200: 989;
   with --tiny the bf16 matmul peak measured in this run). Target: MFU ≥ 40%.
2. **importance**: the Llama-3.1-8B-shaped importance pass (paper mode, bf16 weights, fp32 accumulator) against a
   plain forward+backward over the same batches (bench_importance.py's two passes), at each --importance-batches
   size: the whole pass's ratio and the per-batch cost's (the map's fixed cost split off). Target: ≤ 1.05.
3. **study**: the tiny study end to end (configs/study/tiny.yaml) with its wall time, when its data
   ($TEXTKEEP_DATA_DIR) is on the machine; else recorded as skipped, with why.

The first optimizer step and the first importance pass warm up (allocator, kernels) and are not timed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from argparse import Namespace
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

import bench_importance  # noqa: E402

bench_importance.SHAPES.setdefault("tiny", (64, 128, 2, 4, 2, 384, True))


class _Done(Exception):
    """Raised from fit's on_step after the last timed step: the check needs no checkpoint of a 1B model."""


def synthetic(n: int, words: int, seed: int = 0):
    from textkeep.model.speech_llm import Sample

    vocab = "the a of to and in is was for on that with as capital France Paris city river".split()
    g = torch.Generator().manual_seed(seed)
    pick = lambda k: " ".join(vocab[i] for i in torch.randint(len(vocab), (k,), generator=g).tolist())
    return [Sample(text=pick(words // 8), response=pick(words), id=f"syn{i}") for i in range(n)]


def train_check(shape: str, device: str, batch: int, words: int, steps: int, peak_tflops: float) -> dict:
    """tokens/s and MFU of `steps` Full-FT steps of textkeep's fit in bf16 (after one warm-up step)."""
    from textkeep.train.config import TrainConfig
    from textkeep.train.trainer import SampleList, fit

    model = bench_importance.build_model(Namespace(shape=shape, layers=0, dtype="fp32", device=device,
                                                   pretrained=False))  # fmt: skip
    samples = synthetic(batch * (steps + 1), words)
    positions = float(model.tokenize(samples).attention_mask.sum()) / len(samples)
    n_params = sum(p.numel() for p in model.llm.parameters())

    def on_step(step, _model):
        if step == steps + 1:
            raise _Done

    cfg = TrainConfig(strategy="full", lr=1e-5, batch_size=batch, grad_accum=1, max_steps=steps + 1,
                      warmup_ratio=0.0, precision="bf16", save_every=10**9)  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        try:
            fit(model, SampleList(samples), Path(tmp) / "run", cfg, on_step=on_step)
        except _Done:
            pass
        rows = [json.loads(x) for x in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    seconds = [r["seconds"] for r in rows[1:]]
    tok_s = batch * positions * len(seconds) / sum(seconds)
    return {
        "shape": shape,
        "parameters": n_params,
        "batch": batch,
        "positions_per_example": positions,
        "steps_timed": len(seconds),
        "s_per_step": sum(seconds) / len(seconds),
        "tokens_per_s": tok_s,
        "peak_tflops": peak_tflops,
        "mfu": 6 * n_params * tok_s / (peak_tflops * 1e12),
    }


def importance_check(shape: str, device: str, batches: list[int], n: int, dtype: str) -> list[dict]:
    """Importance (paper mode) against a plain forward+backward over the same samples, per batch size: the whole
    pass's ratio, and the per-batch cost's (timed on n and on n/2 samples, the difference; the map's fixed cost,
    allocating and copying out the fp32 accumulators, cancels), as bench_importance.py --marginal does."""
    args = Namespace(shape=shape, layers=0, dtype=dtype, device=device, pretrained=False)
    model = bench_importance.build_model(args)
    samples = synthetic(n, 160, seed=1)
    rows = []
    for b in batches:
        args.batch_size = b
        bench_importance.run("plain", model, samples, args)  # warm-up at this batch size
        t = {(kind, m): min(bench_importance.run(kind, model, samples[:m], args)[0] for _ in range(2))
             for kind in ("plain", "paper") for m in (n, n // 2)}  # fmt: skip
        per_batch = (t["paper", n] - t["paper", n // 2]) / (t["plain", n] - t["plain", n // 2])
        rows.append({"batch": b, "plain_s": t["plain", n], "importance_s": t["paper", n],
                     "ratio": t["paper", n] / t["plain", n], "per_batch_ratio": per_batch})  # fmt: skip
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return rows


def study_check() -> dict:
    data = os.environ.get("TEXTKEEP_DATA_DIR")
    if not data or not Path(data).is_dir():
        return {"skipped": "TEXTKEEP_DATA_DIR is not set to a data folder on this machine"}
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "textkeep.cli", "study", "--config", str(HERE.parent / "configs/study/tiny.yaml"),
             "--out", tmp], capture_output=True, text=True,
        )  # fmt: skip
        seconds = time.perf_counter() - started
        ok = done.returncode == 0 and (Path(tmp) / "report" / "results.json").is_file()
    return {"seconds": seconds, "ok": ok, "tail": "" if ok else done.stderr[-2000:]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on whatever device there is (the CPU test)")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the chip (H200: 989)")
    parser.add_argument("--train-batch", type=int, default=16)
    parser.add_argument("--train-words", type=int, default=700, help="response words (~1k positions per example)")
    parser.add_argument("--train-steps", type=int, default=5)
    parser.add_argument("--importance-batches", default="4,16,32")
    parser.add_argument("--importance-n", type=int, default=64)
    parser.add_argument("--skip", default="", help="comma-separated parts to leave out: train, importance, study")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    skip = set(filter(None, args.skip.split(",")))
    train_shape, importance_shape = ("tiny", "tiny") if args.tiny else ("llama-3.2-1b", "llama-3.1-8b")
    if args.tiny:
        from bench_train import matmul_peak

        args.peak_tflops = matmul_peak(torch.bfloat16, 512, 5) / 1e3
        args.train_batch, args.train_words, args.train_steps, args.importance_n = 2, 24, 2, 8
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
    }
    started = time.perf_counter()
    if "train" not in skip:
        result["train"] = train_check(train_shape, device, args.train_batch, args.train_words, args.train_steps,
                                      args.peak_tflops)  # fmt: skip
    if "importance" not in skip:
        batches = [int(b) for b in args.importance_batches.split(",")]
        dtype = "bf16" if device == "cuda" or not args.tiny else "fp32"
        result["importance"] = importance_check(importance_shape, device, batches, args.importance_n, dtype)
    if "study" not in skip:
        result["study"] = study_check()
    result["seconds"] = time.perf_counter() - started
    from textkeep.fileio import write_json

    write_json(args.out, result)
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
