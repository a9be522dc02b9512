"""The groups of a search space as plain data, below every pass that makes or reads them.

``Member``, ``GeZIG`` and ``Exclusion`` are what ``fxoto.space`` (operation groups) and
``fxoto.channels`` (channel groups) both make and ``SearchSpace`` holds;
``ChannelGroupSet`` is what a ``SearchSpace`` reads of ``fxoto.channels.ChannelGroups``;
``_ranges`` and ``_collector_paused`` are the array and allocation helpers both builds use.
Imports go one way: ``fxoto.channels`` and ``fxoto.space`` import this module, never
each other's definitions.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np


@dataclass(frozen=True)
class Member:
    """One tensor of a group: a whole parameter, or the range ``start:stop`` along ``dim``."""

    param: str
    dim: int | None = None
    start: int = 0
    stop: int = 0

    def __str__(self) -> str:
        if self.dim is None:
            return self.param
        return f"{self.param}[{'' if self.dim == 0 else ':, ' * self.dim}{self.start}:{self.stop}]"


@dataclass(frozen=True)
class GeZIG:
    """A generalized zero-invariant group: the variables of one removable segment.

    ``members`` are zero together; then the segment's output is exactly zero
    for every input and ``nodes`` (the whole segment) can be erased.

    ``kind`` is ``"operation"`` for such a group, ``"channel"`` for one output
    channel of a stem (``fxoto.channels``): ``nodes`` then names the stem and the
    per-channel modules after it, ``segment`` is -1 and nothing is erased but the
    channel (DESIGN 7).
    """

    id: int
    segment: int
    nodes: tuple[str, ...]
    members: tuple[Member, ...]
    numel: int
    kind: str = "operation"

    def __str__(self) -> str:
        return f"g{self.id}: " + " -> ".join(self.nodes)


@dataclass(frozen=True)
class Exclusion:
    """A segment that looked removable but is kept whole, and why."""

    nodes: tuple[str, ...]
    reason: str

class ChannelGroupSet(Protocol):
    """What a ``SearchSpace`` reads of its channel groups (``fxoto.channels.ChannelGroups``):
    the layers whose channels lie in groups (``ChannelLayer`` by stem node name), the groups,
    and what each slices (``ChannelSlice`` by group id), the last two made on first read."""

    layers: dict[str, Any]

    @property
    def groups(self) -> list[GeZIG]: ...

    @property
    def slices(self) -> dict[int, Any]: ...


@contextlib.contextmanager
def _collector_paused():
    """Pause Python's cyclic garbage collector while many small objects are made: the channel
    groups are hundreds of thousands of them (resnet50: 26,000 channels), and each collection
    would walk the traced graph, its metadata and the groups made so far again (20x the time of
    ``_rows_of_group`` on efficientnet_v2_l).  Nothing made there forms a cycle that must go early."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _ranges(starts: Sequence[int], lengths: Sequence[int], steps: Sequence[int] | None = None) -> np.ndarray:
    """``range(s, s + n)`` for each start ``s`` and length ``n``, concatenated (with ``steps``:
    ``s + step * i`` for ``i`` in ``range(n)``)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    within = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    steps = within if steps is None else np.repeat(np.asarray(steps, dtype=np.int64), lengths) * within
    return np.repeat(np.asarray(starts, dtype=np.int64), lengths) + steps
