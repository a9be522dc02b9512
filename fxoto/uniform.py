"""A selection uniform over repeated blocks (DESIGN 6c): the same widths removed in every block.

A Hugging Face ``config`` holds one ``num_attention_heads``, one ``num_key_value_heads``
and one ``intermediate_size`` for every layer; a sub-network that keeps a different
width in each layer cannot be described by it, and ``from_pretrained`` cannot rebuild
it.  With ``fxoto.search(..., uniform=True)`` H2SPG selects, for each kind of K, the
same number of groups in every *block* of that kind (``blocks``): the head groups of
one attention, the channel groups that slim one set of layers (an MLP's gate and up
projections).  Within a block it takes the most redundant groups, so the ranking is
H2SPG's; only how many per block is fixed.
"""

from __future__ import annotations

from collections.abc import Sequence

from fxoto.errors import KTooLargeError
from fxoto.patterns import rms_norm


def blocks(space, kind: str) -> list[list[int]]:
    """The groups of one kind by block, each block's ids in order: head groups by attention,
    channel groups by the set of stems they slim.  A residual stream's channels are no block:
    the stream runs through every layer once, so a uniform selection leaves it whole (rewriting
    ``hidden_size`` and every norm's epsilon in the config is not built)."""
    norms = {n.name for n in space.graph.nodes if n.target is rms_norm}  # a group holding their entries: the stream
    found: dict[object, list[int]] = {}
    for g in space.groups:
        if g.kind != kind or kind == "channel" and any(name in norms for name, _ in space.slices[g.id].entries):
            continue
        if kind == "head":
            key = g.nodes[0]  # the attention node
        elif kind == "channel":
            key = tuple(sorted({stem for stem, _ in space.slices[g.id].rows}))
        else:
            key = g.id  # an operation group is its own block
        found.setdefault(key, []).append(g.id)
    return list(found.values())


def check_uniform(space, counts: dict[str, int] | None) -> None:
    """Refuse a K that cannot be spread evenly over the blocks (``ValueError`` naming the counts that can)."""
    if counts is None:
        raise ValueError("uniform=True takes K per kind of group, e.g. K={'heads': 4, 'channels': 0.25}")
    for kind, count in counts.items():
        if kind == "operation" and count:
            raise ValueError("uniform=True removes heads and channels; K for operations must be 0")
        parts = blocks(space, kind)
        if not parts or not count:
            continue
        size = min(len(p) for p in parts)
        if count % len(parts) or count // len(parts) >= size:
            raise ValueError(
                f"uniform=True spreads K over {len(parts)} blocks of {kind} groups: K for {kind}s must be a multiple "
                f"of {len(parts)} below {len(parts) * size} (each block keeps one), e.g. "
                f"{max(len(parts), count // len(parts) * len(parts))}; got {count}")


def select_uniform(space, order: Sequence[int], counts: dict[str, int]) -> list[int]:
    """``counts[kind] / len(blocks)`` groups from every block of each kind, the first in ``order``
    (a valid removal within each block, ``SearchSpace.select_removal``)."""
    rank = {g: r for r, g in enumerate(order)}
    chosen: list[int] = []
    for kind, count in counts.items():
        parts = blocks(space, kind)
        if not count or not parts:
            continue
        per = count // len(parts)
        for part in parts:
            chosen += space.select_removal(sorted(part, key=rank.__getitem__), per)
    if not space.is_valid_removal(chosen):
        raise KTooLargeError(f"the {len(chosen)} groups chosen uniformly ({counts}) are not a valid removal "
                             f"together in {type(space.model).__name__}: {space.removal_problem(chosen)}")
    return chosen


def is_uniform(space, ids: Sequence[int]) -> bool:
    """Whether ``ids`` removes the same number of groups from every block of each kind."""
    ids = set(ids)
    for kind in {space.groups[i].kind for i in ids}:
        if len({len(ids.intersection(p)) for p in blocks(space, kind)}) > 1:
            return False
    return True
