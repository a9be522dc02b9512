"""Slim operations, first slice: channel groups beside the GeZIGs (issue 11; DESIGN 7).

``find_channel_groups`` forms one group per output channel of a stem (a
``Conv1d/2d/3d`` with ``groups=1`` or a ``Linear``, called once) whose output
reaches, through per-channel accessories only, stems that read it:

* on the way: zero-preserving elementwise ops and pooling (ReLU, dropout,
  max / average pooling), per-channel modules (batch norm with affine
  variables, per-channel PReLU, depthwise convolutions) and a flatten into a
  linear layer (one channel is then a block of columns);
* at the end: convolution modules with ``groups=1``, transposed ones included,
  and linear modules, whose input columns the rewrite drops.

Channel ``c``'s group holds the stem's weight row ``c`` and bias ``c`` and
entry ``c`` of every per-channel variable on the way (a batch norm's weight
and bias): zero together, channel ``c`` is exactly zero wherever it goes, so
the consumers' columns ``c`` can go too.  Zero-invariance is checked along
the walk with the op table, as for GeZIGs; a layer whose channels go anywhere
else (a joint, an unknown op, the graph output, a GroupNorm, a grouped
convolution) is set aside in ``SearchSpace.excluded`` with the reason, one
entry per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx
from torch import nn

from fxoto.roles import Channel, Role, Zero
from fxoto.segments import LIVE, RULE, _flatten_block, _reduce_dims, data_inputs, own_parameters, users
from fxoto.shapes import SHAPE, submodule
from fxoto.space import Exclusion, GeZIG, Member, _numel


@dataclass(frozen=True)
class ChannelLayer:
    """A stem whose output channels are groups, and what the rewrite slices with them.

    ``per_channel``: the per-channel modules on the way (their variables and
    statistics are sliced); ``consumers``: the stems that read the channels, with
    the number of input columns per channel (1, or H*W after a flatten).
    """

    stem: str
    channels: int
    per_channel: tuple[str, ...]
    consumers: tuple[tuple[str, int], ...]


class _NotFollowed(Exception):
    pass


_PER_CHANNEL_MODULES = (nn.modules.batchnorm._BatchNorm, nn.PReLU, nn.modules.conv._ConvNd)


def _what(node: fx.Node, root: nn.Module) -> str:
    if node.op == "call_module":
        return f"'{node.name}' ({type(submodule(root, node.target)).__name__})"
    return f"'{node.name}' ({getattr(node.target, '__name__', node.target)})"


def _stem_problem(node: fx.Node, root: nn.Module) -> str | None:
    """Why this stem's output channels are no groups in this slice (None: they may be)."""
    if node.op != "call_module":
        return "a functional stem: only Conv and Linear modules are slimmed in this first slice"
    m = submodule(root, node.target)
    if not isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)):
        return f"a stem of type {type(m).__name__}: only Conv and Linear modules are slimmed in this first slice"
    if isinstance(m, nn.modules.conv._ConvTransposeNd):
        return "a transposed convolution: its output channels are not grouped in this first slice"
    if isinstance(m, nn.modules.conv._ConvNd) and m.groups != 1:
        return f"a grouped convolution (groups={m.groups}): its output channels are not grouped in this first slice"
    if isinstance(m, nn.Linear) and len(node.meta[SHAPE]) != 2:
        return "a linear layer over more than 2 dims: its features are not on dim 1"
    return None


def _follow(stem: fx.Node, root: nn.Module, channels: int) -> tuple[list[fx.Node], list[tuple[fx.Node, int]]]:
    """Walk the stem's channels to the stems that read them; raise ``_NotFollowed`` with the reason."""
    per_channel: list[fx.Node] = []
    consumers: list[tuple[fx.Node, int]] = []
    seen: set[fx.Node] = set()
    stack = [(u, stem, 1) for u in users(stem)]
    while stack:
        node, prev, block = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op == "output":
            raise _NotFollowed("its channels reach the graph output")
        rule = node.meta.get(RULE)
        what = _what(node, root)
        if rule is None or rule.role is Role.UNKNOWN:
            raise _NotFollowed(f"its channels reach {what}, which fxoto cannot follow (unknown op)")
        if rule.role is Role.JOINT:
            raise _NotFollowed(f"its channels reach the joint {what}: channels coupled through joints are not "
                               f"grouped in this first slice")
        if data_inputs(node) != [prev]:
            raise _NotFollowed(f"its channels reach {what}, which reads other data too")
        if rule.channel is Channel.CONSUME:
            consumer = submodule(root, node.target) if node.op == "call_module" else None
            if not isinstance(consumer, (nn.Linear, nn.modules.conv._ConvNd)):
                raise _NotFollowed(f"its channels reach the stem {what}, whose input columns are sliced only for "
                                   f"Conv and Linear modules in this first slice")
            if node.args[0] is not prev:
                raise _NotFollowed(f"its channels reach {what} other than as its input")
            if rule.reads == -1 and len(prev.meta[SHAPE]) != 2:
                raise _NotFollowed(f"its channels reach the linear layer {what} along a dim other than the last")
            if rule.reads == 1 and block != 1:
                raise _NotFollowed(f"its channels reach {what} after a flatten")
            consumers.append((node, block))
            continue
        if rule.role is Role.STEM and rule.channel is Channel.OPAQUE:
            raise _NotFollowed(f"its channels reach {what}, a grouped convolution (or a stem whose input "
                               f"channels fxoto does not slice)")
        if rule.zero is Zero.BREAKS:
            raise _NotFollowed(f"not zero-invariant: {what} does not map zero to zero")
        if rule.zero is Zero.OWN_VARIABLES and rule.channel is not Channel.PER_CHANNEL:
            raise _NotFollowed(f"not zero-invariant: {what} maps zero to zero only when its own variables are "
                               f"zero, and they are not per channel")
        if rule.channel is Channel.PER_CHANNEL:
            module = submodule(root, node.target) if node.op == "call_module" else None
            if not isinstance(module, _PER_CHANNEL_MODULES) or block != 1:
                raise _NotFollowed(f"its channels reach the per-channel op {what}, which is not sliced in this slice")
            per_channel.append(node)
        elif rule.channel is Channel.FLATTEN:
            b = _flatten_block(prev.meta[SHAPE], node.meta[SHAPE], 1)
            if b is None:
                raise _NotFollowed(f"its channels reach {what}, which does not flatten from dim 1")
            block *= b
        elif rule.channel is Channel.REDUCE:
            reduced = _reduce_dims(node, len(prev.meta[SHAPE]))
            if reduced is None or 1 in reduced[0] or block != 1:
                raise _NotFollowed(f"its channels reach {what}, which reduces the channel dim")
        elif rule.channel not in (Channel.ELEMENTWISE, Channel.SPATIAL):
            raise _NotFollowed(f"its channels cannot be followed through {what}")
        elif rule.role is not Role.ACCESSORY or (node.op != "call_module" and own_parameters(node, root)):
            raise _NotFollowed(f"its channels reach {what}, which has variables of its own")
        shape = node.meta[SHAPE]
        if len(shape) < 2 or shape[1] != channels * block:
            raise _NotFollowed(f"its channels are not on dim 1 at {what}")
        stack.extend((u, node, block) for u in users(node))
    return per_channel, consumers


def find_channel_groups(
    graph: fx.Graph, root: nn.Module, first_id: int, taken: set[str]
) -> tuple[list[GeZIG], list[Exclusion], dict[str, ChannelLayer]]:
    """One group per output channel of every stem whose channels can be followed (see module docstring).

    Ids start at ``first_id`` (the operation groups come first).  ``taken``: nodes of
    operation groups; a stem or per-channel module among them is set aside, so that
    the groups of both kinds stay disjoint (H2SPG moves each variable for one group).
    """
    users_of_param: dict[int, set[str]] = {}
    for node in graph.nodes:
        if node.op in ("call_module", "call_function", "call_method"):
            for _, p in own_parameters(node, root):
                users_of_param.setdefault(id(p), set()).add(node.name)

    groups: list[GeZIG] = []
    excluded: list[Exclusion] = []
    layers: dict[str, ChannelLayer] = {}
    for stem in graph.nodes:
        rule = stem.meta.get(RULE)
        if rule is None or rule.role is not Role.STEM or not stem.meta.get(LIVE) or not own_parameters(stem, root):
            continue
        if rule.channel is Channel.PER_CHANNEL:
            continue  # a depthwise convolution: per-channel on the way of the stem before it
        problem = _stem_problem(stem, root)
        channels = 0
        per_channel: list[fx.Node] = []
        consumers: list[tuple[fx.Node, int]] = []
        if problem is None:
            channels = submodule(root, stem.target).weight.shape[0]
            try:
                per_channel, consumers = _follow(stem, root, channels)
            except _NotFollowed as why:
                problem = str(why)
        if problem is None and not consumers:
            problem = "its channels reach no stem"
        holders = [stem, *per_channel]
        if problem is None:
            inside = next((n.name for n in holders if n.name in taken), None)
            if inside is not None:
                problem = (f"node '{inside}' lies in an operation group: kept whole so that the groups of both "
                           f"kinds stay disjoint (first slice)")
        members_of: list[tuple[str, nn.Parameter]] = [] if problem else [
            (name, p) for n in holders for name, p in own_parameters(n, root)
            if n is stem or n.meta[RULE].zero is Zero.OWN_VARIABLES
        ]
        for holder in [] if problem else holders:  # sliced in place: used by nothing else
            for name, p in own_parameters(holder, root):
                if users_of_param[id(p)] != {holder.name} and problem is None:
                    problem = (f"shared variables: parameter '{name}' is also used by node "
                               f"'{sorted(users_of_param[id(p)] - {holder.name})[0]}'")
        if problem is None:
            shared = next((n for n, _ in consumers if users_of_param.get(id(_weight(n, root)), {n.name}) != {n.name}),
                          None)
            if shared is not None:
                problem = f"its channels reach '{shared.name}', whose weight is shared with other nodes"
        if problem is not None:
            excluded.append(Exclusion((stem.name,), f"channels: {problem}"))
            continue
        params = dict(members_of)
        for c in range(channels):
            members = tuple(Member(name, 0, c, c + 1) for name, _ in members_of)
            groups.append(GeZIG(first_id + len(groups), -1, tuple(n.name for n in holders), members,
                                _numel(list(members), params), kind="channel"))
        layers[stem.name] = ChannelLayer(stem.name, channels, tuple(n.name for n in per_channel),
                                         tuple((n.name, b) for n, b in consumers))
    return groups, excluded, layers


def _weight(node: fx.Node, root: nn.Module):
    if node.op == "call_module":
        return submodule(root, node.target).weight
    return None
