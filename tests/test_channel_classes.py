"""The channel classes on arrays (``fxoto.channels``): the union-find over ranges of channels
against a plain union-find, one channel at a time."""

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from fxoto.channels import _ranges, _roots


def least_joined(n: int, pairs: list[tuple[int, int]]) -> list[int]:
    """Per channel, the least channel joined to it through ``pairs`` (a plain union-find)."""
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    for a, b in pairs:
        ra, rb = find(a), find(b)
        parent[max(ra, rb)] = min(ra, rb)
    return [find(i) for i in range(n)]


joins = st.integers(1, 64).flatmap(lambda n: st.tuples(
    st.just(n), st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)), max_size=3 * n)))


@given(joins)
def test_each_channel_s_class_is_the_least_channel_joined_to_it(case):
    n, pairs = case
    a = np.array([a for a, _ in pairs], np.int64)
    b = np.array([b for _, b in pairs], np.int64)
    assert _roots(n, a, b).tolist() == least_joined(n, pairs)


@given(st.lists(st.tuples(st.integers(0, 50), st.integers(0, 6), st.integers(0, 2)), max_size=8))
def test_ranges_are_the_ranges_end_to_end(spans):
    starts, lengths, steps = zip(*spans) if spans else ((), (), ())
    expected = [start + step * i for start, n, step in spans for i in range(n)]
    assert _ranges(starts, lengths, steps).tolist() == expected
    assert _ranges(starts, lengths).tolist() == [start + i for start, n, _ in spans for i in range(n)]
