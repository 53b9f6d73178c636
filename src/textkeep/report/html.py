"""The study's report: one self-contained HTML page (figures embedded) and results.json with every number on it.

This module only renders: paths come from `textkeep.layout.StudyLayout`, verdicts from `report/verdicts.py`.
"""

from __future__ import annotations

import base64
import html
import json
import platform
from dataclasses import asdict
from pathlib import Path

from textkeep.fileio import write_json, write_text
from textkeep.layout import ALIGNED_RUN, BASE_RUN, CASCADE_RUN, STAGES, StudyLayout, label
from textkeep.report import verdicts as V

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
PAPER_ORDER = ["fig1", "table1", "fig2", "shift", "align", "table2", "tradeoff", "fig3", "fig4", "table3", "layers"]
COLUMNS = [("llama-questions", "t2t"), ("llama-questions", "s2t"), ("web-questions", "t2t"), ("web-questions", "s2t")]
COLUMN_TITLES = ["Llama Q T2T", "Llama Q S2T", "Web Q T2T", "Web Q S2T"]
_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
td:first-child,th:first-child{text-align:left}table.verdicts td{text-align:left}
img{max-width:100%;border:1px solid #eee;margin:.5em 0}.note{color:#555;font-size:.9em}
.ok{color:#06660f;font-weight:600}.bad{color:#a00;font-weight:600}.meh{color:#8a6d00;font-weight:600}
.warn{background:#fff4d6;padding:.6em}pre{background:#f6f6f6;padding:1em;overflow:auto;font-size:.85em}"""


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


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def write_report(layout: StudyLayout, cfg) -> Path:
    """Render the study in `layout` (its config `cfg`, a StudyConfig) into report/index.html and results.json."""
    runs = cfg.run_names()
    results: dict = {"profile": cfg.profile, "config": json.loads(json.dumps(asdict(cfg), default=str))}
    sections: dict[str, str] = {}  # keyed, then laid out in the paper's order (PAPER_ORDER)
    verdicts: list[tuple[str, str, str]] = []

    # ---- Table 2 (and No-FT) ----
    # No-FT, the cascade reference and the aligned (LLM-frozen) model, then the strategies: the paper's and beyond.
    table2_runs = [BASE_RUN, CASCADE_RUN, ALIGNED_RUN] + [n for n in cfg.strategies if n in runs]
    metrics = {n: m for n in table2_runs if (m := _read(layout.eval_dir(n) / "metrics.json"))}
    if CASCADE_RUN in metrics:  # its S2T is the cascade's; its T2T the base LLM's, whose text path it is
        base = metrics.get(BASE_RUN, {}).get("results", {})
        cascade = metrics[CASCADE_RUN]["results"]
        rows = {}
        for s, r in cascade.items():
            if "cascade" in r:
                rows[s] = {"s2t": r["cascade"], **({"t2t": base[s]["t2t"]} if "t2t" in base.get(s, {}) else {})}
        metrics[CASCADE_RUN] = {"results": rows}
    table2_runs = [n for n in table2_runs if n in metrics or n not in (CASCADE_RUN, ALIGNED_RUN)]
    results["table2"] = {n: m["results"] for n, m in metrics.items()}
    rows = [[label(n)] + [_acc_cell(metrics.get(n), s, m)[0] for s, m in COLUMNS] for n in table2_runs]
    for size, table in PAPER_TABLE2.items():
        for name, vals in table.items():
            cells = [f"<i>{v:.1f}</i>" if v is not None else "–" for v in vals]
            rows.append([f"<i>paper {size}: {name}</i>"] + cells)
    sections["table2"] = (
        "<h2>Table 2 · spoken QA accuracy (%)</h2>"
        + _table(["Method"] + COLUMN_TITLES, rows)
        + "<p class='note'>Ours: has_answer scorer, 95% bootstrap interval in brackets. Rows in italics are the "
        "paper's numbers for LLaMA-3.2-1B and LLaMA-3.1-8B, not ours.</p>"
    )

    # ---- the align stage's learning curve ----
    curve = layout.align_run / "curve.jsonl"
    if curve.is_file() and (rows := [json.loads(x) for x in curve.read_text().splitlines() if x.strip()]):
        from textkeep.report.figures import plot_align_curve, save_figure

        stem = layout.stage("report") / "align_curve"
        save_figure(plot_align_curve(rows), stem, {"curve": rows})
        sections["align"] = (
            "<h2>The align stage · held-out S2T as the adaptor learns (LLM frozen)</h2>"
            + _img(stem.with_name("align_curve.png"))
            + "<p class='note'>Held-out questions of the alignment data, never trained on; the dashed line is the "
            "same frozen LLM reading their transcripts. Not in the paper: LLaMA-Omni aligns and fine-tunes at once.</p>"
        )

    # ---- the trade-off scatter: every row's T2T against its S2T, with the Pareto frontier ----
    panels = {}
    for s, title in (("llama-questions", "LLaMA Questions"), ("web-questions", "Web Questions")):
        rows = {}
        for n in table2_runs + [r for r in runs if r not in table2_runs]:
            cells = {m: _acc_cell(metrics.get(n) or _read(layout.eval_dir(n) / "metrics.json"), s, m)[1]
                     for m in ("t2t", "s2t")}  # fmt: skip
            if all(cells.values()):
                rows[label(n)] = {m: (c["accuracy"], *c["ci95"]) for m, c in cells.items()}
        if rows:
            panels[title] = rows
    if panels:
        from textkeep.report.figures import plot_tradeoff, save_figure

        stem = layout.stage("report") / "tradeoff"
        save_figure(plot_tradeoff(panels), stem, panels)
        results["tradeoff"] = panels
        sections["tradeoff"] = (
            "<h2>The trade-off · text kept against speech gained</h2>"
            + _img(stem.with_name("tradeoff.png"))
            + "<p class='note'>Each model's T2T and S2T accuracy with 95% bootstrap intervals; the dashed line joins "
            "the models no other beats on both.</p>"
        )

    # ---- Table 3 (rank ablation) ----
    rank_runs = {r: ("lora" if r == cfg.train.lora_rank and "lora" in runs else f"lora-r{r}") for r in cfg.lora_ranks}
    if rank_runs:
        rows, results["table3"] = [], {}
        for r, name in rank_runs.items():
            m = _read(layout.eval_dir(name) / "metrics.json")
            results["table3"][r] = m["results"] if m else None
            paper = " / ".join(f"{v:.1f}" for v in PAPER_TABLE3.get(r, [])) or "–"
            rows.append([str(r)] + [_acc_cell(m, s, mm)[0] for s, mm in COLUMNS] + [paper])
        sections["table3"] = "<h2>Table 3 · LoRA rank</h2>" + _table(["Rank"] + COLUMN_TITLES + ["paper (8B)"], rows)

    # ---- Table 1 (deactivation) ----
    deact = _read(layout.deactivation)
    if deact:
        p, table = deact["percent"], deact["table"]
        found, intervals = V.table1(deact)
        verdicts += found
        results["table1"] = {
            label("full"): table,
            "percent": p,
            "n": deact["n_examples"],
            "include_norms": deact.get("include_norms", True),
            "intervals": intervals,
        }
        rows = [
            [f"{label('full')} (ours)", inp, _ppl(t["base"]), _ppl(t["top"]), _ppl(t["bottom"]), _ppl(t["random"])]
            for inp, t in table.items()
        ]
        for size, t in PAPER_TABLE1.items():
            for inp, v in t.items():
                rows.append([f"<i>paper {size}</i>", inp] + [f"<i>{_ppl(x)}</i>" for x in v])
        scope = (
            "Deactivated: every tensor of the decoder layers, norm weights included."
            if deact.get("include_norms", True)
            else "Deactivated: the decoder layers' weight matrices (norm weights left out)."
        )
        sections["table1"] = (
            f"<h2>Table 1 · perplexity after deactivating {p:g}% of parameters</h2>"
            + _table(["Model", "Input", "Base", "Top", "Bottom", "Random"], rows)
            + f"<p class='note'>Reference responses of {deact['n_examples']} held-out examples; token-weighted "
            f"perplexity over response tokens. {scope}</p>"
        )

    # ---- Figures ----
    titles = {
        "fig1": "Fig. 1 · rank clustering of the top 5% (Full-FT, text vs speech input)",
        "fig2": "Fig. 2 · layer-wise distribution of textual importance: No-FT vs Full-FT",
        "fig3": "Fig. 3 · the same for the mitigations: No-FT vs Layer-LR and LoRA",
        "fig4": "Fig. 4 · parameter change |θ_ft − θ_base|",
    }
    for key, title in titles.items():
        sections[key] = f"<h2>{title}</h2>" + _img(layout.figure(key))
    sections["layers"] = (
        "<h2>Figs. 2 and 3 together, and by module type</h2>"
        + _img(layout.figure("layers"))
        + _img(layout.figure("layers_by_module"))
    )

    # ---- Shift table and its verdicts ----
    shift = _read(layout.analysis("shift") / "shift.json")
    if shift:
        shift = shift["rows"]
        results["shift"] = shift
        noise_rows = (_read(layout.analysis("shift-noise") / "shift.json") or {}).get("rows", {})
        noise = next(iter(noise_rows.values()))["js_divergence"] if noise_rows else None
        results["shift_noise"] = noise_rows
        keys = [k for k in next(iter(shift.values())) if not k.startswith("spearman_p")]
        cells = lambda r: [f"{v:.3g}" if isinstance(v, float) else str(v) for v in (r.get(k, "–") for k in keys)]
        rows = [[n] + cells(r) for n, r in shift.items()]
        rows += [["<i>noise floor: half vs half of the split (No-FT)</i>"] + cells(r) for r in noise_rows.values()]
        sections["shift"] = "<h2>Importance shift from the base model</h2>" + _table(["Model"] + keys, rows)
        if noise is not None:
            sections["shift"] += (
                f"<p class='note'>Noise floor: the JS divergence between base maps computed on the two halves of the "
                f"importance split is {noise:.4f} bits. A shift, or a difference between shifts, counts only when it "
                "exceeds it.</p>"
            )
        verdicts += V.shift({n: r["js_divergence"] for n, r in shift.items()}, noise)

    change = _read(layout.analysis("change") / "change.json")
    if change:
        per_module = {n: {mod: p["score"]["ratio"] for mod, p in mods.items()} for n, mods in change["panels"].items()}
        results["change_clustering"] = {n: sum(m.values()) / len(m) for n, m in per_module.items()}
        verdicts += V.fig4(per_module)

    # ---- Paired accuracy verdicts ----
    found, results["paired"] = V.table2(
        {n: _predictions(layout.eval_dir(n)) for n in metrics}, cfg.eval.sets, {n: label(n) for n in runs}
    )
    verdicts += found
    results["verdicts"] = [{"where": w, "claim": c, "verdict": v} for w, c, v in verdicts]

    # ---- Run facts ----
    stage_times = {s: st["seconds"] for s in STAGES if (st := _read(layout.stamp(s)))}
    results["stage_seconds"] = stage_times
    env = _environment()
    results["environment"] = env
    write_json(layout.results, results)

    colour = {"reproduced": "ok", "not reproduced": "bad", "inconclusive": "meh"}
    verdict_html = _table(
        ["Paper", "Claim", "Verdict at this scale"],
        [[w, html.escape(c), f"<span class='{colour[v]}'>{v}</span>"] for w, c, v in verdicts],
        "verdicts",
    )
    smoke = (
        "<p class='warn'>This is a quick smoke run: sizes are far too small to resolve the paper's effects. Read its "
        "numbers as a check that every stage works, not as results.</p>"
        if cfg.profile == "quick"
        else ""
    )
    esc = html.escape
    paper = "Understanding Textual Capability Degradation in Speech LLMs via Parameter Importance Analysis"
    intro = (
        f"{esc(cfg.llm)} + {esc(cfg.encoder)} (encoder policy {esc(cfg.encoder_policy)}); training data "
        f"{esc(cfg.data.train)} ({cfg.data.n_examples} spoken instructions, {cfg.data.test_size} held out); "
        f"paper: Wang et al., <i>{paper}</i>."
    )
    stages = _table(["Stage", "Seconds"], [[s, f"{t:.0f}"] for s, t in stage_times.items()])
    page = f"""<!doctype html><html lang="en"><head><meta charset="utf-8">
<title>textkeep study · {esc(cfg.profile)}</title><style>{_CSS}</style></head><body>
<h1>textkeep study: {esc(cfg.profile)}</h1>
<p>{intro}</p>
{smoke}
<h2>Verdicts on the paper's claims</h2>{verdict_html}
{"".join(sections[k] for k in PAPER_ORDER if k in sections)}
<h2>Run</h2>{stages}
<h3>Environment</h3><pre>{esc(json.dumps(env, indent=2))}</pre>
<h3>Config</h3><pre>{esc(json.dumps(results["config"], indent=2, default=str))}</pre>
</body></html>"""
    write_text(layout.report, page)
    return layout.report


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
