"""The one record type every dataset is turned into."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Record:
    """A spoken instruction or question with what the model should answer.

    `instruction` is the text the user says (the transcript; the text path reads it, TTS speaks it).
    `audio` is a WAV of that instruction, when one exists. `response` is the reference answer used
    as the training target and for perplexity. `answers` are the gold short answers of QA sets.
    """

    id: str
    instruction: str
    response: str = ""
    audio: Path | None = None
    answers: tuple[str, ...] = ()
    source: str = ""
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    def to_json(self) -> dict:
        d = asdict(self)
        d["audio"] = str(self.audio) if self.audio is not None else None
        d["answers"] = list(self.answers)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Record":
        return cls(
            id=str(d["id"]),
            instruction=d["instruction"],
            response=d.get("response", ""),
            audio=Path(d["audio"]) if d.get("audio") else None,
            answers=tuple(d.get("answers") or ()),
            source=d.get("source", ""),
            meta=d.get("meta") or {},
        )
