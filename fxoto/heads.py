"""Attention heads as groups (DESIGN 6b): key/value heads, and query heads inside their key/value group.

``find_head_groups`` follows the heads of every ``scaled_dot_product_attention``
from the projections that make them to the projection that reads them:

* a projection (an ``nn.Linear`` or Hugging Face ``Conv1D`` call) whose output is only
  viewed as [..., H, d] (``view``/``reshape``) makes H heads of d features; so does each
  piece of a fused qkv projection, split along the features (GPT-2) or reshaped to
  [..., 3, H, d], the 3 moved first and unbound (timm);
* the heads are followed, head axis and all, through transposes, unsqueezes,
  the ``expand``/``reshape`` of grouped-query attention (a key/value head read by
  ``n_rep`` query heads), slices, concats and products that keep each head apart
  (rotary embeddings: ``q * cos + rotate_half(q) * sin`` with ``cos`` broadcast over
  the heads), into the attention's q, k and v;
* the attention's output heads, merged back into features ([..., H * d]), are read by
  one linear layer, the output projection.

Key/value head j's group holds the rows of k and v that make it: with v's rows zero, the
head's output is zero whatever the softmax gives, so its query heads go with it.  Without
grouped-query attention it also holds the head's q rows and output columns.  With it, each
query head is a group of its own (q rows, output columns: a zero contribution whatever it
computes) where the output projection's columns are at hand, else the query heads stay in
their key/value head's group.  The rewrite drops rows of q, k and v, columns of the output
projection, and writes the head counts in the views, expands, reshapes and splits on the way
(``HeadSize``, ``Attention.split``), indexing k's and v's repeated heads down where query
heads went unevenly.  An attention fxoto cannot follow this way (a head read elsewhere,
per-head masks, attention not written as ``scaled_dot_product_attention``) is set aside with
the node where following stopped.  Removing every head of an attention is refused
(``SearchSpace.removal_problem``).
"""

from __future__ import annotations

import operator
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from fxoto.channels import ChannelLayer, ChannelSlice, _per_row
from fxoto.roles import is_transposed_linear
from fxoto.segments import LIVE, own_parameters
from fxoto.shapes import SHAPE, submodule
from fxoto.groups import Exclusion, GeZIG, Member

Head = tuple[str, int]  # (projection node, head index in its output)

_UNARY = (F.dropout, torch.clone, torch.neg, operator.neg, F.silu, F.gelu, F.relu)


@dataclass(frozen=True)
class _Track:
    """Where the heads lie in a tensor: along ``axis``, ``block`` positions each (1 on a head
    axis, d once merged into features), in the order ``heads``; ``plain``: reached through
    moves of values alone (zero stays zero); ``rep``: an axis of size 1 after the head axis
    that an ``expand`` may repeat (grouped-query attention)."""

    axis: int
    heads: tuple[Head, ...]
    block: int = 1
    plain: bool = True
    rep: int | None = None


@dataclass(frozen=True)
class HeadSize:
    """A size argument that counts heads: ``node.args[position]`` becomes ``block`` times the
    number of ``heads`` kept."""

    node: str
    position: int
    heads: tuple[Head, ...]
    block: int
    inner: int | None = None  # sizes given as one tuple (``x.view((b, s, h, d))``): the index in it


@dataclass(frozen=True)
class Attention:
    """One attention whose heads form groups: its projections, head size and sizes to rewrite."""

    node: str
    q: str
    k: str
    v: str
    out: str
    head_dim: int
    kv_of_query: tuple[int, ...]  # per query head: the key/value head it reads
    sizes: tuple[HeadSize, ...]
    repeats: tuple[str, ...] = ()  # grouped-query attention: the reshapes that repeat k's and v's heads
    rows: tuple[tuple[str, str, int], ...] = ()  # per projection (q, k, v): (stem node, its first row)
    split: str | None = None  # a fused projection: the split into q, k and v, rewritten with the widths kept
    kv_dim: int = 0  # rows per key/value head

    def closure(self, removed: set[Head]) -> set[Head]:
        """The heads of this attention that go with ``removed``: the query heads of a removed key/value
        head (they read zeros), and a key/value head none of whose query heads is left (read by none)."""
        gone = {h for h in removed if h[0] in (self.q, self.k, self.v)}
        for i, j in enumerate(self.kv_of_query):
            if (self.k, j) in gone:
                gone.add((self.q, i))
        for j in set(self.kv_of_query):
            if all((self.q, i) in gone for i, jj in enumerate(self.kv_of_query) if jj == j):
                gone.update({(self.k, j), (self.v, j)})
        return gone

    def kept_queries(self, gone: set[Head]) -> list[int]:
        return [i for i in range(len(self.kv_of_query)) if (self.q, i) not in gone]


class _Unfollowed(Exception):
    pass


def _is_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or is_transposed_linear(m)


def _is_unbind(node) -> bool:
    return isinstance(node, fx.Node) and (node.op == "call_method" and node.target == "unbind"
                                          or node.op == "call_function" and node.target is torch.unbind)


def _unbind_dim(node: fx.Node) -> int:
    return node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)


def _pieces(split: fx.Node) -> list[int] | None:
    """The sizes of a ``torch.split`` along the last dim, or None."""
    x = split.args[0]
    shape = x.meta.get(SHAPE) if isinstance(x, fx.Node) else None
    dim = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
    if not isinstance(shape, torch.Size) or dim % len(shape) != len(shape) - 1:
        return None
    sizes = split.args[1]
    if isinstance(sizes, int):
        return [min(sizes, shape[-1] - at) for at in range(0, shape[-1], sizes)]
    return list(sizes) if all(isinstance(n, int) for n in sizes) else None


class HeadGroups:
    """What ``find_head_groups`` finds: the groups, what each slices, the attentions and layers."""

    def __init__(self, groups: list[GeZIG], slices: dict[int, ChannelSlice], heads: dict[int, frozenset[Head]],
                 attentions: list[Attention], layers: dict[str, ChannelLayer], excluded: list[Exclusion],
                 params: set[str]):
        self.groups = groups
        self.slices = slices
        self.heads = heads
        self.attentions = attentions
        self.layers = layers
        self.excluded = excluded
        self.params = params


def _normal(d: int, ndim: int) -> int:
    return d % ndim


class _Follow:
    """Pass over the graph in order: the head tracks of every tensor that carries heads."""

    def __init__(self, graph: fx.Graph, root: nn.Module):
        self.root = root
        self.track: dict[fx.Node, _Track] = {}
        self.sizes: dict[fx.Node, list[HeadSize]] = defaultdict(list)  # by projection that made the heads
        self.failed: dict[str, str] = {}  # projection: why its heads are not followed
        self.attentions: list[tuple[fx.Node, _Track, _Track, _Track]] = []
        self.readers: dict[fx.Node, tuple[fx.Node, _Track]] = {}  # output projection: (its input, track)
        self.repeats: dict[fx.Node, str] = {}  # grouped-query attention's reshape: the projection it repeats
        self.rows: dict[str, tuple[str, int, int]] = {}  # projection: (stem node, first row, rows)
        self.splits: dict[str, str] = {}  # a fused projection's piece: the split node that makes it
        self.unseen: list[fx.Node] = []  # attentions none of whose q, k, v is a linear layer's heads
        for node in graph.nodes:
            if not node.meta.get(LIVE) or node.op in ("placeholder", "get_attr"):
                continue
            ins = [x for x in node.all_input_nodes if x in self.track]
            if node.target is F.scaled_dot_product_attention and not ins:
                self.unseen.append(node)
                continue
            if node.op == "output":
                self.fail(ins, "its heads reach the graph output")
                continue
            if not ins:
                self.seed(node)
                continue
            try:
                self.visit(node, ins)
            except _Unfollowed as why:
                self.fail(ins, f"its heads are not followed at node '{node.name}': {why}")
            except (TypeError, ValueError, IndexError, AttributeError) as error:  # arguments of a form not read here
                self.fail(ins, f"its heads are not followed at node '{node.name}' ({type(error).__name__}: {error})")

    def projections(self, x: fx.Node) -> set[str]:
        return {p for p, _ in self.track[x].heads}

    def fail(self, ins: list[fx.Node], why: str) -> None:
        for x in ins:
            for p in self.projections(x):
                self.failed.setdefault(p, why)

    def seed(self, node: fx.Node) -> None:
        """A view of a linear layer's output (or of one piece of it, split along the features: a fused
        qkv projection) as [..., H, d]: H heads of that layer (piece)."""
        if node.op == "call_function" and node.target is operator.getitem and _is_unbind(node.args[0]):
            self.seed_unbound(node)
            return
        if node.op != "call_method" or node.target not in ("view", "reshape"):
            return
        x = node.args[0]
        if not isinstance(x, fx.Node):
            return
        key, stem, offset = x.name, x, 0
        split = x.args[0] if x.op == "call_function" and x.target is operator.getitem else None
        if isinstance(split, fx.Node) and split.target is torch.split and isinstance(x.args[1], int):
            stem = split.args[0]
            pieces = _pieces(split)
            if pieces is None:
                return
            key, offset = f"{stem.name}.{x.args[1]}", sum(pieces[:x.args[1]])
        if not (isinstance(stem, fx.Node) and stem.op == "call_module" and _is_linear(submodule(self.root, stem.target))):
            return
        shape, before = node.meta.get(SHAPE), x.meta.get(SHAPE)
        if not (isinstance(shape, torch.Size) and isinstance(before, torch.Size) and len(shape) == len(before) + 1
                and shape[:-2] == before[:-1] and shape[-2] * shape[-1] == before[-1]):
            return
        for n in ({x, stem} if stem is x else {x}):
            if len([u for u in n.users if u.meta.get(LIVE)]) != 1:
                self.failed.setdefault(key, "its output is read by more than its view into heads")
        if stem is not x and len([u for u in stem.users if u.meta.get(LIVE)]) != 1:
            self.failed.setdefault(key, "its output is read by more than the split into q, k and v")
        self.rows[key] = (stem.name, offset, before[-1])
        if stem is not x:
            self.splits[key] = split.name
        axis = len(shape) - 2
        self.track[node] = _Track(axis, tuple((key, i) for i in range(shape[-2])))
        self.size_at(node, axis, self.track[node])

    def seed_unbound(self, node: fx.Node) -> None:
        """q, k or v out of one fused layer laid out as [..., 3, H, d], the 3 moved first and unbound
        (timm's attention: ``qkv(x).reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4).unbind(0)``)."""
        unbind, piece = node.args[0], node.args[1]
        permute = unbind.args[0]
        if not (isinstance(piece, int) and _unbind_dim(unbind) == 0 and isinstance(permute, fx.Node)
                and (permute.op == "call_method" and permute.target == "permute" or permute.target is torch.permute)):
            return
        reshape = permute.args[0]
        if not (isinstance(reshape, fx.Node) and reshape.op == "call_method" and reshape.target in ("view", "reshape")):
            return
        x = reshape.args[0]
        if not (isinstance(x, fx.Node) and x.op == "call_module" and _is_linear(submodule(self.root, x.target))):
            return
        before, shape = x.meta.get(SHAPE), reshape.meta.get(SHAPE)
        if not (isinstance(before, torch.Size) and isinstance(shape, torch.Size) and len(shape) == len(before) + 2
                and shape[:-3] == before[:-1] and shape[-3] * shape[-2] * shape[-1] == before[-1]):
            return
        dims = permute.args[1] if isinstance(permute.args[1], (list, tuple)) else permute.args[1:]
        dims = [_normal(d, len(shape)) for d in dims]
        at_piece, at_head = len(before) - 1, len(before)
        if dims[0] != at_piece:
            return
        key, heads, width = f"{x.name}.{piece}", shape[-2], shape[-2] * shape[-1]
        for n in (x, reshape, permute):
            if len([u for u in n.users if u.meta.get(LIVE)]) != 1:
                self.failed.setdefault(key, f"'{n.name}' is read by more than the split into q, k and v")
        self.rows[key] = (x.name, piece * width, width)
        self.track[node] = _Track(dims.index(at_head) - 1, tuple((key, i) for i in range(heads)))
        self.size_at(reshape, at_head, self.track[node])

    def size_at(self, node: fx.Node, axis: int, track: _Track) -> None:
        """Record the size argument at ``axis`` of a view/reshape/expand when it is a number (-1 adapts)."""
        sizes, position, inner = list(node.args[1:]), 1 + axis, None
        if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
            sizes, position, inner = list(sizes[0]), 1, axis
        if axis < len(sizes) and isinstance(sizes[axis], int) and sizes[axis] != -1:
            for p in {p for p, _ in track.heads}:
                self.sizes[p].append(HeadSize(node.name, position, track.heads, track.block, inner))

    def visit(self, node: fx.Node, ins: list[fx.Node]) -> None:
        shape = node.meta.get(SHAPE)
        if not isinstance(shape, torch.Size):
            if node.op == "call_method" and node.target == "size" or node.target is getattr:
                return  # a size read at run time: the sub-network's own sizes
            raise _Unfollowed("not a tensor")
        x = ins[0]
        t = self.track[x]
        target = node.target
        if node.op == "call_module":
            module = submodule(self.root, node.target)
            if _is_linear(module) and t.block > 1 and t.axis == len(x.meta[SHAPE]) - 1 and len(ins) == 1:
                self.readers[node] = (x, t)
                return
            if isinstance(module, (nn.Dropout, nn.Identity)):
                self.track[node] = t
                return
            if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1 and t.block == 1 \
                    and t.axis != len(shape) - 1:  # a norm over each head's features (timm's q_norm, k_norm)
                self.track[node] = _Track(t.axis, t.heads, t.block, False, t.rep)
                return
            raise _Unfollowed(f"module '{node.target}' ({type(module).__name__}) reads them")
        if node.op == "call_method" and target in ("view", "reshape"):
            self.reshape(node, x, t, shape)
        elif node.op == "call_method" and target == "expand":
            before = x.meta[SHAPE]
            if len(before) != len(shape) or before[t.axis] != shape[t.axis]:
                raise _Unfollowed("an expand that changes the head axis")
            rep = t.rep
            if rep is not None and shape[rep] == before[rep]:
                rep = rep if before[rep] == 1 else None
            self.track[node] = _Track(t.axis, t.heads, t.block, t.plain, rep)
            self.size_at(node, t.axis, t)
        elif node.op == "call_method" and target == "unsqueeze":
            d = _normal(node.args[1], len(shape))
            axis = t.axis + (d <= t.axis)
            self.track[node] = _Track(axis, t.heads, t.block, t.plain, d if d == axis + 1 else None)
        elif node.op == "call_method" and target == "contiguous" or target in _UNARY and len(ins) == 1:
            self.track[node] = _Track(t.axis, t.heads, t.block, t.plain, t.rep)  # each maps zero to zero
        elif target is torch.transpose or node.op == "call_method" and target == "transpose":
            i, j = (_normal(d, len(shape)) for d in node.args[1:3])
            axis = j if t.axis == i else i if t.axis == j else t.axis
            self.track[node] = _Track(axis, t.heads, t.block, t.plain)
        elif target is torch.permute or node.op == "call_method" and target == "permute":
            dims = node.args[1] if isinstance(node.args[1], (list, tuple)) else node.args[1:]
            dims = [_normal(d, len(shape)) for d in dims]
            self.track[node] = _Track(dims.index(t.axis), t.heads, t.block, t.plain)
        elif target is torch.ops.aten.slice.Tensor:
            if _normal(node.args[1], len(shape)) == t.axis:
                raise _Unfollowed("a slice along the heads")
            rep = t.rep if _normal(node.args[1], len(shape)) != t.rep else None
            self.track[node] = _Track(t.axis, t.heads, t.block, t.plain, rep)
        elif target is operator.getitem:
            self.index(node, t, shape)
        elif target is torch.cat:
            dim = _normal(node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0), len(shape))
            if dim == t.axis or any(self.track.get(y) != t for y in node.args[0]):
                raise _Unfollowed("a concat along the heads, or of other tensors")
            self.track[node] = _Track(t.axis, t.heads, t.block, all(self.track[y].plain for y in node.args[0]))
        elif target in (operator.mul, operator.add, operator.truediv, torch.mul, torch.add) and not node.kwargs:
            self.binary(node, t, shape)
        elif target is F.scaled_dot_product_attention:
            self.attention(node, shape)
        else:
            raise _Unfollowed(f"{getattr(target, '__name__', target)} is not known to keep heads apart")

    def reshape(self, node: fx.Node, x: fx.Node, t: _Track, shape: torch.Size) -> None:
        before = x.meta[SHAPE]
        a = t.axis
        if shape == before:
            self.track[node] = t
            self.size_at(node, a, t)
        elif t.rep is not None and t.rep == a + 1 and len(shape) == len(before) - 1 \
                and shape[:a] == before[:a] and shape[a] == before[a] * before[a + 1] and shape[a + 1:] == before[a + 2:]:
            heads = tuple(h for h in t.heads for _ in range(before[a + 1]))  # grouped-query attention
            self.track[node] = _Track(a, heads, t.block, t.plain)
            self.repeats[node] = t.heads[0][0]
            self.size_at(node, a, self.track[node])
        elif t.block == 1 and a == len(before) - 2 and shape == before[:-2] + (before[-2] * before[-1],):
            self.track[node] = _Track(a, t.heads, before[-1], t.plain)  # merged into features
            self.size_at(node, a, self.track[node])
        elif t.block > 1 and a == len(before) - 1 and shape == before[:-1] + (before[-1] // t.block, t.block):
            self.track[node] = _Track(a, t.heads, 1, t.plain)
            self.size_at(node, a, self.track[node])
        else:
            raise _Unfollowed(f"a reshape from {list(before)} to {list(shape)}")

    def index(self, node: fx.Node, t: _Track, shape: torch.Size) -> None:
        """``x[..., a:b]``: slices (and one ``...``) that leave the head axis whole."""
        index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
        if not all(isinstance(i, slice) or i is Ellipsis for i in index) or sum(i is Ellipsis for i in index) > 1:
            raise _Unfollowed("an index other than slices")
        ndim = len(shape)
        if Ellipsis in index:
            at = index.index(Ellipsis)
            index = index[:at] + (slice(None),) * (ndim - len(index) + 1) + index[at + 1:]
        if t.axis < len(index) and index[t.axis] != slice(None):
            raise _Unfollowed("a slice along the heads")
        self.track[node] = _Track(t.axis, t.heads, t.block, t.plain, t.rep)

    def binary(self, node: fx.Node, t: _Track, shape: torch.Size) -> None:
        """A sum or product with a tensor of the same heads, or one that is the same for every head
        (rotary ``cos``/``sin``, a scale).  Zero stays zero through a product with a tracked factor and
        through a quotient of one, through a sum only of tracked terms (``plain``)."""
        tracked = []
        for y in node.all_input_nodes:
            if y in self.track:
                if (self.track[y].axis, self.track[y].heads, self.track[y].block) != (t.axis, t.heads, t.block):
                    raise _Unfollowed("it combines heads laid out differently")
                tracked.append(self.track[y])
                continue
            other = y.meta.get(SHAPE)
            if not isinstance(other, torch.Size):
                continue
            at = t.axis - (len(shape) - len(other))
            if at >= 0 and other[at] != 1:
                raise _Unfollowed("it combines them with a tensor that differs along the heads")
        operands = [a for a in node.args[:2]]
        if node.target is operator.add:
            plain = all(isinstance(a, fx.Node) and a in self.track and self.track[a].plain for a in operands)
        elif node.target is operator.truediv:
            plain = isinstance(operands[0], fx.Node) and operands[0] in self.track and self.track[operands[0]].plain
        else:
            plain = any(tr.plain for tr in tracked)
        self.track[node] = _Track(t.axis, t.heads, t.block, plain, t.rep)

    def attention(self, node: fx.Node, shape: torch.Size) -> None:
        q, k, v = node.args[:3]
        if any(x not in self.track for x in (q, k, v)):
            raise _Unfollowed("its q, k and v are not all heads of linear layers")
        if node.kwargs.get("enable_gqa"):
            raise _Unfollowed("enable_gqa=True")
        mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
        if isinstance(mask, fx.Node):
            m = mask.meta.get(SHAPE)
            if mask in self.track or m is not None and not isinstance(m, torch.Size) \
                    or isinstance(m, torch.Size) and len(m) == len(shape) and m[1] != 1:  # None: no mask given
                raise _Unfollowed("a mask that differs per head")
        tq, tk, tv = (self.track[x] for x in (q, k, v))
        if not all(t.axis == 1 and t.block == 1 for t in (tq, tk, tv)):
            raise _Unfollowed("q, k or v with the heads off dim 1")
        self.attentions.append((node, tq, tk, tv))
        self.track[node] = _Track(1, tq.heads, 1, True)


def find_head_groups(graph: fx.Graph, root: nn.Module, first_id: int, taken: set[str],
                     channel_params: set[str]) -> HeadGroups:
    """One group per key/value head of every attention fxoto can follow (module docstring).

    ``taken``: nodes that operation groups keep whole, ``channel_params``: parameters that
    channel groups hold; an output projection among them keeps its columns out of the
    head groups (they are still dropped with the head, which reads zero once v's rows are).
    """
    follow = _Follow(graph, root)
    nodes = {n.name: n for n in graph.nodes}
    groups: list[GeZIG] = []
    slices: dict[int, ChannelSlice] = {}
    heads_of: dict[int, frozenset[Head]] = {}
    attentions: list[Attention] = []
    layers: dict[str, ChannelLayer] = {}
    excluded: list[Exclusion] = []
    params: set[str] = set()
    for node, tq, tk, tv in follow.attentions:
        reader = next((r for r, (x, t) in follow.readers.items() if t.heads == tq.heads), None)
        why = _problem(node, tq, tk, tv, reader, follow, nodes, taken, root)
        if why is not None:
            excluded.append(Exclusion((node.name,), f"heads: {why}"))
            continue
        q, k, v = tq.heads[0][0], tk.heads[0][0], tv.heads[0][0]
        kv_of = tuple(j for _, j in tk.heads)
        d = follow.rows[q][2] // len(tq.heads)
        dkv = follow.rows[k][2] // (max(kv_of) + 1)
        sizes = tuple(s for p in (q, k, v) for s in follow.sizes[p])
        repeats = tuple(n.name for n, p in follow.repeats.items() if p in (k, v))
        split = follow.splits.get(q)
        if split is not None and not (follow.splits.get(k) == follow.splits.get(v) == split
                                      and len(_pieces(nodes[split])) == 3):
            excluded.append(Exclusion((node.name,), "heads: q, k and v are split from a layer in another way"))
            continue
        rows_of = {p: follow.rows[p][:2] for p in (q, k, v)}
        attentions.append(Attention(node.name, q, k, v, reader.name, d, kv_of, sizes, repeats,
                                    tuple((p, *rows_of[p]) for p in (q, k, v)), split, dkv))
        out_members = reader.name not in taken and not any(
            p in channel_params for p, _ in own_parameters(reader, root))
        # Grouped-query attention with the output projection's columns at hand: a key/value head's
        # group is its k and v rows (its query heads read zeros then, and go with it), and each query
        # head is a group of its own (q rows, output columns: its contribution is zero whatever the
        # softmax gives).  Otherwise one group per key/value head holds its query heads too.
        apart = out_members and len(kv_of) > max(kv_of) + 1
        units = [((k, j), (v, j)) + (() if apart else tuple((q, i) for i, jj in enumerate(kv_of) if jj == j))
                 for j in range(max(kv_of) + 1)]
        if apart:
            units += [((q, i),) for i in range(len(kv_of))]
        width = {q: d, k: dkv, v: dkv}
        for unit in units:
            members: list[Member] = []
            rows: list[tuple[str, int]] = []
            queries = [i for key, i in unit if key == q]
            for key, h in unit:
                stem, first = rows_of[key]
                lo, n = first + h * width[key], width[key]
                rows += [(stem, r) for r in range(lo, lo + n)]
                members += [Member(p, dim, lo, lo + n) for p, dim, _ in _per_row(nodes[stem], root)]
            columns = tuple((reader.name, i * d, d) for i in queries)
            if out_members:
                members += [Member(p, dim, i * d, (i + 1) * d) for p, dim in _column_dims(reader, root)
                            for i in queries]
            gid = first_id + len(groups)
            numel = sum((m.stop - m.start) * _per_index(root, m) for m in members)
            stems = dict.fromkeys(rows_of[key][0] for key, _ in unit)
            groups.append(GeZIG(gid, -1, (node.name, *stems, reader.name), tuple(members), numel, kind="head"))
            slices[gid] = ChannelSlice(tuple(rows), (), columns)
            heads_of[gid] = frozenset(unit)
        for stem in dict.fromkeys(rows_of[key][0] for key in (q, k, v)):
            layers[stem] = ChannelLayer(stem, nodes[stem].meta[SHAPE][-1])
            params.update(p for p, _ in own_parameters(nodes[stem], root))
        if out_members:
            params.update(p for p, _ in _column_dims(reader, root))
    for node in follow.unseen:
        excluded.append(Exclusion((node.name,), "heads: none of its q, k and v is a linear layer's output viewed as "
                                               "[..., heads, d] (nor a piece of one split along the features): a "
                                               "fused qkv reshaped as [..., 3, heads, d] is not followed yet"))
    for p, why in follow.failed.items():
        if not any(p in (a.q, a.k, a.v) for a in attentions):
            excluded.append(Exclusion((p,), f"heads: {why}"))
    return HeadGroups(groups, slices, heads_of, attentions, layers, excluded, params)


def _column_dims(reader: fx.Node, root: nn.Module) -> list[tuple[str, int]]:
    """(weight, the dim of its input columns) of the output projection."""
    dim = 0 if is_transposed_linear(submodule(root, reader.target)) else 1
    return [(p, dim) for p, t in own_parameters(reader, root) if t.dim() == 2]


def _per_index(root: nn.Module, m: Member) -> int:
    t = root.get_parameter(m.param)
    return t.numel() // t.shape[m.dim]


def _problem(node, tq, tk, tv, reader, follow, nodes, taken, root) -> str | None:
    """Why an attention's heads cannot form groups, or None."""
    projections = [{p for p, _ in t.heads} for t in (tq, tk, tv)]
    if any(len(p) != 1 for p in projections):
        return "q, k or v mixes the heads of several layers"
    q, k, v = (next(iter(p)) for p in projections)
    if len({q, k, v}) != 3:
        return "q, k and v are one and the same heads"
    for p in (q, k, v):
        if p in follow.failed:
            return f"'{p}': {follow.failed[p]}"
        if p in taken:
            return f"'{p}' lies in an operation group that keeps it whole"
    if [i for _, i in tq.heads] != list(range(len(tq.heads))):
        return "the query heads are reordered"
    if [i for _, i in tk.heads] != [i for _, i in tv.heads]:
        return "k and v heads are paired differently"
    if not tv.plain:
        return "v is changed on its way (its zero would not stay zero)"
    if reader is None:
        return f"no linear layer reads the heads of '{node.name}' whole"
    return None
