"""The whole study of the paper, one command:  textkeep study configs/study/quick.yaml [--out DIR]

Stages run in order over one results directory (default runs/<profile>/):

    data             spoken training set (TTS), its test / importance splits, spoken eval sets, speech features
    base-importance  textual importance of the pre-trained LLM on the importance split
    align            (optional) `textkeep align` with a recipe: the adaptor alone, the LLM frozen; every strategy
                     then starts from this aligned adaptor (a documented deviation from LLaMA-Omni, docs/align.md)
    train            Full-FT, Layer-LR (Eq. 3 on the base map), LoRA, the LoRA rank ablation, and any strategy
                     beyond the paper (train/guarded.py)
    importance       textual importance of every fine-tuned model; speech importance of Full-FT
    analysis         layer distributions (Figs 2, 3), shift table, rank clustering (Fig 1), parameter change
                     (Fig 4), deactivation (Table 1) on Full-FT
    eval             T2T / S2T accuracy on LLaMA Questions and Web Questions (Tables 2, 3), of every run, of the
                     aligned model, and the cascade reference (Whisper base's transcript through the text path)
    report           report/index.html (self-contained) and report/results.json

A finished stage leaves `<stage>/stage.json` with the hash of the config that made it (and of the stages it
reads). A rerun skips stages whose stamp matches; `--force STAGE` reruns one, `--only STAGE` runs one alone.
Work inside a stage is resumable too (training checkpoints, appended predictions, per-item stamps), so after
a kill -9 the same command finishes the study without redoing finished work.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path

from textkeep.data.speak import DEFAULT_VOICES
from textkeep.errors import TextkeepError
from textkeep.fileio import write_json, write_text
from textkeep.layout import LABELS, STAGES, StudyLayout, label
from textkeep.runtime import on_device, process_state
from textkeep.train.config import NEEDS_MAP, TrainConfig, check_lora, check_strategy

# What each stage reads from the config, and which stages' outputs it reads.
DEPENDS = {
    "data": (("llm", "encoder", "encoder_policy", "seed", "data", "eval"), ()),
    "base-importance": (("llm", "importance"), ("data",)),
    "align": (("llm", "encoder", "encoder_policy", "align"), ("data",)),
    "train": (
        ("llm", "encoder", "encoder_policy", "train", "strategies", "lora_ranks"),
        ("data", "base-importance", "align"),
    ),
    "importance": (("importance",), ("train",)),
    "analysis": (("analysis",), ("importance",)),
    "eval": (("eval",), ("train", "align")),
    "report": ((), ("analysis", "eval")),
}


def _need(ok: bool, what: str) -> None:
    if not ok:
        raise TextkeepError(f"bad study setting: {what}")


@dataclass
class DataConfig:
    """The spoken training set and its splits."""

    train: str = "alpaca-gpt4"
    """instruction data set, spoken by textkeep's TTS."""
    n_examples: int = 600
    """instructions synthesized (training + test split)."""
    test_size: int = 100
    """held-out examples (the paper: 500)."""
    importance_fraction: float = 1 / 30
    """share of the training split that importance maps score (the paper: 1/30)."""
    max_query_words: int = 50
    """leave out longer instructions (Whisper hears at most 30 s; 50 words ≈ 20 s)."""
    max_response_tokens: int | None = None
    """drop longer responses (LLM tokens); caps training memory on small machines."""
    voices: list[str] = field(default_factory=lambda: list(DEFAULT_VOICES))
    """TTS voices, each item spoken by one of them (seeded)."""
    spoken_dir: str | None = None
    """where spoken sets go; default: the cache's spoken/<set>/."""

    def __post_init__(self):
        _need(
            self.test_size >= 1 and self.n_examples > self.test_size,
            f"data.n_examples ({self.n_examples}) must exceed data.test_size ({self.test_size}), which must be ≥ 1",
        )
        _need(
            0 < self.importance_fraction <= 1,
            f"data.importance_fraction must be in (0, 1], got {self.importance_fraction}",
        )
        _need(bool(self.voices), "data.voices needs at least one voice (e.g. [flite:kal])")


@dataclass
class ImportanceConfig:
    """Importance maps (Eq. 2) of the base LLM and of every fine-tuned model."""

    mode: str = "paper"
    """paper, abs or fisher (importance/compute.py)."""
    batch_size: int = 8
    """examples per forward/backward pass."""
    limit: int | None = None
    """cap on importance examples (the split's size otherwise)."""
    noise_floor: bool = True
    """two more base maps, each on one half of the importance split: how far maps of one model drift by sampling
    alone. Shift verdicts count a difference only beyond this floor."""

    def __post_init__(self):
        from textkeep.importance.compute import MODES

        _need(self.mode in MODES, f"importance.mode must be one of {', '.join(MODES)}, got {self.mode!r}")


@dataclass
class AnalysisConfig:
    """Deactivation (Table 1) and the drawn layer (Figs 1, 4)."""

    deactivation_percent: float = 3.0
    """share of parameters zeroed in each condition."""
    deactivation_limit: int = 100
    """held-out examples whose response perplexity is measured."""
    deactivation_scope: str = "tensor"
    """tensor (each tensor loses its own p%) or global (one threshold)."""
    deactivation_include_norms: bool = True
    """false: weight matrices only (norms' bottom entries are not small)."""
    layer: int | None = None
    """the layer drawn in Figs 1 and 4 (default: the middle one)."""


@dataclass
class AlignStageConfig:
    """The align stage: the adaptor alone, the LLM frozen, before Stage 1 (docs/align.md). LLaMA-Omni trains
    adaptor and LLM together from a random adaptor; with this stage every strategy starts from the same aligned
    adaptor and differs only in how it fine-tunes the LLM. Its model is a row of its own, Aligned (LLM frozen)."""

    recipe: str | None = None
    """an align config (configs/align/*.yaml), run as `textkeep align --config RECIPE` with the study's out and
    resume; the study's llm, encoder and encoder_policy fill what it leaves unset, and the training split's
    spoken records its data. Unset, with no checkpoint: no align stage, as in the paper."""
    checkpoint: str | None = None
    """an aligned checkpoint made before (`textkeep align`'s out) to start from instead of running a recipe."""

    def __post_init__(self):
        _need(not (self.recipe and self.checkpoint), "align.recipe and align.checkpoint exclude each other")
        for name in ("recipe", "checkpoint"):
            value = getattr(self, name)
            _need(value is None or Path(value).exists(), f"align.{name} '{value}' does not exist")

    @property
    def enabled(self) -> bool:
        return bool(self.recipe or self.checkpoint)


@dataclass
class EvalConfig:
    """Spoken QA (Tables 2, 3)."""

    sets: list[str] = field(default_factory=lambda: ["llama-questions", "web-questions"])
    """QA sets, each asked typed (T2T) and spoken (S2T)."""
    limit: int | None = None
    """only the first N questions of each set."""
    batch_size: int = 16
    """questions generated together."""
    max_new_tokens: int = 64
    """the longest answer, in tokens."""
    cascade: bool = True
    """the cascade reference row: Whisper base's own transcript through the text path (eval/cascade.py); the
    ceiling an encoder-adaptor model of this LLM aims at."""


@dataclass
class StudyConfig:
    """A study profile (configs/study/*.yaml): the models, each stage's settings, and which runs to train."""

    profile: str = "study"
    """the profile's name (default results folder: runs/<profile>/)."""
    llm: str = "smollm2-135m-instruct"
    """the causal LM (registry name, directory or hub id)."""
    encoder: str = "whisper-base"
    """the Whisper encoder."""
    encoder_policy: str = "pad30"
    """pad30 (Whisper's 30 s window, LLaMA-Omni) or trim (the real audio only); docs/design.md."""
    seed: int = 0
    """seeds the splits, the voices, every run's adaptor, LoRA and data order."""
    strategies: list[str] = field(default_factory=lambda: ["full", "layer-lr", "lora"])
    """the Stage-1 runs (each trained with `train`, its strategy set per run)."""
    lora_ranks: list[int] = field(default_factory=lambda: [8, 16, 24])
    """Table 3's ablation: a LoRA run per rank ([] to skip); train.lora_rank is the main LoRA run's."""
    data: DataConfig = field(default_factory=DataConfig)
    """the spoken training set."""
    align: AlignStageConfig = field(default_factory=AlignStageConfig)
    """the optional align stage before Stage 1."""
    importance: ImportanceConfig = field(default_factory=ImportanceConfig)
    """importance maps."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """training settings, the same as `textkeep train --train.KEY` (the study sets strategy, importance and seed
    per run). Its precision is every stage's: training, importance maps, deactivation and evaluation."""
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    """deactivation and drawn layer."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """spoken QA."""

    def __post_init__(self):
        for s in self.strategies:
            check_strategy(s)
        for r in self.lora_ranks:
            check_lora(r, None, 0.0)
        fixed = [k for k in ("strategy", "importance") if getattr(self.train, k) != getattr(TrainConfig(), k)]
        _need(
            not fixed,
            f"train.{fixed[0] if fixed else ''} is set by the study for each run; use `strategies` (and the base map "
            "the study computes) instead",
        )

    def run_names(self) -> dict[str, dict]:
        """Training runs: name → the strategy and rank it uses (the ablation's ranks other than lora_rank too)."""
        runs = {}
        for s in self.strategies:
            runs[s] = {"strategy": s, "lora_rank": self.train.lora_rank}
        for r in self.lora_ranks:
            if not ("lora" in runs and r == self.train.lora_rank):
                runs[f"lora-r{r}"] = {"strategy": "lora", "lora_rank": r}
        return runs


def config_keys(cls=StudyConfig, prefix: str = "") -> list[str]:
    """`key (type, default): help` for every key of a config, from the fields' docstrings (`textkeep study --help`)."""
    from docstring_parser import parse_from_object

    docs = {p.arg_name: (p.description or "").replace("\n", " ") for p in parse_from_object(cls).params}
    lines = []
    for f in fields(cls):
        if isinstance(f.default_factory, type) and is_dataclass(f.default_factory):  # a section: not built here
            lines += config_keys(f.default_factory, f"{prefix}{f.name}.")
        else:
            default = f.default_factory() if callable(f.default_factory) else f.default
            lines.append(f"{prefix}{f.name} (default {default!r}): {docs.get(f.name, '')}")
    return lines


def _build(cls, raw: dict, where: str):
    """A config dataclass from a YAML mapping: unknown keys are refused by name, values checked by the dataclass."""
    if not isinstance(raw, dict):
        raise TextkeepError(f"config section '{where}' must be a mapping, got {type(raw).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = set(raw) - set(known)
    if unknown:
        raise TextkeepError(f"unknown config key(s) {sorted(unknown)} in '{where}'; known keys: {sorted(known)}")
    kwargs = {}
    for name, value in raw.items():
        default = known[name].default_factory() if callable(known[name].default_factory) else known[name].default
        kwargs[name] = _build(type(default), value, f"{where}.{name}") if is_dataclass(default) else value
    return cls(**kwargs)


def load_config(path: str | Path) -> StudyConfig:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise TextkeepError(f"study config '{path}' does not exist; the profiles are in configs/study/")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise TextkeepError(f"'{path}' is not valid YAML: {e}") from None
    return _build(StudyConfig, raw, path.name)


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Study:
    def __init__(self, cfg: StudyConfig, out: Path):
        self.cfg, self.out = cfg, Path(out)
        self.layout = StudyLayout(self.out)
        self._hashes: dict[str, str] = {}

    # ---- bookkeeping -------------------------------------------------------------------------------------------
    def stage_hash(self, stage: str) -> str:
        if stage not in self._hashes:
            keys, upstream = DEPENDS[stage]
            cfg = asdict(self.cfg)
            self._hashes[stage] = _hash(
                {"config": {k: cfg[k] for k in keys}, "upstream": [self.stage_hash(u) for u in upstream]}
            )
        return self._hashes[stage]

    def _hash_in(self, stamp: Path) -> str | None:
        return json.loads(stamp.read_text()).get("hash") if stamp.is_file() else None

    def done(self, stage: str) -> bool:
        return self._hash_in(self.layout.stamp(stage)) == self.stage_hash(stage)

    def stale(self, stage: str) -> bool:
        """Outputs of this stage made under another config (or other upstream results): resuming them would mix
        the two, so the stage starts over. Work started under the same hash (a killed run) is resumed."""
        stamps = (self.layout.started(stage), self.layout.stamp(stage))
        return any(self._hash_in(p) not in (None, self.stage_hash(stage)) for p in stamps)

    def item_done(self, stage: str, item: str) -> bool:
        return self._hash_in(self.layout.item_stamp(stage, item)) == self.stage_hash(stage)

    def mark_item(self, stage: str, item: str) -> None:
        if process_state().is_main_process:
            write_json(self.layout.item_stamp(stage, item), {"hash": self.stage_hash(stage)})

    def run(self, force: set[str] = frozenset(), only: set[str] | None = None) -> Path:
        """Under `accelerate launch` every process runs this: all of them train (accelerate splits the batches);
        the other stages run on the main process while the rest wait, so no two processes write the same files."""
        state = process_state()
        main = state.is_main_process
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            write_json(self.layout.config, asdict(self.cfg))
        for stage in STAGES:
            if only is not None and stage not in only:
                continue
            if self.done(stage) and stage not in force:
                if main:
                    print(f"[study] {stage}: up to date, skipped")
                continue
            if main:
                if stage in force or self.stale(stage):  # start from nothing: items, checkpoints and predictions too
                    shutil.rmtree(self.layout.stage(stage), ignore_errors=True)
                write_json(self.layout.started(stage), {"hash": self.stage_hash(stage)})
                print(f"[study] {stage} …")
            state.wait_for_everyone()
            started = time.time()
            if main or stage in ("align", "train"):  # fit trains on every process: both must run it
                getattr(self, "stage_" + stage.replace("-", "_"))()
            seconds = round(time.time() - started, 1)
            if main:
                write_json(self.layout.stamp(stage), {"hash": self.stage_hash(stage), "seconds": seconds})
                print(f"[study] {stage}: done in {seconds:.0f} s")
            state.wait_for_everyone()
        return self.out

    # ---- shared inputs -----------------------------------------------------------------------------------------
    def spoken_dir(self, set_name: str) -> Path:
        from textkeep.eval.qa import spoken_manifest

        root = self.cfg.data.spoken_dir
        return Path(root) / set_name.replace("/", "_") if root else spoken_manifest(set_name).parent

    def pool(self):
        """The spoken instruction pool: the first n_examples records that pass the filters (the data stage saves it)."""
        from textkeep.data.datasets import filter_records, load_dataset

        d = self.cfg.data
        tokenizer = None
        if d.max_response_tokens is not None:
            from transformers import AutoTokenizer

            from textkeep.model.registry import resolve

            tokenizer = AutoTokenizer.from_pretrained(resolve(self.cfg.llm))
        records = filter_records(
            load_dataset(d.train),
            max_query_words=d.max_query_words,
            max_response_tokens=d.max_response_tokens,
            tokenizer=tokenizer,
            dedupe=True,
        )
        return records[: d.n_examples]

    def splits(self):
        """The data stage's pool (read back from its file: filtering the whole dataset again costs seconds per call),
        with its audio, cut into the saved splits."""
        from textkeep.data.datasets import attach_audio, load_dataset
        from textkeep.data.splits import apply_split_ids

        manifest = self.spoken_dir(self.cfg.data.train) / "manifest.jsonl"
        return apply_split_ids(attach_audio(load_dataset(str(self.layout.pool)), manifest), self.layout.splits)

    def spoken_sets(self) -> dict[str, str]:
        return {s: str(self.spoken_dir(s) / "manifest.jsonl") for s in self.cfg.eval.sets if s != "llama-questions"}

    def base_model(self, with_encoder: bool = True):
        from textkeep.model.speech_llm import load_speech_llm

        encoder = self.cfg.encoder if with_encoder else None
        model = load_speech_llm(self.cfg.llm, encoder, seed=self.cfg.seed, encoder_policy=self.cfg.encoder_policy)
        return on_device(model)

    def trained_model(self, run: str):
        from textkeep.model.speech_llm import load_speech_llm

        return on_device(load_speech_llm(self.layout.run_dir(run)))

    def aligned(self) -> Path | None:
        """The aligned checkpoint every strategy starts from, or None (no align stage: a random adaptor)."""
        a = self.cfg.align
        return Path(a.checkpoint) if a.checkpoint else self.layout.align_run if a.recipe else None

    def trained(self) -> dict[str, Path]:
        return {name: self.layout.run_dir(name) for name in self.cfg.run_names()}

    # ---- stages --------------------------------------------------------------------------------------------------
    def stage_data(self) -> None:
        from textkeep.data.datasets import load_dataset
        from textkeep.data.features import FeatureCache
        from textkeep.data.speak import speak
        from textkeep.data.splits import make_splits, save_split_ids
        from textkeep.eval.qa import QA_SETS, load_qa_set

        d, voices = self.cfg.data, self.cfg.data.voices
        pool = self.pool()
        if len(pool) <= d.test_size:
            raise TextkeepError(
                f"only {len(pool)} usable records in '{d.train}'; lower data.test_size or use a larger dataset"
            )
        speak(pool, self.spoken_dir(d.train), voices=voices, seed=self.cfg.seed)
        splits = make_splits(pool, test_size=d.test_size, importance_fraction=d.importance_fraction, seed=self.cfg.seed)
        save_split_ids(splits, self.layout.splits.parent)
        # The pool itself, so that training reads exactly these records (and the results keep what they came from).
        rows = ({"id": r.id, "instruction": r.instruction, "response": r.response} for r in pool)
        write_text(self.layout.pool, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        for set_name in self.cfg.eval.sets:
            if set_name == "llama-questions":
                continue  # recorded speech
            records = load_dataset(QA_SETS.get(set_name, set_name))[: self.cfg.eval.limit]
            if any(r.audio is None for r in records):
                speak(records, self.spoken_dir(set_name), voices=voices, seed=self.cfg.seed)
        cache = FeatureCache(self.base_model())
        spoken = self.splits()  # the split again, now with the audio just synthesized attached
        cache.frames(spoken.train + spoken.test)
        for set_name in self.cfg.eval.sets:
            cache.frames(load_qa_set(set_name, self.spoken_sets(), need_audio=True, limit=self.cfg.eval.limit))

    def _map(self, model, spec: str, records, modality: str, out: Path) -> None:
        """One importance map, by the code path of `textkeep importance compute`."""
        from textkeep.importance.compute import importance_of

        i = self.cfg.importance
        meta = {"model": spec, "dataset": self.cfg.data.train, "split": "importance", "seed": self.cfg.seed}
        importance_of(
            model,
            records[: i.limit],
            modality=modality,
            mode=i.mode,
            batch_size=i.batch_size,
            meta=meta,
            precision=self.cfg.train.precision,
        ).save(out)

    def stage_base_importance(self) -> None:
        model, records = self.base_model(with_encoder=False), self.splits().importance[: self.cfg.importance.limit]
        if not self.item_done("base-importance", "map"):
            self._map(model, self.cfg.llm, records, "text", self.layout.base_map())
            self.mark_item("base-importance", "map")
        if self.cfg.importance.noise_floor and len(records) >= 2:
            half = len(records) // 2
            for name, part in (("half-a", records[:half]), ("half-b", records[half:])):
                if not self.item_done("base-importance", name):
                    self._map(model, self.cfg.llm, part, "text", self.layout.base_map(name))
                    self.mark_item("base-importance", name)

    def stage_align(self) -> None:
        """`textkeep align --config RECIPE` into align/run, its arguments parsed as the CLI parses them."""
        import yaml
        from jsonargparse import ArgumentParser

        from textkeep.train.align import align

        recipe = self.cfg.align.recipe
        if recipe is None:
            return  # a checkpoint made before, or no align stage
        raw = yaml.safe_load(Path(recipe).read_text()) or {}
        run = self.layout.align_run
        raw |= {"out": str(run), "resume": (run / "train_config.json").is_file()}
        raw.setdefault("model", self.cfg.llm)
        raw.setdefault("encoder", self.cfg.encoder)
        raw.setdefault("encoder_policy", self.cfg.encoder_policy)
        if "data" not in raw:  # the study's own training split, spoken (never its test split)
            if process_state().is_main_process:
                rows = ({"id": r.id, "instruction": r.instruction, "response": r.response} for r in self.splits().train)
                write_text(self.layout.align_data, "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in rows))
            process_state().wait_for_everyone()
            raw["data"] = [str(self.layout.align_data)]
            raw["spoken"] = [str(self.spoken_dir(self.cfg.data.train) / "manifest.jsonl")]
        parser = ArgumentParser()
        parser.add_function_arguments(align, as_group=False)
        instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes  # renamed in 4.49
        try:
            args = instantiate(parser.parse_object(raw))
        except Exception as e:  # jsonargparse's own message names the key
            raise TextkeepError(f"align recipe '{recipe}' is not a valid `textkeep align` config: {e}") from None
        align(**{k: args[k] for k in args.keys()})

    def stage_train(self) -> None:
        from textkeep.train.trainer import train

        # Every process must agree on what is done and what resumes before any of them writes into a run folder.
        todo = {
            name: (self.layout.run_dir(name) / "train_config.json").is_file()
            for name in self.cfg.run_names()
            if not self.item_done("train", name)
        }
        process_state().wait_for_everyone()
        for name, run in self.cfg.run_names().items():
            if name not in todo:
                continue
            importance = self.layout.base_map() if run["strategy"] in NEEDS_MAP else None
            cfg = replace(
                self.cfg.train,
                strategy=run["strategy"],
                lora_rank=run["lora_rank"],
                importance=importance,
                seed=self.cfg.seed,
            )
            train(
                model=str(self.aligned() or self.cfg.llm),  # every strategy from the same aligned adaptor
                encoder=self.cfg.encoder,
                data=str(self.layout.pool),
                spoken=self.spoken_dir(self.cfg.data.train) / "manifest.jsonl",
                out=self.layout.run_dir(name),
                split_file=self.layout.splits,
                encoder_policy=self.cfg.encoder_policy,
                resume=todo[name],
                train=cfg,
            )
            self.mark_item("train", name)

    def stage_importance(self) -> None:
        splits = self.splits()
        for name, run_dir in self.trained().items():
            if not self.item_done("importance", name):
                self._map(self.trained_model(name), str(run_dir), splits.importance, "text", self.layout.map(name))
                self.mark_item("importance", name)
        if "full" in self.trained() and not self.item_done("importance", "full-speech"):
            run_dir = str(self.layout.run_dir("full"))
            self._map(
                self.trained_model("full"), run_dir, splits.importance, "speech", self.layout.map("full", "speech")
            )
            self.mark_item("importance", "full-speech")

    def stage_analysis(self) -> None:
        from textkeep.importance.change import importance_change
        from textkeep.importance.clusters import importance_clusters
        from textkeep.importance.deactivation import deactivate, write_deactivation
        from textkeep.importance.layers import importance_layers
        from textkeep.importance.shift import importance_shift

        lay, a = self.layout, self.cfg.analysis
        base = lay.base_map()
        strategies = [s for s in self.cfg.strategies if s in self.trained()]  # every strategy, in the config's order
        maps = [base] + [lay.map(s) for s in strategies]
        labels = ["No-FT (base)"] + [label(s) for s in strategies]
        importance_layers(maps, labels, lay.analysis("layers"), by_module=True)
        if "full" in strategies:  # the paper's Fig 2: the base against Full-FT
            importance_layers(maps[:2], labels[:2], lay.analysis("layers-fig2"))
        mitigations = [i for i, s in enumerate(strategies, start=1) if s != "full"]
        if mitigations:  # the paper's Fig 3: the base against the mitigations
            importance_layers(
                [base] + [maps[i] for i in mitigations],
                [labels[0]] + [labels[i] for i in mitigations],
                lay.analysis("layers-fig3"),
            )
        if strategies:
            runs = list(self.trained())
            importance_shift(base, [lay.map(n) for n in runs], [label(n) for n in runs], lay.analysis("shift"))
            halves = [lay.base_map(h) for h in ("half-a", "half-b")]
            if self.cfg.importance.noise_floor and all(h.is_dir() for h in halves):
                other = ["No-FT, other half of the importance split"]
                importance_shift(halves[0], [halves[1]], other, lay.analysis("shift-noise"))
            importance_change(
                self.cfg.llm,
                [str(lay.run_dir(s)) for s in strategies],
                [label(s) for s in strategies],
                a.layer,
                out=lay.analysis("change"),
            )
        if "full" in strategies:
            text_map, speech_map = lay.map("full"), lay.map("full", "speech")
            importance_clusters(
                [text_map, speech_map], ["text input", "speech input"], a.layer, out=lay.analysis("clusters")
            )
            model = self.trained_model("full")
            result = deactivate(
                model,
                text_map,
                self.splits().test[: a.deactivation_limit],
                inputs=["speech", "text"],
                percent=a.deactivation_percent,
                scope=a.deactivation_scope,
                seed=self.cfg.seed,
                include_norms=a.deactivation_include_norms,
                precision=self.cfg.train.precision,
            )
            result["model"] = str(lay.run_dir("full"))
            write_deactivation(lay.deactivation.parent, result, label("full"))

    def stage_eval(self) -> None:
        from textkeep.eval.qa import evaluate
        from textkeep.layout import ALIGNED_RUN, BASE_RUN, CASCADE_RUN
        from textkeep.model.speech_llm import load_speech_llm

        e = self.cfg.eval
        kw = dict(limit=e.limit, batch_size=e.batch_size, max_new_tokens=e.max_new_tokens, spoken=self.spoken_sets(),
                  precision=self.cfg.train.precision)  # fmt: skip
        base = self.base_model(with_encoder=False)
        evaluate(base, e.sets, ["t2t"], self.layout.eval_dir(BASE_RUN), model_name=label(BASE_RUN), **kw)
        if e.cascade:  # the base LLM's text path reading the study's Whisper's own transcripts
            cascade = self.base_model(with_encoder=True)
            evaluate(cascade, e.sets, ["cascade"], self.layout.eval_dir(CASCADE_RUN), model_name=CASCADE_RUN, **kw)
        if self.aligned() is not None:
            model = on_device(load_speech_llm(self.aligned()))
            evaluate(model, e.sets, ["t2t", "s2t"], self.layout.eval_dir(ALIGNED_RUN), model_name=ALIGNED_RUN, **kw)
        for name in self.trained():
            evaluate(
                self.trained_model(name), e.sets, ["t2t", "s2t"], self.layout.eval_dir(name), model_name=name, **kw
            )

    def stage_report(self) -> None:
        from textkeep.report.html import write_report

        write_report(self.layout, self.cfg)


def study(study_config: Path, out: Path | None = None, force: list[str] = [], only: list[str] = []) -> Path:
    """Run the paper's whole study with one config (a profile in configs/study/) and write the report.

    Args:
        study_config: a study YAML (configs/study/quick.yaml, full.yaml, …); its keys are listed below. Named so
            because --config is the generic option that fills any command's arguments from YAML.
        out: the results folder (default: runs/<profile>/). A rerun continues there and skips finished stages.
        force: stages to redo even if they are up to date.
        only: stages to run alone (their inputs must exist).
    """
    cfg = load_config(study_config)
    unknown = (set(force) | set(only)) - set(STAGES)
    if unknown:
        raise TextkeepError(f"unknown stage(s) {sorted(unknown)}; the stages are {', '.join(STAGES)}")
    from textkeep.settings import data_dir

    try:
        data_dir(required=True)
    except TextkeepError as e:
        raise TextkeepError(f"the study needs its data before anything else: {e}") from None
    out = Path(out) if out else Path("runs") / cfg.profile
    result = Study(cfg, out).run(force=set(force), only=set(only) or None)
    print(f"report: {StudyLayout(result).report}")
    return result


# `textkeep study --help` lists every key a study YAML may set, from the config dataclasses' own field docstrings.
# They go into the `study_config` argument's own entry, the part of a docstring that --help prints in full.
_KEYS = "".join(f"\n            {line}" for line in config_keys())
study.__doc__ = study.__doc__.replace("its keys are listed below.", f"its keys:{_KEYS}\n           ")
__all__ = ["LABELS", "STAGES", "Study", "StudyConfig", "load_config", "study"]
