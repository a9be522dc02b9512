"""Scaled branches: a product by a number, buffer, parameter or a value computed from variables alone
maps zero to zero, so a scaled residual branch is a GeZIG; a per-channel factor after a concat is sliced
with the channels, and one that cannot be sliced is refused at build time with a reason."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxoto
from test_properties import check_subnet
from util import randomize_, segment_ends


class NFBlock(nn.Module):
    """A normalisation-free residual block: ``x + scale(branch(x))`` with no norm anywhere."""

    def __init__(self, c: int, scale: str):
        super().__init__()
        self.scale = scale
        self.conv1, self.conv2 = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)
        self.alpha = nn.Parameter(torch.tensor(0.2))
        self.gamma = nn.Parameter(torch.randn(c))
        self.register_buffer("beta", torch.rand(1, c, 1, 1) + 0.5)
        self.gain = nn.Parameter(torch.zeros(()))  # skip-init: the branch starts switched off

    def forward(self, x):
        out = self.conv2(F.gelu(self.conv1(x)))
        if self.scale == "number":
            return out * 0.2 + x
        if self.scale == "parameter":
            return x + self.alpha * out
        if self.scale == "per_channel_view":
            return x + out * self.gamma.view(1, -1, 1, 1)
        if self.scale == "per_channel_index":
            return self.gamma[None, :, None, None] * out + x
        if self.scale == "buffer_divisor":
            return x + out / self.beta
        if self.scale == "skip_init_softplus":
            return x + F.softplus(self.gain) * out
        raise ValueError(self.scale)


class NFNet(nn.Module):
    def __init__(self, scale: str, c: int = 6):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.blocks = nn.Sequential(*(NFBlock(c, scale) for _ in range(3)))
        self.head = nn.Linear(c, 2)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


SCALES = ["number", "parameter", "per_channel_view", "per_channel_index", "buffer_divisor", "skip_init_softplus"]


def nf(scale):
    model = randomize_(NFNet(scale)).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.gain.fill_(0.3)  # a trained gain: the branch contributes
    return model


@pytest.mark.parametrize("scale", SCALES)
def test_scaled_residual_branches_are_gezigs(scale):
    model = nf(scale)
    x = torch.randn(2, 3, 6, 6)
    space = fxoto.search(model, 2, x).space  # no NoSearchSpaceError
    assert [g.nodes[:3] for g in space.groups] == [
        (f"blocks_{i}_conv1", "gelu" if i == 0 else f"gelu_{i}", f"blocks_{i}_conv2") for i in range(3)
    ]
    # The factor's variables belong to the branch's group: erased with it, never shared with another.
    own = {"parameter": "alpha", "per_channel_view": "gamma", "per_channel_index": "gamma", "skip_init_softplus": "gain"}
    if scale in own:
        assert all(f"blocks.{g.id}.{own[scale]}" in {m.param for m in g.members} for g in space.groups)
    space.zero_(range(3))
    assert all(not v.any() for v in segment_ends(space, x).values())


@pytest.mark.parametrize("scale", SCALES)
def test_scaled_residual_subnets_are_exact(scale):
    x = torch.randn(2, 3, 6, 6)
    for ids in ([0], [1, 2], [0, 1, 2]):
        model = nf(scale)
        sub = check_subnet(model, x, ids, fxoto.build_space(model, (x,)))
        assert not any(n.target is F.softplus for n in sub.graph.nodes) or len(ids) < 3


class CatScale(nn.Module):
    """``torch.cat([a(h), b(h)], 1) * gamma`` with gamma of shape [C, 1, 1]."""

    def __init__(self, factor: str):
        super().__init__()
        self.factor = factor
        self.a, self.b, self.c = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 2, 1)
        self.gamma = nn.Parameter(torch.randn(9, 1, 1))
        self.register_buffer("beta", torch.rand(1, 9, 1, 1) + 0.5)
        self.mix = nn.Conv2d(9, 5, 1)
        self.head = nn.Linear(5, 2)

    def forward(self, h):
        y = torch.cat([self.a(h), self.b(h), self.c(h)], 1)
        if self.factor == "parameter":
            y = y * self.gamma
        elif self.factor == "buffer":
            y = self.beta * y
        elif self.factor == "constant":
            y = y * torch.linspace(0.5, 2.0, 9).view(9, 1, 1)
        elif self.factor == "both":
            y = y * self.gamma / self.beta
        elif self.factor == "computed":
            y = y * self.gamma.exp()
        return self.head(self.mix(F.relu(y)).mean((2, 3)))


@pytest.mark.parametrize("factor", ["parameter", "buffer", "constant", "both"])
def test_per_channel_factor_after_a_concat_is_sliced_with_the_channels(factor):
    x = torch.randn(2, 3, 5, 5)
    for ids in ([0], [1], [0, 2], [1, 2]):
        model = randomize_(CatScale(factor)).eval()
        sub = check_subnet(model, x, ids, fxoto.build_space(model, (x,)))
        if factor == "parameter":
            assert sub.gamma.shape[0] == 9 - sum((4, 3, 2)[i] for i in ids)


def test_factor_computed_in_forward_after_a_concat_is_refused_with_a_reason():
    model = randomize_(CatScale("computed")).eval()
    space = fxoto.build_space(model, (torch.randn(2, 3, 5, 5),))
    assert space.groups == []
    assert [e.nodes for e in space.excluded] == [("a",), ("b",), ("c",)]
    assert all("node 'mul'" in e.reason and "'exp'" in e.reason and "varies along the channels" in e.reason
               for e in space.excluded)


class SharedFactor(nn.Module):
    """One per-channel factor scales two concats: each product reads its own slice once they differ."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.d = (nn.Conv2d(3, 3, 1) for _ in range(4))
        self.gamma = nn.Parameter(torch.randn(6, 1, 1))
        self.mix = nn.Conv2d(6, 4, 1)
        self.head = nn.Linear(4, 2)

    def forward(self, h):
        u = torch.cat([self.a(h), self.b(h)], 1) * self.gamma
        v = torch.cat([self.c(h), self.d(h)], 1) * self.gamma
        return self.head((self.mix(u) + self.mix(v)).mean((2, 3)))


def test_factor_shared_by_two_concats_is_sliced_per_product():
    x = torch.randn(2, 3, 4, 4)
    for ids in ([0], [2], [0, 2], [0, 3]):
        model = randomize_(SharedFactor()).eval()
        sub = check_subnet(model, x, ids, fxoto.build_space(model, (x,)))
        assert sub.gamma.shape[0] == (3 if ids in ([0, 2],) else 6)
