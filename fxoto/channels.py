"""Slim operations: channel groups beside the GeZIGs (DESIGN 3, 7).

``find_channel_groups`` forms one group per *channel*: a set of output
channels that must be zero together for all of them to carry exact zeros
wherever they go, found in two passes.

1. Channel spaces (``_Walk``, in ``fxoto.channel_walk``).  Tensors whose channel ``c`` is the same
   channel share a space: the output of a stem (a ``Conv1d/2d/3d``, transposed
   or not, or a ``Linear``) and everything that keeps its channels
   in place: zero-preserving elementwise ops, pooling, a flatten into a linear
   layer (one channel is then a block of columns), per-channel modules (batch,
   instance and group norms, per-channel PReLU, depthwise convolutions), ``add``
   joints, whose inputs and output all share one space (channel ``c`` of every
   input of an ``add`` is one channel), and products ``x * s`` by a per-channel
   gate ``s`` (squeeze-and-excitation), which carry ``x``'s channels.  A
   ``Linear`` over more than two dims has its features on the last dim.  A
   module called at several places (``conv(conv(x))``, a batch norm after two
   layers) is one module: channel ``c`` of every call is one channel, so the
   calls' spaces are one, as an ``add``'s inputs are; its rows or entries are
   those of its first call (``ChannelLayer.again``), and each call reads its own
   input's channels, sliced per call site by the rewrite.
2. Channels (``_channels``).  A union-find over the spaces' channels joins
   what the spaces alone cannot: channel ``c`` of an input entering a ``cat``
   along the channels at offset ``o`` is channel ``o + c`` of the ``cat``; the
   channels of one group of a group norm go together; a gate's channel ``c``
   goes with the channel ``c`` it scales; the input and output channels of one
   group of a grouped convolution go together (its weight rows of that group
   join the group: the channels it reads are gone).  It runs on arrays, one
   range of channels per join (``_roots``), and the stems' fates (``_fates``:
   which rows lie in tainted classes, which layers share a class) are counted
   on them too, so that ``build_space`` costs about the same per layer however
   wide the layers are.  The groups themselves, one per class, are made on
   first use (``ChannelGroups``, ``SearchSpace.groups``).

A group holds the rows of every stem that produces its channels (weight row and
bias entry) and the entries of every per-channel variable whose zero is needed
on the way (batch norm, instance norm, group norm and depthwise convolution
weight and bias): zero together, the channels are exactly zero wherever they go,
so the readers' input columns can go too.  Zero-invariance is checked on the
walk with the op table, as for GeZIGs.  A space whose channels go anywhere else
(the graph output, an unknown op, a reshape, a sigmoid, a layer norm over the
channels, a product of two activations, a functional stem, variables that
another module or a functional call reads too) is
*tainted*: its channels form no group, and each stem that loses channels to a
taint is set aside in ``SearchSpace.excluded`` with the reason, one entry per
stem.  A taint of zero-invariance (a sigmoid) counts only where the space's zero
is needed: not in a gate.  With ``structures="both"`` a stem or per-channel
module among the nodes an operation group keeps whole (``taken``) taints its
space, so that the groups of both kinds stay disjoint (H2SPG moves each
variable for one group).

Removing every channel of a stem erases its segment where that is exact
(``ChannelLayer.segment``, DESIGN 4), and is refused elsewhere.

A transposed convolution's output channel ``c`` is its weight's slice ``[:, c]``
(a member along dim 1); its input channels are weight rows (dim 0), sliced as
any reader's columns.
"""

from __future__ import annotations

import functools
import itertools
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch.fx as fx
from torch import nn

from fxoto.channel_walk import _Walk
from fxoto.groups import Exclusion, GeZIG, Member, _collector_paused, _ranges
from fxoto.roles import Joint, is_transposed_linear
from fxoto.segments import RULE, SEGMENT, is_joint, own_parameters, users
from fxoto.shapes import SHAPE, submodule



@dataclass(frozen=True)
class ChannelLayer:
    """A stem whose output channels lie in channel groups: ``channels`` of them in the super-network.

    ``segment``: the segment erased when every channel goes (None: such a removal is refused).
    That is the stem's own segment when its channels are its alone (no ``add`` or grouped
    convolution ties them to another stem's), nothing after it in the segment carries other
    channels, and the segment ends only at concat joints: all channels zero, the segment's output
    is zero and the concat can drop it, as for a GeZIG (DESIGN 4).

    ``again``: the other nodes that call the same module (a shared stem, ``conv(conv(x))``): output
    channel c of every call is one channel, so the module loses its rows once and every call
    loses them; such a stem's segment is None (no joint can drop every call).
    """

    stem: str
    channels: int
    segment: int | None = None
    again: tuple[str, ...] = ()


@dataclass(frozen=True)
class ChannelSlice:
    """What one channel group zeroes and what the rewrite slices with it.

    ``rows``: (stem, output channel), the weight rows and bias entries that go;
    ``entries``: (per-channel node, index along its channels);
    ``columns``: (reading stem, first input column, how many: 1, or H*W after a flatten).
    """

    rows: tuple[tuple[str, int], ...]
    entries: tuple[tuple[str, int], ...]
    columns: tuple[tuple[str, int, int], ...]


_NONE = np.iinfo(np.int64).max  # no such index, in the arrays per class


def _roots(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per channel, the least channel of its class once each ``a[i]`` is joined to ``b[i]``: a
    union-find keeping the earlier channel as the root, on arrays (hook roots, then compress)."""
    root = np.arange(n)
    while True:
        ra, rb = root[a], root[b]
        apart = ra != rb
        if not apart.any():
            return root
        np.minimum.at(root, np.maximum(ra, rb)[apart], np.minimum(ra, rb)[apart])
        while not np.array_equal(up := root[root], root):
            root = up


def _channels(walk: _Walk) -> tuple[dict[int, int], np.ndarray]:
    """Pass 2: the union-find over the spaces' channels, as arrays (per layer, not per channel).

    Returns the first channel of each space (by its root, in order) and, per channel, its class
    (the least channel joined to it).
    """
    base: dict[int, int] = {}
    n = 0
    for s in range(len(walk.width)):
        if walk.spaces.find(s) == s:
            base[s], n = n, n + walk.width[s]

    def first(node: fx.Node) -> int:
        return base[walk.root_of(node)]

    joins: list[tuple[int, int, int, int]] = []  # (a, step, b, n): channel a + step * i goes with b + i
    for cat, inputs in walk.cats:
        out = first(cat)
        joins += [(first(x), 1, out + off, x.meta[SHAPE][walk.dim[x]]) for x, off in inputs]
    for conv, x, groups in walk.grouped:
        at, out = first(x), first(conv)
        ki, ko = x.meta[SHAPE][1] // groups, conv.meta[SHAPE][1] // groups
        for j in range(groups):
            joins += [(at + j * ki, 0, at + j * ki, ki), (at + j * ki, 0, out + j * ko, ko)]
    for product, gate in walk.gates:
        joins.append((first(gate), 1, first(product), gate.meta[SHAPE][1]))
    for norm, size in walk.tied:
        at, width = first(norm), walk.width[walk.root_of(norm)]
        joins += [(at + c, 0, at + c, min(size, width - c)) for c in range(0, width, size)]
    a, step, b, length = zip(*joins) if joins else ((), (), (), ())
    return base, _roots(n, _ranges(a, length, step), _ranges(b, length))


@dataclass(frozen=True)
class _Classes:
    """The channel classes of a graph as plain data, enough to make their groups (``_expand``).

    Node ``name``'s channel ``c`` is channel ``at + c`` of the graph, of class ``roots[at + c]``;
    ``order``: the classes that form groups, in id order from ``first_id``; ``per_row``: per stem
    and member holder, (parameter, dim, elements per channel) of its variables.
    """

    first_id: int
    roots: np.ndarray
    order: np.ndarray
    stems: tuple[tuple[str, int, int], ...]  # (name, at, channels)
    holders: tuple[tuple[str, int, int, bool], ...]  # (name, at, channels, entries are members)
    readers: tuple[tuple[str, int, int, int], ...]  # (reading stem, at, channels, columns per channel)
    per_row: dict[str, list[tuple[str, int, int]]]


class ChannelGroups:
    """What ``find_channel_groups`` finds: ``layers``, ``excluded`` and ``params`` (the parameters
    the groups hold) at once, the ``groups`` and their ``slices`` on first use.

    Making one group per class of channels costs several times the rest of ``build_space``
    (efficientnet_b0: 11,000 groups of 77,000 members, about 200 ms against 25), so the classes
    are found per layer on arrays and the groups are made when first read (``SearchSpace.groups``),
    as the ``GraphModule`` is (``SearchSpace.gm``).
    """

    def __init__(self, layers: dict[str, ChannelLayer], excluded: list[Exclusion], params: set[str],
                 classes: _Classes):
        self.layers = layers
        self.excluded = excluded
        self.params = params
        self._classes = classes

    @functools.cached_property
    def _made(self) -> tuple[list[GeZIG], dict[int, ChannelSlice]]:
        with _collector_paused():
            return _expand(self._classes)

    @property
    def groups(self) -> list[GeZIG]:
        return self._made[0]

    @property
    def slices(self) -> dict[int, ChannelSlice]:
        return self._made[1]


def find_channel_groups(graph: fx.Graph, root: nn.Module, first_id: int, taken: set[str]) -> ChannelGroups:
    """One group per class of channels (see module docstring), ids from ``first_id`` (operation groups come first).

    ``taken``: nodes the operation groups keep whole; a stem or per-channel module
    among them taints its channels, so that the groups of both kinds stay disjoint.
    Returns the stems whose channels lie in groups (``layers``), the stems set aside
    (``excluded``, one ``Exclusion`` each, with the reason) and, made on first use, the
    groups and what each slices.
    """
    walk = _Walk(graph, root, taken)
    base, roots = _channels(walk)

    def at(node: fx.Node) -> tuple[int, int]:
        """The node's first channel in ``roots`` and its number of channels."""
        return base[walk.root_of(node)], walk.width[walk.root_of(node)]

    grouped, order, fates = _fates(walk, base, roots, [at(stem) for stem in walk.stems])
    per_row = {node.name: _per_row(node, root) for node in [*walk.stems, *(h for h, member in walk.holders if member)]}
    chains: dict[int, list[fx.Node]] = defaultdict(list)
    for node in graph.nodes:
        if SEGMENT in node.meta:
            chains[node.meta[SEGMENT]].append(node)
    excluded, layers, params = [], {}, set()
    for stem, (width, lost, taint, shared) in zip(walk.stems, fates):
        if lost or not width:
            reason = taint or walk.why[walk.root_of(stem)] or "its channels reach no stem"
            share = f"{lost} of its {width} output channels: " if lost < width else ""
            excluded.append(Exclusion((stem.name,), f"channels: {share}{reason}"))
        if lost < width:
            again = tuple(call.name for call in walk.again.get(stem, ()))
            segment = None if shared or again else _erased_with(stem, walk, chains)
            layers[stem.name] = ChannelLayer(stem.name, width, segment, again)
            params.update(p for p, _, _ in per_row[stem.name])
    for holder, member in walk.holders:
        first, width = at(holder)
        if member and grouped[roots[first:first + width]].any():
            params.update(p for p, _, _ in per_row[holder.name])
    classes = _Classes(first_id, roots, order, tuple((stem.name, *at(stem)) for stem in walk.stems),
                       tuple((holder.name, *at(holder), member) for holder, member in walk.holders),
                       tuple((reader.name, *at(x), walk.block[x]) for reader, x in walk.readers), per_row)
    return ChannelGroups(layers, excluded, params, classes)


def _fates(walk: _Walk, base: dict[int, int], roots: np.ndarray, stems: list[tuple[int, int]]):
    """Which classes form groups, and what becomes of each stem's rows (``stems``: first channel, width).

    A class takes the taint of the first tainted space among its channels' and forms a group when
    it has none and holds some stem's rows; groups are in the order of their first rows.  Per
    stem: its width, how many of its rows lie in tainted classes, the taint of the first such
    class in that order, and whether a class it has rows in holds another stem's rows too.
    Returns the per-class mask, the classes in group order and the per-stem fates.
    """
    n = len(roots)
    spaces = list(base)
    taint = np.full(n, _NONE)
    np.minimum.at(taint, roots, np.repeat(np.array([s if walk.why[s] is not None else _NONE for s in spaces], np.int64),
                                          np.array([walk.width[s] for s in spaces], np.int64)))
    widths = np.array([width for _, width in stems], np.int64)
    row_class = roots[_ranges([first for first, _ in stems], widths)]
    row_stem = np.repeat(np.arange(len(stems)), widths)
    first_row, first_stem, last_stem = np.full(n, _NONE), np.full(n, _NONE), np.full(n, -1)
    np.minimum.at(first_row, row_class, np.arange(len(row_class)))
    np.minimum.at(first_stem, row_class, row_stem)
    np.maximum.at(last_stem, row_class, row_stem)
    grouped = (taint == _NONE) & (first_row != _NONE)
    order = np.flatnonzero(grouped)
    order = order[np.argsort(first_row[order])]
    lost_rows = ~grouped[row_class]
    lost = np.bincount(row_stem, weights=lost_rows, minlength=len(stems)).astype(np.int64).tolist()
    shared = np.bincount(row_stem, weights=first_stem[row_class] != last_stem[row_class], minlength=len(stems))
    lost_keys = np.where(lost_rows, first_row[row_class], _NONE)
    fates = []
    for k, (start, width) in enumerate(zip((np.cumsum(widths) - widths).tolist(), widths.tolist())):
        why = None
        if lost[k]:
            first = start + int(np.argmin(lost_keys[start:start + width]))  # the stem's first lost row, in group order
            why = walk.why[taint[row_class[first]]]
        fates.append((width, lost[k], why, bool(shared[k])))
    return grouped, order, fates


def _per_row(node: fx.Node, root: nn.Module) -> list[tuple[str, int, int]]:
    """(parameter name, dim, elements per channel) of the node's variables (a transposed
    convolution's weight and an embedding's hold their output channels along dim 1)."""
    module = submodule(root, node.target) if node.op == "call_module" else None
    columns = isinstance(module, (nn.modules.conv._ConvTransposeNd, nn.Embedding)) or (
        module is not None and is_transposed_linear(module))
    return [(name, d, p.numel() // p.shape[d]) for name, p in own_parameters(node, root)
            for d in [1 if columns and p.dim() > 1 else 0]]


def _expand(classes: _Classes) -> tuple[list[GeZIG], dict[int, ChannelSlice]]:
    """One group per class in ``classes.order``: its stems' rows and member entries, its slices."""
    group_of = np.full(len(classes.roots), -1)
    group_of[classes.order] = np.arange(len(classes.order))

    def per_group(nodes, blocks=None) -> list[list[tuple]]:
        return _per_group(classes.roots, group_of, len(classes.order), nodes, blocks)

    rows = per_group(classes.stems)
    held = per_group([(name, at, width) for name, at, width, member in classes.holders if member])
    entries = per_group([(name, at, width) for name, at, width, _ in classes.holders])
    columns = per_group([(name, at, width) for name, at, width, _ in classes.readers],
                        [block for *_, block in classes.readers])
    groups: list[GeZIG] = []
    slices: dict[int, ChannelSlice] = {}
    for gid, cut, held_here, entries_here, columns_here in zip(itertools.count(classes.first_id), rows, held,
                                                               entries, columns):
        members: list[Member] = []
        numel = 0
        for name, c in cut + held_here:
            for param, d, n in classes.per_row[name]:
                members.append(Member(param, d, c, c + 1))
                numel += n
        nodes = tuple(dict.fromkeys([name for name, _ in cut] + [name for name, _ in entries_here]))
        groups.append(GeZIG(gid, -1, nodes, tuple(members), numel, kind="channel"))
        slices[gid] = ChannelSlice(tuple(cut), tuple(entries_here), tuple(columns_here))
    return groups, slices


def _per_group(roots: np.ndarray, group_of: np.ndarray, count: int, nodes: Sequence[tuple[str, int, int]],
               blocks: Sequence[int] | None = None) -> list[list[tuple]]:
    """Per group, ``(name, c)`` for each channel ``c`` of ``nodes`` (name, first channel, width) whose
    class forms it (``group_of``, by class: the group's index, or -1), in node then channel order;
    with ``blocks`` (one per node), ``(name, c * block, block)``."""
    names = [name for name, _, _ in nodes]
    starts = np.array([at for _, at, _ in nodes], np.int64)
    widths = np.array([width for _, _, width in nodes], np.int64)
    channels = _ranges(starts, widths)
    group = group_of[roots[channels]]
    keep = np.flatnonzero(group >= 0)
    keep = keep[np.argsort(group[keep], kind="stable")]
    within = (channels - np.repeat(starts, widths))[keep]
    names = np.repeat(np.array(names, dtype=object), widths)[keep].tolist()
    if blocks is None:
        items = list(zip(names, within.tolist()))
    else:
        block = np.repeat(np.array(blocks, np.int64), widths)[keep]
        items = list(zip(names, (within * block).tolist(), block.tolist()))
    bounds = np.searchsorted(group[keep], np.arange(count + 1)).tolist()
    return [items[lo:hi] for lo, hi in zip(bounds, bounds[1:])]


def _erased_with(stem: fx.Node, walk: _Walk, chains: dict[int, list[fx.Node]]) -> int | None:
    """The stem's segment, when removing all its channels erases it (see ``ChannelLayer``)."""
    segment = stem.meta.get(SEGMENT)
    if segment is None:
        return None
    chain = chains[segment]
    after = chain[chain.index(stem):]
    if any(n not in walk.space or walk.root_of(n) != walk.root_of(stem) for n in after):
        return None
    ends = users(chain[-1])
    if not ends or not all(is_joint(u) and u.meta[RULE].joint is Joint.CAT for u in ends):
        return None
    return segment
