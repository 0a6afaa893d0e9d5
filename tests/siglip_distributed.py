"""SigLIP's and DCL + hard negatives' 2-process checks, run by tests/test_siglip.py under
`torchrun --nproc_per_node 2`: `python -m tests.siglip_distributed CASE OUT`.

Each rank takes its half of a fixed batch, runs the tiny model and the case's objectives through
accelerate's DDP, and writes the rank-averaged loss and every averaged gradient to OUT. The
siglip case also counts, during the loss's forward and backward, the send/recv exchanges and
the all_gather calls, and records the shape of every logits block it scores.
"""

import sys
from types import SimpleNamespace

import open_clip
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn

from tests.distributed_reference import backward_and_grads
from vlp.config import load_config
from vlp.distributed import new_accelerator
from vlp.model import VLPModel, new_clip, register_model_configs
from vlp.objectives import WeightedObjective, siglip

CAPTIONS = [
    ["a red circle", "a blue circle", "a red star"],
    ["a small blue star and a large green cross", "a small green star and a large blue cross",
     "a small blue heart and a large green cross"],
    ["two shapes: a white heart and a purple hexagon", "", ""],
    ["a cyan diamond", "a pink diamond", ""],
    ["an orange square", "an orange circle", "a cyan square"],
    ["a pink triangle, a yellow star and a blue circle", "", ""],
    ["a heart", "a star", "a cross"],
    ["three shapes", "two shapes", ""],
]  # fmt: skip
"""Per image: the caption, then up to two hard negatives ("" = an empty, masked slot)."""
CASES = {
    "siglip": (
        "vlp-tiny-clip-sigmoid",
        ["objectives.contrastive.weight=0", "objectives.siglip.weight=1"],
    ),
    "dcl_negatives": (
        "vlp-tiny-clip",
        ["objectives.contrastive.decoupled=true", "data.hard_negatives=2"],
    ),
}


def build(case: str):
    register_model_configs()
    torch.manual_seed(0)
    name, overrides = CASES[case]
    clip = new_clip(name).double()
    cfg = load_config(None, ["data.train_shards=x", *overrides])
    model, objective = VLPModel(clip), WeightedObjective(cfg.objectives)
    objective.prepare_model(model)
    return model, objective


def batch(case: str):
    """(images [8, 3, 32, 32], text [8, T, L], the batch's slot layout)."""
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(8, 3, 32, 32, generator=generator, dtype=torch.float64)
    tokenizer = open_clip.get_tokenizer("vlp-tiny-clip")
    if case == "siglip":
        return images, tokenizer([c[0] for c in CAPTIONS])[:, None], None
    texts = [text or captions[0] for captions in CAPTIONS for text in captions]
    mask = torch.tensor([[bool(text) for text in captions] for captions in CAPTIONS])
    return images, tokenizer(texts).reshape(8, 3, -1), mask


def loss_and_grads(model, objective, images, text, mask, accelerator=None):
    layout = None if mask is None else SimpleNamespace(text_mask=mask, num_negatives=2)
    loss, _ = objective(model(images, text), layout)
    return loss, backward_and_grads(model, loss, accelerator)


class Calls:
    """Counts send/recv exchanges and all_gathers; records the logits blocks' shapes."""

    def __init__(self):
        self.exchanges, self.all_gathers, self.blocks = 0, 0, []

    def install(self):
        exchange, gather, gather_grad = dist.batch_isend_irecv, dist.all_gather, dist_fn.all_gather
        pair_loss = siglip.pair_loss_sum

        def counted_exchange(*args, **kwargs):
            self.exchanges += 1
            return exchange(*args, **kwargs)

        def counted_gather(*args, **kwargs):
            self.all_gathers += 1
            return gather(*args, **kwargs)

        def counted_gather_grad(*args, **kwargs):
            self.all_gathers += 1
            return gather_grad(*args, **kwargs)

        def recorded(image, text, *args):
            self.blocks.append((image.shape[0], text.shape[0]))
            return pair_loss(image, text, *args)

        dist.batch_isend_irecv, dist.all_gather = counted_exchange, counted_gather
        dist_fn.all_gather, siglip.pair_loss_sum = counted_gather_grad, recorded


def main(case: str, out: str) -> None:
    accelerator = new_accelerator()
    model, objective = build(case)
    model = accelerator.prepare(model)
    images, text, mask = batch(case)
    rank, world = accelerator.process_index, accelerator.num_processes
    local = slice(rank * 8 // world, (rank + 1) * 8 // world)
    calls = Calls()
    calls.install()
    output = model(images[local], text[local])
    layout = None if mask is None else SimpleNamespace(text_mask=mask[local], num_negatives=2)
    loss, _ = objective(output, layout)
    forward = {"exchanges": calls.exchanges, "all_gathers": calls.all_gathers}
    grads = backward_and_grads(model, loss, accelerator)
    loss = accelerator.reduce(loss.detach(), reduction="mean")
    if accelerator.is_main_process:
        counts = {"forward": forward, "total_exchanges": calls.exchanges, "blocks": calls.blocks}
        torch.save({"loss": loss, "grads": grads, "calls": counts}, out)


if __name__ == "__main__":
    main(*sys.argv[1:])
