"""Name -> component registries, so configs pick components by explicit name."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """`@REGISTRY.register("name")` on a class or factory; `REGISTRY.get("name")` to look it up."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(entry: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = entry
            return entry

        return add

    def remove(self, name: str) -> None:
        """Undo `register` (a plugin defined for one test or notebook session)."""
        del self._entries[name]

    def get(self, name: str) -> T:
        if name not in self._entries:
            known = ", ".join(sorted(self._entries)) or "none"
            raise KeyError(f"unknown {self.kind} {name!r}; known: {known}")
        return self._entries[name]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def entries(self) -> dict[str, T]:
        """Every entry by name, in registration order."""
        return dict(self._entries)
