"""TTS speed per voice: utterances per second and real-time factor (synthesis seconds / audio seconds).

    .venv/bin/python benchmarks/bench_tts.py [--voices piper:joe flite:kal ...] [--repeats 3]

Each voice speaks the same 10 sentences (8-15 words) one at a time ("1 stream") and with two threads
("2 streams", as speak() runs). The best of --repeats passes is kept, since other load only slows a pass down.
Model loading is excluded (one warm-up sentence first). "cores" is CPU time / wall time: 2 streams reaching
only ~1 core means something else held the other core.
"""

from __future__ import annotations

import argparse
import os
import time
from concurrent.futures import ThreadPoolExecutor

from textkeep.data.tts import SAMPLE_RATE, VOICES, get_voice, synthesize

SENTENCES = [
    "The committee will meet again next week to discuss the new budget proposal.",
    "Please remember to water the plants while I am away on vacation.",
    "Scientists have discovered a new species of frog in the rainforest.",
    "The train to the city leaves every half hour from the main station.",
    "She spent the whole afternoon reading a novel under the old oak tree.",
    "Could you tell me how to get to the nearest post office from here?",
    "The children built a large sandcastle on the beach before the tide came in.",
    "Our team finally finished the project two days ahead of the deadline.",
    "He ordered a cup of coffee and a slice of apple pie at the diner.",
    "Heavy rain is expected tomorrow, so bring an umbrella if you go out.",
]


def _cpu() -> float:
    t = os.times()  # children: flite and espeak-ng run as subprocesses
    return t.user + t.system + t.children_user + t.children_system


def one_pass(voice: str, streams: int) -> tuple[float, float, float]:
    """(wall seconds, audio seconds, CPU cores busy on average) for all SENTENCES."""
    start, cpu = time.perf_counter(), _cpu()
    with ThreadPoolExecutor(streams) as ex:
        audio = list(ex.map(lambda text: synthesize(text, voice), SENTENCES))
    wall = time.perf_counter() - start
    return wall, sum(len(a) for a in audio) / SAMPLE_RATE, (_cpu() - cpu) / wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--voices", nargs="+", default=list(VOICES))
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    print(f"{'voice':<12} {'streams':>7} {'utt/s':>7} {'RTF':>7} {'audio s':>8} {'cores':>6} {'load s':>7}")
    for voice in args.voices:
        start = time.perf_counter()
        get_voice(voice).load()
        synthesize(SENTENCES[0], voice)
        load = time.perf_counter() - start
        for streams in (1, 2):
            wall, audio, cores = min(one_pass(voice, streams) for _ in range(args.repeats))
            rate, rtf = len(SENTENCES) / wall, wall / audio
            print(f"{voice:<12} {streams:>7} {rate:>7.2f} {rtf:>7.3f} {audio:>8.1f} {cores:>6.2f} {load:>7.2f}")


if __name__ == "__main__":
    main()
