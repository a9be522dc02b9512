"""H2SPG's rules (paper, section 3.2 and Algorithm 3): small pure functions over per-group tensors.

Every entry of a tensor here is one group (GeZIG or channel group), on the parameters'
device; nothing reads a value back to the host but ``select_redundant``.  The optimizer
(``fxoto.optimizer.H2SPG``) gathers each group's sums (``GroupStats``: ||x_g||^2, x_g.v_g,
||v_g||^2, n_g) and calls these on them, on every execution path alike:

* the redundancy score (line 6): ``redundancy_score`` (default) or the OTO code's
  ``reference_score``, or any ``ScoreFn``;
* the selection of the redundant set (line 8): ``select_redundant``;
* lambda_g (line 13): ``dhspg_lambda`` (DHSPG's rule), ``lambda_floor`` (the deadline's
  least lambda) and ``hybrid_lambda``, which chooses between them by ``lambda_rule``;
* the half-space projection (line 15): ``half_space_project``; ``hybrid_group_step``
  applies lines 13-15 to one hybrid step's group sums.

A new lambda rule or score goes here, as a function over per-group tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from fxoto.errors import KTooLargeError
from fxoto.space import SearchSpace, select_per_kind
from fxoto.uniform import select_uniform

__all__ = [
    "GroupStats", "ScoreFn", "dhspg_lambda", "half_space_project", "hybrid_group_step", "hybrid_lambda",
    "lambda_floor", "redundancy_score", "reference_score", "select_redundant",
]


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


def select_redundant(space: SearchSpace, scores: Tensor, K: int, per_kind: dict[str, int] | None = None,
                     uniform: bool = False) -> list[int]:
    """Algorithm 3, line 8 (paper, Figure 2): the redundant group candidates G_r.

    The K GeZIGs most redundant by ``scores`` (ties by id) that form a valid removal
    (``SearchSpace.select_removal``): whenever ``target_k`` accepted K, K are found.
    With ``per_kind`` (K given per kind, ``{"operation": 3, "channel": 120}``), that many
    of each kind, each kind ranked by its own scores (``select_per_kind``); with ``uniform``,
    as many in every block of a kind (``fxoto.uniform.select_uniform``).
    Returns their ids in the order they were accepted.
    """
    values = scores.tolist()
    order = sorted(range(len(space.groups)), key=lambda g: (-values[g], g))
    if uniform:
        chosen = select_uniform(space, order, per_kind)
    else:
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


def hybrid_group_step(xx: Tensor, xd: Tensor, dd: Tensor, lr_xx: Tensor, lr_xd: Tensor, lr: Tensor,
                      steps_left: int, rule: str, lambda0: float, amplify: float, hat: float,
                      epsilon: float) -> tuple[Tensor, Tensor, Tensor]:
    """Algorithm 3, lines 13-15, for every group of one hybrid step, from its sums over rows:
    ``xx`` ||x_g||^2, ``xd`` x_g.d_g, ``dd`` ||d_g||^2, ``lr_xx`` and ``lr_xd`` the same sums
    with each row weighted by its learning rate, ``lr`` the group's (largest) learning rate.

    Returns lambda_g (``hybrid_lambda``), the lasso scale lambda_g / ||x_g|| (0 for a zero
    group) and which groups the half-space projection sends to zero: the trial iterate
    x~ = (1 - lr lambda_g / ||x_g||) x - lr d has x~.x = sum over rows of
    (1 - lr_r lambda_g / ||x_g||) ||x_r||^2 - lr_r x_r.d_r, known before any row moves.
    """
    norm = xx.sqrt()
    lam = hybrid_lambda(rule, norm, xd, dd, lr, steps_left, lambda0, amplify, hat)
    scale = torch.where(norm > 0, lam / norm.clamp_min(1e-300), 0.0)
    new_dot_old = xx - scale * lr_xx - lr_xd
    return lam, scale, half_space_project(new_dot_old, xx, epsilon)
