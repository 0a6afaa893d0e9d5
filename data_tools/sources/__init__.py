"""Sources: random access to captioned items by index.

Random access lets every shard be built on its own (by any worker process or node) from a
fixed range of item indices, which is what makes resume and multi-node runs reproducible.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from data_tools.sample import RawSample


class Source(ABC):
    """An indexable collection of items. `read` may raise `BadSample`."""

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def read(self, index: int) -> RawSample: ...

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """What was read, for the manifest; two runs with equal descriptions give equal shards."""

    def locate(self, index: int) -> str:
        """Where item `index` came from, for error examples (a path, a row number)."""
        return f"item {index}"
