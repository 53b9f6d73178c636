"""The speech feature cache: the frozen encoder runs once per audio file, ever.

An entry holds the encoder frames of one file (fp16, cropped as the model's config says) in its own
safetensors file, written atomically. Its key is the sha256 of the audio file's bytes; its folder is named
by the encoder's fingerprint (weights and shape), the input policy (pad30/trim) and keep_padding, so a change
of any of those never reads a stale entry. The header records the shape; an entry that fails to load or
does not match is recomputed and overwritten, never used.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Sequence

import torch

from textkeep.data.records import Record
from textkeep.errors import TextkeepError
from textkeep.fileio import atomic_path, file_sha256
from textkeep.settings import cache_dir


def encoder_fingerprint(model) -> str:
    """Which frames an entry holds: the encoder's weights (hashed from a few tensors), width and the crop policy."""
    enc = model.encoder
    h = hashlib.sha256()
    for t in (enc.conv1.weight, enc.layers[-1].fc2.weight, enc.layer_norm.weight):
        h.update(t.detach().float().cpu().numpy().tobytes())
    h.update(
        f"{enc.config.d_model}/{len(enc.layers)}/{model.config.encoder_policy}/{model.config.keep_padding}".encode()
    )
    return h.hexdigest()[:16]


class FeatureCache:
    def __init__(self, model, root: Path | None = None):
        self.model = model
        self.fingerprint = encoder_fingerprint(model)
        self.dir = (root or cache_dir() / "features") / f"{model.config.encoder_policy}-{self.fingerprint}"
        self.d_model = model.encoder.config.d_model

    def _path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.safetensors"

    def get(self, key: str) -> torch.Tensor | None:
        from safetensors.torch import load_file

        path = self._path(key)
        if not path.is_file():
            return None
        try:
            frames = load_file(str(path))["frames"]
        except Exception:  # a damaged entry (header or payload): recompute it
            return None
        if (
            frames.ndim != 2
            or frames.shape[1] != self.d_model
            or frames.shape[0] == 0
            or not torch.isfinite(frames).all()
        ):
            return None
        return frames.float()

    def put(self, key: str, frames: torch.Tensor) -> None:
        from safetensors.torch import save_file

        with atomic_path(self._path(key)) as tmp:
            save_file(
                {"frames": frames.to(torch.float16).contiguous()}, str(tmp), metadata={"fingerprint": self.fingerprint}
            )

    def frames(self, records: Sequence[Record], batch_size: int = 8, progress: bool = True) -> list[torch.Tensor]:
        """Encoder frames for each record's audio: from the cache, or computed (in batches) and stored."""
        from tqdm.auto import tqdm

        from textkeep.model.audio import load_record_audio

        missing_audio = [r.id for r in records if r.audio is None]
        if missing_audio:
            raise TextkeepError(
                f"{len(missing_audio)} records have no audio (first: '{missing_audio[0]}'); "
                "synthesize a spoken version "
                "with `textkeep speak DATASET --out DIR` and load it with its manifest."
            )
        keys = [file_sha256(Path(r.audio)) if Path(r.audio).is_file() else "" for r in records]
        out: list[torch.Tensor | None] = [self.get(k) if k else None for k in keys]
        todo = [i for i, f in enumerate(out) if f is None]
        bar = tqdm(total=len(todo), desc="encoding speech", unit="utt", disable=not progress or not todo)
        for start in range(0, len(todo), batch_size):
            idx = todo[start : start + batch_size]
            for i, frames in zip(idx, self.model.encode_audio(load_record_audio(records, idx))):
                frames = frames.cpu()  # cached frames live on the CPU wherever the encoder ran, as cache reads do
                keys[i] = keys[i] or file_sha256(Path(records[i].audio))
                self.put(keys[i], frames)
                out[i] = frames.to(
                    torch.float16
                ).float()  # what a later cache read returns, so cold and warm runs agree
            bar.update(len(idx))
        bar.close()
        return out  # type: ignore[return-value]


def features(
    data: str,
    spoken: Path | None = None,
    encoder: str = "whisper-base",
    encoder_policy: str = "pad30",
    keep_padding: bool = False,
    checkpoint: str | None = None,
    limit: int | None = None,
    batch_size: int = 8,
) -> None:
    """Fill the speech feature cache ahead of time (the frozen encoder's output for every audio file of a dataset).

    Args:
        data: a dataset with audio (llama-questions) or whose spoken version exists (see `textkeep speak`).
        spoken: the TTS manifest when the dataset has no recorded audio; default: the cache's spoken/<data>/.
        encoder: the Whisper encoder.
        encoder_policy: pad30 (Whisper's 30 s window) or trim (real-length input); see docs/design.md.
        keep_padding: keep all 1500 frames (LLaMA-Omni) instead of those covering the audio.
        checkpoint: a textkeep checkpoint whose encoder and policy to use instead of the three options above.
        limit: only the first N records that have audio.
        batch_size: utterances encoded together.
    """
    from textkeep.eval.qa import load_qa_set
    from textkeep.model.speech_llm import CONFIG_FILE, is_checkpoint, load_speech_llm

    # load_speech_llm would take a path that is no checkpoint for an LLM to build; here it can only be a mistake.
    if checkpoint and not is_checkpoint(checkpoint):
        raise TextkeepError(
            f"--checkpoint '{checkpoint}' is not a textkeep checkpoint (no {CONFIG_FILE} in it or in its model/); "
            "check the path, or leave --checkpoint out and give --encoder."
        )
    records = load_qa_set(data, {data: str(spoken)} if spoken else None, need_audio=True, partial=True)[:limit]
    # Without a checkpoint the LLM plays no part in encoding; the tiny one keeps memory and start-up small.
    speech_llm = load_speech_llm(
        checkpoint or "tiny-llama", encoder, encoder_policy=encoder_policy, keep_padding=keep_padding
    )
    cache = FeatureCache(speech_llm)
    started = time.time()
    cache.frames(records, batch_size=batch_size)
    print(f"{len(records)} utterances cached in {cache.dir} ({time.time() - started:.0f} s)")
