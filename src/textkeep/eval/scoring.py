"""Answer scoring for the short-answer QA sets (LLaMA Questions, Web Questions).

Two rules from the speech-LLM literature, both "does a gold answer appear in the response":

* `has_answer` (the default; UltraEval-Audio's rule): token-sequence match after NFD + lower-case.
* `contains` (VITA-Audio's looser rule): every word of a gold answer is a substring of the response,
  retried with number words turned into digits.

docs/scoring.md shows both rules on the exact cases that tests/eval/test_scoring.py checks.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Iterable, Sequence

import numpy as np

from textkeep.errors import TextkeepError

# ---------------------------------------------------------------------------------------------
# has_answer


def _tokens(text: str) -> list[str]:
    # NFD splits "ã" into "a" + combining tilde; keeping marks inside words makes NFC and NFD
    # spellings equal while "sao" and "são" stay different: accents must match.
    text = unicodedata.normalize("NFD", text.lower())
    tokens, word = [], []
    for ch in text:
        if unicodedata.category(ch)[0] in "LNM":
            word.append(ch)
            continue
        if word:
            tokens.append("".join(word))
            word = []
        if not ch.isspace():
            tokens.append(ch)
    if word:
        tokens.append("".join(word))
    return tokens


def has_answer(response: str, answers: Sequence[str]) -> bool:
    """True when the tokens of any non-empty gold answer occur contiguously in the response's."""
    got = _tokens(response)
    for answer in answers:
        want = _tokens(answer)
        k = len(want)
        if k and any(got[i : i + k] == want for i in range(len(got) - k + 1)):
            return True
    return False


def word_error_rate(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Corpus WER (jiwer) over the words `has_answer` sees, punctuation dropped: how well a transcript was heard."""
    import jiwer

    def words(text: str) -> str:
        return " ".join(t for t in _tokens(text) if unicodedata.category(t[0])[0] in "LN")

    refs = [words(r) for r in references]
    if not refs or not all(refs):
        raise TextkeepError("word_error_rate needs a non-empty reference for every hypothesis.")
    return float(jiwer.wer(refs, [words(h) for h in hypotheses]))


# ---------------------------------------------------------------------------------------------
# contains

# The rule keeps apostrophes, so it has to say what one is: gold answers mix ' and ’ (Web Questions
# has both), and a model's typography should not decide correctness.
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u02bc": "'"})


def _fold(text: str) -> str:
    # NFC, not NFD: under NFD "cafe" would be a substring of "café" and accents would stop mattering.
    return unicodedata.normalize("NFC", text.lower()).translate(_APOSTROPHES)


def _gold_words(answer: str) -> list[str]:
    chars = (" " if unicodedata.category(c)[0] in "PS" and c != "'" else c for c in _fold(answer))
    return "".join(chars).split()


# Number words -> digits. A hand-written reader of cardinals below 10**12 is all this needs, so no
# maintained library (word2number, num2words, ...) is worth a dependency. Ordinals are left alone:
# "second" is far more often a unit of time than "2nd". Years read in pairs ("nineteen eighty-four")
# are not joined either; they come out as "19 84".
_UNITS = {
    w: i
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
        "fifteen sixteen seventeen eighteen nineteen".split()
    )
}
_TENS = {w: 10 * i for i, w in enumerate("twenty thirty forty fifty sixty seventy eighty ninety".split(), start=2)}
_SCALES = {"thousand": 10**3, "million": 10**6, "billion": 10**9}
_NUMBER_WORD = "|".join(sorted([*_UNITS, *_TENS, "hundred", *_SCALES], key=len, reverse=True))
_NUMBER_RUN = re.compile(rf"\b(?:{_NUMBER_WORD})(?:(?:\s+and\s+|[\s-]+)(?:{_NUMBER_WORD}))*\b")
_GROUPED_DIGITS = re.compile(r"(?<=\d),(?=\d{3}\b)")


def _read_number(words: list[str], i: int) -> tuple[int, int]:
    """The longest well-formed number starting at words[i]: (value, index after it)."""
    total = group = 0
    last, cap, j = None, math.inf, i
    while j < len(words):
        w = words[j]
        opens_group = last in (None, "hundred", "scale", "and")
        if w == "zero":
            ok = last is None
        elif w in _UNITS:
            ok = opens_group or (last == "ten" and _UNITS[w] < 10)
        elif w in _TENS:
            ok = opens_group
        elif w == "hundred":
            ok = last in ("unit", "ten") and group < 100
        elif w in _SCALES:
            ok = last in ("unit", "ten", "hundred") and _SCALES[w] < cap
        else:  # "and" only joins "hundred"/"thousand"... to what follows: "one and two" is not 3
            nxt = words[j + 1] if j + 1 < len(words) else ""
            ok = last in ("hundred", "scale") and (nxt in _TENS or _UNITS.get(nxt, 0) > 0)
        if not ok:
            break
        if w in _UNITS:
            group, last = group + _UNITS[w], "unit"
        elif w in _TENS:
            group, last = group + _TENS[w], "ten"
        elif w == "hundred":
            group, last = group * 100, "hundred"
        elif w in _SCALES:
            total, group, cap, last = total + group * _SCALES[w], 0, _SCALES[w], "scale"
        else:
            last = "and"
        j += 1
        if w == "zero":
            break
    return total + group, j


def _numbers_to_digits(text: str) -> str:
    def convert(match: re.Match) -> str:
        words, out, i = re.split(r"[\s-]+", match.group()), [], 0
        while i < len(words):
            value, j = _read_number(words, i)
            out.append(str(value) if j > i else words[i])
            i = max(j, i + 1)
        return " ".join(out)

    return _GROUPED_DIGITS.sub("", _NUMBER_RUN.sub(convert, text))


def contains(response: str, answers: Sequence[str]) -> bool:
    """True when every word of some gold answer is a substring of the response (then with digits)."""
    text = _fold(response)
    golds = [words for a in answers if (words := _gold_words(a))]
    if any(all(w in text for w in words) for words in golds):
        return True
    text = _numbers_to_digits(text)
    return any(all(w in text for w in _numbers_to_digits(" ".join(words)).split()) for words in golds)


SCORERS = {"has_answer": has_answer, "contains": contains}

# ---------------------------------------------------------------------------------------------
# aggregation


def bootstrap_ci(
    correct: Sequence[bool], n_boot: int = 10000, alpha: float = 0.05, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the accuracy; (nan, nan) for no data."""
    x = np.asarray(correct, dtype=bool)
    if x.size == 0:
        return math.nan, math.nan
    # For 0/1 data the number of hits in a resample of size n is exactly Binomial(n, mean), so we
    # draw that instead of an (n_boot, n) index matrix: same distribution, O(n_boot) memory.
    rng = np.random.default_rng(seed)
    means = rng.binomial(x.size, x.mean(), size=n_boot) / x.size
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def summarize(rows: Iterable[dict], scorers: Sequence[str] = ("has_answer", "contains")) -> dict:
    """{set: {modality: {scorer: {"accuracy", "n", "ci95": [lo, hi]}}}} from scored predictions."""
    hits: dict[str, dict[str, dict[str, list[bool]]]] = {}
    for row in rows:
        by_scorer = hits.setdefault(row["set"], {}).setdefault(row["modality"], {})
        for name in scorers:
            if name not in row["correct"]:
                raise TextkeepError(
                    f"prediction {row.get('id', '?')} ({row['set']}/{row['modality']}) has no "
                    f"'{name}' score; re-score the predictions or leave '{name}' out of scorers"
                )
            by_scorer.setdefault(name, []).append(bool(row["correct"][name]))
    return {
        set_name: {
            modality: {
                name: {
                    "accuracy": float(np.mean(flags)),
                    "n": len(flags),
                    "ci95": list(bootstrap_ci(flags)),
                }
                for name, flags in by_scorer.items()
            }
            for modality, by_scorer in by_modality.items()
        }
        for set_name, by_modality in hits.items()
    }
