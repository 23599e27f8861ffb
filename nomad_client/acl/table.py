"""A compiled table of labelled capability sets (namespaces, node pools, host volumes,
variable keys) and how a name finds its set: an exact label wins outright, else the closest
matching glob.

Lookups sit on every request's path, so a name costs one dict lookup once resolved: exact
labels are in the resolved dict from the start, glob answers join it on first use (bounded,
dropped wholesale when full). Pure computation.
"""

from __future__ import annotations

from collections.abc import Mapping

GLOB = "*"
# Glob answers remembered per table; past this the remembered ones are dropped.
GLOB_CACHE_SIZE = 1024

EMPTY: frozenset[str] = frozenset()


def glob_match(pattern: str, name: str) -> bool:
    """Whole-string match where ``*`` stands for any run of characters (possibly empty) and
    nothing else is special (Nomad uses ryanuber/go-glob)."""
    parts = pattern.split(GLOB)
    if len(parts) == 1:
        return pattern == name
    first, *middle, last = parts
    if not name.startswith(first):
        return False
    position = len(first)
    for part in middle:
        found = name.find(part, position)
        if found < 0:
            return False
        position = found + len(part)
    # The last part must fit after everything matched so far.
    return len(name) - position >= len(last) and name.endswith(last)


def glob_distance(pattern: str, name: str) -> int:
    """How loosely ``pattern`` matches ``name``: smaller is closer (Nomad's measure, which
    counts every ``*`` once more)."""
    return len(name) - len(pattern) + pattern.count(GLOB)


class CapabilityTable:
    """Capability sets by label; labels containing ``*`` are globs."""

    __slots__ = ("_exact", "_globs", "_resolved", "all_capabilities", "any_access")

    def __init__(self, entries: Mapping[str, frozenset[str]]) -> None:
        self._exact = {label: caps for label, caps in entries.items() if GLOB not in label}
        # Sorted byte-wise: among equally close globs the one sorting last wins, as in
        # Nomad (an artefact of its stable sort, which its own tests depend on).
        self._globs = tuple(sorted((p, c) for p, c in entries.items() if GLOB in p))
        self._resolved = dict(self._exact)
        # For questions about "any" label (a namespace of "*").
        self.all_capabilities: frozenset[str] = EMPTY.union(*entries.values())
        self.any_access = any(caps and "deny" not in caps for caps in entries.values())

    def exact(self, name: str) -> frozenset[str] | None:
        return self._exact.get(name)

    def lookup(self, name: str) -> frozenset[str]:
        """The set for ``name``: its exact entry, else its closest glob, else empty."""
        caps = self._resolved.get(name)
        if caps is None:
            caps = self._closest_glob(name)
            if not self._globs:
                return caps
            if len(self._resolved) >= len(self._exact) + GLOB_CACHE_SIZE:
                self._resolved = dict(self._exact)
            self._resolved[name] = caps
        return caps

    def _closest_glob(self, name: str) -> frozenset[str]:
        best, best_distance = EMPTY, None
        for pattern, caps in self._globs:
            if glob_match(pattern, name):
                distance = glob_distance(pattern, name)
                if best_distance is None or distance <= best_distance:
                    best, best_distance = caps, distance
        return best

    def labels(self) -> list[str]:
        """Every label, exact and glob, sorted."""
        return sorted([*self._exact, *(pattern for pattern, _ in self._globs)])


EMPTY_TABLE = CapabilityTable({})
