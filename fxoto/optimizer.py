"""Step 4 of the pipeline: H2SPG, the hierarchical half-space projected gradient.

Paper, section 3.2 and Algorithm 3.  ``H2SPG`` is an ordinary ``torch.optim.Optimizer``
over the model's own parameters: param_groups, state, ``step(closure)``,
``state_dict()``; LR schedulers, gradient clipping, AMP grad scalers and DDP work with
it as with ``torch.optim.SGD`` or ``Adam``.  It runs in three phases:

* ``"warmup"`` (Algorithm 3, lines 2-7): ``warmup_steps`` plain steps, each also
  updating an exponential moving average of every GeZIG's redundancy score;
* selection (line 8), once: the most redundant GeZIGs that form a valid removal
  (``SearchSpace.select_removal``, which keeps the promise ``target_k`` made);
* ``"hybrid"`` (lines 9-16), at most ``pruning_steps`` long: plain steps outside the
  redundant set; inside it a step on f + lambda_g ||x_g|| and the half-space
  projection; whatever is left at the end of the budget is projected to zero
  (``forced``), so exactly K groups are zero;
* ``"pruned"``: plain training goes on with the redundant groups pinned at zero.

``lambda_rule`` chooses lambda_g (``hybrid_lambda``): ``"paper"`` is DHSPG's rule alone
(``dhspg_lambda``), the half-space projection deciding when a group goes to zero;
``"deadline"`` (the default, chosen by ``tools/ablate_h2spg.py``, see
``docs/results.md``) takes the larger of DHSPG's lambda and a floor that rises as the
budget runs out (``lambda_floor``), so that every group shrinks steadily to zero
within the budget and none is left to the jump of a forced projection.

Execution, in three modules as in torch.optim.  The paper's rules are small pure functions
over per-group tensors (``fxoto.h2spg_rules``: one entry per GeZIG, on the parameters'
device); every step computes them on the device, so a step never reads a value back to
the host (the one exception: the step that selects the redundant set, which sorts the
scores on the host).  A step loops over parameters, never over groups, so it scales to
tens of thousands of channel groups: each parameter holding members is one whole member
or a stack of rows along one dim (``fxoto.plan.Plan``).  The per-parameter arithmetic
has two paths (``fxoto.h2spg_steps``), chosen by ``foreach``: a loop over tensors
(``_single_tensor_pass``, the default on the CPU, where it keeps each tensor in cache)
and multi-tensor ``torch._foreach_*`` calls over all parameters (``_multi_tensor_pass``,
the default on CUDA).  Both return the same inner products to the same rules
(``hybrid_group_step``).  A step takes, per row of the redundant groups, the inner
products ||x||^2, x.d and ||d||^2 (d: the step direction, the gradient or its momentum /
Adam variant), sums them per group (one ``index_add_``), computes lambda_g and the
projection test from them and only then moves the rows: x~ = a x - lr d with a = 1 - lr lambda_g / ||x_g||, and
x~.x = ||x||^2 - lr (lambda_g ||x_g|| + x.d), so a group that the test zeroes is
written as zero in the same pass (x <- keep a x - keep lr d).  With a K per kind of
group, each kind is selected by its own ranking (``select_per_kind``).

A gradient holding inf or NaN is raised as ``NonFiniteGradientError`` at the next
synchronisation point: ``check_finite()``, ``metrics()``, ``state_dict()`` or the selection
step.  The step flags it on the device, as ``torch.amp.GradScaler`` does, for the members of
the groups it watches (every GeZIG in warm-up, the redundant ones in the hybrid phase), with
the parameter and the step; every other parameter that took such a gradient holds inf or NaN
after its step and is found by its values at the check, with the steps since the last one.
By then every step since has been applied to every parameter: the model and its optimizer
state hold non-finite values and the way on is the last checkpoint (``state_dict`` refuses to
write one that holds them).  Under a ``GradScaler`` such steps are skipped before ``step``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim import Optimizer

from fxoto import plan as layout
from fxoto.errors import DeviceError, NonFiniteGradientError
from fxoto.h2spg_rules import (  # noqa: F401 (the rules, re-exported: fxoto.optimizer.redundancy_score ...)
    GroupStats, ScoreFn, dhspg_lambda, half_space_project, hybrid_group_step, hybrid_lambda, lambda_floor,
    redundancy_score, reference_score, select_redundant)
from fxoto.h2spg_steps import (Work, _multi_tensor_directions, _multi_tensor_pass, _multi_tensor_plain_steps,
                               _scaled_steps, _single_tensor_pass, _single_tensor_plain_steps, first_non_finite)
from fxoto.plan import Part, Plan, make_plan
from fxoto.space import SearchSpace, kind_counts, target_k
from fxoto.uniform import check_uniform

__all__ = [
    "H2SPG", "GroupStats", "ScoreFn", "dhspg_lambda", "half_space_project", "hybrid_lambda", "lambda_floor",
    "redundancy_score", "reference_score", "select_redundant",
]

VARIANTS = ("sgd", "adam", "adamw")
LAMBDA_RULES = ("deadline", "paper")
# DHSPG's defaults in the OTO code: lambda0, lambda amplify, hat-lambda coefficient.
LAMBDA_DEFAULTS = {"sgd": (1e-3, 2.0, 10.0), "adam": (1e-2, 20.0, 1e3), "adamw": (1e-2, 20.0, 1e3)}
# The settings a state dict carries and restores, beside the variant and the K per kind.
SETTINGS = ("K", "warmup_steps", "pruning_steps", "lambda_rule", "omega", "epsilon", "lambda0", "lambda_amplify",
            "hat_lambda_coef")


def _check_settings(variant: str, lambda_rule: str, lr: float, momentum: float, dampening: float, nesterov: bool,
                    betas: tuple[float, float], eps: float, weight_decay: float, warmup_steps: int,
                    pruning_steps: int, omega: float, epsilon: float) -> None:
    """H2SPG's arguments, checked as torch.optim checks its own."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, not {variant!r}")
    if lambda_rule not in LAMBDA_RULES:
        raise ValueError(f"lambda_rule must be one of {LAMBDA_RULES}, not {lambda_rule!r}")
    if not lr >= 0.0:
        raise ValueError(f"invalid learning rate {lr}")
    if not momentum >= 0.0 or not weight_decay >= 0.0 or not eps >= 0.0:
        raise ValueError(f"momentum, weight_decay and eps must be >= 0; got {momentum}, {weight_decay}, {eps}")
    if nesterov and (momentum <= 0.0 or dampening != 0.0):
        raise ValueError("Nesterov momentum requires a momentum and zero dampening")
    if not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"betas must lie in [0, 1); got {betas}")
    if warmup_steps < 0 or pruning_steps < 0:
        raise ValueError(f"warmup_steps and pruning_steps must be >= 0; got {warmup_steps}, {pruning_steps}")
    if not 0.0 <= omega < 1.0:
        raise ValueError(f"omega must lie in [0, 1); got {omega}")
    if not 0.0 <= epsilon < 1.0:
        raise ValueError(f"epsilon must lie in [0, 1); got {epsilon}")


def _non_finite_message(first: str | None, step: int, broken: list[str], since: int, now: int) -> str:
    """What ``check_finite`` tells: the parameter whose gradient a step flagged first (``first``, at
    ``step``; None: none flagged) or else the first parameter found holding inf or NaN (``broken``,
    by name), the steps since the last check (``since`` to ``now - 1``), and what to do."""
    if first is not None:
        after = now - step - 1
        what = (f"the gradient of parameter '{first}' held inf or NaN at step {step}; that step"
                + (f" and the {after} after it" if after else ""))
    else:
        what = (f"parameter '{broken[0]}' holds inf or NaN: a gradient held inf or NaN at one of the steps "
                f"{since} to {now - 1} (since the last check); that step")
    held = ", ".join(f"'{n}'" for n in broken[:3]) + (f" and {len(broken) - 3} more" if len(broken) > 3 else "")
    return (f"{what} moved every parameter with it, so the model and the optimizer state hold non-finite values"
            + (f" (now: {held})" if broken else "") + ": restore the last checkpoint. Lower the learning rate, check "
            f"the loss for overflow, or train with torch.amp.GradScaler, which skips such steps.")


class _DeviceCopies:
    """Host values as float64 vectors on ``device``, by key, copied only when they change (a
    learning rate after a scheduler step, Adam's bias correction in its first few hundred
    steps), and then without waiting for the device: from pinned memory, non-blocking."""

    def __init__(self, device: torch.device):
        self.device = device
        self._copies: dict[str, tuple[tuple[float, ...], Tensor]] = {}

    def __call__(self, key: str, values: list[float]) -> Tensor:
        values = tuple(values)
        cached = self._copies.get(key)
        if cached is None or cached[0] != values:
            host = torch.tensor(values, dtype=torch.float64)
            if self.device.type == "cuda":
                host = host.pin_memory()
            self._copies[key] = cached = (values, host.to(self.device, non_blocking=True))
        return cached[1]


class H2SPG(Optimizer):
    """Hierarchical Half-Space Projected Gradient (paper, Algorithm 3) over a ``SearchSpace``.

    Args:
        space: the search space; its model's parameters are optimised.
        K: target group sparsity: a count, a float in (0, 1) as a fraction of the GeZIGs, or
            a dict per kind of group (``{"operations": 3, "channels": 0.5}``: that many of
            each kind, each ranked by its own scores).
        lr: learning rate (alpha_t; LR schedulers change it as usual).
        params: optional parameters or param-group dicts (per-group lr, weight_decay ...);
            by default ``space.model.parameters()``.  They must include every GeZIG variable.
        variant: ``"sgd"`` (with ``momentum``, ``dampening``, ``nesterov``), ``"adam"`` or
            ``"adamw"`` (with ``betas``, ``eps``); ``weight_decay`` is L2 (decoupled for adamw).
            The plain steps are those of ``torch.optim.SGD``, ``Adam`` and ``AdamW``.
        warmup_steps: T_w, steps before the redundant groups are selected.
        pruning_steps: the budget of the hybrid phase; at its end every redundant group is zero.
        lambda_rule: ``"deadline"`` (default) or ``"paper"``; see ``hybrid_lambda``.
        omega: momentum of the redundancy scores' moving average (line 7).
        epsilon: half-space projection threshold in [0, 1) (line 15): a group goes to zero
            once its trial step would remove more than 1 - epsilon of its component along x_g.
            Default 0.5.
        lambda0, lambda_amplify, hat_lambda_coef: DHSPG's lambda rule (``dhspg_lambda``);
            defaults 1e-3, 2, 10 for sgd and 1e-2, 20, 1e3 for adam/adamw.
        score_fn: redundancy score (``ScoreFn``); default ``redundancy_score``, the OTO
            code's form is ``reference_score``.
        foreach: multi-tensor arithmetic; default True on CUDA, False on the CPU.
        uniform: select the same number of groups in every block of each kind (every
            attention's heads, every MLP's neurons; ``fxoto.uniform``), so that one config
            describes the sub-network; K must then be given per kind.

    ``redundant`` (the selected GeZIG ids, empty during warm-up), ``scores``, ``phase``,
    ``forced`` (ids zeroed by the final projection), ``zeroed_at`` (the step at which each
    redundant group reached zero) and ``metrics()`` report progress; all but ``redundant``
    and ``phase`` read from the device.
    """

    def __init__(
        self,
        space: SearchSpace,
        K: int | float | dict[str, int | float],
        lr: float,
        *,
        warmup_steps: int,
        pruning_steps: int,
        params: Iterable[Tensor] | Iterable[dict[str, Any]] | None = None,
        variant: str = "sgd",
        momentum: float = 0.9,
        dampening: float = 0.0,
        nesterov: bool = False,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        lambda_rule: str = "deadline",
        omega: float = 0.9,
        epsilon: float = 0.5,
        lambda0: float | None = None,
        lambda_amplify: float | None = None,
        hat_lambda_coef: float | None = None,
        score_fn: ScoreFn | None = None,
        foreach: bool | None = None,
        uniform: bool = False,
    ):
        _check_settings(variant, lambda_rule, lr, momentum, dampening, nesterov, betas, eps, weight_decay,
                        warmup_steps, pruning_steps, omega, epsilon)
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov, betas=betas, eps=eps,
                        weight_decay=weight_decay)
        super().__init__(space.model.parameters() if params is None else params, defaults)

        self.space = space
        self.variant = variant
        self.K = target_k(K, space)  # the one K check, shared with fxoto.search
        self.K_per_kind = kind_counts(K, space)  # None, or the count per kind of group
        self.uniform = uniform
        if uniform:
            check_uniform(space, self.K_per_kind)
        self.warmup_steps = warmup_steps
        self.pruning_steps = pruning_steps
        self.lambda_rule = lambda_rule
        self.omega = omega
        self.epsilon = epsilon
        l0, amp, hat = LAMBDA_DEFAULTS[variant]
        self.lambda0 = l0 if lambda0 is None else lambda0
        self.lambda_amplify = amp if lambda_amplify is None else lambda_amplify
        self.hat_lambda_coef = hat if hat_lambda_coef is None else hat_lambda_coef
        self.score_fn = redundancy_score if score_fn is None else score_fn

        named = dict(space.model.named_parameters(remove_duplicate=False))  # the graph's names are the model's
        self._names: dict[int, str] = {}
        for name, p in named.items():
            self._names.setdefault(id(p), name)
        self._parts = [
            [Part(named[m.param], m.dim, m.start, m.stop - m.start) for m in g.members] for g in space.groups
        ]
        owned = {id(p) for group in self.param_groups for p in group["params"]}
        for g, parts in zip(space.groups, self._parts):
            for m, part in zip(g.members, parts):
                if id(part.param) not in owned:
                    raise ValueError(f"parameter '{m.param}' of GeZIG g{g.id} is not among the optimizer's params")
        self._foreach_choice = foreach
        self._locate()

        n = len(space.groups)
        vec = dict(dtype=torch.float64, device=self.device)
        self._step = 0  # steps taken: t in Algorithm 3
        self._scores = torch.zeros(n, **vec)  # s_g, line 7
        self._redundant: list[int] | None = None  # G_r, None until selected (line 8)
        self._zero = torch.zeros(n, dtype=torch.bool, device=self.device)  # redundant groups at zero, pinned
        self._zeroed_at = torch.full((n,), -1, dtype=torch.long, device=self.device)
        self._forced = torch.zeros(n, dtype=torch.bool, device=self.device)
        self._lambda = torch.zeros(n, **vec)
        self._bad = torch.full((2,), -1, dtype=torch.long, device=self.device)  # first non-finite: step, param
        self._all = self._plan(range(n), "all")
        layers = {name: i + 1 for i, name in enumerate(dict.fromkeys(g.nodes[0] for g in space.groups
                                                                     if g.kind == "channel"))}
        self._layer = torch.tensor([layers.get(g.nodes[0], 0) if g.kind == "channel" else 0 for g in space.groups],
                                   dtype=torch.long).to(self.device)
        self._hot: Plan | None = None
        self._order: list[Tensor] = [p for group in self.param_groups for p in group["params"]]
        self._counts: dict[int, int] = {}  # Adam's step count per parameter (id), on the host
        self._copies = _DeviceCopies(self.device)  # learning rates and step scales on the device
        self._step_on_device = torch.zeros(1, dtype=torch.long, device=self.device)  # _step, for first_non_finite
        self._checked_at = 0  # the step of the last check_finite

    def _locate(self) -> None:
        """The device of the parameters (one, and real), where H2SPG keeps its own state, and
        the execution path's default there."""
        devices = {p.device for group in self.param_groups for p in group["params"]}
        if len(devices) > 1 or any(d.type == "meta" for d in devices):
            raise DeviceError(f"H2SPG's parameters lie on {sorted(map(str, devices))}: it trains a model whose "
                              f"parameters are on one real device; move the model there first")
        self.device = devices.pop() if devices else torch.device("cpu")
        self.foreach = self.device.type == "cuda" if self._foreach_choice is None else self._foreach_choice

    # -- what a user reads ----------------------------------------------------------------
    @property
    def redundant(self) -> list[int]:
        """G_r, the selected redundant GeZIG ids (most redundant first); empty during warm-up."""
        return [] if self._redundant is None else list(self._redundant)

    @property
    def scores(self) -> Tensor:
        """The moving averages s_g of the redundancy scores (float64, one per GeZIG)."""
        return self._scores.clone()

    @property
    def forced(self) -> list[int]:
        """Redundant groups that the final projection at the end of the hybrid phase had to zero."""
        mask = self._forced.tolist()
        return [g for g in self.redundant if mask[g]]

    @property
    def zeroed_at(self) -> dict[int, int]:
        """The step (counted from 0) at which each redundant group reached zero, by group id."""
        at = self._zeroed_at.tolist()
        return {g: at[g] for g in self.redundant if at[g] >= 0}

    @property
    def lambdas(self) -> dict[int, float]:
        """lambda_g of the last hybrid step, by group id, for the redundant groups not yet zero."""
        lam, zero = self._lambda.tolist(), self._zero.tolist()
        return {g: lam[g] for g in self.redundant if not zero[g]} if self.phase == "hybrid" else {}

    @property
    def phase(self) -> str:
        """``"warmup"``, ``"hybrid"`` or ``"pruned"`` (redundant groups pinned at zero)."""
        if self._redundant is None:
            return "warmup"
        return "pruned" if self._step >= self.warmup_steps + self.pruning_steps else "hybrid"

    @torch.no_grad()
    def check_finite(self) -> None:
        """Raise ``NonFiniteGradientError`` if a gradient held inf or NaN since the start.

        One read from the device.  A step flags, on the device, the first non-finite gradient
        among the members of the groups it watches (every GeZIG in warm-up, the redundant ones
        in the hybrid phase), with its step; any other parameter that took a non-finite
        gradient holds inf or NaN after its step, and is found here, by its values."""
        self._order = [p for group in self.param_groups for p in group["params"]]
        norms = torch._foreach_norm(self._order) if self._order else []
        values = torch.cat([self._bad.double(), torch.stack(norms).double() if norms else self._bad[:0].double()])
        step, index, *norms = values.tolist()
        broken = [self._names.get(id(p), "?") for p, v in zip(self._order, norms) if not math.isfinite(v)]
        since, self._checked_at = self._checked_at, self._step
        if step < 0 and not broken:
            return
        first = self._names.get(id(self._order[int(index)]), "?") if step >= 0 else None
        raise NonFiniteGradientError(_non_finite_message(first, int(step), broken, since, self._step))

    @torch.no_grad()
    def metrics(self) -> dict[str, Any]:
        """Progress now: step, phase, zero groups and group sparsity, norms of the important
        (G_r^C) and redundant (G_r) groups, and how many groups were forced to zero.  Reads
        from the device once (and checks for non-finite gradients)."""
        self.check_finite()
        n = len(self.space.groups)
        sq = layout.group_sq_norms(self._all)
        red = self._hot.mask if self._hot is not None else torch.zeros(n, dtype=torch.bool, device=self.device)
        zero = layout.exact_zero(self._all)
        values = torch.stack([zero.sum().double(), torch.where(red, 0.0, sq).sum().sqrt(),
                              torch.where(red, sq, 0.0).sum().sqrt(),
                              self._forced.sum().double()]).tolist()
        return {
            "step": self._step,
            "phase": self.phase,
            "groups": n,
            "zero_groups": int(values[0]),
            "group_sparsity": values[0] / n if n else 0.0,
            "redundant": self.redundant,
            "forced": int(values[3]),
            "norm_important": values[1],
            "norm_redundant": values[2],
        }

    # -- the step -------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One step of Algorithm 3: a warm-up step (lines 4-7, then line 8 after the last),
        a hybrid step (lines 11-16) or, after the hybrid phase, a plain step with the
        redundant groups pinned at zero."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._redundant is None and self.warmup_steps == 0:
            self._accumulate(self._score_now())
            self._select()
        pinned = self._pinned_whole() if self._redundant is not None and self.phase == "pruned" else set()
        work = [(p, p.grad, group) for group in self.param_groups for p in group["params"]
                if p.grad is not None and id(p) not in pinned]
        if any(grad.is_sparse for _, grad, _ in work):
            raise RuntimeError("H2SPG does not support sparse gradients")
        for p, _, _ in work:
            if p.device != self.device:
                raise DeviceError(f"parameter '{self._names.get(id(p), '?')}' is on {p.device}, H2SPG's state on "
                                  f"{self.device}: build the optimizer after moving the model")

        if self._redundant is None:
            self._warmup_step(work)
        elif self.phase == "hybrid":
            self._hybrid_step(work)
        else:
            self._pruned_step(work)
        self._step += 1
        self._step_on_device += 1
        if self._redundant is None and self._step >= self.warmup_steps:
            self._select()
        elif self._redundant is not None and self._step == self.warmup_steps + self.pruning_steps:
            self._force()
        return loss

    # The three kinds of step.  Each: advance the state and take the plain steps; for the
    # members of the groups being watched, gather ||x||^2, x.v, ||v||^2 before they move.

    def _warmup_step(self, work: Work) -> None:
        """Lines 4-7: plain steps, and the scores of every GeZIG on x_t before it moves."""
        on_direction = getattr(self.score_fn, "on", "gradient") == "direction"
        plan = self._all
        rows = self._pass(work, plan, use_direction=on_direction, hold=False)[0]
        self._accumulate(self._score(plan, rows))

    def _hybrid_step(self, work: Work) -> None:
        """Lines 11-16: plain steps outside G_r; inside it, x <- keep (a x - lr d) with lambda_g
        and the projection test computed from this step's inner products."""
        plan = self._hot
        rows, held = self._pass(work, plan, use_direction=True, hold=True)
        a, b = self._hybrid_coefficients(plan, rows)
        moved = {id(p) for p, _ in held}
        still = [p for p in plan.params if id(p) not in moved]
        _scaled_steps(held + [(p, None) for p in still], a, b, plan)  # no gradient: the lasso term alone

    def _pruned_step(self, work: Work) -> None:
        """After the hybrid phase: plain steps; the redundant groups' whole parameters are not
        in ``work`` at all, and their rows in the other parameters take a zero gradient (their
        ``.grad`` rows are set to zero): with those rows and their state at zero since
        ``_force``, every variant's step leaves them at zero (momentum m 0 + 0, Adam's moments
        0 and step 0 / eps, weight decay of 0)."""
        plan = self._hot
        for p, grad, _ in work:
            i = plan.position.get(id(p))
            if i is not None and plan.dims[i] is not None:  # whole ones are pinned: not in work
                grad.index_fill_(plan.dims[i], plan.rows_in[i], 0)
        if self.foreach:
            dirs = _multi_tensor_directions(work, self.variant, self.state, self._counts)
            _multi_tensor_plain_steps(work, dirs, skip=set())
        else:
            _single_tensor_plain_steps(work, self.variant, self.state, self._counts)
        if self.variant != "sgd" and any(group["eps"] == 0 for group in self.param_groups):
            layout.zero_members(plan, self.state, whole=False)  # Adam's 0 / (0 + eps) is NaN at eps = 0

    def _pass(self, work: Work, plan: Plan, use_direction: bool, hold: bool) -> tuple[Tensor, list]:
        """Every parameter's state advanced and its plain step taken (with ``hold``, but for the
        plan's, whose directions are returned) by the execution path ``foreach`` chooses; the
        plan's rows' ||x||^2, x.v, ||v||^2 (``fxoto.plan.row_products``) taken before they move,
        and the first non-finite one recorded."""
        path = _multi_tensor_pass if self.foreach else _single_tensor_pass
        whole, rows, cs, held = path(work, plan, self.variant, self.state, self._counts, use_direction, hold)
        products = self._products(plan, whole, rows, cs)
        self._bad = first_non_finite(self._bad, products, plan, self._step_on_device)
        return products, held

    # -- the rules applied to a step's inner products (shared by both paths) ------------------

    def _hybrid_coefficients(self, plan: Plan, rows: Tensor) -> tuple[Tensor, Tensor]:
        """Lines 13-15 for every hot group, on the device (``hybrid_group_step``).  ``rows`` is
        [R, 3] per row of the plan: ||x||^2, x.d, ||d||^2.  Returns per-row vectors of a = keep
        (1 - lr lambda_g / ||x_g||) and b = keep (1 for rows outside the plan's groups): the step
        is then x <- a x - step b num."""
        n = len(self.space.groups)
        lr = self._param_lr(plan)[plan.row_param]
        x_sq, x_d, d_sq = rows.unbind(1)
        per_row = torch.stack([x_sq, x_d, d_sq, lr * x_sq, lr * x_d], 1)
        xx, xd, dd, lr_xx, lr_xd = layout.group_sums(plan, per_row).unbind(1)
        lr_g = torch.zeros(n + 1, dtype=torch.float64, device=self.device)
        lr_g = lr_g.scatter_reduce_(0, plan.row_group, lr, "amax")[:n]
        steps_left = self.warmup_steps + self.pruning_steps - self._step
        lam, scale, projected = hybrid_group_step(xx, xd, dd, lr_xx, lr_xd, lr_g, steps_left, self.lambda_rule,
                                                  self.lambda0, self.lambda_amplify, self.hat_lambda_coef,
                                                  self.epsilon)
        hot = plan.mask
        newly = hot & ~self._zero & projected
        self._zeroed_at.masked_fill_(newly, self._step)
        self._zero |= newly
        self._lambda = torch.where(hot & ~self._zero, lam, 0.0)
        one = torch.ones(1, dtype=torch.float64, device=self.device)
        keep = torch.cat([(~self._zero).double(), one])[plan.row_group]
        factor = torch.cat([scale, one - 1.0])[plan.row_group]
        return keep * (1.0 - lr * factor), keep

    def _score(self, plan: Plan, rows: Tensor) -> Tensor:
        """Line 6 from the rows' inner products: the score function on the group sums."""
        xx, xv, vv = layout.group_sums(plan, rows).unbind(1)
        s = torch.as_tensor(self.score_fn(GroupStats(xx, xv, vv, plan.numel, self._layer)))
        return s.to(self.device, torch.float64).reshape(-1)

    def _score_now(self) -> Tensor:
        """Scores on the gradients as they are, without a step (``warmup_steps=0``)."""
        plan = self._all
        found = {i: layout.tensor_dots(p, p.grad) if dim is None else layout.row_dots(p, p.grad, dim)
                 for i, (p, dim) in enumerate(zip(plan.params, plan.dims)) if p.grad is not None}
        whole, rows = layout.gather_dots(plan, found)
        return self._score(plan, self._products(plan, whole, rows, [1.0] * len(plan.params)))

    def _accumulate(self, s: Tensor) -> None:
        """Algorithm 3, line 7: s_g <- omega s_g + (1 - omega) s_{t,g}."""
        if s.numel() != len(self._parts):
            raise ValueError(f"score_fn must return {len(self._parts)} finite scores, one per GeZIG; got {s.numel()}")
        self._scores.mul_(self.omega).add_(s, alpha=1.0 - self.omega)

    def _select(self) -> None:
        """Algorithm 3, line 8, on scores every rank agrees on (rank 0's, under DDP).  The one
        step that reads from the device."""
        self.check_finite()
        scores = self._scores.tolist()
        if not all(math.isfinite(s) for s in scores):
            raise ValueError(f"score_fn must return {len(self._parts)} finite scores, one per GeZIG; got {scores}")
        if dist.is_available() and dist.is_initialized():
            box = [scores]
            dist.broadcast_object_list(box, src=0)
            scores = box[0]
            self._scores = torch.tensor(scores, dtype=torch.float64, device=self.device)
        self._redundant = select_redundant(self.space, torch.tensor(scores, dtype=torch.float64), self.K,
                                           self.K_per_kind, self.uniform)
        self._hot = self._plan(self._redundant, "hot")
        if self.pruning_steps == 0:
            self._force()

    def _force(self) -> None:
        """End of the hybrid budget: project what is left of G_r onto zero, so K is met exactly
        (no read from the device: the groups still nonzero are recorded in ``_forced``)."""
        hot = self._hot.mask
        left = hot & ~self._zero
        self._forced |= left
        self._zeroed_at.masked_fill_(left, self._step - 1)
        self._zero |= hot
        # Every redundant group is zero, with its optimizer state; from now on its whole
        # parameters take no step and its rows elsewhere a zero gradient (_pruned_step).
        layout.zero_members(self._hot, self.state)
        self._lambda.zero_()

    def _pinned_whole(self) -> set[int]:
        return {id(p) for p in self._hot.params[:self._hot.whole]}

    # -- bookkeeping ----------------------------------------------------------------------------

    def _plan(self, groups: Iterable[int], name: str) -> Plan:
        """Lay out the members of ``groups`` by parameter (``fxoto.plan.make_plan``)."""
        return make_plan(name, groups, self._parts, [g.numel for g in self.space.groups],
                         [p for group in self.param_groups for p in group["params"]], self._names, self.device)

    def _param_lr(self, plan: Plan) -> Tensor:
        """Each plan parameter's learning rate now (schedulers change it), as a device vector."""
        group_of = {id(p): group for group in self.param_groups for p in group["params"]}
        return self._copies(f"lr/{plan.name}", [group_of[id(p)]["lr"] for p in plan.params])

    def _products(self, plan: Plan, whole: Tensor | None, rows: list[Tensor], cs: list[float]) -> Tensor:
        """``fxoto.plan.row_products`` with each plan parameter's c (step / lr) on the device."""
        return layout.row_products(plan, whole, rows, self._copies(f"c/{plan.name}", cs))

    # -- checkpoints ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """torch.optim's state dict plus an ``"h2spg"`` entry: step counter, scores, the
        redundant set, zero and forced groups, and the H2SPG settings.  Refuses to write a
        state that a non-finite gradient has reached (``check_finite``)."""
        self.check_finite()
        sd = super().state_dict()
        sd["h2spg"] = {
            "groups": len(self._parts),
            "variant": self.variant,
            "K_per_kind": self.K_per_kind,
            "uniform": self.uniform,
            **{key: getattr(self, key) for key in SETTINGS},
            "step": self._step,
            "scores": self._scores.clone(),
            "redundant": None if self._redundant is None else list(self._redundant),
            "zero": self._zero.clone(),
            "zeroed_at": self._zeroed_at.clone(),
            "forced": self._forced.clone(),
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a ``state_dict()`` (written on any device: its tensors move to the
        parameters', which may have moved since this optimizer was built); like param_groups,
        its settings replace the constructor's."""
        state_dict = dict(state_dict)
        h = state_dict.pop("h2spg", None)
        if h is None:
            raise ValueError("not an H2SPG state dict: the 'h2spg' entry is missing")
        if h["groups"] != len(self._parts) or h["variant"] != self.variant:
            raise ValueError(
                f"this state dict is for {h['groups']} GeZIGs with variant {h['variant']!r}; this optimizer has "
                f"{len(self._parts)} GeZIGs with variant {self.variant!r}"
            )
        super().load_state_dict(state_dict)
        self._locate()
        self._all = self._plan(range(len(self._parts)), "all")
        self._layer = self._layer.to(self.device)
        self._copies = _DeviceCopies(self.device)
        self.K_per_kind = h.get("K_per_kind")
        self.uniform = h.get("uniform", False)
        for key in SETTINGS:
            setattr(self, key, h[key])
        self._step = h["step"]
        self._scores = h["scores"].to(self.device, torch.float64).clone()
        self._redundant = None if h["redundant"] is None else list(h["redundant"])
        self._zero = h["zero"].to(self.device).clone()
        self._zeroed_at = h["zeroed_at"].to(self.device).clone()
        self._forced = h["forced"].to(self.device).clone()
        self._hot = None if self._redundant is None else self._plan(self._redundant, "hot")
        self._lambda = torch.zeros_like(self._scores)
        self._bad = torch.full((2,), -1, dtype=torch.long, device=self.device)
        self._counts = {}
        self._step_on_device = torch.tensor([self._step], dtype=torch.long, device=self.device)
        self._checked_at = self._step
