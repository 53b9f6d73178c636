"""Batched vs one-at-a-time QA evaluation, same answers required.

    python benchmarks/bench_eval.py [--n 100] [--batch-size 32] [--max-new-tokens 64]

SmolLM2-135M-Instruct (+ Whisper base and an untrained adaptor for S2T) on the first n LLaMA Questions, T2T and
S2T, side by side in one run. Speech features are computed once beforehand (both runs read the same frames), so
the ratio is about generation alone. Prints seconds, questions/s, the speed-up and whether every answer matched.
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
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    from textkeep.data.datasets import load_dataset
    from textkeep.data.samples import length_grouped_batches, make_samples
    from textkeep.model.speech_llm import SpeechLLM

    model = SpeechLLM.build("smollm2-135m-instruct", "whisper-base")
    records = load_dataset("llama-questions")[: args.n]
    rows = []
    for mode, modality in (("t2t", "text"), ("s2t", "speech")):
        samples = make_samples(model, records, modality, with_response=False, progress=False)
        started = time.perf_counter()
        batched: dict[int, str] = {}
        for idx in length_grouped_batches(samples, args.batch_size):
            for i, answer in zip(idx, model.generate([samples[i] for i in idx], max_new_tokens=args.max_new_tokens)):
                batched[i] = answer
        t_batched = time.perf_counter() - started
        started = time.perf_counter()
        single = [model.generate([s], max_new_tokens=args.max_new_tokens)[0] for s in samples]
        t_single = time.perf_counter() - started
        same = sum(batched[i] == single[i] for i in range(len(samples)))
        rows.append((mode, t_single, t_batched, same))

    print(
        f"{args.n} LLaMA Questions, batch {args.batch_size}, greedy, max {args.max_new_tokens} new tokens, "
        f"{torch.get_num_threads()} threads\n"
    )
    print("| mode | one at a time (s) | batched (s) | q/s batched | speed-up | identical answers |")
    print("|---|---|---|---|---|---|")
    for mode, t1, tb, same in rows:
        print(f"| {mode} | {t1:.1f} | {tb:.1f} | {args.n / tb:.2f} | {t1 / tb:.1f}× | {same}/{args.n} |")


if __name__ == "__main__":
    main()
