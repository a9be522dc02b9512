"""Pass 1 of the channel groups (``fxoto.channels``): the channel spaces of a graph.

``_Walk`` visits the graph in order and puts every tensor whose channel ``c`` is the
same channel into one space (a union-find over spaces): a stem's output and what keeps
its channels in place (elementwise ops, pooling, flatten, per-channel modules, ``add``
joints, gates, gated products, RMSNorms, an embedding's columns).  It records what pass
2 joins at the level of single channels (concat offsets, group norms, grouped
convolutions), which stems make rows, which nodes hold per-channel entries and which
read the channels as columns, and taints a space whose channels go where fxoto cannot
follow them, with the reason.  See ``fxoto.channels`` for the whole method.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch
import torch.fx as fx
from torch import nn

from fxoto.patterns import rms_norm
from fxoto.roles import FACTORS, Channel, Joint, Role, Zero, is_transposed_linear
from fxoto.segments import (LIVE, RULE, _factor_channel, _flatten_block, _reduce_dims, data_inputs, is_data,
                            own_parameters, users)
from fxoto.shapes import SHAPE, submodule

_CATS = (torch.cat, torch.concat, torch.concatenate)


class _UnionFind:
    def __init__(self) -> None:
        self.parent: list[int] = []

    def add(self, n: int) -> int:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return start

    def find(self, i: int) -> int:
        parent = self.parent
        root = i
        while parent[root] != root:
            root = parent[root]
        while parent[i] != root:
            parent[i], i = root, parent[i]
        return root

    def union(self, a: int, b: int) -> int:
        a, b = self.find(a), self.find(b)
        if a != b:
            a, b = min(a, b), max(a, b)  # the earlier one stays the root
            self.parent[b] = a
        return a


def _what(node: fx.Node, root: nn.Module) -> str:
    if node.op == "call_module":
        return f"'{node.name}' ({type(submodule(root, node.target)).__name__})"
    return f"'{node.name}' ({getattr(node.target, '__name__', node.target)})"


def _stem_problem(node: fx.Node, root: nn.Module) -> str | None:
    """Why this stem's output channels are no channels of a group (None: they may be)."""
    if node.op != "call_module":
        return "a functional stem: only Conv and Linear modules are slimmed"
    m = submodule(root, node.target)
    if not isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) and not is_transposed_linear(m):
        return f"a stem of type {type(m).__name__}: only Conv and Linear modules are slimmed"
    return None


class _Walk:
    """Pass 1: the channel spaces of a graph, and what lies in each (module docstring)."""

    def __init__(self, graph: fx.Graph, root: nn.Module, taken: set[str]):
        self.root = root
        self.spaces = _UnionFind()
        self.width: list[int] = []  # by space
        self.why: list[str | None] = []  # the first taint, by space (read at the root)
        self.zero_why: list[str | None] = []  # the first op on the way that does not keep a zero channel zero
        self.gates: list[tuple[fx.Node, fx.Node]] = []  # (product x * s, its gate s): see gate()
        self.space: dict[fx.Node, int] = {}
        self.dim: dict[fx.Node, int] = {}  # the channel dim of each tensor
        self.block: dict[fx.Node, int] = {}  # positions per channel along it (H*W after a flatten)
        self.stems: list[fx.Node] = []  # their output channels are rows (grouped convs included)
        self.again: dict[fx.Node, list[fx.Node]] = {}  # a shared module's first call: its later calls (stem(), hold())
        self.calls: dict[str, list[fx.Node]] = defaultdict(list)  # module target: the nodes that call it
        self.holders: list[tuple[fx.Node, bool]] = []  # per-channel nodes; True: their entries are members
        self.readers: list[tuple[fx.Node, fx.Node]] = []  # (stem, the tensor whose channels it reads)
        self.cats: list[tuple[fx.Node, list[tuple[fx.Node, int]]]] = []
        self.grouped: list[tuple[fx.Node, fx.Node, int]] = []  # (grouped conv, its input, groups)
        self.tied: list[tuple[fx.Node, int]] = []  # (group norm, channels per group)
        self.users_of_param: dict[int, set[str]] = {}
        for node in graph.nodes:
            if node.op == "call_module" and node.meta.get(LIVE):
                self.calls[node.target].append(node)
            if node.op in ("call_module", "call_function", "call_method"):
                for _, p in own_parameters(node, root):
                    self.users_of_param.setdefault(id(p), set()).add(node.name)
        for node in graph.nodes:
            if node.op == "output":
                for x in node.all_input_nodes:
                    if x in self.space:
                        self.taint(x, "its channels reach the graph output")
            elif is_data(node) and node.meta.get(LIVE):
                self.visit(node)
                self.check_size_reads(node)
        for first in [*self.stems, *(h for h, _ in self.holders)]:
            for node in (first, *self.again.get(first, ())):
                if node.name in taken:
                    self.taint(node, f"node '{node.name}' lies in an operation group: kept whole so that the "
                                     f"groups of both kinds stay disjoint")
        self.settle_zero_taints()

    # -- spaces ----------------------------------------------------------------------------
    def root_of(self, node: fx.Node) -> int:
        return self.spaces.find(self.space[node])

    def new(self, node: fx.Node, dim: int = 1, why: str | None = None) -> None:
        shape = node.meta[SHAPE]
        tensor = isinstance(shape, torch.Size) and len(shape) >= 2
        self.space[node] = self.spaces.add(1)
        self.width.append(shape[dim] if tensor else 0)
        self.why.append(why if tensor or why else "no tensor with channels")
        self.zero_why.append(None)
        self.dim[node] = dim % len(shape) if tensor else 1
        self.block[node] = 1

    def join(self, node: fx.Node, x: fx.Node, dim: int | None = None, block: int | None = None) -> None:
        """``node`` carries ``x``'s channels (along ``dim``, ``block`` positions each)."""
        self.space[node] = self.space[x]
        self.dim[node] = self.dim[x] if dim is None else dim
        self.block[node] = self.block[x] if block is None else block
        shape = node.meta[SHAPE]
        if not isinstance(shape, torch.Size) or shape[self.dim[node]] != self.width[self.root_of(x)] * self.block[node]:
            self.taint(node, f"its channels are not on one dim at {_what(node, self.root)}")

    def union(self, a: fx.Node, b: fx.Node) -> None:
        ra, rb = self.root_of(a), self.root_of(b)
        r = self.spaces.union(ra, rb)
        self.why[r] = self.why[ra] or self.why[rb]
        self.zero_why[r] = self.zero_why[ra] or self.zero_why[rb]

    def taint(self, node: fx.Node, why: str) -> None:
        r = self.root_of(node)
        if self.why[r] is None:
            self.why[r] = why

    def not_zero_invariant(self, node: fx.Node, why: str) -> None:
        """A taint that matters only where the channels' zero is needed: not in a gate (see ``gate``)."""
        r = self.root_of(node)
        if self.zero_why[r] is None:
            self.zero_why[r] = f"not zero-invariant: {why}"

    def settle_zero_taints(self) -> None:
        """A space whose channels reach anything but its own nodes and gates needs its zero."""
        gates = set(self.gates)
        for node in self.space:
            r = self.root_of(node)
            if self.zero_why[r] is None or self.why[r] is not None:
                continue
            for u in users(node):
                if (u, node) not in gates and (u not in self.space or self.root_of(u) != r):
                    self.why[r] = self.zero_why[r]
                    break

    def opaque(self, node: fx.Node, why: str) -> None:
        """Channels go into ``node`` and are lost: every input tainted, its output a tainted space of its own."""
        for x in data_inputs(node):
            if x in self.space:
                self.taint(x, f"its channels reach {_what(node, self.root)}, {why}")
        self.new(node, why=f"its channels meet the output of {_what(node, self.root)}, {why}")

    def shared(self, node: fx.Node, calls: Sequence[fx.Node] = ()) -> str | None:
        """Why the node's variables are not its own alone: another node uses them (not ``calls``,
        the calls of the same module, whose channels are coupled instead: ``stem``, ``hold``)."""
        mine = {node.name, *(call.name for call in calls)}
        for name, p in own_parameters(node, self.root):
            others = self.users_of_param[id(p)] - mine
            if others:
                return f"shared variables: parameter '{name}' is also used by node '{sorted(others)[0]}'"
        return None

    def first_call(self, node: fx.Node) -> fx.Node | None:
        """The earlier node that calls the same module (a shared stem or per-channel module), or None."""
        if node.op != "call_module":
            return None
        first = self.calls[node.target][0]
        return first if first is not node and first in self.space else None

    def hold(self, node: fx.Node, member: bool) -> None:
        """A per-channel module on the node's channels (``member``: its entries are members).

        Called again (``bn(a(x))``, then ``bn(b(y))``), its entry c is channel c at every call:
        the calls' spaces are one, as an ``add``'s inputs are (``a``'s and ``b``'s channel c go
        together), and the entries are the first call's, sliced once.
        """
        first = self.first_call(node)
        if first is None:
            self.holders.append((node, member))
        else:
            self.union(first, node)
            self.again.setdefault(first, []).append(node)
        if (why := self.shared(node, self.calls[node.target] if node.op == "call_module" else ())) is not None:
            self.taint(node, why)

    # -- one node --------------------------------------------------------------------------
    def visit(self, node: fx.Node) -> None:
        if node.op == "placeholder":
            self.new(node, why=f"its channels meet the graph input '{node.name}', which no group can zero")
            return
        ins = data_inputs(node)
        if any(x not in self.space for x in ins):
            self.opaque(node, "which reads a value fxoto does not follow")
            return
        if node.op == "call_function" and node.target in _CATS:
            self.cat(node)
            return
        rule = node.meta[RULE]
        module = submodule(self.root, node.target) if node.op == "call_module" else None
        if isinstance(module, nn.Embedding):
            self.embedding(node, module)
            return
        if node.op == "call_function" and node.target is rms_norm and len(ins) == 1:
            self.rms_norm(node, ins[0])
            return
        if node.op == "call_function" and node.target is torch.ops.aten.slice.Tensor and len(ins) == 1:
            self.slice(node, ins[0])
            return
        if rule.joint is Joint.ADD:
            self.add(node, ins)
        elif rule.role is Role.STEM:
            self.stem(node, ins, module, rule)
        elif len(ins) == 2 and rule.channel is Channel.ELEMENTWISE and (self.gate(node, ins) or self.product(node, ins)):
            pass
        elif len(ins) != 1:
            self.opaque(node, "which combines them with another tensor (only an add, a concat or a stem may)")
        elif module is not None and isinstance(module, _NORMS):
            self.norm(node, ins[0], module)
        else:
            self.accessory(node, ins[0], rule, module)

    def gate(self, node: fx.Node, ins: list[fx.Node]) -> bool:
        """``x * s`` with ``s`` one value per channel (a squeeze-and-excitation's scale, [N, C, 1, 1]).

        Channel c of the product is zero when ``x``'s is, whatever ``s``'s: the product
        carries ``x``'s channels, and ``s``'s channel c goes with them (its stem's row is
        sliced; zeroed too, harmlessly), so ``s`` need not map zero to zero.  True when
        the node is such a product.
        """
        shape = node.meta[SHAPE]
        if node.op not in ("call_function", "call_method") or getattr(node.target, "__name__", node.target) not in (
                "mul", "mul_") or not isinstance(shape, torch.Size) or len(shape) < 3:
            return False
        for x, gate in (ins, ins[::-1]):
            g = gate.meta[SHAPE]
            if (x.meta[SHAPE] == shape and isinstance(g, torch.Size) and len(g) == len(shape) and g[1] == shape[1]
                    and all(n == 1 for n in g[2:]) and g[0] in (1, shape[0])
                    and self.dim[x] == self.dim[gate] == 1 and self.block[x] == self.block[gate] == 1):
                self.join(node, x)
                self.gates.append((node, gate))
                return True
        return False

    def product(self, node: fx.Node, ins: list[fx.Node]) -> bool:
        """``a * b`` of two tensors of its shape with their channels on the same dim: a gated MLP's
        ``act(gate(x)) * up(x)`` (DESIGN 6b).

        Channel c of the product is zero when channel c of either factor is: the two spaces are
        one (their stems' rows go together, as an ``add``'s inputs do), and a group zeroes both.
        True when the node is such a product.
        """
        a, b = ins
        shape = node.meta[SHAPE]
        if (getattr(node.target, "__name__", node.target) not in ("mul", "mul_") or a.meta[SHAPE] != shape
                or b.meta[SHAPE] != shape or self.dim[a] != self.dim[b] or self.block[a] != self.block[b]):
            return False
        self.join(node, a)
        self.union(a, b)
        return True

    def cat(self, node: fx.Node) -> None:
        inputs = node.args[0] if node.args else None
        if not isinstance(inputs, (list, tuple)) or not all(isinstance(x, fx.Node) and x in self.space for x in inputs):
            self.opaque(node, "a concat fxoto cannot read (give it a list of tensors)")
            return
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0) % len(node.meta[SHAPE])
        if any(self.dim[x] != dim or self.block[x] != 1 for x in inputs):
            self.opaque(node, "which concatenates them along another dim")
            return
        self.new(node, dim)
        offsets, off = [], 0
        for x in inputs:
            offsets.append((x, off))
            off += x.meta[SHAPE][dim]
        self.cats.append((node, offsets))

    def add(self, node: fx.Node, ins: list[fx.Node]) -> None:
        shape = node.meta[SHAPE]
        first = ins[0]
        if any(x.meta[SHAPE] != shape for x in ins):
            self.opaque(node, "which adds them to a tensor of another shape")
            return
        if any(self.dim[x] != self.dim[first] or self.block[x] != self.block[first] for x in ins):
            other = next(x for x in ins if self.dim[x] != self.dim[first] or self.block[x] != self.block[first])
            self.opaque(node, f"which adds them to '{other.name}', whose channels lie along another dim or in "
                              f"blocks of another size (or whose values fxoto could not read as channels)")
            return
        self.join(node, first)
        for x in ins[1:]:
            self.union(first, x)

    def stem(self, node: fx.Node, ins: list[fx.Node], module: nn.Module | None, rule) -> None:
        what = _what(node, self.root)
        x = ins[0] if len(ins) == 1 and node.args and node.args[0] is ins[0] else None
        conv = isinstance(module, nn.modules.conv._ConvNd)
        if rule.channel is Channel.PER_CHANNEL and x is not None:  # depthwise: channel c to channel c
            if self.dim[x] != 1 or self.block[x] != 1:
                self.opaque(node, "a depthwise convolution reading them after a flatten")
                return
            self.join(node, x)
            self.hold(node, True)
            return
        grouped = conv and module.groups > 1 and not isinstance(module, nn.modules.conv._ConvTransposeNd)
        linear = isinstance(module, nn.Linear) or module is not None and is_transposed_linear(module)
        reads = (1 if conv else -1) if conv or linear else None
        if x is None or reads is None or (conv and module.groups > 1 and not grouped):
            self.opaque(node, "a stem whose input channels fxoto does not slice (only Conv and Linear modules, "
                              "called on one tensor)")
            if own_parameters(node, self.root):
                self.stems.append(node)  # set aside with the reason
            return
        if self.dim[x] != reads % len(x.meta[SHAPE]):
            self.taint(x, f"its channels reach {what} along a dim other than the one it reads")
        elif grouped:
            if self.block[x] != 1:
                self.taint(x, f"its channels reach the grouped convolution {what} after a flatten")
        else:
            self.readers.append((node, x))
        calls = self.calls[node.target] if node.op == "call_module" else []
        problem = _stem_problem(node, self.root) or self.shared(node, calls)
        self.new(node, reads % len(node.meta[SHAPE]), problem)
        first = self.first_call(node)
        if first is None:
            self.stems.append(node)
        else:
            # Output channel c of every call of one module is one channel: its weight row c and
            # bias entry c make it at each call.  The rows are the first call's (held once); each
            # call reads its own input's channels (``readers``), sliced per call site.
            self.union(first, node)
            self.again.setdefault(first, []).append(node)
            if grouped:
                self.taint(node, f"{what} is a grouped convolution called again (first at '{first.name}'): fxoto "
                                 f"couples the calls of a shared stem only for ungrouped Conv and Linear modules")
            elif any(call.kwargs or len(call.args) != 1 for call in (first, node)):
                self.taint(node, f"{what} calls the module of '{first.name}' again, and a call passes more than "
                                 f"its input: fxoto slices a shared stem per call site only for calls on one tensor")
        if grouped and self.dim[x] == 1 and self.block[x] == 1:
            self.grouped.append((node, x, module.groups))
        elif grouped:
            self.taint(node, f"{what} is a grouped convolution whose input channels are not followed")

    def embedding(self, node: fx.Node, m: nn.Embedding) -> None:
        """A lookup table as a stem: its output channel c (last dim) is column c of its weight, zero when the
        column is (DESIGN 6b: the first writer of a residual stream)."""
        problem = None
        if m.max_norm is not None:
            problem = f"{_what(node, self.root)} renormalises its rows (max_norm): a column's zero is not its own"
        problem = problem or self.shared(node, self.calls[node.target])
        if len(self.calls[node.target]) > 1:
            problem = problem or f"{_what(node, self.root)} is called at several places"
        self.new(node, -1, problem)
        self.stems.append(node)

    def rms_norm(self, node: fx.Node, x: fx.Node) -> None:
        """RMSNorm over the channels (``fxoto.patterns.rms_norm``): channel c of its output is zero when channel c
        of its input is; its weight entry c goes with the channel, and the rewrite keeps the old denominator
        for the channels left (weight times sqrt(N/N'), eps times N/N', DESIGN 6b)."""
        if self.dim[x] != len(x.meta[SHAPE]) - 1 or self.block[x] != 1:
            self.opaque(node, "an RMSNorm over another dim than their own")
            return
        self.join(node, x)
        self.hold(node, True)

    def slice(self, node: fx.Node, x: fx.Node) -> None:
        """``x[..., a:b, ...]`` along another dim than the channels' keeps them (a language model's
        ``hidden[:, -k:]`` before its head)."""
        shape, before = node.meta[SHAPE], x.meta[SHAPE]
        if not isinstance(shape, torch.Size) or not isinstance(before, torch.Size) or len(shape) != len(before) \
                or len(shape) < 2 or self.dim[x] >= len(shape):
            self.opaque(node, "a slice fxoto does not read")
            return
        dim = node.args[1] % len(before) if len(node.args) > 1 else 0
        if dim == self.dim[x]:
            self.opaque(node, "a slice along their dim")
            return
        self.join(node, x)

    def norm(self, node: fx.Node, x: fx.Node, m: nn.Module) -> None:
        what = _what(node, self.root)
        if isinstance(m, nn.LayerNorm):
            dims = len(m.normalized_shape)
            if self.dim[x] >= len(x.meta[SHAPE]) - dims:
                self.opaque(node, "a layer norm over the channels: the channels left would be normalised "
                                  "differently")
                return
            if m.elementwise_affine:
                self.opaque(node, "a layer norm whose variables are shared by all channels: it maps a zero "
                                  "channel to its bias")
                return
            self.join(node, x)  # normalises each channel's positions on their own, no variables
            return
        if self.dim[x] != 1 or self.block[x] != 1:
            self.opaque(node, "a normalisation reading them off dim 1")
            return
        self.join(node, x)
        affine = getattr(m, "affine", False)
        stats = getattr(m, "track_running_stats", False) and m.running_mean is not None
        if isinstance(m, nn.GroupNorm):
            self.tied.append((node, m.num_channels // m.num_groups))
        elif isinstance(m, nn.modules.batchnorm._BatchNorm) and not affine:
            self.not_zero_invariant(node, f"{what} has no affine variables and maps zero to -mean/std")
            return
        elif isinstance(m, nn.modules.instancenorm._InstanceNorm) and stats and not affine:
            self.not_zero_invariant(node, f"{what} uses running statistics and has no affine variables")
            return
        self.hold(node, affine)

    def accessory(self, node: fx.Node, x: fx.Node, rule, module: nn.Module | None) -> None:
        what = _what(node, self.root)
        in_shape, shape = x.meta[SHAPE], node.meta[SHAPE]
        dim, block = self.dim[x], self.block[x]
        if not isinstance(in_shape, torch.Size) or not isinstance(shape, torch.Size):
            self.opaque(node, "which takes or makes something other than one tensor")
            return
        if rule.role is Role.UNKNOWN:
            self.opaque(node, "which fxoto cannot follow (unknown op)")
            return
        kind = rule.channel
        if kind is Channel.PER_CHANNEL and isinstance(module, nn.PReLU) and dim == 1 and block == 1:
            self.join(node, x)
            self.hold(node, False)  # zero-preserving: its entries are sliced, not zeroed
            return
        if kind is Channel.ELEMENTWISE and shape == in_shape:
            self.join(node, x)
        elif kind is Channel.SPATIAL and dim == 1 and block == 1 and len(shape) == len(in_shape) and shape[1] == in_shape[1]:
            self.join(node, x)
        elif kind is Channel.FLATTEN and (inner := _flatten_block(in_shape, shape, dim)) is not None:
            self.join(node, x, dim, block * inner)
        elif kind is Channel.REDUCE and (reduced := _reduce_dims(node, len(in_shape))) is not None \
                and dim not in reduced[0] and block == 1:
            dims, keepdim = reduced
            self.join(node, x, dim if keepdim else dim - sum(d < dim for d in dims))
        else:
            self.opaque(node, f"which moves or mixes channels in a way fxoto does not follow ({kind.value})")
            return
        if rule.zero is Zero.BREAKS:
            self.not_zero_invariant(node, f"{what} does not map zero to zero")
        elif rule.zero is Zero.OWN_VARIABLES:
            self.not_zero_invariant(node, f"{what} maps zero to zero only when its own variables are zero, "
                                          f"and they are not per channel")
        elif module is None and own_parameters(node, self.root):
            varies = [f for f in node.meta.get(FACTORS, ()) if _factor_channel(f, in_shape, dim) is not None]
            if varies or not node.meta.get(FACTORS):
                self.taint(node, f"its channels reach {what}, which scales them by variables of its own")

    def check_size_reads(self, node: fx.Node) -> None:
        """A read of the tensor's size along its channels would go stale once channels are removed."""
        dim = self.dim.get(node)
        for u in node.users:
            if not u.meta.get(LIVE) or is_data(u) or u.op == "output":
                continue
            if not _reads_other_dims(u, dim, len(node.meta[SHAPE]) if isinstance(node.meta[SHAPE], torch.Size) else 0):
                self.taint(node, f"its channels' count is read by {_what(u, self.root)}")


_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm, nn.LayerNorm)


def _reads_other_dims(size: fx.Node, dim: int | None, ndim: int) -> bool:
    """``x.size(d)``, ``x.shape[d]`` or ``x.size()[d]`` with ``d`` not the channel dim."""
    def fine(d) -> bool:
        return isinstance(d, int) and ndim > 0 and d % ndim != dim

    if size.op == "call_method" and size.target == "size":
        if len(size.args) > 1 or "dim" in size.kwargs:
            return fine(size.args[1] if len(size.args) > 1 else size.kwargs["dim"])
    elif size.op == "call_function" and getattr(size.target, "__name__", "") == "getattr":
        if size.args[1] != "shape":
            return size.args[1] in ("dtype", "device", "ndim", "is_cuda")
    else:
        return False
    return all(u.op == "call_function" and getattr(u.target, "__name__", "") == "getitem" and fine(u.args[1])
               for u in size.users if u.users or u.meta.get(LIVE))  # ``b, s, _ = x.shape``: the unused ``_``
