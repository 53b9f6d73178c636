"""The command line: the README's commands exist and parse, options take dashes, errors are one clear line."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from textkeep import cli

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    lines = [line.split("#")[0].strip() for block in blocks for line in block.splitlines()]
    return [shlex.split(line) for line in lines if line.startswith("textkeep ")]


def test_readme_opens_with_the_two_make_commands():
    text = (ROOT / "README.md").read_text()
    first_block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    assert first_block.lstrip().startswith("make demo") and "make test" in first_block
    targets = re.findall(r"^([a-z-]+):", (ROOT / "Makefile").read_text(), re.M)
    assert {"demo", "test"} <= set(targets)


def test_readme_commands_parse(capsys):
    from jsonargparse import ArgumentParser  # noqa: F401  (the parser the CLI is built on)

    commands = _readme_commands()
    assert len(commands) >= 5
    for argv in commands:
        sub = argv[1]
        assert sub in cli.COMMANDS, f"README uses `textkeep {sub}`, which does not exist"
        # --print_config parses every option against the function signature without running it.
        args = cli._normalise_argv(argv[1:])
        with pytest.raises(SystemExit) as exit_info:
            cli.main(args[:1] + ["--print_config"] + args[1:])
        assert exit_info.value.code in (0, None), f"README command does not parse: {' '.join(argv)}"
    capsys.readouterr()


def test_dashes_and_bare_flags_are_normalised():
    assert cli._normalise_argv(["eval", "--max-new-tokens", "8", "--show"]) == [
        "eval",
        "--max_new_tokens",
        "8",
        "--show",
        "true",
    ]
    assert cli._normalise_argv(["eval", "--show", "false", "--batch-size=4"]) == [
        "eval",
        "--show",
        "false",
        "--batch_size=4",
    ]


def test_required_arguments_work_as_options_or_positionals():
    as_options = cli._normalise_argv(["importance", "compute", "--data", "alpaca", "--mode", "abs", "--model", "m"])
    as_positionals = cli._normalise_argv(["importance", "compute", "m", "alpaca", "--mode", "abs"])
    assert as_options == as_positionals == ["importance", "compute", "m", "alpaca", "--mode", "abs"]
    assert cli._normalise_argv(["speak", "web-questions", "--limit", "3"]) == ["speak", "web-questions", "--limit", "3"]


def test_user_errors_are_one_line_not_a_traceback(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "textkeep.cli",
            "answer",
            "--audio",
            str(tmp_path / "missing.wav"),
            "--model",
            "tiny-llama",
            "--encoder",
            "tiny-whisper",
        ],
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "TEXTKEEP_CACHE_DIR": str(tmp_path / "cache")},
    )
    assert proc.returncode == 2
    assert "missing.wav" in proc.stderr and "does not exist" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.real
def test_answer_from_real_audio_end_to_end(data_dir):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "textkeep.cli",
            "answer",
            "--audio",
            str(data_dir / "llama_questions" / "wav" / "1.wav"),
            "--max-new-tokens",
            "12",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert "untrained" in proc.stderr
    assert proc.stdout.strip()  # an answer was generated (noise, from an untrained adaptor)
