"""The whole study of the paper, one command:  textkeep study configs/study/quick.yaml [--out DIR]

Stages run in order over one results directory (default runs/<profile>/):

    data             spoken training set (TTS), its test / importance splits, spoken eval sets, speech features
    base-importance  textual importance of the pre-trained LLM on the importance split
    train            Full-FT, Layer-LR (Eq. 3 on the base map), LoRA, and the LoRA rank ablation
    importance       textual importance of every fine-tuned model; speech importance of Full-FT
    analysis         layer distributions (Figs 2, 3), shift table, rank clustering (Fig 1), parameter change
                     (Fig 4), deactivation (Table 1) on Full-FT
    eval             T2T / S2T accuracy on LLaMA Questions and Web Questions (Tables 2, 3)
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
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path

from textkeep.errors import TextkeepError
from textkeep.fileio import write_json, write_text

STAGES = ("data", "base-importance", "train", "importance", "analysis", "eval", "report")
# What each stage reads from the config, and which stages' outputs it reads.
DEPENDS = {
    "data": (("llm", "encoder", "encoder_policy", "seed", "data", "eval"), ()),
    "base-importance": (("llm", "importance"), ("data",)),
    "train": (("llm", "encoder", "encoder_policy", "train"), ("data", "base-importance")),
    "importance": (("importance",), ("train",)),
    "analysis": (("analysis",), ("importance",)),
    "eval": (("eval",), ("train",)),
    "report": ((), ("analysis", "eval")),
}


@dataclass
class DataConfig:
    train: str = "alpaca-gpt4"  # instruction data, spoken by our TTS
    n_examples: int = 600  # instructions synthesized (training + test split)
    test_size: int = 100  # the paper: 500 held-out examples
    importance_fraction: float = 1 / 30  # the paper: importance on 1/30 of the training data
    max_query_words: int = 50
    max_response_tokens: int | None = None  # drop longer responses (LLM tokens); caps training memory on small machines
    voices: str = "piper:joe,flite:kal,flite:slt,flite:awb,flite:rms"
    spoken_dir: str | None = None  # where spoken sets go; default: the cache's spoken/<set>/


@dataclass
class ImportanceConfig:
    mode: str = "paper"
    batch_size: int = 8
    limit: int | None = None  # cap on importance examples (the split's size otherwise)
    # Two more base maps, each on one half of the importance split: how far apart maps of the same model drift by
    # sampling alone. The report's shift verdicts count a difference only when it exceeds this floor.
    noise_floor: bool = True


@dataclass
class TrainConfig:
    strategies: list[str] = field(default_factory=lambda: ["full", "layer-lr", "lora"])
    lora_rank: int = 8  # the paper: 8 for 1B, 16 for 8B
    lora_ranks: list[int] = field(default_factory=lambda: [8, 16, 24])  # Table 3's ablation; [] to skip
    lam: float = 0.4
    lr: float = 2e-5
    epochs: float = 3
    batch_size: int = 8
    grad_accum: int = 4
    max_steps: int | None = None
    save_every: int = 50
    adaptor_warmup_steps: int = 0
    adaptor_lr: float = 1e-3
    gradient_checkpointing: bool = False


@dataclass
class AnalysisConfig:
    deactivation_percent: float = 3.0
    deactivation_limit: int = 100
    deactivation_scope: str = "tensor"
    deactivation_include_norms: bool = True  # false: weight matrices only (norms' bottom entries are not small)
    layer: int | None = None  # the layer drawn in Figs 1 and 4 (default: the middle one)


@dataclass
class EvalConfig:
    sets: list[str] = field(default_factory=lambda: ["llama-questions", "web-questions"])
    limit: int | None = None
    batch_size: int = 16
    max_new_tokens: int = 64


@dataclass
class StudyConfig:
    profile: str = "study"
    llm: str = "smollm2-135m-instruct"
    encoder: str = "whisper-base"
    encoder_policy: str = "pad30"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    importance: ImportanceConfig = field(default_factory=ImportanceConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def run_names(self) -> dict[str, dict]:
        """Training runs: name → the strategy and rank it uses (the ablation's ranks other than lora_rank included)."""
        runs = {}
        for s in self.train.strategies:
            runs[s] = {"strategy": s, "lora_rank": self.train.lora_rank}
        for r in self.train.lora_ranks:
            if not ("lora" in runs and r == self.train.lora_rank):
                runs[f"lora-r{r}"] = {"strategy": "lora", "lora_rank": r}
        return runs


def _build(cls, raw: dict, where: str):
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
    cfg = _build(StudyConfig, raw, path.name)
    _validate(cfg)
    return cfg


def _validate(cfg: StudyConfig) -> None:
    bad = [s for s in cfg.train.strategies if s not in ("full", "layer-lr", "lora")]
    if bad:
        raise TextkeepError(f"train.strategies has {bad}; choose from full, layer-lr, lora")
    if not 0 <= cfg.train.lam <= 1:
        raise TextkeepError(f"train.lam must be in [0, 1] (Eq. 3), got {cfg.train.lam}")
    if cfg.train.lora_rank <= 0 or any(r <= 0 for r in cfg.train.lora_ranks):
        raise TextkeepError("LoRA ranks must be positive")
    if cfg.data.test_size < 1 or cfg.data.n_examples <= cfg.data.test_size:
        raise TextkeepError(
            f"data.n_examples ({cfg.data.n_examples}) must exceed data.test_size ({cfg.data.test_size})"
        )
    if cfg.importance.mode not in ("paper", "abs", "fisher"):
        raise TextkeepError(f"importance.mode must be paper, abs or fisher, got {cfg.importance.mode!r}")


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Study:
    def __init__(self, cfg: StudyConfig, out: Path):
        self.cfg, self.out = cfg, Path(out)
        self.times: dict[str, float] = {}
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

    def done(self, stage: str) -> bool:
        stamp = self.out / stage / "stage.json"
        return stamp.is_file() and json.loads(stamp.read_text()).get("hash") == self.stage_hash(stage)

    def stale(self, stage: str) -> bool:
        """Outputs of this stage made under another config (or other upstream results): resuming them would mix
        the two, so the stage starts over. Work started under the same hash (a killed run) is resumed."""
        for stamp in (self.out / stage / "started.json", self.out / stage / "stage.json"):
            if stamp.is_file() and json.loads(stamp.read_text()).get("hash") != self.stage_hash(stage):
                return True
        return False

    def item_done(self, stage: str, item: str) -> bool:
        stamp = self.out / stage / item / "done.json"
        return stamp.is_file() and json.loads(stamp.read_text()).get("hash") == self.stage_hash(stage)

    def mark_item(self, stage: str, item: str) -> None:
        if process_state().is_main_process:
            write_json(self.out / stage / item / "done.json", {"hash": self.stage_hash(stage)})

    def run(self, force: set[str] = frozenset(), only: set[str] | None = None) -> Path:
        """Under `accelerate launch` every process runs this: all of them train (accelerate splits the batches);
        the other stages run on the main process while the rest wait, so no two processes write the same files."""
        state = process_state()
        main = state.is_main_process
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            write_json(self.out / "config.json", asdict(self.cfg))
        for stage in STAGES:
            if only is not None and stage not in only:
                continue
            if self.done(stage) and stage not in force:
                if main:
                    print(f"[study] {stage}: up to date, skipped")
                continue
            if main:
                if stage in force or self.stale(stage):  # start from nothing: items, checkpoints and predictions too
                    shutil.rmtree(self.out / stage, ignore_errors=True)
                write_json(self.out / stage / "started.json", {"hash": self.stage_hash(stage)})
                print(f"[study] {stage} …")
            state.wait_for_everyone()
            started = time.time()
            if main or stage == "train":
                getattr(self, "stage_" + stage.replace("-", "_"))()
            seconds = round(time.time() - started, 1)
            if main:
                write_json(self.out / stage / "stage.json", {"hash": self.stage_hash(stage), "seconds": seconds})
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

    def pool_file(self) -> Path:
        return self.out / "data" / "pool.jsonl"

    def splits(self):
        """The data stage's pool (read back from its file: filtering the whole dataset again costs seconds per call),
        with its audio, cut into the saved splits."""
        from textkeep.data.datasets import attach_audio, load_dataset
        from textkeep.data.splits import apply_split_ids

        records = attach_audio(
            load_dataset(str(self.pool_file())), self.spoken_dir(self.cfg.data.train) / "manifest.jsonl"
        )
        return apply_split_ids(records, self.out / "data" / "splits.json")

    def spoken_sets(self) -> dict[str, str]:
        return {s: str(self.spoken_dir(s) / "manifest.jsonl") for s in self.cfg.eval.sets if s != "llama-questions"}

    def base_model(self, with_encoder: bool = True):
        from textkeep.model.speech_llm import SpeechLLM

        model = SpeechLLM.build(
            self.cfg.llm,
            self.cfg.encoder if with_encoder else None,
            seed=self.cfg.seed,
            encoder_policy=self.cfg.encoder_policy,
        )
        return on_device(model)

    def trained_model(self, name: str):
        from textkeep.model.speech_llm import SpeechLLM

        return on_device(SpeechLLM.load(self.run_dir(name)))

    def run_dir(self, name: str) -> Path:
        return self.out / "train" / name

    def trained(self) -> dict[str, Path]:
        return {name: self.run_dir(name) for name in self.cfg.run_names()}

    # ---- stages --------------------------------------------------------------------------------------------------
    def stage_data(self) -> None:
        from textkeep.data.features import FeatureCache
        from textkeep.data.speak import speak
        from textkeep.data.splits import make_splits, save_split_ids
        from textkeep.eval.qa import QA_SETS, load_qa_set

        voices = [v.strip() for v in self.cfg.data.voices.split(",") if v.strip()]
        pool = self.pool()
        if len(pool) <= self.cfg.data.test_size:
            raise TextkeepError(
                f"only {len(pool)} usable records in '{self.cfg.data.train}'; lower data.test_size or use a larger dataset"
            )
        speak(pool, self.spoken_dir(self.cfg.data.train), voices=voices, seed=self.cfg.seed)
        splits = make_splits(
            pool,
            test_size=self.cfg.data.test_size,
            importance_fraction=self.cfg.data.importance_fraction,
            seed=self.cfg.seed,
        )
        save_split_ids(splits, self.out / "data")
        # The pool itself, so that training reads exactly these records (and the results keep what they came from).
        rows = ({"id": r.id, "instruction": r.instruction, "response": r.response} for r in pool)
        write_text(self.pool_file(), "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        for set_name in self.cfg.eval.sets:
            if set_name == "llama-questions":
                continue  # recorded speech
            from textkeep.data.datasets import load_dataset

            records = load_dataset(QA_SETS.get(set_name, set_name))[: self.cfg.eval.limit]
            if any(r.audio is None for r in records):
                speak(records, self.spoken_dir(set_name), voices=voices, seed=self.cfg.seed)
        cache = FeatureCache(self.base_model())
        spoken = self.splits()  # the split again, now with the audio just synthesized attached
        cache.frames(spoken.train + spoken.test)
        for set_name in self.cfg.eval.sets:
            cache.frames(load_qa_set(set_name, self.spoken_sets(), need_audio=True, limit=self.cfg.eval.limit))

    def _importance(self, model, records, modality: str, out: Path) -> None:
        from textkeep.data.samples import make_samples
        from textkeep.importance.compute import compute_importance

        records = records[: self.cfg.importance.limit]
        imap = compute_importance(
            model,
            make_samples(model, records, modality),
            mode=self.cfg.importance.mode,
            batch_size=self.cfg.importance.batch_size,
        )
        imap.meta.update(
            {"model": str(out.name), "dataset": self.cfg.data.train, "split": "importance", "seed": str(self.cfg.seed)}
        )
        imap.save(out)

    def stage_base_importance(self) -> None:
        model, records = self.base_model(with_encoder=False), self.splits().importance[: self.cfg.importance.limit]
        if not self.item_done("base-importance", "map"):
            self._importance(model, records, "text", self.out / "base-importance" / "map")
            self.mark_item("base-importance", "map")
        if self.cfg.importance.noise_floor and len(records) >= 2:
            half = len(records) // 2
            for name, part in (("half-a", records[:half]), ("half-b", records[half:])):
                if not self.item_done("base-importance", name):
                    self._importance(model, part, "text", self.out / "base-importance" / name / "map")
                    self.mark_item("base-importance", name)

    def stage_train(self) -> None:
        from textkeep.train.trainer import train

        t = self.cfg.train
        # Every process must agree on what is done and what resumes before any of them writes into a run folder.
        todo = {
            name: (self.run_dir(name) / "train_config.json").is_file()
            for name in self.cfg.run_names()
            if not self.item_done("train", name)
        }
        process_state().wait_for_everyone()
        for name, run in self.cfg.run_names().items():
            if name not in todo:
                continue
            train(
                model=self.cfg.llm,
                encoder=self.cfg.encoder,
                data=str(self.pool_file()),
                spoken=self.spoken_dir(self.cfg.data.train) / "manifest.jsonl",
                strategy=run["strategy"],
                out=self.run_dir(name),
                importance=self.out / "base-importance" / "map",
                lam=t.lam,
                lora_rank=run["lora_rank"],
                lr=t.lr,
                epochs=t.epochs,
                batch_size=t.batch_size,
                grad_accum=t.grad_accum,
                max_steps=t.max_steps,
                save_every=t.save_every,
                split_file=self.out / "data" / "splits.json",
                adaptor_warmup_steps=t.adaptor_warmup_steps,
                adaptor_lr=t.adaptor_lr,
                gradient_checkpointing=t.gradient_checkpointing,
                seed=self.cfg.seed,
                resume=todo[name],
                encoder_policy=self.cfg.encoder_policy,
            )
            self.mark_item("train", name)

    def stage_importance(self) -> None:
        splits = self.splits()
        for name in self.trained():
            if not self.item_done("importance", name):
                self._importance(
                    self.trained_model(name), splits.importance, "text", self.out / "importance" / name / "map"
                )
                self.mark_item("importance", name)
        if "full" in self.trained() and not self.item_done("importance", "full-speech"):
            self._importance(
                self.trained_model("full"), splits.importance, "speech", self.out / "importance" / "full-speech" / "map"
            )
            self.mark_item("importance", "full-speech")

    def stage_analysis(self) -> None:
        from textkeep.data.samples import make_samples
        from textkeep.importance.analysis import (
            importance_change,
            importance_clusters,
            importance_layers,
            importance_shift,
        )
        from textkeep.importance.deactivation import deactivation_markdown, deactivation_table

        out = self.out / "analysis"
        base = self.out / "base-importance" / "map"
        strategies = [s for s in ("full", "layer-lr", "lora") if s in self.trained()]
        maps = [base] + [self.out / "importance" / s / "map" for s in strategies]
        labels = ["No-FT (base)"] + [LABELS[s] for s in strategies]
        importance_layers(maps, labels, out / "layers", by_module=True)
        if "full" in strategies:  # the paper's Fig 2: the base against Full-FT
            importance_layers(maps[:2], labels[:2], out / "layers-fig2")
        mitigations = [i for i, s in enumerate(strategies, start=1) if s != "full"]
        if mitigations:  # the paper's Fig 3: the base against the mitigations
            importance_layers(
                [base] + [maps[i] for i in mitigations],
                [labels[0]] + [labels[i] for i in mitigations],
                out / "layers-fig3",
            )
        if strategies:
            others = [self.out / "importance" / n / "map" for n in self.trained()]
            importance_shift(base, others, [LABELS.get(n, n) for n in self.trained()], out / "shift")
            halves = [self.out / "base-importance" / h / "map" for h in ("half-a", "half-b")]
            if self.cfg.importance.noise_floor and all(h.is_dir() for h in halves):
                importance_shift(
                    halves[0], [halves[1]], ["No-FT, other half of the importance split"], out / "shift-noise"
                )
            importance_change(
                self.cfg.llm,
                [str(self.run_dir(s)) for s in strategies],
                [LABELS[s] for s in strategies],
                self.cfg.analysis.layer,
                out=out / "change",
            )
        if "full" in strategies:
            text_map, speech_map = (
                self.out / "importance" / "full" / "map",
                self.out / "importance" / "full-speech" / "map",
            )
            importance_clusters(
                [text_map, speech_map], ["text input", "speech input"], self.cfg.analysis.layer, out=out / "clusters"
            )
            model = self.trained_model("full")
            test = self.splits().test[: self.cfg.analysis.deactivation_limit]
            samples = {"speech": make_samples(model, test, "speech"), "text": make_samples(model, test, "text")}
            table = deactivation_table(
                model,
                text_map,
                samples,
                percent=self.cfg.analysis.deactivation_percent,
                scope=self.cfg.analysis.deactivation_scope,
                seed=self.cfg.seed,
                include_norms=self.cfg.analysis.deactivation_include_norms,
            )
            write_json(
                out / "deactivation" / "deactivation.json",
                {
                    "Full-FT": table,
                    "percent": self.cfg.analysis.deactivation_percent,
                    "n": len(test),
                    "include_norms": self.cfg.analysis.deactivation_include_norms,
                },
            )
            write_text(
                out / "deactivation" / "deactivation.md",
                deactivation_markdown({"Full-FT": table}, self.cfg.analysis.deactivation_percent),
            )

    def stage_eval(self) -> None:
        from textkeep.eval.qa import evaluate

        e = self.cfg.eval
        kw = dict(limit=e.limit, batch_size=e.batch_size, max_new_tokens=e.max_new_tokens, spoken=self.spoken_sets())
        evaluate(
            self.base_model(with_encoder=False), e.sets, ["t2t"], self.out / "eval" / "no-ft", model_name="No-FT", **kw
        )
        for name in self.trained():
            evaluate(self.trained_model(name), e.sets, ["t2t", "s2t"], self.out / "eval" / name, model_name=name, **kw)

    def stage_report(self) -> None:
        from textkeep.report.html import write_report

        write_report(self)


LABELS = {"full": "Full-FT", "layer-lr": "Layer-LR", "lora": "LoRA"}


def process_state():
    """This process's place in an `accelerate launch` (or torchrun) run. accelerate treats several processes on CPUs
    as one distributed run only when asked for the CPU, so a machine without GPUs asks for it."""
    import torch
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available())


def on_device(model):
    """Models run where accelerate puts this process: its GPU when there is one (the same file runs unchanged on
    CPU and GPU), else the CPU. Training places its own model through its Accelerator."""
    return model.to(process_state().device)


def study(study_config: Path, out: Path | None = None, force: str | None = None, only: str | None = None) -> Path:
    """Run the paper's whole study with one config (a profile in configs/study/) and write the report.

    Args:
        study_config: a study YAML (configs/study/quick.yaml, full.yaml, …); named so because --config is the
            generic option that fills any command's arguments from YAML.
        out: the results folder (default: runs/<profile>/). A rerun continues there and skips finished stages.
        force: comma-separated stages to redo even if they are up to date.
        only: comma-separated stages to run alone (their inputs must exist).
    """
    cfg = load_config(study_config)
    names = lambda s: {x.strip() for x in s.split(",") if x.strip()} if s else set()  # noqa: E731
    unknown = (names(force) | names(only)) - set(STAGES)
    if unknown:
        raise TextkeepError(f"unknown stage(s) {sorted(unknown)}; the stages are {', '.join(STAGES)}")
    from textkeep.settings import data_dir

    try:
        data_dir(required=True)
    except TextkeepError as e:
        raise TextkeepError(f"the study needs its data before anything else: {e}") from None
    out = Path(out) if out else Path("runs") / cfg.profile
    result = Study(cfg, out).run(force=names(force), only=names(only) or None)
    print(f"report: {result / 'report' / 'index.html'}")
    return result
