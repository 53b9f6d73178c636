"""The whole study on tiny random-init models: runs end to end, a rerun skips every stage, a kill -9 in the
middle of training finishes on rerun with the same results, and the report opens in a real browser."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(
    shutil.which("flite") is None, reason="the study's TTS needs Debian's flite (make test installs it)"
)


def _config(tmp: Path) -> Path:
    text = (ROOT / "configs" / "study" / "tiny.yaml").read_text()
    text = text.replace("  voices: [flite:kal]\n", f"  voices: [flite:kal]\n  spoken_dir: {tmp / 'spoken'}\n")
    path = tmp / "tiny.yaml"
    path.write_text(text)
    return path


def _comparable(results: dict) -> dict:
    return {k: v for k, v in results.items() if k not in ("stage_seconds", "environment")}


@pytest.fixture(scope="module")
def shared(tmp_path_factory, data_dir):
    tmp = tmp_path_factory.mktemp("study")
    env = {
        **os.environ,
        "TEXTKEEP_CACHE_DIR": str(tmp / "cache"),
        "TEXTKEEP_DATA_DIR": str(data_dir),
        "PYTHONUNBUFFERED": "1",
    }
    return tmp, _config(tmp), env


def _study(config: Path, out: Path, env: dict, **popen) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "textkeep.cli", "study", str(config), "--out", str(out)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **popen,
    )


@pytest.fixture(scope="module")
def finished(shared):
    tmp, config, env = shared
    started = time.time()
    proc = _study(config, tmp / "a", env)
    log, _ = proc.communicate(timeout=1800)
    assert proc.returncode == 0, log[-3000:]
    return tmp / "a", time.time() - started


def test_study_runs_every_stage_and_writes_the_report(finished):
    out, seconds = finished
    print(f"tiny study: {seconds:.0f} s")
    for stage in ("data", "base-importance", "align", "train", "importance", "analysis", "eval", "report"):
        assert (out / stage / "stage.json").is_file(), stage
    results = json.loads((out / "report" / "results.json").read_text())
    beyond = {"masked"}  # a strategy beyond the paper gets its row too
    assert set(results["table2"]) == {"no-ft", "aligned", "full", "layer-lr", "lora"} | beyond
    # every strategy starts from the align stage's adaptor
    assert json.loads((out / "train" / "full" / "train_config.json").read_text())["args"]["model"] == str(
        out / "align" / "run"
    )
    assert (out / "report" / "tradeoff.png").is_file()
    assert set(map(str, results["table3"])) == {"8", "16"}
    assert {"speech", "text"} <= set(results["table1"]["Full-FT"])
    splits = json.loads((out / "data" / "splits.json").read_text())
    pool = [json.loads(line)["id"] for line in (out / "data" / "pool.jsonl").read_text().splitlines()]
    assert set(splits["train"]) | set(splits["test"]) == set(pool)  # training reads the saved pool, nothing else
    assert json.loads((out / "train" / "full" / "train_config.json").read_text())["derived"]["n_examples"] == len(
        splits["train"]
    )
    layer_lr = json.loads((out / "train" / "layer-lr" / "layer_lr.json").read_text())
    assert len(layer_lr) == 4 and min(r["lr_scale"] for r in layer_lr) == pytest.approx(0.6)  # Eq. 3 with λ = 0.4
    assert results["verdicts"] and all(
        v["verdict"] in ("reproduced", "not reproduced", "inconclusive") for v in results["verdicts"]
    )


def test_rerun_skips_every_stage(shared, finished):
    tmp, config, env = shared
    out, _ = finished
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/stage.json")}
    proc = _study(config, out, env)
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log[-3000:]
    assert log.count("up to date, skipped") == 8, log[-3000:]
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/stage.json")} == stamps


def test_kill_during_training_then_rerun_gives_the_same_results(shared, finished):
    tmp, config, env = shared
    out = tmp / "b"
    proc = _study(config, out, env, start_new_session=True)
    deadline = time.time() + 900
    while not list((out / "train").glob("*/checkpoints/step-*")):  # wait until training has checkpointed
        assert proc.poll() is None and time.time() < deadline, "the study ended before training checkpointed"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "train" / "stage.json").exists()
    rerun = _study(config, out, env)
    log, _ = rerun.communicate(timeout=1800)
    assert rerun.returncode == 0, log[-3000:]
    assert "data: up to date" in log and "base-importance: up to date" in log
    first = json.loads((finished[0] / "report" / "results.json").read_text())
    second = json.loads((out / "report" / "results.json").read_text())
    assert _comparable(second) == _comparable(first)


def test_report_opens_in_a_browser(finished, tmp_path):
    out, _ = finished
    page = (out / "report" / "index.html").read_text()
    for title in ("Table 1", "Table 2", "Table 3", "Fig. 1", "Fig. 2", "Fig. 3", "Fig. 4", "Verdicts"):
        assert title in page, title
    from PIL import Image

    images = re.findall(r"src='data:image/png;base64,([^']+)'", page)
    assert len(images) >= 6 and "figure not produced" not in page
    for data in images:  # every figure has drawn pixels, not a blank canvas
        img = Image.open(io.BytesIO(base64.b64decode(data))).convert("L")
        lo, hi = img.getextrema()
        assert hi - lo > 50
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (make test installs it when run as root)")
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    url = (out / "report" / "index.html").as_uri()
    dom = subprocess.run([chromium, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    assert dom.count("<table") >= 5 and dom.count("<img") == len(images)
    shot = tmp_path / "shot.png"
    subprocess.run(
        [chromium, *flags, "--window-size=1200,2400", f"--screenshot={shot}", url], capture_output=True, timeout=120
    )
    lo, hi = Image.open(shot).convert("L").getextrema()
    assert hi - lo > 100  # the page rendered text and figures, not a blank screen


def _rerun_changed(shared, finished, name: str, old: str, new: str) -> tuple[Path, Path, str]:
    """A copy of the finished study rerun with one edit to its config: (its folder, the edited config, the log)."""
    tmp, config, env = shared
    out = tmp / name
    shutil.copytree(finished[0], out)
    changed = tmp / f"tiny-{name}.yaml"
    changed.write_text(config.read_text().replace(old, new))
    assert changed.read_text() != config.read_text()
    proc = _study(changed, out, env)
    log, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, log[-3000:]
    return out, changed, log


def test_changed_config_redoes_a_stage_instead_of_resuming_it_and_force_redoes_eval(shared, finished):
    env = shared[2]
    out, changed, log = _rerun_changed(shared, finished, "c", "  lr: 1.0e-3\n", "  lr: 5.0e-4\n")
    assert "data: up to date" in log and "train: done" in log  # only the stages downstream of train.lr ran again
    for run in ("full", "layer-lr", "lora"):  # retrained under the new config, not resumed from the old checkpoints
        assert json.loads((out / "train" / run / "train_config.json").read_text())["args"]["lr"] == 5.0e-4
    predictions = out / "eval" / "full" / "predictions.jsonl"
    before = predictions.stat().st_mtime_ns
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "textkeep.cli",
            "study",
            str(changed),
            "--out",
            str(out),
            "--only",
            "eval",
            "--force",
            "eval",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "eval: done" in proc.stdout and predictions.stat().st_mtime_ns > before


def test_response_cap_keeps_only_short_responses(data_dir, monkeypatch, tmp_path):
    from transformers import AutoTokenizer

    from textkeep.model.registry import resolve
    from textkeep.study import Study, StudyConfig

    monkeypatch.setenv("TEXTKEEP_CACHE_DIR", str(tmp_path / "cache"))
    cfg = StudyConfig(llm="tiny-llama")
    cfg.data.train, cfg.data.n_examples = "alpaca-gpt4", 50
    uncapped = Study(cfg, tmp_path).pool()
    cfg.data.max_response_tokens = 40
    capped = Study(cfg, tmp_path).pool()
    tok = AutoTokenizer.from_pretrained(resolve("tiny-llama"))
    lengths = [len(tok.encode(r.response, add_special_tokens=False)) for r in capped]
    assert len(capped) == 50 and max(lengths) <= 40
    assert (
        max(len(tok.encode(r.response, add_special_tokens=False)) for r in uncapped) > 40
    )  # the cap removed something


def test_two_processes_train_together_and_run_the_other_stages_once(shared):
    tmp, config, env = shared
    out = tmp / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "-m",
        "textkeep.cli",
        "study",
        str(config),
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert json.loads((out / "train" / "full" / "train_config.json").read_text())["derived"]["processes"] == 2
    for stage in ("data", "base-importance", "align", "train", "importance", "analysis", "eval", "report"):
        assert log.count(f"[study] {stage} …") == 1, stage  # the main process runs it; the other waits
    assert (out / "report" / "results.json").is_file()


def test_deactivation_without_norms_reaches_the_report(shared, finished):
    out, _, log = _rerun_changed(
        shared, finished, "d", "analysis:\n", "analysis:\n  deactivation_include_norms: false\n"
    )
    assert "train: up to date" in log and "analysis: done" in log
    with_norms = json.loads((finished[0] / "report" / "results.json").read_text())["table1"]
    without = json.loads((out / "report" / "results.json").read_text())["table1"]
    assert with_norms["include_norms"] is True and without["include_norms"] is False
    assert without["Full-FT"]["text"]["base"] == pytest.approx(
        with_norms["Full-FT"]["text"]["base"]
    )  # same model and data
    assert (
        without["Full-FT"]["text"]["bottom"] != with_norms["Full-FT"]["text"]["bottom"]
    )  # another set of entries removed
    assert "norm weights left out" in (out / "report" / "index.html").read_text()
