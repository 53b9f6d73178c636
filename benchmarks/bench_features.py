"""Speech features: encoder once + cache vs recomputing every epoch, and the two encoder input policies.

    python benchmarks/bench_features.py [--n 200] [--encoder whisper-base] [--batch-size 8]

Side by side in one run, on real LLaMA Questions WAVs ($TEXTKEEP_DATA_DIR), cycled to n utterances:
- pad30 vs trim: encoder seconds per utterance (load + log-mel + encoder);
- one epoch's speech input from a warm cache vs recomputed: seconds per utterance, their ratio, the projection to
  an epoch of 1,000 spoken queries, and the cache's size on disk.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=200, help="utterances per measurement")
    parser.add_argument("--encoder", default="whisper-base")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    from textkeep.data.datasets import load_dataset
    from textkeep.data.features import FeatureCache
    from textkeep.data.records import Record
    from textkeep.model.audio import load_audio
    from textkeep.model.speech_llm import SpeechLLM

    questions = load_dataset("llama-questions")
    records = [questions[i % len(questions)] for i in range(args.n)]
    seconds_of_audio = sum(len(load_audio(r.audio)) for r in records) / 16000
    model = SpeechLLM.build("tiny-llama", args.encoder)  # the LLM plays no part here

    def recompute(policy: str) -> float:
        model.config.encoder_policy = policy
        started = time.perf_counter()
        for i in range(0, len(records), args.batch_size):
            model.encode_audio([load_audio(r.audio) for r in records[i : i + args.batch_size]])
        return (time.perf_counter() - started) / len(records)

    per_utt = {policy: recompute(policy) for policy in ("pad30", "trim")}

    model.config.encoder_policy = "pad30"
    root = Path(tempfile.mkdtemp(prefix="textkeep-bench-"))
    try:
        # Unique files so every utterance is its own cache entry, as in a real training set.
        unique = []
        for i, r in enumerate(records):
            path = root / "wav" / f"{i}.wav"
            path.parent.mkdir(parents=True, exist_ok=True)
            data = bytearray(Path(r.audio).read_bytes())
            data += i.to_bytes(4, "little")  # a trailing byte pattern makes each file's hash unique
            path.write_bytes(bytes(data))
            unique.append(Record(id=str(i), instruction=r.instruction, audio=path))
        cache = FeatureCache(model, root=root / "cache")
        started = time.perf_counter()
        cache.frames(unique, batch_size=args.batch_size, progress=False)
        fill = (time.perf_counter() - started) / len(unique)
        started = time.perf_counter()
        cache.frames(unique, batch_size=args.batch_size, progress=False)
        warm = (time.perf_counter() - started) / len(unique)
        size = sum(p.stat().st_size for p in (root / "cache").rglob("*.safetensors"))
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print(
        f"{args.n} utterances ({seconds_of_audio / args.n:.1f} s of audio each on average), encoder {args.encoder}, "
        f"batch {args.batch_size}, {torch.get_num_threads()} threads\n"
    )
    print("| encoder input | s / utterance | × faster than pad30 |")
    print("|---|---|---|")
    for policy, t in per_utt.items():
        print(f"| {policy} | {t:.3f} | {per_utt['pad30'] / t:.2f} |")
    print("\n| speech input per epoch | s / utterance | epoch of 1,000 (projected) |")
    print("|---|---|---|")
    print(f"| recompute every epoch (pad30) | {per_utt['pad30']:.4f} | {1000 * per_utt['pad30']:.0f} s |")
    print(f"| first epoch, filling the cache | {fill:.4f} | {1000 * fill:.0f} s |")
    print(f"| warm cache | {warm:.4f} | {1000 * warm:.1f} s |")
    print(
        f"\nwarm cache vs recompute: {per_utt['pad30'] / warm:.0f}× faster; "
        f"cache on disk {size / args.n / 1024:.0f} KiB per utterance "
        f"({size / args.n * 1000 / 2**20:.0f} MiB per 1,000)"
    )


if __name__ == "__main__":
    main()
