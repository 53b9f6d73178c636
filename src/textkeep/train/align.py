"""Alignment: train the adaptor until the frozen LLM understands speech.

    textkeep align --data '[web-questions:train, web-questions:val]' --out runs/align

Stage 1 as the paper trains it (`train`) starts from a random adaptor and changes the LLM at once; on a small
budget the adaptor never aligns and the LLM learns to ignore it (S2T stays at ~0% while the loss falls). `align`
first teaches the adaptor alone, the LLM frozen, with the objectives of `train/objectives.py` mixed in each batch
and scheduled in phases (e.g. `asr` first, then `kd`). Its checkpoint is an ordinary textkeep checkpoint with the
base LLM's weights untouched (`llm_weights: base`, `extra.llm_frozen: true`), so T2T is unchanged by construction,
and `train --model`, `eval`, `answer` and `importance` load it as they load any other.

A run directory holds what `train` writes (model/, train_config.json, metrics.jsonl with each objective's term
under "parts", checkpoints/ for --resume), plus:
    teacher.jsonl   the text path's greedy answers (kd, self), made once, the first time a batch needs them
    heldout.jsonl   the held-out slice of the training questions (never trained on)
    curve.jsonl     S2T on that slice every eval_every steps: accuracy, distinct answers, examples seen, minutes
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from textkeep.errors import TextkeepError
from textkeep.eval.scoring import word_error_rate
from textkeep.fileio import write_json, write_text
from textkeep.model.audio import MAX_SECONDS
from textkeep.train.config import TrainConfig
from textkeep.train.objectives import OBJECTIVES, CtcVocab, ctc_greedy, ctc_logits, ctc_loss, hidden_loss, kd_loss

ASR_SYSTEM_PROMPT = "You are a speech recognizer. Repeat exactly what the user said, word for word."
# The training defaults for the adaptor alone (Ultravox trains its projector at 1e-3 to 2e-3), in bf16.
ALIGN_TRAIN = TrainConfig(
    strategy="adaptor", lr=1e-3, epochs=1, batch_size=16, grad_accum=1, warmup_ratio=0.03, save_every=100,
    precision="bf16",
)  # fmt: skip


@dataclass(frozen=True)
class Phase:
    """A stretch of alignment with its own mix of objectives."""

    mix: dict[str, float]
    """objective → weight in each batch, e.g. {asr: 1.0} or {asr: 0.5, kd: 1.0} (objectives.py lists them)."""
    steps: int | None = None
    """optimizer steps of this phase; unset: until the run ends (only the last phase)."""


@dataclass(frozen=True)
class AlignConfig:
    """What alignment optimises (the optimizer and schedule are `--train.KEY`)."""

    phases: list[Phase] = field(default_factory=lambda: [Phase({"asr": 1.0, "kd": 1.0})])
    """the schedule: phases in order, each with its mix."""
    temperature: float = 2.0
    """kd: the softmax temperature T (Ultravox: 2)."""
    answer_tokens: int = 32
    """kd, self, hidden: the length of the text path's greedy answers used as targets."""
    asr_system_prompt: str = ASR_SYSTEM_PROMPT
    """asr: the system prompt of the transcription task."""
    asr_user_template: str = "<speech>"
    """asr: the user turn of the transcription task (<speech> marks the audio)."""
    normalise: bool = True
    """scale every adaptor output to the RMS of the LLM's token embeddings (saved with the checkpoint)."""
    compress: str | None = None
    """CTC compression: the LLM gets one embedding per token the adaptor's CTC head hears, in training and in every
    later use of the checkpoint: mean (the segment's mean output; Soundwave, Gaido et al. 2021) or posterior (its
    CTC posterior's mixture of token embeddings; LegoSLM). Needs the ctc objective in this run or in the run
    `model` continues."""
    mask_time: float = 0.0
    """SpecAugment on the cached encoder frames (Park et al., 2019), against memorising the training utterances: up
    to this fraction of each utterance's frames (spans of `mask_span`, which may overlap) is replaced by its mean
    frame, drawn afresh at every step. 0: off. It halved the held-out CTC WER at equal steps (docs/align.md)."""
    mask_span: int = 10
    """the length of a time mask in encoder frames (10 = 200 ms, two adaptor outputs)."""
    mask_channels: float = 0.0
    """the fraction of the encoder's channels replaced by their mean over the utterance, per utterance and step."""

    def __post_init__(self):
        if not self.phases:
            raise TextkeepError("bad alignment setting: phases needs at least one phase, e.g. [{mix: {asr: 1.0}}]")
        # Phases given as mappings (YAML, plain Python) become Phase objects here, once.
        object.__setattr__(self, "phases", [Phase(**p) if isinstance(p, dict) else p for p in self.phases])
        for i, p in enumerate(self.phases):
            unknown = sorted(set(p.mix) - set(OBJECTIVES))
            if unknown or not p.mix or any(w < 0 for w in p.mix.values()):
                raise TextkeepError(
                    f"bad alignment setting: phase {i} has mix {p.mix}; use non-negative weights of "
                    f"{', '.join(OBJECTIVES)}."
                )
            if p.steps is None and i != len(self.phases) - 1:
                raise TextkeepError(f"bad alignment setting: phase {i} needs steps; only the last may run to the end.")
        if not (self.temperature > 0 and self.answer_tokens >= 1):
            raise TextkeepError("bad alignment setting: temperature must be > 0 and answer_tokens ≥ 1.")
        if not (0 <= self.mask_time < 1 and 0 <= self.mask_channels < 1 and self.mask_span >= 1):
            raise TextkeepError(
                f"bad alignment setting: mask_time ({self.mask_time}) and mask_channels ({self.mask_channels}) must "
                f"be in [0, 1), and mask_span ({self.mask_span}) ≥ 1."
            )

    def mix_at(self, step: int) -> dict[str, float]:
        """The mix of the phase that optimizer step `step` (1-based) belongs to."""
        end = 0
        for p in self.phases:
            end += p.steps or 0
            if p.steps is None or step <= end:
                return p.mix
        return self.phases[-1].mix

    def uses(self, *names: str) -> bool:
        return any(p.mix.get(n, 0) > 0 for p in self.phases for n in names)


# ---- data --------------------------------------------------------------------------------------------------------


@dataclass
class AlignItem:
    """One utterance: its encoder frames and what was said (and a reference response, for `ce`)."""

    speech: torch.Tensor
    transcript: str
    response: str | None
    id: str


class AlignExamples:
    """Spoken records (audio + transcript) whose encoder frames live in the feature cache, read a batch at a time."""

    def __init__(self, model, records, chunk: int = 256):
        from tqdm.auto import tqdm

        from textkeep.data.features import FeatureCache

        for r in records:
            if not r.instruction or not r.instruction.strip():
                raise TextkeepError(
                    f"record '{r.id}' has no transcript; alignment needs the text of every utterance (the "
                    "manifest's or data set's instruction field)."
                )
        self.model, self.records, self.cache = model, list(records), FeatureCache(model)
        self.lengths = []
        k = model.config.adaptor_k
        for start in tqdm(range(0, len(self.records), chunk), desc="speech features", unit="chunk"):
            part = self.records[start : start + chunk]
            for r, f in zip(part, self.cache.frames(part, progress=False)):
                self.lengths.append(f.shape[0] // k + len(r.instruction) // 3)

    def __len__(self) -> int:
        return len(self.records)

    def samples(self, idx: list[int]) -> list[AlignItem]:
        part = [self.records[i] for i in idx]
        frames = self.cache.frames(part, progress=False)
        return [AlignItem(f, r.instruction.strip(), r.response or None, r.id) for r, f in zip(part, frames)]


def spec_augment(frames: torch.Tensor, cfg: AlignConfig, key: str) -> torch.Tensor:
    """(n, d) encoder frames with SpecAugment's time and channel masks, filled with the utterance's mean (the frames
    are Whisper's outputs, not a spectrogram, so no value is "silence"). The masks are a function of `key` (the
    utterance and the step), so a resumed run draws the same ones. Written here: torchaudio's masking works on
    spectrogram batches and draws from the global generator."""
    n, d = frames.shape
    gen = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    out, mean = frames.clone(), frames.mean(0)
    span = min(cfg.mask_span, n)
    for _ in range(round(cfg.mask_time * n / cfg.mask_span)):
        start = int(torch.randint(0, n - span + 1, (1,), generator=gen))
        out[start : start + span] = mean
    channels = torch.randperm(d, generator=gen)[: round(cfg.mask_channels * d)].to(frames.device)
    out[:, channels] = mean[channels]
    return out


# ---- the objective -----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _prompt(model, formatter):
    """The model's prompt swapped for another task's (the transcription prompt), for the duration of the block."""
    saved = model.prompt
    model.prompt = formatter
    try:
        yield
    finally:
        model.prompt = saved


class Teacher:
    """The text path's greedy answers to the transcripts: generated the first time a batch needs them, kept in
    teacher.jsonl (so a resumed run reads exactly the answers the killed one used)."""

    def __init__(self, model, path: Path | None, max_new_tokens: int, precision: str):
        self.model, self.path, self.max_new_tokens, self.precision = model, path, max_new_tokens, precision
        self.answers: dict[str, str] = {}
        if path is not None and path.is_file():
            for line in path.read_text().splitlines():
                if line.strip():
                    row = json.loads(line)
                    self.answers[row["id"]] = row["answer"]

    def __call__(self, items: list[AlignItem]) -> list[str]:
        from textkeep.model.speech_llm import Sample
        from textkeep.runtime import autocast

        todo = [it for it in items if it.id not in self.answers]
        if todo:
            with torch.no_grad(), autocast(self.precision, self.model.device):
                got = self.model.generate([Sample(text=it.transcript) for it in todo], self.max_new_tokens)
            rows = [{"id": it.id, "answer": a} for it, a in zip(todo, got)]
            self.answers.update({r["id"]: r["answer"] for r in rows})
            if self.path is not None:
                with open(self.path, "a", encoding="utf-8") as f:
                    f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        return [self.answers[it.id] for it in items]


class AlignObjective(nn.Module):
    """The mixed alignment loss of one micro-batch: Σ_o w_o · (objective o's mean over its tokens), the weights
    those of the step's phase. Every term that needs the same forward shares it: kd, self and hidden run one
    speech-path pass over the teacher's answer and one teacher pass (no gradients); asr, ce and ctc their own."""

    def __init__(self, model, cfg: AlignConfig, teacher: Teacher | None = None, ctc_vocab: CtcVocab | None = None):
        super().__init__()
        from textkeep.model.prompt import PromptFormatter

        self.model, self.cfg, self.teacher, self.ctc_vocab = model, cfg, teacher, ctc_vocab
        self.asr_prompt = PromptFormatter(model.tokenizer, cfg.asr_system_prompt, cfg.asr_user_template)
        self._parts: dict[str, list[float]] = {}

    # fit's protocol: prepare → count → forward
    def prepare(self, items: list[AlignItem]):
        return items

    @staticmethod
    def count(items) -> int:
        return 1  # a micro-batch's loss is already a mean: the step averages its micro-batches

    def parts(self) -> dict[str, float]:
        out = {k: sum(v) / len(v) for k, v in self._parts.items() if v}
        self._parts = {}
        return out

    def forward(self, items: list[AlignItem], step: int = 1) -> torch.Tensor:
        mix = {k: w for k, w in self.cfg.mix_at(step).items() if w > 0}
        if self.cfg.mask_time or self.cfg.mask_channels:
            items = [
                dataclasses.replace(it, speech=spec_augment(it.speech, self.cfg, f"{it.id}:{step}")) for it in items
            ]
        terms: dict[str, torch.Tensor] = {}
        if {"kd", "self", "hidden"} & set(mix):
            terms |= self._distill(items, mix)
        if "chain" in mix:
            from textkeep.model.speech_llm import chain_response

            answers = self.teacher(items)
            terms["chain"] = self._ce([(it.speech, chain_response(it.transcript, a)) for it, a in zip(items, answers)])
        if "asr" in mix:
            with _prompt(self.model, self.asr_prompt):
                terms["asr"] = self._ce([(it.speech, it.transcript) for it in items])
        if "ce" in mix:
            pairs = [(it.speech, it.response) for it in items if it.response]
            if not pairs:
                raise TextkeepError("objective 'ce' needs reference responses, and this batch has none.")
            terms["ce"] = self._ce(pairs)
        if "ctc" in mix:
            terms["ctc"] = self._ctc(items)
        for k, v in terms.items():
            self._parts.setdefault(k, []).append(float(v.detach()))
        return sum(mix[k] * v for k, v in terms.items())

    def _ce(self, pairs) -> torch.Tensor:
        from textkeep.model.speech_llm import Sample

        batch = self.model.tokenize([Sample(speech=s, response=r) for s, r in pairs])
        loss, n = self.model.loss_sum(batch)
        return loss / max(n, 1)

    def _states(self, batch, grad: bool):
        """Hidden states of every layer and the logits at the positions that predict answer tokens."""
        from textkeep.model.speech_llm import decode

        m = self.model
        batch = batch.to(m.device)
        with torch.set_grad_enabled(grad):
            out, labels = decode(m.llm, batch, m.embed(batch), output_hidden_states=True)
            keep = labels != -100
            states = [x[:, :-1][keep] for x in out.hidden_states[1:]]
            logits = m.llm.get_output_embeddings()(states[-1])
        return states, logits, labels[keep]

    def _distill(self, items, mix) -> dict[str, torch.Tensor]:
        from textkeep.model.speech_llm import Sample

        answers = self.teacher(items)
        student = self.model.tokenize([Sample(speech=it.speech, response=a) for it, a in zip(items, answers)])
        teacher = self.model.tokenize([Sample(text=it.transcript, response=a) for it, a in zip(items, answers)])
        s_states, s_logits, targets = self._states(student, grad=True)
        t_states, t_logits, _ = self._states(teacher, grad=False)  # the same answer tokens, row by row
        n = max(len(targets), 1)
        out = {}
        if "kd" in mix:
            out["kd"] = kd_loss(s_logits, t_logits, self.cfg.temperature) / n
        if "self" in mix:
            out["self"] = nn.functional.cross_entropy(s_logits.float(), targets, reduction="sum") / n
        if "hidden" in mix:
            out["hidden"] = hidden_loss(s_states, t_states)
        return out

    def _ctc(self, items) -> torch.Tensor:
        m, vocab = self.model, self.ctc_vocab
        k = m.config.adaptor_k
        kept, targets, skipped = [], [], 0
        for it in items:
            ids = m.tokenizer(it.transcript, add_special_tokens=False)["input_ids"]
            if it.speech.shape[0] // k < len(ids):  # CTC needs a frame per token at least
                skipped += 1
                continue
            kept.append(it.speech)
            targets.append(vocab.targets(ids))
        self._parts.setdefault("ctc_skipped", []).append(float(skipped))
        if not kept:
            return torch.zeros((), device=m.device, requires_grad=True)
        # One adaptor pass and one matmul against the vocabulary's rows for the whole batch: each output depends on
        # its own k frames only, so the zero padding changes no real output (per-utterance calls cost 5× more).
        frames = nn.utils.rnn.pad_sequence(kept, batch_first=True).to(m.device, m.dtype)
        logits = ctc_logits(m.adaptor(frames), m.llm.get_input_embeddings().weight, vocab, m.adaptor.ctc_scale())
        n_out = [f.shape[0] // k for f in kept]
        n_tokens = sum(len(t) for t in targets)
        return ctc_loss([x[:n] for x, n in zip(logits, n_out)], targets) / max(n_tokens, 1)


# ---- the held-out curve ------------------------------------------------------------------------------------------


def s2t_on(
    model, records, frames, max_new_tokens: int = 32, batch_size: int = 32, precision: str = "fp32", text: bool = False
) -> dict:
    """Greedy S2T on held-out questions (T2T with text=True): has_answer accuracy, distinct answers, the answers."""
    from textkeep.eval.scoring import has_answer
    from textkeep.model.speech_llm import Sample
    from textkeep.runtime import autocast

    was = model.training
    model.eval()
    answers = []
    with torch.no_grad(), autocast(precision, model.device):
        for start in range(0, len(records), batch_size):
            if text:
                part = [Sample(text=r.instruction) for r in records[start : start + batch_size]]
            else:
                part = [Sample(speech=f) for f in frames[start : start + batch_size]]
            answers += model.generate(part, max_new_tokens)
    model.train(was)
    if model.encoder is not None:
        model.encoder.eval()
    correct = [has_answer(a, r.answers) for a, r in zip(answers, records)]
    return {
        "s2t": sum(correct) / max(len(correct), 1),
        "distinct": len(set(answers)),
        "n": len(records),
        "answers": answers,
    }


@torch.no_grad()
def ctc_transcripts(model, frames, vocab: CtcVocab) -> list[str]:
    """What the adaptor hears through its CTC head (best path, no LLM): one transcript per utterance."""
    table = model.llm.get_input_embeddings().weight
    out = []
    for f in frames:
        frames_out = model.adaptor(f.to(model.device, model.dtype)[None])[0]
        logits = ctc_logits(frames_out, table, vocab, model.adaptor.ctc_scale())
        out.append(model.tokenizer.decode(ctc_greedy(logits, vocab)))
    return out


class Curve:
    """S2T on the held-out slice every `every` steps (and at the end), appended to curve.jsonl with the examples
    seen and the training minutes so far (read back from metrics.jsonl, so a resumed run counts the same)."""

    def __init__(
        self, out: Path, model, records, every: int, total: int, examples_per_step: int, precision: str, ctc_vocab=None
    ):
        self.out, self.records, self.every, self.total = Path(out), records, every, total
        self.per_step, self.precision, self.ctc_vocab = examples_per_step, precision, ctc_vocab
        from textkeep.data.features import FeatureCache

        self.frames = FeatureCache(model).frames(records, progress=False)
        self.path = self.out / "curve.jsonl"

    def minutes(self) -> float:
        path = self.out / "metrics.jsonl"
        rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []
        return sum(r["seconds"] for r in rows) / 60

    def t2t(self, model) -> float:
        """T2T on the slice: the same frozen LLM reading the transcripts, the line S2T is measured against."""
        path = self.out / "heldout_t2t.json"
        if not path.is_file():
            got = s2t_on(model, self.records, None, precision=self.precision, text=True)
            write_json(path, {"t2t": got["s2t"], "n": got["n"], "distinct": got["distinct"]})
        return json.loads(path.read_text())["t2t"]

    def measure(self, step: int, model) -> dict:
        started = time.perf_counter()
        got = s2t_on(model, self.records, self.frames, precision=self.precision)
        row = {"step": step, "examples": step * self.per_step, "train_minutes": round(self.minutes(), 3)}
        row["t2t"] = self.t2t(model)
        row |= {k: got[k] for k in ("s2t", "distinct", "n")} | {"eval_seconds": round(time.perf_counter() - started, 1)}
        row["samples"] = [{"id": r.id, "answer": a} for r, a in list(zip(self.records, got["answers"]))[:5]]
        if self.ctc_vocab is not None:
            heard = ctc_transcripts(model, self.frames, self.ctc_vocab)
            row["ctc_wer"] = round(word_error_rate([r.instruction for r in self.records], heard), 4)
            # The text path reading what the head heard: the S2T that hearing alone would allow (a cascade
            # through the CTC head), so a recipe can tell "does not hear" from "hears but is not understood".
            as_text = [dataclasses.replace(r, instruction=h) for r, h in zip(self.records, heard)]
            row["ctc_t2t"] = s2t_on(model, as_text, None, precision=self.precision, text=True)["s2t"]
            for sample, text in zip(row["samples"], heard):
                sample["ctc_heard"] = text
        kept = [x for x in self._rows() if x["step"] < step]
        write_text(self.path, "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in [*kept, row]))
        wer = ""
        if "ctc_wer" in row:
            wer = f", CTC WER {100 * row['ctc_wer']:.1f}%, T2T on it {100 * row['ctc_t2t']:.1f}%"
        print(f"[align] step {step}: held-out S2T {100 * row['s2t']:.1f}% ({row['distinct']} distinct answers{wer})")
        return row

    def _rows(self) -> list[dict]:
        return [json.loads(x) for x in self.path.read_text().splitlines() if x.strip()] if self.path.is_file() else []

    def __call__(self, step: int, model) -> None:
        if step % self.every == 0 or step == self.total:
            self.measure(step, model)


# ---- the command -------------------------------------------------------------------------------------------------


def embedding_rms(llm) -> float:
    """The root mean square of the LLM's token embeddings: the scale its layers expect their inputs at."""
    return float(llm.get_input_embeddings().weight.detach().float().pow(2).mean(-1).sqrt().mean())


def ctc_vocabulary(model, records, training_ctc: bool) -> CtcVocab | None:
    """The CTC head's vocabulary, set on the adaptor (a buffer, so the checkpoint carries it).

    A fresh head scores the tokens of the training transcripts. A continued CTC-aligned adaptor keeps its rows and,
    when this run trains `ctc`, adds the new transcripts' tokens: the head has no weight per token (it scores the
    LLM's own embedding rows), so new rows need no initialisation and the learnt logit scale carries over."""
    tok = model.tokenizer
    heard = model.adaptor.has_ctc
    if not heard and not training_ctc:
        return None
    records = records if training_ctc else []
    ids = [t for r in records for t in tok(r.instruction.strip(), add_special_tokens=False)["input_ids"]]
    if heard:
        old = model.adaptor.ctc_ids.tolist()
        vocab = CtcVocab(old[1:] + ids, old[0])
    else:
        vocab = CtcVocab(ids, tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    model.adaptor.set_ctc_vocab(vocab.ids)
    return vocab


def fitting_window(records, max_seconds: float = MAX_SECONDS):
    """The records whose audio fits Whisper's 30 s window; the others are left out of training and counted (a
    TTS set has a few over-long items; a recorded one that is mostly too long is better cut into clips)."""
    import soundfile as sf

    kept = [
        r for r in records if r.audio is None or not Path(r.audio).is_file() or sf.info(r.audio).duration <= max_seconds
    ]
    if len(kept) < len(records):
        print(
            f"[align] left out {len(records) - len(kept)} utterances longer than Whisper's {max_seconds:.0f} s window"
        )
    return kept


def split_heldout(records, n: int, seed: int):
    """(train, held-out): `n` questions with gold answers drawn by a seeded permutation; never trained on.

    The draw is over distinct ids in first-seen order, so a data set listed again with other voices (`--spoken`)
    keeps the same held-out questions, and every copy of a held-out question leaves training; the held-out row
    is the question's first copy. So does every record whose `meta["of"]` names a held-out question."""
    import numpy as np

    first: dict[str, int] = {}
    for i, r in enumerate(records):
        if r.answers:
            first.setdefault(r.id, i)
    scorable = list(first.values())
    pick = np.random.default_rng([seed, 7]).permutation(len(scorable))[:n].tolist()
    held_ids = {records[scorable[j]].id for j in pick}
    held = sorted(scorable[j] for j in pick)
    # A record made from a held-out question (`web-questions-answers`: its answer in a frame) leaves with it.
    kept = [r for r in records if r.id not in held_ids and held_ids.isdisjoint(r.meta.get("of", ()))]
    return kept, [records[i] for i in held]


def align(
    model: str = "smollm2-135m-instruct",
    encoder: str = "whisper-base",
    data: list[str] = ["web-questions:train", "web-questions:val"],
    spoken: list[Path | None] | None = None,
    out: Path = Path("runs/align"),
    heldout: int = 200,
    eval_every: int = 50,
    limit: int | None = None,
    encoder_policy: str = "trim",
    resume: bool = False,
    train: TrainConfig = ALIGN_TRAIN,
    align: AlignConfig = AlignConfig(),
) -> Path:
    """Train the adaptor, the LLM frozen, until the LLM understands speech (objectives: train/objectives.py).

    Args:
        model: the LLM (registry name, directory or hub id) to give ears, or a textkeep checkpoint whose adaptor
            to continue from.
        encoder: the Whisper encoder when `model` is an LLM.
        data: spoken data sets with transcripts: each a data set name or file whose records get their audio from
            the matching `spoken` manifest (`textkeep speak`), or that has recorded audio. Never LLaMA Questions or
            Web Questions test: they are for reporting.
        spoken: one TTS manifest per data set (null: the default), so a set may be listed again with other
            voices; default: the cache's spoken/<data>/manifest.jsonl.
        out: the run directory (model/, curve.jsonl, teacher.jsonl, metrics, checkpoints).
        heldout: questions with gold answers kept out of training, on which the S2T curve is measured.
        eval_every: measure the held-out S2T every N optimizer steps (and at the end).
        limit: train on the first N utterances only (after the held-out slice is taken).
        encoder_policy: pad30 or trim (docs/design.md), when `model` is an LLM.
        resume: continue the run in `out` from its last checkpoint (same settings required).
        train: the optimizer and schedule (`--train.KEY`); alignment's defaults: strategy adaptor, lr 1e-3,
            batch 16, one epoch, bf16.
        align: the objectives, their schedule and their options (`--align.KEY`).
    """
    from accelerate import PartialState

    from textkeep.model.speech_llm import load_speech_llm
    from textkeep.train.trainer import _training_records, check_out, fit

    if train.strategy not in ("adaptor", "lora"):
        raise TextkeepError(
            f"alignment trains the adaptor with the LLM frozen (--train.strategy adaptor) or with LoRA on it (lora); "
            f"got {train.strategy!r}."
        )
    if eval_every < 1 or heldout < 0:
        raise TextkeepError(f"--eval-every must be ≥ 1 and --heldout ≥ 0, got {eval_every} and {heldout}.")
    spoken = list(spoken) if spoken else [None] * len(data)
    if len(spoken) != len(data):
        raise TextkeepError(f"{len(spoken)} --spoken manifests for {len(data)} --data sets; give one each, or none.")
    if any(d.startswith("llama-questions") or d in ("web-questions", "web-questions:test") for d in data):
        raise TextkeepError("LLaMA Questions and Web Questions test are for reporting; align on other data.")
    run_info = {"model": model, "encoder": encoder, "data": data, "spoken": spoken, "heldout": heldout,
                "eval_every": eval_every, "limit": limit, "encoder_policy": encoder_policy,
                "align": asdict(align)}  # fmt: skip
    check_out(Path(out), train, run_info, resume)
    speech_llm = load_speech_llm(model, encoder, seed=train.seed, encoder_policy=encoder_policy)
    speech_llm.config.speech_chain = speech_llm.config.speech_chain or align.uses("chain")
    if align.normalise and speech_llm.config.adaptor_output_scale is None:
        speech_llm.config.adaptor_output_scale = speech_llm.adaptor.output_scale = embedding_rms(speech_llm.llm)
    records = [r for d, m in zip(data, spoken) for r in _training_records(d, m, None, None)]
    records, held = split_heldout(records, heldout, train.seed)
    records = fitting_window(records[:limit] if limit else records)
    out = Path(out)
    state = PartialState()
    speech_llm.to(state.device)
    with state.main_process_first():
        examples = AlignExamples(speech_llm, records)
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        write_text(out / "heldout.jsonl", "".join(json.dumps(r.to_json(), ensure_ascii=False) + "\n" for r in held))
    vocab = ctc_vocabulary(speech_llm, records, align.uses("ctc"))
    if align.compress:
        if vocab is None:
            raise TextkeepError(
                "--align.compress needs a CTC head: add the ctc objective to a phase, or continue (--model) a "
                "checkpoint aligned with it."
            )
        if align.compress not in ("mean", "posterior"):
            raise TextkeepError(f"--align.compress must be mean or posterior, got {align.compress!r}.")
        speech_llm.config.speech_compress = align.compress
    teacher = Teacher(speech_llm, out / "teacher.jsonl" if state.is_main_process else None, align.answer_tokens,
                      train.precision)  # fmt: skip
    objective = AlignObjective(speech_llm, align, teacher, vocab)
    per_step = train.batch_size * train.grad_accum * state.num_processes
    total = train.max_steps or math.ceil(train.epochs * len(records) / per_step)
    curve = Curve(out, speech_llm, held, eval_every, total, per_step, train.precision, vocab) if held else None
    speech_llm.config.extra = {**speech_llm.config.extra, "llm_frozen": train.strategy == "adaptor",
                               "align": {"data": data, "n_utterances": len(records), **asdict(align)}}  # fmt: skip
    fit(speech_llm, examples, out, train, run_info, resume, objective=objective, on_step=curve)
    if state.is_main_process:
        write_json(out / "align_summary.json", {"curve": curve._rows() if curve else [], "vocab": len(vocab or [])})
    return out
