"""What a training step leaves for the log steps: non-finite losses and the logged record.

Both are read only on log and checkpoint steps, where the loop synchronises processes anyway.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import torch

from vlp import distributed


class NonFiniteLoss(FloatingPointError):
    pass


class NonFiniteWatch:
    """The first step whose loss was not finite, kept on the device: checking each loss on the
    host would make it wait for every forward pass (a GPU idles meanwhile)."""

    def __init__(self, device: torch.device):
        self.first = torch.tensor(-1, device=device)  # -1: none yet

    def note(self, loss: torch.Tensor, step: int) -> None:
        """Record `step` (counted from 1) if `loss` is not finite and no earlier step was."""
        bad = ~torch.isfinite(loss.detach()) & (self.first < 0)
        self.first = self.first.masked_fill(bad, step)

    def raise_if_any(self, step: int, logs: dict[str, Any]) -> None:
        """Every process stops together (collective), naming the first bad step of any."""
        steps = [int(s) for s in distributed.gather(self.first.view(1)) if s >= 0]
        if steps:
            terms = ", ".join(f"{k} {float(v):.4g}" for k, v in logs.items())
            raise NonFiniteLoss(f"non-finite loss at step {min(steps)} (at step {step}: {terms})")


def log_record(
    logs: dict[str, Any], skipped: Counter, steps: int, elapsed: float, wait: float, batch: int,
    work: dict[str, float], peak: float | None,
) -> dict[str, float]:  # fmt: skip
    """The logged values of a window of `steps` steps of global batch `batch`: each value
    averaged over processes, skipped samples (this process's by reason) and `work` (tokens and
    training FLOPs, vlp.throughput) summed (collective); MFU against `peak` TFLOP/s per process."""
    local = {name: float(value) for name, value in logs.items()}
    local["data_wait"] = wait / elapsed
    everyone = distributed.all_gather_objects((local, dict(skipped), work))
    record = {name: sum(v[name] for v, _, _ in everyone) / len(everyone) for name in local}
    record["samples_per_s"] = steps * batch / elapsed
    record["tokens_per_s"] = sum(w["tokens"] for _, _, w in everyone) / elapsed
    record["tflops"] = sum(w["flops"] for _, _, w in everyone) / elapsed / 1e12
    if peak:
        record["mfu"] = record["tflops"] / (peak * len(everyone))
    total: Counter = Counter()
    for _, counts, _ in everyone:
        total.update(counts)
    record.update({f"data/skipped/{reason}": n for reason, n in sorted(total.items())})
    return record


def skipped_samples(positions: dict[Any, Any]) -> Counter:
    """Samples skipped by reason across this process's workers (their data positions)."""
    total: Counter = Counter()
    for position in positions.values():
        total.update(position.bad)
    return total


class LogWindow:
    """Steps, wall time and data wait since the last log step; `work` (a
    vlp.throughput.WorkCounter) counts the window's tokens and FLOPs."""

    def __init__(self, work: Any) -> None:
        self.work = work
        self._restart()

    def _restart(self) -> None:
        self.start, self.steps, self.wait = time.perf_counter(), 0, 0.0

    def add(self, wait: float) -> None:
        self.steps, self.wait = self.steps + 1, self.wait + wait

    def close(self, logs: dict[str, Any], skipped: Counter, batch: int) -> dict[str, float]:
        """The window's log record (collective); the next window starts now."""
        elapsed = time.perf_counter() - self.start
        work = self.work.take()
        record = log_record(
            logs, skipped, self.steps, elapsed, self.wait, batch, work, self.work.peak
        )
        self._restart()
        return record
