"""Step 5 of the pipeline: the sub-network as a torch.fx rewrite (paper 3.3; DESIGN 6).

``construct_subnet(space)`` erases every GeZIG that is exactly zero:

1. the joints lose the erased operands: an ``add`` sums the others, a ``cat``
   concatenates the others;
2. what read the erased channels is sliced: after a ``cat``, the stems'
   input features (conv / linear weight columns, following flattens) and the
   per-channel variables and statistics on the way (batch norm);
3. a joint left with one input becomes that input, vertices that no longer
   reach the output go (dead-code elimination), in-place ops whose input
   others also read become out-of-place (an ``add`` that vanished must not
   let a later in-place op mutate a tensor that others read), then ``lint()``
   and ``recompile()``.

The result owns fresh, smaller parameters; the super-network is not touched.
"""

from __future__ import annotations

import copy
import operator
from collections import defaultdict

import torch
import torch.fx as fx
from torch import nn

from fxoto.roles import Joint
from fxoto.segments import REGION, RULE, ChannelRegion, data_inputs


def _erased_nodes(space, ids) -> set[str]:
    return {name for i in ids for name in space.groups[i].nodes}


def _removed_features(gm: fx.GraphModule, erased: set[str]):
    """Original input-feature indices to drop, per consumer stem and per per-channel node."""
    consume: dict[str, set[int]] = defaultdict(set)
    per_channel: dict[str, set[int]] = defaultdict(set)
    for cat in gm.graph.nodes:
        region: ChannelRegion | None = cat.meta.get(REGION)
        if region is None or cat.name in erased:
            continue
        for src, off, size in zip(cat.args[0], region.offsets, region.sizes):
            if src.name not in erased:
                continue
            for name, block, shift in region.consumers:
                lo = (shift + off) * block
                consume[name].update(range(lo, lo + size * block))
            for name, shift in region.per_channel:
                per_channel[name].update(range(shift + off, shift + off + size))
    return consume, per_channel


def _keep(n: int, drop: set[int]) -> torch.Tensor:
    mask = torch.ones(n, dtype=torch.bool)
    mask[sorted(drop)] = False
    return mask.nonzero().flatten()


def _slice_param(owner: nn.Module, name: str, dim: int, keep: torch.Tensor) -> None:
    old = getattr(owner, name)
    if old is None:
        return
    new = old.detach().index_select(dim, keep).clone()
    if isinstance(old, nn.Parameter):
        setattr(owner, name, nn.Parameter(new, requires_grad=old.requires_grad))
    else:
        setattr(owner, name, new)


def _slice_consumer(gm: fx.GraphModule, node: fx.Node, drop: set[int]) -> None:
    rule = node.meta[RULE]
    dim = rule.weight_in_dim
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        keep = _keep(module.weight.shape[dim], drop)
        _slice_param(module, "weight", dim, keep)
        if isinstance(module, nn.Linear):
            module.in_features = len(keep)
        else:
            module.in_channels = len(keep)
        return
    weight = node.args[1]  # F.conv2d(x, weight, ...) / F.linear(x, weight, ...)
    owner_path, _, attr = weight.target.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    keep = _keep(getattr(owner, attr).shape[dim], drop)
    _slice_param(owner, attr, dim, keep)


def _slice_per_channel(gm: fx.GraphModule, node: fx.Node, drop: set[int]) -> None:
    module = gm.get_submodule(node.target)
    if isinstance(module, nn.PReLU):
        keep = _keep(module.num_parameters, drop)
        _slice_param(module, "weight", 0, keep)
        module.num_parameters = len(keep)
        return
    keep = _keep(module.num_features, drop)
    for name in ("weight", "bias", "running_mean", "running_var"):
        _slice_param(module, name, 0, keep)
    module.num_features = len(keep)


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
    consume, per_channel = _removed_features(space.gm, erased)

    sub = copy.deepcopy(space.gm)
    nodes = {n.name: n for n in sub.graph.nodes}
    for name, drop in consume.items():
        if name not in erased:
            _slice_consumer(sub, nodes[name], drop)
    for name, drop in per_channel.items():
        if name not in erased:
            _slice_per_channel(sub, nodes[name], drop)
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
    sub.graph.lint()
    sub.recompile()
    return sub
