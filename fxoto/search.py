"""``fxoto.search``: the one call from a super-network to its search space."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from torch import nn

from fxoto.errors import KTooLargeError, NoSearchSpaceError
from fxoto.roles import DEFAULT_TABLE, OpTable
from fxoto.segments import annotate_rules, cut_segments
from fxoto.space import SearchSpace, find_gezigs
from fxoto.trace import trace


def build_space(
    model: nn.Module,
    example_inputs: Sequence[Any],
    *,
    leaf_modules: Iterable[type | str] = (),
    concrete_args: dict[str, Any] | None = None,
    op_table: OpTable = DEFAULT_TABLE,
) -> SearchSpace:
    """Trace, annotate, cut segments and form GeZIGs (Algorithm 2)."""
    graph = trace(model, example_inputs, leaf_modules, concrete_args)
    annotate_rules(graph, model, op_table)
    segments = cut_segments(graph)
    groups, excluded = find_gezigs(graph, model, segments)
    return SearchSpace(model, graph, segments, groups, excluded)


def resolve_k(K: int | float, space: SearchSpace) -> int:
    """K as a count: an int, or a float in (0, 1) as a fraction of the GeZIGs."""
    n = len(space.groups)
    if isinstance(K, bool) or not isinstance(K, (int, float)):
        raise TypeError(f"K must be an int count or a float fraction in (0, 1), not {K!r}")
    if isinstance(K, float):
        if not 0.0 < K < 1.0:
            raise ValueError(f"a fractional K must lie in (0, 1); got {K}")
        return max(1, round(K * n))
    if K < 0:
        raise ValueError(f"K must be >= 0; got {K}")
    return K


def target_k(K: int | float, space: SearchSpace) -> int:
    """K as a count, refused with ``KTooLargeError`` when no valid removal is that large."""
    k = resolve_k(K, space)
    n = len(space.groups)
    name = type(space.model).__name__
    if k > n:
        raise KTooLargeError(f"K={K} asks for {k} zero groups but {name} has only {n} GeZIGs")
    largest = space.greedy_max_removal()
    if k > len(largest):
        raise KTooLargeError(
            f"K={k} is larger than any valid removal fxoto found in {name}: at most {len(largest)} of its "
            f"{n} GeZIGs can be erased together while the output stays fed from the input (erasing more "
            f"would leave a joint with no input). Choose K <= {len(largest)}."
        )
    return k


class Search:
    """A super-network with its search space and target group sparsity K."""

    def __init__(self, model: nn.Module, K: int | float, space: SearchSpace):
        self.model = model
        self.space = space
        self.K = target_k(K, space)
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
        self.opt = H2SPG(self.space, self.K, lr, **kwargs)
        return self.opt

    def fit(self, train_loader, loss_fn, epochs: int, val_loader=None, **kwargs):
        """Train with H2SPG (created with run-length defaults if ``.optimizer()`` was not called).

        Keyword arguments go to ``fxoto.train.fit``: ``scheduler``,
        ``checkpoint_dir``, ``resume``, ``progress``.
        """
        from fxoto.train import fit

        if self.opt is None:
            self.optimizer(total_steps=epochs * len(train_loader))
        self.history = fit(self.model, self.opt, train_loader, loss_fn, epochs, val_loader=val_loader, **kwargs)
        return self.history

    def subnet(self):
        """The sub-network: a ``torch.fx.GraphModule`` with every zero GeZIG erased."""
        return self.space.construct_subnet()

    def report(self, example_inputs=None, val_loader=None) -> str:
        """A table: groups erased, parameters, MACs, accuracy and the largest output difference."""
        from fxoto.report import search_report

        return search_report(self, example_inputs, val_loader).table

    def __repr__(self) -> str:
        return f"Search(K={self.K}, {self.space!r})"


def search(
    model: nn.Module,
    K: int | float,
    example_inputs: Sequence[Any],
    *,
    leaf_modules: Iterable[type | str] = (),
    concrete_args: dict[str, Any] | None = None,
    op_table: OpTable = DEFAULT_TABLE,
) -> Search:
    """Build the search space of ``model`` and prepare to remove ``K`` GeZIGs.

    ``K`` is a count (int) or a fraction of the GeZIGs (float in (0, 1)).
    ``example_inputs`` is a tensor or a tuple of the forward's arguments.
    """
    space = build_space(model, example_inputs, leaf_modules=leaf_modules, concrete_args=concrete_args, op_table=op_table)
    if not space.groups:
        why = "".join(f"\n  - {' -> '.join(e.nodes)}: {e.reason}" for e in space.excluded)
        raise NoSearchSpaceError(
            f"{type(model).__name__} has no removable structure: no segment with trainable variables "
            f"ends only at joints (add / channel cat). A plain chain such as VGG or AlexNet has nothing "
            f"to search; add residual or multi-branch blocks." + (f"\nSegments set aside:{why}" if why else "")
        )
    return Search(model, K, space)
