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


def test_list_options_take_commas_or_yaml():
    # By annotation: `sets`/`modes` are list[str], `prepare` list[str] | None, `others` a required list[Path],
    # `top_percent` list[float]; commas become a YAML list of quoted items, YAML and null pass as typed.
    assert cli._normalise_argv(["eval", "--sets", "llama-questions, web-questions", "--modes=t2t"]) == [
        "eval",
        "--sets",
        '["llama-questions", "web-questions"]',
        '--modes=["t2t"]',
    ]
    assert cli._normalise_argv(["models", "--prepare", "smollm2-135m-instruct,whisper-base"]) == [
        "models",
        "--prepare",
        '["smollm2-135m-instruct", "whisper-base"]',
    ]
    assert cli._normalise_argv(["speak", "alpaca", "--voices", "[flite:slt, flite:kal]", "--out", "a,b"]) == [
        "speak",
        "alpaca",
        "--voices",
        "[flite:slt, flite:kal]",
        "--out",
        "a,b",  # not a list option: commas are part of the value
    ]
    as_option = cli._normalise_argv(["importance", "shift", "--base", "b", "--others", "x,y", "--top-percent", "1,5"])
    as_positional = cli._normalise_argv(["importance", "shift", "b", "x,y", "--top-percent", "1,5"])
    assert as_option == as_positional == ["importance", "shift", "b", '["x", "y"]', "--top_percent", '["1", "5"]']
    assert cli._normalise_argv(["importance", "layers", "a", "--labels", "null"]) == [
        "importance",
        "layers",
        '["a"]',
        "--labels",
        "null",
    ]
    again = cli._normalise_argv(["eval", "--sets", "a,b"])
    assert cli._normalise_argv(again) == again  # main() normalises what the README test already normalised


@pytest.mark.parametrize(
    "lists",
    [
        ["--sets", "llama-questions,web-questions", "--modes", "t2t"],
        ["--sets", "[llama-questions, web-questions]", "--modes", "[t2t]"],
    ],
)
def test_list_options_parse_to_lists(lists, capsys):
    import yaml

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["eval", "--print_config", *lists])
    assert exit_info.value.code in (0, None)
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["sets"] == ["llama-questions", "web-questions"] and config["modes"] == ["t2t"]


def test_help_shows_the_docstrings(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    top = " ".join(capsys.readouterr().out.split())
    for name in ("models", "answer", "speak", "features", "importance", "train", "merge", "eval", "study"):
        assert f" {name} " in top
    assert "Spoken-QA accuracy, text-to-text (t2t)" in top and "List the model registry" in top
    with pytest.raises(SystemExit):
        cli.main(["eval", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "folder for predictions.jsonl, metrics.json and table.md" in text and "type: list[str]" in text


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
