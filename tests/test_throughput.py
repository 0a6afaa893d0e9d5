"""Tokens and FLOPs in the logs (vlp/throughput.py): the FLOP count of a training step against
torch's FlopCounterMode, and the logged tokens/s, TFLOP/s and MFU of a short run."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from tests.test_golden_runs import write_shards
from vlp.config import load_config
from vlp.model import VLPModel, new_clip, register_model_configs
from vlp.objectives import WeightedObjective
from vlp.throughput import BACKWARD_FACTOR, FlopModel
from vlp.trainer import Trainer

CAPTIONS = ["a red circle", "a small blue star and a large green cross on a striped background",
            "two shapes", "a white heart in the top left corner"]  # fmt: skip


def _setup(name: str, slots: int):
    register_model_configs()
    torch.manual_seed(0)
    clip = new_clip(name)
    model = VLPModel(clip, pad_id=getattr(clip, "pad_id", 0))
    tokenizer = open_clip.get_tokenizer(name)
    rows = [CAPTIONS[(i + k) % len(CAPTIONS)] for i in range(len(CAPTIONS)) for k in range(slots)]
    text = tokenizer(rows).reshape(len(CAPTIONS), slots, -1)
    images = torch.randn(len(CAPTIONS), 3, 32, 32)
    caption = 2.0 if hasattr(clip, "text_decoder") else 0.0
    cfg = load_config(None, ["data.train_shards=x", f"objectives.caption.weight={caption}"])
    return model, WeightedObjective(cfg.objectives), images, text, tokenizer.context_length


@pytest.mark.parametrize("name,slots", [("vlp-tiny-clip", 1), ("vlp-tiny-clip", 3),
                                        ("vlp-tiny-coca", 1), ("vlp-tiny-coca", 2)])  # fmt: skip
def test_the_count_of_a_training_step_is_within_5_percent_of_flop_counter(name, slots):
    model, objective, images, text, context = _setup(name, slots)
    flops = FlopModel(model, context)
    with FlopCounterMode(display=False) as forward:
        out = model(images, text)
    # the forward count is exact: the fit is a polynomial of the right degree
    assert flops.forward_flops(text, None) == pytest.approx(forward.get_total_flops(), rel=1e-6)
    with FlopCounterMode(display=False) as step:
        loss, _ = objective(model(images, text), None)
        loss.backward()
    estimate = BACKWARD_FACTOR * flops.forward_flops(text, None)
    assert estimate == pytest.approx(step.get_total_flops(), rel=0.05)
    assert out.image_emb.shape[0] == len(CAPTIONS)


def test_tokens_are_patches_plus_the_text_positions_processed():
    model, _, _, text, context = _setup("vlp-tiny-clip", 2)
    flops = FlopModel(model, context)
    length = int((text != 0).any(0).any(0).nonzero().max()) + 1
    assert flops.patches == (32 // 8) ** 2
    assert flops.tokens(text, None) == len(CAPTIONS) * (16 + 2 * length)


def test_a_run_logs_tokens_per_second_tflops_and_mfu(tmp_path):
    (tmp_path / "shards").mkdir()
    settings = [f"data.train_shards={write_shards(tmp_path / 'shards')}", "data.batch_size=4",
                "data.workers=0", "train.steps=2", "train.log_every_steps=1", "run.trackers=[]",
                f"run.output_dir={tmp_path / 'run'}", "model.name=vlp-tiny-clip",
                "train.peak_tflops=0.5"]  # fmt: skip
    Trainer(load_config(None, settings)).train()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    steps = [r for r in records if "samples_per_s" in r]
    assert len(steps) == 2
    for record in steps:
        assert record["tokens_per_s"] > 0 and record["tflops"] > 0
        assert record["mfu"] == pytest.approx(record["tflops"] / 0.5)
