"""``fxoto.search``: the one call from a super-network to its search space."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from fxoto.channels import find_channel_groups
from fxoto.errors import NoSearchSpaceError
from fxoto.heads import find_head_groups
from fxoto.roles import DEFAULT_TABLE, OpTable
from fxoto.segments import LIVE, Segment, annotate_rules, cut_segments, own_parameters
from fxoto.space import (  # noqa: F401 (resolve_k: re-exported)
    GeZIG, SearchSpace, _numel, find_gezigs, kind_counts, resolve_k, target_k, zeroed_by_own_variables,
)
from fxoto.trace import trace
from fxoto.uniform import check_uniform

STRUCTURES = ("operations", "channels", "both")


def build_space(
    model: nn.Module,
    example_inputs: Sequence[Any],
    *,
    leaf_modules: Iterable[type | str] = (),
    concrete_args: dict[str, Any] | None = None,
    op_table: OpTable = DEFAULT_TABLE,
    structures: str = "operations",
    example_kwargs: dict[str, Any] | None = None,
    tracer: str = "auto",
) -> SearchSpace:
    """Trace, annotate, cut segments and form the groups (Algorithm 2).

    ``structures``: ``"operations"`` (GeZIGs, the default), ``"channels"`` (one group per
    output channel of the stems ``fxoto.channels`` can slim) or ``"both"`` (operations
    first, so their ids are those of ``"operations"``).
    """
    if structures not in STRUCTURES:
        raise ValueError(f"structures must be one of {', '.join(map(repr, STRUCTURES))}; got {structures!r}")
    graph = trace(model, example_inputs, leaf_modules, concrete_args, example_kwargs=example_kwargs,
                  tracer=tracer, op_table=op_table)
    annotate_rules(graph, model, op_table)
    segments = cut_segments(graph)
    groups, excluded, channels = [], [], None
    if structures != "channels":
        groups, excluded = find_gezigs(graph, model, segments)
    heads = None
    if structures != "operations":
        taken = _decisive_nodes(groups, segments, graph, model)
        channels = find_channel_groups(graph, model, len(groups), taken)
        heads = find_head_groups(graph, model, len(groups) + len(channels.groups), taken, channels.params)
        groups = _without_channels(groups, channels.params | heads.params, model)
        held = set(heads.layers)
        excluded = excluded + [e for e in channels.excluded if not held.intersection(e.nodes)] + heads.excluded
    space = SearchSpace(model, graph, segments, groups, excluded, channels, heads)
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    space.example = (tuple(example_inputs), dict(example_kwargs or {}))  # what in_place=True checks on
    return space


def _decisive_nodes(groups: list[GeZIG], segments: list[Segment], graph: fx.Graph, root: nn.Module) -> set[str]:
    """The nodes of the operation groups that the channel groups leave alone (``"both"``).

    An operation group's segment ends in the nodes that decide its output: from the last
    node whose own variables zero its output (``zeroed_by_own_variables``: a stem, an
    affine norm) to the end, every node maps zero to zero (the group's zeroing walk
    checked that).  Those stay whole in the operation group, so that zeroing it
    still zeroes the segment's output.  The layers before them (a bottleneck's first two
    convolutions) may be slimmed by channel groups, which then hold their variables: the
    two kinds nest, disjoint, and a block can be made thinner or erased.  A group whose
    members are slices after a concat stays whole, and so do the per-channel nodes after the
    concat that hold those slices (their other channels may come from a layer that channel
    groups slim, a shared stem say: a channel group must not take the whole variable).
    """
    nodes = {n.name: n for n in graph.nodes}
    by_id = {seg.id: seg for seg in segments}
    holding: dict[str, set[str]] = {}  # parameter name: the nodes that use it
    for node in graph.nodes:
        if node.op in ("call_module", "call_function", "call_method"):
            for name, _ in own_parameters(node, root):
                holding.setdefault(name, set()).add(node.name)
    decisive: set[str] = set()
    for g in groups:
        chain = [nodes[n] for n in by_id[g.segment].nodes if nodes[n].meta.get(LIVE)]
        last = next((i for i in reversed(range(len(chain))) if zeroed_by_own_variables(chain[i], root)), None)
        if last is None or any(m.dim is not None for m in g.members):
            decisive.update(g.nodes)
            decisive.update(name for m in g.members if m.dim is not None for name in holding.get(m.param, ()))
        else:
            decisive.update(n.name for n in chain[last:])
    return decisive


def _without_channels(groups: list[GeZIG], held: set[str], root: nn.Module) -> list[GeZIG]:
    """The operation groups less the parameters that channel groups hold (``held``, ``_decisive_nodes``)."""
    if not held:
        return groups
    params = dict(root.named_parameters(remove_duplicate=False))
    out = []
    for g in groups:
        members = tuple(m for m in g.members if m.param not in held)
        out.append(g if len(members) == len(g.members) else
                   replace(g, members=members, numel=_numel(list(members), params)))
    return out


class Search:
    """A super-network with its search space and target group sparsity K."""

    def __init__(self, model: nn.Module, K: int | float | dict[str, int | float], space: SearchSpace,
                 uniform: bool = False):
        self.model = model
        self.space = space
        self.K = target_k(K, space)  # the count; K as given goes to H2SPG (a dict per kind stays one)
        self.K_per_kind = kind_counts(K, space)
        self.uniform = uniform
        if uniform:
            check_uniform(space, self.K_per_kind)
        self._requested = K
        self.opt = None
        self.history = None

    def optimizer(self, lr: float | None = None, *, total_steps: int | None = None, **kwargs):
        """An ``fxoto.H2SPG`` over the model's parameters, targeting K zero groups.

        With ``total_steps`` (the run length), the phases default to a warm-up
        of 10% of the run and a pruning phase over the next 40%, so the rest of
        the run trains the sub-network's variables with the zeros in place.
        """
        from fxoto.optimizer import H2SPG

        if total_steps is not None:
            kwargs.setdefault("warmup_steps", max(1, total_steps // 10))
            kwargs.setdefault("pruning_steps", max(1, (2 * total_steps) // 5))
        if lr is None:
            lr = 0.05 if kwargs.get("variant", "sgd") == "sgd" else 1e-3
        kwargs.setdefault("uniform", self.uniform)
        self.opt = H2SPG(self.space, self._requested, lr, **kwargs)
        return self.opt

    def fit(self, train_loader, loss_fn, epochs: int, val_loader=None, device=None, amp=None, **kwargs):
        """Train with H2SPG (created with run-length defaults if ``.optimizer()`` was not called).

        ``device``: where to train (``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"auto"``); the model is
        moved there before the optimizer is created (or with its state, if it exists). Default: the
        model's device. Batches are moved to it as they come. ``amp``: ``"bf16"`` or ``"fp16"`` for
        mixed precision. Under a process group of several ranks (``torchrun``), training runs in
        ``DistributedDataParallel`` on each rank's share of the loaders, and the run-length
        defaults count this rank's share of ``train_loader``.

        Other keyword arguments go to ``fxoto.train.fit``: ``scheduler``, ``checkpoint_dir``,
        ``resume``, ``progress``, ``stream``, ``log_every``, ``map_location``.
        """
        from fxoto import distributed
        from fxoto.train import fit, resolve_device

        distributed.check_model(self.model, self.space)
        if device is not None:
            device = resolve_device(device)
            if self.opt is None:
                self.model.to(device)
        if distributed.world_size() > 1:
            train_loader = distributed.shard_train_loader(train_loader)
        if self.opt is None:
            self.optimizer(total_steps=epochs * len(train_loader))
        self.history = fit(self.model, self.opt, train_loader, loss_fn, epochs, val_loader=val_loader,
                           device=device, amp=amp, **kwargs)
        return self.history

    def subnet(self, in_place: bool = False):
        """The sub-network: a ``torch.fx.GraphModule`` with every zero GeZIG erased, or with
        ``in_place=True`` the model itself, sliced (``SearchSpace.construct_subnet``)."""
        return self.space.construct_subnet(in_place=in_place)

    def report(self, example_inputs=None, val_loader=None) -> str:
        """A table: groups erased, parameters, MACs, accuracy and the largest output difference."""
        from fxoto.report import search_report

        return search_report(self, example_inputs, val_loader).table

    def __repr__(self) -> str:
        return f"Search(K={self.K}, {self.space!r})"


def search(
    model: nn.Module,
    K: int | float | dict[str, int | float],
    example_inputs: Sequence[Any] = (),
    *,
    example_kwargs: dict[str, Any] | None = None,
    tracer: str = "auto",
    leaf_modules: Iterable[type | str] = (),
    concrete_args: dict[str, Any] | None = None,
    op_table: OpTable = DEFAULT_TABLE,
    structures: str = "operations",
    uniform: bool = False,
) -> Search:
    """Build the search space of ``model`` and prepare to remove ``K`` groups.

    ``K`` is a count (int), a fraction of the groups (float in (0, 1)) or a dict per
    kind (``{"channels": 0.5}``, for a search space of that kind alone).
    ``example_inputs`` is a tensor or a tuple of the forward's arguments.
    ``structures``: ``"operations"`` (GeZIGs), ``"channels"`` or ``"both"`` (see ``build_space``).
    ``example_kwargs``: keyword arguments of the forward (``attention_mask=...``).
    ``tracer``: ``"auto"`` (torch.fx, else ``torch.export``), ``"fx"`` or ``"export"`` (``fxoto.trace.trace``).
    ``uniform``: H2SPG removes the same number of heads and of neurons in every block
    (``fxoto.uniform``), so that ``construct_subnet(in_place=True)`` can rewrite a
    Hugging Face config; K is then given per kind.
    """
    space = build_space(model, example_inputs, leaf_modules=leaf_modules, concrete_args=concrete_args,
                        op_table=op_table, structures=structures, example_kwargs=example_kwargs, tracer=tracer)
    if not space.groups and structures != "operations":
        why = "".join(f"\n  - {' -> '.join(e.nodes)}: {e.reason}" for e in space.excluded)
        raise NoSearchSpaceError(
            f"{type(model).__name__} has no removable structure with structures={structures!r}."
            + (f"\nSet aside:{why}" if why else "")
        )
    if not space.groups:
        why = "".join(f"\n  - {' -> '.join(e.nodes)}: {e.reason}" for e in space.excluded)
        raise NoSearchSpaceError(
            f"{type(model).__name__} has no removable structure: no segment with trainable variables "
            f"ends only at joints (add / channel cat). A plain chain such as VGG or AlexNet has nothing "
            f"to search as operations; slim its layers with structures='channels', or add residual or "
            f"multi-branch blocks." + (f"\nSegments set aside:{why}" if why else "")
        )
    return Search(model, K, space, uniform)
