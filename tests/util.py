"""Shared test helpers: randomised statistics and values captured as they are produced."""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

from fxoto.shapes import CONSTANT, _shape_of


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every norm random statistics and affine variables and every bias random values.

    Default initialisation zeroes biases and keeps batch-norm statistics at
    (0, 1); both would hide a segment that does not map zero to zero.
    """
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase):
            if m.running_mean is not None:
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
        for name, p in m.named_parameters(recurse=False):
            if name == "bias" or isinstance(m, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5 + (1.0 if name == "weight" else 0.0))
    return model


class Capture(fx.Interpreter):
    """Run a graph and keep a copy of chosen nodes' outputs at the moment they are produced.

    Later in-place ops (ResNet's ``out += identity``, ``ReLU(inplace=True)``)
    cannot change what was captured.
    """

    def __init__(self, gm: fx.GraphModule, names: set[str]):
        super().__init__(gm)
        self.names = names
        self.values: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        if n.name in self.names:
            self.values[n.name] = out.detach().clone()
        return out


class _Shapes(fx.Interpreter):
    def run_node(self, n: fx.Node):
        out = n.meta[CONSTANT] if CONSTANT in n.meta else super().run_node(n)  # a tensor made in forward
        self.shapes[n.name] = _shape_of(out)
        return out


@torch.no_grad()
def real_shapes(graph: fx.Graph, root: nn.Module, inputs: tuple) -> dict:
    """Each node's output shape in a real run of ``graph`` (targets in ``root``), by node name."""
    run = _Shapes(root, graph=graph)
    run.shapes = {}
    run.run(*inputs)
    return run.shapes


def segment_ends(space, x, ids=None) -> dict[int, torch.Tensor]:
    """Output of each group's segment end, in eval mode, on input ``x``."""
    ids = range(len(space.groups)) if ids is None else ids
    ends = {space.groups[i].nodes[-1]: i for i in ids}
    cap = Capture(space.gm, set(ends))
    with torch.no_grad():
        cap.run(*(x if isinstance(x, tuple) else (x,)))
    return {ends[name]: value for name, value in cap.values.items()}


def removed_numel(space, ids) -> int:
    """How many of the model's variables the groups ``ids`` hold: each element counted once,
    however many members (a tensor under two names, overlapping slices) reach it."""
    params = dict(space.model.named_parameters(remove_duplicate=False))
    rows: dict[tuple[int, int | None], list[int]] = {}  # (tensor, dim): indices along it (dim None: all)
    for i in ids:
        for m in space.groups[i].members:
            rows.setdefault((id(params[m.param]), m.dim), []).extend(range(m.start, m.stop))
    tensors = {id(p): p for p in params.values()}
    masks: dict[int, torch.Tensor] = {}
    for (key, dim), indices in rows.items():
        mask = masks.setdefault(key, torch.zeros(tensors[key].shape, dtype=torch.bool))
        if dim is None:
            mask.fill_(True)
        else:
            mask.index_fill_(dim, torch.tensor(sorted(set(indices)), dtype=torch.long), True)
    return sum(int(mask.sum()) for mask in masks.values())


def assert_groups_leave(space, ids, sub) -> None:
    """Every group counted as removed leaves the sub-network: it holds at most the super-network's
    parameters less the removed groups' variables."""
    n_super = sum(p.numel() for p in space.model.parameters())
    n_sub = sum(p.numel() for p in sub.parameters())
    removed = removed_numel(space, ids)
    assert n_sub <= n_super - removed, f"{n_sub} parameters left of {n_super}, {removed} of them in groups {ids}"
