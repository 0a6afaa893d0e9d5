"""DreamLIP's 2-process check: run by tests/test_dreamlip.py under `torchrun --nproc_per_node 2`.

Each rank takes its half of a fixed batch (3 text slots per image, some masked), runs the tiny
CoCa with patch embeddings and multi_positive + subcaption_grouping + caption through
accelerate's DDP, and writes the rank-averaged loss and every averaged gradient to OUT. The test
compares them with `loss_and_grads` on the whole batch in one process.
"""

import sys
from types import SimpleNamespace

import open_clip
import torch

from tests.distributed_reference import backward_and_grads
from vlp.config import load_config
from vlp.distributed import new_accelerator
from vlp.model import VLPModel, new_clip, register_model_configs
from vlp.objectives import WeightedObjective

SENTENCES = [
    "a red circle", "there is a red circle in the top left", "one shape",
    "a small blue star and a large green cross", "a blue star", "a green cross",
    "a white heart and a purple hexagon", "the heart is white", "two shapes",
    "a cyan diamond", "a cyan diamond", "a cyan diamond",
    "an orange square", "the square is orange", "it is in the bottom right",
    "a pink triangle, a yellow star and a blue circle", "a yellow star", "three shapes",
    "a heart", "a heart", "a heart",
    "three shapes", "a circle", "a cross",
]  # fmt: skip
MASK = (
    [[True, True, True]] * 3
    + [[True, False, False]]
    + [[True, True, True]] * 2
    + [
        [True, False, False],
        [True, True, True],
    ]
)


def build():
    register_model_configs()
    torch.manual_seed(0)
    clip = new_clip("vlp-tiny-coca").double()
    cfg = load_config(
        None,
        [
            "data.train_shards=x",
            "objectives.contrastive.weight=0",
            "objectives.multi_positive.weight=1",
            "objectives.subcaption_grouping.weight=1",
            "objectives.caption.weight=2",
        ],
    )
    objective = WeightedObjective(cfg.objectives)
    return VLPModel(clip, pad_id=clip.pad_id, patch_emb=objective.needs_patches), objective


def batch():
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(8, 3, 32, 32, generator=generator, dtype=torch.float64)
    text = open_clip.get_tokenizer("vlp-tiny-coca")(SENTENCES).reshape(8, 3, -1)
    return images, text, torch.tensor(MASK)


def loss_and_grads(model, objective, images, text, mask, accelerator=None):
    loss, _ = objective(model(images, text), SimpleNamespace(text_mask=mask))
    return loss, backward_and_grads(model, loss, accelerator)


def main(out: str) -> None:
    accelerator = new_accelerator()
    model, objective = build()
    model = accelerator.prepare(model)
    tensors = batch()
    rank, world = accelerator.process_index, accelerator.num_processes
    local = slice(rank * 8 // world, (rank + 1) * 8 // world)
    loss, grads = loss_and_grads(model, objective, *(t[local] for t in tensors), accelerator)
    loss = accelerator.reduce(loss.detach(), reduction="mean")
    if accelerator.is_main_process:
        torch.save({"loss": loss, "grads": grads}, out)


if __name__ == "__main__":
    main(sys.argv[1])
