"""Run by tests/test_distributed.py under `torchrun --nproc_per_node 2`.

`python -m tests.distributed_worker OUT [OVERRIDE ...]`: each rank takes its half of a fixed
batch, runs the real model + objectives (config OVERRIDEs) through accelerate's DDP, and writes
the loss (averaged over ranks) and every averaged parameter gradient to OUT.
"""

import sys

import torch

from tests.distributed_reference import batch, build, loss_and_grads
from vlp.distributed import new_accelerator


def main(out: str, *overrides: str) -> None:
    accelerator = new_accelerator()
    model, objective = build(overrides)
    model = accelerator.prepare(model)
    images, text = batch()
    rank, world = accelerator.process_index, accelerator.num_processes
    local = slice(rank * len(images) // world, (rank + 1) * len(images) // world)
    loss, grads = loss_and_grads(model, objective, images[local], text[local], accelerator)
    loss = accelerator.reduce(loss.detach(), reduction="mean")
    if accelerator.is_main_process:
        torch.save({"loss": loss, "grads": grads}, out)


if __name__ == "__main__":
    main(*sys.argv[1:])
