import json
import sys
import types
from pathlib import Path

import pytest

from textkeep.data.datasets import attach_audio, filter_records, load_dataset
from textkeep.data.records import Record
from textkeep.errors import TextkeepError

# Real-data tests take the `data_dir` fixture (tests/conftest.py), which skips when TEXTKEEP_DATA_DIR is unset.


def _all_text(rec: Record) -> list[str]:
    return [rec.id, rec.instruction, rec.response, *rec.answers, str(rec.audio or "")]


# ---- real data ----------------------------------------------------------------------------------


def test_llama_questions_real(data_dir):
    recs = load_dataset("llama-questions")
    assert len(recs) == 300
    assert len({r.id for r in recs}) == 300
    assert all(r.audio is not None and r.audio.is_file() and r.audio.suffix == ".wav" for r in recs)
    assert all(
        r.id == f"lq-{r.audio.stem}" and r.answers == (r.response,) and r.source == "llama-questions" for r in recs
    )
    for text in (t for r in recs for t in _all_text(r)):
        assert "\r" not in text and text == text.strip()
    by_id = {r.id: r for r in recs}
    # Raw row 218 is "Glass sponges " with a trailing space; row 298's question ends in a space.
    assert by_id["lq-218"].response == "Glass sponges"
    assert by_id["lq-298"].instruction == "What is David Beckham's sport?"
    assert by_id["lq-13"].instruction == 'Who painted the famous painting "Mona Lisa"?'
    # The duplicated question: both rows kept; dedupe keeps the first.
    assert by_id["lq-32"].instruction == by_id["lq-217"].instruction
    deduped = filter_records(recs, dedupe=True)
    assert len(deduped) == 299 and "lq-32" in {r.id for r in deduped} and "lq-217" not in {r.id for r in deduped}


def test_web_questions_real(data_dir):
    recs = load_dataset("web-questions")
    assert len(recs) == 2032
    assert all(r.answers and all(r.answers) and r.response == r.answers[0] for r in recs)
    assert all(r.id.startswith("wq-wqs") and r.audio is None for r in recs)
    assert recs[0].instruction == "what does jamaican people speak?"
    sizes = {s: len(load_dataset(f"web-questions:{s}")) for s in ("train", "val", "devtest")}
    assert sizes == {"train": 2834, "val": 755, "devtest": 189}
    assert load_dataset("web-questions:test")[5] == recs[5]


def test_web_questions_answers_are_each_distinct_training_answer_in_a_frame(data_dir):
    from textkeep.data.datasets import ANSWER_FRAMES

    raw = json.loads((data_dir / "webquestions" / "val.json").read_text(encoding="utf-8"))
    wanted = {" ".join(a.lower().split()) for q in raw for a in q["answers"]} - {
        a for a in (" ".join(a.lower().split()) for q in raw for a in q["answers"]) if "://" in a or "www." in a
    }
    recs = load_dataset("web-questions-answers:val")
    said = {r.instruction: r for r in recs}
    framed = {a: [said[f.format(a)] for f in ANSWER_FRAMES if f.format(a) in said] for a in wanted}
    assert len(recs) == len(wanted) and all(len(hits) >= 1 for hits in framed.values())
    assert len({r.id for r in recs}) == len(recs)
    first = framed[" ".join(raw[0]["answers"][0].lower().split())][0]
    assert first.meta["of"][0] == f"wq-{raw[0]['qId']}" and not first.answers
    with pytest.raises(TextkeepError, match="reporting"):
        load_dataset("web-questions-answers:test")


def test_alpaca_real(data_dir):
    recs = load_dataset("alpaca")
    assert len(recs) == 51941
    raw = json.loads((data_dir / "alpaca" / "alpaca_cleaned.json").read_text(encoding="utf-8"))
    i = next(i for i, row in enumerate(raw) if row["input"].strip())
    assert recs[i].id == f"alpaca-{i}"
    assert recs[i].instruction == raw[i]["instruction"].strip() + "\n" + raw[i]["input"].strip()
    assert recs[i].meta["input"] == raw[i]["input"].strip()
    j = next(j for j, row in enumerate(raw) if not row["input"])
    assert recs[j].instruction == raw[j]["instruction"].strip() and recs[j].response == raw[j]["output"].strip()
    assert not any("\r" in r.instruction + r.response for r in recs)
    gpt4 = load_dataset("alpaca-gpt4")
    assert len(gpt4) == 999 and gpt4[0].id == "alpaca-gpt4-0"


# ---- synthetic built-in layout ------------------------------------------------------------------


def _llama_dir(root: Path, rows: list[tuple[str, str, str]], wavs: list[str]) -> Path:
    folder = root / "llama_questions"
    (folder / "wav").mkdir(parents=True)
    lines = ["Questions\tAnswer\tWav Filename"] + ["\t".join(r) for r in rows]
    (folder / "llama_questions_300.tsv").write_bytes("\r\n".join(lines).encode())
    for w in wavs:
        (folder / "wav" / w).write_bytes(b"RIFF")
    return folder


def test_llama_crlf_and_trailing_spaces(tmp_path, monkeypatch):
    # A TSV does not quote: a question that starts with `"` must keep it.
    _llama_dir(
        tmp_path,
        [('"Hamlet" was written by whom? ', "Shakespeare ", "1.wav"), ("Capital of France?", "Paris", "2.wav ")],
        ["1.wav", "2.wav"],
    )
    monkeypatch.setenv("TEXTKEEP_DATA_DIR", str(tmp_path))
    recs = load_dataset("llama-questions")
    assert [r.id for r in recs] == ["lq-1", "lq-2"]
    assert recs[0].instruction == '"Hamlet" was written by whom?' and recs[0].answers == ("Shakespeare",)
    assert recs[1].audio == tmp_path / "llama_questions" / "wav" / "2.wav"
    for text in (t for r in recs for t in _all_text(r)):
        assert "\r" not in text and text == text.strip()


def test_builtin_missing_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TEXTKEEP_DATA_DIR", str(tmp_path))
    with pytest.raises(TextkeepError, match="llama_questions_300.tsv.*TEXTKEEP_DATA_DIR"):
        load_dataset("llama-questions")
    with pytest.raises(TextkeepError, match="web-questions:devtest"):
        load_dataset("web-questions:dev")


# ---- user files ---------------------------------------------------------------------------------


def test_csv_with_field_mapping(tmp_path):
    (tmp_path / "clips").mkdir()
    (tmp_path / "clips" / "a.wav").write_bytes(b"RIFF")
    path = tmp_path / "qa.csv"
    path.write_text(
        "key,question,gold,clip\n"
        'q1,"Who wrote ""Hamlet"", the play?",Shakespeare|William Shakespeare,clips/a.wav\n'
        "q2,Largest ocean?, Pacific ,\n",
        encoding="utf-8",
    )
    recs = load_dataset(str(path), fields={"id": "key", "instruction": "question", "answers": "gold", "audio": "clip"})
    assert [r.id for r in recs] == ["q1", "q2"]
    assert recs[0].instruction == 'Who wrote "Hamlet", the play?'
    assert recs[0].answers == ("Shakespeare", "William Shakespeare") and recs[0].response == "Shakespeare"
    assert recs[0].audio == tmp_path / "clips" / "a.wav"
    assert recs[1].answers == ("Pacific",) and recs[1].audio is None and recs[1].source == "qa"


def test_json_list_answers(tmp_path):
    path = tmp_path / "qa.json"
    path.write_text(
        json.dumps([{"id": 7, "instruction": "2+2?", "answers": ["4", " four "], "response": "It is 4."}]),
        encoding="utf-8",
    )
    (rec,) = load_dataset(str(path))
    assert rec == Record(id="7", instruction="2+2?", response="It is 4.", answers=("4", "four"), source="qa")


def test_alpaca_style_jsonl_hash_ids(tmp_path):
    rows = [
        {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"},
        {"instruction": "Name a colour.", "input": "", "output": "Blue"},
        {"instruction": "Name a colour.", "input": "", "output": "Blue"},
    ]
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    b.write_text("\n".join(json.dumps(r) for r in reversed(rows[:2])), encoding="utf-8")
    ra, rb = load_dataset(str(a)), load_dataset(str(b))
    assert ra[0].instruction == "Translate to French.\nGood morning" and ra[0].response == "Bonjour"
    assert ra[0].id.startswith("text-") and ra[2].id == ra[1].id + "-2"
    assert {r.id: r.instruction for r in rb} == {r.id: r.instruction for r in ra[:2]}  # ids do not depend on row order


def _bad_cases(tmp_path: Path) -> dict[str, tuple[Path, dict | None, str]]:
    """name -> (file, fields, the row the message must name)."""

    def jsonl(name, rows):
        p = tmp_path / name
        p.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        return p

    ok = {"id": "a", "instruction": "Hi?", "response": "Hello"}
    latin = tmp_path / "latin.csv"
    latin.write_bytes("id,instruction\nx,fine\ny,caf\xe9 au lait?\n".encode("latin-1"))
    return {
        "missing_file": (tmp_path / "nope.jsonl", None, ""),
        "non_utf8": (latin, None, "row 2"),
        "missing_field": (jsonl("nofield.jsonl", [ok, {"id": "b", "response": "x"}]), None, "row 2"),
        "empty_instruction": (
            jsonl("empty.jsonl", [ok, ok | {"id": "b"}, {"id": "c", "instruction": "  "}]),
            None,
            "row 3",
        ),
        "missing_wav": (jsonl("wav.jsonl", [ok | {"audio": "missing.wav"}]), None, "row 1"),
        "duplicate_id": (jsonl("dup.jsonl", [ok, ok]), None, "row 2"),
        "mapped_field_missing": (jsonl("map.jsonl", [ok]), {"answers": "gold"}, "row 1"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "missing_file",
        "non_utf8",
        "missing_field",
        "empty_instruction",
        "missing_wav",
        "duplicate_id",
        "mapped_field_missing",
    ],
)
def test_bad_input_names_file_and_row(tmp_path, case):
    path, fields, row = _bad_cases(tmp_path)[case]
    with pytest.raises(TextkeepError) as err:
        load_dataset(str(path), fields=fields)
    msg = str(err.value)
    assert path.name in msg and row in msg
    assert "--skip-bad" in msg or case == "missing_file"


def test_skip_bad_writes_report(tmp_path):
    path = tmp_path / "mixed.jsonl"
    rows = [
        {"id": "a", "instruction": "Q1"},
        {"id": "b", "instruction": ""},
        {"id": "c"},
        {"id": "d", "instruction": "Q4", "audio": "gone.wav"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{not json\n", encoding="utf-8")
    report = tmp_path / "out" / "bad.jsonl"
    recs = load_dataset(str(path), skip_bad=True, bad_report=report)
    assert [r.id for r in recs] == ["a"]
    bad = [json.loads(line) for line in report.read_text(encoding="utf-8").splitlines()]
    assert [(b["row"], b["id"]) for b in bad] == [(2, "b"), (3, "c"), (4, "d"), (5, None)]
    assert all(b["file"] == str(path) and b["reason"] for b in bad)
    assert "gone.wav" in bad[2]["reason"]
    assert not [p for p in report.parent.iterdir() if p.name != "bad.jsonl"]  # no temp files left


def test_whole_file_problems_always_raise(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('[{"instruction": "a"},\n  {oops}]', encoding="utf-8")
    with pytest.raises(TextkeepError, match=r"broken\.json.*line 2"):
        load_dataset(str(broken), skip_bad=True)
    empty = tmp_path / "empty.csv"
    empty.write_text("id,instruction\n", encoding="utf-8")
    with pytest.raises(TextkeepError, match="empty.csv has no rows"):
        load_dataset(str(empty))
    with pytest.raises(TextkeepError, match="unknown names"):
        load_dataset(str(empty), fields={"question": "q"})
    with pytest.raises(TextkeepError, match="Unknown data set 'lama-questions'"):
        load_dataset("lama-questions")


# ---- manifest, hub, filter ----------------------------------------------------------------------


def test_attach_audio(tmp_path):
    recs = [Record(id="wq-1", instruction="q1"), Record(id="wq-2", instruction="q2")]
    (tmp_path / "tts" / "wav").mkdir(parents=True)
    (tmp_path / "tts" / "wav" / "1.wav").write_bytes(b"RIFF")
    manifest = tmp_path / "tts" / "manifest.jsonl"
    rows = [
        {"id": "wq-1", "text": "q1", "audio": "wav/1.wav", "voice": "v", "seconds": 1.5, "sha256": "ab"},
        {"id": "other", "text": "x", "audio": "wav/1.wav"},
    ]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    with pytest.warns(UserWarning, match="no audio for 1 of 2"):
        out = attach_audio(recs, manifest)
    assert out[0].audio == tmp_path / "tts" / "wav" / "1.wav" and out[0].meta["seconds"] == 1.5
    assert out[1] == recs[1] and recs[0].audio is None
    manifest.write_text(json.dumps({"id": "wq-2", "audio": "wav/2.wav"}) + "\n", encoding="utf-8")
    with pytest.raises(TextkeepError, match=r"manifest\.jsonl, row 1.*wq-2.*2\.wav"):
        attach_audio(recs, manifest)


def test_hub_without_datasets_library(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(TextkeepError, match="TEXTKEEP_DATA_DIR.*`datasets`"):
        load_dataset("fixie-ai/llama-questions")


def test_hub_with_fake_datasets_library(monkeypatch):
    def fake_load(name, split):
        if name != "vicgalle/alpaca-gpt4":
            raise ConnectionError("offline")
        return [{"instruction": "Say hi.", "input": "", "output": "Hi!"}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=fake_load))
    (rec,) = load_dataset("vicgalle/alpaca-gpt4")
    assert (rec.id, rec.instruction, rec.response) == ("alpaca-gpt4-0", "Say hi.", "Hi!")
    with pytest.raises(TextkeepError, match="offline.*TEXTKEEP_DATA_DIR"):
        load_dataset("chiuanhsiao/spoken-web-questions")


def test_filter_records():
    recs = [
        Record(id="1", instruction="What is the capital of France?", response="Paris is the capital"),
        Record(id="2", instruction="what is the  capital of france", response="Paris"),
        Record(id="3", instruction="Name one very long question with many words in it please", response="ok"),
    ]
    assert [r.id for r in filter_records(recs, dedupe=True)] == ["1", "3"]
    assert [r.id for r in filter_records(recs, max_query_words=6)] == ["1", "2"]

    class Tok:
        def encode(self, text, add_special_tokens=True):
            return [0] * (len(text.split()) + add_special_tokens)

    assert [r.id for r in filter_records(recs, max_response_tokens=2, tokenizer=Tok())] == ["2", "3"]
    assert [r.id for r in filter_records(recs, max_response_tokens=1, tokenizer=lambda t: t.split())] == ["2", "3"]
    with pytest.raises(TextkeepError, match="tokenizer"):
        filter_records(recs, max_response_tokens=5)
