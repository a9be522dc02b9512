"""The arithmetic of an H2SPG step, one set of module-level functions per execution path.

As in ``torch.optim`` (``sgd.py``'s ``_single_tensor_sgd`` and ``_multi_tensor_sgd``), the
optimizer class (``fxoto.optimizer.H2SPG``) holds the settings, the state and the phases,
and calls one of two paths, chosen by its ``foreach`` flag:

* ``_single_tensor_pass``: a loop over tensors, each parameter's state advanced, its rows'
  inner products taken and its plain step made while it is in the CPU's cache (the
  default on the CPU);
* ``_multi_tensor_pass``: the same with ``torch._foreach_*`` calls over lists of tensors
  (the default on CUDA).

Both advance the state of torch.optim's SGD, Adam and AdamW (``Direction``: the plain step
x <- x - step * num / den), take every plain step outside the parameters they hold back
and return the inner products of the plan's rows (``fxoto.plan``), from which the rules
(``fxoto.h2spg_rules``) decide each group's coefficients; ``_scaled_steps`` then moves the
held parameters by them.  Neither reads a value back to the host.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from fxoto.plan import Plan, flat, foreach_dots, gather_dots, row_dots, tensor_dots

Work = list[tuple[Tensor, Tensor, dict]]  # (parameter, its gradient, its param group) per parameter stepped


class Direction(NamedTuple):
    """A plain step x <- x - step * num / den (den None: x - step * num).

    The step direction in the paper's sense is d = (step / lr) * num / den.
    """

    num: Tensor
    den: Tensor | None
    step: float
    lr: float

def direction_scale(d: Direction) -> float:
    """c = step / lr: the step direction d is c times the step's numerator."""
    return d.step / d.lr if d.lr else 1.0


def _adam_count(p: Tensor, state: dict, counts: dict[int, int]) -> int:
    """Advance p's Adam step count and return it.  The state keeps it as torch.optim's Adam
    does (a float tensor on the CPU); the step reads a copy kept on the host (``counts``),
    taken from the state once after loading."""
    p_state = state[p]
    if not p_state:
        p_state["step"] = torch.tensor(0.0)
        p_state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        p_state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        counts[id(p)] = 0
    count = counts.get(id(p))
    count = (int(p_state["step"]) if count is None else count) + 1
    counts[id(p)] = count
    p_state["step"].add_(1.0)
    return count


# -- one tensor at a time -------------------------------------------------------------------


def _single_tensor_direction(p: Tensor, grad: Tensor, group: dict, variant: str, state: dict, counts: dict[int, int],
                             materialize: bool = False) -> Direction:
    """Advance p's state by its gradient and return its plain step x <- x - step * num / den:
    the single-tensor algorithms of torch.optim's SGD, Adam and AdamW.  ``materialize``
    computes num / den (into den's buffer) for the group-lasso step to read."""
    p_state = state[p]
    lr, wd = group["lr"], group["weight_decay"]
    if variant == "sgd":
        g = grad if wd == 0 else grad.add(p, alpha=wd)
        momentum = group["momentum"]
        if momentum != 0:
            buf = p_state.get("momentum_buffer")
            if buf is None:
                buf = p_state["momentum_buffer"] = torch.clone(g).detach()
            elif group["dampening"] == 0:
                torch.add(g, buf, alpha=momentum, out=buf)  # one pass over memory, not mul_ then add_
            else:
                buf.mul_(momentum).add_(g, alpha=1.0 - group["dampening"])
            g = g.add(buf, alpha=momentum) if group["nesterov"] else buf
        return Direction(g, None, lr, lr)

    beta1, beta2 = group["betas"]
    step = _adam_count(p, state, counts)
    g = grad
    if wd != 0:
        if variant == "adamw":
            p.mul_(1.0 - lr * wd)
        else:
            g = grad.add(p, alpha=wd)
    exp_avg, exp_avg_sq = p_state["exp_avg"], p_state["exp_avg_sq"]
    exp_avg.lerp_(g, 1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    denom = exp_avg_sq.sqrt().div_(math.sqrt(1.0 - beta2**step)).add_(group["eps"])
    step_size = lr / (1.0 - beta1**step)
    if materialize:
        return Direction(torch.div(exp_avg, denom, out=denom), None, step_size, lr)
    return Direction(exp_avg, denom, step_size, lr)


def _single_tensor_pass(work: Work, plan: Plan, variant: str, state: dict, counts: dict[int, int],
                        use_direction: bool, hold: bool):
    """One pass over the parameters, each while it is in the CPU's cache: its state advanced,
    its rows' inner products with v (the gradient, or with ``use_direction`` the step
    direction) gathered, and its plain step taken, except, with ``hold``, for the plan's
    parameters: their directions are returned for the scaled step.

    Returns the plan's inner products as ``fxoto.plan.row_products`` takes them (whole
    members, sliced parameters), each plan parameter's c (``direction_scale``) and the held
    (parameter, direction) pairs."""
    found: dict[int, Tensor | list[Tensor]] = {}
    cs = [1.0] * len(plan.params)
    held: list[tuple[Tensor, Direction]] = []
    for p, grad, group in work:
        i = plan.position.get(id(p))
        d = _single_tensor_direction(p, grad, group, variant, state, counts,
                                     materialize=i is not None and (hold or use_direction))
        if i is not None:
            v = d.num if use_direction else grad
            if use_direction:
                cs[i] = direction_scale(d)
            found[i] = tensor_dots(p, v) if plan.dims[i] is None else row_dots(p, v, plan.dims[i])
            if hold:
                held.append((p, d))
                continue
        _plain_step(p, d)
    return (*gather_dots(plan, found), cs, held)


def _single_tensor_plain_steps(work: Work, variant: str, state: dict, counts: dict[int, int]) -> None:
    """torch.optim's single-tensor SGD, Adam or AdamW step for every parameter in ``work``."""
    for p, grad, group in work:
        _plain_step(p, _single_tensor_direction(p, grad, group, variant, state, counts))


def _plain_step(p: Tensor, d: Direction) -> None:
    """x <- x - step * num / den."""
    if d.den is None:
        p.add_(d.num, alpha=-d.step)
    else:
        p.addcdiv_(d.num, d.den, value=-d.step)


# -- lists of tensors ----------------------------------------------------------------------


def _multi_tensor_directions(work: Work, variant: str, state: dict, counts: dict[int, int],
                             materialize=()) -> list[Direction]:
    """``_single_tensor_direction`` for every parameter at once, with ``torch._foreach_*`` per param group
    (torch.optim's multi-tensor SGD, Adam and AdamW)."""
    dirs: list[Direction | None] = [None] * len(work)
    by_group: dict[int, list[int]] = {}
    for i, (_, _, group) in enumerate(work):
        by_group.setdefault(id(group), []).append(i)
    for idx in by_group.values():
        group = work[idx[0]][2]
        ps = [work[i][0] for i in idx]
        grads = [work[i][1] for i in idx]
        lr, wd = group["lr"], group["weight_decay"]
        if variant == "sgd":
            gs = grads if wd == 0 else torch._foreach_add(grads, ps, alpha=wd)
            momentum = group["momentum"]
            if momentum == 0:
                for i, g, grad in zip(idx, gs, grads):
                    dirs[i] = Direction(g, None, lr, lr)
                continue
            bufs = []
            fresh = []
            for p, g in zip(ps, gs):
                buf = state[p].get("momentum_buffer")
                if buf is None:
                    buf = state[p]["momentum_buffer"] = torch.clone(g).detach()
                    fresh.append(len(bufs))
                bufs.append(buf)
            fresh_set = set(fresh)
            old = [k for k in range(len(bufs)) if k not in fresh_set]
            if old:
                ob, og = [bufs[k] for k in old], [gs[k] for k in old]
                torch._foreach_mul_(ob, momentum)
                torch._foreach_add_(ob, og, alpha=1.0 - group["dampening"])
            nums = torch._foreach_add(gs, bufs, alpha=momentum) if group["nesterov"] else bufs
            for i, num, buf in zip(idx, nums, bufs):
                dirs[i] = Direction(num, None, lr, lr)
            continue
        beta1, beta2 = group["betas"]
        steps = [_adam_count(p, state, counts) for p in ps]
        if wd != 0:
            if variant == "adamw":
                torch._foreach_mul_(ps, 1.0 - lr * wd)
                gs = grads
            else:
                gs = torch._foreach_add(grads, ps, alpha=wd)
        else:
            gs = grads
        avgs = [state[p]["exp_avg"] for p in ps]
        sqs = [state[p]["exp_avg_sq"] for p in ps]
        torch._foreach_lerp_(avgs, gs, 1.0 - beta1)
        torch._foreach_mul_(sqs, beta2)
        torch._foreach_addcmul_(sqs, gs, gs, value=1.0 - beta2)
        dens = torch._foreach_sqrt(sqs)
        torch._foreach_div_(dens, [math.sqrt(1.0 - beta2**s) for s in steps])
        torch._foreach_add_(dens, group["eps"])
        for i, p, avg, den, s in zip(idx, ps, avgs, dens, steps):
            step_size = lr / (1.0 - beta1**s)
            dirs[i] = Direction(avg, den, step_size, lr)
    want = [i for i, (p, _, _) in enumerate(work) if id(p) in materialize and dirs[i].den is not None]
    if want:
        nums = torch._foreach_div([dirs[i].num for i in want], [dirs[i].den for i in want])
        for i, num in zip(want, nums):
            dirs[i] = dirs[i]._replace(num=num, den=None)
    return dirs


def _multi_tensor_rows(plan: Plan, work: Work, dirs: list[Direction], use_direction: bool):
    """The plan's inner products, as ``_single_tensor_pass`` returns them, with multi-tensor norms
    for the whole members (``foreach_dots``), and each plan parameter's c."""
    of = {id(p): (grad, d) for (p, grad, _), d in zip(work, dirs)}
    xs, vs, cs, sliced = [], [], [], []
    for i, p in enumerate(plan.params):
        grad, d = of.get(id(p), (None, None))
        if d is None:
            v, c = None, 1.0
        elif use_direction:
            v, c = d.num, direction_scale(d)
        else:
            v, c = grad, 1.0
        cs.append(c)
        if i < plan.whole:
            xs.append(flat(p))
            vs.append(flat(v) if v is not None else torch.zeros_like(xs[-1]))
        else:
            sliced.append(row_dots(p, v, plan.dims[i]))
    return foreach_dots(xs, vs) if xs else None, sliced, cs


def _multi_tensor_pass(work: Work, plan: Plan, variant: str, state: dict, counts: dict[int, int],
                       use_direction: bool, hold: bool):
    """``_single_tensor_pass`` in multi-tensor calls: every state advanced, the plan's inner
    products taken, the plain steps made (with ``hold``, but for the plan's parameters)."""
    dirs = _multi_tensor_directions(work, variant, state, counts, materialize=plan.position if hold else ())
    whole, rows, cs = _multi_tensor_rows(plan, work, dirs, use_direction=use_direction)
    _multi_tensor_plain_steps(work, dirs, skip=plan.position if hold else set())
    held = [(p, d) for (p, _, _), d in zip(work, dirs) if id(p) in plan.position] if hold else []
    return whole, rows, cs, held


def _multi_tensor_plain_steps(work: Work, dirs: list[Direction], skip) -> None:
    """x <- x - step * num / den for every parameter not in ``skip``, in multi-tensor calls."""
    added: dict[float, tuple[list[Tensor], list[Tensor]]] = {}
    divided: list[tuple[Tensor, Direction]] = []
    for (p, _, _), d in zip(work, dirs):
        if id(p) in skip:
            continue
        if d.den is None:
            ps, nums = added.setdefault(d.step, ([], []))
            ps.append(p)
            nums.append(d.num)
        else:
            divided.append((p, d))
    for step, (ps, nums) in added.items():
        torch._foreach_add_(ps, nums, alpha=-step)
    if divided:
        torch._foreach_addcdiv_([p for p, _ in divided], [d.num for _, d in divided],
                                [d.den for _, d in divided], [-d.step for _, d in divided])


# -- shared by both paths ------------------------------------------------------------------


def _scaled_steps(held: list[tuple[Tensor, Direction | None]], a: Tensor, b: Tensor, plan: Plan) -> None:
    """x <- a x - step b num for each parameter holding members (x <- a x where it has no
    gradient, direction None): ``a``, ``b`` are per-row vectors (``Plan``), a parameter's
    rows broadcast along its dim.  Multi-tensor calls (a loop in C++ where the shapes differ);
    the rows are split per parameter in one call each."""
    if not held:
        return
    bounds = [*plan.offsets, len(plan.row_group)]
    sizes = [hi - lo for lo, hi in zip(bounds, bounds[1:])]
    cast: dict[torch.dtype, tuple[tuple[Tensor, ...], tuple[Tensor, ...]]] = {}
    ps, scales, terms = [], [], []
    for p, d in held:
        if p.dtype not in cast:
            cast[p.dtype] = (a.to(p.dtype).split(sizes), b.to(p.dtype).split(sizes))
        i = plan.position[id(p)]
        ai, bi = cast[p.dtype][0][i], cast[p.dtype][1][i]
        dim = plan.dims[i]
        if dim is not None and p.dim() > 1:  # a whole member's [1] and 1-D rows broadcast as they are
            shape = [1] * p.dim()
            shape[dim] = p.shape[dim]
            ai, bi = ai.view(shape), bi.view(shape)
        ps.append(p)
        scales.append(ai)
        if d is not None:
            terms.append((p, d.num, bi, -d.step))
    torch._foreach_mul_(ps, scales)
    if terms:
        torch._foreach_addcmul_(*(list(t) for t in zip(*terms)))


def first_non_finite(bad: Tensor, rows: Tensor, plan: Plan, step: Tensor) -> Tensor:
    """``bad`` (the first non-finite gradient seen: its step and parameter position, -1 while
    none) updated, on the device, by this step's ``rows`` (``fxoto.plan.row_products``): the
    first parameter whose gradient made a row's x.v inf or NaN, at ``step`` ([1], on the device)."""
    if not rows.numel():
        return bad
    flags = ~rows[:, 1].isfinite()
    param = plan.row_param.index_select(0, flags.int().argmax().reshape(1))  # not [tensor]: that reads
    first = torch.cat([step, plan.order.index_select(0, param)])
    return torch.where((bad[0] < 0) & flags.any(), first, bad)
