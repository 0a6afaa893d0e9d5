"""Progress: a bar on a terminal, plain periodic lines otherwise (logs, CI)."""

from __future__ import annotations

import sys
import time

from tqdm import tqdm


class Progress:
    """Counts processed samples; `advance` is cheap enough to call per sample."""

    def __init__(self, total: int, desc: str, every_seconds: float = 10.0):
        self.total = total
        self.desc = desc
        self.count = 0
        self.start = time.monotonic()
        self.every_seconds = every_seconds
        self.last_line = self.start
        self.bar = tqdm(total=total, desc=desc, unit="img") if sys.stderr.isatty() else None

    def advance(self, n: int = 1) -> None:
        self.update_to(self.count + n)

    def update_to(self, count: int) -> None:
        delta, self.count = count - self.count, count
        if self.bar is not None:
            self.bar.update(delta)
            return
        now = time.monotonic()
        if now - self.last_line >= self.every_seconds:
            self.last_line = now
            rate = self.count / max(now - self.start, 1e-9)
            print(
                f"{self.desc}: {self.count}/{self.total} items, {rate:.0f} items/s",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.start
