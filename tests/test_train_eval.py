"""Evaluators during training: config, start-up checks, schedule, and a short run with them."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from eval.during_training import isolated, open_evaluators
from eval.tasks import AUTO, TASKS
from tests.conftest import demo_shards
from tests.eval.evalkit import write_eval_set
from vlp.cli import check_demo_shards
from vlp.config import EVAL_TYPES, ConfigError, EvalConfig, load_config
from vlp.data.shards import DataError

REPO = Path(__file__).resolve().parents[1]
STEPS = 6


def _load(*overrides: str):
    return load_config(REPO / "configs" / "demo.yaml", ["data.train_shards=x.tar", *overrides])


def test_eval_entries_from_yaml_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "data: {train_shards: x.tar}\neval:\n  shapes: {dataset: sets/shapes, every_steps: 100}\n"
    )
    cfg = load_config(path, ["eval.shapes.every_steps=50", "eval.extra.dataset=sets/extra"])
    assert cfg.eval == {
        "shapes": EvalConfig(dataset="sets/shapes", every_steps=50),
        "extra": EvalConfig(dataset="sets/extra"),
    }


def test_demo_config_evaluates_the_demo_eval_sets():
    cfg = load_config(REPO / "configs" / "demo.yaml")
    demo = Path(cfg.data.train_shards).parents[1]
    assert {Path(e.dataset) for e in cfg.eval.values()} == {
        demo / "eval/shapes",
        demo / "eval/retrieval",
    }


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("eval.s.every_step=5", "key 'eval.s.every_step'; did you mean eval.s.every_steps?"),
        ("eval.s.type=zeroshot", "eval.s.type: must be auto, zeroshot_classification, "),
        ("eval.s.every_steps=-1", "eval.s.every_steps: must be 0 (at the end only) or more"),
        ("eval.s.batch_size=0", "eval.s.batch_size: must be at least 1"),
        ("eval.s.every_steps=5", "eval.s.dataset: required, but not set"),
    ],
)  # fmt: skip
def test_eval_config_mistakes_name_the_key(override, message):
    entry = [] if "dataset" in message else ["eval.s.dataset=sets/s"]
    with pytest.raises(ConfigError, match=re.escape(message)):
        _load(*entry, override)


def test_config_type_names_are_the_eval_tasks():
    assert EVAL_TYPES == (AUTO, *TASKS)


def test_missing_set_is_a_warning_and_a_wrong_type_a_config_error(tmp_path):
    shapes = write_eval_set(tmp_path / "shapes", [(0, 0), (1, 1)], classnames=["a", "b"])
    configs = {
        "gone": EvalConfig(dataset=str(tmp_path / "gone")),
        "shapes": EvalConfig(dataset=str(shapes), every_steps=2, at_end=False),
        "final": EvalConfig(dataset=str(shapes)),
    }
    messages: list[str] = []
    evaluators = open_evaluators(configs, 5, messages.append)
    assert list(evaluators.schedule) == ["shapes", "final"]
    assert len(messages) == 1 and "eval.gone switched off" in messages[0]
    assert str(tmp_path / "gone") in messages[0]
    assert [evaluators.due(step) for step in range(1, 6)] == [
        [],
        ["shapes"],
        [],
        ["shapes"],
        ["final"],
    ]

    wrong = {"shapes": EvalConfig(dataset=str(shapes), type="zeroshot_retrieval")}
    with pytest.raises(ConfigError, match="eval.shapes.type: zeroshot_retrieval needs a retrieval"):
        open_evaluators(wrong, 5, messages.append)


def test_isolated_restores_rng_states_and_each_module_mode():
    module = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5))
    module.train()
    module[0].eval()  # e.g. a frozen tower kept in eval mode
    states = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    with isolated(module, torch.device("cpu")):
        assert not any(m.training for m in module.modules())
        torch.rand(3)
        np.random.rand(3)
        random.random()
    assert torch.equal(torch.get_rng_state(), states[0])
    assert np.array_equal(np.random.get_state()[1], states[1]) and random.getstate() == states[2]
    assert [m.training for m in module.modules()] == [True, False, True]


# ---- on tiny demo shards: a short run with evaluators, against the same run without


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """Tiny demo shards and eval sets, and a model whose training draws random numbers."""
    out = demo_shards(tmp_path_factory.mktemp("demo"), 64, 16)
    model = json.loads((REPO / "configs/models/vlp-tiny-clip.json").read_text())
    model["vision_cfg"]["patch_dropout"] = 0.5  # draws from torch's global RNG every step
    (out / "models").mkdir()
    (out / "models" / "vlp-test-dropout-clip.json").write_text(json.dumps(model))
    (out / "run.yaml").write_text(
        f"model: {{name: vlp-test-dropout-clip, config_dirs: [{out / 'models'}]}}\n"
        f"data: {{train_shards: '{out}/train/{{00000..00003}}.tar', batch_size: 8, workers: 0,"
        " shuffle_buffer: 16}\n"
        f"train: {{steps: {STEPS}, warmup_steps: 2, deterministic: true, log_every_steps: 2}}\n"
    )
    return out


def test_a_missing_demo_eval_set_is_refused_with_the_command_that_builds_it(demo):
    shards = f"data.train_shards={demo}/train/{{00000..00003}}.tar"
    check_demo_shards(load_config(None, [shards, f"eval.s.dataset={demo}/eval/shapes"]))
    lost = load_config(None, [shards, f"eval.s.dataset={demo}/eval/lost"])
    with pytest.raises(DataError, match=re.escape(f"build it with `vlp-shard demo {demo}`")):
        check_demo_shards(lost)


def _train(demo: Path, run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "vlp/train.py", "--config", str(demo / "run.yaml"),
        f"run.output_dir={run_dir}", *extra,
    ]  # fmt: skip
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def with_evaluators(demo, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    run_dir = tmp_path_factory.mktemp("with_eval")
    result = _train(
        demo, run_dir,
        f"eval.shapes.dataset={demo}/eval/shapes", "eval.shapes.every_steps=2",
        "eval.shapes.workers=1",  # a decoding process forked mid-training
        f"eval.retrieval.dataset={demo}/eval/retrieval", "eval.retrieval.every_steps=0",
        f"eval.gone.dataset={demo}/eval/no_such_set", "eval.gone.every_steps=2",
    )  # fmt: skip
    return run_dir, result


def test_missing_set_warns_and_training_logs_the_others(with_evaluators):
    run_dir, result = with_evaluators
    assert result.returncode == 0, result.stderr[-2000:]
    warnings = [line for line in result.stderr.splitlines() if "warning:" in line]
    assert len(warnings) == 1 and "eval.gone" in warnings[0] and "no_such_set" in warnings[0]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = {name: [r["step"] for r in records if f"eval/{name}/" in " ".join(r)] for name in
             ("shapes", "retrieval", "gone")}  # fmt: skip
    assert steps == {"shapes": [2, 4, 6], "retrieval": [STEPS], "gone": []}
    final = next(r for r in records if "eval/retrieval/image_retrieval_recall@1" in r)
    assert {"eval/shapes/acc1", "eval/retrieval/gap"} <= final.keys()
    assert "eval shapes at step 2: acc1" in result.stderr


def test_evaluation_leaves_the_trained_weights_bitwise_unchanged(demo, with_evaluators, tmp_path):
    baseline = _train(demo, tmp_path / "plain")
    assert baseline.returncode == 0, baseline.stderr[-2000:]
    final = Path("checkpoints") / f"step_{STEPS:09d}" / "model.safetensors"
    a, b = load_file(with_evaluators[0] / final), load_file(tmp_path / "plain" / final)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "evaluation changed the training run"
