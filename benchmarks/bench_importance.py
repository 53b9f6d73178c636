"""Cost of an importance pass against a plain forward+backward over the same batches.

    python benchmarks/bench_importance.py                      # CPU: SmolLM2-135M's shape cut to 2 layers, fp32
    python benchmarks/bench_importance.py --layers 0           # ... all 30 layers (slow on 2 cores)
    python benchmarks/bench_importance.py --pretrained         # the real smollm2-135m-instruct weights
    python benchmarks/bench_importance.py --pretrained --precision bf16   # ... both passes under bf16 autocast
    python benchmarks/bench_importance.py --device cuda --shape llama-3.2-1b --marginal
                                                               # random-init bf16 (or llama-3.1-8b)

Targets: time(importance) / time(plain) ≤ 1.05; peak memory of `paper` ≤ plain, of `abs`/`fisher` ≤ plain + one
fp32 copy of the parameters. With bf16 weights `paper` also keeps an fp32 accumulator, so its bound is that of abs.

Time: wall-clock and process CPU time, each the minimum over --repeats interleaved runs (the machine is shared; the
minimum is the least disturbed run, and CPU time does not count waiting for a core). One thread by default: with two
threads on two cores that other jobs also use, OpenMP threads spin waiting for a descheduled partner, and runs of
the same pass varied by 2× in both wall and CPU time.

Memory: the peak above what the process held just before the pass, one run per pass in a separate phase.
- CUDA: torch's allocator peak (max_memory_allocated, reset before the pass) minus what was allocated at the start.
- CPU: the kernel's RSS high-water mark (VmHWM, reset through /proc/self/clear_refs before the pass) minus the RSS at
  that moment, after handing glibc's free lists back to the kernel (malloc_trim), so that memory freed by an earlier
  pass cannot hide this pass's allocations. RSS counts every touched page, Python objects included. It is measured
  twice: under glibc's defaults (what a user sees; freed mid-sized blocks stay in the heap, so RSS also counts
  fragmentation), and with every allocation of 64 KiB or more served by mmap and returned on free (mallopt
  M_MMAP_THRESHOLD), where RSS follows the live tensors: the bounds are checked on this second measurement.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import os
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from textkeep.data.samples import length_grouped_batches  # noqa: E402
from textkeep.importance.compute import MODES, compute_importance  # noqa: E402

# hidden, intermediate, layers, heads, kv heads, vocab, tied embeddings
SHAPES = {
    "smollm2-135m": (576, 1536, 30, 9, 3, 49152, True),
    "llama-3.2-1b": (2048, 8192, 16, 32, 8, 128256, True),
    "llama-3.1-8b": (4096, 14336, 32, 32, 8, 128256, False),
}


def build_model(args):
    from textkeep.model.adaptor import SpeechAdaptor
    from textkeep.model.registry import is_prepared, resolve
    from textkeep.model.speech_llm import SpeechLLM, SpeechLLMConfig

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    if args.pretrained:
        return SpeechLLM.build("smollm2-135m-instruct", None, dtype=dtype).to(args.device)
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if is_prepared("smollm2-135m-instruct"):
        tok = AutoTokenizer.from_pretrained(resolve("smollm2-135m-instruct"))
    else:  # e.g. on a GPU box without the packaged weights: any tokenizer gives the same shapes
        from textkeep.model.tiny import build_tiny_tokenizer

        tok = build_tiny_tokenizer()
    hidden, inter, layers, heads, kv, vocab, tied = SHAPES[args.shape]
    config = LlamaConfig(
        vocab_size=max(vocab, len(tok)),
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=args.layers or layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        tie_word_embeddings=tied,
        rope_theta=500000.0,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    with torch.device(args.device):  # built in place: an 8B model never exists in fp32 on the host
        llm = LlamaForCausalLM._from_config(config, dtype=dtype).eval()
        adaptor = SpeechAdaptor(1, hidden, 5, 8).to(dtype)
    return SpeechLLM(llm, tok, None, None, adaptor, SpeechLLMConfig(llm=f"random {args.shape}", encoder=""))


def load_samples(args, model):
    from textkeep.data.samples import make_samples

    if args.data != "synthetic":
        from textkeep.data.datasets import load_dataset

        return make_samples(model, load_dataset(args.data)[: args.n], "text", progress=False)
    from textkeep.model.speech_llm import Sample

    rng = random.Random(0)  # Alpaca-like lengths: 10-60 word questions, 40-200 word answers
    words = "the a of to and in is was for on that with as system user assistant capital France Paris".split()
    text = lambda lo, hi: " ".join(rng.choice(words) for _ in range(rng.randint(lo, hi)))
    return [Sample(text=text(10, 60), response=text(40, 200), id=f"syn{i}") for i in range(args.n)]


def plain_pass(model, samples, batch_size, precision="fp32"):
    """What training costs per step without an optimizer: forward, backward, gradients summed in .grad."""
    from textkeep.runtime import autocast

    model.requires_grad_(False)
    model.llm.requires_grad_(True)
    model.eval()
    for b in length_grouped_batches(samples, batch_size, model.config.adaptor_k):
        with autocast(precision, model.device):
            loss, n = model.loss_sum(model.tokenize([samples[i] for i in b]))
        loss.backward()
    return [p.grad for p in model.llm.parameters()]  # held until measured, like the importance map


class Peak:
    """Peak memory above the level at entry (see the module docstring for what is counted)."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    @staticmethod
    def _status(key: str) -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

    def __enter__(self):
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            LIBC.malloc_trim(0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            self.start = self._status("VmRSS")
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated() - self.start
        else:
            self.bytes = self._status("VmHWM") - self.start


LIBC = ctypes.CDLL("libc.so.6")
M_MMAP_THRESHOLD = -3


def run(kind, model, samples, args, peak=None):
    """One pass: (wall s, CPU s, peak bytes or None)."""
    with peak or contextlib.nullcontext():
        started, cpu_started = time.perf_counter(), time.process_time()
        out = (
            plain_pass(model, samples, args.batch_size, getattr(args, "precision", "fp32"))
            if kind == "plain"
            else compute_importance(
                model,
                samples,
                mode=kind,
                batch_size=args.batch_size,
                progress=False,
                precision=getattr(args, "precision", "fp32"),
            )  # fmt: skip
        )
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    del out
    model.llm.zero_grad(set_to_none=True)
    return seconds, cpu_seconds, peak.bytes if peak else None


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--shape", choices=list(SHAPES), default="smollm2-135m")
    p.add_argument(
        "--layers",
        type=int,
        default=None,
        help="decoder layers (default: 2 on CPU, the shape's on GPU; 0 = the shape's)",
    )
    p.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="default: fp32 on CPU, bf16 on GPU")
    p.add_argument(
        "--precision",
        choices=["fp32", "bf16"],
        default="fp32",
        help="bf16: both passes under bf16 autocast (fp32 weights)",
    )
    p.add_argument(
        "--pretrained", action="store_true", help="the real smollm2-135m-instruct instead of a random-init shape"
    )
    p.add_argument(
        "--data",
        default=None,
        help="a data set name or file (default: alpaca when TEXTKEEP_DATA_DIR is set, else synthetic)",
    )
    p.add_argument("--n", type=int, default=8, help="examples")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="CPU threads")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument(
        "--marginal", action="store_true", help="also time every pass on half the examples: per-batch vs fixed cost"
    )
    args = p.parse_args()
    on_gpu = args.device.startswith("cuda")
    args.layers = args.layers if args.layers is not None else (None if on_gpu else 2)
    args.dtype = args.dtype or ("bf16" if on_gpu else "fp32")
    args.data = args.data or ("alpaca" if os.environ.get("TEXTKEEP_DATA_DIR") else "synthetic")
    if not on_gpu:
        torch.set_num_threads(args.threads)

    model = build_model(args)
    samples = load_samples(args, model)
    n_params = sum(t.numel() for t in model.llm.parameters())
    n_tokens = sum(model.tokenize([s]).input_ids.shape[1] for s in samples)
    name = (
        "smollm2-135m-instruct (pretrained)"
        if args.pretrained
        else f"random-init {args.shape}, {model.llm.config.num_hidden_layers} layers"
    )
    print(f"{name}: {n_params / 1e6:.1f}M parameters, {args.dtype}, {args.device}, {torch.get_num_threads()} threads")
    print(f"data: {args.data}, {len(samples)} examples ({n_tokens} tokens), batch size {args.batch_size}", flush=True)

    kinds = ["plain", *args.modes.split(",")]
    run("plain", model, samples, args)  # warm-up: first-call allocations and kernel selection
    wall, cpu = {k: [] for k in kinds}, {k: [] for k in kinds}
    for r in range(args.repeats):
        for k in kinds[r % len(kinds) :] + kinds[: r % len(kinds)]:  # rotated, so no pass always runs first
            w, c, _ = run(k, model, samples, args)
            wall[k].append(w)
            cpu[k].append(c)
    # A map's fixed cost (allocating the accumulators, scoring, copying every score to the host) does not grow with
    # the data; the per-batch cost does. Their split: the same passes on the first half of the examples.
    half = samples[: len(samples) // 2]
    wall_half = (
        {k: min(run(k, model, half, args)[0] for _ in range(args.repeats)) for k in kinds} if args.marginal else {}
    )
    peaks = {"glibc": {}, "tensors": {}}
    for setting, table in peaks.items():
        if setting == "tensors" and not on_gpu:
            LIBC.mallopt(M_MMAP_THRESHOLD, 64 * 1024)
        for k in kinds:
            table[k] = run(k, model, samples, args, Peak(args.device))[2]
        if on_gpu:  # the allocator's own count needs no second measurement
            peaks["tensors"] = table
            break

    fp32_copy = n_params * 4
    mib = lambda b: b / 2**20
    plain_m = peaks["tensors"]["plain"]
    slack = 0.01 * fp32_copy  # page granularity and small Python objects
    print(f"\none fp32 copy of the parameters: {mib(fp32_copy):.1f} MiB (bounds allow {mib(slack):.1f} MiB of slack)")
    print(
        f"{'pass':7} {'wall s':>7} {'÷plain':>7} {'cpu s':>7} {'÷plain':>7} "
        f"{'peak MiB':>9} {'−plain':>7} {'glibc MiB':>10}  memory bound"
    )
    for k in kinds:
        bound = plain_m + (0 if k == "paper" and args.dtype == "fp32" else fp32_copy)
        m = peaks["tensors"][k]
        verdict = (
            ""
            if k == "plain"
            else f"{'≤ plain' if bound == plain_m else '≤ plain + fp32 copy'}: {'ok' if m <= bound + slack else 'OVER'}"
        )
        print(
            f"{k:7} {min(wall[k]):7.2f} {min(wall[k]) / min(wall['plain']):7.3f} "
            f"{min(cpu[k]):7.2f} {min(cpu[k]) / min(cpu['plain']):7.3f} "
            f"{mib(m):9.1f} {mib(m - plain_m):7.1f} "
            f"{mib(peaks['glibc'][k]) if not on_gpu else float('nan'):10.1f}  {verdict}"
        )
    if wall_half:
        d_plain = min(wall["plain"]) - wall_half["plain"]
        print(
            f"\nper-batch (marginal) cost, from {len(samples)} vs {len(half)} examples: "
            "wall ÷ plain's, and the fixed cost per map"
        )
        for k in kinds[1:]:
            d = min(wall[k]) - wall_half[k]
            fixed = min(wall[k]) - d * 2 - (min(wall["plain"]) - d_plain * 2)
            print(f"{k:7} marginal ÷plain {d / d_plain:6.3f}   fixed cost beyond plain's {fixed:6.2f} s")
    print("\nwall s of every run: " + "; ".join(f"{k} {', '.join(f'{t:.2f}' for t in v)}" for k, v in wall.items()))
    print("cpu s of every run: " + "; ".join(f"{k} {', '.join(f'{t:.2f}' for t in v)}" for k, v in cpu.items()))


if __name__ == "__main__":
    main()
