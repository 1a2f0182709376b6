"""A tiny name -> object registry, so configs pick components by name."""

from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to objects; unknown names get an error listing the known ones."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}
        self._listeners: list[Callable[[str, T], None]] = []

    def register(self, name: str) -> Callable[[T], T]:
        def add(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            for listener in self._listeners:
                listener(name, obj)
            return obj

        return add

    def subscribe(self, listener: Callable[[str, T], None]) -> None:
        """Calls `listener(name, obj)` for every item, now and as more are registered."""
        self._listeners.append(listener)
        for name, obj in list(self._items.items()):
            listener(name, obj)

    def get(self, name: str) -> T:
        if name not in self._items:
            known = ", ".join(sorted(self._items))
            raise KeyError(f"unknown {self.kind} {name!r}; known: {known}")
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)
