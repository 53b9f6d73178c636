"""Batched vs one-at-a-time QA evaluation, and how many answers each gives as one at a time does.

    python benchmarks/bench_eval.py [--n 100] [--batch-size 32] [--max-new-tokens 64] [--model CKPT]
                                    [--precision fp32|bf16] [--refill 4]

SmolLM2-135M-Instruct (+ Whisper base and an untrained adaptor for S2T, or --model: an aligned or trained
checkpoint, whose answers have realistic lengths) on the first n LLaMA Questions, T2T and S2T, side by side in one
run: one at a time, batched (fixed batches; a finished row leaves, eval's way), and batched with refilled slots
(--refill batches of prompts share one running batch whose freed slots take waiting prompts). Speech features are
computed once beforehand (every run reads the same frames), so the ratios are about generation alone. Prints
seconds, questions/s, the speed-ups and how many answers match one at a time's (all of them in fp32; in bf16 a
batch's other matmul shapes round differently, and near-ties tip).
"""

from __future__ import annotations

import argparse
import os
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--model", default=None, help="a textkeep checkpoint (default: the base LLM, fresh adaptor)")
    parser.add_argument("--precision", default="fp32", help="fp32 | bf16 | auto (runtime.autocast)")
    parser.add_argument("--refill", type=int, default=4, help="batches of prompts that share one batch's slots")
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    from textkeep.data.datasets import load_dataset
    from textkeep.data.samples import length_grouped_batches, make_samples
    from textkeep.model.speech_llm import SpeechLLM, load_speech_llm
    from textkeep.runtime import autocast

    model = load_speech_llm(args.model) if args.model else SpeechLLM.build("smollm2-135m-instruct", "whisper-base")
    model.eval()
    records = load_dataset("llama-questions")[: args.n]
    rows = []
    for mode, modality in (("t2t", "text"), ("s2t", "speech")):
        samples = make_samples(model, records, modality, with_response=False, progress=False)
        n, b, budget = len(samples), args.batch_size, args.max_new_tokens
        order = [i for idx in length_grouped_batches(samples, b) for i in idx]

        def run(chunk: int, slots: int | None):
            out: dict[int, str] = {}
            started = time.perf_counter()
            with autocast(args.precision, model.device):
                for start in range(0, n, chunk):
                    idx = order[start : start + chunk]
                    out.update(zip(idx, model.generate([samples[i] for i in idx], budget, slots=slots)))
            return [out[i] for i in range(n)], time.perf_counter() - started

        single, t_single = run(1, None)
        batched, t_batched = run(b, None)
        refilled, t_refill = run(args.refill * b, b)
        same = lambda got: sum(x == y for x, y in zip(got, single))
        rows.append((mode, t_single, t_batched, t_refill, same(batched), same(refilled)))

    print(
        f"{args.n} LLaMA Questions, {args.model or 'base LLM + fresh adaptor'}, {args.precision}, "
        f"batch {args.batch_size} "
        f"(refill: {args.refill} batches share {args.batch_size} slots), greedy, max {args.max_new_tokens} new tokens, "
        f"{torch.get_num_threads()} threads\n"
    )
    print(
        "| mode | one at a time (s) | batched (s) | refilled (s) | batched × | refilled × "
        "| identical: batched, refilled |"
    )
    print("|---|---|---|---|---|---|---|")
    for mode, t1, tb, tr, sb, sr in rows:
        print(
            f"| {mode} | {t1:.1f} | {tb:.1f} | {tr:.1f} | {t1 / tb:.1f} | {t1 / tr:.1f} "
            f"| {sb}/{args.n}, {sr}/{args.n} |"
        )


if __name__ == "__main__":
    main()
