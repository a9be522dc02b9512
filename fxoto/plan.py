"""The layout of a set of groups' members by parameter, and the reductions over it.

H2SPG (``fxoto.optimizer``) steps over parameters, never over groups, so that a step
costs the same with five GeZIGs or tens of thousands of channel groups.  ``make_plan``
lays the members of a set of groups out by parameter (``Plan``): a parameter is one
whole member, or holds members along one dim, each slice along that dim a *row*.  A
step takes per-row inner products (``tensor_dots`` for a whole member, ``row_dots``
for rows, ``foreach_dots`` for many whole members in multi-tensor calls), weighs them
(``row_products``) and sums them per group with one ``index_add_`` (``group_sums``),
where the rules of ``fxoto.h2spg_rules`` read them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class Part(NamedTuple):
    """One member of a GeZIG, resolved to the live parameter."""

    param: Tensor
    dim: int | None
    start: int
    length: int


class Plan(NamedTuple):
    """The parameters that hold the members of a set of groups, laid out for one step's
    reductions and updates, so that a step loops over parameters, never over groups.

    A parameter is one whole member (``dims[i]`` None) or holds members along one dim,
    its slices along that dim being its "rows"; a whole member is one row.  Reductions
    are taken per row, the rows of ``params`` concatenated in order (parameter i's from
    ``offsets[i]``; the ``whole`` whole members come first): ``row_group[r]`` is row r's
    group (``n``, one past the last group, for a row outside the plan's groups) and
    ``row_param[r]`` its parameter's position.  Per-group sums are one ``index_add_``
    over the rows (``group_sums``).  ``rows_in[i]``: the rows of sliced parameter i in
    the plan's groups; ``mask`` marks the plan's groups, ``numel`` their sizes.
    """

    name: str
    params: list[Tensor]
    dims: list[int | None]
    offsets: list[int]
    position: dict[int, int]
    whole: int
    row_group: Tensor
    row_param: Tensor
    rows_in: dict[int, Tensor]
    mask: Tensor
    numel: Tensor
    order: Tensor  # each parameter's position among the optimizer's (param_groups order)


def make_plan(name: str, groups: Iterable[int], parts: list[list[Part]], numel: list[int], order: list[Tensor],
              names: dict[int, str], device: torch.device) -> Plan:
    """Lay out the members of ``groups`` by parameter (see ``Plan``).

    ``parts``: every group's members (``Part``), by group id; ``numel``: every group's size;
    ``order``: the optimizer's parameters in param_groups order; ``names``: parameter names
    by ``id``, for the error message."""
    n = len(parts)
    groups = sorted(set(groups))
    whole: dict[int, tuple[Tensor, int]] = {}
    sliced: dict[int, tuple[Tensor, int, list[int]]] = {}
    for g in groups:
        for part in parts[g]:
            key = id(part.param)
            if part.dim is None:
                whole[key] = (part.param, g)
                continue
            p, dim, rows = sliced.setdefault(key, (part.param, part.dim, [n] * part.param.shape[part.dim]))
            if dim != part.dim:
                raise ValueError(f"parameter '{names.get(key, '?')}' holds GeZIG members along dims {dim} "
                                 f"and {part.dim}: H2SPG slices a parameter along one dim")
            rows[part.start:part.start + part.length] = [g] * part.length
    # A parameter both whole in one group and sliced in others (a norm after a concat
    # that also lies in a later segment's group): each row goes to the group holding it
    # as a slice, the other rows to the group holding the whole parameter.
    for key in whole.keys() & sliced.keys():
        _, owner = whole.pop(key)
        rows = sliced[key][2]
        rows[:] = [owner if g == n else g for g in rows]
    params = [p for p, _ in whole.values()] + [p for p, _, _ in sliced.values()]
    row_group = [g for _, g in whole.values()]
    offsets = list(range(len(whole)))
    counts = [1] * len(whole)
    rows_in = {}
    for i, (_, _, rows) in enumerate(sliced.values(), start=len(whole)):
        offsets.append(len(row_group))
        counts.append(len(rows))
        row_group += rows
        rows_in[i] = torch.tensor([r for r, g in enumerate(rows) if g != n], dtype=torch.long).to(device)
    sizes = torch.zeros(n, dtype=torch.float64)
    mask = torch.zeros(n, dtype=torch.bool)
    where = {id(p): i for i, p in enumerate(order)}
    for g in groups:
        sizes[g] = float(numel[g])
        mask[g] = True
    return Plan(
        name, params, [None] * len(whole) + [dim for _, dim, _ in sliced.values()], offsets,
        {id(p): i for i, p in enumerate(params)}, len(whole),
        torch.tensor(row_group, dtype=torch.long).to(device),
        torch.repeat_interleave(torch.arange(len(params)), torch.tensor(counts, dtype=torch.long)).to(device),
        rows_in, mask.to(device), sizes.to(device),
        torch.tensor([where[id(p)] for p in params], dtype=torch.long).to(device),
    )


def group_sums(plan: Plan, values: Tensor) -> Tensor:
    """[n, k]: the rows' ``values`` [R, k] summed per group in float64 (rows outside the plan's
    groups dropped)."""
    n = plan.mask.shape[0]
    sums = torch.zeros(n + 1, values.shape[1], dtype=torch.float64, device=plan.mask.device)
    return sums.index_add_(0, plan.row_group, values.double())[:-1]


# -- per-row inner products ----------------------------------------------------------------


def flat(t: Tensor) -> Tensor:
    return t if t.dim() == 1 else t.reshape(-1)


def rows_of(t: Tensor, dim: int) -> Tensor:
    """``t`` as [rows, -1], one row per slice along ``dim`` (a view when dim is 0)."""
    if dim != 0:
        t = t.movedim(dim, 0)
    return t.reshape(t.shape[0], -1)


def tensor_dots(x: Tensor, v: Tensor) -> list[Tensor]:
    """||x||, x.v, ||v||: the norms one read of the tensor each, where a dot product of a tensor
    with itself reads it twice (``row_products`` squares them in float64, for every row at once)."""
    x, v = flat(x), flat(v)
    return [torch.linalg.vector_norm(x), torch.dot(x, v), torch.linalg.vector_norm(v)]


ROW_BLOCK = 1 << 20  # elements per block of rows in row_dots: its temporary stays in the cache


def row_dots(x: Tensor, v: Tensor | None, dim: int) -> Tensor:
    """[rows, 3]: ||x||, x.v, ||v|| of each slice along ``dim`` (v None: ||x||, 0, 0), in x's dtype
    (``row_products`` casts and squares every parameter's rows at once: few calls per parameter,
    which is what a step over a ResNet's 160 parameters pays for beside the arithmetic).

    Norms are one read each; x.v is taken in blocks of rows of at most ``ROW_BLOCK``
    elements, so that its temporary x * v stays small (a linear layer's weight can hold a
    hundred million)."""
    xr = rows_of(x, dim)
    xx = torch.linalg.vector_norm(xr, dim=1)
    if v is None:
        return F.pad(xx.unsqueeze(1), (0, 2))
    vr = rows_of(v, dim)
    step = max(1, ROW_BLOCK // max(1, xr.shape[1]))
    if xr.shape[0] <= step:
        xv = torch.linalg.vecdot(xr, vr, dim=1)
    else:
        xv = torch.cat([torch.linalg.vecdot(xb, vb, dim=1) for xb, vb in zip(xr.split(step), vr.split(step))])
    return torch.stack([xx, xv, torch.linalg.vector_norm(vr, dim=1)], 1)


def foreach_dots(xs: list[Tensor], vs: list[Tensor]) -> Tensor:
    """[M, 3]: ||x||, x.v, ||v|| per pair, in multi-tensor calls (float64).

    torch has no multi-tensor inner product or sum; x.v is the 1-norm of the products'
    positive part twice, less the 1-norm of all of them, which keeps its error to rounding
    of |x||v| (polarization, ||x + v||^2 - ||x||^2 - ||v||^2, loses a gradient much smaller
    than its weights: v vanishes from x + v)."""
    xx = torch.stack(torch._foreach_norm(xs)).double()
    vv = torch.stack(torch._foreach_norm(vs)).double()
    products = torch._foreach_mul(xs, vs)
    total = torch.stack(torch._foreach_norm(products, 1)).double()
    torch._foreach_clamp_min_(products, 0.0)
    xv = 2.0 * torch.stack(torch._foreach_norm(products, 1)).double() - total
    return torch.stack([xx, xv, vv], 1)


def gather_dots(plan: Plan, found: dict[int, Tensor | list[Tensor]]) -> tuple[Tensor | None, list[Tensor]]:
    """The plan's inner products from a loop over tensors, by plan position (``tensor_dots`` for a
    whole member, ``row_dots`` for a sliced parameter), as ``row_products`` takes them: [W, 3]
    for the whole members, then [rows, 3] per sliced parameter.  A parameter without a gradient
    this step gets its ||x|| alone, measured now."""
    whole = torch.stack([torch.stack(found[i]) if i in found
                         else F.pad(torch.linalg.vector_norm(plan.params[i]).reshape(1), (0, 2))
                         for i in range(plan.whole)]) if plan.whole else None
    rows = [found[i] if i in found else row_dots(plan.params[i], None, plan.dims[i])
            for i in range(plan.whole, len(plan.params))]
    return whole, rows


def row_products(plan: Plan, whole: Tensor | None, rows: list[Tensor], c: Tensor) -> Tensor:
    """[R, 3] per row of the plan: ||x||^2, x.v, ||v||^2 for v = c num, in float64, from the
    whole members' and the sliced parameters' ||x||, x.num, ||num|| ([W, 3], then [rows, 3]
    each) and each parameter's c (``c[i]`` for plan parameter i: step / lr, the direction is c
    times the step's numerator)."""
    blocks = ([whole] if whole is not None else []) + rows
    if not blocks:
        return torch.zeros(0, 3, dtype=torch.float64, device=plan.mask.device)
    rows = (torch.cat(blocks) if len(blocks) > 1 else blocks[0]).double()
    c = c[plan.row_param]
    return rows * torch.stack([rows[:, 0], c, c * c * rows[:, 2]], 1)


def group_sq_norms(plan: Plan) -> Tensor:
    """||x_g||^2 of every group (float64; 0 outside the plan's groups)."""
    whole = plan.params[:plan.whole]
    blocks = [torch.stack(torch._foreach_norm(whole)).double().square()] if whole else []
    blocks += [torch.linalg.vector_norm(rows_of(p, dim), dim=1).double().square()
               for p, dim in zip(plan.params[plan.whole:], plan.dims[plan.whole:])]
    values = torch.cat(blocks)[:, None] if blocks else torch.zeros(0, 1, dtype=torch.float64,
                                                                   device=plan.mask.device)
    return group_sums(plan, values)[:, 0]


def exact_zero(plan: Plan) -> Tensor:
    """Which groups are exactly zero now (every member, on the device)."""
    whole = plan.params[:plan.whole]
    blocks = [torch.stack([p.count_nonzero() for p in whole])] if whole else []
    blocks += [rows_of(p, dim).count_nonzero(1) for p, dim in zip(plan.params[plan.whole:], plan.dims[plan.whole:])]
    counts = torch.cat(blocks).double()[:, None] if blocks else torch.zeros(0, 1, dtype=torch.float64,
                                                                           device=plan.mask.device)
    return group_sums(plan, counts)[:, 0] == 0


@torch.no_grad()
def zero_members(plan: Plan, state: dict, whole: bool = True) -> None:
    """Set the plan's members and their optimizer state (``state[p]``'s tensors of p's shape:
    momentum, Adam moments) to zero (with ``whole`` False, the sliced ones only)."""
    for i, p in enumerate(plan.params):
        dim = plan.dims[i]
        if dim is None and not whole:
            continue
        for t in [p, *(v for v in state.get(p, {}).values() if isinstance(v, Tensor) and v.shape == p.shape)]:
            if dim is None:
                t.zero_()
            else:
                t.index_fill_(dim, plan.rows_in[i], 0)
