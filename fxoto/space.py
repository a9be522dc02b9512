"""Step 3 of the pipeline: GeZIGs and the search space (paper, section 3.1; DESIGN 3-4).

``find_gezigs`` turns segments into generalized zero-invariant groups: a
segment qualifies when it holds trainable variables, every user of its end is
a joint, and the zero-invariance walk succeeds.  ``SearchSpace`` holds the
groups and the one validity check (``is_valid_removal``) that H2SPG's selection
and the sub-network rewrite both call; it holds the channel groups of
``fxoto.channels`` too (``GeZIG.kind == "channel"``) when asked for.
"""

from __future__ import annotations

import functools
import operator
import itertools
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from fxoto.errors import InvalidRemovalError, UnknownGroupError
from fxoto.groups import (ChannelGroupSet, Exclusion, GeZIG, Member,  # noqa: F401 (re-exported: fxoto.space.GeZIG ...)
                          _collector_paused, _ranges)
from fxoto.roles import Joint, Role, Zero
from fxoto.segments import (LIVE, REFUSED, REGION, RULE, SEGMENT, ChannelRegion, Segment, SplitPiece, data_inputs,
                            is_joint, own_parameters, runs, source_indices, split_pieces, users)
from fxoto.shapes import SHAPE, submodule
from fxoto.targets import (KINDS, _resolve_count, kind_counts, resolve_k,  # noqa: F401 (K's resolution,
                           select_per_kind, target_k)  # importable from here as before)
from fxoto.trace import graph_module

PAIRS_TRIED = 2000  # select_removal's pair search: validity checks cost O(segments) each


def zeroed_by_own_variables(node: fx.Node, root: nn.Module) -> bool:
    """Whether zeroing the node's own variables zeroes its output: a stem, an affine norm, or
    a node with no data input that preserves zero (a bias table gathered by index)."""
    zero = node.meta[RULE].zero
    from_variables = zero is Zero.OWN_VARIABLES or (zero is Zero.PRESERVES and not data_inputs(node))
    return from_variables and bool(own_parameters(node, root))


def _zeroing_start(nodes: list[fx.Node], root: nn.Module, region_nodes: set[str]) -> tuple[int | None, str]:
    """Index of the first node from which zeroing the variables zeroes the output.

    DESIGN section 3: from that node on, every node maps zero to zero by itself
    or through its own variables (which then join the group).  The start is a
    node whose own zero variables make its output zero (a stem, an affine
    norm, a parameter table), not a per-channel node right after a ``cat``
    (those variables are sliced into the concatenated inputs' groups).
    """
    last_break = -1
    for i, node in enumerate(nodes):
        rule = node.meta[RULE]
        if rule.zero is Zero.BREAKS or rule.role is Role.UNKNOWN:
            last_break = i
    for i in range(last_break + 1, len(nodes)):
        if zeroed_by_own_variables(nodes[i], root) and nodes[i].name not in region_nodes:
            return i, ""
    if last_break >= 0:
        node = nodes[last_break]
        what = type(submodule(root, node.target)).__name__ if node.op == "call_module" else str(node.target)
        return None, (
            f"not zero-invariant: node '{node.name}' ({what}, {node.meta[RULE].role.value}) is not known to "
            f"map zero to zero and no stem follows it; register an OpRule for it if it does"
        )
    return None, "not zero-invariant: no stem or affine variables whose zeroing zeroes the output"


def find_gezigs(graph: fx.Graph, root: nn.Module, segments: list[Segment]) -> tuple[list[GeZIG], list[Exclusion]]:
    """Algorithm 2, lines 11-15, with zero-invariance checked and shared variables kept whole.

    ``root`` owns the graph's targets (the traced model or a ``GraphModule``).
    """
    nodes_by_name = {n.name: n for n in graph.nodes}
    cats = [n for n in graph.nodes if REGION in n.meta and is_joint(n)]
    region_nodes = {name for c in cats for name, _ in c.meta[REGION].per_channel}

    # Which nodes use each parameter (by identity: tied weights share one tensor).
    users_of_param: dict[int, set[str]] = {}
    for node in graph.nodes:
        if node.op in ("call_module", "call_function", "call_method"):
            for _, p in own_parameters(node, root):
                users_of_param.setdefault(id(p), set()).add(node.name)

    # Channel slices after each cat, by the segment that feeds the cat.
    # A shuffle scatters a source's channels: one slice per run of consecutive indices.
    slices: dict[int, list[tuple[str, str, int, int]]] = {}
    for cat in cats:
        region: ChannelRegion = cat.meta[REGION]
        for src, off, size in zip(cat.args[0], region.offsets, region.sizes):
            for name, positions in region.per_channel:
                for lo, hi in runs(source_indices(positions, off, size)):
                    slices.setdefault(src.meta[SEGMENT], []).append((name, src.name, lo, hi))

    params: dict[str, nn.Parameter] = {}  # the members' tensors, by name
    groups: list[GeZIG] = []
    excluded: list[Exclusion] = []
    for seg in segments:
        if seg.kind == "output":
            continue
        chain = [nodes_by_name[n] for n in seg.nodes]
        end = chain[-1]
        refused = [u for u in users(end) if REFUSED in u.meta]
        if not users(end) or not all(is_joint(u) or u in refused for u in users(end)):
            continue
        if not _has_params(seg, nodes_by_name, root):
            continue
        if refused:
            excluded.append(Exclusion(seg.nodes, f"feeds a concat that is no joint: {refused[0].meta[REFUSED]}"))
            continue
        # A node of the segment whose result nothing live reads (dead code beside the chain)
        # goes with the segment but is no member: its variables do not reach the output.
        chain = [n for n in chain if n.meta.get(LIVE)]
        start, why = _zeroing_start(chain, root, region_nodes)
        if start is None:
            excluded.append(Exclusion(seg.nodes, why))
            continue
        members: list[Member] = []
        seen: set[int] = set()
        shared = None
        for node in chain[start:]:
            for name, p in own_parameters(node, root):
                if id(p) in seen:
                    continue
                seen.add(id(p))
                outside = users_of_param[id(p)] - set(seg.nodes)
                if outside and shared is None:
                    shared = f"parameter '{name}' is also used by node '{sorted(outside)[0]}'"
                params[name] = p
                members.append(Member(name))
        for node_name, _src, lo, hi in slices.get(seg.id, []):
            node = nodes_by_name[node_name]
            for name, p in own_parameters(node, root):
                if users_of_param[id(p)] != {node_name} and shared is None:
                    shared = f"parameter '{name}' (sliced after a cat) is used by several nodes"
                params[name] = p
                members.append(Member(name, 0, lo, hi))
        if shared:
            excluded.append(Exclusion(seg.nodes, f"shared variables: {shared}"))
            continue
        groups.append(GeZIG(len(groups), seg.id, seg.nodes, tuple(members), _numel(members, params)))
    return groups, excluded


def _has_params(seg: Segment, nodes_by_name, root) -> bool:
    return any(own_parameters(nodes_by_name[n], root) for n in seg.nodes)


def _numel(members: list[Member], params: dict[str, nn.Parameter]) -> int:
    total = 0
    for m in members:
        p = params[m.param]
        total += p.numel() if m.dim is None else p.numel() // p.shape[m.dim] * (m.stop - m.start)
    return total


class SearchSpace:
    """The GeZIGs of a super-network and the hierarchy between them (DESIGN 3-4).

    ``graph`` is the traced graph, its targets paths in ``model``; ``gm`` wraps
    the two as a runnable ``GraphModule``, built on first use.  Both share the
    model's parameters, so ``zero_`` and H2SPG act on the user's own tensors.
    """

    def __init__(self, model: nn.Module, graph: fx.Graph, segments: list[Segment], groups: list[GeZIG],
                 excluded: list[Exclusion], channels: ChannelGroupSet | None = None,
                 heads: ChannelGroupSet | None = None):
        self.model = model
        self.example: tuple[tuple, dict] = ((), {})  # the example inputs (build_space sets them)
        self.stale = False  # True once construct_subnet(in_place=True) sliced the model
        self.graph = graph
        self.segments = segments
        self.excluded = excluded
        # Channel groups (fxoto.channels): the stems whose output channels lie in groups
        # (ChannelLayer, by stem node name); the groups, after ``groups``' operation groups,
        # and what each slices (``slices``) are made on first use.
        self.layers = channels.layers if channels is not None else {}
        self._operations = groups
        self._channels = channels
        # Head groups (fxoto.heads), after the channel groups: their projections' rows are
        # ChannelLayer rows, so that removing every head of an attention is refused.
        self._heads = heads
        self.attentions = heads.attentions if heads is not None else []
        if heads is not None:
            self.layers = {**self.layers, **heads.layers}
        nodes = {n.name: n for n in graph.nodes}
        self._segment_of_node = {name: seg.id for seg in segments for name in seg.nodes}
        # Per segment: joint kind of its head and which inputs carry the output
        # shape (an add whose only full-shape operands are gone is not fed).
        self._joint = []
        self._carrier = []
        for seg in segments:
            head = nodes[seg.nodes[0]]
            rule = head.meta.get(RULE)
            joint = rule.joint if seg.kind == "joint" else None
            self._joint.append(joint)
            if joint is Joint.ADD:
                shape = head.meta[SHAPE]
                self._carrier.append(tuple(n.meta[SHAPE] == shape for n in data_inputs(head)))
            else:
                self._carrier.append(tuple(True for _ in seg.inputs))
        self._users: list[list[int]] = [[] for _ in segments]
        for seg in segments:
            for i in seg.inputs:
                self._users[i].append(seg.id)
        self._output = next(s.id for s in segments if s.kind == "output")
        self._largest: dict[str | None, list[int]] = {}  # greedy walks by kind (None: all), see _largest_walk

    @functools.cached_property
    def groups(self) -> list[GeZIG]:
        """Every group by id: the operation groups, then the channel groups (made on first use)."""
        return (self._operations + (self._channels.groups if self._channels is not None else [])
                + (self._heads.groups if self._heads is not None else []))

    @functools.cached_property
    def slices(self) -> dict[int, Any]:
        """What each channel group slices (``fxoto.channels.ChannelSlice``), by group id."""
        found = dict(self._channels.slices) if self._channels is not None else {}
        if self._heads is not None:
            found.update(self._heads.slices)
        return found

    def removed_heads(self, ids: Iterable[int]) -> set[tuple[str, int]]:
        """(projection node, head) of every head the head groups among ``ids`` remove, with the heads that
        go with them (``fxoto.heads.Attention.closure``: a removed key/value head's query heads, a
        key/value head left without query heads)."""
        if self._heads is None:
            return set()
        removed = {h for i in ids for h in self._heads.heads.get(i, ())}
        return set().union(removed, *(a.closure(removed) for a in self.attentions))

    def _head_problem(self, ids: list[int]) -> str | None:
        """An attention left with no query head (its projections would have no rows)."""
        removed = self.removed_heads(ids)
        for a in self.attentions:
            if not a.kept_queries(removed):
                return (f"removing every head of the attention at node '{a.node}' (projections '{a.q}', '{a.k}', "
                        f"'{a.v}') would leave it with none; remove its operation group instead (structures='both')")
        return None

    @functools.cached_property
    def _seg_of_group(self) -> list[int | None]:
        return [g.segment if g.kind == "operation" else None for g in self.groups]

    @functools.cached_property
    def _rows_of_group(self) -> list[dict[str, int] | None]:
        """Per channel group: how many output channels of each stem it removes."""
        with _collector_paused():
            return self._count_rows()

    def _count_rows(self) -> list[dict[str, int] | None]:
        rows_of_group: list[dict[str, int] | None] = [None] * len(self.groups)
        for i, cut in self.slices.items():
            rows: dict[str, int] = {}
            for stem, _ in cut.rows:
                rows[stem] = rows.get(stem, 0) + 1
            rows_of_group[i] = rows
        return rows_of_group

    @functools.cached_property
    def _params(self) -> dict[str, nn.Parameter]:
        return dict(self.model.named_parameters(remove_duplicate=False))

    @functools.cached_property
    def gm(self) -> fx.GraphModule:
        """The traced graph as a ``GraphModule`` over the model's own submodules (built once, on first use)."""
        return graph_module(self.model, self.graph)

    # -- validity (DESIGN section 4) -------------------------------------------------
    def is_valid_removal(self, ids: Iterable[int]) -> bool:
        """True when erasing these groups leaves a graph that computes the same thing.

        The output must still be fed from the inputs, and every vertex that still
        reaches the output must itself be fed (a joint left without inputs would
        feed ``f(0)``, a bias say, downstream).
        """
        return self.removal_problem(ids) is None

    def removal_problem(self, ids: Iterable[int]) -> str | None:
        """Why erasing these groups is invalid (naming a node), or None when it is valid.

        Channel groups: removing every output channel of a stem erases the stem's segment
        where that is exact (``ChannelLayer.segment``: its channels end at concat joints),
        and is refused elsewhere; the segments so erased join the operation groups' in
        the dependency-graph check.
        """
        ids = self._known(ids)
        operations = {self._seg_of_group[i] for i in ids} - {None}
        if self.attentions and (problem := self._head_problem(
                [i for i in ids if not self._erases_attention(i, operations)])) is not None:
            return problem
        erased, problem = self.channel_erasures(ids)
        if problem is not None:
            return problem
        return self._graph_problem(erased | {self._seg_of_group[i] for i in ids} - {None})

    def _erases_attention(self, i: int, operations: set[int]) -> bool:
        """Whether head group ``i``'s attention lies in an erased operation group's segment."""
        g = self.groups[i]
        return g.kind == "head" and self._segment_of_node.get(g.nodes[0]) in operations

    def channel_erasures(self, ids: Iterable[int]) -> tuple[set[int], str | None]:
        """The segments erased because every channel of their stem is among ``ids``, and
        why the removal is refused (a stem losing every channel where that is not exact;
        a stem inside an operation group erased with it loses nothing that matters)."""
        ids = list(ids)
        gone: dict[str, int] = {}
        for i in set(ids):
            for stem, n in (self._rows_of_group[i] or {}).items():
                gone[stem] = gone.get(stem, 0) + n
        operations = {self._seg_of_group[i] for i in ids} - {None}
        complete = [stem for stem, n in gone.items() if n >= self.layers[stem].channels]
        erased = {self.layers[s].segment for s in complete} - {None} - operations
        for stem in complete:
            layer = self.layers[stem]
            if layer.segment is None and self._called_outside(stem, operations | erased):
                if layer.again:
                    calls = ", ".join(f"'{name}'" for name in (stem, *layer.again))
                    return erased, (f"removing all {gone[stem]} output channels of node '{stem}' would erase a "
                                    f"layer called at {len(layer.again) + 1} places (nodes {calls}): no joint can "
                                    f"drop the output of every call; fxoto keeps at least one channel of a shared "
                                    f"layer")
                return erased, (f"removing all {gone[stem]} output channels of node '{stem}' would erase it, and its "
                                f"channels do not end at concat joints that could drop it (or are tied to another "
                                f"stem's); fxoto keeps at least one channel of such a layer")
        return erased, None

    def _called_outside(self, stem: str, erased: set[int]) -> bool:
        """Some call of the stem's module (``ChannelLayer.again``) lies outside the ``erased`` segments."""
        return any(self._segment_of_node.get(name) not in erased for name in (stem, *self.layers[stem].again))

    @functools.cached_property
    def _pieces(self) -> list[SplitPiece]:
        return split_pieces(self.graph, self.segments)

    def emptied(self, erased: set[int]) -> tuple[set[int], list[SplitPiece], dict[int, str], str | None]:
        """The parts of splits after concats that erasing the ``erased`` segments leaves without
        a channel (DESIGN 6): the segments then gone (``erased`` and the parts' own), the parts,
        the segments left reading nothing (a stem that read such a part alone, by segment: why)
        and why the removal is refused, or None.

        An emptied part is erased up to the concat joints that take it, which drop it as they
        drop an erased input; a part emptied that way may empty a later split's part in turn.
        A segment left reading nothing is unfed: valid only where it no longer reaches the output.
        """
        gone, found, starved = set(erased), [], {}
        grew = bool(self._pieces)
        while grew:
            grew = False
            for piece in self._pieces:
                if piece in found or not all(owners & gone for owners in piece.owners):
                    continue
                what = f"removing them leaves part {piece.index} of node '{piece.split}' with no channel"
                if piece.problem is not None:
                    return gone, found, starved, f"{what}: {piece.problem}"
                readers = {segment: stem for stem, segment in reversed(piece.readers)}
                for segment in piece.partial | set(readers):
                    name = readers.get(segment, self.segments[segment].nodes[0])
                    starved.setdefault(segment, (
                        f"{what}, and node '{name}' would read nothing but still feeds the output: a layer that "
                        f"reads nothing puts out its bias, which a layer of zero width does not; erase '{name}' "
                        f"with that part, or keep a channel of it"))
                found.append(piece)
                gone |= piece.whole
                grew = True
        return gone, found, {s: why for s, why in starved.items() if s not in gone}, None

    def _graph_problem(self, erased: set[int]) -> str | None:
        """DESIGN 4 on the dependency graph of segments, ``erased`` gone (and the split parts
        that this empties, ``emptied``).  A segment that reads nothing is not fed."""
        erased, _, starved, problem = self.emptied(erased)
        if problem is not None:
            return problem
        fed = [False] * len(self.segments)
        for seg in self.segments:  # segments are in topological order
            if seg.id in erased or seg.id in starved:
                continue
            if seg.kind == "source":
                fed[seg.id] = True
            elif self._joint[seg.id] is not None:
                fed[seg.id] = any(fed[i] and c for i, c in zip(seg.inputs, self._carrier[seg.id]))
            else:
                fed[seg.id] = all(fed[i] for i in seg.inputs)
        reach = {self._output}
        stack = [self._output]
        while stack:
            s = stack.pop()
            for i in self.segments[s].inputs:
                if i not in erased and i not in reach:
                    reach.add(i)
                    stack.append(i)
        for s in sorted(reach):
            if s in starved:
                return starved[s]
            if not fed[s]:
                return f"node '{self.segments[s].nodes[0]}' would lose all of its inputs but still feeds the output"
        return None

    def _known(self, ids: Iterable[int]) -> list[int]:
        """``ids`` as a list, each checked to name a group (a negative id would silently pick one from the end)."""
        ids = list(ids)
        n = len(self.groups)
        unknown = [i for i in ids if isinstance(i, bool) or not hasattr(i, "__index__") or not 0 <= operator.index(i) < n]
        if unknown:
            valid = f"ids run 0..{n - 1}" if n else "it has no GeZIG at all"
            raise UnknownGroupError(
                f"no GeZIG with id {', '.join(map(repr, unknown))} in this search space of {type(self.model).__name__}: "
                f"{valid} (see space.groups)"
            )
        return [operator.index(i) for i in ids]

    def check_removal(self, ids: Iterable[int]) -> None:
        problem = self.removal_problem(ids)
        if problem is not None:
            raise InvalidRemovalError(f"erasing groups {sorted(ids)} is not a valid removal: {problem}")

    # -- variables -------------------------------------------------------------------
    def tensors(self, group: GeZIG | int) -> list[torch.Tensor]:
        """Views of the group's members in the live parameters."""
        g = self.groups[self._known([group])[0]] if isinstance(group, int) else group
        out = []
        for m in g.members:
            p = self._params[m.param]
            out.append(p if m.dim is None else p.narrow(m.dim, m.start, m.stop - m.start))
        return out

    @torch.no_grad()
    def zero_(self, ids: Iterable[int]) -> None:
        """Set these groups exactly to zero, in place (in the user's parameters): one write per
        parameter, however many channel groups hold its rows."""
        chosen = np.zeros(len(self.groups), dtype=bool)
        chosen[self._known(ids)] = True
        for (name, dim), (group, start, stop) in self._members_by_param.items():
            take = chosen[group]
            if not take.any():
                continue
            p = self._params[name]
            if dim is None:
                p.zero_()
            else:
                rows = _ranges(start[take], stop[take] - start[take])
                p.index_fill_(dim, torch.from_numpy(rows).to(p.device), 0)

    @torch.no_grad()
    def zero_groups(self) -> list[int]:
        """Ids of the groups whose members are all exactly zero now (one read per parameter)."""
        nonzero = np.zeros(len(self.groups), dtype=np.int64)
        for (name, dim), (group, start, stop) in self._members_by_param.items():
            p = self._params[name]
            if dim is None:
                if p.any():
                    nonzero[group] += 1
                continue
            rows = p.detach().movedim(dim, 0).reshape(p.shape[dim], -1).ne(0).any(1)
            before = np.concatenate([[0], np.cumsum(rows.cpu().numpy())])  # nonzero rows before each row
            np.add.at(nonzero, group, before[stop] > before[start])
        return np.flatnonzero(nonzero == 0).tolist()

    @functools.cached_property
    def _members_by_param(self) -> dict[tuple[str, int | None], tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Every group's members, by (parameter, dim): arrays of their group ids, starts and stops."""
        with _collector_paused():
            return self._tabulate_members()

    def _tabulate_members(self) -> dict[tuple[str, int | None], tuple[np.ndarray, np.ndarray, np.ndarray]]:
        table: dict[tuple[str, int | None], list[tuple[int, int, int]]] = defaultdict(list)
        for g in self.groups:
            for m in g.members:
                table[(m.param, m.dim)].append((g.id, m.start, m.stop))
        return {key: tuple(np.array(column, dtype=np.int64) for column in zip(*rows)) for key, rows in table.items()}

    def construct_subnet(self, ids: Iterable[int] | None = None, *, in_place: bool = False) -> fx.GraphModule | nn.Module:
        """The sub-network: a new GraphModule with every exactly-zero group erased (paper 3.3).

        ``ids`` overrides which groups go (they need not be zero: their
        contribution is then dropped, so the output changes).  ``in_place=True``
        slices the model's own modules instead and returns the model, of its own
        class (``fxoto.inplace``: channel and head groups only).
        """
        if in_place:
            from fxoto.inplace import construct_in_place

            return construct_in_place(self, ids)
        from fxoto.subnet import construct_subnet

        return construct_subnet(self, ids)

    def greedy_removal(self, order: Iterable[int], limit: int | None = None) -> list[int]:
        """Walk ``order``, keeping each group while the removal stays valid, up to ``limit``.

        Every prefix of the result is itself a valid removal (each group was
        accepted on top of the ones before it).  The walk behind
        ``sample_removal``, ``greedy_max_removal`` and ``select_removal``.

        A channel group is checked by counting its stems' removed channels (its rule in
        ``removal_problem``), and the dependency graph only when it takes a stem's last
        channel (erasing the stem's segment), so a walk over tens of thousands of channel
        groups stays linear.
        """
        chosen: list[int] = []
        erased: set[int] = set()  # segments: the operation groups' and those of stems with no channel left
        gone: dict[int, None] = {}
        per_stem: dict[str, int] = {}
        for i in self._known(order):
            if limit is not None and len(chosen) >= limit:
                break
            rows = self._rows_of_group[i]
            if rows is None:
                if self._graph_problem(erased | {self._seg_of_group[i]}) is None:
                    erased.add(self._seg_of_group[i])
                    chosen.append(i)
                continue
            if i in gone:
                chosen.append(i)
                continue
            last = {self.layers[s].segment for s, n in rows.items()
                    if per_stem.get(s, 0) + n >= self.layers[s].channels and self._called_outside(s, erased)}
            if None in last or (last and self._graph_problem(erased | last) is not None):
                continue
            erased |= last
            for s, n in rows.items():
                per_stem[s] = per_stem.get(s, 0) + n
            gone[i] = None
            chosen.append(i)
        return chosen

    def select_removal(self, order: Sequence[int], k: int) -> list[int]:
        """A valid removal of exactly ``k`` groups, preferring the front of ``order``.

        Validity is not monotone: a group that cannot go alone may go together with
        another (both branches of an ``add`` erased is invalid until the segment
        after the ``add`` goes too).  So one walk in ``order`` can stop short of
        ``k`` where a valid removal of ``k`` exists.  The search goes on in three
        steps, each taken only when the one before fell short:

        1. walk ``order`` again and again, each pass offering the groups left over,
           until a pass adds nothing;
        2. then offer pairs of left-over groups (in ``order``, the first ``PAIRS_TRIED``
           pairs), a pair going in together when neither fits alone;
        3. then fall back to the first ``k`` groups of ``greedy_max_removal``'s walk,
           the removal ``target_k`` accepted ``k`` on: every prefix of a greedy
           walk is valid, so this always succeeds when ``target_k`` accepted ``k``.

        Returns the ids in the order they were accepted; fewer than ``k`` only when
        ``k`` exceeds what ``target_k`` would accept.
        """
        order = list(order)
        chosen = self.greedy_removal(order, k)
        while len(chosen) < k:
            grown = self.greedy_removal(chosen + [i for i in order if i not in chosen], k)
            if len(grown) == len(chosen):
                break
            chosen = grown
        while len(chosen) + 2 <= k:
            rest = [i for i in order if i not in chosen]
            pairs = itertools.islice(((a, b) for n, a in enumerate(rest) for b in rest[n + 1:]), PAIRS_TRIED)
            pair = next((ab for ab in pairs if self.is_valid_removal(chosen + list(ab))), None)
            if pair is None:
                break
            chosen = self.greedy_removal(chosen + list(pair) + [i for i in rest if i not in pair], k)
        if len(chosen) < k:
            largest = self._largest_walk()
            if len(largest) >= k:
                return list(largest[:k])
        return chosen

    def sample_removal(self, fraction: float = 0.5, seed: int = 0) -> list[int]:
        """A random valid removal of up to ``fraction`` of the groups (at least one).

        Groups are tried in a seeded random order: handy for benchmarks and for
        exploring a search space.
        """
        order = torch.randperm(len(self.groups), generator=torch.Generator().manual_seed(seed)).tolist()
        return self.greedy_removal(order, max(1, int(fraction * len(order))))

    def greedy_max_removal(self) -> list[int]:
        """A large valid removal found greedily (a lower bound on the largest one), sorted.

        Computed once: the groups and the graph never change (``target_k`` checks K
        against it and ``select_removal`` falls back on its walk; on DARTS one walk
        takes a second).
        """
        return sorted(self._largest_walk())

    def _largest_walk(self, kind: str | None = None) -> list[int]:
        """The longer of the greedy walks forwards and backwards over the groups (of one
        ``kind``, or all), in the walk's own order, whose prefixes are valid removals;
        computed once per kind."""
        if kind not in self._largest:
            ids = [g.id for g in self.groups if kind is None or g.kind == kind]
            self._largest[kind] = max((self.greedy_removal(order) for order in (ids, ids[::-1])), key=len)
        return self._largest[kind]

    def __repr__(self) -> str:
        return f"SearchSpace({type(self.model).__name__}: {len(self.groups)} GeZIGs, {len(self.segments)} segments)"
