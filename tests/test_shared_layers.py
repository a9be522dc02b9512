"""Layers called at two or more places: every call site of the sub-network reads the right channels.

Each network here once gave a sub-network that failed at its first forward, or
an ``IndexError`` inside ``construct_subnet``.
"""

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxoto
from strategies import Branch, NetSpec, RandomSupNet, Step, randomize
from test_properties import check_subnet
from util import randomize_


class ConvTwice(nn.Module):
    """A convolution applied to a concat and then again to its own output."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 16, 3, padding=1)
        self.conv = nn.Conv2d(24, 24, 3, padding=1)
        self.head = nn.Linear(24, 2)

    def forward(self, x):
        h = torch.cat([self.a(x), self.b(x)], 1)
        h = self.conv(torch.relu(self.conv(h)))
        return self.head(h.mean((2, 3)))


class SharedMix(nn.Module):
    """One 1x1 convolution mixes two different concats (weight sharing)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.d = (nn.Conv2d(3, 4, 1) for _ in range(4))
        self.mix = nn.Conv2d(8, 6, 1)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        u = self.mix(torch.cat([self.a(x), self.b(x)], 1))
        v = self.mix(torch.cat([self.c(x), self.d(x)], 1))
        return self.head((u + v).mean((2, 3)))


class SharedFunctional(nn.Module):
    """One weight read through ``F.conv2d`` and ``F.linear`` at two places each."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 2, 1), nn.Conv2d(3, 4, 1)
        self.w = nn.Parameter(torch.randn(6, 6, 1, 1))
        self.fc = nn.Parameter(torch.randn(2, 6))

    def forward(self, x):
        u = F.conv2d(torch.cat([self.a(x), self.b(x)], 1), self.w)
        v = F.conv2d(torch.cat([self.b(x), self.c(x)], 1), self.w)
        p = torch.cat([self.a(x), self.b(x)], 1).mean((2, 3))
        return F.linear(u.mean((2, 3)) + v.mean((2, 3)), self.fc) + F.linear(p, self.fc)


class TransposedAndReflectTwice(nn.Module):
    """A transposed convolution and a reflect-padded convolution, each applied to a concat and again
    to its own output: the per-site slice reproduces what the module's own forward computes."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.d = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.Conv2d(3, 5, 1), nn.Conv2d(3, 3, 1)
        self.up = nn.ConvTranspose2d(8, 8, 2, stride=2)
        self.reflect = nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect")
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        h = torch.cat([self.a(x), self.b(x)], 1)
        h = self.up(torch.relu(self.up(h)))
        h = self.reflect(self.reflect(torch.cat([self.c(x), self.d(x)], 1)) + h[:, :, ::4, ::4])
        return self.head(h.mean((2, 3)))


def erasable(space):
    n = len(space.groups)
    return [list(c) for r in range(1, n + 1) for c in itertools.combinations(range(n), r) if space.is_valid_removal(c)]


@pytest.mark.parametrize("make", [ConvTwice, SharedMix, TransposedAndReflectTwice])
def test_every_valid_removal_of_a_shared_layer_network_is_exact(make):
    x = torch.randn(2, 3, 4, 4)
    space = fxoto.build_space(randomize_(make()).eval(), (x,))
    removals = erasable(space)
    assert removals
    for ids in removals:
        model = randomize_(make()).eval()
        sub = check_subnet(model, x, ids, fxoto.build_space(model, (x,)))
        # The shared module stays one module with one weight: its sharing survives the rewrite.
        for name in {ConvTwice: ["conv"], SharedMix: ["mix"], TransposedAndReflectTwice: ["up", "reflect"]}[make]:
            if hasattr(sub, name):  # unless erased with its segment
                assert sum(1 for p in sub.parameters() if p is sub.get_submodule(name).weight) == 1


def test_shared_weight_keeps_its_sharing_and_each_site_reads_its_slice():
    model = randomize_(SharedMix()).eval()
    x = torch.randn(2, 3, 6, 6)
    space = fxoto.build_space(model, (x,))
    a = next(g.id for g in space.groups if g.nodes == ("a",))
    sub = check_subnet(model, x, [a], space)
    assert sub.mix.weight.shape == model.mix.weight.shape  # whole: the other site still reads 8 channels
    assert sub.mix.weight is not model.mix.weight and sub.mix.weight.data_ptr() != model.mix.weight.data_ptr()
    selects = [n for n in sub.graph.nodes if n.target is torch.index_select]
    assert len(selects) == 1  # only the site whose concat lost channels reads a slice


def test_shared_weights_read_functionally_are_sliced_per_site():
    model = randomize_(SharedFunctional()).eval()
    x = torch.randn(2, 3, 5, 5)
    space = fxoto.build_space(model, (x,))
    for ids in erasable(space):
        fresh = randomize_(SharedFunctional()).eval()
        fresh.load_state_dict(model.state_dict())
        check_subnet(fresh, x, ids, fxoto.build_space(fresh, (x,)))


def test_hypothesis_counterexample_one_module_reads_a_concat_at_four_places():
    """Found by the shared-layer strategies: one conv reads the same concat at four call sites;
    erasing a concat input sliced its weight once per call site."""
    cat = tuple(Branch(0, 2, 1, False, "gelu", False) for _ in range(3))
    mix = Branch(1, 1, 1, False, "gelu", False)
    shared = Branch(1, 1, 1, False, "gelu", False, reuse=(1, 0))
    spec = NetSpec(in_channels=2, size=2, head_flatten=False, classes=1, steps=(
        Step("cat", cat), Step("add", (mix, shared)), Step("add", (shared, shared)),
    ))
    x = torch.randn(1, 2, 2, 2)
    space = fxoto.build_space(randomize(RandomSupNet(spec), 0), (x,))
    assert [g.nodes for g in space.groups][:3] == [(f"branches_0_{i}_0", f"branches_0_{i}_1") for i in range(3)]
    for ids in erasable(space):
        model = randomize(RandomSupNet(spec), 0)
        check_subnet(model, x, ids, fxoto.build_space(model, (x,)))
