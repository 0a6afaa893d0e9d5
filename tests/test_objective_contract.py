"""The objective contract: a term and its config section plug in from one file (this one).

The toy term below is registered here, with no edit to the trainer, vlp/config.py or the
optimizer: its section `objectives.toy_gap` exists, validates itself, and trains. It is
registered for this file's tests only, so other tests see the real objectives section.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import pytest
from torch import Tensor

from vlp.config import ConfigError, TermConfig, load_config, objectives_schema
from vlp.data.pipeline import Batch
from vlp.model import ModelOutput
from vlp.objectives import OBJECTIVES, Objective


@dataclass
class ToyConfig(TermConfig):
    power: float = 2.0
    """The exponent of the distance between matched embeddings."""

    def checks(self) -> list[tuple[bool, str, str]]:
        return [(self.power > 0, "power", "positive")]


class ToyGap(Objective):
    """mean_i ‖x_i − y_i‖^power over the local batch (not batch-coupled)."""

    Config = ToyConfig

    def __call__(self, out: ModelOutput, batch: Batch) -> Tensor:
        return (out.image_emb - out.text_emb).norm(dim=-1).pow(self.cfg.power).mean()


@pytest.fixture(autouse=True)
def _toy_gap_registered():
    OBJECTIVES.register("toy_gap")(ToyGap)
    yield
    OBJECTIVES.remove("toy_gap")


def test_every_registered_term_is_a_config_section_and_nothing_else():
    sections = {f.name: f.type for f in dataclasses.fields(objectives_schema())}
    terms = OBJECTIVES.entries()
    assert list(sections) == list(terms)
    for name, term in terms.items():
        assert issubclass(term, Objective), name
        assert sections[name] is term.Config and issubclass(term.Config, TermConfig), name


def test_a_toy_term_from_this_file_validates_its_own_section():
    cfg = load_config(None, ["data.train_shards=x", "objectives.toy_gap.weight=0.5"])
    assert cfg.objectives.active()["toy_gap"] == ToyConfig(weight=0.5)
    with pytest.raises(ConfigError, match=r"^objectives\.toy_gap\.power: must be positive$"):
        load_config(None, ["data.train_shards=x", "objectives.toy_gap.power=0"])
    with pytest.raises(ConfigError, match="did you mean objectives.toy_gap.power"):
        load_config(None, ["data.train_shards=x", "objectives.toy_gap.powr=1"])


@pytest.mark.slow
def test_a_toy_term_from_this_file_trains(tmp_path):
    from tests.test_golden_runs import write_shards
    from vlp.trainer import Trainer

    pattern = write_shards(tmp_path, shards=2, per_shard=8)
    cfg = load_config(
        None,
        [
            f"data.train_shards={pattern}",
            "model.name=vlp-tiny-clip",
            "data.batch_size=4",
            "data.workers=0",
            "data.shuffle_buffer=8",
            "train.steps=3",
            "train.threads=1",
            "train.log_every_steps=1",
            "checkpoint.every_steps=3",
            "objectives.toy_gap.weight=0.5",
            "objectives.toy_gap.power=1",
            f"run.output_dir={tmp_path / 'run'}",
            "run.trackers=[]",
        ],
    )
    Trainer(cfg).train()
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    records = [r for r in map(json.loads, lines) if "loss/total" in r]
    assert len(records) == 3
    for record in records:
        total = record["loss/contrastive"] + 0.5 * record["loss/toy_gap"]
        assert record["loss/total"] == pytest.approx(total, rel=1e-6)
    assert (tmp_path / "run" / "checkpoints" / f"step_{3:09d}").is_dir()
