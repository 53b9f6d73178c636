"""Where textkeep finds data and keeps its caches: two environment settings, nothing else."""

from __future__ import annotations

import os
from pathlib import Path

from textkeep.errors import TextkeepError


def cache_dir() -> Path:
    """Converted weights and speech features live here: $TEXTKEEP_CACHE_DIR, else $XDG_CACHE_HOME/textkeep."""
    if os.environ.get("TEXTKEEP_CACHE_DIR"):
        return Path(os.environ["TEXTKEEP_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "textkeep"


def data_dir(required: bool = True) -> Path | None:
    """The folder of real data ($TEXTKEEP_DATA_DIR), laid out as described in docs/data.md."""
    value = os.environ.get("TEXTKEEP_DATA_DIR")
    if value:
        path = Path(value).expanduser()
        if not path.is_dir():
            raise TextkeepError(
                f"TEXTKEEP_DATA_DIR={value} is not a directory; "
                "point it at the folder that holds llama_questions/, webquestions/ and alpaca/."
            )
        return path
    if required:
        raise TextkeepError(
            "No data directory: set TEXTKEEP_DATA_DIR to the folder that holds llama_questions/, webquestions/ "
            "and alpaca/ (the Makefile sets it to ../shared/data), or pass a hub id if you have a network."
        )
    return None
