import json
import math
import unicodedata
from pathlib import Path

import numpy as np
import pytest

from textkeep.errors import TextkeepError
from textkeep.eval.scoring import (
    SCORERS,
    _numbers_to_digits,
    bootstrap_ci,
    contains,
    has_answer,
    summarize,
)

ROOT = Path(__file__).resolve().parents[2]

NFC = lambda s: unicodedata.normalize("NFC", s)  # noqa: E731
NFD = lambda s: unicodedata.normalize("NFD", s)  # noqa: E731

# (response, gold answers, has_answer, contains, why). docs/scoring.md shows exactly this table;
# test_doc_table_is_the_golden_cases keeps the two in step.
CASES = [
    ("The capital of France is Paris.", ["Paris"], True, True, "plain hit"),
    ("PARIS!", ["paris"], True, True, "case is ignored"),
    ("She was a Parisian painter.", ["Paris"], False, True, "token match vs substring"),
    (NFC("He was born in São Paulo."), [NFD("São Paulo")], True, True, "response NFC, gold NFD: same text"),
    ("He was born in Sao Paulo.", ["São Paulo"], False, False, "accents must match"),
    ("Meet me at the cafe.", ["café"], False, False, "accents must match"),
    ("Meet me at the café.", ["cafe"], False, False, "accents must match, the other way round"),
    ("It is Washington, D.C., I think.", ["Washington, D.C."], True, True, "punctuation in both"),
    ("washington dc", ["Washington, D.C."], False, True, "gold punctuation: tokens vs spaces"),
    ("I love New York in June.", ["New York"], True, True, "multi-word, in order"),
    ("York, not New Jersey.", ["New York"], False, True, "multi-word, out of order"),
    ("The answer is twenty one.", ["21"], False, True, "number words in the response"),
    ("The answer is 21.", ["twenty-one"], False, True, "number words in the gold"),
    ("It has one hundred and five rooms.", ["105"], False, True, "'and' inside a number"),
    ("Three.", ["3"], False, True, "single number word"),
    ("About 1,000 people.", ["one thousand"], False, True, "digit grouping commas dropped"),
    ("Pick one and two.", ["3"], False, False, "'and' between numbers is not a sum"),
    ("Someone called.", ["1"], False, False, "number words only as whole words"),
    ("In the 21st century.", ["twenty-first"], False, False, "ordinals are not converted"),
    ("Nineteen eighty-four.", ["1984"], False, False, "years read in pairs are not joined"),
    ("It was Rome, not Paris.", ["Madrid", "Rome"], True, True, "second gold answer hits"),
    ("", ["Paris"], False, False, "empty response"),
    ("Paris", [], False, False, "no gold answers"),
    ("Paris", ["", " "], False, False, "blank gold answers never hit"),
    ("I read Ender's Game.", ["Ender's Game"], True, True, "apostrophe kept"),
    ("I read Enders Game.", ["Ender's Game"], False, False, "missing apostrophe"),
    (
        "I read Ender\u2019s Game.",
        ["Ender's Game"],
        False,
        True,
        "curly apostrophe: contains folds it, has_answer does not",
    ),
]


@pytest.mark.parametrize("response,golds,want_has,want_contains,why", CASES, ids=[c[4] for c in CASES])
def test_golden(response, golds, want_has, want_contains, why):
    assert has_answer(response, golds) is want_has
    assert contains(response, golds) is want_contains


def test_golden_cases_really_mix_normal_forms():
    sao = CASES[3]
    assert sao[0] != NFD(sao[0]) and sao[1][0] == NFD(sao[1][0])


def test_scorers_registry():
    assert SCORERS == {"has_answer": has_answer, "contains": contains}


@pytest.mark.parametrize(
    "text,want",
    [
        ("twenty-one", "21"),
        ("twenty one", "21"),
        ("one hundred and five", "105"),
        ("two thousand and twenty-four", "2024"),
        ("one hundred thousand", "100000"),
        ("five million three hundred thousand and one", "5300001"),
        ("nineteen hundred", "1900"),
        ("zero", "0"),
        ("a forty-two-year-old", "a 42-year-old"),
        ("one and two", "1 and 2"),
        ("one two three", "1 2 3"),
        ("twenty twenty", "20 20"),
        ("someone", "someone"),
        ("no numbers here", "no numbers here"),
    ],
)
def test_numbers_to_digits(text, want):
    assert _numbers_to_digits(text) == want


def _doc_rows():
    """The rows of the worked-examples table in docs/scoring.md, parsed back."""
    yesno = {"yes": True, "no": False}
    rows = []
    for line in (ROOT / "docs" / "scoring.md").read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0].startswith("`"):
            rows.append(
                (json.loads(cells[0].strip("`")), json.loads(cells[1].strip("`")), yesno[cells[2]], yesno[cells[3]])
            )
    return rows


def test_doc_table_is_the_golden_cases():
    assert _doc_rows() == [c[:4] for c in CASES]


def test_bootstrap_contains_mean_and_is_deterministic():
    rng = np.random.default_rng(1)
    flags = list(rng.random(300) < 0.6)
    lo, hi = bootstrap_ci(flags)
    assert lo < np.mean(flags) < hi
    assert bootstrap_ci(flags, seed=0) == (lo, hi)
    assert bootstrap_ci(flags, seed=1) != (lo, hi)


def test_bootstrap_narrows_with_n():
    def width(n):
        lo, hi = bootstrap_ci([i % 10 < 7 for i in range(n)])
        return hi - lo

    assert width(2000) < width(200) / 2 < width(20) / 4


def test_bootstrap_matches_explicit_resampling():
    flags = np.arange(200) % 5 < 3  # accuracy 0.6
    rng = np.random.default_rng(0)
    means = flags[rng.integers(0, flags.size, size=(10000, flags.size))].mean(axis=1)
    want = np.quantile(means, [0.025, 0.975])
    assert np.allclose(bootstrap_ci(list(flags)), want, atol=0.01)


def test_bootstrap_edges():
    assert all(math.isnan(v) for v in bootstrap_ci([]))
    assert bootstrap_ci([True] * 5) == (1.0, 1.0)
    assert bootstrap_ci([False] * 5) == (0.0, 0.0)


def _row(set_name, modality, has, con):
    return {"set": set_name, "modality": modality, "correct": {"has_answer": has, "contains": con}}


def test_summarize_matches_hand_count():
    rows = [
        _row("llama_questions", "t2t", True, True),
        _row("llama_questions", "t2t", False, True),
        _row("llama_questions", "t2t", False, False),
        _row("llama_questions", "s2t", True, True),
        _row("web_questions", "s2t", False, True),
        _row("web_questions", "s2t", False, False),
    ]
    out = summarize(rows)
    assert set(out) == {"llama_questions", "web_questions"}
    assert set(out["llama_questions"]) == {"t2t", "s2t"} and set(out["web_questions"]) == {"s2t"}
    counts = {
        (s, m, k): (v["accuracy"], v["n"])
        for s, by_m in out.items()
        for m, by_k in by_m.items()
        for k, v in by_k.items()
    }
    assert counts == {
        ("llama_questions", "t2t", "has_answer"): (1 / 3, 3),
        ("llama_questions", "t2t", "contains"): (2 / 3, 3),
        ("llama_questions", "s2t", "has_answer"): (1.0, 1),
        ("llama_questions", "s2t", "contains"): (1.0, 1),
        ("web_questions", "s2t", "has_answer"): (0.0, 2),
        ("web_questions", "s2t", "contains"): (0.5, 2),
    }
    cell = out["llama_questions"]["t2t"]["contains"]
    assert isinstance(cell["ci95"], list) and cell["ci95"] == list(bootstrap_ci([True, True, False]))
    assert cell["ci95"][0] <= cell["accuracy"] <= cell["ci95"][1]
    json.dumps(out)  # goes straight into a report file


def test_summarize_one_scorer_and_missing_score():
    rows = [_row("llama_questions", "t2t", True, False)]
    assert set(summarize(rows, scorers=("contains",))["llama_questions"]["t2t"]) == {"contains"}
    del rows[0]["correct"]["contains"]
    with pytest.raises(TextkeepError, match="contains"):
        summarize(rows)


def _real_gold_answers(data_dir):
    answers = []
    tsv = data_dir / "llama_questions" / "llama_questions_300.tsv"
    wq = data_dir / "webquestions" / "test.json"
    for line in tsv.read_text(encoding="utf-8").splitlines()[1:]:
        answers.append(line.split("\t")[1].strip())
    for q in json.loads(wq.read_text(encoding="utf-8")):
        answers.extend(q["answers"])
    return answers


@pytest.mark.real
def test_every_real_gold_answer_scores_itself(data_dir):
    # A response that is the gold answer (in the other normal form, in upper case) must count.
    answers = _real_gold_answers(data_dir)
    assert len(answers) > 5000
    for a in answers:
        assert has_answer(NFD(a).upper(), [a]), a
        assert contains(NFD(a).upper(), [a]), a


def test_word_error_rate_counts_edits_over_reference_words_without_case_or_punctuation():
    from textkeep.eval.scoring import word_error_rate

    # "what is the capital of france" → "what is the": 3 deletions of 6; "who wrote hamlet" → "who wrote omelet":
    # 1 substitution of 3; "a b" → "a x b": 1 insertion of 2. Corpus WER = (3 + 1 + 1) / (6 + 3 + 2).
    refs = ["What is the capital of France?", "Who wrote Hamlet?", "a b"]
    hyps = ["what is the?", "who wrote omelet", "A x, b."]
    assert word_error_rate(refs, hyps) == pytest.approx(5 / 11)
    assert word_error_rate(refs, refs) == 0.0
    with pytest.raises(TextkeepError, match="non-empty reference"):
        word_error_rate(["?"], ["what"])
