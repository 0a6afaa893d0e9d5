"""Peak memory of the contrastive loss (forward + backward) at simulated world sizes.

One process plays rank 0 of W: `vlp.distributed.gather_with_grad` is replaced by a concatenation
of the local rows with (W - 1) x B fixed rows standing for the other ranks' embeddings, so the
real `clip_loss` runs exactly the shapes it runs on rank 0 of W processes. Peak memory is
measured with torch's MemTracker (every tensor the loss creates, forward and backward, CPU).

Two sweeps, both with embeddings of width 512 (ViT-B/32):
  - fixed per-rank batch B, growing W (global batch W x B) up to 1,024 ranks: vlp's local loss
    holds [B, W*B] logits, linear in W; the tiled loss (`objectives.contrastive.tile`) holds
    [B, tile] logits, so only the gathered embeddings (and their gradients) grow with W; a naive
    loss that builds the full [W*B, W*B] matrix on every rank is quadratic in W.
  - fixed global batch N, growing W (B = N / W): the local loss shrinks linearly with the
    per-rank batch, the naive loss does not shrink at all.

    .venv/bin/python bench/loss_memory.py            # writes bench/results/loss_memory.{json,png}
    .venv/bin/python bench/loss_memory.py --quick    # small sizes; results in bench/.work/
"""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from _common import RESULTS, WORK, git_state, machine_info, write_results
from torch.distributed._tools.mem_tracker import MemTracker

from vlp import distributed
from vlp.objectives.contrastive import clip_loss

NAME = "loss_memory"
WIDTH = 512
TILE = 1024
"""Columns per tile of the tiled loss."""
KINDS = {"local": "vlp local loss [B, W·B]", "tiled": f"vlp tiled loss [B, {TILE}]",
         "naive": "naive [N, N]"}  # fmt: skip
MiB = 2**20


@contextmanager
def rank_zero_of(world: int, seed: int = 0):
    """Make vlp's gather return the local rows followed by (world - 1) ranks' worth of others."""
    original = distributed.gather_with_grad
    generator = torch.Generator().manual_seed(seed)

    def gather(x: torch.Tensor) -> torch.Tensor:
        others = F.normalize(torch.randn((world - 1) * len(x), x.shape[1], generator=generator))
        return torch.cat([x, others])

    distributed.gather_with_grad = gather
    try:
        yield
    finally:
        distributed.gather_with_grad = original


def naive_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, scale: torch.Tensor, world: int):
    """Every rank scores the whole global batch against itself: [W*B, W*B] logits."""
    all_image = distributed.gather_with_grad(image_emb)
    all_text = distributed.gather_with_grad(text_emb)
    logits = scale * all_image @ all_text.T
    targets = torch.arange(len(all_image))
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def peak_mib(kind: str, batch: int, world: int) -> tuple[float, float]:
    """(peak MiB, seconds) of one forward + backward of the loss on rank 0 of `world`."""
    torch.manual_seed(0)
    image = F.normalize(torch.randn(batch, WIDTH)).requires_grad_()
    text = F.normalize(torch.randn(batch, WIDTH)).requires_grad_()
    scale = torch.tensor(100.0, requires_grad=True)
    tracker = MemTracker()
    started = time.perf_counter()
    with rank_zero_of(world), tracker:
        if kind in ("local", "tiled"):
            loss = clip_loss(image, text, scale, tile=TILE if kind == "tiled" else None)
        else:
            loss = naive_loss(image, text, scale, world)
        loss.backward()
    seconds = time.perf_counter() - started
    peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]
    return peak / MiB, seconds


def sweep(batches_worlds: list[tuple[int, int]], naive_max_global: int) -> list[dict[str, Any]]:
    rows = []
    for batch, world in batches_worlds:
        row: dict[str, Any] = {"per_rank_batch": batch, "world": world, "global": batch * world}
        for kind in KINDS:
            if kind != "naive" or batch * world <= naive_max_global:
                row[f"{kind}_mib"], row[f"{kind}_s"] = peak_mib(kind, batch, world)
        rows.append(row)
        cells = [f"{k} {row[f'{k}_mib']:9.1f} MiB" for k in KINDS if f"{k}_mib" in row]
        print(f"B {batch:5d} W {world:4d} N {batch * world:7d}: {', '.join(cells)}", flush=True)
    return rows


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    fixed_b, fixed_n = result["fixed_per_rank_batch"], result["fixed_global_batch"]
    for ax, rows, title in (
        (axes[0], fixed_b, f"per-rank batch {fixed_b[0]['per_rank_batch']}, global = W x B"),
        (axes[1], fixed_n, f"global batch {fixed_n[0]['global']}, per-rank = N / W"),
    ):
        for kind, label in KINDS.items():
            key = f"{kind}_mib"
            points = [(r["world"], r[key]) for r in rows if key in r]
            ax.plot(*zip(*points, strict=True), marker="o", label=label)
        ax.set(xscale="log", yscale="log", xlabel="world size W", ylabel="peak MiB (rank 0)")
        ax.set_xscale("log", base=2)
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle("Contrastive loss forward + backward, embeddings width 512 (CPU, MemTracker)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def growth(rows: list[dict[str, Any]], key: str) -> float:
    """Exponent k of peak ~ W^k between the first and last row that have `key`."""
    import math

    have = [r for r in rows if key in r]
    first, last = have[0], have[-1]
    return math.log(last[key] / first[key]) / math.log(last["world"] / first["world"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes; results in bench/.work")
    args = parser.parse_args(argv)
    batch, worlds, naive_max, total = (
        (32, [1, 2, 4, 8], 256, 256)
        if args.quick
        else (256, [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024], 8192, 8192)
    )
    fixed_b = sweep([(batch, w) for w in worlds], naive_max)
    fixed_n = sweep([(total // w, w) for w in worlds if total // w >= 1 and w <= 64], naive_max)
    result = {
        "benchmark": NAME,
        "what": __doc__.split("\n\n")[0],
        "command": " ".join(["bench/loss_memory.py", *(argv or sys.argv[1:])]),
        "git": git_state(),
        "machine": machine_info(),
        "torch": torch.__version__,
        "embedding_width": WIDTH,
        "fixed_per_rank_batch": fixed_b,
        "fixed_global_batch": fixed_n,
        "tile": TILE,
        "growth_exponent_in_W_at_fixed_B": {k: growth(fixed_b, f"{k}_mib") for k in KINDS},
        "logits_mib_at_largest_W": {
            "local": 2 * batch * batch * worlds[-1] * 4 / MiB,
            "tiled": 2 * batch * TILE * 4 / MiB,
        },
        "note": "peak of tensors the loss allocates on rank 0 (inputs excluded); the gathered "
        "other ranks' rows are counted. Timings are from a shared 2-core machine: not a result.",
    }
    out = WORK / NAME if args.quick else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    write_results(out / f"{NAME}.json", result)
    plot(result, out / f"{NAME}.png")
    exponents = result["growth_exponent_in_W_at_fixed_B"]
    print("peak ~ W^k at fixed per-rank batch: "
          + ", ".join(f"{k} k={v:.2f}" for k, v in exponents.items()))  # fmt: skip
    print(f"results: {out / NAME}.json, {out / NAME}.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
