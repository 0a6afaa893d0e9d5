"""Two gloo processes give the loss and gradients of one process on the concatenated batch."""

from __future__ import annotations

import os

import pytest
import torch

from tests.conftest import run_two_processes
from tests.distributed_reference import batch, build, loss_and_grads

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


GAP_TERMS = [
    "objectives.uniformity.weight=1",
    "objectives.alignment.weight=0.5",
    "objectives.cross_uniformity.weight=1",
    "objectives.contrastive.fixed_temperature=0.01",
]
"""CUAXU at the fixed temperature: terms on the gathered global batch, computed on every rank."""


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [[], GAP_TERMS], ids=["clip", "gap"])
def test_two_processes_equal_one_process_on_the_concatenated_batch(tmp_path, overrides):
    out = tmp_path / "two.pt"
    result = run_two_processes("tests.distributed_worker", str(out), *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    two = torch.load(out)
    model, objective = build(overrides)
    loss, grads = loss_and_grads(model, objective, *batch())
    torch.testing.assert_close(two["loss"], loss.detach(), atol=1e-6, rtol=0)
    assert two["grads"].keys() == grads.keys() and len(grads) > 20
    for name, grad in grads.items():
        torch.testing.assert_close(two["grads"][name], grad, atol=1e-6, rtol=0, msg=name)
