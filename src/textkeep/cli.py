"""The `textkeep` command: each subcommand is a plain function; `--config FILE.yaml` fills its arguments.

Options are written with dashes or underscores alike (`--max-new-tokens` = `--max_new_tokens`); a list option
takes YAML or commas alike (`--sets '[a, b]'` = `--sets a,b`). YAML configs use the Python argument names.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import sys
import types
import typing

from textkeep.errors import TextkeepError


@functools.cache
def _commands() -> dict:
    # Each command lives with the code it runs; heavy libraries (transformers, …) are imported inside the functions.
    from textkeep.data.features import features
    from textkeep.data.speak import speak_command
    from textkeep.eval.answer import answer
    from textkeep.eval.qa import eval_qa
    from textkeep.importance.change import importance_change
    from textkeep.importance.clusters import importance_clusters
    from textkeep.importance.compute import importance_compute
    from textkeep.importance.deactivation import importance_deactivate
    from textkeep.importance.layers import importance_layers
    from textkeep.importance.shift import importance_shift
    from textkeep.model.registry import models
    from textkeep.study import study
    from textkeep.train.align import align
    from textkeep.train.trainer import merge_lora, train

    return {
        "models": models,
        "answer": answer,
        "speak": speak_command,
        "features": features,
        "importance": {
            "compute": importance_compute,
            "layers": importance_layers,
            "shift": importance_shift,
            "clusters": importance_clusters,
            "deactivate": importance_deactivate,
            "change": importance_change,
        },
        "align": align,
        "train": train,
        "merge": merge_lora,
        "eval": eval_qa,
        "study": study,
    }


def __getattr__(name: str):
    # `cli.COMMANDS` is built on first use, so that `import textkeep.cli` (and `--help`) stays light.
    if name == "COMMANDS":
        return _commands()
    raise AttributeError(name)


def _is_list(annotation) -> bool:
    """`list[X]` or `list[X] | None` (also as an unresolved annotation string)."""
    if isinstance(annotation, str):
        return annotation.replace(" ", "").startswith(("list[", "List[", "Optional[list[", "Optional[List["))
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_is_list(a) for a in typing.get_args(annotation))
    return annotation is list or typing.get_origin(annotation) is list


def _types(command) -> dict:
    """The command's parameter annotations, resolved where they can be (the modules use postponed annotations)."""
    try:
        return typing.get_type_hints(command)
    except Exception:  # a name only imported for type checkers: the annotation strings still say list or bool
        return {n: p.annotation for n, p in inspect.signature(command).parameters.items()}


def _as_list(value: str) -> str:
    """A list option's value as jsonargparse reads it: YAML (`[a, b]`) or `null` as typed, commas (`a,b`) split."""
    if value.lstrip().startswith("[") or value.strip() == "null":
        return value
    # Quoted items: bare YAML would read `yes`, `1` or `null` as a bool, a number or None, which list[str] refuses;
    # jsonargparse still turns a quoted item into the declared item type (Path, float, …).
    return json.dumps([item.strip() for item in value.split(",") if item.strip()], ensure_ascii=False)


def _normalise_argv(argv: list[str]) -> list[str]:
    """Accept what users type, then hand jsonargparse its own form:
    `--foo-bar` → `--foo_bar`; a bare boolean flag (`--show`) → `--show true`; a list option in the comma form
    (`--sets a,b`) → YAML (`--sets '["a", "b"]'`), YAML as typed; and a required argument given as an
    option (`--model X`) → the positional it is (so `importance compute --model X --data Y` and
    `importance compute X Y` are the same command)."""
    out: list[str] = []
    for arg in argv:
        if arg.startswith("--") and len(arg) > 2:
            name, eq, value = arg[2:].partition("=")
            arg = "--" + name.replace("-", "_") + eq + value
        out.append(arg)
    n_cmd = 1
    command = _commands().get(out[0]) if out else None
    if isinstance(command, dict):  # a group: `importance compute …`
        command = command.get(out[1]) if len(out) > 1 else None
        n_cmd = 2
    if command is None or any(a in ("-h", "--help") for a in out):
        return out
    params = inspect.signature(command).parameters
    annotations = _types(command)
    flags = {f"--{n}" for n in params if annotations.get(n) in (bool, "bool")}
    lists = {n for n in params if _is_list(annotations.get(n))}
    required = [n for n, p in params.items() if p.default is inspect.Parameter.empty]
    given: dict[str, str] = {}
    positional: list[str] = []
    options: list[str] = []
    rest = out[n_cmd:]
    i = 0
    while i < len(rest):
        arg = rest[i]
        if not arg.startswith("--"):
            positional.append(arg)
            i += 1
            continue
        name, eq, value = arg[2:].partition("=")
        following = rest[i + 1] if i + 1 < len(rest) else None
        if following is not None and name in lists and not eq:
            following = _as_list(following)
        if (
            arg in flags
            and not eq
            and (following is None or following.lower() not in ("true", "false", "yes", "no", "1", "0"))
        ):
            options += [arg, "true"]
            i += 1
        elif name == "print_config" or eq:
            options.append(f"--{name}={_as_list(value)}" if name in lists else arg)
            i += 1
        elif name in required and following is not None:
            given[name] = following
            i += 2
        else:
            options += [arg] + ([following] if following is not None else [])
            i += 2
    fill = iter(positional)
    ordered = [given[n] if n in given else next(fill, None) for n in required]
    ordered = [_as_list(v) if n in lists and v is not None else v for n, v in zip(required, ordered)]
    ordered = [v for v in ordered if v is not None] + list(fill)
    return out[:n_cmd] + ordered + options


def main(argv: list[str] | None = None) -> None:
    from jsonargparse import auto_cli, set_parsing_settings

    set_parsing_settings(docstring_parse_attribute_docstrings=True)  # config fields' docstrings are their --help

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    argv = _normalise_argv(sys.argv[1:] if argv is None else argv)
    try:
        auto_cli(_commands(), args=argv, as_positional=True)
    except TextkeepError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
