"""What gradient checkpointing and gradient accumulation cost: step time and peak memory.

One training step (forward, backward, AdamW) of vlp's model on one batch of demo-like captions
and random images, CPU, fp32, for each variant at the same samples per optimizer step:

  - base:                 one micro-batch of B
  - grad_checkpointing:   model.grad_checkpointing=true (activations recomputed in backward)
  - grad_accum=2:         two micro-batches of B / 2 (the contrastive loss then sees B / 2
                          candidates per micro-batch instead of B: not the same objective)

Peak memory is every tensor of the step (parameters, gradients, optimizer state, activations)
by torch's MemTracker; times are medians of interleaved repetitions (variants take turns, so
load from other processes hits all alike) on a shared machine: read the ratios.

    .venv/bin/python bench/step_costs.py            # writes bench/results/step_costs.json
    .venv/bin/python bench/step_costs.py --quick    # tiny configs; results in bench/.work/
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import open_clip
import torch
from _common import RESULTS, WORK, git_state, machine_info, write_results
from torch.distributed._tools.mem_tracker import MemTracker

from vlp.config import ModelConfig, ObjectivesConfig, TrainConfig
from vlp.model import build_model
from vlp.objectives import WeightedObjective
from vlp.optim import build_optimizer

NAME = "step_costs"
VARIANTS = {"base": (False, 1), "grad_checkpointing": (True, 1), "grad_accum=2": (False, 2)}
CAPTIONS = [
    "a red circle and a small blue star",
    "two shapes: a white heart and a purple hexagon in the corner",
    "an orange square",
    "a pink triangle, a yellow star and a blue circle on a grey background",
]


class Variant:
    """A model built with the variant's checkpointing; `step()` is one optimizer step."""

    def __init__(self, name: str, checkpointing: bool, accum: int, batch: int):
        torch.manual_seed(0)
        self.model, _, _, tokenizer = build_model(
            ModelConfig(name=name, grad_checkpointing=checkpointing)
        )
        objectives = ObjectivesConfig()
        objectives.caption.weight = 2.0 if self.model.has_decoder else 0.0
        self.objective = WeightedObjective(objectives)
        self.optimizer = build_optimizer(self.model, TrainConfig())
        size = self.model.clip.visual.image_size
        self.images = torch.randn(batch, 3, *size)
        self.text = tokenizer([CAPTIONS[i % len(CAPTIONS)] for i in range(batch)])[:, None]
        self.accum = accum

    def step(self, between_micro_batches=lambda: None) -> None:
        for images, text in zip(
            self.images.chunk(self.accum), self.text.chunk(self.accum), strict=True
        ):
            loss, _ = self.objective(self.model(images, text), None)
            (loss / self.accum).backward()
            between_micro_batches()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def peak_mib(variant: Variant) -> float:
    variant.step()  # optimizer state exists from here on, as in every later step
    tracker = MemTracker()
    tracker.track_external(variant.model, variant.optimizer)
    with tracker:
        # MemTracker refuses a module called twice unless its per-module stats are reset (the
        # overall peak is kept)
        variant.step(tracker.reset_mod_stats)
    return tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"] / 2**20


def measure(model: str, batch: int, reps: int) -> dict[str, Any]:
    variants = {n: Variant(model, c, a, batch) for n, (c, a) in VARIANTS.items()}
    peaks = {n: round(peak_mib(v), 1) for n, v in variants.items()}
    times: dict[str, list[float]] = {n: [] for n in variants}
    for _ in range(reps):
        for name, variant in variants.items():
            start = time.perf_counter()
            variant.step()
            times[name].append(time.perf_counter() - start)
    median = {n: statistics.median(t) for n, t in times.items()}
    return {
        n: {
            "peak_mib": peaks[n],
            "step_ms": round(1000 * median[n], 1),
            "memory_vs_base": round(peaks[n] / peaks["base"], 3),
            "time_vs_base": round(median[n] / median["base"], 3),
        }
        for n in variants
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny configs; bench/.work")
    args = parser.parse_args(argv)
    models, batch, reps = (
        (["vlp-tiny-clip", "vlp-tiny-coca"], 16, 2)
        if args.quick
        else (["vlp-small-clip", "vlp-small-coca"], 128, 7)
    )
    result: dict[str, Any] = {
        "benchmark": NAME,
        "what": __doc__.split("\n\n")[0],
        "git": git_state(),
        "machine": machine_info(),
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "batch_per_optimizer_step": batch,
        "repetitions": reps,
        "precision": "fp32",
    }
    for model in models:
        result[model] = measure(model, batch, reps)
        for name, row in result[model].items():
            print(
                f"{model:<15}{name:<20} peak {row['peak_mib']:8.1f} MiB "
                f"({row['memory_vs_base']:.2f}x)  step {row['step_ms']:8.1f} ms "
                f"({row['time_vs_base']:.2f}x)",
                flush=True,
            )
    out = WORK / NAME / f"{NAME}.json" if args.quick else RESULTS / f"{NAME}.json"
    write_results(out, result)
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
