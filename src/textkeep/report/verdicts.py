"""Verdicts on the paper's claims, each judged from an interval or a noise floor, never from a point estimate alone.

- An accuracy difference between two models counts only when its 95% paired-bootstrap interval (the same questions
  resampled for both) excludes 0.
- Table 1: removing the top p% by importance must hurt more than a random p%, and a random p% more than the bottom
  p%: each a 95% paired-bootstrap interval over the held-out examples (the same examples resampled for both
  conditions) of the difference in log perplexity, which must exclude 0.
- A shift of the layer-wise importance distribution (JS divergence from the base), or a difference between two
  shifts, counts only when it exceeds the JS divergence between two base maps made on disjoint halves of the
  importance split (sampling noise alone; conservative, since the compared maps share their examples).
- "LoRA's updates are more clustered than Layer-LR's" is a one-sided sign test over the 7 module types of the
  drawn layer (p < 0.05 needs all 7).

Each function returns (where in the paper, the claim with its numbers, verdict).
"""

from __future__ import annotations

import math

import numpy as np

VERDICTS = ("reproduced", "not reproduced", "inconclusive")


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


def log_ppl_difference(loss_a, loss_b, n_tokens, n_boot: int = 10000, seed: int = 0) -> dict:
    """log ppl(a) − log ppl(b) of token-weighted perplexities over the same examples (per-example summed response
    losses `loss_a`, `loss_b` and token counts), with a 95% paired-bootstrap interval over examples."""
    la, lb, n = (np.asarray(x, dtype=float) for x in (loss_a, loss_b, n_tokens))
    if not len(n) or n.sum() <= 0:
        return {"diff": float("nan"), "ci95": [float("nan"), float("nan")], "n": 0}
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(n), size=(n_boot, len(n)))
    boot = (la[idx].sum(1) - lb[idx].sum(1)) / np.maximum(n[idx].sum(1), 1)
    return {
        "diff": float((la.sum() - lb.sum()) / n.sum()),
        "ci95": [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))],
        "n": int(len(n)),
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
    """One-sided sign test over modules (each a paired comparison): with 7 modules only 7 of 7 is significant."""
    tail = lambda k: sum(math.comb(n, i) for i in range(k, n + 1)) / 2**n  # P(X ≥ k) under a fair coin
    if n and tail(wins) < alpha:
        return "reproduced"
    if n and tail(n - wins) < alpha:
        return "not reproduced"
    return "inconclusive"


def _both(a: str, b: str) -> str:
    """Two conditions that must both hold: reproduced only if both are, not reproduced if either is refuted."""
    if "not reproduced" in (a, b):
        return "not reproduced"
    return "reproduced" if a == b == "reproduced" else "inconclusive"


def _pm(d: dict, scale: float = 100) -> str:
    return f"{scale * d['diff']:+.1f}, 95% CI [{scale * d['ci95'][0]:+.1f}, {scale * d['ci95'][1]:+.1f}]"


def table1(deactivation: dict) -> tuple[list[tuple[str, str, str]], dict]:
    """Per input: top > random > bottom in perplexity, each by a paired interval over examples; also bottom vs base."""
    verdicts, intervals = [], {}
    p = deactivation.get("percent", 3.0)
    for inp, per in (deactivation.get("per_example") or {}).items():
        n = per["base"]["n_tokens"]
        d = {
            (x, y): log_ppl_difference(per[x]["losses"], per[y]["losses"], n)
            for x, y in (("top", "random"), ("random", "bottom"), ("bottom", "base"))
        }
        intervals[inp] = {f"{x} vs {y}": v for (x, y), v in d.items()}
        verdict = _both(
            verdict_from_interval(d["top", "random"]["ci95"]), verdict_from_interval(d["random", "bottom"]["ci95"])
        )
        ratio = lambda v: f"×{math.exp(v['diff']):.3g} [{math.exp(v['ci95'][0]):.3g}, {math.exp(v['ci95'][1]):.3g}]"
        claim = (
            f"removing the top {p:g}% by importance ({inp} input) hurts perplexity more than a random {p:g}%, and a "
            f"random {p:g}% more than the bottom {p:g}% (top/random {ratio(d['top', 'random'])}, random/bottom "
            f"{ratio(d['random', 'bottom'])}, bottom/base {ratio(d['bottom', 'base'])}; n={d['top', 'random']['n']})"
        )
        verdicts.append(("Table 1", claim, verdict))
    return verdicts, intervals


def shift(js: dict[str, float], noise: float | None) -> list[tuple[str, str, str]]:
    """§2.3.2 (Full-FT shifts the distribution) and Fig. 3 (the mitigations shift it less), against the floor."""
    if "Full-FT" not in js:
        return []
    floor = "not measured" if noise is None else f"{noise:.4f}"
    out = [
        (
            "§2.3.2",
            f"speech fine-tuning shifts the layer-wise textual importance distribution (Full-FT JS divergence "
            f"{js['Full-FT']:.4f}, noise floor {floor})",
            shift_verdict(js["Full-FT"], noise),
        )
    ]
    for other in ("Layer-LR", "LoRA"):
        if other in js:
            out.append(
                (
                    "Fig. 3",
                    f"{other} keeps the textual importance distribution closer to the base than Full-FT (JS divergence "
                    f"{js[other]:.4f} vs {js['Full-FT']:.4f}, noise floor {floor})",
                    shift_verdict(js["Full-FT"] - js[other], noise),
                )
            )
    return out


def fig4(per_module: dict[str, dict[str, float]]) -> list[tuple[str, str, str]]:
    """LoRA's updates gather in rows and columns more than Layer-LR's: a sign test over the module types."""
    if "LoRA" not in per_module or "Layer-LR" not in per_module:
        return []
    mods = sorted(set(per_module["LoRA"]) & set(per_module["Layer-LR"]))
    wins = sum(per_module["LoRA"][m] > per_module["Layer-LR"][m] for m in mods)
    mean = {n: float(np.mean([per_module[n][m] for m in mods])) for n in ("LoRA", "Layer-LR")}
    claim = (
        f"LoRA's updates gather more in rows and columns than Layer-LR's (clustering ratio {mean['LoRA']:.2f} vs "
        f"{mean['Layer-LR']:.2f}; higher in {wins} of {len(mods)} modules)"
    )
    return [("Fig. 4", claim, sign_test_verdict(wins, len(mods)))]


def table2(preds: dict[str, dict], sets: list[str], labels: dict[str, str]) -> tuple[list[tuple[str, str, str]], dict]:
    """Full-FT loses T2T against No-FT; each mitigation keeps T2T and answers S2T better than Full-FT.
    `preds`: run → {(set, mode): {question id: correct}}."""
    verdicts, paired = [], {}
    if "full" in preds and "no-ft" in preds:
        for s in sets:
            d = paired_bootstrap(preds["no-ft"].get((s, "t2t"), {}), preds["full"].get((s, "t2t"), {}))
            paired[f"no-ft vs full / {s} t2t"] = d
            claim = f"Full-FT loses text competence: T2T on {s} drops (No-FT − Full-FT = {_pm(d)} points)"
            verdicts.append(("Table 2", claim, verdict_from_interval(d["ci95"])))
    for other in ("layer-lr", "lora"):
        if other in preds and "full" in preds:
            for s in sets:
                for m, what in (("t2t", "keeps T2T better"), ("s2t", "answers spoken questions better (S2T)")):
                    d = paired_bootstrap(preds[other].get((s, m), {}), preds["full"].get((s, m), {}))
                    paired[f"{other} vs full / {s} {m}"] = d
                    claim = f"{labels[other]} {what} than Full-FT on {s} ({_pm(d)} points, n={d['n']})"
                    verdicts.append(("Table 2", claim, verdict_from_interval(d["ci95"])))
    return verdicts, paired
