"""Training logs: metrics.jsonl (one JSON object per line), TensorBoard, and a progress display."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from vlp.runlayout import METRICS_FILE


def is_time(step: int, every: int, last: int) -> bool:
    """True on every `every`-th step and on the last step (steps count from 1)."""
    return every > 0 and (step % every == 0 or step == last)


class MetricsLogger:
    """Writes on the main process only; the other processes get a silent logger."""

    def __init__(self, run_dir: Path, accelerator, total_steps: int, start_step: int):
        self.accelerator = accelerator
        self.active = accelerator.is_main_process
        self.path = run_dir / METRICS_FILE
        self.bar = None
        if self.active:
            self._drop_records_after(start_step)
        if self.active and sys.stderr.isatty():
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def _drop_records_after(self, step: int) -> None:
        """A resumed run repeats the steps after its checkpoint: forget their first records."""
        if not self.path.exists():
            return
        kept = records_up_to(self.path, step)
        if len(kept) != len(self.path.read_text().splitlines()):
            write_records(self.path, kept)

    def log(self, step: int, values: dict[str, Any]) -> None:
        if not self.active:
            return
        record = {"step": step, "time": round(time.time(), 3), **values}
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        self.accelerator.log({k: v for k, v in values.items() if isinstance(v, int | float)}, step)
        summary = _summary(values)
        if not summary:  # e.g. evaluation records: their evaluator prints its own line
            return
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix_str(summary)
        else:
            print(f"step {step}: {summary}", file=sys.stderr, flush=True)

    def message(self, text: str) -> None:
        if not self.active:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def records_up_to(path: Path, step: int) -> list[str]:
    """The lines (with their newlines) of a metrics file whose records are at most `step`."""
    if not path.is_file():
        return []
    return [line for line in path.read_text().splitlines(keepends=True) if _step_of(line) <= step]


def write_records(path: Path, lines: list[str]) -> None:
    """Replace `path` by `lines` atomically: a kill midway leaves the old file or the new one,
    never a cut-short one (a rewrite in place would lose the records after the cut)."""
    temporary = path.with_name(f".{path.name}.tmp")
    with temporary.open("w") as handle:
        handle.write("".join(lines))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def _step_of(line: str) -> float:
    """A record's step; a line cut short by a kill counts as after any checkpoint."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError):
        return float("inf")


def _summary(values: dict[str, Any]) -> str:
    parts = [f"loss {values['loss/total']:.4f}"] if "loss/total" in values else []
    if "samples_per_s" in values:
        parts.append(f"{values['samples_per_s']:.0f} samples/s")
    if "tflops" in values:
        parts.append(f"{values['tokens_per_s']:.0f} tokens/s, {values['tflops']:.3g} TFLOP/s")
    if "mfu" in values:
        parts.append(f"MFU {100 * values['mfu']:.1f}%")
    if "data_wait" in values:
        parts.append(f"data wait {100 * values['data_wait']:.0f}%")
    return ", ".join(parts)
