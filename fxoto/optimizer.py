"""Step 4 of the pipeline: H2SPG, the hierarchical half-space projected gradient.

Paper, section 3.2 and Algorithm 3; DESIGN section 5.  ``H2SPG`` is an ordinary
``torch.optim.Optimizer`` over the model's own parameters: param_groups, state,
``step(closure)``, ``state_dict()``; LR schedulers, gradient clipping, AMP grad
scalers and DDP work with it as with ``torch.optim.SGD`` or ``Adam``.  It runs
in three phases:

* ``"warmup"`` (lines 2-7): ``warmup_steps`` plain steps, each also updating an
  exponential moving average of every GeZIG's redundancy score;
* selection (line 8), once: the most redundant GeZIGs that keep the removal
  valid (``SearchSpace.is_valid_removal``, the check the rewrite also uses);
* ``"hybrid"`` (lines 9-16), ``pruning_steps`` long: plain steps outside the
  redundant set, a group-lasso step and a half-space projection inside it; at
  its end every redundant group is exactly zero (the rest are forced);
* ``"pruned"``: plain training goes on with the redundant groups pinned at zero.

The hybrid phase "gradually reduce[s] the magnitudes" of the redundant groups
(paper, section 3.2): lambda_g is DHSPG's (``dhspg_lambda``) or, when larger, a
floor that rises as the phase runs out (``lambda_floor``), so that each group
shrinks steadily to zero by the end of the phase and the half-space projection
(``epsilon`` 0.5 by default) sets it exactly to zero; the final forced
projection is left as a safety net and reported in ``forced``.

The step is one pass over the parameters, tensor by tensor like torch.optim's
own single-tensor paths (on the CPU these beat its foreach paths): a parameter's
gradient enters its state, is checked for inf/NaN, and, for a member of a
redundant group, the inner products ||x||^2, x.d (and ||d||^2 where x.d < 0) are
gathered and the group-lasso step taken, all while its tensors are still in the
CPU's cache.  That step needs lambda_g before the group's first member moves, so
lambda_g comes from the group's previous pass (one step of lag, ``_scale``); the
projection test uses this step's own products, gathered with one device sync for
all groups.  The only state beyond SGD's or Adam's is O(number of GeZIGs): three
floats per redundant group and one score per group.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim import Optimizer

from fxoto.errors import KTooLargeError, NonFiniteGradientError
from fxoto.space import SearchSpace

__all__ = [
    "H2SPG", "ScoreFn", "dhspg_lambda", "half_space_project", "lambda_floor", "redundancy_score", "select_redundant",
]

ScoreFn = Callable[[list[list[Tensor]], list[list[Tensor]]], Tensor]
"""``score_fn(params, grads)``: ``params[g]`` and ``grads[g]`` are GeZIG g's member tensors
(views into the live parameters) and their gradients; returns one score per GeZIG, larger
meaning more redundant (Algorithm 3, line 6)."""

VARIANTS = ("sgd", "adam", "adamw")
# DHSPG's defaults in the OTO code (DESIGN 5): lambda0, lambda amplify, hat-lambda coefficient.
LAMBDA_DEFAULTS = {"sgd": (1e-3, 2.0, 10.0), "adam": (1e-2, 20.0, 1e3), "adamw": (1e-2, 20.0, 1e3)}


# -- the paper's rules, one function each --------------------------------------------------


def _flat(t: Tensor) -> Tensor:
    return t if t.dim() == 1 else t.reshape(-1)  # a view where the layout allows


@torch.no_grad()
def redundancy_score(params: list[list[Tensor]], grads: list[list[Tensor]]) -> Tensor:
    """The default redundancy score s_{t,g} of every GeZIG, as DHSPG (Algorithm 3, line 6).

    For group g with n_g variables x_g and gradient grad_g:

    * c_g = <grad_g, x_g> / (||grad_g|| ||x_g||), the cosine between -grad_g and the projection
      direction -x_g (0 when either is zero): near 1 when descent shrinks the group anyway;
    * m_g = ||x_g||_2 / sqrt(n_g), the group's average (root-mean-square) magnitude;
    * s_g = c_g / ||c||_2 + (1 / m_g) / ||1 / m||_2,

    each term normalised over all groups by its Euclidean norm, as the OTO code does for DHSPG
    (which weighs both halves by 0.5, the same ranking).  Larger means more redundant.
    Returns a float64 tensor on the CPU.
    """
    if not params:
        return torch.zeros(0, dtype=torch.float64)
    rows = []
    for xs, gs in zip(params, grads):
        parts = [torch.stack([torch.dot(fx, fx), torch.dot(fx, fg), torch.dot(fg, fg)]).double()
                 for fx, fg in ((_flat(x), _flat(g)) for x, g in zip(xs, gs))]
        rows.append(torch.stack(parts).sum(0).cpu())
    xx, xg, gg = torch.stack(rows).unbind(1)
    numel = torch.tensor([float(sum(x.numel() for x in xs)) for xs in params], dtype=torch.float64)
    denom = (xx * gg).sqrt()
    cos = torch.where(denom > 0, xg / denom.clamp_min(1e-300), torch.zeros_like(denom))
    inverse_magnitude = 1.0 / (xx / numel).sqrt().clamp_min(1e-12)
    return cos / cos.norm().clamp_min(1e-12) + inverse_magnitude / inverse_magnitude.norm()


def select_redundant(space: SearchSpace, scores: Tensor, K: int) -> list[int]:
    """Algorithm 3, line 8 (paper, Figure 2): the redundant group candidates G_r.

    Walks the GeZIGs from the largest score down (ties by id), accepting a group only if the
    set stays a valid removal, until K are accepted.  Returns their ids in that order.
    """
    order = sorted(range(len(space.groups)), key=lambda g: (-float(scores[g]), g))
    chosen = space.greedy_removal(order, K)
    if len(chosen) < K:
        raise KTooLargeError(
            f"H2SPG needs K={K} redundant GeZIGs but, walking the {len(order)} GeZIGs of "
            f"{type(space.model).__name__} from the most redundant, only {len(chosen)} ({chosen}) can be erased "
            f"together while the output stays fed from the input. Choose K <= {len(chosen)}, or a score "
            f"function that ranks a larger valid removal first."
        )
    return chosen


def dhspg_lambda(x_norm: float, x_dot_d: float, d_sq: float, lambda0: float, amplify: float, hat: float) -> float:
    """Algorithm 3, line 13: the group-lasso coefficient lambda_g, chosen as DHSPG does.

    ``d`` is the group's step direction (gradient or its momentum/Adam variant).  When
    x.d >= 0 a plain step already shrinks the group: lambda0.  Otherwise lambda must exceed
    lb = -(x.d)/||x|| for the mixed direction d + lambda x/||x|| to shrink ||x||, and stay below
    ub = -||d||^2 ||x|| / (x.d) for it to remain a descent direction of f: the amplified lower
    bound clipped to [lambda0, lambda0 * hat], or (lb + ub) / 2 when that reaches ub.
    """
    if x_dot_d >= 0.0:
        return lambda0
    lb = -x_dot_d / x_norm
    ub = -d_sq * x_norm / x_dot_d
    lam = min(max(amplify * lb, lambda0), lambda0 * hat)
    return (lb + ub) / 2.0 if lam >= ub else lam


def lambda_floor(x_norm: float, lr: float, steps_left: int) -> float:
    """The least lambda_g of a redundant group in the hybrid phase: 2 ||x_g|| / (lr * steps_left).

    DHSPG's lambda_g (``dhspg_lambda``) keeps d + lambda_g x/||x|| a descent direction of f, so
    a group that f wants nonzero only shrinks until the two pulls balance, short of zero.
    DHSPG has no deadline; H2SPG must have every redundant group at zero when its
    ``pruning_steps`` end (DESIGN 5).  Left to the final projection, that is a jump in the loss
    as large as the groups still are.  With this floor the group-lasso term alone scales x_g by
    1 - 2/s when s steps of the phase are left (``steps_left``, this one included), so lambda_g
    rises as the phase runs out and ||x_g|| decays like (s / pruning_steps)^2: to 1% of its
    size with a tenth of the phase left, while the rest of the network adapts.  The step
    carries x_g to, then past, zero in the last two steps, where the half-space projection
    (line 15) catches it.  ``lr`` is the group's learning rate; with none, no floor.
    """
    return 2.0 * x_norm / (lr * steps_left) if lr > 0.0 else 0.0


@torch.no_grad()
def half_space_project(group: Sequence[Tensor], new_dot_old: float, old_sq: float, epsilon: float) -> bool:
    """Algorithm 3, line 15: the half-space projection of one group's trial iterate.

    ``group`` holds the trial iterate x~_g (in place); ``new_dot_old`` is x~_g . x_g and
    ``old_sq`` is ||x_g||^2 for the iterate x_g before the step.  When x~_g . x_g < epsilon
    ||x_g||^2, x~_g has left the half-space around x_g and the group is set exactly to zero.
    Returns whether it was.
    """
    if new_dot_old < epsilon * old_sq:
        for t in group:
            t.zero_()
        return True
    return False


# -- the optimizer ----------------------------------------------------------------------------


class _Part(NamedTuple):
    """One member of a GeZIG, resolved to the live parameter."""

    param: Tensor
    dim: int | None
    start: int
    length: int

    def of(self, t: Tensor) -> Tensor:
        """The member's view into ``t``, a tensor shaped like the parameter (it, its gradient, its state)."""
        return t if self.dim is None else t.narrow(self.dim, self.start, self.length)


class _Direction(NamedTuple):
    """A plain step x <- x - step * num / den (den None: x - step * num).

    ``lr`` is the learning rate: the step direction in the paper's sense is
    d = (step / lr) * num / den, the gradient or its momentum/Adam variant.
    """

    num: Tensor
    den: Tensor | None
    step: float
    lr: float
    probe: Tensor  # the first tensor to take the gradient (it, or the state it entered): checked for inf/NaN


def _plain_step(p: Tensor, d: _Direction) -> None:
    """x <- x - step * num / den."""
    if d.den is None:
        p.add_(d.num, alpha=-d.step)
    else:
        p.addcdiv_(d.num, d.den, value=-d.step)


def _scale_add_(x: Tensor, a: float, v: Tensor, alpha: float) -> None:
    """x <- a x + alpha v in place.  On one thread and contiguous tensors, one pass over memory:
    BLAS gemv with v as an n-by-1 matrix, where ``x.mul_(a).add_(v, alpha=alpha)`` reads and
    writes x twice; gemv runs on one thread, though, so with more the two calls are faster."""
    if torch.get_num_threads() == 1 and x.is_contiguous() and v.is_contiguous():
        x.view(-1).addmv_(v.view(-1, 1), v.new_ones(1), beta=a, alpha=alpha)
    else:
        x.mul_(a).add_(v, alpha=alpha)


class H2SPG(Optimizer):
    """Hierarchical Half-Space Projected Gradient (paper, Algorithm 3) over a ``SearchSpace``.

    Args:
        space: the search space; its model's parameters are optimised.
        K: target group sparsity: a count, or a float in (0, 1) as a fraction of the GeZIGs.
        lr: learning rate (alpha_t; LR schedulers change it as usual).
        params: optional parameters or param-group dicts (per-group lr, weight_decay ...);
            by default ``space.model.parameters()``.  They must include every GeZIG variable.
        variant: ``"sgd"`` (with ``momentum``, ``dampening``, ``nesterov``), ``"adam"`` or
            ``"adamw"`` (with ``betas``, ``eps``); ``weight_decay`` is L2 (decoupled for adamw).
            The plain steps are those of ``torch.optim.SGD``, ``Adam`` and ``AdamW``.
        warmup_steps: T_w, steps before the redundant groups are selected.
        pruning_steps: length of the hybrid phase; at its end every redundant group is zero.
        omega: momentum of the redundancy scores' moving average (line 7).
        epsilon: half-space projection threshold in [0, 1) (line 15): a group goes to zero
            once its trial step would remove more than 1 - epsilon of its component along x_g.
            Default 0.5: with the floor of lambda_g each group crosses zero in the last steps of
            the phase, where f's pull on a group that small can outweigh the crossing; 0 (the
            OTO code's default, for DHSPG without a deadline) then left most groups to the
            forced projection in fxoto's tests, 0.5 none.
        lambda0, lambda_amplify, hat_lambda_coef: DHSPG's lambda rule (``dhspg_lambda``);
            defaults 1e-3, 2, 10 for sgd and 1e-2, 20, 1e3 for adam/adamw.  Over the hybrid
            phase lambda_g is at least ``lambda_floor``, which rises as the phase runs out.
        score_fn: redundancy score (``ScoreFn``); default ``redundancy_score``.

    Attributes ``redundant`` (the selected GeZIG ids, empty during warm-up), ``scores``,
    ``phase``, ``forced`` (ids zeroed by the final forced projection) and ``metrics()``
    report progress.  A gradient holding inf or NaN raises ``NonFiniteGradientError`` naming
    the parameter, before that parameter moves; the parameters before it in this step have
    taken the step and it may have entered the parameter's momentum or Adam state, so the way
    on is the last checkpoint (a ``torch.amp.GradScaler`` skips such steps without calling
    ``step``).
    """

    def __init__(
        self,
        space: SearchSpace,
        K: int | float,
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
        omega: float = 0.9,
        epsilon: float = 0.5,
        lambda0: float | None = None,
        lambda_amplify: float | None = None,
        hat_lambda_coef: float | None = None,
        score_fn: ScoreFn | None = None,
    ):
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, not {variant!r}")
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
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov, betas=betas, eps=eps,
                        weight_decay=weight_decay)
        super().__init__(space.model.parameters() if params is None else params, defaults)

        from fxoto.search import target_k  # here, not at the top: Search.optimizer builds H2SPGs

        self.space = space
        self.variant = variant
        self.K = target_k(K, space)  # the one K check, shared with fxoto.search
        self.warmup_steps = warmup_steps
        self.pruning_steps = pruning_steps
        self.omega = omega
        self.epsilon = epsilon
        l0, amp, hat = LAMBDA_DEFAULTS[variant]
        self.lambda0 = l0 if lambda0 is None else lambda0
        self.lambda_amplify = amp if lambda_amplify is None else lambda_amplify
        self.hat_lambda_coef = hat if hat_lambda_coef is None else hat_lambda_coef
        self.score_fn = redundancy_score if score_fn is None else score_fn

        named = dict(space.model.named_parameters(remove_duplicate=False))  # the graph's names are the model's
        self._names = {}
        for name, p in named.items():
            self._names.setdefault(id(p), name)
        self._parts = [
            [_Part(named[m.param], m.dim, m.start, m.stop - m.start) for m in g.members] for g in space.groups
        ]
        owned = {id(p) for group in self.param_groups for p in group["params"]}
        for g, parts in zip(space.groups, self._parts):
            for m, part in zip(g.members, parts):
                if id(part.param) not in owned:
                    raise ValueError(f"parameter '{m.param}' of GeZIG g{g.id} is not among the optimizer's params")

        self._step = 0  # steps taken: t in Algorithm 3
        self._scores = torch.zeros(len(space.groups), dtype=torch.float64)  # s_g, line 7
        self._redundant: list[int] | None = None  # G_r, None until selected (line 8)
        self._zero: set[int] = set()  # redundant groups projected to zero and pinned there
        self._forced: list[int] = []
        self._lambdas: dict[int, float] = {}
        self._stats: dict[int, tuple[float, float, float | None]] = {}  # hot g: ||x||^2, x.d, ||d||^2 of its last pass
        self._pinned_plan: tuple[set[int], list[_Part]] | None = None
        self._group_of: tuple[list[dict], dict[int, dict]] | None = None
        self._members_of: tuple[tuple[int, ...], dict[int, list[tuple[int, _Part]]]] | None = None

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
        return list(self._forced)

    @property
    def lambdas(self) -> dict[int, float]:
        """lambda_g of the last hybrid step, by group id, for the groups not yet zero."""
        return dict(self._lambdas)

    @property
    def phase(self) -> str:
        """``"warmup"``, ``"hybrid"`` or ``"pruned"`` (redundant groups pinned at zero)."""
        if self._redundant is None:
            return "warmup"
        return "hybrid" if self._step < self.warmup_steps + self.pruning_steps else "pruned"

    @torch.no_grad()
    def metrics(self) -> dict[str, Any]:
        """Progress now: step, phase, zero groups and group sparsity, norms of the important
        (G_r^C) and redundant (G_r) groups, and how many groups were forced to zero."""
        n = len(self.space.groups)
        sq = [sum(float(torch.dot(_flat(t), _flat(t))) for t in self.space.tensors(g)) for g in range(n)]
        red = set(self.redundant)
        zero = len(self.space.zero_groups())
        return {
            "step": self._step,
            "phase": self.phase,
            "groups": n,
            "zero_groups": zero,
            "group_sparsity": zero / n if n else 0.0,
            "redundant": self.redundant,
            "forced": len(self._forced),
            "norm_important": math.sqrt(sum(s for g, s in enumerate(sq) if g not in red)),
            "norm_redundant": math.sqrt(sum(s for g, s in enumerate(sq) if g in red)),
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
        skip, _ = self._pinned()
        work = [(p, p.grad, group) for group in self.param_groups for p in group["params"]
                if p.grad is not None and id(p) not in skip]
        if any(grad.is_sparse for _, grad, _ in work):
            raise RuntimeError("H2SPG does not support sparse gradients")

        scores = None
        if self._redundant is None:
            scores = self._redundancy_scores(work)
            if self.warmup_steps == 0:
                self._accumulate(scores)
                scores = None
                self._select()
        hot = [g for g in self._redundant or () if g not in self._zero]
        self._update(work, hot)
        if scores is not None:
            self._accumulate(scores)
        self._step += 1
        if self._redundant is None and self._step >= self.warmup_steps:
            self._select()
        elif self._redundant is not None and self._step == self.warmup_steps + self.pruning_steps:
            self._force()
        return loss

    def _check_finite(self, p: Tensor, grad: Tensor, probe: Tensor, stepped: int,
                      sq: Tensor | None = None) -> None:
        """Raise, naming the parameter, if its gradient holds inf or NaN.

        Called as the gradient enters the parameter's optimizer state and before the
        parameter moves, while the tensors are in the CPU's cache: ``probe`` is the state
        tensor that took the gradient (the gradient itself where there is none), summed, or
        ``sq``, an inner product already computed from it; inf or NaN in the gradient makes
        either non-finite.  ``stepped`` counts the parameters already updated this step.
        """
        if sq is None:
            sq = probe.sum()  # inf or NaN anywhere makes the sum so; the cheapest reduction there is
        if math.isfinite(float(sq)) or bool(grad.isfinite().all()):
            return  # finite gradient: the sum or product overflowed, or the state did (the step shows it)
        name = self._names.get(id(p), "?")
        state = "" if probe is grad else f", and the optimizer state of '{name}' has taken the gradient"
        if stepped == 0:
            done = f"no parameter has moved{state}"
        else:
            done = (f"'{name}' and the parameters after it have not moved, but the {stepped} before it in the "
                    f"optimizer's order had already taken this step{state}: restore the last checkpoint to go on")
        raise NonFiniteGradientError(
            f"the gradient of parameter '{name}' holds inf or NaN at step {self._step} ({self.phase} phase); "
            f"{done}. Lower the learning rate, check the loss for overflow, or train with torch.amp.GradScaler, "
            f"which skips such steps."
        )

    def _redundancy_scores(self, work: list[tuple[Tensor, Tensor, dict]]) -> Tensor:
        """Algorithm 3, line 6: s_{t,g} on x_t and its gradient, before the step moves x_t."""
        params = [[part.of(part.param) for part in parts] for parts in self._parts]
        grads = [[part.of(part.param.grad) if part.param.grad is not None else torch.zeros_like(part.of(part.param))
                  for part in parts] for parts in self._parts]
        s = torch.as_tensor(self.score_fn(params, grads)).detach().to("cpu", torch.float64).reshape(-1)
        if s.numel() != len(self._parts) or not bool(s.isfinite().all()):
            for p, grad, _ in work:  # a non-finite gradient is the likely cause
                self._check_finite(p, grad, grad, 0)
            raise ValueError(f"score_fn must return {len(self._parts)} finite scores, one per GeZIG; got {s.tolist()}")
        return s

    def _accumulate(self, s: Tensor) -> None:
        """Algorithm 3, line 7: s_g <- omega s_g + (1 - omega) s_{t,g}."""
        self._scores.mul_(self.omega).add_(s, alpha=1.0 - self.omega)

    def _select(self) -> None:
        """Algorithm 3, line 8, on scores every rank agrees on (rank 0's, under DDP)."""
        if dist.is_available() and dist.is_initialized():
            box = [self._scores.tolist()]
            dist.broadcast_object_list(box, src=0)
            self._scores = torch.tensor(box[0], dtype=torch.float64)
        self._redundant = select_redundant(self.space, self._scores, self.K)
        if self.pruning_steps == 0:
            self._force()

    def _force(self) -> None:
        """End of the hybrid phase: project what is left of G_r onto zero, so K is met exactly."""
        for g in self._redundant or ():
            if g not in self._zero:
                for part in self._parts[g]:
                    part.of(part.param).zero_()
                self._pin(g)
                self._forced.append(g)
        self._lambdas = {}

    def _pin(self, g: int) -> None:
        """Group g is zero from now on: so is its momentum / Adam state."""
        for part in self._parts[g]:
            self._zero_state(part)
        self._zero.add(g)
        self._stats.pop(g, None)
        self._pinned_plan = None

    def _zero_state(self, part: _Part) -> None:
        """Zero the member's slice of its parameter's momentum / Adam state."""
        for value in self.state.get(part.param, {}).values():
            if isinstance(value, Tensor) and value.shape == part.param.shape:
                part.of(value).zero_()

    def _pinned(self) -> tuple[set[int], list[_Part]]:
        """Parameters wholly inside pinned groups (no step at all) and pinned slices (re-zeroed)."""
        if self._pinned_plan is None:
            parts = [part for g in sorted(self._zero) for part in self._parts[g]]
            self._pinned_plan = ({id(p.param) for p in parts if p.dim is None}, [p for p in parts if p.dim is not None])
        return self._pinned_plan

    def _update(self, work: list[tuple[Tensor, Tensor, dict]], hot: list[int]) -> None:
        """Plain steps for everything (lines 5, 12), except that the redundant groups in ``hot``
        step on f + lambda_g ||x_g|| and are then half-space projected (lines 13-16).

        One pass, parameter by parameter: its gradient is checked, its state advanced and,
        for a hot group's member, the inner products gathered and the group-lasso step taken,
        each following the other while the tensors are still in the CPU's cache.  The step
        x~ = x - lr (d + lambda_g x / ||x_g||) = a_g x - lr d needs lambda_g before the group's
        first member moves, so lambda_g and the norm it divides by are those of the group's
        previous pass (``_scale``): one step of lag.  The projection test uses this step's
        own inner products, gathered before each member moved."""
        members = self._members(hot)
        self._lambdas = {}
        per_norm = {g: self._scale(g) for g in hot}
        # ||d||^2 only serves lambda's upper bound, needed where x.d < 0: expected where it was last pass
        want_dd = {g for g in hot if self._stats[g][1] < 0.0}
        gathered: list[tuple[int, _Part, float, float, float, list[Tensor]]] = []  # g, part, a, step, lr, dots
        stepped = 0
        moved = set()
        for p, grad, group in work:
            parts = members.get(id(p))
            if parts is None:
                d = self._direction(p, grad, group)
                self._check_finite(p, grad, d.probe, stepped)
                _plain_step(p, d)
                stepped += 1
                continue
            moved.add(id(p))
            d = self._direction(p, grad, group, materialize=True)
            whole = parts[0][1].dim is None
            if not whole:
                self._check_finite(p, grad, d.probe, stepped)
            scales = []
            for g, part in parts:
                x, v = _flat(part.of(p)), _flat(part.of(d.num))
                scales.append(1.0 - d.lr * per_norm[g])
                dots = [torch.dot(x, x), torch.dot(x, v)]
                if g in want_dd:
                    dots.append(torch.dot(v, v))
                gathered.append((g, part, scales[-1], d.step, d.lr, dots))
            if whole:  # checked through x.d; then x <- a x - step num, in one pass
                self._check_finite(p, grad, d.probe, stepped, sq=dots[1])
                _scale_add_(p, scales[0], d.num, -d.step)
            else:  # slices: scale each, then the parameter's plain step
                for (_, part), a in zip(parts, scales):
                    if a != 1.0:
                        part.of(p).mul_(a)
                _plain_step(p, d)
            stepped += 1
        for key, parts in members.items():  # no gradient: f does not move them, the lasso term still does
            if key in moved:
                continue
            for g, part in parts:
                lr = self._lr_of(part.param)
                x = _flat(part.of(part.param))
                a = 1.0 - lr * per_norm[g]
                gathered.append((g, part, a, 0.0, lr, [torch.dot(x, x)]))
                part.of(part.param).mul_(a)
        self._project(hot, gathered, want_dd)
        for part in self._pinned()[1]:
            part.of(part.param).zero_()
            self._zero_state(part)

    def _members(self, hot: list[int]) -> dict[int, list[tuple[int, _Part]]]:
        """The hot groups' members by parameter (id): kept while the hot set stays the same."""
        key = tuple(hot)
        if self._members_of is None or self._members_of[0] != key:
            members: dict[int, list[tuple[int, _Part]]] = {}
            for g in hot:
                for part in self._parts[g]:
                    members.setdefault(id(part.param), []).append((g, part))
            self._members_of = (key, members)
        return self._members_of[1]

    def _lr_of(self, p: Tensor) -> float:
        """The learning rate of p's param group now (schedulers change it)."""
        cached = self._group_of
        if (cached is None or len(cached[0]) != len(self.param_groups)
                or any(a is not b for a, b in zip(cached[0], self.param_groups))):  # add_param_group, load_state_dict
            self._group_of = (list(self.param_groups),
                              {id(q): group for group in self.param_groups for q in group["params"]})
        return self._group_of[1][id(p)]["lr"]

    def _scale(self, g: int) -> float:
        """lambda_g / ||x_g|| for hot group g's step (line 13), from its previous pass: the larger
        of DHSPG's lambda (``dhspg_lambda``) and the floor of the hybrid phase (``lambda_floor``).

        ``_stats[g]`` holds ||x_g||^2, x_g.d_g and ||d_g||^2 (None where not gathered) from the
        group's previous pass; the floor takes the group's learning rate now.  On its first
        hybrid step a group has none: its lambda is then DHSPG's for x.d >= 0 (lambda0) or the
        floor, with ||x_g|| measured now.  ||d_g||^2 only serves DHSPG's upper bound on lambda, needed where
        x.d < 0; it is gathered where x.d was negative the pass before, so for one step after
        x.d turns negative the bound is not applied."""
        if g not in self._stats:
            xx = sum(float(torch.dot(x, x)) for x in (_flat(part.of(part.param)) for part in self._parts[g]))
            self._stats[g] = (xx, 0.0, None)
        xx, xd, dd = self._stats[g]
        if xx <= 0.0:
            return 0.0
        lr_g = max(self._lr_of(part.param) for part in self._parts[g])
        norm = math.sqrt(xx)
        steps_left = self.warmup_steps + self.pruning_steps - self._step
        lam = max(dhspg_lambda(norm, xd, math.inf if dd is None else dd, self.lambda0, self.lambda_amplify,
                               self.hat_lambda_coef),
                  lambda_floor(norm, lr_g, steps_left))
        self._lambdas[g] = lam
        return lam / norm

    def _project(self, hot: list[int], gathered: list[tuple[int, _Part, float, float, float, list[Tensor]]],
                 want_dd: set[int]) -> None:
        """Line 15 for every hot group, from the inner products gathered in the pass (one device
        sync): x~_g . x_g = sum over members of a ||x||^2 - step x.num.  Keeps each surviving
        group's ||x_g||^2, x_g.d_g and ||d_g||^2 (if in ``want_dd``) for its next step (``_scale``)."""
        flat = [t for *_, dots in gathered for t in dots]
        values = iter(torch.stack(flat).double().tolist() if flat else [])
        sums: dict[int, list] = {g: [0.0, 0.0, 0.0, 0.0] for g in hot}  # ||x||^2, x.d, ||d||^2, x~.x
        for g, _, a, step, lr, dots in gathered:
            s = sums[g]
            scale = step / lr if lr else 1.0  # d = (step / lr) num
            x_sq = next(values)
            x_num = next(values) if len(dots) > 1 else 0.0  # a member without gradient has ||x||^2 only
            if len(dots) > 2:
                s[2] += next(values) * scale * scale
            s[0] += x_sq
            s[1] += x_num * scale
            s[3] += a * x_sq - step * x_num
        for g in hot:
            xx, xd, dd, new_dot_old = sums[g]
            group = (part.of(part.param) for part in self._parts[g])
            if xx == 0.0:  # already at zero, where the group-lasso subgradient step keeps it
                for t in group:
                    t.zero_()
                self._pin(g)
            elif half_space_project(group, new_dot_old, xx, self.epsilon):
                self._pin(g)
            else:
                self._stats[g] = (xx, xd, dd if g in want_dd else None)

    def _direction(self, p: Tensor, grad: Tensor, group: dict, materialize: bool = False) -> _Direction:
        """Advance p's state by its gradient and return its plain step x <- x - step * num / den:
        the single-tensor algorithms of torch.optim's SGD, Adam and AdamW.  ``materialize``
        computes num / den (into den's buffer) for the group-lasso step to read."""
        state = self.state[p]
        lr, wd = group["lr"], group["weight_decay"]
        if self.variant == "sgd":
            g = grad if wd == 0 else grad.add(p, alpha=wd)
            momentum = group["momentum"]
            if momentum != 0:
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = torch.clone(g).detach()
                elif group["dampening"] == 0:
                    torch.add(g, buf, alpha=momentum, out=buf)  # one pass over memory, not mul_ then add_
                else:
                    buf.mul_(momentum).add_(g, alpha=1.0 - group["dampening"])
                g = g.add(buf, alpha=momentum) if group["nesterov"] else buf
            return _Direction(g, None, lr, lr, buf if momentum != 0 else grad)

        beta1, beta2 = group["betas"]
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] += 1
        g = grad
        if wd != 0:
            if self.variant == "adamw":
                p.mul_(1.0 - lr * wd)
            else:
                g = grad.add(p, alpha=wd)
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.lerp_(g, 1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        step = float(state["step"])
        denom = exp_avg_sq.sqrt().div_(math.sqrt(1.0 - beta2**step)).add_(group["eps"])
        step_size = lr / (1.0 - beta1**step)
        if materialize:
            return _Direction(torch.div(exp_avg, denom, out=denom), None, step_size, lr, exp_avg)
        return _Direction(exp_avg, denom, step_size, lr, exp_avg)

    # -- checkpoints ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """torch.optim's state dict plus an ``"h2spg"`` entry: step counter, scores, the
        redundant set, pinned and forced groups, and the H2SPG settings."""
        sd = super().state_dict()
        sd["h2spg"] = {
            "groups": len(self._parts),
            "variant": self.variant,
            "K": self.K,
            "warmup_steps": self.warmup_steps,
            "pruning_steps": self.pruning_steps,
            "omega": self.omega,
            "epsilon": self.epsilon,
            "lambda0": self.lambda0,
            "lambda_amplify": self.lambda_amplify,
            "hat_lambda_coef": self.hat_lambda_coef,
            "step": self._step,
            "scores": self._scores.clone(),
            "redundant": None if self._redundant is None else list(self._redundant),
            "zero": sorted(self._zero),
            "forced": list(self._forced),
            "stats": {g: list(s) for g, s in self._stats.items()},
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a ``state_dict()``; like param_groups, its settings replace the constructor's."""
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
        for key in ("K", "warmup_steps", "pruning_steps", "omega", "epsilon", "lambda0", "lambda_amplify",
                    "hat_lambda_coef"):
            setattr(self, key, h[key])
        self._step = h["step"]
        self._scores = h["scores"].clone().to("cpu", torch.float64)
        self._redundant = None if h["redundant"] is None else list(h["redundant"])
        self._zero = set(h["zero"])
        self._forced = list(h["forced"])
        self._stats = {int(g): tuple(s) for g, s in h.get("stats", {}).items()}
        self._lambdas = {}
        self._pinned_plan = None
