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

Execution.  The paper's rules are small functions over per-group tensors (one entry
per GeZIG, on the parameters' device); every step computes them on the device, so a
step never reads a value back to the host (the one exception: the step that
selects the redundant set, which sorts the scores on the host).  The per-parameter
arithmetic has two paths, chosen by ``foreach`` as in torch.optim: a loop over
tensors (``_single_tensor``, the default on the CPU, where it keeps each tensor in
cache) and multi-tensor ``torch._foreach_*`` calls over all parameters
(``_multi_tensor``, the default on CUDA).  Both call the same rules
(``_hybrid_coefficients``).  A step loops over parameters, never over groups, so it
scales to tens of thousands of channel groups: each parameter holding members is one
whole member or a stack of rows along one dim (``_Plan``).  A step takes, per row of
the redundant groups, the inner products ||x||^2, x.d and ||d||^2 (d: the step
direction, the gradient or its momentum / Adam variant), sums them per group (one
``index_add_``), computes lambda_g and the projection test from them and only then
moves the rows: x~ = a x - lr d with a = 1 - lr lambda_g / ||x_g||, and
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
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.optim import Optimizer

from fxoto.errors import DeviceError, KTooLargeError, NonFiniteGradientError
from fxoto.space import SearchSpace, kind_counts, select_per_kind, target_k

__all__ = [
    "H2SPG", "GroupStats", "ScoreFn", "dhspg_lambda", "half_space_project", "hybrid_lambda", "lambda_floor",
    "redundancy_score", "reference_score", "select_redundant",
]

VARIANTS = ("sgd", "adam", "adamw")
LAMBDA_RULES = ("deadline", "paper")
# DHSPG's defaults in the OTO code: lambda0, lambda amplify, hat-lambda coefficient.
LAMBDA_DEFAULTS = {"sgd": (1e-3, 2.0, 10.0), "adam": (1e-2, 20.0, 1e3), "adamw": (1e-2, 20.0, 1e3)}


# -- the paper's rules, one function each, over per-group tensors ---------------------------


class GroupStats(NamedTuple):
    """Sums over each GeZIG's members: float64 vectors with one entry per GeZIG.

    ``v`` is what the score reads: the raw gradient, or the optimizer's step direction
    for a score function whose ``on`` attribute is ``"direction"``.
    """

    xx: Tensor  # ||x_g||^2
    xv: Tensor  # x_g . v_g
    vv: Tensor  # ||v_g||^2
    numel: Tensor  # n_g, the group's number of variables
    layer: Tensor | None = None  # long: 0 for every operation group, 1 + its layer for a channel group


ScoreFn = Callable[[GroupStats], Tensor]
"""``score_fn(stats)``: one score per GeZIG from its ``GroupStats``, larger meaning more
redundant (Algorithm 3, line 6).  Runs on the device every warm-up step: tensor
arithmetic only, no host reads.  Its ``on`` attribute (``"gradient"`` when absent) says
whether ``v`` is the gradient or the optimizer's step direction."""


def _cosine(stats: GroupStats) -> Tensor:
    """cos(-v_g, -x_g), 0 where either is zero."""
    denom = (stats.xx * stats.vv).sqrt()
    return torch.where(denom > 0, stats.xv / denom.clamp_min(1e-300), 0.0)


def _unit(t: Tensor) -> Tensor:
    return t / t.norm().clamp_min(1e-300)


def redundancy_score(stats: GroupStats) -> Tensor:
    """fxoto's default redundancy score (Algorithm 3, line 6), on the raw gradient.

    s_g = c_g / ||c|| + (1 / m_g) / ||1 / m||, where c_g = cos(-grad_g, -x_g) (near 1 when
    descent shrinks the group anyway; 0 when either is zero) and m_g = ||x_g|| / sqrt(n_g),
    the group's root-mean-square magnitude, so that groups of different sizes compare
    by their typical variable.  Each term is normalised over all groups by its Euclidean
    norm.  This differs from the OTO code's DHSPG score (``reference_score``) in the
    magnitude (RMS, not ||x_g|| / n_g) and in reading the gradient rather than the
    optimizer's direction; ``tools/ablate_h2spg.py`` measures both.
    """
    magnitude = _within_layer((stats.xx / stats.numel).sqrt(), stats.layer)
    return _unit(_cosine(stats)) + _unit(1.0 / magnitude.clamp_min(1e-12))


def _within_layer(magnitude: Tensor, layer: Tensor | None) -> Tensor:
    """Each group's magnitude over the mean magnitude of its layer (``GroupStats.layer``).

    Layers are initialised at different scales (by fan-in), so raw magnitudes would rank
    the channels of a wide linear layer below every convolution's and slim it to one
    channel; within a layer, channels compare with each other.  The operation groups form
    one layer, where dividing by one mean changes nothing after ``_unit``.
    """
    if layer is None:
        return magnitude
    n = layer.numel() + 1  # at least the number of layers, known without reading the device
    sums = torch.zeros(n, dtype=magnitude.dtype, device=magnitude.device).index_add_(0, layer, magnitude)
    counts = torch.zeros(n, dtype=magnitude.dtype, device=magnitude.device).index_add_(
        0, layer, torch.ones_like(magnitude))
    return magnitude / (sums / counts.clamp_min(1.0)).clamp_min(1e-300)[layer]


redundancy_score.on = "gradient"


def reference_score(stats: GroupStats) -> Tensor:
    """The OTO code's DHSPG redundancy score, for comparison (``score_fn=reference_score``).

    s_g = 0.5 c_g / ||c|| + 0.5 (1 / m_g) / ||1 / m|| with c_g = cos(-d_g, -x_g) on the
    optimizer's step direction d_g (momentum / Adam) and m_g = ||x_g|| / n_g, the
    group's norm divided by its size (which favours removing large groups).
    """
    magnitude = stats.xx.sqrt() / stats.numel
    return 0.5 * _unit(_cosine(stats)) + 0.5 * _unit(1.0 / magnitude.clamp_min(1e-12))


reference_score.on = "direction"


def select_redundant(space: SearchSpace, scores: Tensor, K: int, per_kind: dict[str, int] | None = None) -> list[int]:
    """Algorithm 3, line 8 (paper, Figure 2): the redundant group candidates G_r.

    The K GeZIGs most redundant by ``scores`` (ties by id) that form a valid removal
    (``SearchSpace.select_removal``): whenever ``target_k`` accepted K, K are found.
    With ``per_kind`` (K given per kind, ``{"operation": 3, "channel": 120}``), that many
    of each kind, each kind ranked by its own scores (``select_per_kind``).
    Returns their ids in the order they were accepted.
    """
    values = scores.tolist()
    order = sorted(range(len(space.groups)), key=lambda g: (-values[g], g))
    chosen = space.select_removal(order, K) if per_kind is None else select_per_kind(space, order, per_kind)
    if len(chosen) < K:
        raise KTooLargeError(
            f"H2SPG needs K={K} redundant GeZIGs but only {len(chosen)} ({chosen[:8]}) of the {len(order)} GeZIGs "
            f"of {type(space.model).__name__} can be erased together while the output stays fed from the input. "
            f"Choose K <= {len(space.greedy_max_removal())}."
        )
    return chosen


def dhspg_lambda(x_norm: Tensor, x_dot_d: Tensor, d_sq: Tensor, lambda0: float, amplify: float,
                 hat: float) -> Tensor:
    """Algorithm 3, line 13: the group-lasso coefficient lambda_g, chosen as DHSPG does.

    ``d`` is the group's step direction (gradient or its momentum / Adam variant).  When
    x.d >= 0 a plain step already shrinks the group: lambda0.  Otherwise lambda must exceed
    lb = -(x.d)/||x|| for the mixed direction d + lambda x/||x|| to shrink ||x||, and stay below
    ub = -||d||^2 ||x|| / (x.d) for it to remain a descent direction of f: the amplified lower
    bound clipped to [lambda0, lambda0 * hat], or (lb + ub) / 2 when that reaches ub.
    Elementwise over groups; entries with ||x|| = 0 are meaningless (such groups are zero).
    """
    lb = -x_dot_d / x_norm.clamp_min(1e-300)
    ub = -d_sq * x_norm / x_dot_d.clamp_max(-1e-300)
    lam = (amplify * lb).clamp(lambda0, lambda0 * hat)
    lam = torch.where(lam >= ub, (lb + ub) / 2.0, lam)
    return torch.where(x_dot_d >= 0, lambda0, lam)


def lambda_floor(x_norm: Tensor, lr: Tensor | float, steps_left: int) -> Tensor:
    """The least lambda_g of the ``"deadline"`` rule: 2 ||x_g|| / (lr * steps_left).

    DHSPG's lambda_g keeps d + lambda_g x/||x|| a descent direction of f, so a group that
    f wants nonzero only shrinks until the two pulls balance, short of zero.  DHSPG has no
    deadline; with this floor the group-lasso term alone scales x_g by 1 - 2/s when s steps
    of the budget are left (``steps_left``, this one included), so lambda_g rises as the
    budget runs out and ||x_g|| decays like (s / pruning_steps)^2, reaching zero with two
    steps left, where the half-space projection (line 15) catches it.  ``lr`` is the group's
    learning rate; where it is 0, no floor.
    """
    lr = torch.as_tensor(lr, dtype=x_norm.dtype, device=x_norm.device)
    return torch.where(lr > 0, 2.0 * x_norm / (lr.clamp_min(1e-300) * steps_left), 0.0)


def hybrid_lambda(rule: str, x_norm: Tensor, x_dot_d: Tensor, d_sq: Tensor, lr: Tensor, steps_left: int,
                  lambda0: float, amplify: float, hat: float) -> Tensor:
    """lambda_g of every group for one hybrid step: DHSPG's (``"paper"``) or, under
    ``"deadline"``, the larger of DHSPG's and ``lambda_floor``."""
    lam = dhspg_lambda(x_norm, x_dot_d, d_sq, lambda0, amplify, hat)
    if rule == "deadline":
        lam = torch.maximum(lam, lambda_floor(x_norm, lr, steps_left))
    return lam


def half_space_project(new_dot_old: Tensor, old_sq: Tensor, epsilon: float) -> Tensor:
    """Algorithm 3, line 15: which groups the half-space projection sets to zero.

    ``new_dot_old`` is x~_g . x_g for the trial iterate x~_g and ``old_sq`` is ||x_g||^2
    for the iterate x_g before the step.  When x~_g . x_g < epsilon ||x_g||^2, x~_g has
    left the half-space around x_g and the group goes to zero; a group already at zero
    stays there.  Returns a boolean tensor, True for the groups projected to zero.
    """
    return (new_dot_old < epsilon * old_sq) | (old_sq <= 0)


# -- the optimizer ----------------------------------------------------------------------------


class _Part(NamedTuple):
    """One member of a GeZIG, resolved to the live parameter."""

    param: Tensor
    dim: int | None
    start: int
    length: int


class _Plan(NamedTuple):
    """The parameters that hold the members of a set of groups, laid out for one step's
    reductions and updates, so that a step loops over parameters, never over groups.

    A parameter is one whole member (``dims[i]`` None) or holds members along one dim,
    its slices along that dim being its "rows"; a whole member is one row.  Reductions
    are taken per row, the rows of ``params`` concatenated in order (parameter i's from
    ``offsets[i]``; the ``whole`` whole members come first): ``row_group[r]`` is row r's
    group (``n``, one past the last group, for a row outside the plan's groups) and
    ``row_param[r]`` its parameter's position.  Per-group sums are one ``index_add_``
    over the rows (``_group_sums``).  ``rows_in[i]``: the rows of sliced parameter i in
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


class _Direction(NamedTuple):
    """A plain step x <- x - step * num / den (den None: x - step * num).

    The step direction in the paper's sense is d = (step / lr) * num / den.
    """

    num: Tensor
    den: Tensor | None
    step: float
    lr: float


def _flat(t: Tensor) -> Tensor:
    return t if t.dim() == 1 else t.reshape(-1)


def _rows(t: Tensor, dim: int) -> Tensor:
    """``t`` as [rows, -1], one row per slice along ``dim`` (a view when dim is 0)."""
    if dim != 0:
        t = t.movedim(dim, 0)
    return t.reshape(t.shape[0], -1)


def _dots(x: Tensor, v: Tensor) -> list[Tensor]:
    """||x||, x.v, ||v||: the norms one read of the tensor each, where a dot product of a tensor
    with itself reads it twice (``_products`` squares them in float64, for every row at once)."""
    x, v = _flat(x), _flat(v)
    return [torch.linalg.vector_norm(x), torch.dot(x, v), torch.linalg.vector_norm(v)]


ROW_BLOCK = 1 << 20  # elements per block of rows in _row_dots: its temporary stays in the cache


def _row_dots(x: Tensor, v: Tensor | None, dim: int) -> Tensor:
    """[rows, 3]: ||x||, x.v, ||v|| of each slice along ``dim`` (v None: ||x||, 0, 0), in x's dtype
    (``_products`` casts and squares every parameter's rows at once: few calls per parameter,
    which is what a step over a ResNet's 160 parameters pays for beside the arithmetic).

    Norms are one read each; x.v is taken in blocks of rows of at most ``ROW_BLOCK``
    elements, so that its temporary x * v stays small (a linear layer's weight can hold a
    hundred million)."""
    xr = _rows(x, dim)
    xx = torch.linalg.vector_norm(xr, dim=1)
    if v is None:
        return F.pad(xx.unsqueeze(1), (0, 2))
    vr = _rows(v, dim)
    step = max(1, ROW_BLOCK // max(1, xr.shape[1]))
    if xr.shape[0] <= step:
        xv = torch.linalg.vecdot(xr, vr, dim=1)
    else:
        xv = torch.cat([torch.linalg.vecdot(xb, vb, dim=1) for xb, vb in zip(xr.split(step), vr.split(step))])
    return torch.stack([xx, xv, torch.linalg.vector_norm(vr, dim=1)], 1)


def _foreach_dots(xs: list[Tensor], vs: list[Tensor]) -> Tensor:
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
    ):
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
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov, betas=betas, eps=eps,
                        weight_decay=weight_decay)
        super().__init__(space.model.parameters() if params is None else params, defaults)

        self.space = space
        self.variant = variant
        self.K = target_k(K, space)  # the one K check, shared with fxoto.search
        self.K_per_kind = kind_counts(K, space)  # None, or the count per kind of group
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
            [_Part(named[m.param], m.dim, m.start, m.stop - m.start) for m in g.members] for g in space.groups
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
        self._hot: _Plan | None = None
        self._order: list[Tensor] = [p for group in self.param_groups for p in group["params"]]
        self._counts: dict[int, int] = {}  # Adam's step count per parameter (id), on the host
        self._copies: dict[str, tuple[tuple[float, ...], Tensor]] = {}  # see _on_device
        self._step_on_device = torch.zeros(1, dtype=torch.long, device=self.device)  # _step, for _check_rows
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
        if step >= 0:
            name = self._names.get(id(self._order[int(index)]), "?")
            after = self._step - int(step) - 1
            what = (f"the gradient of parameter '{name}' held inf or NaN at step {int(step)}; that step"
                    + (f" and the {after} after it" if after else ""))
        else:
            what = (f"parameter '{broken[0]}' holds inf or NaN: a gradient held inf or NaN at one of the steps "
                    f"{since} to {self._step - 1} (since the last check); that step")
        now = ", ".join(f"'{n}'" for n in broken[:3]) + (f" and {len(broken) - 3} more" if len(broken) > 3 else "")
        raise NonFiniteGradientError(
            f"{what} moved every parameter with it, so the model and the optimizer state hold non-finite values"
            + (f" (now: {now})" if broken else "") + ": restore the last checkpoint. Lower the learning rate, check "
            f"the loss for overflow, or train with torch.amp.GradScaler, which skips such steps."
        )

    @torch.no_grad()
    def metrics(self) -> dict[str, Any]:
        """Progress now: step, phase, zero groups and group sparsity, norms of the important
        (G_r^C) and redundant (G_r) groups, and how many groups were forced to zero.  Reads
        from the device once (and checks for non-finite gradients)."""
        self.check_finite()
        n = len(self.space.groups)
        plan = self._all
        whole = plan.params[:plan.whole]
        blocks = [torch.stack(torch._foreach_norm(whole)).double().square()] if whole else []
        blocks += [torch.linalg.vector_norm(_rows(p, dim), dim=1).double().square()
                   for p, dim in zip(plan.params[plan.whole:], plan.dims[plan.whole:])]
        sq = self._group_sums(plan, torch.cat(blocks)[:, None] if blocks else self._scores[:0, None])[:, 0]
        red = self._hot.mask if self._hot is not None else torch.zeros(n, dtype=torch.bool, device=self.device)
        zero = self._exact_zero()
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

    def _exact_zero(self) -> Tensor:
        """Which groups are exactly zero now (every member, on the device)."""
        plan = self._all
        whole = plan.params[:plan.whole]
        blocks = [torch.stack([p.count_nonzero() for p in whole])] if whole else []
        blocks += [_rows(p, dim).count_nonzero(1) for p, dim in zip(plan.params[plan.whole:], plan.dims[plan.whole:])]
        counts = torch.cat(blocks).double()[:, None] if blocks else self._scores[:0, None]
        return self._group_sums(plan, counts)[:, 0] == 0

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

    def _warmup_step(self, work: list[tuple[Tensor, Tensor, dict]]) -> None:
        """Lines 4-7: plain steps, and the scores of every GeZIG on x_t before it moves."""
        on_direction = getattr(self.score_fn, "on", "gradient") == "direction"
        plan = self._all
        if self.foreach:
            dirs = self._multi_tensor_directions(work)
            rows = self._multi_tensor_rows(plan, work, dirs, use_direction=on_direction)
            self._multi_tensor_plain_steps(work, dirs, skip=set())
        else:
            rows, _ = self._single_tensor_pass(work, plan, use_direction=on_direction, hold=False)
        self._check_rows(plan, rows)
        self._accumulate(self._score(plan, rows))

    def _hybrid_step(self, work: list[tuple[Tensor, Tensor, dict]]) -> None:
        """Lines 11-16: plain steps outside G_r; inside it, x <- keep (a x - lr d) with lambda_g
        and the projection test computed from this step's inner products."""
        plan = self._hot
        if self.foreach:
            dirs = self._multi_tensor_directions(work, materialize=plan.position)
            rows = self._multi_tensor_rows(plan, work, dirs, use_direction=True)
            self._multi_tensor_plain_steps(work, dirs, skip=plan.position)
            held = [(p, d) for (p, _, _), d in zip(work, dirs) if id(p) in plan.position]
        else:
            rows, held = self._single_tensor_pass(work, plan, use_direction=True, hold=True)
        self._check_rows(plan, rows)
        a, b = self._hybrid_coefficients(plan, rows)
        moved = {id(p) for p, _ in held}
        still = [p for p in plan.params if id(p) not in moved]
        _scaled_steps(held + [(p, None) for p in still], a, b, plan)  # no gradient: the lasso term alone

    def _single_tensor_pass(self, work, plan: _Plan, use_direction: bool,
                            hold: bool) -> tuple[Tensor, list[tuple[Tensor, _Direction]]]:
        """One pass over the parameters, each while it is in the CPU's cache: its state advanced,
        its rows' inner products with v (the gradient, or with ``use_direction`` the step
        direction) gathered, and its plain step taken, except, with ``hold``, for the plan's
        parameters: their directions are returned for the scaled step."""
        found: dict[int, Tensor | list[Tensor]] = {}
        cs = [1.0] * len(plan.params)
        held: list[tuple[Tensor, _Direction]] = []
        for p, grad, group in work:
            i = plan.position.get(id(p))
            d = self._direction(p, grad, group, materialize=i is not None and (hold or use_direction))
            if i is not None:
                v = d.num if use_direction else grad
                if use_direction:
                    cs[i] = self._direction_scale(d)
                found[i] = _dots(p, v) if plan.dims[i] is None else _row_dots(p, v, plan.dims[i])
                if hold:
                    held.append((p, d))
                    continue
            _plain_step(p, d)
        return self._gathered(plan, found, cs), held

    def _pruned_step(self, work: list[tuple[Tensor, Tensor, dict]]) -> None:
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
            self._multi_tensor_plain_steps(work, self._multi_tensor_directions(work), skip=set())
        else:
            for p, grad, group in work:
                _plain_step(p, self._direction(p, grad, group))
        if self.variant != "sgd" and any(group["eps"] == 0 for group in self.param_groups):
            self._rezero(plan, whole=False)  # Adam's 0 / (0 + eps) is NaN at eps = 0

    # -- the rules applied to a step's inner products (shared by both paths) ------------------

    def _hybrid_coefficients(self, plan: _Plan, rows: Tensor) -> tuple[Tensor, Tensor]:
        """Lines 13-15 for every hot group, on the device.  ``rows`` is [R, 3] per row of the
        plan (``_products``): ||x||^2, x.d, ||d||^2.  Returns per-row vectors of a = keep (1 -
        lr lambda_g / ||x_g||) and b = keep (1 for rows outside the plan's groups): the step
        is then x <- a x - step b num."""
        n = len(self.space.groups)
        lr = self._param_lr(plan)[plan.row_param]
        x_sq, x_d, d_sq = rows.unbind(1)
        per_row = torch.stack([x_sq, x_d, d_sq, lr * x_sq, lr * x_d], 1)
        xx, xd, dd, lr_xx, lr_xd = self._group_sums(plan, per_row).unbind(1)
        norm = xx.sqrt()
        lr_g = torch.zeros(n + 1, dtype=torch.float64, device=self.device)
        lr_g = lr_g.scatter_reduce_(0, plan.row_group, lr, "amax")[:n]
        steps_left = self.warmup_steps + self.pruning_steps - self._step
        lam = hybrid_lambda(self.lambda_rule, norm, xd, dd, lr_g, steps_left, self.lambda0, self.lambda_amplify,
                            self.hat_lambda_coef)
        scale = torch.where(norm > 0, lam / norm.clamp_min(1e-300), 0.0)
        # x~.x = sum over rows of (1 - lr_r lambda_g / ||x_g||) ||x_r||^2 - lr_r x_r.d_r
        new_dot_old = xx - scale * lr_xx - lr_xd
        hot = plan.mask
        newly = hot & ~self._zero & half_space_project(new_dot_old, xx, self.epsilon)
        self._zeroed_at.masked_fill_(newly, self._step)
        self._zero |= newly
        self._lambda = torch.where(hot & ~self._zero, lam, 0.0)
        one = torch.ones(1, dtype=torch.float64, device=self.device)
        keep = torch.cat([(~self._zero).double(), one])[plan.row_group]
        factor = torch.cat([scale, one - 1.0])[plan.row_group]
        return keep * (1.0 - lr * factor), keep

    def _score(self, plan: _Plan, rows: Tensor) -> Tensor:
        """Line 6 from the rows' inner products: the score function on the group sums."""
        xx, xv, vv = self._group_sums(plan, rows).unbind(1)
        s = torch.as_tensor(self.score_fn(GroupStats(xx, xv, vv, plan.numel, self._layer)))
        return s.to(self.device, torch.float64).reshape(-1)

    def _score_now(self) -> Tensor:
        """Scores on the gradients as they are, without a step (``warmup_steps=0``)."""
        plan = self._all
        found = {i: _dots(p, p.grad) if dim is None else _row_dots(p, p.grad, dim)
                 for i, (p, dim) in enumerate(zip(plan.params, plan.dims)) if p.grad is not None}
        return self._score(plan, self._gathered(plan, found, [1.0] * len(plan.params)))

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
                                           self.K_per_kind)
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
        self._rezero(self._hot)
        self._lambda.zero_()

    def _pinned_whole(self) -> set[int]:
        return {id(p) for p in self._hot.params[:self._hot.whole]}

    @torch.no_grad()
    def _rezero(self, plan: _Plan, whole: bool = True) -> None:
        """Set the plan's members and their optimizer state (momentum, Adam moments) to zero
        (with ``whole`` False, the sliced ones only)."""
        for i, p in enumerate(plan.params):
            dim = plan.dims[i]
            if dim is None and not whole:
                continue
            for t in [p, *(v for v in self.state.get(p, {}).values() if isinstance(v, Tensor) and v.shape == p.shape)]:
                if dim is None:
                    t.zero_()
                else:
                    t.index_fill_(dim, plan.rows_in[i], 0)

    # -- bookkeeping ----------------------------------------------------------------------------

    def _plan(self, groups: Iterable[int], name: str) -> _Plan:
        """Lay out the members of ``groups`` by parameter (see ``_Plan``)."""
        n = len(self.space.groups)
        groups = sorted(set(groups))
        whole: dict[int, tuple[Tensor, int]] = {}
        sliced: dict[int, tuple[Tensor, int, list[int]]] = {}
        for g in groups:
            for part in self._parts[g]:
                key = id(part.param)
                if part.dim is None:
                    whole[key] = (part.param, g)
                    continue
                p, dim, rows = sliced.setdefault(key, (part.param, part.dim, [n] * part.param.shape[part.dim]))
                if dim != part.dim:
                    raise ValueError(f"parameter '{self._names.get(key, '?')}' holds GeZIG members along dims {dim} "
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
            rows_in[i] = torch.tensor([r for r, g in enumerate(rows) if g != n], dtype=torch.long).to(self.device)
        sizes = torch.zeros(n, dtype=torch.float64)
        mask = torch.zeros(n, dtype=torch.bool)
        where = {id(p): i for i, p in enumerate(p for group in self.param_groups for p in group["params"])}
        for g in groups:
            sizes[g] = float(self.space.groups[g].numel)
            mask[g] = True
        return _Plan(
            name, params, [None] * len(whole) + [dim for _, dim, _ in sliced.values()], offsets,
            {id(p): i for i, p in enumerate(params)}, len(whole),
            torch.tensor(row_group, dtype=torch.long).to(self.device),
            torch.repeat_interleave(torch.arange(len(params)), torch.tensor(counts, dtype=torch.long)).to(self.device),
            rows_in, mask.to(self.device), sizes.to(self.device),
            torch.tensor([where[id(p)] for p in params], dtype=torch.long).to(self.device),
        )

    def _group_sums(self, plan: _Plan, values: Tensor) -> Tensor:
        """[n, k]: the rows' ``values`` [R, k] summed per group (rows outside the plan's
        groups dropped)."""
        sums = torch.zeros(len(self.space.groups) + 1, values.shape[1], dtype=torch.float64, device=self.device)
        return sums.index_add_(0, plan.row_group, values.double())[:-1]

    def _param_lr(self, plan: _Plan) -> Tensor:
        """Each plan parameter's learning rate now (schedulers change it), as a device vector."""
        group_of = {id(p): group for group in self.param_groups for p in group["params"]}
        return self._on_device(f"lr/{plan.name}", [group_of[id(p)]["lr"] for p in plan.params])

    def _on_device(self, key: str, values: list[float]) -> Tensor:
        """Host values as a float64 vector on the device, copied only when they change (a
        learning rate after a scheduler step, Adam's bias correction in its first few hundred
        steps), and then without waiting for the device: from pinned memory, non-blocking."""
        values = tuple(values)
        cached = self._copies.get(key)
        if cached is None or cached[0] != values:
            host = torch.tensor(values, dtype=torch.float64)
            if self.device.type == "cuda":
                host = host.pin_memory()
            self._copies[key] = cached = (values, host.to(self.device, non_blocking=True))
        return cached[1]

    @staticmethod
    def _no_gradient(plan: _Plan, i: int) -> Tensor:
        """||x||, 0, 0 for whole member i without a gradient this step."""
        return F.pad(torch.linalg.vector_norm(plan.params[i]).reshape(1), (0, 2))

    def _gathered(self, plan: _Plan, found: dict[int, Tensor | list[Tensor]], cs: list[float]) -> Tensor:
        """``_products`` from a single-tensor pass's inner products by plan position (``_dots``
        for a whole member, ``_row_dots`` for a sliced parameter); a parameter without a
        gradient gets its ||x||^2 alone, measured now."""
        whole = torch.stack([torch.stack(found[i]) if i in found else self._no_gradient(plan, i)
                             for i in range(plan.whole)]) if plan.whole else None
        rows = [found[i] if i in found else _row_dots(plan.params[i], None, plan.dims[i])
                for i in range(plan.whole, len(plan.params))]
        return self._products(plan, whole, rows, cs)

    def _products(self, plan: _Plan, whole: Tensor | None, rows: list[Tensor], cs: list[float]) -> Tensor:
        """[R, 3] per row of the plan: ||x||^2, x.v, ||v||^2 for v = c num, in float64, from the
        whole members' and the sliced parameters' ||x||, x.num, ||num|| ([W, 3], then [rows, 3]
        each, ``_row_dots``) and each parameter's c (step / lr: the direction is c times the
        step's numerator)."""
        blocks = ([whole] if whole is not None else []) + rows
        if not blocks:
            return torch.zeros(0, 3, dtype=torch.float64, device=self.device)
        rows = (torch.cat(blocks) if len(blocks) > 1 else blocks[0]).double()
        c = self._on_device(f"c/{plan.name}", cs)[plan.row_param]
        return rows * torch.stack([rows[:, 0], c, c * c * rows[:, 2]], 1)

    def _multi_tensor_rows(self, plan: _Plan, work, dirs: list[_Direction], use_direction: bool) -> Tensor:
        """``_products`` with multi-tensor norms for the whole members (``_foreach_dots``)."""
        of = {id(p): (grad, d) for (p, grad, _), d in zip(work, dirs)}
        xs, vs, cs, sliced = [], [], [], []
        for i, p in enumerate(plan.params):
            grad, d = of.get(id(p), (None, None))
            if d is None:
                v, c = None, 1.0
            elif use_direction:
                v, c = d.num, self._direction_scale(d)
            else:
                v, c = grad, 1.0
            cs.append(c)
            if i < plan.whole:
                xs.append(_flat(p))
                vs.append(_flat(v) if v is not None else torch.zeros_like(xs[-1]))
            else:
                sliced.append(_row_dots(p, v, plan.dims[i]))
        return self._products(plan, _foreach_dots(xs, vs) if xs else None, sliced, cs)

    def _count(self, p: Tensor) -> int:
        """Advance p's Adam step count and return it.  The state keeps it as torch.optim's Adam
        does (a float tensor on the CPU); the step reads a copy kept on the host (``_counts``),
        taken from the state once after loading."""
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            self._counts[id(p)] = 0
        count = self._counts.get(id(p))
        count = (int(state["step"]) if count is None else count) + 1
        self._counts[id(p)] = count
        state["step"].add_(1.0)
        return count

    @staticmethod
    def _direction_scale(d: _Direction) -> float:
        return d.step / d.lr if d.lr else 1.0

    def _check_rows(self, plan: _Plan, rows: Tensor) -> None:
        """Record, on the device, the first step and parameter whose gradient made a row's x.v
        inf or NaN (``rows`` from ``_products``): the members of the groups a step watches.
        Every other parameter is checked at the next ``check_finite``, through its values."""
        if not rows.numel():
            return
        bad = ~rows[:, 1].isfinite()
        param = plan.row_param.index_select(0, bad.int().argmax().reshape(1))  # not [tensor]: that reads
        first = torch.cat([self._step_on_device, plan.order.index_select(0, param)])
        self._bad = torch.where((self._bad[0] < 0) & bad.any(), first, self._bad)

    # -- the plain steps: torch.optim's SGD, Adam and AdamW -------------------------------------

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
            return _Direction(g, None, lr, lr)

        beta1, beta2 = group["betas"]
        step = self._count(p)
        g = grad
        if wd != 0:
            if self.variant == "adamw":
                p.mul_(1.0 - lr * wd)
            else:
                g = grad.add(p, alpha=wd)
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.lerp_(g, 1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        denom = exp_avg_sq.sqrt().div_(math.sqrt(1.0 - beta2**step)).add_(group["eps"])
        step_size = lr / (1.0 - beta1**step)
        if materialize:
            return _Direction(torch.div(exp_avg, denom, out=denom), None, step_size, lr)
        return _Direction(exp_avg, denom, step_size, lr)

    def _multi_tensor_directions(self, work, materialize=()) -> list[_Direction]:
        """``_direction`` for every parameter at once, with ``torch._foreach_*`` per param group
        (torch.optim's multi-tensor SGD, Adam and AdamW)."""
        dirs: list[_Direction | None] = [None] * len(work)
        by_group: dict[int, list[int]] = {}
        for i, (_, _, group) in enumerate(work):
            by_group.setdefault(id(group), []).append(i)
        for idx in by_group.values():
            group = work[idx[0]][2]
            ps = [work[i][0] for i in idx]
            grads = [work[i][1] for i in idx]
            lr, wd = group["lr"], group["weight_decay"]
            if self.variant == "sgd":
                gs = grads if wd == 0 else torch._foreach_add(grads, ps, alpha=wd)
                momentum = group["momentum"]
                if momentum == 0:
                    for i, g, grad in zip(idx, gs, grads):
                        dirs[i] = _Direction(g, None, lr, lr)
                    continue
                bufs = []
                fresh = []
                for p, g in zip(ps, gs):
                    buf = self.state[p].get("momentum_buffer")
                    if buf is None:
                        buf = self.state[p]["momentum_buffer"] = torch.clone(g).detach()
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
                    dirs[i] = _Direction(num, None, lr, lr)
                continue
            beta1, beta2 = group["betas"]
            steps = [self._count(p) for p in ps]
            if wd != 0:
                if self.variant == "adamw":
                    torch._foreach_mul_(ps, 1.0 - lr * wd)
                    gs = grads
                else:
                    gs = torch._foreach_add(grads, ps, alpha=wd)
            else:
                gs = grads
            avgs = [self.state[p]["exp_avg"] for p in ps]
            sqs = [self.state[p]["exp_avg_sq"] for p in ps]
            torch._foreach_lerp_(avgs, gs, 1.0 - beta1)
            torch._foreach_mul_(sqs, beta2)
            torch._foreach_addcmul_(sqs, gs, gs, value=1.0 - beta2)
            dens = torch._foreach_sqrt(sqs)
            torch._foreach_div_(dens, [math.sqrt(1.0 - beta2**s) for s in steps])
            torch._foreach_add_(dens, group["eps"])
            for i, p, avg, den, s in zip(idx, ps, avgs, dens, steps):
                step_size = lr / (1.0 - beta1**s)
                dirs[i] = _Direction(avg, den, step_size, lr)
        want = [i for i, (p, _, _) in enumerate(work) if id(p) in materialize and dirs[i].den is not None]
        if want:
            nums = torch._foreach_div([dirs[i].num for i in want], [dirs[i].den for i in want])
            for i, num in zip(want, nums):
                dirs[i] = dirs[i]._replace(num=num, den=None)
        return dirs

    def _multi_tensor_plain_steps(self, work, dirs: list[_Direction], skip) -> None:
        """x <- x - step * num / den for every parameter not in ``skip``, in multi-tensor calls."""
        added: dict[float, tuple[list[Tensor], list[Tensor]]] = {}
        divided: list[tuple[Tensor, _Direction]] = []
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
            "K": self.K,
            "K_per_kind": self.K_per_kind,
            "warmup_steps": self.warmup_steps,
            "pruning_steps": self.pruning_steps,
            "lambda_rule": self.lambda_rule,
            "omega": self.omega,
            "epsilon": self.epsilon,
            "lambda0": self.lambda0,
            "lambda_amplify": self.lambda_amplify,
            "hat_lambda_coef": self.hat_lambda_coef,
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
        self._copies = {}
        self.K_per_kind = h.get("K_per_kind")
        for key in ("K", "warmup_steps", "pruning_steps", "lambda_rule", "omega", "epsilon", "lambda0",
                    "lambda_amplify", "hat_lambda_coef"):
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


def _plain_step(p: Tensor, d: _Direction) -> None:
    """x <- x - step * num / den."""
    if d.den is None:
        p.add_(d.num, alpha=-d.step)
    else:
        p.addcdiv_(d.num, d.den, value=-d.step)


def _scaled_steps(held: list[tuple[Tensor, _Direction | None]], a: Tensor, b: Tensor, plan: _Plan) -> None:
    """x <- a x - step b num for each parameter holding members (x <- a x where it has no
    gradient, direction None): ``a``, ``b`` are per-row vectors (``_Plan``), a parameter's
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
