"""ProtoCLIP's 2-process check: run by tests/test_protoclip.py under `torchrun --nproc_per_node 2`.

Each rank (1) builds the episode state collectively from its own, unequal share of a fixed
feature bank (5 and 3 rows: gather_rows, all_gather_objects, k-means on rank 0, broadcast), then
(2) trains the tiny CoCa with contrastive + caption + prototype + prototype_external on its half
of a fixed batch through accelerate's DDP, looking labels up by key. It writes the state, the
rank-averaged loss and every averaged gradient to OUT; the test compares them with the same
steps in one process on the whole bank and batch.
"""

import sys
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from tests.distributed_reference import CAPTIONS, backward_and_grads
from tests.distributed_reference import batch as reference_batch
from vlp import distributed
from vlp.config import load_config
from vlp.episode_state import Bank, Clustering, EpisodeState, build_state
from vlp.model import VLPModel, new_clip, register_model_configs
from vlp.objectives import WeightedObjective
from vlp.prototypes import back_translate

KEYS = [f"sample-{i}" for i in range(len(CAPTIONS))]
SPLIT = 5
"""Rank 0 holds bank rows [0, 5), rank 1 rows [5, 8): gathers of unequal sizes."""


def bank(rows: slice = slice(None)) -> Bank:
    generator = torch.Generator().manual_seed(2)
    image = F.normalize(torch.randn(len(KEYS), 6, generator=generator), dim=1)
    text = F.normalize(torch.randn(len(KEYS), 6, generator=generator), dim=1)
    return Bank(KEYS[rows], image[rows], text[rows], CAPTIONS[rows])


def state_of(part: Bank) -> EpisodeState:
    """Collective; the external teacher's labels are synthetic (no text model in this test)."""
    state = build_state(part, Clustering(3, 10, 1, "faiss", 0), None, torch.device("cpu"), print)
    state.external_labels = torch.arange(len(state.keys)) % 3
    image, text = bank().image, bank().text  # every rank has the whole bank after the gather
    state.image_from_external = back_translate(image, state.external_labels, 3)
    state.text_from_external = back_translate(text, state.external_labels, 3)
    return state


def build(state: EpisodeState):
    register_model_configs()
    torch.manual_seed(0)
    model = VLPModel(new_clip("vlp-tiny-coca"), pad_id=0)
    model.add_prototype_heads(hidden=16, dim=6, layers=0)  # no BatchNorm: per-process statistics
    model = model.double()
    weights = {"contrastive": 1, "caption": 2, "prototype": 1, "prototype_external": 0.5}
    overrides = [f"objectives.{name}.weight={w}" for name, w in weights.items()]
    cfg = load_config(None, ["data.train_shards=x", *overrides])
    objective = WeightedObjective(cfg.objectives)
    objective.set_state(state)
    return model, objective


def batch():
    images, text = reference_batch()
    return images, text, KEYS


def loss_and_grads(model, objective, images, text, keys, accelerator=None):
    loss, logs = objective(model(images, text), SimpleNamespace(keys=keys))
    assert {"loss/prototype", "loss/prototype_external"} <= logs.keys()
    return loss, backward_and_grads(model, loss, accelerator)


def main(out: str) -> None:
    accelerator = distributed.new_accelerator()
    rank, world = accelerator.process_index, accelerator.num_processes
    state = state_of(bank(slice(0, SPLIT) if rank == 0 else slice(SPLIT, None)))
    model, objective = build(state)
    model = accelerator.prepare(model)
    images, text, keys = batch()
    local = slice(rank * len(keys) // world, (rank + 1) * len(keys) // world)
    loss, grads = loss_and_grads(
        model, objective, images[local], text[local], keys[local], accelerator
    )
    loss = accelerator.reduce(loss.detach(), reduction="mean")
    if accelerator.is_main_process:
        torch.save(
            {"keys": state.keys, "state": state.tensors(), "loss": loss, "grads": grads}, out
        )


if __name__ == "__main__":
    main(sys.argv[1])
