import json
import os
import random

import pytest

from textkeep.data.datasets import load_dataset
from textkeep.data.records import Record
from textkeep.data.splits import apply_split_ids, load_split_ids, make_splits, save_split_ids
from textkeep.errors import TextkeepError


def _records(n: int) -> list[Record]:
    return [Record(id=f"r{i}", instruction=f"question {i}", response=f"answer {i}") for i in range(n)]


def _ids(recs: list[Record]) -> list[str]:
    return [r.id for r in recs]


def _check(splits, n: int, test_size: int, n_importance: int):
    train, test, imp = set(_ids(splits.train)), set(_ids(splits.test)), set(_ids(splits.importance))
    assert len(splits.test) == len(test) == test_size
    assert len(splits.train) == len(train) == n - test_size
    assert not train & test
    assert len(splits.importance) == n_importance and imp <= train


def test_sizes_disjoint_and_importance_subset():
    recs = _records(3000)
    s = make_splits(recs)
    _check(s, 3000, 500, round(2500 / 30))
    assert s.seed == 0
    train = set(_ids(s.train))
    assert _ids(s.train) == [r.id for r in recs if r.id in train]  # input order kept


def test_deterministic_and_seed_dependent():
    recs = _records(2000)
    a, b = make_splits(recs, seed=3), make_splits(recs, seed=3)
    assert (_ids(a.train), _ids(a.test), _ids(a.importance)) == (_ids(b.train), _ids(b.test), _ids(b.importance))
    shuffled = recs[:]
    random.Random(1).shuffle(shuffled)
    assert set(_ids(make_splits(shuffled, seed=3).test)) == set(_ids(a.test))  # order does not matter
    c = make_splits(recs, seed=4)
    assert set(_ids(c.test)) != set(_ids(a.test))
    assert set(_ids(c.importance)) != set(_ids(a.importance))


def test_small_data_clips_test_size_with_warning():
    with pytest.warns(UserWarning, match="test_size=500.*40 records"):
        s = make_splits(_records(40))
    _check(s, 40, 20, 1)  # round(20/30) = 1
    tiny = make_splits(_records(5), test_size=1, importance_fraction=0.01)
    _check(tiny, 5, 1, 1)  # at least one importance example
    _check(make_splits(_records(300), test_size=30, importance_fraction=0.5), 300, 30, 135)


def test_bad_arguments():
    with pytest.raises(TextkeepError, match="no records"):
        make_splits([])
    with pytest.raises(TextkeepError, match="'r1' occurs more than once"):
        make_splits(_records(3) + _records(2)[1:])
    with pytest.raises(TextkeepError, match="importance_fraction"):
        make_splits(_records(10), importance_fraction=0)


def test_save_and_apply_round_trip(tmp_path):
    recs = _records(1200)
    s = make_splits(recs, seed=7)
    path = save_split_ids(s, tmp_path / "run")
    assert path == tmp_path / "run" / "splits.json" and os.listdir(tmp_path / "run") == ["splits.json"]
    saved = json.loads(path.read_text(encoding="utf-8"))
    assert saved == {"seed": 7, "test": _ids(s.test), "train": _ids(s.train), "importance": _ids(s.importance)}
    assert load_split_ids(tmp_path / "run") == saved
    fresh = [Record.from_json(r.to_json()) for r in reversed(recs)]  # reloaded data, other order
    again = apply_split_ids(fresh, path)
    assert again == s


def test_apply_errors(tmp_path):
    s = make_splits(_records(100), test_size=10)
    path = save_split_ids(s, tmp_path)
    with pytest.raises(TextkeepError, match="saved ids are not in the loaded data"):
        apply_split_ids(_records(50), path)
    with pytest.warns(UserWarning, match="5 records are in no split"):
        apply_split_ids(_records(105), path)
    with pytest.raises(TextkeepError, match="not found"):
        load_split_ids(tmp_path / "elsewhere")
    path.write_text('{"test": []}', encoding="utf-8")
    with pytest.raises(TextkeepError, match="lacks"):
        load_split_ids(path)


def test_real_web_questions_train(data_dir, tmp_path):  # data_dir (tests/conftest.py) skips without real data
    recs = load_dataset("web-questions:train")
    s = make_splits(recs)
    _check(s, 2834, 500, round(2334 / 30))
    assert apply_split_ids(load_dataset("web-questions:train"), save_split_ids(s, tmp_path)) == s
