"""K, the target group sparsity: what fxoto accepts and what it resolves to (a count, or a count per kind).

``K`` is an int count, a float fraction of the groups, or a dict per kind of group
(``{"operations": 3, "channels": 0.5, "heads": 4}``).  ``target_k`` checks it against the
search space up front, so that what it accepts, H2SPG's selection delivers;
``select_per_kind`` selects kind by kind.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from fxoto.errors import KTooLargeError

if TYPE_CHECKING:
    from fxoto.space import SearchSpace

KINDS = {"operations": "operation", "channels": "channel", "heads": "head"}  # K's dict keys: the kinds of groups


def kind_counts(K: int | float | dict[str, int | float], space: SearchSpace) -> dict[str, int] | None:
    """K per kind of group as counts (``{"operation": 3, "channel": 120}``), or None when K
    is one number over all groups.

    A dict (``{"operations": 3, "channels": 0.5}``) resolves each entry against the groups
    of that kind; H2SPG then selects that many of each kind, each kind ranked by its own
    scores.  One number selects over all groups with one ranking.
    """
    if not isinstance(K, dict):
        return None
    unknown = [k for k in K if k not in KINDS]
    if unknown:
        raise ValueError(f"K's keys are kinds of groups, {sorted(KINDS)}; got {unknown[0]!r}")
    present = {g.kind for g in space.groups}
    missing = [k for k, v in K.items() if v and KINDS[k] not in present]
    if missing:
        raise ValueError(f"K={K} asks for {KINDS[missing[0]]} groups but the search space has none "
                         f"(see structures= in fxoto.search)")
    return {KINDS[k]: _resolve_count(v, sum(g.kind == KINDS[k] for g in space.groups)) for k, v in K.items()}


def resolve_k(K: int | float | dict[str, int | float], space: SearchSpace) -> int:
    """K as a count: an int, a float in (0, 1) as a fraction of the groups, or a dict per
    kind (``kind_counts``), whose counts add up."""
    counts = kind_counts(K, space)
    if counts is not None:
        return sum(counts.values())
    return _resolve_count(K, len(space.groups))


def _resolve_count(K: int | float, n: int) -> int:
    if isinstance(K, bool) or not isinstance(K, (int, float)):
        raise TypeError(f"K must be an int count, a float fraction in (0, 1) or a dict per kind, not {K!r}")
    if isinstance(K, float):
        if not 0.0 < K < 1.0:
            raise ValueError(f"a fractional K must lie in (0, 1); got {K}")
        return max(1, round(K * n))
    if K < 0:
        raise ValueError(f"K must be >= 0; got {K}")
    return K


def target_k(K: int | float | dict[str, int | float], space: SearchSpace) -> int:
    """K as a count, refused with ``KTooLargeError`` when no valid removal is that large.

    Accepting K is a promise: ``SearchSpace.select_removal`` then finds K groups that
    form a valid removal, whatever order the redundancy scores put them in (per kind,
    for a K per kind: ``select_per_kind``).
    """
    k = resolve_k(K, space)
    counts = kind_counts(K, space)
    n = len(space.groups)
    name = type(space.model).__name__
    if k > n:
        raise KTooLargeError(f"K={K} asks for {k} zero groups but {name} has only {n} GeZIGs")
    for kind, count in (counts or {}).items():
        of_kind = space._largest_walk(kind)
        total = sum(g.kind == kind for g in space.groups)
        if count > len(of_kind):
            raise KTooLargeError(
                f"K={K} asks for {count} {kind} groups but at most {len(of_kind)} of the {total} {kind} groups of "
                f"{name} can go together (every layer keeps a channel, and the output stays fed from the input). "
                f"Choose at most {len(of_kind)}."
            )
    if counts is not None:
        return k
    largest = space.greedy_max_removal()
    if k > len(largest):
        raise KTooLargeError(
            f"K={k} is larger than any valid removal fxoto found in {name}: at most {len(largest)} of its "
            f"{n} GeZIGs can be erased together while the output stays fed from the input (erasing more "
            f"would leave a joint with no input). Choose K <= {len(largest)}."
        )
    return k


def select_per_kind(space: SearchSpace, order: Sequence[int], counts: dict[str, int]) -> list[int]:
    """A valid removal of ``counts[kind]`` groups of each kind, each kind taken from the
    front of ``order`` (``select_removal`` within the kind; operations first, then
    channels on top of them).  Fewer only where ``target_k`` would have refused."""
    chosen: list[int] = []
    kind_of = [g.kind for g in space.groups]
    for kind in sorted(counts, key=lambda k: k != "operation"):
        mine = [i for i in order if kind_of[i] == kind]
        got = space.select_removal(mine, counts[kind]) if not chosen else \
            space.greedy_removal(chosen + mine, len(chosen) + counts[kind])[len(chosen):]
        if len(got) < counts[kind]:  # the kind's own greedy walk: target_k accepted the count on it
            got = space._largest_walk(kind)[:counts[kind]]
        chosen += got
    if not space.is_valid_removal(chosen):
        raise KTooLargeError(f"the {sum(counts.values())} groups chosen per kind ({counts}) are valid kind by kind "
                             f"but not together in {type(space.model).__name__}; give K as one number")
    return chosen
