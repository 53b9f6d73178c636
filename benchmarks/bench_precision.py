"""Which precision the CPU should default to: bf16 against fp32 on what the study measures, side by side in one run.

    python benchmarks/bench_precision.py [--steps 200] [--aligned runs/align/ctc-22k-kd] [--out runs/bench-precision]

1. **Loss curves.** Full-FT `train()` for --steps steps (spoken Alpaca, batch 4, lr 2e-5, the study's pad30 policy)
   in fp32 with seed 0 and in bf16 with seeds 0 and 1. A seed sets the data order and the adaptor's init, so
   bf16-0 against fp32-0 is the precision's effect and bf16-1 against bf16-0 the seed noise it is judged by: the
   mean |Δ| of the losses' 20-step moving means, and of the last 20 steps' mean.
2. **Importance.** The base LLM's Taylor map (paper mode, text inputs) on --map-examples Alpaca examples in both:
   Spearman of the 30-layer profile (target ≥ 0.99), top-1% and top-5% IoU over every LLM parameter.
3. **Greedy answers** on 100 questions of the aligned model's held-out slice (its own training questions, never
   trained on; no test set): T2T (the frozen LLM) and S2T (the aligned model), the count of identical answers, and
   bf16's accuracy minus fp32's with a paired 95% bootstrap interval.

Writes OUT/precision.png (the curves) and OUT/precision.md (the tables). Training runs already complete in OUT are
read back, not retrained (their metrics hold their measured times).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np


def _moving(x: list[float], w: int = 20) -> np.ndarray:
    x = np.asarray(x, dtype=float)
    return np.convolve(x, np.ones(w) / w, mode="valid") if len(x) >= w else x


def curves(out: Path, steps: int, n_examples: int) -> dict[str, list[dict]]:
    """The three Full-FT runs' metrics rows, trained (or read back) into OUT/<precision>-seed<k>."""
    from textkeep.train.config import TrainConfig
    from textkeep.train.trainer import train

    runs = {}
    for precision, seed in (("fp32", 0), ("bf16", 0), ("bf16", 1)):
        name = f"{precision}-seed{seed}"
        run = out / name
        if not (run / "model").is_dir():
            cfg = TrainConfig(
                strategy="full", lr=2e-5, batch_size=4, grad_accum=1, max_steps=steps, seed=seed,
                precision=precision, save_every=steps,
            )  # fmt: skip
            train(data="alpaca", limit=n_examples, out=run, resume=(run / "train_config.json").is_file(), train=cfg)
        runs[name] = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return runs


def importance_agreement(n: int) -> dict:
    """Layer-profile Spearman and top-1/5% IoU of the base LLM's map in bf16 against fp32, with their seconds."""
    from textkeep.data.datasets import load_dataset
    from textkeep.data.samples import make_samples
    from textkeep.importance.compute import compute_importance
    from textkeep.importance.maps import layer_sums
    from textkeep.importance.shift import profile_shift, topk_ious
    from textkeep.model.speech_llm import SpeechLLM

    model = SpeechLLM.build("smollm2-135m-instruct", "whisper-base")
    samples = make_samples(model, load_dataset("alpaca")[:n], "text", progress=False)
    maps, seconds = {}, {}
    for precision in ("fp32", "bf16"):
        started = time.perf_counter()
        maps[precision] = compute_importance(model, samples, batch_size=4, progress=False, precision=precision)
        seconds[precision] = time.perf_counter() - started
    shift = profile_shift(layer_sums(maps["fp32"]), layer_sums(maps["bf16"]))
    names = list(maps["fp32"].scores)
    ious = topk_ious(maps["fp32"].scores, maps["bf16"].scores, names, [1, 5])
    return {"spearman": shift["spearman"], "js": shift["js_divergence"], "iou1": ious[1], "iou5": ious[5],
            "seconds": seconds, "n": n}  # fmt: skip


def answer_agreement(aligned: Path, n: int) -> dict:
    """Identical greedy answers and the paired accuracy difference, bf16 − fp32, for T2T and S2T."""
    from textkeep.data.records import Record
    from textkeep.data.samples import make_samples
    from textkeep.eval.scoring import has_answer
    from textkeep.model.speech_llm import load_speech_llm
    from textkeep.report.verdicts import paired_bootstrap
    from textkeep.train.align import s2t_on

    records = [Record.from_json(json.loads(x)) for x in (aligned / "heldout.jsonl").read_text().splitlines()][:n]
    model = load_speech_llm(str(aligned / "model"))
    frames = [s.speech for s in make_samples(model, records, "speech", with_response=False, progress=False)]
    rows = {}
    for mode in ("t2t", "s2t"):
        got = {}
        for precision in ("fp32", "bf16"):
            started = time.perf_counter()
            answers = s2t_on(model, records, frames, 32, 32, precision, text=mode == "t2t")["answers"]
            got[precision] = (answers, time.perf_counter() - started)
        (a32, s32), (a16, s16) = got["fp32"], got["bf16"]
        hit = {p: {r.id: has_answer(a, r.answers) for a, r in zip(got[p][0], records)} for p in got}
        rows[mode] = {
            "identical": sum(x == y for x, y in zip(a32, a16)),
            "n": len(records),
            "acc_fp32": float(np.mean(list(hit["fp32"].values()))),
            "acc_bf16": float(np.mean(list(hit["bf16"].values()))),
            "diff": paired_bootstrap(hit["bf16"], hit["fp32"]),
            "seconds": {"fp32": s32, "bf16": s16},
        }
    return rows


def plot(runs: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from textkeep.fileio import atomic_path

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, rows in runs.items():
        loss = [r["loss"] for r in rows]
        ax.plot(range(1, len(loss) + 1), loss, alpha=0.2, lw=0.8)
        smooth = _moving(loss)
        ax.plot(np.arange(len(smooth)) + len(loss) - len(smooth) + 1, smooth, lw=1.8, label=name,
                color=ax.lines[-1].get_color())  # fmt: skip
    ax.set_xlabel("optimizer step (4 spoken Alpaca instructions)")
    ax.set_ylabel("training loss (20-step moving mean)")
    ax.set_title("Full-FT, SmolLM2-135M-Instruct + Whisper base: bf16 autocast against fp32")
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--examples", type=int, default=800, help="spoken Alpaca instructions the runs draw from")
    parser.add_argument("--map-examples", type=int, default=64)
    parser.add_argument("--questions", type=int, default=100)
    parser.add_argument("--aligned", type=Path, default=Path("runs/align/ctc-22k-kd"), help="an `align` run dir")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-precision"))
    parser.add_argument("--skip", default="", help="comma-separated parts to leave out: curves, importance, answers")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from textkeep.fileio import write_text

    skip = set(filter(None, args.skip.split(",")))
    args.out.mkdir(parents=True, exist_ok=True)
    lines = ["# bf16 autocast against fp32 on this CPU (benchmarks/bench_precision.py)", ""]
    if "curves" not in skip:
        runs = curves(args.out, args.steps, args.examples)
        plot(runs, args.out / "precision.png")
        loss = {k: [r["loss"] for r in v] for k, v in runs.items()}
        sm = {k: _moving(v) for k, v in loss.items()}
        d_prec = float(np.mean(np.abs(sm["bf16-seed0"] - sm["fp32-seed0"])))
        d_seed = float(np.mean(np.abs(sm["bf16-seed1"] - sm["bf16-seed0"])))
        last = {k: float(np.mean(v[-20:])) for k, v in loss.items()}
        s_step = {k: float(np.median([r["seconds"] for r in v])) for k, v in runs.items()}
        lines += [
            f"## Loss over {args.steps} Full-FT steps ([precision.png](precision.png))", "",
            "| run | last-20-step mean loss | median s/step |", "|---|---|---|",
            *[f"| {k} | {last[k]:.4f} | {s_step[k]:.2f} |" for k in runs], "",
            f"Mean |Δ| of the 20-step moving means: bf16 − fp32 (same seed) **{d_prec:.4f}**, "
            f"seed 1 − seed 0 (bf16: the seed noise) **{d_seed:.4f}**; ratio {d_prec / d_seed:.2f}. "
            "(s/step is for reference: these runs share one process; bench_train.py times each in its own).", "",
        ]  # fmt: skip
    if "importance" not in skip:
        imp = importance_agreement(args.map_examples)
        lines += [
            f"## Importance map of the base LLM ({imp['n']} Alpaca examples, text, paper mode)", "",
            "| Spearman (layer profile) | JS divergence | top-1% IoU | top-5% IoU | s fp32 | s bf16 |",
            "|---|---|---|---|---|---|",
            f"| {imp['spearman']:.4f} | {imp['js']:.2e} | {imp['iou1']:.3f} | {imp['iou5']:.3f} | "
            f"{imp['seconds']['fp32']:.0f} | {imp['seconds']['bf16']:.0f} |", "",
        ]  # fmt: skip
    if "answers" not in skip:
        ans = answer_agreement(args.aligned, args.questions)
        lines += [
            f"## Greedy answers on {args.questions} held-out questions of `{args.aligned}`", "",
            "| mode | identical answers | fp32 acc | bf16 acc | bf16 − fp32 [95% paired CI] | s fp32 | s bf16 |",
            "|---|---|---|---|---|---|---|",
        ]  # fmt: skip
        for mode, r in ans.items():
            d = r["diff"]
            lines.append(
                f"| {mode.upper()} | {r['identical']}/{r['n']} | {100 * r['acc_fp32']:.1f}% "
                f"| {100 * r['acc_bf16']:.1f}% "
                f"| {100 * d['diff']:+.1f} [{100 * d['ci95'][0]:+.1f}, {100 * d['ci95'][1]:+.1f}] "
                f"| {r['seconds']['fp32']:.0f} | {r['seconds']['bf16']:.0f} |"
            )
    write_text(args.out / "precision.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
