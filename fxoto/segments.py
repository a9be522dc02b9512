"""Step 2 of the pipeline: annotate nodes, follow channels after ``cat``, cut segments.

Three passes, each writing one ``node.meta`` key:

* ``annotate_rules`` (``"fxoto.rule"``): the ``OpRule`` from the op table,
  with joints checked (two or more distinct tensor inputs; for ``cat``, a
  channel region that can be sliced exactly, see ``channel_region``);
* ``channel_region`` (``"fxoto.region"`` on each ``cat`` joint): where the
  concatenated channels go until the stems that read them;
* ``cut_segments`` (``"fxoto.segment"``): the paper's Algorithm 2, lines 3-10.

A *data node* produces a tensor (or a tuple of tensors) and is not a
``get_attr``: parameters fetched with ``get_attr`` belong to the node that uses
them (``F.conv2d(x, self.weight)`` is one stem), buffers are constants.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from fxoto.roles import FACTORS, FIXED, UNKNOWN, Channel, Joint, OpRule, OpTable, Role, Zero
from fxoto.shapes import SHAPE, attr_value, submodule

RULE = "fxoto.rule"
REFUSED = "fxoto.refused"  # node.meta of a cat whose channels cannot be followed: why
LIVE = "fxoto.live"
REGION = "fxoto.region"
SEGMENT = "fxoto.segment"


def is_data(node: fx.Node) -> bool:
    return node.op != "get_attr" and node.op != "output" and node.meta.get(SHAPE) is not None


def users(node: fx.Node) -> list[fx.Node]:
    """Users whose value can reach the output (an unused ``getitem`` does not count)."""
    return [u for u in node.users if u.meta.get(LIVE)]


def mark_live(graph: fx.Graph) -> None:
    """``node.meta["fxoto.live"]``: the node's value can reach the graph output."""
    stack = [n for n in graph.nodes if n.op == "output"]
    for n in stack:
        n.meta[LIVE] = True
    while stack:
        for n in stack.pop().all_input_nodes:
            if not n.meta.get(LIVE):
                n.meta[LIVE] = True
                stack.append(n)


def mark_fixed(graph: fx.Graph) -> None:
    """``node.meta["fxoto.fixed"]``: the node is computed from variables and constants alone.

    A product by such a value scales its other operand (``roles._scale``).
    """
    for node in graph.nodes:
        ins = node.all_input_nodes
        node.meta[FIXED] = node.op == "get_attr" or (
            node.op in ("call_function", "call_method", "call_module") and bool(ins) and all(n.meta[FIXED] for n in ins)
        )


def data_inputs(node: fx.Node) -> list[fx.Node]:
    """Distinct data nodes among the node's inputs, in argument order (a product's factors are none)."""
    factors = node.meta.get(FACTORS, ())
    return [n for n in node.all_input_nodes if is_data(n) and n not in factors]


PARAMS = "fxoto.params"


def own_parameters(node: fx.Node, root: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The trainable variables a node uses: its module's, or its ``get_attr`` arguments.

    ``root`` owns the graph's targets (the traced model or a ``GraphModule``).
    Cached in ``node.meta["fxoto.params"]``.
    """
    if PARAMS not in node.meta:
        node.meta[PARAMS] = _find_parameters(node, root)
    return node.meta[PARAMS]


def _find_parameters(node: fx.Node, root: nn.Module) -> list[tuple[str, nn.Parameter]]:
    if node.op == "call_module":
        module = submodule(root, node.target)
        prefix = f"{node.target}." if node.target else ""
        if module._modules:
            return [(prefix + name, p) for name, p in module.named_parameters()]
        found, seen = [], set()
        for name, p in module._parameters.items():  # named_parameters() of a module without children
            if p is not None and id(p) not in seen:
                seen.add(id(p))
                found.append((prefix + name, p))
        return found
    if _factor_only(node):
        return []  # its variables are those of the products it scales
    found = []
    args = list(node.all_input_nodes)
    factors = list(node.meta.get(FACTORS, ()))
    while factors:  # a product owns the variables its factors are computed from
        factor = factors.pop()
        if factor.op == "get_attr":
            args.append(factor)
        else:
            factors.extend(factor.all_input_nodes)
    for arg in dict.fromkeys(args):
        if arg.op == "get_attr":
            value = attr_value(arg, root)
            if isinstance(value, nn.Parameter) and all(value is not p for _, p in found):
                found.append((arg.target, value))
    return found


def _factor_only(node: fx.Node) -> bool:
    """A value computed from variables whose every use is as a product's factor (``gamma.view(1, -1, 1, 1)``)."""
    if node.op == "get_attr" or not node.meta.get(FIXED):
        return False
    return all(node in u.meta.get(FACTORS, ()) or _factor_only(u) for u in node.users)


# Per channel of the cat, its index along the tracked dim of a tensor (-1: not in it); a
# ``range`` while the channels stay consecutive, a tuple once a shuffle or a split moved them.
Positions = tuple | range


@dataclass(frozen=True)
class ChannelRegion:
    """Where the channels of one ``cat`` joint go, up to the stems that read them.

    ``offsets[i]`` is the first channel of input ``i``.  Every entry below
    carries ``positions``: for each channel of this cat, its index along the
    channel dim of the tensor the node reads (shifted by enclosing cats,
    permuted by channel shuffles, -1 where a split left it out).
    ``per_channel`` lists the nodes with per-channel variables (batch norm,
    depthwise convolution) on the way; their slices join the input's group.
    ``consumers`` lists each stem reading the channels with the width of one
    channel's block of its input features (``H*W`` after a flatten, else 1).
    ``cats`` are enclosing cats the channels pass through.  ``shuffles`` are
    channel shuffles (view, transpose, view) by the name of their last view,
    with their first view and group count; ``splits`` are ``chunk`` / ``split``
    nodes along the channels: both are rewritten when channels go.
    """

    dim: int
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    per_channel: tuple[tuple[str, Positions], ...]
    consumers: tuple[tuple[str, int, Positions], ...]
    cats: tuple[str, ...]
    # Products by a per-channel factor read from the model: (node, factor's get_attr
    # target, the factor's dim along the channels, positions); sliced, never zeroed.
    scales: tuple[tuple[str, str, int, Positions], ...] = ()
    shuffles: tuple[tuple[str, str, int, Positions], ...] = ()
    splits: tuple[tuple[str, int, Positions], ...] = ()


def source_indices(positions: Positions, off: int, size: int) -> list[int]:
    """The indices (in the reading tensor) of the cat's channels ``off .. off + size``."""
    return [p for p in positions[off : off + size] if p >= 0]


def runs(indices) -> list[tuple[int, int]]:
    """Sorted indices as ``[start, stop)`` runs of consecutive values."""
    out: list[list[int]] = []
    for i in sorted(set(indices)):
        if out and out[-1][1] == i:
            out[-1][1] = i + 1
        else:
            out.append([i, i + 1])
    return [(a, b) for a, b in out]


def _shifted(positions: Positions, shift: int, bound: int | None = None) -> Positions:
    """Each index plus ``shift``, -1 where it falls outside ``0 .. bound`` (kept a ``range`` where it stays one)."""
    if isinstance(positions, range) and (bound is None or (positions.start + shift >= 0 and positions.stop + shift <= bound)):
        return range(positions.start + shift, positions.stop + shift)
    return tuple(-1 if p < 0 or not 0 <= p + shift < (bound if bound is not None else p + shift + 1) else p + shift
                 for p in positions)


_SPLITS = ("chunk", "split")


def _split_dim(node: fx.Node) -> int | None:
    """The dim of ``x.chunk(n, dim)`` / ``x.split(s, dim)`` / ``torch.chunk`` / ``torch.split``, or None."""
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", None)
    if node.op not in ("call_method", "call_function") or name not in _SPLITS:
        return None
    if node.op == "call_function" and node.target not in (torch.chunk, torch.split):
        return None
    dim = node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else 0)
    return dim if isinstance(dim, int) else None


def _is_view(node: fx.Node) -> bool:
    return (node.op == "call_method" and node.target in ("view", "reshape")) or (
        node.op == "call_function" and node.target is torch.reshape)


def shuffle_chain(node: fx.Node) -> tuple[fx.Node, fx.Node, int] | None:
    """``(first view, last view, groups)`` when ``node`` feeds a channel shuffle, else None.

    The shuffle is ``view(B, g, C/g, *rest) -> transpose(1, 2) -> [contiguous] ->
    view(B, C, *rest)``, each step the only user of the one before.
    """
    shape = node.meta.get(SHAPE)
    if not isinstance(shape, torch.Size) or len(shape) < 2:
        return None
    for first in users(node):
        if not _is_view(first) or first.args[0] is not node:
            continue
        s1 = first.meta.get(SHAPE)
        if not isinstance(s1, torch.Size) or len(s1) != len(shape) + 1 or s1[0] != shape[0]:
            continue
        if s1[1] * s1[2] != shape[1] or tuple(s1[3:]) != tuple(shape[2:]):
            continue
        step = first
        nxt = users(step)
        if len(nxt) != 1 or len(step.users) != 1:
            continue
        t = nxt[0]
        is_t = (t.op == "call_function" and t.target is torch.transpose) or (t.op == "call_method" and t.target == "transpose")
        if not is_t or t.args[0] is not step or sorted(a % len(s1) for a in t.args[1:3]) != [1, 2] or len(t.args) != 3:
            continue
        step = t
        nxt = users(step)
        if len(nxt) != 1 or len(step.users) != 1:
            continue
        if nxt[0].op == "call_method" and nxt[0].target == "contiguous" and len(nxt[0].args) == 1:
            step = nxt[0]
            nxt = users(step)
            if len(nxt) != 1 or len(step.users) != 1:
                continue
        last = nxt[0]
        if not _is_view(last) or last.args[0] is not step or last.meta.get(SHAPE) != shape:
            continue
        return first, last, s1[1]
    return None


def _size_feeds_only(size: fx.Node, allowed: set[fx.Node]) -> bool:
    """Everything ``size`` (a ``x.size()`` / ``x.shape``) computes is read only by ``allowed`` nodes."""
    stack, seen = [size], set()
    while stack:
        n = stack.pop()
        for u in n.users:
            if u in seen:
                continue
            seen.add(u)
            if u in allowed:
                continue
            if is_data(u) or u.op == "output":
                return False
            stack.append(u)
    return True


def _is_size(node: fx.Node) -> bool:
    return (node.op == "call_method" and node.target == "size") or (
        node.op == "call_function" and node.target is getattr and node.args[1:] == ("shape",))


def _cat_dim(node: fx.Node) -> int:
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
    return dim % len(node.meta[SHAPE])


def _cat_inputs(node: fx.Node) -> list[fx.Node] | None:
    # Only the positional form, torch.cat([...], dim): the rewrite edits args[0].
    inputs = node.args[0] if node.args else None
    if not isinstance(inputs, (list, tuple)) or not all(isinstance(n, fx.Node) and is_data(n) for n in inputs):
        return None
    return list(inputs)


def _flatten_block(before: torch.Size, after: torch.Size, dim: int) -> int | None:
    """Block width per channel if ``after`` merges dims ``dim..e`` of ``before``, else None."""
    if tuple(after[:dim]) != tuple(before[:dim]) or len(after) <= dim:
        return None
    for end in range(dim, len(before)):
        merged = math.prod(before[dim : end + 1])
        if merged == after[dim] and tuple(before[end + 1 :]) == tuple(after[dim + 1 :]):
            return math.prod(before[dim + 1 : end + 1])
    return None


def _reduce_dims(node: fx.Node, ndim: int) -> tuple[tuple[int, ...], bool] | None:
    dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    if dims is None:
        return None
    dims = (dims,) if isinstance(dims, int) else tuple(dims)
    keepdim = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
    return tuple(d % ndim for d in dims), bool(keepdim)


class ChannelsNotFollowed(Exception):
    """``channel_region`` cannot follow a concat's channels exactly; the message says where and why."""


def _factor_channel(factor: fx.Node, in_shape: torch.Size, tdim: int) -> int | None:
    """The factor's dim that runs along the tracked dim when it broadcasts against ``in_shape``, or None
    when the factor is the same for every channel (size 1 there, or fewer dims)."""
    shape = factor.meta.get(SHAPE)
    k = tdim - (len(in_shape) - len(shape)) if isinstance(shape, torch.Size) else -1
    return k if k >= 0 and shape[k] != 1 else None


def channel_region(cat: fx.Node, rules: dict[fx.Node, OpRule]) -> ChannelRegion:
    """Follow the concatenated dim to the stems reading it; raise ``ChannelsNotFollowed`` when that is not exact.

    Every path from the ``cat`` must reach a stem that reads the tracked dim,
    through nodes that keep a zero channel zero (DESIGN section 3): elementwise
    ops that preserve zero, pooling, flatten, enclosing cats along the same dim,
    per-channel batch norm and depthwise convolutions (whose slices then belong
    to the erased input's group), products by a per-channel factor read from the
    model (a parameter, buffer or constant ``gamma`` of shape [C, 1, 1]: sliced
    with the channels), channel shuffles (``view(B, g, C/g, ...)``,
    ``transpose(1, 2)``, ``view(B, C, ...)``: a permutation of the indices; the
    ``x.size()`` read for its views only) and ``chunk`` / ``split`` along the
    channels (each part a slice of the indices).  Anything else (an add, a
    sigmoid, a layer norm, the graph output, a grouped convolution, a factor
    computed from variables that varies along the channels, a size read for
    anything but a shuffle) refuses.
    """
    def refuse(user: fx.Node, why: str) -> None:
        raise ChannelsNotFollowed(f"what '{cat.name}' concatenates reaches node '{user.name}', which {why}")

    inputs = _cat_inputs(cat)
    if inputs is None or len(inputs) < 2 or len(set(inputs)) != len(inputs):
        raise ChannelsNotFollowed(f"'{cat.name}' does not concatenate two or more distinct tensors given as a list")
    dim = _cat_dim(cat)
    sizes = tuple(n.meta[SHAPE][dim] for n in inputs)
    offsets = tuple(sum(sizes[:i]) for i in range(len(sizes)))
    per_channel, consumers, cats, scales, shuffles, splits = [], [], [], [], [], []
    stack: list[tuple[fx.Node, int, int, Positions]] = [(cat, dim, 1, range(sum(sizes)))]
    seen = set()
    while stack:
        node, tdim, block, pos = stack.pop()
        chain = shuffle_chain(node) if tdim == 1 and block == 1 else None
        for user in users(node):
            if (user, tdim, block, pos) in seen:
                continue
            seen.add((user, tdim, block, pos))
            if user.op == "output":
                refuse(user, "is the graph output: the caller would see fewer channels")
            if not is_data(user):
                if chain is not None and _is_size(user) and _size_feeds_only(user, {chain[0], chain[1]}):
                    continue  # the shuffle's view sizes: the rewrite replaces the shuffle
                refuse(user, "reads their shape (x.size(), x.shape) to compute something other than a channel "
                             "shuffle (view, transpose(1, 2), view) fxoto follows")
            if chain is not None and user is chain[0]:
                first, last, groups = chain
                per_group = node.meta[SHAPE][1] // groups
                shuffles.append((last.name, first.name, groups, pos))
                moved = tuple(-1 if p < 0 else (p % per_group) * groups + p // per_group for p in pos)
                stack.append((last, tdim, block, moved))
                continue
            split_dim = _split_dim(user)
            if split_dim is not None and isinstance(node.meta[SHAPE], torch.Size):
                parts = user.meta[SHAPE]
                if split_dim % len(node.meta[SHAPE]) != tdim or block != 1 or not isinstance(parts, tuple):
                    refuse(user, "splits them along another dim or after a flatten")
                bounds = [sum(part[tdim] for part in parts[:i]) for i in range(len(parts) + 1)]
                items = users(user)
                if not all(u.op == "call_function" and u.target is operator.getitem and isinstance(u.args[1], int)
                           and u.args[0] is user for u in items):
                    refuse(user, "splits them and uses the parts other than by their index")
                splits.append((user.name, tdim, pos))
                for item in items:
                    lo, hi = bounds[item.args[1]], bounds[item.args[1] + 1]
                    part = _shifted(pos, -lo, hi - lo)
                    if any(p >= 0 for p in part):
                        stack.append((item, tdim, block, part))
                continue
            rule = rules[user]
            in_shape, out_shape = node.meta[SHAPE], user.meta[SHAPE]
            if not isinstance(in_shape, torch.Size) or not isinstance(out_shape, torch.Size):
                refuse(user, "takes or makes something other than one tensor")
            if rule.joint is Joint.CAT:
                outer = _cat_inputs(user)
                if outer is None or outer.count(node) != 1 or _cat_dim(user) != tdim or block != 1:
                    refuse(user, "concatenates them again along another dim or after a flatten")
                position = outer.index(node)
                cats.append(user.name)
                shift = sum(n.meta[SHAPE][tdim] for n in outer[:position])
                stack.append((user, tdim, block, _shifted(pos, shift)))
                continue
            if rule.joint is Joint.ADD or rule.role is Role.UNKNOWN:
                refuse(user, "adds to them or combines them in a way fxoto does not know (only a concat, a "
                             "stem, or ops that keep a zero channel zero may read them)")
            if data_inputs(user) != [node]:
                refuse(user, "combines them with another activation (only a concat or a stem may read them)")
            for factor in user.meta.get(FACTORS, ()):
                k = _factor_channel(factor, in_shape, tdim)
                if k is None:
                    continue
                if factor.op != "get_attr" or block != 1:
                    refuse(user, f"scales them by '{factor.name}', which varies along the channels but is computed "
                                 f"in forward (only a parameter, buffer or constant read as it is can be sliced)")
                scales.append((user.name, factor.target, k, pos))
            kind = rule.channel
            if kind is Channel.CONSUME:
                if rule.reads is None or tdim != rule.reads % len(in_shape):
                    refuse(user, "reads another dim than the concatenated one")
                consumers.append((user.name, block, pos))
            elif kind is Channel.PER_CHANNEL and tdim == 1 and block == 1:
                per_channel.append((user.name, pos))
                stack.append((user, tdim, block, pos))
            elif rule.zero is not Zero.PRESERVES:
                refuse(user, "does not keep a zero channel zero")
            elif kind is Channel.ELEMENTWISE and in_shape == out_shape:
                stack.append((user, tdim, block, pos))
            elif kind is Channel.SPATIAL and tdim == 1 and block == 1 and len(in_shape) == len(out_shape) and in_shape[1] == out_shape[1]:
                stack.append((user, tdim, block, pos))
            elif kind is Channel.FLATTEN and (inner := _flatten_block(in_shape, out_shape, tdim)) is not None:
                stack.append((user, tdim, block * inner, pos))
            elif kind is Channel.REDUCE and (reduced := _reduce_dims(user, len(in_shape))) is not None and tdim not in reduced[0]:
                dims, keepdim = reduced
                stack.append((user, tdim if keepdim else tdim - sum(d < tdim for d in dims), block, pos))
            else:
                refuse(user, f"moves or mixes channels in a way fxoto does not follow ({rule.channel.value})")
    if not consumers:
        raise ChannelsNotFollowed(f"no convolution or linear layer reads the channels of '{cat.name}'")
    unique = lambda items: tuple(dict.fromkeys(items))  # noqa: E731
    return ChannelRegion(dim, offsets, sizes, unique(per_channel), unique(consumers), unique(cats), unique(scales),
                         unique(shuffles), unique(splits))


def annotate_rules(graph: fx.Graph, root: nn.Module, table: OpTable) -> None:
    """Write each data node's rule, demoting joints that cannot be removed from."""
    mark_live(graph)
    mark_fixed(graph)
    rules: dict[fx.Node, OpRule] = {}
    for node in graph.nodes:
        if is_data(node):
            rules[node] = table.rule(node, root)
    for node, rule in rules.items():
        if rule.role is not Role.JOINT:
            continue
        if rule.joint is Joint.ADD:
            ins = data_inputs(node)
            carriers = [n for n in ins if n.meta[SHAPE] == node.meta[SHAPE]]
            if len(ins) < 2 or not carriers:
                rules[node] = UNKNOWN
        elif rule.joint is Joint.CAT and len(data_inputs(node)) < 2:
            rules[node] = UNKNOWN  # cat([x]) or cat([x, x]): no joint, nothing to refuse (DESIGN 2)
        elif rule.joint is Joint.CAT:
            try:
                node.meta[REGION] = channel_region(node, rules)
            except ChannelsNotFollowed as refused:
                rules[node] = UNKNOWN
                node.meta[REFUSED] = str(refused)
    for node, rule in rules.items():
        node.meta[RULE] = rule


def is_joint(node: fx.Node) -> bool:
    rule = node.meta.get(RULE)
    return rule is not None and rule.role is Role.JOINT


@dataclass(frozen=True)
class Segment:
    """A chain of nodes grown depth-first (Algorithm 2, line 8).

    Only the head may have several inputs; the chain ends at a node with several
    users or whose user is a joint or has several inputs.
    """

    id: int
    nodes: tuple[str, ...]
    inputs: tuple[int, ...]  # segments feeding the head, one entry per data input
    kind: str  # "source", "joint", "plain" or "output"


def cut_segments(graph: fx.Graph) -> list[Segment]:
    """Partition the data nodes into segments; write ``node.meta["fxoto.segment"]``."""
    chains: list[list[fx.Node]] = []
    heads: list[fx.Node] = []
    seg_of: dict[fx.Node, int] = {}
    for node in graph.nodes:
        if not (is_data(node) or node.op == "output"):
            continue
        ins = data_inputs(node)
        if node.op == "output":
            ins = [n for n in node.all_input_nodes if is_data(n)]
        prev = ins[0] if len(ins) == 1 else None
        grows = (
            prev is not None
            and node.op != "output"
            and prev.op != "placeholder"
            and not is_joint(node)
            and len(users(prev)) == 1
        )
        if grows:
            seg_of[node] = seg_of[prev]
            chains[seg_of[node]].append(node)
        else:
            seg_of[node] = len(chains)
            chains.append([node])
            heads.append(node)
    segments = []
    for i, (chain, head) in enumerate(zip(chains, heads)):
        ins = [n for n in head.all_input_nodes if is_data(n)]
        if head.op == "output":
            kind = "output"
        elif not ins:
            kind = "source"
        elif is_joint(head):
            kind = "joint"
        else:
            kind = "plain"
        segments.append(Segment(i, tuple(n.name for n in chain), tuple(seg_of[n] for n in ins), kind))
        for n in chain:
            n.meta[SEGMENT] = i
    return segments


@dataclass(frozen=True)
class SplitPiece:
    """One part of a ``chunk`` / ``split`` that follows a concat's channels, and what goes with it
    when every one of its channels is removed (DESIGN 6).

    ``owners``: per channel of the part, the segments whose erasure removes it (the concats'
    inputs it comes from, an enclosing concat's input included); the part is *emptied* when each
    channel has an erased owner.  ``nodes``: what then carries nothing, the part's items and
    what reads them alone, up to the concat joints that take them (which drop them); the
    segments made of those nodes alone (``whole``) go with them; a segment they share with
    other nodes (``partial``) is left reading nothing.  ``readers``: (stem, its segment) of the
    convolutions and linear layers that read the part, left reading nothing too: such a layer
    would put out its bias alone, which a zero-width layer does not, so a segment left reading
    nothing must be erased or no longer reach the output (``SearchSpace.emptied``).
    ``problem``: why emptying the part is never exact (None: it can be).
    """

    split: str
    index: int
    owners: frozenset[frozenset[int]]
    nodes: tuple[str, ...]
    whole: frozenset[int]
    partial: frozenset[int]
    readers: tuple[tuple[str, int], ...]
    problem: str | None = None


def _part_owners(graph: fx.Graph) -> dict[str, list[set[int]]]:
    """Per split followed by a concat's region: per input channel, the segments that own it."""
    owners: dict[str, list[set[int]]] = {}
    nodes = {n.name: n for n in graph.nodes}
    for cat in graph.nodes:
        region: ChannelRegion | None = cat.meta.get(REGION)
        if region is None or not is_joint(cat):
            continue
        for name, dim, positions in region.splits:
            split = nodes[name]
            table = owners.setdefault(name, [set() for _ in range(split.args[0].meta[SHAPE][dim])])
            for src, off, size in zip(cat.args[0], region.offsets, region.sizes):
                for p in source_indices(positions, off, size):
                    table[p].add(src.meta[SEGMENT])
    return owners


def split_pieces(graph: fx.Graph, segments: list[Segment]) -> list[SplitPiece]:
    """The parts of the splits after concats that a removal can empty (``SplitPiece``), in graph order.

    Needs ``annotate_rules`` and ``cut_segments`` first.  A part with a channel that no
    concat's input owns is never emptied and is left out.
    """
    pieces = []
    nodes = {n.name: n for n in graph.nodes}
    for name, table in _part_owners(graph).items():
        split = nodes[name]
        dim = _split_dim(split) % len(split.args[0].meta[SHAPE])
        bounds = [0]
        for part in split.meta[SHAPE]:
            bounds.append(bounds[-1] + part[dim])
        for index, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
            owners = table[lo:hi]
            if hi == lo or not all(owners):
                continue
            items = [u for u in users(split) if u.args[1] == index]
            pieces.append(_piece(split, index, frozenset(map(frozenset, owners)), items, segments, nodes))
    return pieces


def _piece(split: fx.Node, index: int, owners, items: list[fx.Node], segments: list[Segment],
           nodes: dict[str, fx.Node]) -> SplitPiece:
    """Walk from a part's items to the concat joints and stems that read it (``SplitPiece``)."""
    found, readers, problem = {}, [], None
    stack = list(items)
    while stack:
        node = stack.pop()
        if node in found:
            continue
        found[node] = None
        for user in users(node):
            if not is_data(user):
                continue  # a size read, for a shuffle's views: dead with them
            rule = user.meta[RULE]
            if is_joint(user) and rule.joint is Joint.CAT:
                continue
            if rule.channel is Channel.CONSUME:
                readers.append((user.name, user.meta[SEGMENT]))
            elif user.op == "output" or data_inputs(user) != [node]:
                problem = problem or (f"it reaches node '{user.name}', which is neither a concat joint that could "
                                      f"drop it nor an op on it alone")
            else:
                stack.append(user)
    names = {n.name for n in found}
    touched = {n.meta[SEGMENT] for n in found}
    whole = frozenset(s for s in touched if all(n in names for n in segments[s].nodes if nodes[n].meta.get(LIVE)))
    return SplitPiece(split.name, index, owners, tuple(names), whole, frozenset(touched - whole),
                      tuple(dict.fromkeys(readers)), problem)
