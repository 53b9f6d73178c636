"""Train / test / importance splits, as in the paper: a held-out test set of 500 examples disjoint
from training, and an importance subset of 1/30 of the training data (used to score parameters)."""

from __future__ import annotations

import hashlib
import json
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from textkeep.data.records import Record
from textkeep.errors import TextkeepError
from textkeep.fileio import write_json

SPLITS_FILE = "splits.json"


@dataclass(frozen=True)
class Splits:
    train: list[Record]
    test: list[Record]
    importance: list[Record]  # a subset of train
    seed: int = 0


def _rank(seed: int, salt: str, rec_id: str) -> bytes:
    return hashlib.sha256(f"{seed}\x1f{salt}\x1f{rec_id}".encode()).digest()


def make_splits(
    records: list[Record], *, test_size: int = 500, importance_fraction: float = 1 / 30, seed: int = 0
) -> Splits:
    """Split `records` into disjoint train and test sets and pick the importance subset of train.

    Each record is ranked by a hash of (seed, id): the `test_size` lowest go to test. This depends
    only on the ids, not on the input order, and adding records later moves few of the old ones.
    `test_size` is clipped to half the data (with a warning) so that training keeps the larger part.
    The importance subset has max(1, round(len(train) * importance_fraction)) records. Every split
    keeps the input order.
    """
    if not records:
        raise TextkeepError("make_splits got no records; load a data set first (did a filter drop everything?).")
    if test_size < 0 or not 0 < importance_fraction <= 1:
        raise TextkeepError(
            f"make_splits: need test_size >= 0 and 0 < importance_fraction <= 1, "
            f"got {test_size} and {importance_fraction}."
        )
    ids = [r.id for r in records]
    dup = next((i for i, n in Counter(ids).items() if n > 1), None)
    if dup is not None:
        raise TextkeepError(
            f"make_splits: id {dup!r} occurs more than once, so train and test could not be kept apart; "
            "give every record a unique id."
        )
    if test_size > len(records) // 2:
        warnings.warn(
            f"test_size={test_size} is too large for {len(records)} records; using {len(records) // 2}.", stacklevel=2
        )
        test_size = len(records) // 2
    test_ids = set(sorted(ids, key=lambda i: _rank(seed, "test", i))[:test_size])
    train = [r for r in records if r.id not in test_ids]
    n_imp = max(1, round(len(train) * importance_fraction))
    imp_ids = set(sorted((r.id for r in train), key=lambda i: _rank(seed, "importance", i))[:n_imp])
    return Splits(
        train=train,
        test=[r for r in records if r.id in test_ids],
        importance=[r for r in train if r.id in imp_ids],
        seed=seed,
    )


def save_split_ids(splits: Splits, out_dir: Path) -> Path:
    """Write `out_dir/splits.json` ({"seed", "test", "train", "importance"}: lists of ids) atomically."""
    path = Path(out_dir) / SPLITS_FILE
    write_json(
        path,
        {
            "seed": splits.seed,
            "test": [r.id for r in splits.test],
            "train": [r.id for r in splits.train],
            "importance": [r.id for r in splits.importance],
        },
    )
    return path


def load_split_ids(path: Path) -> dict:
    """Read a splits.json (or the one inside a folder) written by `save_split_ids`."""
    path = Path(path)
    if path.is_dir():
        path = path / SPLITS_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TextkeepError(
            f"{path} not found; run make_splits + save_split_ids first, or point at the run folder that has it."
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TextkeepError(f"{path} is not valid JSON ({e}); delete it and save the splits again.") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("test", "train", "importance")):
        raise TextkeepError(
            f"{path} lacks the 'test', 'train' and 'importance' id lists; delete it and save the splits again."
        )
    return data


def apply_split_ids(records: list[Record], path: Path) -> Splits:
    """Rebuild the saved splits from freshly loaded records, in the saved order.

    Every saved id must be among `records` (else the data changed: error). Records that are in no
    saved split are left out, with a warning.
    """
    saved = load_split_ids(path)
    by_id = {r.id: r for r in records}
    wanted = [i for k in ("test", "train", "importance") for i in saved[k]]
    missing = [i for i in wanted if i not in by_id]
    if missing:
        raise TextkeepError(
            f"{path}: {len(set(missing))} saved ids are not in the loaded data (first: {missing[0]!r}); "
            "load the same data set the splits were made from, or make new splits."
        )
    unused = len(by_id.keys() - set(wanted))
    if unused:
        warnings.warn(f"{unused} records are in no split saved in {path}; they are left out.", stacklevel=2)
    return Splits(
        train=[by_id[i] for i in saved["train"]],
        test=[by_id[i] for i in saved["test"]],
        importance=[by_id[i] for i in saved["importance"]],
        seed=int(saved.get("seed", 0)),
    )
