"""Where a study keeps everything: the one owner of its folder layout, read by the stages and the report alike.

<root>/config.json                      the config the study last ran with
<root>/<stage>/started.json, stage.json the stage's config hash when it began / when it finished
<root>/data/pool.jsonl, splits.json     the spoken instruction pool and its splits
<root>/base-importance/map              the pre-trained LLM's textual map; half-a/map, half-b/map: the noise floor
<root>/train/<run>/                     a training run (its final model in model/)
<root>/importance/<run>/map             a run's textual map; <run>-speech/map: its speech-input map
<root>/analysis/<name>/                 layers, layers-fig2, layers-fig3, shift, shift-noise, change, clusters,
                                        deactivation
<root>/eval/<run>/                      predictions.jsonl, metrics.json, table.md (run "no-ft": the base LLM)
<root>/report/index.html, results.json
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

STAGES = ("data", "base-importance", "align", "train", "importance", "analysis", "eval", "report")
LABELS = {
    "no-ft": "No-FT",
    "full": "Full-FT",
    "layer-lr": "Layer-LR",
    "lora": "LoRA",
    "masked": "Masked",
    "anchor": "Anchor",
    "layer-lr+lora": "Layer-LR + LoRA",
    "kd-text": "KD-text",
    "aligned": "Aligned (LLM frozen)",
    "cascade": "Cascade (Whisper base → text path)",
}
BASE_RUN = "no-ft"  # the eval folder of the pre-trained LLM
ALIGNED_RUN, CASCADE_RUN = "aligned", "cascade"  # the eval folders of the align stage's model and of the cascade
# Each paper figure: the analysis folder that draws it and the file's stem there.
FIGURES = {
    "fig1": ("clusters", "clusters"),
    "fig2": ("layers-fig2", "layers"),
    "fig3": ("layers-fig3", "layers"),
    "fig4": ("change", "change"),
    "layers": ("layers", "layers"),
    "layers_by_module": ("layers", "layers_by_module"),
}


def label(run: str) -> str:
    """The paper's name of a run (Full-FT, Layer-LR, LoRA, No-FT); other runs keep their own name (lora-r16)."""
    return LABELS.get(run, run)


@dataclass(frozen=True)
class StudyLayout:
    root: Path

    def stage(self, stage: str) -> Path:
        return self.root / stage

    def stamp(self, stage: str) -> Path:
        return self.stage(stage) / "stage.json"

    def started(self, stage: str) -> Path:
        return self.stage(stage) / "started.json"

    def item_stamp(self, stage: str, item: str) -> Path:
        return self.stage(stage) / item / "done.json"

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    # ---- data ----
    @property
    def pool(self) -> Path:
        return self.stage("data") / "pool.jsonl"

    @property
    def splits(self) -> Path:
        return self.stage("data") / "splits.json"

    # ---- importance ----
    def base_map(self, half: str | None = None) -> Path:
        """The base LLM's map on the importance split, or on one half of it (half="half-a" / "half-b")."""
        return self.stage("base-importance") / (f"{half}/map" if half else "map")

    def map(self, run: str, modality: str = "text") -> Path:
        return self.stage("importance") / (run if modality == "text" else f"{run}-{modality}") / "map"

    # ---- alignment ----
    @property
    def align_run(self) -> Path:
        """The align stage's run directory (`textkeep align --out`): model/, curve.jsonl, checkpoints/."""
        return self.stage("align") / "run"

    @property
    def align_data(self) -> Path:
        """The training split's records, which the align stage trains on when its recipe names no data."""
        return self.stage("align") / "train.jsonl"

    # ---- training and evaluation ----
    def run_dir(self, run: str) -> Path:
        return self.stage("train") / run

    def eval_dir(self, run: str) -> Path:
        return self.stage("eval") / run

    # ---- analysis and report ----
    def analysis(self, name: str) -> Path:
        return self.stage("analysis") / name

    def figure(self, name: str, ext: str = "png") -> Path:
        folder, stem = FIGURES[name]
        return self.analysis(folder) / f"{stem}.{ext}"

    @property
    def deactivation(self) -> Path:
        return self.analysis("deactivation") / "deactivation.json"

    @property
    def report(self) -> Path:
        return self.stage("report") / "index.html"

    @property
    def results(self) -> Path:
        return self.stage("report") / "results.json"
