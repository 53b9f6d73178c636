"""The study's report: one self-contained HTML page (figures embedded) and results.json with every number on it.

Verdicts on the paper's claims are judged from intervals or noise floors, never from point estimates alone:
- an accuracy difference between two models counts only when its 95% paired-bootstrap interval (the same
  questions resampled for both) excludes 0;
- a shift of the layer-wise importance distribution (JS divergence from the base), or a difference between two
  shifts, counts only when it exceeds the JS divergence between two base maps made on disjoint halves of the
  importance split (sampling noise alone; conservative, since the compared maps share their examples);
- "LoRA's updates are more clustered than Layer-LR's" is a one-sided sign test over the 7 module types of the
  drawn layer (p < 0.05 needs all 7).
"""

from __future__ import annotations

import base64
import html
import json
import platform
from pathlib import Path

import numpy as np

from textkeep.fileio import write_json, write_text

# The paper's own numbers (LLaMA-3.2-1B / LLaMA-3.1-8B), shown beside ours, always labelled as the paper's.
PAPER_TABLE1 = {
    "1B": {"speech": [2.08, 1.14e5, 2.18, 3.85], "text": [3.65, 2.68e5, 3.81, 6.39]},
    "8B": {"speech": [1.75, 2.72e5, 1.76, 3.54], "text": [3.12, 2.60e5, 3.19, 5.47]},
}
PAPER_TABLE2 = {  # LQ T2T, LQ S2T, WQ T2T, WQ S2T
    "1B": {
        "No-FT": [74.0, None, 44.5, None],
        "Full-FT": [73.3, 66.7, 42.1, 29.1],
        "Layer-LR": [73.7, 68.3, 43.8, 30.2],
        "LoRA": [73.7, 70.3, 42.9, 33.5],
    },
    "8B": {
        "No-FT": [84.7, None, 58.7, None],
        "Full-FT": [80.0, 72.0, 55.7, 38.7],
        "Layer-LR": [81.3, 73.3, 57.6, 39.6],
        "LoRA": [81.0, 75.0, 56.7, 42.9],
    },
}
PAPER_TABLE3 = {8: [81.3, 74.7, 56.3, 41.7], 16: [81.0, 75.0, 56.7, 42.9], 24: [79.3, 75.3, 54.7, 40.1]}  # 8B
# Fig 1, Table 1, Fig 2 and the shift (§2); Table 2, Fig 3, Fig 4, Table 3 (§3); then the combined layer figures.
PAPER_ORDER = ["fig1", "table1", "fig2", "shift", "table2", "fig3", "fig4", "table3", "layers"]
COLUMNS = [("llama-questions", "t2t"), ("llama-questions", "s2t"), ("web-questions", "t2t"), ("web-questions", "s2t")]
COLUMN_TITLES = ["Llama Q T2T", "Llama Q S2T", "Web Q T2T", "Web Q S2T"]


def paired_bootstrap(a: dict[str, bool], b: dict[str, bool], n_boot: int = 10000, seed: int = 0) -> dict:
    """Accuracy(a) − accuracy(b) on the questions both answered, with a 95% percentile interval."""
    ids = sorted(set(a) & set(b))
    if not ids:
        return {"diff": float("nan"), "ci95": [float("nan"), float("nan")], "n": 0}
    d = np.array([float(a[i]) - float(b[i]) for i in ids])
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(n_boot, len(d)))].mean(1)
    return {
        "diff": float(d.mean()),
        "ci95": [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))],
        "n": len(ids),
    }


def verdict_from_interval(ci: list[float], expect_positive: bool = True) -> str:
    lo, hi = ci
    if np.isnan(lo):
        return "inconclusive"
    if (lo > 0) if expect_positive else (hi < 0):
        return "reproduced"
    if (hi < 0) if expect_positive else (lo > 0):
        return "not reproduced"
    return "inconclusive"


def shift_verdict(margin: float, noise: float | None) -> str:
    """A shift (or a difference of shifts) against the split-half noise floor: it counts only beyond the floor."""
    if noise is None or np.isnan(margin):
        return "inconclusive"
    if margin > noise:
        return "reproduced"
    return "not reproduced" if margin < -noise else "inconclusive"


def sign_test_verdict(wins: int, n: int, alpha: float = 0.05) -> str:
    """One-sided sign test over modules (each module one paired comparison): with 7 modules only 7 of 7 is significant."""
    from math import comb

    tail = lambda k: sum(comb(n, i) for i in range(k, n + 1)) / 2**n  # noqa: E731  P(X ≥ k) under a fair coin
    if n and tail(wins) < alpha:
        return "reproduced"
    if n and tail(n - wins) < alpha:
        return "not reproduced"
    return "inconclusive"


def _fmt(x: float | None) -> str:
    return "not measured" if x is None else f"{x:.4f}"


def _predictions(run_dir: Path) -> dict[tuple[str, str], dict[str, bool]]:
    out: dict = {}
    path = run_dir / "predictions.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            r = json.loads(line)
            out.setdefault((r["set"], r["modality"]), {})[r["id"]] = r["correct"]["has_answer"]
    return out


def _img(path: Path) -> str:
    if not path.is_file():
        return f"<p class='missing'>figure not produced: {html.escape(path.name)}</p>"
    data = base64.b64encode(path.read_bytes()).decode()
    return f"<img alt='{html.escape(path.stem)}' src='data:image/png;base64,{data}'>"


def _table(head: list[str], rows: list[list[str]], cls: str = "") -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table class='{cls}'><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _acc_cell(metrics: dict | None, s: str, m: str) -> tuple[str, dict | None]:
    cell = (metrics or {}).get("results", {}).get(s, {}).get(m, {}).get("has_answer")
    if not cell:
        return "–", None
    return (
        f"{100 * cell['accuracy']:.1f} <small>[{100 * cell['ci95'][0]:.1f}, {100 * cell['ci95'][1]:.1f}]</small>",
        cell,
    )


def _ppl(x: float) -> str:
    return f"{x:.3g}" if x < 1e4 else f"{x:.2e}"


def write_report(study) -> Path:
    from textkeep.study import LABELS, STAGES

    out, cfg = study.out, study.cfg
    report = out / "report"
    results: dict = {
        "profile": cfg.profile,
        "config": json.loads(json.dumps(cfg.__dict__, default=lambda o: o.__dict__)),
    }
    sections: dict[str, str] = {}  # keyed, then laid out in the paper's order (PAPER_ORDER)
    verdicts: list[tuple[str, str, str]] = []

    # ---- Table 2 (and No-FT) ----
    runs = ["no-ft"] + [n for n in ("full", "layer-lr", "lora") if n in cfg.run_names()]
    metrics = {
        n: json.loads((out / "eval" / n / "metrics.json").read_text())
        for n in runs
        if (out / "eval" / n / "metrics.json").is_file()
    }
    results["table2"] = {n: m["results"] for n, m in metrics.items()}
    rows = []
    for n in runs:
        rows.append([LABELS.get(n, "No-FT")] + [_acc_cell(metrics.get(n), s, m)[0] for s, m in COLUMNS])
    for size, table in PAPER_TABLE2.items():
        for name, vals in table.items():
            rows.append([f"<i>paper {size}: {name}</i>"] + [f"<i>{v:.1f}</i>" if v is not None else "–" for v in vals])
    sections["table2"] = (
        "<h2>Table 2 · spoken QA accuracy (%)</h2>"
        + _table(["Method"] + COLUMN_TITLES, rows)
        + "<p class='note'>Ours: has_answer scorer, 95% bootstrap interval in brackets. Rows in italics are the paper's "
        "numbers for LLaMA-3.2-1B and LLaMA-3.1-8B, not ours.</p>"
    )

    # ---- Table 3 (rank ablation) ----
    rank_runs = {
        r: ("lora" if r == cfg.train.lora_rank and "lora" in cfg.run_names() else f"lora-r{r}")
        for r in cfg.train.lora_ranks
    }
    if rank_runs:
        rows, results["table3"] = [], {}
        for r, name in rank_runs.items():
            path = out / "eval" / name / "metrics.json"
            m = json.loads(path.read_text()) if path.is_file() else None
            results["table3"][r] = m["results"] if m else None
            rows.append(
                [str(r)]
                + [_acc_cell(m, s, mm)[0] for s, mm in COLUMNS]
                + [" / ".join(f"{v:.1f}" for v in PAPER_TABLE3.get(r, [])) or "–"]
            )
        sections["table3"] = "<h2>Table 3 · LoRA rank</h2>" + _table(["Rank"] + COLUMN_TITLES + ["paper (8B)"], rows)

    # ---- Table 1 (deactivation) ----
    deact_path = out / "analysis" / "deactivation" / "deactivation.json"
    if deact_path.is_file():
        deact = json.loads(deact_path.read_text())
        results["table1"] = deact
        p = deact["percent"]
        rows = []
        for inp, t in deact["Full-FT"].items():
            rows.append(["Full-FT (ours)", inp, _ppl(t["base"]), _ppl(t["top"]), _ppl(t["bottom"]), _ppl(t["random"])])
            ok = t["top"] > 10 * t["random"] and t["random"] > t["bottom"] and t["bottom"] < 1.25 * t["base"]
            verdicts.append(
                (
                    "Table 1",
                    f"removing the top {p:g}% by importance ({inp} input) destroys the model; bottom ≈ base; random in between",
                    "reproduced" if ok else "not reproduced",
                )
            )
        for size, t in PAPER_TABLE1.items():
            for inp, v in t.items():
                rows.append([f"<i>paper {size}</i>", inp] + [f"<i>{_ppl(x)}</i>" for x in v])
        sections["table1"] = (
            f"<h2>Table 1 · perplexity after deactivating {p:g}% of parameters</h2>"
            + _table(["Model", "Input", "Base", "Top", "Bottom", "Random"], rows)
            + f"<p class='note'>Reference responses of {deact['n']} held-out examples; token-weighted perplexity over response tokens. "
            + (
                "Deactivated: every tensor of the decoder layers, norm weights included."
                if deact.get("include_norms", True)
                else "Deactivated: the decoder layers' weight matrices (norm weights left out)."
            )
            + "</p>"
        )

    # ---- Figures ----
    a = out / "analysis"
    sections["fig1"] = "<h2>Fig. 1 · rank clustering of the top 5% (Full-FT, text vs speech input)</h2>" + _img(
        a / "clusters" / "clusters.png"
    )
    sections["fig2"] = "<h2>Fig. 2 · layer-wise distribution of textual importance: No-FT vs Full-FT</h2>" + _img(
        a / "layers-fig2" / "layers.png"
    )
    sections["fig3"] = "<h2>Fig. 3 · the same for the mitigations: No-FT vs Layer-LR and LoRA</h2>" + _img(
        a / "layers-fig3" / "layers.png"
    )
    sections["layers"] = (
        "<h2>Figs. 2 and 3 together, and by module type</h2>"
        + _img(a / "layers" / "layers.png")
        + _img(a / "layers" / "layers_by_module.png")
    )
    sections["fig4"] = "<h2>Fig. 4 · parameter change |θ_ft − θ_base|</h2>" + _img(a / "change" / "change.png")

    # ---- Shift table and its verdicts ----
    shift_path = a / "shift" / "shift.json"
    if shift_path.is_file():
        shift = json.loads(shift_path.read_text())["rows"]
        results["shift"] = shift
        noise_path = a / "shift-noise" / "shift.json"
        noise_rows = json.loads(noise_path.read_text())["rows"] if noise_path.is_file() else {}
        noise = next(iter(noise_rows.values()))["js_divergence"] if noise_rows else None
        results["shift_noise"] = noise_rows
        keys = [k for k in next(iter(shift.values())) if not k.startswith("spearman_p")]
        cells = lambda r: [f"{v:.3g}" if isinstance(v, float) else str(v) for v in (r.get(k, "–") for k in keys)]  # noqa: E731
        rows = [[n] + cells(r) for n, r in shift.items()] + [
            ["<i>noise floor: half vs half of the split (No-FT)</i>"] + cells(r) for r in noise_rows.values()
        ]
        sections["shift"] = "<h2>Importance shift from the base model</h2>" + _table(["Model"] + keys, rows)
        js = {n: r["js_divergence"] for n, r in shift.items()}
        if noise is not None:
            sections["shift"] += (
                f"<p class='note'>Noise floor: the JS divergence between base maps computed on the two halves of the importance split is {noise:.4f} bits. "
                "A shift, or a difference between shifts, counts only when it exceeds it.</p>"
            )
        if "Full-FT" in js:
            verdicts.append(
                (
                    "§2.3.2",
                    f"speech fine-tuning shifts the layer-wise textual importance distribution (Full-FT JS divergence {js['Full-FT']:.4f}, noise floor {_fmt(noise)})",
                    shift_verdict(js["Full-FT"], noise),
                )
            )
            for other in ("Layer-LR", "LoRA"):
                if other in js:
                    verdicts.append(
                        (
                            "Fig. 3",
                            f"{other} keeps the textual importance distribution closer to the base than Full-FT (JS divergence {js[other]:.4f} vs {js['Full-FT']:.4f}, noise floor {_fmt(noise)})",
                            shift_verdict(js["Full-FT"] - js[other], noise),
                        )
                    )

    change_path = a / "change" / "change.json"
    if change_path.is_file():
        panels = json.loads(change_path.read_text())["panels"]
        per_module = {n: {mod: p["score"]["ratio"] for mod, p in mods.items()} for n, mods in panels.items()}
        score = {n: float(np.mean(list(m.values()))) for n, m in per_module.items()}
        results["change_clustering"] = score
        if "LoRA" in per_module and "Layer-LR" in per_module:
            mods = sorted(set(per_module["LoRA"]) & set(per_module["Layer-LR"]))
            wins = sum(per_module["LoRA"][m] > per_module["Layer-LR"][m] for m in mods)
            verdicts.append(
                (
                    "Fig. 4",
                    f"LoRA's updates gather more in rows and columns than Layer-LR's (clustering ratio {score['LoRA']:.2f} vs {score['Layer-LR']:.2f}; higher in {wins} of {len(mods)} modules)",
                    sign_test_verdict(wins, len(mods)),
                )
            )

    # ---- Paired accuracy verdicts ----
    preds = {n: _predictions(out / "eval" / n) for n in metrics}
    paired = {}
    if "full" in preds and "no-ft" in preds:
        for s in cfg.eval.sets:
            d = paired_bootstrap(preds["no-ft"].get((s, "t2t"), {}), preds["full"].get((s, "t2t"), {}))
            paired[f"no-ft vs full / {s} t2t"] = d
            verdicts.append(
                (
                    "Table 2",
                    f"Full-FT loses text competence: T2T on {s} drops (No-FT − Full-FT = {100 * d['diff']:+.1f} points, 95% CI [{100 * d['ci95'][0]:+.1f}, {100 * d['ci95'][1]:+.1f}])",
                    verdict_from_interval(d["ci95"]),
                )
            )
    for other in ("layer-lr", "lora"):
        if other in preds and "full" in preds:
            for s in cfg.eval.sets:
                for m, what in (("t2t", "keeps T2T better"), ("s2t", "answers spoken questions better (S2T)")):
                    d = paired_bootstrap(preds[other].get((s, m), {}), preds["full"].get((s, m), {}))
                    paired[f"{other} vs full / {s} {m}"] = d
                    verdicts.append(
                        (
                            "Table 2",
                            f"{LABELS[other]} {what} than Full-FT on {s} ({100 * d['diff']:+.1f} points, 95% CI [{100 * d['ci95'][0]:+.1f}, {100 * d['ci95'][1]:+.1f}], n={d['n']})",
                            verdict_from_interval(d["ci95"]),
                        )
                    )
    results["paired"] = paired
    results["verdicts"] = [{"where": w, "claim": c, "verdict": v} for w, c, v in verdicts]

    # ---- Run facts ----
    stage_times = {
        s: json.loads((out / s / "stage.json").read_text())["seconds"]
        for s in STAGES
        if (out / s / "stage.json").is_file()
    }
    results["stage_seconds"] = stage_times
    env = _environment()
    results["environment"] = env
    write_json(report / "results.json", results)

    colour = {"reproduced": "ok", "not reproduced": "bad", "inconclusive": "meh"}
    verdict_html = _table(
        ["Paper", "Claim", "Verdict at this scale"],
        [[w, html.escape(c), f"<span class='{colour[v]}'>{v}</span>"] for w, c, v in verdicts],
        "verdicts",
    )
    smoke = (
        "<p class='warn'>This is a quick smoke run: sizes are far too small to resolve the paper's effects. Read its numbers as a check that every stage works, not as results.</p>"
        if cfg.profile == "quick"
        else ""
    )
    page = f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>textkeep study · {html.escape(cfg.profile)}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}td:first-child,th:first-child{{text-align:left}}
table.verdicts td{{text-align:left}}img{{max-width:100%;border:1px solid #eee;margin:.5em 0}}.note{{color:#555;font-size:.9em}}
.ok{{color:#06660f;font-weight:600}}.bad{{color:#a00;font-weight:600}}.meh{{color:#8a6d00;font-weight:600}}.warn{{background:#fff4d6;padding:.6em}}
pre{{background:#f6f6f6;padding:1em;overflow:auto;font-size:.85em}}</style></head><body>
<h1>textkeep study: {html.escape(cfg.profile)}</h1>
<p>{html.escape(cfg.llm)} + {html.escape(cfg.encoder)} (encoder policy {html.escape(cfg.encoder_policy)}); training data {html.escape(cfg.data.train)}
({cfg.data.n_examples} spoken instructions, {cfg.data.test_size} held out); paper: Wang et al., <i>Understanding Textual Capability Degradation in Speech LLMs via Parameter Importance Analysis</i>.</p>
{smoke}
<h2>Verdicts on the paper's claims</h2>{verdict_html}
{"".join(sections[k] for k in PAPER_ORDER if k in sections)}
<h2>Run</h2>{_table(["Stage", "Seconds"], [[s, f"{t:.0f}"] for s, t in stage_times.items()])}
<h3>Environment</h3><pre>{html.escape(json.dumps(env, indent=2))}</pre>
<h3>Config</h3><pre>{html.escape(json.dumps(results["config"], indent=2, default=str))}</pre>
</body></html>"""
    write_text(report / "index.html", page)
    return report / "index.html"


def _environment() -> dict:
    import torch
    import transformers

    import textkeep

    return {
        "textkeep": textkeep.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "machine": platform.machine(),
        "cpus": __import__("os").cpu_count(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
