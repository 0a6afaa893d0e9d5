"""FSDP and DeepSpeed on GPUs, for a machine that has them (skipped on CPU-only machines): the
same comparisons against DDP as tests/test_fsdp.py makes on CPUs."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from tests.test_fsdp import STEPS, _assert_close, _launch, _records, _weights, shards  # noqa: F401

GPUS = torch.cuda.device_count()
needs_gpus = pytest.mark.skipif(GPUS < 2, reason="needs 2 CUDA devices")


def _losses(run_dir) -> list[float]:
    return [r["loss/total"] for r in _records(run_dir) if "loss/total" in r]


@needs_gpus
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs deepspeed")
def test_deepspeed_zero2_trains_as_ddp_does_on_gpus(shards, tmp_path):  # noqa: F811
    # DeepSpeed scales the loss by its own accumulation count: vlp runs it with grad_accum 1
    runs = {}
    for config in ("ddp.yaml", "deepspeed_zero2.yaml"):
        run_dir = tmp_path / config.split(".")[0] / "run"
        run_dir.parent.mkdir()
        _launch(config, shards, run_dir, "train.grad_accum=1")
        runs[config] = run_dir
    ddp, zero = runs["ddp.yaml"], runs["deepspeed_zero2.yaml"]
    assert len(_losses(zero)) == STEPS
    assert all(abs(a - b) <= 1e-4 for a, b in zip(_losses(ddp), _losses(zero), strict=True))
    _assert_close(_weights(zero), _weights(ddp))


@needs_gpus
def test_fsdp_trains_as_ddp_does_on_gpus(shards, tmp_path):  # noqa: F811
    runs = {}
    for config in ("ddp.yaml", "fsdp.yaml"):
        run_dir = tmp_path / config.split(".")[0] / "run"
        run_dir.parent.mkdir()
        _launch(config, shards, run_dir)
        runs[config] = run_dir
    ddp, fsdp = runs["ddp.yaml"], runs["fsdp.yaml"]
    assert all(abs(a - b) <= 1e-4 for a, b in zip(_losses(ddp), _losses(fsdp), strict=True))
    _assert_close(_weights(fsdp), _weights(ddp))
