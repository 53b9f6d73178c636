"""Every config in configs/ loads, and its header says the command that runs it."""

from __future__ import annotations

from pathlib import Path

import pytest

from textkeep.errors import TextkeepError
from textkeep.study import StudyConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs" / "study").rglob("*.yaml"))
ALIGN = sorted((ROOT / "configs" / "align").rglob("*.yaml"))


def test_there_are_study_profiles():
    names = {p.stem for p in CONFIGS}
    assert {"tiny", "quick", "full", "llama-3.2-1b", "llama-3.1-8b"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads_and_names_its_command(path):
    cfg = load_config(path)
    assert isinstance(cfg, StudyConfig)
    first = path.read_text().splitlines()[0]
    rel = path.relative_to(ROOT).as_posix()
    assert first.startswith("# ") and rel in first and ("textkeep study" in first or "textkeep.cli study" in first), (
        first
    )


def test_every_config_is_a_study_profile_or_an_align_recipe():
    assert {p.parent.name for p in (ROOT / "configs").rglob("*.yaml")} == {"study", "align"}


@pytest.mark.parametrize("path", ALIGN, ids=lambda p: p.name)
def test_align_recipe_parses_and_names_its_command(path, capsys):
    from textkeep import cli

    first = path.read_text().splitlines()[0]
    assert first == f"# textkeep align --config {path.relative_to(ROOT).as_posix()}", first
    with pytest.raises(SystemExit) as exit_:
        cli.main(["align", "--config", str(path), "--print_config"])
    assert exit_.value.code == 0
    printed = capsys.readouterr().out
    assert "strategy: adaptor" in printed and "phases:" in printed


def test_paper_settings_in_the_paper_profiles():
    one_b, eight_b = (
        load_config(ROOT / "configs/study/llama-3.2-1b.yaml"),
        load_config(ROOT / "configs/study/llama-3.1-8b.yaml"),
    )
    assert one_b.train.lora_rank == 8 and eight_b.train.lora_rank == 16
    for cfg in (one_b, eight_b):
        assert cfg.train.lam == 0.4 and cfg.train.lr == 2e-5 and cfg.train.epochs == 3
        assert cfg.train.batch_size * cfg.train.grad_accum == 32 and cfg.data.test_size == 500


@pytest.mark.parametrize(
    "text,match",
    [
        ("train: {lam: 1.5}", r"lam must be in \[0, 1\]"),
        ("strategies: [full, magic]", "magic"),
        ("trian: {}", "unknown config key"),
        ("data: {n_examples: 5, test_size: 10}", "must exceed"),
    ],
)
def test_bad_values_are_refused_with_the_fix(tmp_path, text, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(TextkeepError, match=match):
        load_config(path)
