"""How one layer or weight is cut: the slicing the rewrite (``fxoto.subnet``) and the in-place
construction (``fxoto.inplace``) share.

Each function takes the module tree that owns the graph's targets (a ``GraphModule`` copy of
the super-network, or the user's model itself) and cuts one thing: a stem's output rows
(``_slice_stem``), a reader's input columns (``_slice_consumers``, per call site where a weight
is read at several places), a per-channel module's entries (``_slice_per_channel``), an RMSNorm
over a slimmed stream (``_slice_rms_norm``: its denominator kept, DESIGN 6b), the per-channel
factors of products (``_slice_factors``).  New, smaller tensors replace the old ones; nothing is
written in place, so the super-network stays as it was.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from fxoto.errors import InvalidRemovalError
from fxoto.roles import is_transposed_linear
from fxoto.segments import RULE


def _slice_stem(gm: fx.GraphModule, node: fx.Node, drop: set[int]) -> None:
    """Drop a stem's output channels: its weight rows and bias entries (a grouped
    convolution loses whole groups, its input channels with them)."""
    module = gm.get_submodule(node.target)
    if isinstance(module, nn.Embedding):  # weight [rows, channels]
        keep = _keep(module.embedding_dim, drop, module.weight.device)
        _slice_param(module, "weight", 1, keep)
        module.embedding_dim = len(keep)
        return
    if is_transposed_linear(module):  # weight [in, out]
        keep = _keep(module.nf, drop, module.weight.device)
        _slice_param(module, "weight", 1, keep)
        _slice_param(module, "bias", 0, keep)
        module.nf = len(keep)
        return
    transposed = isinstance(module, nn.modules.conv._ConvTransposeNd)  # weight [in, out, ...]
    keep = _keep(module.weight.shape[1 if transposed else 0], drop, module.weight.device)
    _slice_param(module, "weight", 1 if transposed else 0, keep)
    _slice_param(module, "bias", 0, keep)
    if isinstance(module, nn.Linear):
        module.out_features = len(keep)
        return
    if module.groups > 1:
        module.groups = len(keep) // (module.out_channels // module.groups)
        module.in_channels = module.groups * module.weight.shape[1]
    module.out_channels = len(keep)


def _keep(n: int, drop: set[int], device: torch.device) -> torch.Tensor:
    """Indices ``0..n-1`` without ``drop``, on ``device`` (that of the tensor they index)."""
    mask = torch.ones(n, dtype=torch.bool, device=device)
    mask[sorted(drop)] = False
    return mask.nonzero().flatten()


def _slice_param(owner: nn.Module, name: str, dim: int, keep: torch.Tensor) -> None:
    old = getattr(owner, name)
    if old is None:
        return
    new = old.detach().index_select(dim, keep.to(old.device))  # new memory: no clone
    if isinstance(old, nn.Parameter):
        setattr(owner, name, nn.Parameter(new, requires_grad=old.requires_grad))
    else:
        setattr(owner, name, new)


def _weight_of(gm: fx.GraphModule, node: fx.Node) -> tuple[str, str]:
    """(owner path, attribute) of the weight a consumer stem reads."""
    if node.op == "call_module":
        return node.target, "weight"
    owner, _, attr = node.args[1].target.rpartition(".")  # F.conv2d(x, weight, ...) / F.linear(x, weight, ...)
    return owner, attr


def _sites(gm: fx.GraphModule) -> dict[tuple[str, str], list[fx.Node]]:
    """Every node that reads each (owner, attribute) weight: the call sites of a module, the users of a get_attr."""
    found: dict[tuple[str, str], list[fx.Node]] = defaultdict(list)
    for node in gm.graph.nodes:
        if node.op == "call_module":
            found[(node.target, "weight")].append(node)
        elif node.op == "get_attr":
            owner, _, attr = node.target.rpartition(".")
            found[(owner, attr)].extend(node.users)
    return found


def _slice_consumers(gm: fx.GraphModule, consume: dict[str, set[int]], erased: set[str]) -> None:
    """Drop the erased input features from each consumer stem's weight.

    A weight read at several places (a module called twice, weight sharing)
    is sliced in place when every place drops the same features; otherwise it
    stays whole and shared, and each place that drops features reads its own
    slice of it, ``torch.index_select(weight, dim, keep)``, so that the
    sub-network keeps the super-network's sharing.
    """
    nodes = {n.name: n for n in gm.graph.nodes}
    sites = _sites(gm)
    done: set[tuple[str, str]] = set()
    for name in consume:
        if name in erased:
            continue
        key = _weight_of(gm, nodes[name])
        if key in done:
            continue
        done.add(key)
        live = [n for n in dict.fromkeys(sites[key]) if n.name not in erased]
        drops = {n.name: frozenset(consume.get(n.name, ())) for n in live}
        if len(set(drops.values())) == 1:
            _slice_in_place(gm, nodes[name], consume[name])
        else:
            for n in live:
                if drops[n.name]:
                    _slice_at_site(gm, n, drops[n.name])


def _slice_in_place(gm: fx.GraphModule, node: fx.Node, drop: set[int]) -> None:
    dim = node.meta[RULE].weight_in_dim
    owner_path, attr = _weight_of(gm, node)
    owner = gm.get_submodule(owner_path)
    weight = getattr(owner, attr)
    keep = _keep(weight.shape[dim], drop, weight.device)
    _slice_param(owner, attr, dim, keep)
    if node.op == "call_module":
        if is_transposed_linear(owner):
            owner.nx = len(keep)
        elif isinstance(owner, nn.Linear):
            owner.in_features = len(keep)
        else:
            owner.in_channels = len(keep)


_FUNCTIONAL = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}


_FUNCTIONAL_T = {nn.ConvTranspose1d: F.conv_transpose1d, nn.ConvTranspose2d: F.conv_transpose2d,
                 nn.ConvTranspose3d: F.conv_transpose3d}


def _functional_call(graph: fx.Graph, m: nn.Module, node: fx.Node, weight: fx.Node, path: str) -> fx.Node:
    """``m(x)`` with ``weight`` instead of ``m.weight``: what the module's own ``forward`` computes."""
    x = node.args[0]
    bias = graph.get_attr(f"{path}.bias") if m.bias is not None else None
    if isinstance(m, nn.Linear):
        return graph.call_function(F.linear, (x, weight, bias))
    if type(m) in _FUNCTIONAL:
        padding = m.padding
        if m.padding_mode != "zeros":  # as _ConvNd._conv_forward: pad first, then no padding
            x = graph.call_function(F.pad, (x, m._reversed_padding_repeated_twice), {"mode": m.padding_mode})
            padding = 0
        return graph.call_function(_FUNCTIONAL[type(m)], (x, weight, bias, m.stride, padding, m.dilation, m.groups))
    if type(m) in _FUNCTIONAL_T and len(node.args) == 1 and not node.kwargs:  # no output_size given
        return graph.call_function(_FUNCTIONAL_T[type(m)], (x, weight, bias, m.stride, m.padding,
                                                            m.output_padding, m.groups, m.dilation))
    raise InvalidRemovalError(
        f"node '{node.name}' calls module '{path}' ({type(m).__name__}), which is called at several places that "
        f"read different channels; fxoto slices such a shared module per call site only for Linear, Conv and "
        f"ConvTranspose. Keep the groups that feed it (do not zero them), or give each call site its own module."
    )


def _slice_at_site(gm: fx.GraphModule, node: fx.Node, drop: frozenset[int]) -> None:
    """One call site of a shared weight reads ``index_select(weight, dim, keep)`` (a buffer of the sub-network)."""
    dim = node.meta[RULE].weight_in_dim
    owner_path, attr = _weight_of(gm, node)
    owner = gm.get_submodule(owner_path)
    weight = getattr(owner, attr)
    keep_name = f"{node.name}_keep"
    gm.register_buffer(keep_name, _keep(weight.shape[dim], drop, weight.device))
    graph = gm.graph
    with graph.inserting_before(node):
        keep = graph.get_attr(keep_name)
        full = graph.get_attr(f"{owner_path}.{attr}" if owner_path else attr)
        sliced = graph.call_function(torch.index_select, (full, dim, keep))
        if node.op != "call_module":
            node.args = (node.args[0], sliced, *node.args[2:])
            return
        call = _functional_call(graph, owner, node, sliced, owner_path)
    call.meta = dict(node.meta)
    node.replace_all_uses_with(call)
    graph.erase_node(node)


def _slice_factors(gm: fx.GraphModule, factors: dict[tuple[str, str, int], set[int]], erased: set[str]) -> None:
    """Slice the per-channel factors of products (``cat(...) * gamma``) with the channels.

    As for a shared weight: in place when every live reader drops the same
    channels, else each product that drops channels reads ``index_select``.
    """
    nodes = {n.name: n for n in gm.graph.nodes}
    sites = _sites(gm)
    drops_of: dict[tuple[str, str], dict[str, tuple[int, frozenset[int]]]] = defaultdict(dict)
    for (name, target, dim), drop in factors.items():
        if name not in erased:
            owner, _, attr = target.rpartition(".")
            drops_of[(owner, attr)][name] = (dim, frozenset(drop))
    for (owner_path, attr), drops in drops_of.items():
        live = [n for n in dict.fromkeys(sites[(owner_path, attr)]) if n.name not in erased]
        owner = gm.get_submodule(owner_path)
        value = getattr(owner, attr)
        if len({drops.get(n.name) for n in live}) == 1:
            dim, drop = next(iter(drops.values()))
            _slice_param(owner, attr, dim, _keep(value.shape[dim], drop, value.device))
            continue
        for name, (dim, drop) in drops.items():
            node = nodes[name]
            keep_name = f"{name}_keep"
            gm.register_buffer(keep_name, _keep(value.shape[dim], drop, value.device))
            with gm.graph.inserting_before(node):
                keep = gm.graph.get_attr(keep_name)
                full = gm.graph.get_attr(f"{owner_path}.{attr}" if owner_path else attr)
                sliced = gm.graph.call_function(torch.index_select, (full, dim, keep))
            old = next(a for a in node.all_input_nodes if a.op == "get_attr" and a.target == full.target)
            node.replace_input_with(old, sliced)


def _per_module(gm: fx.GraphModule, per_channel: dict[str, set[int]], erased: set[str]) -> dict[str, set[int]]:
    """The per-channel drops by module, at one of its calls: a module called at several places
    (its calls' channels coupled by ``fxoto.channels``) is sliced once, when any call of it lives."""
    calls: dict[str, list[str]] = defaultdict(list)
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target].append(node.name)
    nodes = {n.name: n for n in gm.graph.nodes}
    at: dict[str, str] = {}
    drops: dict[str, set[int]] = defaultdict(set)
    for name, drop in per_channel.items():
        target = nodes[name].target
        if any(call not in erased for call in calls[target]):
            drops[at.setdefault(target, name)] |= drop
    return drops


def _slice_per_channel(gm: fx.GraphModule, node: fx.Node, drop: set[int]) -> None:
    module = gm.get_submodule(node.target)
    if isinstance(module, nn.modules.conv._ConvNd):  # depthwise: one filter per channel
        keep = _keep(module.out_channels, drop, module.weight.device)
        for name in ("weight", "bias"):
            _slice_param(module, name, 0, keep)
        module.in_channels = module.out_channels = module.groups = len(keep)
        return
    if isinstance(module, nn.PReLU):
        keep = _keep(module.num_parameters, drop, module.weight.device)
        _slice_param(module, "weight", 0, keep)
        module.num_parameters = len(keep)
        return
    tensors = [t for t in (module.weight, getattr(module, "running_mean", None)) if t is not None]
    device = tensors[0].device if tensors else torch.device("cpu")
    if isinstance(module, nn.GroupNorm):  # whole groups go (fxoto.channels ties them)
        keep = _keep(module.num_channels, drop, device)
        for name in ("weight", "bias"):
            _slice_param(module, name, 0, keep)
        module.num_groups = len(keep) // (module.num_channels // module.num_groups)
        module.num_channels = len(keep)
        return
    keep = _keep(module.num_features, drop, device)
    for name in ("weight", "bias", "running_mean", "running_var"):
        _slice_param(module, name, 0, keep)
    module.num_features = len(keep)


def _slice_rms_norm(gm: fx.GraphModule, node: fx.Node, drop: set[int]) -> None:
    """An RMSNorm over channels of which ``drop`` are zero: with N' of its N channels left, weight times
    sqrt(N/N') and eps times N/N' give each kept channel exactly what it was (DESIGN 6b)."""
    x, weight_node, eps, dtype = node.args
    n, kept = _cut_rms_weight(gm, weight_node.target, drop)
    node.args = (x, weight_node, eps * (n / kept), dtype)


def _cut_rms_weight(root: nn.Module, target: str, drop: set[int]) -> tuple[int, int]:
    """An RMSNorm's weight (at ``target`` in ``root``) without the ``drop`` entries, times sqrt(N/N'); (N, N')."""
    owner_path, _, attr = target.rpartition(".")
    owner = root.get_submodule(owner_path)
    weight = getattr(owner, attr)
    n = weight.shape[0]
    keep = _keep(n, drop, weight.device)
    with torch.no_grad():
        kept = weight.index_select(0, keep) * ((n / len(keep)) ** 0.5)
    setattr(owner, attr, nn.Parameter(kept, weight.requires_grad))
    return n, len(keep)
