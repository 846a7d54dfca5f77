"""Which route a name picks on a shared listener: exact, then the longest wildcard, then `*`.

`NameTable({pattern: value})` is built from the routes' `hostnames` (already lower case
without a trailing dot: `spec.ListenKey.names`); `lookup(name)` takes the name a client
sent (any case, a trailing dot allowed, "" for none) and returns the value of the exact
name, else of the most specific `*.suffix` it falls under (any depth: `*.example.com`
takes `a.b.example.com`, not `example.com`), else of the fallback `*`, else None. A client
that sent no name gets the fallback only.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Generic, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")
FALLBACK = "*"


def normalize(name: str) -> str:
    """A name as the table compares it: lower case, one trailing dot dropped."""
    return name.lower().removesuffix(".")


class NameTable(Generic[T]):
    """Immutable; see the module docstring."""

    __slots__ = ("_exact", "_fallback", "_wild")

    def __init__(self, entries: Mapping[str, T]) -> None:
        self._exact: dict[str, T] = {}
        self._wild: dict[str, T] = {}  # "example.com" for "*.example.com"
        self._fallback: T | None = None
        for pattern, value in entries.items():
            if pattern == FALLBACK:
                self._fallback = value
            elif pattern.startswith("*."):
                self._wild[pattern[2:]] = value
            else:
                self._exact[pattern] = value

    def __len__(self) -> int:
        return len(self._exact) + len(self._wild) + (self._fallback is not None)

    def lookup(self, name: str) -> T | None:
        name = normalize(name)
        if name:
            found = self._exact.get(name)
            if found is not None:
                return found
            dot = name.find(".")
            while dot != -1:  # the leftmost dot first: the longest suffix
                found = self._wild.get(name[dot + 1 :])
                if found is not None:
                    return found
                dot = name.find(".", dot + 1)
        return self._fallback
