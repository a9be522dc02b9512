"""Step 5 of the pipeline: the sub-network as a torch.fx rewrite (paper 3.3; DESIGN 6).

``construct_subnet(space)`` erases every GeZIG that is exactly zero:

0. channel groups (``kind="channel"``, ``fxoto.channels``) slim their layer:
   the stem's weight rows and bias entries (once for a module called at several
   places), the per-channel modules after it and the consumers' input columns
   go, per call site (with the operations' drops below);
1. the joints lose the erased operands: an ``add`` sums the others, a ``cat``
   concatenates the others;
2. what read the erased channels is sliced: after a ``cat``, the stems'
   input features (conv / linear weight columns, following flattens), the
   per-channel variables and statistics on the way (batch norm) and the
   per-channel factors of products (``cat(...) * gamma``); a weight read at
   several places is sliced per place where the places differ; a channel
   shuffle that lost channels becomes ``index_select`` with the kept
   permutation, a ``chunk`` / ``split`` a ``torch.split`` with the kept counts,
   and a part of it left with no channel goes with what reads it alone, up to
   the concat that drops it (``SearchSpace.emptied``);
3. a joint left with one input becomes that input, vertices that no longer
   reach the output go (dead-code elimination), in-place ops whose input
   others also read become out-of-place (an ``add`` that vanished must not
   let a later in-place op mutate a tensor that others read), then ``lint()``
   and ``recompile()``; the parameters and buffers no node reads go;
4. the sub-network's shapes are propagated on ``meta`` and its output shapes
   compared with the super-network's: a failure raises ``SubnetCheckError``,
   never hands out a network that breaks when it is called.

The result owns fresh, smaller parameters; the super-network is not touched.
"""

from __future__ import annotations

import copy
import itertools
import operator
from collections import defaultdict

import torch
import torch.fx as fx
from torch import nn

from fxoto.errors import SubnetCheckError
from fxoto.patterns import rms_norm
from fxoto.roles import Joint
from fxoto.segments import REGION, RULE, ChannelRegion, data_inputs, source_indices
from fxoto.slicing import (_per_module, _slice_consumers, _slice_factors, _slice_per_channel, _slice_rms_norm,
                           _slice_stem)
from fxoto.shapes import CONSTANT, SHAPE, describe, fetch_attr, propagate_again


def _erased_nodes(space, ids) -> set[str]:
    """The operation groups' nodes, the segments of stems that lose every channel, and the
    split parts left with no channel (``SearchSpace.emptied``) up to the concats that drop them."""
    segments, _ = space.channel_erasures(ids)
    segments |= {space.groups[i].segment for i in ids if space.groups[i].kind == "operation"}
    gone, pieces, _, _ = space.emptied(segments)
    return ({name for i in ids if space.groups[i].kind == "operation" for name in space.groups[i].nodes}
            | {name for s in gone for name in space.segments[s].nodes}
            | {name for piece in pieces for name in piece.nodes})


def _channel_drops(space, ids) -> dict[str, set[int]]:
    """Output channels to drop, per stem, from the channel groups among ``ids``."""
    drops: dict[str, set[int]] = defaultdict(set)
    for cut in filter(None, map(space.slices.get, ids)):
        for stem, c in cut.rows:
            drops[stem].add(c)
    return drops


def _slim(space, ids, erased: set[str], consume, per_channel) -> None:
    """Add the channel groups' drops to the consumers' columns and the per-channel modules' entries."""
    for cut in filter(None, map(space.slices.get, ids)):
        for name, c in cut.entries:
            per_channel[name].add(c)
        for name, lo, n in cut.columns:
            if name not in erased:
                consume[name].update(range(lo, lo + n))


def _removed_features(gm: fx.GraphModule, erased: set[str]):
    """Original input-feature indices to drop, per consumer stem, per per-channel node, per
    (product, factor target, factor dim) for the per-channel factors of products, and per
    channel shuffle and split (indices along the channels of their input)."""
    consume: dict[str, set[int]] = defaultdict(set)
    per_channel: dict[str, set[int]] = defaultdict(set)
    factors: dict[tuple[str, str, int], set[int]] = defaultdict(set)
    moves: dict[str, set[int]] = defaultdict(set)  # shuffles (by last view) and splits
    for cat in gm.graph.nodes:
        region: ChannelRegion | None = cat.meta.get(REGION)
        if region is None or cat.name in erased:
            continue
        for src, off, size in zip(cat.args[0], region.offsets, region.sizes):
            if src.name not in erased:
                continue
            for name, block, positions in region.consumers:
                for p in source_indices(positions, off, size):
                    consume[name].update(range(p * block, (p + 1) * block))
            for name, positions in region.per_channel:
                per_channel[name].update(source_indices(positions, off, size))
            for name, target, dim, positions in region.scales:
                factors[(name, target, dim)].update(source_indices(positions, off, size))
            for name, _first, _groups, positions in region.shuffles:
                moves[name].update(source_indices(positions, off, size))
            for name, _dim, positions in region.splits:
                moves[name].update(source_indices(positions, off, size))
    return consume, per_channel, factors, moves


def _rewrite_moves(gm: fx.GraphModule, space_gm: fx.GraphModule, moves: dict[str, set[int]], erased: set[str]) -> None:
    """Channel shuffles and splits whose input loses channels, rewritten for what is kept.

    A shuffle (view, transpose, view) becomes ``index_select`` of its input with the
    super-network's permutation restricted to the kept channels (a smaller count need
    not be a shuffle any more); a ``chunk`` / ``split`` becomes ``torch.split`` with
    each part's kept count.  The old nodes (and the size reads behind the views) die.
    """
    regions = [n.meta[REGION] for n in space_gm.graph.nodes if n.meta.get(REGION) is not None]
    shuffles = {name: (first, groups) for r in regions for name, first, groups, _ in r.shuffles}
    splits = {name: dim for r in regions for name, dim, _ in r.splits}
    nodes = {n.name: n for n in gm.graph.nodes}
    graph = gm.graph
    for name, drop in moves.items():
        if not drop or name in erased or name not in nodes:
            continue
        node = nodes[name]
        if name in shuffles:
            first_name, groups = shuffles[name]
            first = nodes[first_name]
            channels = first.meta[SHAPE][1] * first.meta[SHAPE][2]
            per_group = channels // groups
            new_index = {}
            for p in range(channels):
                if p not in drop:
                    new_index[p] = len(new_index)
            order = []
            for q in range(channels):  # output q reads input (q % groups) * per_group + q // groups
                p = (q % groups) * per_group + q // groups
                if p in new_index:
                    order.append(new_index[p])
            source = first.args[0]
            device = next(itertools.chain((t.device for t in gm.parameters()), (t.device for t in gm.buffers())),
                          torch.device("cpu"))
            keep_name = f"{name}_order"
            gm.register_buffer(keep_name, torch.tensor(order, dtype=torch.long, device=device))
            with graph.inserting_before(node):
                index = graph.get_attr(keep_name)
                picked = graph.call_function(torch.index_select, (source, 1, index))
            node.replace_all_uses_with(picked)
        else:
            dim = splits[name]
            parts = node.meta[SHAPE]
            bounds = [sum(part[dim] for part in parts[:i]) for i in range(len(parts) + 1)]
            sizes = [sum(1 for p in range(lo, hi) if p not in drop) for lo, hi in zip(bounds, bounds[1:])]
            with graph.inserting_before(node):
                parted = graph.call_function(torch.split, (node.args[0], sizes), {"dim": dim})
            node.replace_all_uses_with(parted)
            graph.erase_node(node)


def _head_cuts(space, ids, drops: dict[str, set[int]], consume: dict[str, set[int]], erased: set[str]) -> None:
    """The rows and columns of the heads that go with the removed ones (``SearchSpace.removed_heads``)."""
    removed = space.removed_heads(ids)
    for a in space.attentions:
        if a.node in erased:
            continue
        rows = {key: (stem, first) for key, stem, first in a.rows}
        for key, h in removed:
            if key not in rows:
                continue
            stem, first = rows[key]
            width = a.head_dim if key == a.q else a.kv_dim
            drops[stem].update(range(first + h * width, first + (h + 1) * width))
            if key == a.q:
                consume[a.out].update(range(h * a.head_dim, (h + 1) * a.head_dim))


def _rewrite_head_sizes(gm: fx.GraphModule, space, ids, erased: set[str]) -> None:
    """The head counts written in views, expands and reshapes (``fxoto.heads.HeadSize``), for the heads
    kept; with grouped-query attention that lost query heads of a kept key/value head, k's and v's
    repeated heads indexed down to the query heads kept."""
    removed = space.removed_heads(ids)
    if not removed:
        return
    nodes = {n.name: n for n in gm.graph.nodes}
    for attention in space.attentions:
        if attention.node in erased:
            continue
        for size in attention.sizes:
            if size.node in erased or size.node not in nodes or not removed.intersection(size.heads):
                continue
            node = nodes[size.node]
            args = list(node.args)
            count = size.block * sum(h not in removed for h in size.heads)
            if size.inner is None:
                args[size.position] = count
            else:
                args[size.position] = type(args[size.position])(
                    count if i == size.inner else n for i, n in enumerate(args[size.position]))
            node.args = tuple(args)
        if attention.split is not None and attention.split in nodes:  # a fused projection's split into q, k, v
            kept = {key: sum((key, h) not in removed for h in range(n))
                    for key, n in ((attention.q, len(attention.kv_of_query)),
                                   (attention.k, max(attention.kv_of_query) + 1),
                                   (attention.v, max(attention.kv_of_query) + 1))}
            split = nodes[attention.split]
            widths = [kept[attention.q] * attention.head_dim, kept[attention.k] * attention.kv_dim,
                      kept[attention.v] * attention.kv_dim]
            split.args = (split.args[0], widths, *split.args[2:])
        repeated = [i for j in sorted(set(attention.kv_of_query)) if (attention.k, j) not in removed
                    for i, jj in enumerate(attention.kv_of_query) if jj == j]
        kept = [at for at, i in enumerate(repeated) if (attention.q, i) not in removed]
        if len(kept) == len(repeated):
            continue
        for name in attention.repeats:
            node = nodes[name]
            with gm.graph.inserting_after(node):
                picked = gm.graph.call_function(operator.getitem, (node, (slice(None), kept)))
            node.replace_all_uses_with(picked, delete_user_cb=lambda user: user is not picked)


def _rewire_joint(graph: fx.Graph, node: fx.Node, erased: set[str]) -> list[fx.Node]:
    """Drop erased operands of a joint; a joint left with one input becomes that input.

    Returns the nodes that now read that input instead of the joint's fresh tensor.
    """
    rule = node.meta[RULE]
    inputs = node.args[0] if rule.joint is Joint.CAT else data_inputs(node)
    kept = [n for n in inputs if n.name not in erased]
    if not kept:
        return []  # every input erased: validity guarantees nothing live reads it; DCE drops it
    if len(kept) == 1:
        readers = list(node.users)
        node.replace_all_uses_with(kept[0])
        return readers
    if rule.joint is Joint.CAT:
        node.args = (kept,) + tuple(node.args[1:])
        return []
    with graph.inserting_after(node):
        total = kept[0]
        for operand in kept[1:]:
            total = graph.call_function(operator.add, (total, operand))
    node.replace_all_uses_with(total)
    return []


def _in_place(node: fx.Node, gm: fx.GraphModule) -> bool:
    if node.op == "call_function":
        return node.target is operator.iadd or node.kwargs.get("inplace") is True
    if node.op == "call_method":
        return node.target.endswith("_")
    if node.op == "call_module":
        return getattr(gm.get_submodule(node.target), "inplace", False) is True
    return False


_VIEWS = {"view", "reshape", "flatten", "permute", "transpose", "squeeze", "unsqueeze", "expand", "narrow",
          "chunk", "split", "contiguous", "view_as", "t"}


_ALIASING_MODULES = (nn.Identity, nn.Flatten, nn.Unflatten, nn.modules.dropout._DropoutNd)


def _may_alias(node: fx.Node, gm: fx.GraphModule) -> bool:
    """The node's value may share memory with another tensor (a view, an item of a
    split, or a module that returns its input as it is, like dropout in eval mode)."""
    if node.op == "call_method":
        return node.target in _VIEWS
    if node.op == "call_function":
        return node.target is operator.getitem or getattr(node.target, "__name__", "") in _VIEWS
    return node.op == "call_module" and isinstance(gm.get_submodule(node.target), _ALIASING_MODULES)


def _out_of_place(gm: fx.GraphModule, readers: list[fx.Node]) -> None:
    """In-place readers of a vanished joint become out-of-place where that matters.

    A joint that vanished hands its input straight to its readers: an in-place
    ReLU there, harmless on the joint's fresh tensor, would now mutate a tensor
    that others may still read.  Every other in-place op is left as the
    super-network has it (same values, no extra memory traffic).
    """
    alive = set(gm.graph.nodes)
    for node in readers:
        if node not in alive or not _in_place(node, gm) or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        source = node.args[0]
        if len(source.users) == 1 and source.op != "placeholder" and not _may_alias(source, gm):
            continue
        if node.op == "call_function" and node.target is operator.iadd:
            node.target = operator.add
        elif node.op == "call_function":
            node.kwargs = {**node.kwargs, "inplace": False}
        elif node.op == "call_method":
            node.target = node.target[:-1]
        else:
            module = copy.deepcopy(gm.get_submodule(node.target))
            module.inplace = False
            name = f"{node.target.replace('.', '_')}_out_of_place"
            gm.add_submodule(name, module)
            node.target = name


def construct_subnet(space, ids=None) -> fx.GraphModule:
    """A new GraphModule with the groups ``ids`` (default: every zero group) erased.

    Raises ``InvalidRemovalError`` naming the joint when erasing them would
    leave the graph invalid (DESIGN section 4).
    """
    ids = space.zero_groups() if ids is None else sorted(set(ids))
    space.check_removal(ids)
    erased = _erased_nodes(space, ids)
    consume, per_channel, factors, moves = _removed_features(space.gm, erased)
    drops = _channel_drops(space, ids)
    _slim(space, ids, erased, consume, per_channel)
    _head_cuts(space, ids, drops, consume, erased)

    sub = _copy_sharing_tensors(space.gm)
    for node in sub.graph.nodes:  # a tensor made in forward is an attribute of the copy: read (and sliced) there alone
        if node.op == "get_attr":
            node.meta.pop(CONSTANT, None)
    nodes = {n.name: n for n in sub.graph.nodes}
    for stem, drop in drops.items():  # once per module: a shared stem's calls all read its rows
        if any(name not in erased for name in (stem, *space.layers[stem].again)):
            _slice_stem(sub, nodes[stem], drop)
    _slice_consumers(sub, consume, erased)
    _slice_factors(sub, factors, erased)
    nodes = {n.name: n for n in sub.graph.nodes}
    norms = {name: drop for name, drop in per_channel.items() if nodes[name].target is rms_norm}
    for name, drop in _per_module(sub, {k: v for k, v in per_channel.items() if k not in norms}, erased).items():
        _slice_per_channel(sub, nodes[name], drop)
    for name, drop in norms.items():
        if name not in erased:
            _slice_rms_norm(sub, nodes[name], drop)
    _rewrite_moves(sub, space.gm, moves, erased)
    _rewrite_head_sizes(sub, space, ids, erased)
    readers: list[fx.Node] = []
    for node in list(sub.graph.nodes):
        rule = node.meta.get(RULE)
        if rule is not None and rule.joint is not None and node.name not in erased:
            if any(n.name in erased for n in data_inputs(node)):
                readers += _rewire_joint(sub.graph, node, erased)
    for name in reversed(list(nodes)):  # users before producers
        node = nodes[name]
        if name in erased and node.op != "placeholder" and not node.users:
            sub.graph.erase_node(node)
    sub.graph.eliminate_dead_code()
    _out_of_place(sub, readers)
    sub.delete_all_unused_submodules()
    _drop_unread_tensors(sub)
    _own_tensors(sub, space.gm)
    sub.graph.lint()
    sub.recompile()
    _check(sub, space, ids)
    return sub


def _check(sub: fx.GraphModule, space, ids: list[int]) -> None:
    """Raise ``SubnetCheckError`` unless the sub-network runs on the example inputs' shapes and
    gives the super-network's output shapes, with no tensor emptied that was not empty.

    The shapes go through on the ``meta`` device (``fxoto.shapes``: no arithmetic), so the check
    costs little; the sub-network's ``node.meta["shape"]`` are its own afterwards.  Every failure
    is a bug in the rewrite, never the user's.
    """
    failed = propagate_again(sub.graph, sub)
    if failed is not None:
        node, error = failed
        where = describe(node, sub) if node is not None else "its inputs"
        raise SubnetCheckError(_failed(space, ids, f"it fails at {where}: {type(error).__name__}: {error}")) from error
    before = {n.name: n.meta.get(SHAPE) for n in space.gm.graph.nodes}
    for node in sub.graph.nodes:
        shape, old = node.meta.get(SHAPE), before.get(node.name)
        if node.op == "output" and shape != old:
            raise SubnetCheckError(_failed(space, ids, f"its output has shape {_text(shape)}, the super-network's "
                                                       f"{_text(old)}"))
        if isinstance(shape, torch.Size) and 0 in shape and isinstance(old, torch.Size) and 0 not in old:
            raise SubnetCheckError(_failed(space, ids, f"{describe(node, sub)} is left with shape {list(shape)}, "
                                                       f"an empty tensor (the super-network's: {list(old)})"))


def _text(shape) -> str:
    return str(list(shape)) if isinstance(shape, torch.Size) else str(shape)


def _failed(space, ids: list[int], what: str) -> str:
    named = ", ".join(str(space.groups[i]) for i in ids[:4]) + (", ..." if len(ids) > 4 else "")
    return (f"the sub-network fxoto wrote for erasing groups {ids} ({named}) is broken: {what}. This is a bug in "
            f"fxoto's rewrite, not in the model; the super-network is untouched. Keep these groups (erase others), "
            f"and please report it with the model.")


def _drop_unread_tensors(sub: fx.GraphModule) -> None:
    """Delete the parameters and buffers that no node reads any more: an erased group's bias table
    read by indexing (``biases[:, idxs]``) belongs to a module that stays, holding layers that are
    called, so ``delete_all_unused_submodules`` keeps it, and every tensor of its own with it."""
    read: set[int] = set()
    for node in sub.graph.nodes:
        if node.op == "get_attr":
            read.add(id(fetch_attr(sub, node.target)))
        elif node.op == "call_module":
            module = sub.get_submodule(node.target)
            read.update(id(t) for t in itertools.chain(module.parameters(), module.buffers()))
    for module in sub.modules():
        for name, t in [*module._parameters.items(), *module._buffers.items()]:
            if t is not None and id(t) not in read:
                delattr(module, name)


def _copy_sharing_tensors(gm: fx.GraphModule) -> fx.GraphModule:
    """A deep copy of ``gm`` that still holds its parameters and buffers: the slicing replaces
    most of them with smaller ones, so copying them first would copy most of the model for
    nothing (vit_h_14: 2.5 GB).  ``_own_tensors`` copies the ones left.  Nothing here writes
    into a tensor in place, so the super-network is never touched."""
    memo = {id(t): t for t in itertools.chain(gm.parameters(), gm.buffers())}
    return copy.deepcopy(gm, memo)


def _own_tensors(sub: fx.GraphModule, gm: fx.GraphModule) -> None:
    """Give ``sub`` its own copy of every parameter and buffer it still shares with ``gm``,
    one copy per tensor, so that weights shared inside the network stay shared."""
    theirs = {id(t) for t in itertools.chain(gm.parameters(), gm.buffers())}
    copies: dict[int, torch.Tensor] = {}
    for module in sub.modules():
        for table in (module._parameters, module._buffers):
            for name, t in table.items():
                if t is not None and id(t) in theirs:
                    if id(t) not in copies:
                        fresh = t.detach().clone()
                        copies[id(t)] = nn.Parameter(fresh, t.requires_grad) if isinstance(t, nn.Parameter) else fresh
                    table[name] = copies[id(t)]
