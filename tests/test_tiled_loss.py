"""objectives.contrastive.tile: the tiled loss equals the untiled one (fp32, 1e-6) with and
without DCL and hard negatives, in one and two processes, and never holds the logits whole."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from tests.conftest import run_two_processes
from tests.distributed_reference import batch, build, loss_and_grads
from vlp.config import ConfigError, load_config
from vlp.objectives.contrastive import clip_loss


def _inputs(rows: int = 6, dim: int = 8, negatives: int = 0):
    generator = torch.Generator().manual_seed(0)

    def unit(*shape):
        return F.normalize(torch.randn(*shape, dim, generator=generator), dim=-1).requires_grad_()

    image, text = unit(rows), unit(rows)
    scale = torch.tensor(14.3, requires_grad=True)
    if not negatives:
        return image, text, scale, None, None
    mask = torch.rand(rows, negatives, generator=generator) > 0.3
    return image, text, scale, unit(rows, negatives), mask


@pytest.mark.parametrize("tile", [1, 4, 100])
@pytest.mark.parametrize("decoupled", [False, True])
@pytest.mark.parametrize("negatives", [0, 2])
def test_tiled_loss_and_gradients_equal_the_untiled_ones_in_fp32(tile, decoupled, negatives):
    results = []
    for tiles in (None, tile):
        image, text, scale, negs, mask = _inputs(negatives=negatives)
        loss = clip_loss(image, text, scale, negs, mask, decoupled, tiles)
        leaves = [image, text, scale] + ([negs] if negs is not None else [])
        results.append((loss.detach(), torch.autograd.grad(loss, leaves)))
    (loss, grads), (tiled_loss, tiled_grads) = results
    torch.testing.assert_close(tiled_loss, loss, atol=1e-6, rtol=0)
    for got, want in zip(tiled_grads, grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


class _LargestTensor(TorchDispatchMode):
    """Records the numel of the largest tensor any operation returns."""

    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, tuple | list) else [out]:
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return out


@pytest.mark.parametrize("tile", [None, 8])
def test_the_largest_temporary_is_rows_times_tile(tile):
    rows, dim = 64, 4  # logits 64 x 64 = 4096 elements; a tile 64 x 8 = 512; embeddings 256
    image, text, scale, _, _ = _inputs(rows, dim)
    with _LargestTensor() as mode:
        clip_loss(image, text, scale, tile=tile).backward()
    if tile is None:
        assert mode.largest == rows * rows  # the check sees the untiled logits
    else:
        assert mode.largest == rows * tile


def test_a_tile_below_1_is_a_config_error():
    with pytest.raises(ConfigError, match="objectives.contrastive.tile"):
        load_config(None, ["data.train_shards=x", "objectives.contrastive.tile=0"])


@pytest.mark.slow
@pytest.mark.parametrize("decoupled", [False, True], ids=["clip", "dcl"])
def test_two_processes_tiled_equal_one_process_untiled(tmp_path, decoupled):
    """DDP over 2 ranks, each tiling its rows against the gathered columns (tile 3 of 8),
    against the untiled loss on the concatenated batch (the model runs in float64)."""
    dcl = [f"objectives.contrastive.decoupled={str(decoupled).lower()}"]
    assert build([*dcl, "objectives.contrastive.tile=3"])[1].terms["contrastive"].tile == 3
    out = tmp_path / "two.pt"
    done = run_two_processes("tests.distributed_worker", str(out), *dcl,
                             "objectives.contrastive.tile=3")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    two = torch.load(out)
    model, objective = build(dcl)
    loss, grads = loss_and_grads(model, objective, *batch())
    torch.testing.assert_close(two["loss"], loss.detach(), atol=1e-6, rtol=0)
    assert two["grads"].keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(two["grads"][name], grad, atol=1e-6, rtol=0, msg=name)
