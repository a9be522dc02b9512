"""The DARTS super-network (Liu et al., 2018) without architecture variables (OTOv3, section 4).

DARTS relaxes each edge of a cell to a softmax-weighted mixture of candidate operations and
learns the weights (alphas) by bi-level optimisation over a hand-made search space. OTOv3 drops
all of that: every edge is the plain SUM of its candidate operations, the network is an ordinary
``nn.Module``, and the search space (each operation on each edge, among others) is found from the
graph. This module builds that super-network:

- a cell has two input nodes (the outputs of the two previous cells, preprocessed by
  ReLU-Conv1x1-BN, or by ``FactorizedReduce`` when the previous cell halved the resolution),
  four intermediate nodes, each the sum over its incoming edges of all candidate operations, and
  outputs ``torch.cat`` of the four intermediate nodes along the channel dimension;
- reduction cells sit at 1/3 and 2/3 of the depth: edges leaving the input nodes use stride 2,
  and the channel count doubles;
- the candidates are ``PRIMITIVES`` below; 'none' (the zero operation) is left out since it adds
  nothing to a sum. Pooling candidates are followed by an affine BatchNorm (DARTS uses one
  without affine parameters; the affine one holds the variables that make the branch a GeZIG).
  ``skip_connect`` is the identity on normal edges (the input itself enters the sum) and
  ``FactorizedReduce`` on reduction edges.

``FactorizedReduce`` halves the resolution with two stride-2 Conv1x1 that see the even and the odd
pixel grid; the odd grid is taken by the slice ``x[:, :, 1:, 1:]``, as in DARTS.

Sizes (thop, multiply-accumulates; the paper's "FLOPs" are multiply-accumulates, see
``fxoto.zoo.demosupnet``):

- ``darts_8cells()`` (STL-10, 96x96, C=24): 4.11 M parameters and 663 M MACs; the paper
  (Table 1) gives 4.05 M and 614 M. The stem is a Conv3x3-BN with stride 3, so the cells work at
  32, 16 and 8 pixels, the resolutions of DARTS on CIFAR-10. (C=23 would give 3.81 M and 617 M.)
- ``darts_14cells()`` (ImageNet, 224x224, C=48, the DARTS ImageNet stem that reduces by 8, cells
  at 28, 14 and 7 pixels): 25.6 M parameters and 3.01 G MACs. The paper reports only its
  sub-network (Table 3: 4.8 M, 547 M).
"""

from collections.abc import Callable

import torch
from torch import Tensor, nn

__all__ = [
    "PRIMITIVES",
    "ReLUConvBN",
    "DilConv",
    "SepConv",
    "FactorizedReduce",
    "PoolBN",
    "MixedOp",
    "Cell",
    "DARTS",
    "darts_8cells",
    "darts_14cells",
]

PRIMITIVES: tuple[str, ...] = (
    "max_pool_3x3",
    "avg_pool_3x3",
    "skip_connect",
    "sep_conv_3x3",
    "sep_conv_5x5",
    "dil_conv_3x3",
    "dil_conv_5x5",
)


class ReLUConvBN(nn.Sequential):
    """ReLU, Conv (no bias), BN."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int, stride: int, padding: int) -> None:
        super().__init__(
            nn.ReLU(),
            nn.Conv2d(c_in, c_out, kernel_size, stride=stride, padding=padding, bias=False),
            nn.BatchNorm2d(c_out),
        )


class DilConv(nn.Sequential):
    """ReLU, depthwise (possibly dilated) Conv, pointwise Conv1x1, BN."""

    def __init__(
        self, c_in: int, c_out: int, kernel_size: int, stride: int, padding: int, dilation: int
    ) -> None:
        super().__init__(
            nn.ReLU(),
            nn.Conv2d(
                c_in, c_in, kernel_size, stride=stride, padding=padding, dilation=dilation,
                groups=c_in, bias=False,
            ),
            nn.Conv2d(c_in, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out),
        )


class SepConv(nn.Sequential):
    """Two depthwise-separable convolutions in a row; only the first one strides."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int, stride: int, padding: int) -> None:
        super().__init__(
            DilConv(c_in, c_in, kernel_size, stride, padding, dilation=1),
            DilConv(c_in, c_out, kernel_size, 1, padding, dilation=1),
        )


class FactorizedReduce(nn.Module):
    """Halve the resolution: ReLU, two stride-2 Conv1x1 on the even and odd pixel grids, concat, BN.

    The input's height and width must be even.
    """

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        if c_out % 2:
            raise ValueError(f"FactorizedReduce needs an even output width, got {c_out} channels")
        self.relu = nn.ReLU()
        self.conv_1 = nn.Conv2d(c_in, c_out // 2, 1, stride=2, bias=False)
        self.conv_2 = nn.Conv2d(c_in, c_out // 2, 1, stride=2, bias=False)
        self.bn = nn.BatchNorm2d(c_out)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(x)
        return self.bn(torch.cat([self.conv_1(x), self.conv_2(x[:, :, 1:, 1:])], dim=1))


class PoolBN(nn.Sequential):
    """3x3 max or average pooling followed by an affine BN."""

    def __init__(self, kind: str, c: int, stride: int) -> None:
        if kind == "max":
            pool: nn.Module = nn.MaxPool2d(3, stride=stride, padding=1)
        else:
            pool = nn.AvgPool2d(3, stride=stride, padding=1, count_include_pad=False)
        super().__init__(pool, nn.BatchNorm2d(c))


OPS: dict[str, Callable[[int, int], nn.Module]] = {
    "max_pool_3x3": lambda c, stride: PoolBN("max", c, stride),
    "avg_pool_3x3": lambda c, stride: PoolBN("avg", c, stride),
    # Only built for stride 2: MixedOp adds the input itself on stride-1 edges.
    "skip_connect": lambda c, stride: FactorizedReduce(c, c),
    "sep_conv_3x3": lambda c, stride: SepConv(c, c, 3, stride, 1),
    "sep_conv_5x5": lambda c, stride: SepConv(c, c, 5, stride, 2),
    "dil_conv_3x3": lambda c, stride: DilConv(c, c, 3, stride, 2, 2),
    "dil_conv_5x5": lambda c, stride: DilConv(c, c, 5, stride, 4, 2),
}


class MixedOp(nn.Module):
    """One edge of a cell: the sum of every candidate operation in ``PRIMITIVES``.

    On a stride-1 edge ``skip_connect`` is the identity, so the input itself is a summand.
    """

    def __init__(self, c: int, stride: int) -> None:
        super().__init__()
        self.identity_skip = stride == 1
        self.ops = nn.ModuleDict(
            (name, OPS[name](c, stride))
            for name in PRIMITIVES
            if not (name == "skip_connect" and self.identity_skip)
        )

    def forward(self, x: Tensor) -> Tensor:
        terms = [op(x) for op in self.ops.values()]
        if self.identity_skip:
            terms.append(x)
        return _sum(terms)


def _sum(terms: list[Tensor]) -> Tensor:
    # Python's sum() starts from 0 and would trace an extra `0 + t`; chain binary adds instead.
    total = terms[0]
    for t in terms[1:]:
        total = total + t
    return total


class Cell(nn.Module):
    """A DARTS cell: two input nodes, ``steps`` intermediate nodes, concat of those as output.

    Args:
        steps: number of intermediate nodes (DARTS: 4); the output has ``steps * c`` channels.
        c_prev_prev: channels of the output of the cell before the previous one.
        c_prev: channels of the output of the previous cell.
        c: channels of every node of this cell.
        reduction: whether this cell halves the resolution.
        reduction_prev: whether the previous cell halved the resolution.
    """

    def __init__(
        self,
        steps: int,
        c_prev_prev: int,
        c_prev: int,
        c: int,
        reduction: bool,
        reduction_prev: bool,
    ) -> None:
        super().__init__()
        self.reduction = reduction
        if reduction_prev:
            self.preprocess0: nn.Module = FactorizedReduce(c_prev_prev, c)
        else:
            self.preprocess0 = ReLUConvBN(c_prev_prev, c, 1, 1, 0)
        self.preprocess1 = ReLUConvBN(c_prev, c, 1, 1, 0)
        self.steps = steps
        self.edges = nn.ModuleList()
        for i in range(steps):
            for j in range(2 + i):
                stride = 2 if reduction and j < 2 else 1
                self.edges.append(MixedOp(c, stride))

    def forward(self, s0: Tensor, s1: Tensor) -> Tensor:
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        offset = 0
        for _ in range(self.steps):
            n = len(states)
            states.append(_sum([self.edges[offset + j](h) for j, h in enumerate(states)]))
            offset += n
        return torch.cat(states[2:], dim=1)


class DARTS(nn.Module):
    """The DARTS super-network: stem, ``cells`` cells, global average pool, Linear.

    Args:
        num_classes: outputs of the final Linear layer.
        C: channels of the nodes of the first cell; doubled at each reduction cell.
        cells: number of cells; reduction cells are at ``cells // 3`` and ``2 * cells // 3``.
        in_channels: channels of the input image.
        steps: intermediate nodes per cell.
        stem: ``"cifar"``, the DARTS CIFAR stem: Conv3x3(stride ``stem_stride``)-BN to
            ``stem_multiplier * C`` channels; ``"imagenet"``, the DARTS ImageNet stem that reduces
            the resolution by 8 (two stride-2 Conv3x3 to C, then ReLU-Conv3x3(stride 2)-BN).
        stem_stride: stride of the ``"cifar"`` stem.
        stem_multiplier: channel multiplier of the ``"cifar"`` stem.
    """

    def __init__(
        self,
        num_classes: int = 10,
        C: int = 16,
        cells: int = 8,
        in_channels: int = 3,
        steps: int = 4,
        stem: str = "cifar",
        stem_stride: int = 1,
        stem_multiplier: int = 3,
    ) -> None:
        super().__init__()
        self.stem1: nn.Module | None = None
        if stem == "cifar":
            c_stem = stem_multiplier * C
            self.stem0 = nn.Sequential(
                nn.Conv2d(in_channels, c_stem, 3, stride=stem_stride, padding=1, bias=False),
                nn.BatchNorm2d(c_stem),
            )
            c_prev_prev, c_prev = c_stem, c_stem
            reduction_prev = False
        elif stem == "imagenet":
            self.stem0 = nn.Sequential(
                nn.Conv2d(in_channels, C // 2, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(C // 2),
                nn.ReLU(),
                nn.Conv2d(C // 2, C, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(C),
            )
            self.stem1 = ReLUConvBN(C, C, 3, 2, 1)
            c_prev_prev, c_prev = C, C
            reduction_prev = True
        else:
            raise ValueError(f"stem must be 'cifar' or 'imagenet', not {stem!r}")

        c_curr = C
        self.cells = nn.ModuleList()
        for i in range(cells):
            reduction = i in (cells // 3, 2 * cells // 3)
            if reduction:
                c_curr *= 2
            self.cells.append(Cell(steps, c_prev_prev, c_prev, c_curr, reduction, reduction_prev))
            reduction_prev = reduction
            c_prev_prev, c_prev = c_prev, steps * c_curr
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_prev, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        s0 = self.stem0(x)
        s1 = s0 if self.stem1 is None else self.stem1(s0)
        for cell in self.cells:
            s0, s1 = s1, cell(s0, s1)
        return self.classifier(torch.flatten(self.avgpool(s1), 1))


def darts_8cells(num_classes: int = 10, C: int = 24, in_channels: int = 3) -> DARTS:
    """8-cell DARTS for 96x96 STL-10 images (paper, Table 1); ``C=4`` gives a tiny instance.

    The stem strides by 3, so the cells see 32x32 as in DARTS on CIFAR-10.
    """
    return DARTS(num_classes=num_classes, C=C, cells=8, in_channels=in_channels, stem_stride=3)


def darts_14cells(num_classes: int = 1000, C: int = 48, in_channels: int = 3) -> DARTS:
    """14-cell DARTS for 224x224 ImageNet images with the DARTS ImageNet stem (paper, Table 3)."""
    return DARTS(num_classes=num_classes, C=C, cells=14, in_channels=in_channels, stem="imagenet")
