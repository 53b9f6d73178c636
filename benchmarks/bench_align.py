"""Alignment recipes side by side: S2T against examples seen and training minutes, with T2T as the reference line.

    python benchmarks/bench_align.py configs/align/asr.yaml configs/align/asr-kd.yaml [--steps 300] [--out DIR]
        [--test-limit 300] [--report asr-kd]

Each recipe is an `align` config, run (or resumed) into DIR/<name> with the same step budget. Its held-out curve
(curve.jsonl: S2T on a slice of its own training questions, never trained on) is what recipes are chosen by. At
the end each final model is evaluated once on the reporting sets: all 300 LLaMA Questions (real WAVs) and the first
`--test-limit` spoken Web Questions test questions (`textkeep speak web-questions`), S2T, beside the frozen LLM's
T2T on the same questions (unchanged by alignment: the LLM is frozen) and the cascade's (Whisper base's own
transcript through the text path: the ceiling an encoder–adaptor model of this LLM can aim at).

`--report` names the recipe chosen on the held-out curves, so that only it is scored on the reporting sets (they
are for reporting once, never for choosing). Writes DIR/align_curves.png and DIR/align_table.md. Every number is
measured in this one run (or read back from the resumed runs' own files, which hold their measured times).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path


def _run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def _textkeep() -> list[str]:
    return [sys.executable, "-m", "textkeep.cli"]


def _accuracy(eval_dir: Path) -> dict:
    """{set/mode: (has_answer accuracy, its 95% bootstrap interval)} of an eval run."""
    metrics = json.loads((eval_dir / "metrics.json").read_text())["results"]
    return {
        f"{s}/{m}": (r["has_answer"]["accuracy"], r["has_answer"]["ci95"])
        for s, by in metrics.items()
        for m, r in by.items()
    }


def _pct(acc) -> str:
    """(accuracy, [lo, hi]) → "11.3 [8.0, 15.0]"."""
    value, (lo, hi) = acc
    return f"{100 * value:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipes", nargs="+", type=Path, help="align configs (configs/align/*.yaml)")
    parser.add_argument(
        "--steps", type=int, default=None, help="the step budget of every recipe (default: each config's)"
    )
    parser.add_argument("--out", type=Path, default=Path("runs/bench-align"))
    parser.add_argument("--test-limit", type=int, default=300, help="spoken Web Questions test questions")
    parser.add_argument("--batch-size", type=int, default=64, help="questions decoded together in the reporting evals")
    parser.add_argument("--precision", default="bf16", help="the reporting evals' precision (fp32, bf16, auto)")
    parser.add_argument("--no-cascade", action="store_true", help="leave out the cascade reference (Whisper decoding)")
    parser.add_argument("--skip-test", action="store_true", help="held-out curves only (no reporting sets)")
    parser.add_argument("--no-train", action="store_true", help="draw the runs as they stand; train nothing")
    parser.add_argument(
        "--report",
        nargs="+",
        default=None,
        help="the recipes (config stems) evaluated on the reporting sets, chosen on the held-out curves first "
        "(default: all); the others are drawn and tabled from their held-out curves only",
    )
    args = parser.parse_args()
    unknown = set(args.report or []) - {r.stem for r in args.recipes}
    if unknown:  # before any training or evaluation, not after
        parser.error(f"--report names {sorted(unknown)}, which are not among the recipes' stems.")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args.out.mkdir(parents=True, exist_ok=True)

    runs = {}
    for recipe in args.recipes:
        out = args.out / recipe.stem
        cmd = [*_textkeep(), "align", "--config", str(recipe), "--out", str(out)]
        cmd += ["--train.max_steps", str(args.steps)] if args.steps else []
        cmd += ["--resume", "true"] if (out / "train_config.json").is_file() else []
        if not args.no_train and not (out / "model" / "textkeep_config.json").is_file():
            _run(cmd)
        runs[recipe.stem] = out

    sets = "[llama-questions, web-questions]"
    test = {}
    if not args.skip_test:
        first = next(iter(runs.values()))
        base = json.loads((first / "train_config.json").read_text())["args"]["model"]
        limit = ["--limit", str(args.test_limit), "--batch_size", str(args.batch_size), "--precision", args.precision]
        _run(
            [
                *_textkeep(),
                "eval",
                "--model",
                base,
                "--sets",
                sets,
                "--modes",
                "[t2t]" if args.no_cascade else "[t2t, cascade]",
                *limit,
                "--out",
                str(args.out / "t2t"),
            ]
        )
        test["T2T (frozen LLM)"] = _accuracy(args.out / "t2t")
        for name, out in runs.items():
            if args.report is not None and name not in args.report:
                continue
            _run([*_textkeep(), "eval", "--model", str(out), "--sets", sets, "--modes", "[s2t]", *limit,
                  "--out", str(out / "test-eval")])  # fmt: skip
            test[name] = _accuracy(out / "test-eval")

    curves = {n: [json.loads(x) for x in (o / "curve.jsonl").read_text().splitlines()] for n, o in runs.items()}
    curves = _chained(curves, runs)
    _figure(curves, args.out / "align_curves.png")
    _table(curves, test, args.out / "align_table.md")
    print((args.out / "align_table.md").read_text())


def _chained(curves: dict[str, list[dict]], runs: dict[str, Path]) -> dict[str, list[dict]]:
    """The curves with a stage that continues another listed run (its `model:` is that run) drawn from where that
    one ended: its examples and training minutes offset by the earlier stages' totals (`chain_examples`,
    `chain_minutes`), so a chain of stages reads as one curve against its whole cost."""
    parent = {}
    for name, out in runs.items():
        model = Path(json.loads((out / "train_config.json").read_text())["args"]["model"])
        model = model.parent if model.name == "model" else model
        parent[name] = next((n for n, o in runs.items() if n != name and o.resolve() == model.resolve()), None)

    def before(name: str, depth: int = 0) -> tuple[int, float]:
        """(examples, minutes) of the stages `name` continues; the depth bound stops a cycle of runs."""
        up = parent[name]
        if up is None or depth > len(runs):
            return 0, 0.0
        examples, minutes = before(up, depth + 1)
        last = curves[up][-1] if curves[up] else {"examples": 0, "train_minutes": 0.0}
        return examples + last["examples"], minutes + last["train_minutes"]

    out = {}
    for name, rows in curves.items():
        examples, minutes = before(name)
        out[name] = [
            {**r, "chain_examples": examples + r["examples"], "chain_minutes": minutes + r["train_minutes"]}
            for r in rows
        ]
    return out


def _figure(curves: dict[str, list[dict]], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4), layout="constrained")
    ax_ex, ax_min = fig.subplots(1, 2, sharey=True)
    for name, rows in curves.items():
        s2t = [100 * r["s2t"] for r in rows]
        line = ax_ex.plot([r["chain_examples"] for r in rows], s2t, marker="o", markersize=3, label=name)[0]
        ax_min.plot([r["chain_minutes"] for r in rows], s2t, marker="o", markersize=3, color=line.get_color())
        t2t = next((r["t2t"] for r in rows if "t2t" in r), None)
        if t2t is not None:
            for ax in (ax_ex, ax_min):
                ax.axhline(100 * t2t, color="grey", linestyle="--", linewidth=1)
    ax_ex.set_xlabel("examples seen (a stage continuing another listed run starts where it ended)")
    ax_min.set_xlabel("training minutes (2 CPU cores), chained stages cumulated")
    ax_ex.set_ylabel("held-out S2T, has_answer (%)")
    for ax in (ax_ex, ax_min):
        ax.grid(alpha=0.3)
    ax_ex.legend(fontsize="small")
    fig.suptitle("Alignment curves on a held-out slice of the training questions (dashed: the frozen LLM's T2T)")
    fig.savefig(path, dpi=150)


def _table(curves: dict[str, list[dict]], test: dict[str, dict], path: Path) -> None:
    cols = ["llama-questions/s2t", "web-questions/s2t"]
    t2t = test.get("T2T (frozen LLM)", {})
    head = (
        "| recipe | examples | train min | chain min | held-out S2T | held-out T2T | distinct | held-out CTC WER "
        "| LQ S2T | WQ S2T | LQ ratio | WQ ratio |"
    )
    lines = [head, "|---" * 12 + "|"]
    for name, rows in curves.items():
        last = rows[-1]
        acc = test.get(name, {})
        cells = [_pct(acc[c]) if c in acc else "–" for c in cols]
        refs = [t2t.get(c.replace("s2t", "t2t"), (0.0, None))[0] for c in cols]
        ratios = [f"{acc[c][0] / ref:.2f}" if c in acc and ref else "–" for c, ref in zip(cols, refs)]
        fmt = lambda x, p="{:.1f}": "–" if x is None else p.format(x)  # noqa: E731
        lines.append(
            f"| {name} | {last['examples']} | {last['train_minutes']:.1f} | {last['chain_minutes']:.1f} | "
            f"{100 * last['s2t']:.1f} | "
            f"{fmt(100 * last['t2t'] if 't2t' in last else None)} | {last['distinct']} | "
            f"{fmt(100 * last['ctc_wer'] if 'ctc_wer' in last else None)} | {cells[0]} | "
            f"{cells[1]} | {ratios[0]} | {ratios[1]} |"
        )
    if t2t:
        get = lambda key: _pct(t2t[key]) if key in t2t else "–"  # noqa: E731
        lines.append(
            f"\nT2T of the frozen LLM on the same questions: LLaMA Questions {get('llama-questions/t2t')}, Web "
            f"Questions {get('web-questions/t2t')}."
            + (
                f" The cascade (Whisper base's transcript → the same LLM): LLaMA Questions "
                f"{get('llama-questions/cascade')}, Web Questions {get('web-questions/cascade')}."
                if "llama-questions/cascade" in t2t
                else ""
            )
            + " has_answer, %, with 95% bootstrap intervals. Ratio: S2T ÷ T2T."
        )
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
