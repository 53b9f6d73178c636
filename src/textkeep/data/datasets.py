"""Load every data set textkeep uses into a list of `Record`s, through one entry point.

Built-in names read the local copy under $TEXTKEEP_DATA_DIR (see /work/shared/data/README.md):

    llama-questions                       llama_questions/llama_questions_300.tsv + wav/N.wav
    web-questions[:test|train|val|devtest] webquestions/{test,trainmodel,val,devtest}.json
    web-questions-answers[:train|val]     the gold answers of those questions, each in a question frame
    alpaca, alpaca-gpt4                   alpaca/alpaca_cleaned.json, alpaca/alpaca_gpt4_sample.json

Anything else is a path to a JSON list, JSONL, CSV or TSV file, or a Hugging Face hub id.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import re
import unicodedata
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

from textkeep.data.records import Record
from textkeep.errors import TextkeepError
from textkeep.fileio import write_text
from textkeep.settings import cache_dir, data_dir

# Our field names; `fields=` maps them to a file's columns. `input` is Alpaca's optional context.
FIELDS = ("id", "instruction", "response", "answers", "audio", "input")

_WQ_SPLITS = {"test": "test.json", "train": "trainmodel.json", "val": "val.json", "devtest": "devtest.json"}
_ALPACA_FILES = {"alpaca": "alpaca_cleaned.json", "alpaca-gpt4": "alpaca_gpt4_sample.json"}
BUILTIN = ("llama-questions", "web-questions", "web-questions-answers", *_ALPACA_FILES)

# Question frames for `web-questions-answers`, in Web Questions' own style (lower case, a question mark).
ANSWER_FRAMES = (
    "who is {}?", "what is {}?", "where is {}?", "tell me about {}.", "what do you know about {}?",
    "what is {} known for?", "when did {} happen?", "is {} famous?", "what about {}?", "who was {}?",
)  # fmt: skip

# Column names of the hub copies (split, field map), used when the caller gives no `fields`.
_HUB = {
    "fixie-ai/llama-questions": (
        "test",
        {"instruction": "question", "answers": "answer", "response": "answer", "audio": "audio"},
    ),
    "chiuanhsiao/spoken-web-questions": ("test", {"instruction": "question", "answers": "answers", "audio": "audio"}),
    "vicgalle/alpaca-gpt4": ("train", {"instruction": "instruction", "input": "input", "response": "output"}),
}


# What undecodable bytes turn into under errors="surrogateescape".
_UNDECODED = re.compile("[\udc80-\udcff]")


class _BadRow(Exception):
    def __init__(self, reason: str, fix: str):
        super().__init__(reason)
        self.reason, self.fix = reason, fix


@dataclass
class _Spec:
    """How one file's rows become records."""

    path: Path
    source: str
    fields: dict[str, str]
    required: set[str] = field(default_factory=lambda: {"instruction"})  # the column must be there
    nonempty: set[str] = field(default_factory=set)  # ... and not empty (the instruction always must)
    id_from: str = "column"  # column | index | audio | hash
    id_prefix: str = ""
    audio_dir: Path | None = None
    meta: dict = field(default_factory=dict)


def load_dataset(
    name_or_path: str,
    *,
    fields: dict[str, str] | None = None,
    skip_bad: bool = False,
    bad_report: Path | None = None,
) -> list[Record]:
    """Load a built-in data set, a local file or a hub data set as a list of `Record`s.

    Every string is stripped and CRLF becomes LF, so no field carries a `\\r` or trailing space.

    Alpaca-style rows (`instruction`, `input`, `output`): the spoken query is the instruction, plus
    "\\n" + input when the input is non-empty. The paper's Spoken-Alpaca-GPT4 speaks only the
    instruction; we append the input so that the query is self-contained (a TTS of it carries
    everything the answer depends on). The bare input is kept in `meta["input"]`.

    Ids: built-in sets use `lq-<wav stem>`, `wq-<qId>`, `alpaca-<index>` / `alpaca-gpt4-<index>`
    (0-based position in the file). A user file uses its `id` column when it has one; otherwise
    `text-<12 hex digits of sha1(instruction, response)>`, so that ids (and saved splits) survive
    reordering or inserting rows. Identical rows get `-2`, `-3`, ... appended.

    User files: `fields` maps our names (id, instruction, response, answers, audio, input) to the
    file's columns; unmapped names default to the column of the same name, and `response` to
    `output` when the file has that column. `answers` may be a list or a `|`-separated string;
    `response` defaults to the first answer. Relative audio paths resolve against the file's folder.

    A bad row (not an object, missing a field, not UTF-8, empty instruction, missing WAV, repeated id)
    raises a TextkeepError naming the file, the row (1-based; plus the line for text formats) and
    the fix. With `skip_bad=True` such rows are dropped instead and, when `bad_report` is given,
    written there as JSONL (always written, empty when nothing was bad). Problems with the file as a
    whole (missing, unparseable JSON, no rows) always raise.
    """
    name, _, split = name_or_path.partition(":")
    if name == "web-questions-answers":
        return answer_utterances(split)
    if name in BUILTIN:
        spec = _builtin_spec(name, split)
        return _load(spec, _read_rows(spec.path), skip_bad, bad_report)
    path = Path(name_or_path).expanduser()
    if (
        path.exists()
        or path.suffix.lower() in (".json", ".jsonl", ".csv", ".tsv")
        or name_or_path.startswith((".", "/", "~"))
    ):
        rows = _read_rows(path)
        first = next(rows, None)  # the first row's columns decide the default field mapping
        spec = _file_spec(path, fields, first[2] if first else None)
        return _load(spec, itertools.chain([first] if first else [], rows), skip_bad, bad_report)
    if "/" in name_or_path:
        return _load_hub(name, split, fields)
    raise TextkeepError(
        f"Unknown data set {name_or_path!r}: not a built-in name ({', '.join(BUILTIN)}), "
        "an existing file, or a hub id (owner/name). Check the spelling or the path."
    )


def answer_utterances(split: str = "train") -> list[Record]:
    """`web-questions-answers[:train|val]`: every distinct gold answer of a Web Questions training split, lower-cased
    in one of ANSWER_FRAMES (chosen by a hash of the answer), to speak for alignment.

    The answers are mostly names (people, places, teams, works), which the questions hold too and a CTC head
    hears worst. `meta["of"]` lists the ids of the questions it answers, so that alignment holds an answer out
    with its question.
    They have no gold answers themselves: they are never held out or scored. Test is refused: it is for reporting.
    """
    split = split or "train"
    if split not in ("train", "val"):
        raise TextkeepError(f"web-questions-answers has splits train and val (got {split!r}): test is for reporting.")
    of: dict[str, list[str]] = {}  # answer text → the ids of the questions it answers, in file order
    for q in load_dataset(f"web-questions:{split}"):
        for answer in q.answers:
            text = " ".join(answer.lower().split())
            if "://" not in text and "www." not in text:  # a few answers are URLs, which no one says
                of.setdefault(text, []).append(q.id)
    out = []
    for text, ids in of.items():
        frame = ANSWER_FRAMES[int(hashlib.sha256(text.encode()).hexdigest(), 16) % len(ANSWER_FRAMES)]
        out.append(
            Record(
                f"wqa-{hashlib.sha1(text.encode()).hexdigest()[:12]}",
                frame.format(text),
                source="web-questions-answers",
                meta={"split": split, "of": list(dict.fromkeys(ids))},
            )  # fmt: skip
        )
    return out


def attach_audio(records: list[Record], manifest_path: Path) -> list[Record]:
    """Set each record's `audio` from a TTS manifest JSONL (id, text, audio, voice, seconds, sha256).

    Relative audio paths resolve against the manifest's folder. Records the manifest does not cover
    keep their audio (a warning counts them); manifest rows for unknown ids are ignored.
    """
    manifest_path = Path(manifest_path)
    by_id: dict[str, tuple[Path, dict]] = {}
    for row, line, raw in _read_rows(manifest_path, fmt="jsonl"):
        where = f"{manifest_path}, row {row} (line {line})"
        if isinstance(raw, _BadRow) or not isinstance(raw, dict) or not raw.get("id") or not raw.get("audio"):
            raise TextkeepError(
                f"{where}: not a manifest row with `id` and `audio`; re-run `textkeep speak` to rebuild the manifest."
            )
        audio = _resolve(str(raw["audio"]), manifest_path.parent)
        if not audio.is_file():
            raise TextkeepError(
                f"{where}, id {raw['id']}: audio file {audio} does not exist; "
                "re-run `textkeep speak` or restore the file."
            )
        by_id[str(raw["id"])] = (audio, {k: raw[k] for k in ("voice", "seconds", "sha256") if k in raw})
    out, missing = [], 0
    for rec in records:
        hit = by_id.get(rec.id)
        if hit is None:
            missing += 1
            out.append(rec)
        else:
            out.append(replace(rec, audio=hit[0], meta={**rec.meta, **hit[1]}))
    if missing:
        warnings.warn(
            f"{manifest_path} has no audio for {missing} of {len(records)} records; they keep their previous audio.",
            stacklevel=2,
        )
    return out


def spoken_records(records: list[Record], spoken: Path | None, need_audio: bool, what: str) -> list[Record]:
    """Records with the audio of a TTS manifest (`spoken`, when given); with need_audio only those that have audio,
    refused with the fix when none has. `what` names the records in the message."""
    if spoken is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # records the manifest leaves out are dropped below, or unused
            records = attach_audio(records, Path(spoken))
    if not need_audio:
        return records
    heard = [r for r in records if r.audio is not None]
    if not heard:
        raise TextkeepError(
            f"speech inputs need audio, and none of the {len(records)} {what} has any; pass --spoken MANIFEST "
            "(from `textkeep speak`), or use text inputs."
        )
    return heard


def filter_records(
    records: list[Record],
    *,
    max_response_tokens: int | None = None,
    tokenizer: Any = None,
    max_query_words: int | None = None,
    dedupe: bool = False,
) -> list[Record]:
    """Keep records whose response fits `max_response_tokens` and whose query fits `max_query_words`.

    `tokenizer` is anything with `.encode(text, add_special_tokens=False)` (a transformers or
    tokenizers tokenizer) or a callable returning token ids. `dedupe` keeps the first record of each
    normalised instruction (case, Unicode form, punctuation and spacing ignored).
    """
    if max_response_tokens is not None and tokenizer is None:
        raise TextkeepError(
            "filter_records: max_response_tokens needs a tokenizer; pass tokenizer= (the LLM's) or drop the limit."
        )
    seen: set[str] = set()
    out = []
    for rec in records:
        if max_query_words is not None and len(rec.instruction.split()) > max_query_words:
            continue
        if max_response_tokens is not None and _count_tokens(tokenizer, rec.response) > max_response_tokens:
            continue
        if dedupe:
            key = normalise(rec.instruction)
            if key in seen:
                continue
            seen.add(key)
        out.append(rec)
    return out


def normalise(text: str) -> str:
    """The form under which two instructions count as duplicates."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(re.sub(r"[^\w\s]", " ", text).split())


def _count_tokens(tokenizer: Any, text: str) -> int:
    if hasattr(tokenizer, "encode"):
        ids = tokenizer.encode(text, add_special_tokens=False)
        return len(getattr(ids, "ids", ids))  # tokenizers.Tokenizer returns an Encoding
    return len(tokenizer(text))


# ---- built-in and user file specs ---------------------------------------------------------------


def _builtin_spec(name: str, split: str) -> _Spec:
    root = data_dir()
    if split and name != "web-questions":
        raise TextkeepError(f"Data set {name!r} has no splits (got {name}:{split}); use plain {name!r}.")
    if name == "llama-questions":
        folder = root / "llama_questions"
        return _Spec(
            _builtin_file(folder / "llama_questions_300.tsv"),
            "llama-questions",
            {"instruction": "Questions", "response": "Answer", "answers": "Answer", "audio": "Wav Filename"},
            required={"instruction", "answers", "audio"},
            nonempty={"answers", "audio"},
            id_from="audio",
            id_prefix="lq-",
            audio_dir=folder / "wav",
        )
    if name == "web-questions":
        split = split or "test"
        if split not in _WQ_SPLITS:
            raise TextkeepError(
                f"Unknown Web Questions split {split!r}; "
                f"use one of: {', '.join('web-questions:' + s for s in _WQ_SPLITS)}."
            )
        return _Spec(
            _builtin_file(root / "webquestions" / _WQ_SPLITS[split]),
            "web-questions",
            {"id": "qId", "instruction": "qText", "answers": "answers"},
            required={"id", "instruction", "answers"},
            nonempty={"answers"},
            id_prefix="wq-",
            meta={"split": split},
        )
    return _Spec(
        _builtin_file(root / "alpaca" / _ALPACA_FILES[name]),
        name,
        {"instruction": "instruction", "input": "input", "response": "output"},
        required={"instruction", "input", "response"},
        id_from="index",
        id_prefix=f"{name}-",
    )


def _builtin_file(path: Path) -> Path:
    if not path.is_file():
        raise TextkeepError(
            f"{path} not found: TEXTKEEP_DATA_DIR must point at the shared data folder laid out as in its README.md "
            "(llama_questions/, webquestions/, alpaca/)."
        )
    return path


def _file_spec(path: Path, fields: dict[str, str] | None, first: Any) -> _Spec:
    unknown = set(fields or ()) - set(FIELDS)
    if unknown:
        raise TextkeepError(
            f"fields= has unknown names {sorted(unknown)}; use only {', '.join(FIELDS)} (our name -> your column)."
        )
    columns = set(first) if isinstance(first, dict) else set()
    mapping = {k: k for k in FIELDS}
    if "output" in columns and "response" not in columns:  # Alpaca-style
        mapping["response"] = "output"
    mapping.update(fields or {})
    required = {"instruction"} | set(fields or ()) | ({"response"} if mapping["response"] == "output" else set())
    return _Spec(path, path.stem, mapping, required=required, id_from="column" if mapping["id"] in columns else "hash")


# ---- reading rows -------------------------------------------------------------------------------


def _read_rows(path: Path, fmt: str | None = None) -> Iterator[tuple[int, int | None, Any]]:
    """Yield (1-based row, line or None, row dict / raw value / _BadRow) from a JSON, JSONL, CSV or TSV file."""
    fmt = fmt or path.suffix.lower().lstrip(".")
    if fmt not in ("json", "jsonl", "csv", "tsv"):
        raise TextkeepError(
            f"{path}: unsupported file type {path.suffix!r}; use .json (a list of objects), .jsonl, .csv or .tsv."
        )
    if not path.is_file():
        raise TextkeepError(
            f"{path} not found; check the path (relative paths are from the current folder {Path.cwd()})."
        )
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        # Bad bytes become lone surrogates, so a mis-encoded row is reported as that row, not the whole file.
        text = data.decode("utf-8-sig", errors="surrogateescape")
        yield from (_flag_undecoded(r) for r in _parse_rows(path, fmt, text))
        return
    yield from _parse_rows(path, fmt, text)


def _flag_undecoded(item: tuple[int, int | None, Any]) -> tuple[int, int | None, Any]:
    row, line, raw = item
    if not isinstance(raw, _BadRow) and _UNDECODED.search(json.dumps(raw, ensure_ascii=False)):
        raw = _BadRow(
            "has bytes that are not valid UTF-8", "re-save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)"
        )
    return row, line, raw


def _parse_rows(path: Path, fmt: str, text: str) -> Iterator[tuple[int, int | None, Any]]:
    if fmt == "json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise TextkeepError(
                f"{path}: not valid JSON at line {e.lineno}, column {e.colno} ({e.msg}); fix the file there."
            ) from None
        if not isinstance(data, list):
            raise TextkeepError(
                f"{path}: expected a JSON list of objects, got {type(data).__name__}; "
                "wrap the rows in [...] or use JSONL."
            )
        yield from ((i, None, row) for i, row in enumerate(data, 1))
    elif fmt == "jsonl":
        row = 0
        for line_no, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            row += 1
            try:
                yield row, line_no, json.loads(line)
            except json.JSONDecodeError as e:
                yield row, line_no, _BadRow(f"is not valid JSON ({e.msg})", "fix or delete that line")
    else:
        # TSV does not quote: LLaMA Questions has `"` inside questions, which must stay as text.
        quoting = csv.QUOTE_NONE if fmt == "tsv" else csv.QUOTE_MINIMAL
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if fmt == "tsv" else ",", quoting=quoting)
        reader.fieldnames = [c.strip() for c in reader.fieldnames or []]
        for i, raw in enumerate(reader, 1):
            yield i, reader.line_num, raw


def _load(
    spec: _Spec, rows: Iterator[tuple[int, int | None, Any]], skip_bad: bool, bad_report: Path | None
) -> list[Record]:
    records: list[Record] = []
    bad: list[dict] = []
    seen: dict[str, int] = {}
    n_rows = 0
    for row, line, raw in rows:
        n_rows += 1
        rec_id = None
        try:
            rec = _build(spec, row, raw)
            rec_id = rec.id
            if rec.id in seen:
                if spec.id_from != "hash":
                    raise _BadRow(f"repeats the id of row {seen[rec.id]}", "give every row a unique id")
                k = 2
                while f"{rec.id}-{k}" in seen:
                    k += 1
                rec = replace(rec, id=f"{rec.id}-{k}")
            seen[rec.id] = row
            records.append(rec)
        except _BadRow as e:
            rec_id = rec_id or _raw_id(spec, raw)
            where = (
                f"{spec.path}, row {row}" + (f" (line {line})" if line else "") + (f", id {rec_id}" if rec_id else "")
            )
            if not skip_bad:
                raise TextkeepError(
                    f"{where}: {e.reason}. Fix: {e.fix}, or rerun with --skip-bad to skip bad rows."
                ) from None
            bad.append({"file": str(spec.path), "row": row, "line": line, "id": rec_id, "reason": e.reason})
    if n_rows == 0:
        raise TextkeepError(f"{spec.path} has no rows; check that it is the right file and not empty.")
    if skip_bad and bad_report is not None:
        write_text(bad_report, "".join(json.dumps(b) + "\n" for b in bad))  # ASCII: undecodable ids stay writable
    elif bad:
        warnings.warn(
            f"{spec.path}: skipped {len(bad)} bad rows (first: row {bad[0]['row']}, {bad[0]['reason']}); "
            "pass bad_report= to list them.",
            stacklevel=3,
        )
    return records


def _raw_id(spec: _Spec, raw: Any) -> str | None:
    if spec.id_from == "column" and isinstance(raw, dict) and raw.get(spec.fields["id"]) not in (None, ""):
        return spec.id_prefix + _clean(str(raw[spec.fields["id"]]))
    return None


def _build(spec: _Spec, row: int, raw: Any) -> Record:
    if isinstance(raw, _BadRow):
        raise raw
    if not isinstance(raw, dict):
        raise _BadRow(
            f"is a {type(raw).__name__}, not an object with named fields",
            'make every row an object like {"instruction": ...}',
        )

    def get(name: str) -> Any:
        col = spec.fields.get(name)
        value = raw.get(col) if col is not None else None
        if value is None:
            if name in spec.required:
                raise _BadRow(
                    f"has no {col!r} field", f"add {col!r}, or map another column with fields={{{name!r}: ...}}"
                )
            return None
        if isinstance(value, (dict, list)) and name != "answers":
            raise _BadRow(f"field {col!r} is a {type(value).__name__}, not text", f"make {col!r} a string")
        return value

    def text(name: str) -> str:
        value = get(name)
        return "" if value is None else _clean(str(value))

    instruction = text("instruction")
    if not instruction:
        raise _BadRow("has an empty instruction", "write the question/instruction text, or delete the row")
    extra = text("input")
    answers = _answers(get("answers"))
    if "answers" in spec.nonempty and not answers:
        raise _BadRow(f"has no answers in {spec.fields['answers']!r}", "give at least one gold answer")
    response = text("response") or (answers[0] if answers else "")

    audio_value, audio = text("audio"), None
    if "audio" in spec.nonempty and not audio_value:
        raise _BadRow(f"has no audio file name in {spec.fields['audio']!r}", "fill in the WAV's file name")
    if audio_value:
        audio = _resolve(audio_value, spec.audio_dir or spec.path.parent)
        if not audio.is_file():
            raise _BadRow(
                f"audio file {audio} does not exist", f"restore the WAV or fix the path in {spec.fields['audio']!r}"
            )

    if spec.id_from == "audio":
        rec_id = spec.id_prefix + audio.stem
    elif spec.id_from == "index":
        rec_id = f"{spec.id_prefix}{row - 1}"
    elif spec.id_from == "hash":
        rec_id = "text-" + hashlib.sha1(f"{instruction}\x1f{response}".encode()).hexdigest()[:12]
    else:
        rec_id = text("id")
        if not rec_id:
            raise _BadRow(f"has an empty {spec.fields['id']!r}", "give every row an id")
        rec_id = spec.id_prefix + rec_id

    meta = dict(spec.meta)
    if extra:
        meta["input"] = extra
    return Record(
        id=rec_id,
        instruction=f"{instruction}\n{extra}" if extra else instruction,
        response=response,
        audio=audio,
        answers=tuple(answers),
        source=spec.source,
        meta=meta,
    )


def _clean(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n").strip()


def _answers(value: Any) -> list[str]:
    if value is None:
        return []
    items = value if isinstance(value, list) else str(value).split("|")
    return [a for a in (_clean(str(v)) for v in items) if a]


def _resolve(path: str, base: Path) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else base / p


# ---- hub ----------------------------------------------------------------------------------------


def _load_hub(name: str, split: str, fields: dict[str, str] | None) -> list[Record]:
    fix = (
        f"set TEXTKEEP_DATA_DIR to the local copy and use a built-in name ({', '.join(BUILTIN)}), "
        "or install the `datasets` library and check your network"
    )
    try:
        import datasets as hf  # optional, and slow to import
    except ImportError:
        raise TextkeepError(
            f"{name!r} looks like a Hugging Face hub id, but the `datasets` library is not installed; {fix}."
        ) from None
    default_split, default_fields = _HUB.get(name, ("train", {}))
    split = split or default_split
    try:
        ds = hf.load_dataset(name, split=split)
    except Exception as e:  # offline, unknown id, gated: all mean "use the local copy"
        raise TextkeepError(f"Could not load {name}:{split} from the hub ({type(e).__name__}: {e}); {fix}.") from None
    mapping = {k: k for k in FIELDS} | default_fields | (fields or {})
    columns = set(getattr(ds, "column_names", None) or (next(iter(ds), {}) or {}))
    audio_col = mapping["audio"]
    if audio_col in columns and hasattr(ds, "cast_column"):
        ds = ds.cast_column(audio_col, hf.Audio(decode=False))  # keep the file, skip decoding
    cache = cache_dir() / "hub" / name.replace("/", "__") / split
    spec = _Spec(
        cache / "rows",
        name,
        mapping,
        required={"instruction"} | set(fields or ()),
        id_from="column" if mapping["id"] in columns else "index",
        id_prefix="" if mapping["id"] in columns else f"{name.split('/')[-1]}-",
        audio_dir=cache,
    )

    def rows() -> Iterator[tuple[int, None, Any]]:
        for i, raw in enumerate(ds, 1):
            raw = dict(raw)
            if isinstance(raw.get(audio_col), dict):
                raw[audio_col] = _hub_audio(raw[audio_col], cache, i)
            yield i, None, raw

    return _load(spec, rows(), skip_bad=False, bad_report=None)


def _hub_audio(value: dict, cache: Path, row: int) -> str | None:
    """A hub audio cell as a local file: its own path when that exists, else its bytes written to the cache."""
    if value.get("path") and Path(value["path"]).is_file():
        return value["path"]
    if value.get("bytes"):
        target = cache / f"{row}{Path(value.get('path') or 'x.wav').suffix or '.wav'}"
        if not target.is_file():
            cache.mkdir(parents=True, exist_ok=True)
            target.write_bytes(value["bytes"])
        return str(target)
    return None
