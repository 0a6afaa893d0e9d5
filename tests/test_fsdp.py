"""FSDP through `accelerate launch --config_file configs/accelerate/fsdp.yaml` on 2 CPU processes
(gloo): vlp's ShardedEngine really shards, trains as DDP does, resumes exactly, evaluates during
training and exports the weights DDP exports."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import demo_shards
from vlp import distributed, engine
from vlp.config import ConfigError

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
STEPS = 4
TOLERANCE = 1e-5
"""|FSDP - DDP| for losses and weights after 4 steps: the two differ only in the order of the
float sums in the gradient reduction (measured: 1.2e-6 CLIP, 6.9e-7 CoCa in the weights)."""


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return demo_shards(tmp_path_factory.mktemp("shards"), 240, 30)


def _launch(config: str, shards: Path, run_dir: Path, *extra: str, check: bool = True):
    """Train 4 steps (2 micro-batches of 4 per process) on 2 processes; the finished process."""
    base = run_dir.parent / "base.yaml"
    base.write_text((REPO / "configs" / "demo.yaml").read_text().split("\neval:")[0] + "\n")
    port = 29700 + hash((config, str(run_dir))) % 200
    command = [
        str(BIN / "accelerate"), "launch", "--config_file", f"configs/accelerate/{config}",
        "--num_processes", "2", "--main_process_port", str(port),
        "vlp/train.py", "--config", str(base),
        f"data.train_shards={shards}/train/{{00000..00007}}.tar", f"run.output_dir={run_dir}",
        "run.trackers=[]", "data.batch_size=4", "data.workers=1", "data.shuffle_buffer=30",
        f"train.steps={STEPS}", "train.warmup_steps=1", "train.grad_accum=2",
        "train.log_every_steps=1", "train.deterministic=true", "checkpoint.every_steps=2",
        "checkpoint.keep=3", "resume=latest", *extra,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def _records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def _weights(run_dir: Path, name: str = "model.safetensors") -> dict[str, torch.Tensor]:
    return load_file(run_dir / "checkpoints" / f"step_{STEPS:09d}" / name)


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].shape == b[name].shape, name
        assert (a[name] - b[name]).abs().max() <= TOLERANCE, name


def _held_per_process(log: str) -> tuple[list[int], int]:
    """From the start-up line: parameter elements each process holds, and the model's total."""
    line = next(line for line in log.splitlines() if "FSDP2 over 2 processes" in line)
    held, whole = line.split("held per process ")[1].split(" of ")
    return [int(n.replace(",", "")) for n in held.split(" / ")], int(whole.replace(",", ""))


@pytest.mark.slow
def test_fsdp_shards_trains_as_ddp_evaluates_resumes_exactly_and_exports_ddps_weights(
    shards, tmp_path
):
    evals = [
        f"eval.shapes.dataset={shards}/eval/shapes", "eval.shapes.every_steps=2",
        f"eval.retrieval.dataset={shards}/eval/retrieval", "eval.retrieval.every_steps=2",
    ]  # fmt: skip
    ddp, fsdp = tmp_path / "ddp" / "run", tmp_path / "fsdp" / "run"
    for run_dir in (ddp, fsdp):
        run_dir.parent.mkdir()
    _launch("ddp.yaml", shards, ddp, *evals)
    launched = _launch("fsdp.yaml", shards, fsdp, *evals)

    held, whole = _held_per_process(launched.stdout + launched.stderr)
    assert len(held) == 2 and all(n < whole for n in held), (held, whole)  # each rank: a shard
    train_ddp = [r for r in _records(ddp) if "loss/total" in r]
    train_fsdp = [r for r in _records(fsdp) if "loss/total" in r]
    assert [r["step"] for r in train_fsdp] == list(range(1, STEPS + 1))
    for a, b in zip(train_ddp, train_fsdp, strict=True):
        assert abs(a["loss/total"] - b["loss/total"]) <= TOLERANCE
        assert abs(a["logit_scale"] - b["logit_scale"]) <= TOLERANCE
    evals_ddp = [r for r in _records(ddp) if any(k.startswith("eval/") for k in r)]
    evals_fsdp = [r for r in _records(fsdp) if any(k.startswith("eval/") for k in r)]
    assert [r["step"] for r in evals_fsdp] == [2, 4]
    assert all("eval/shapes/acc1" in r and "eval/retrieval/gap" in r for r in evals_fsdp)
    for a, b in zip(evals_ddp, evals_fsdp, strict=True):
        assert a.keys() == b.keys()
        assert all(abs(a[k] - b[k]) <= 1e-4 for k in a if k.startswith("eval/")), (a, b)
    _assert_close(_weights(fsdp), _weights(ddp))  # the open_clip export

    # resume from the step-2 checkpoint: the same step-4 state, bit for bit
    resumed = tmp_path / "resumed" / "run"
    (resumed / "checkpoints").mkdir(parents=True)
    step2 = fsdp / "checkpoints" / "step_000000002"
    shutil.copytree(step2, resumed / "checkpoints" / step2.name)
    _launch("fsdp.yaml", shards, resumed, *evals)
    for name in ("model.safetensors", "state/model.safetensors"):
        a, b = _weights(fsdp, name), _weights(resumed, name)
        assert all(a[k].equal(b[k]) for k in a), name
    state = "state/optimizer.bin"
    a = torch.load(fsdp / "checkpoints" / f"step_{STEPS:09d}" / state, weights_only=True)
    b = torch.load(resumed / "checkpoints" / f"step_{STEPS:09d}" / state, weights_only=True)
    assert a["state"].keys() == b["state"].keys()
    for name, moments in a["state"].items():
        assert all(moments[k].equal(b["state"][name][k]) for k in moments), name


@pytest.mark.slow
def test_fsdp_trains_coca_as_ddp_does(shards, tmp_path):
    coca = ["model.name=vlp-tiny-coca", "objectives.caption.weight=2.0"]
    ddp, fsdp = tmp_path / "ddp" / "run", tmp_path / "fsdp" / "run"
    for run_dir in (ddp, fsdp):
        run_dir.parent.mkdir()
    _launch("ddp.yaml", shards, ddp, *coca)
    _launch("fsdp.yaml", shards, fsdp, *coca)
    losses = [
        [(r["loss/total"], r["loss/caption"]) for r in _records(d) if "loss/total" in r]
        for d in (ddp, fsdp)
    ]
    assert len(losses[1]) == STEPS
    for (total_a, caption_a), (total_b, caption_b) in zip(*losses, strict=True):
        assert abs(total_a - total_b) <= TOLERANCE and abs(caption_a - caption_b) <= TOLERANCE
    _assert_close(_weights(fsdp), _weights(ddp))


def test_a_method_that_calls_the_towers_outside_the_forward_is_refused_in_one_line(
    shards, tmp_path
):
    run_dir = tmp_path / "proto" / "run"
    run_dir.parent.mkdir()
    result = _launch(
        "fsdp.yaml",
        shards,
        run_dir,
        "objectives.prototype.weight=1.0",
        "prototypes.episode_shards=2",
        check=False,
    )
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("vlp-train: error")]
    assert lines and "ProtoCLIP" in lines[0] and "ddp.yaml" in lines[0], result.stderr[-2000:]


def test_the_launchers_fsdp_settings_reach_the_engine(monkeypatch):
    accelerator = type("A", (), {})()
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.setenv("FSDP_RESHARD_AFTER_FORWARD", "false")
    monkeypatch.setenv("FSDP_TRANSFORMER_CLS_TO_WRAP", "ResidualAttentionBlock,BertLayer")
    sharded = engine.new_engine(accelerator, fsdp=True)
    assert isinstance(sharded, engine.ShardedEngine)
    assert sharded.units == ("ResidualAttentionBlock", "BertLayer")
    assert sharded.reshard_after_forward is False
    monkeypatch.setenv("FSDP_VERSION", "1")
    monkeypatch.setenv("FSDP_SHARDING_STRATEGY", "SHARD_GRAD_OP")
    assert engine.new_engine(accelerator, fsdp=True).reshard_after_forward is False
    monkeypatch.setenv("FSDP_SHARDING_STRATEGY", "HYBRID_SHARD")
    with pytest.raises(ConfigError, match="fsdp_sharding_strategy: HYBRID_SHARD"):
        engine.new_engine(accelerator, fsdp=True)
    monkeypatch.setenv("FSDP_SHARDING_STRATEGY", "FULL_SHARD")
    monkeypatch.setenv("FSDP_OFFLOAD_PARAMS", "true")
    with pytest.raises(ConfigError, match="fsdp_offload_params"):
        engine.new_engine(accelerator, fsdp=True)
    monkeypatch.setattr(distributed, "world_size", lambda: 1)  # nothing to shard
    assert type(engine.new_engine(accelerator, fsdp=True)) is engine.Engine
    assert type(engine.new_engine(accelerator, fsdp=False)) is engine.Engine


def test_gradient_clipping_over_shards_and_whole_tensors_matches_torch():
    torch.manual_seed(0)
    grads = [torch.randn(5, 3), torch.randn(7), torch.randn(())]
    expected = [g.clone() for g in grads]
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in expected]
    for param, grad in zip(params, expected, strict=True):
        param.grad = grad
    reference = torch.nn.utils.clip_grad_norm_(params, 1.0)
    total = distributed.clip_grad_norm(grads[:2], grads[2:], 1.0)  # one process: shard = whole
    assert torch.allclose(total, reference)
    for mine, theirs in zip(grads, expected, strict=True):
        assert torch.allclose(mine, theirs, atol=1e-7)
