"""Mixed convolutions (MixNet): a concat split again into parts, each read by its own layers.

The concatenated channels are followed through ``split`` / ``chunk`` into the parts; a part
that loses every channel is erased with what reads it alone, up to the concat that takes it,
and a removal that would leave a convolution reading nothing is refused with the reason.
"""

import itertools

import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st
from torch import nn

import fxoto
from fxoto.errors import FxotoError, SubnetCheckError
from strategies import emptied_parts, supernets, valid_removals
from util import assert_groups_leave, randomize_


class MixBlock(nn.Module):
    """Pointwise branches on halves of the input, batch norm, then 3x3 and 5x5 depthwise
    convolutions on the two parts of the concat, batch norm, 1x1 back, batch norm, ``+ x``."""

    def __init__(self, c: int = 16, mid: int = 12):
        super().__init__()
        self.pw = nn.ModuleList([nn.Conv2d(c // 2, mid, 1), nn.Conv2d(c // 2, mid, 1)])
        self.bn1 = nn.BatchNorm2d(2 * mid)
        self.dw = nn.ModuleList([nn.Conv2d(mid, mid, k, padding=k // 2, groups=mid) for k in (3, 5)])
        self.bn2 = nn.BatchNorm2d(2 * mid)
        self.proj = nn.Conv2d(2 * mid, c, 1)
        self.bn3 = nn.BatchNorm2d(c)
        self.mid = mid

    def forward(self, x):
        xs = torch.split(x, x.shape[1] // 2, 1)
        h = self.bn1(torch.cat([self.pw[0](xs[0]), self.pw[1](xs[1])], 1))
        hs = torch.split(h, [self.mid, self.mid], 1)
        h = torch.cat([self.dw[0](hs[0]), self.dw[1](hs[1])], 1)
        return self.bn3(self.proj(self.bn2(h))) + x


class MixNet(nn.Module):
    def __init__(self, c: int = 16):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.blocks = nn.Sequential(MixBlock(c), MixBlock(c))
        self.head = nn.Linear(c, 4)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


class MixPointwise(nn.Module):
    """timm's inverted residual with mixed pointwise layers: the concat of the first is split
    again, after a depthwise convolution, into the two 1x1 convolutions of the last."""

    def __init__(self, c: int = 8, mid: int = 12, out: int = 6):
        super().__init__()
        self.pw = nn.ModuleList([nn.Conv2d(c // 2, mid, 1), nn.Conv2d(c // 2, mid, 1)])
        self.bn1 = nn.BatchNorm2d(2 * mid)
        self.dw = nn.Conv2d(2 * mid, 2 * mid, 3, padding=1, groups=2 * mid)
        self.bn2 = nn.BatchNorm2d(2 * mid)
        self.pwl = nn.ModuleList([nn.Conv2d(mid, out // 2, 1), nn.Conv2d(mid, out // 2, 1)])
        self.bn3 = nn.BatchNorm2d(out)
        self.head = nn.Linear(out, 3)
        self.mid = mid

    def forward(self, x):
        xs = torch.chunk(x, 2, 1)
        h = torch.relu(self.bn1(torch.cat([self.pw[0](xs[0]), self.pw[1](xs[1])], 1)))
        hs = torch.relu(self.bn2(self.dw(h))).split([self.mid, self.mid], 1)
        h = self.bn3(torch.cat([self.pwl[0](hs[0]), self.pwl[1](hs[1])], 1))
        return self.head(h.mean((2, 3)))


def removals(space, size):
    return [list(ids) for ids in itertools.combinations(range(len(space.groups)), size)]


def check_exact(model, x, space, ids):
    with torch.no_grad():
        saved = {k: v.clone() for k, v in model.state_dict().items()}
        space.zero_(ids)
        expected = model(x)
        sub = space.construct_subnet(ids)
        got = sub(x)
        model.load_state_dict(saved)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * max(1.0, float(expected.abs().max())))
    return sub


@pytest.fixture
def mixnet():
    torch.manual_seed(0)
    model = randomize_(MixNet()).eval()
    x = torch.randn(2, 3, 8, 8)
    return model, x, fxoto.build_space(model, (x,))


def test_the_pointwise_branches_and_projections_are_groups(mixnet):
    model, x, space = mixnet
    assert [g.nodes[-1] for g in space.groups] == ["blocks_0_pw_0", "blocks_0_pw_1", "blocks_0_bn3",
                                                   "blocks_1_pw_0", "blocks_1_pw_1", "blocks_1_bn3"]


@pytest.mark.parametrize("size", [1, 2])
def test_every_accepted_removal_is_exact_and_every_refused_one_says_why(mixnet, size):
    model, x, space = mixnet
    accepted = 0
    for ids in removals(space, size):
        problem = space.removal_problem(ids)
        if problem is not None:
            assert "node '" in problem
            with pytest.raises(fxoto.InvalidRemovalError):
                space.construct_subnet(ids)
            continue
        accepted += 1
        sub = check_exact(model, x, space, ids)
        assert sum(p.numel() for p in sub.parameters()) < sum(p.numel() for p in model.parameters())
    assert accepted == {1: 6, 2: 13}[size]


def test_a_pointwise_branch_takes_its_depthwise_part_along(mixnet):
    """Branch 0 of the first block gives the 3x3 part all its channels: the part goes, and the
    concat after the depthwise convolutions keeps the 5x5 part alone (then no concat at all)."""
    model, x, space = mixnet
    sub = check_exact(model, x, space, [0])
    names = {n.name for n in sub.graph.nodes}
    assert "blocks_0_dw_0" not in names and "blocks_0_pw_0" not in names
    block = sub.get_submodule("blocks.0")
    assert not hasattr(block.dw, "0") and not hasattr(block.pw, "0")
    assert block.bn1.num_features == 12 and block.bn2.num_features == 12
    assert block.proj.in_channels == 12 and block.get_submodule("dw.1").groups == 12


def test_a_part_read_by_a_convolution_goes_only_with_it():
    """Emptying a part that a 1x1 convolution reads would leave that convolution reading nothing
    (its output: its bias alone) while it still feeds the output: refused, unless the
    convolution's own group goes too."""
    torch.manual_seed(0)
    model = randomize_(MixPointwise()).eval()
    x = torch.randn(2, 8, 6, 6)
    space = fxoto.build_space(model, (x,))
    assert [g.nodes[-1] for g in space.groups] == ["pw_0", "pw_1", "pwl_0", "pwl_1"]
    for pw, pwl in ((0, 2), (1, 3)):
        problem = space.removal_problem([pw])
        assert problem is not None and f"part {pw} of node 'split'" in problem and f"node 'pwl_{pw}' would read nothing" in problem
        sub = check_exact(model, x, space, [pw, pwl])
        assert sub.bn1.num_features == sub.dw.groups == sub.bn2.num_features == 12
    assert not space.is_valid_removal([0, 3]) and not space.is_valid_removal([2, 3])
    for ids in ([2], [3]):
        assert space.is_valid_removal(ids)
        check_exact(model, x, space, ids)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("broken", ["per_channel", "emptied"])
def test_a_broken_rewrite_raises_and_leaves_the_super_network_alone(mixnet, monkeypatch, broken):
    """The rewrite checks what it returns: made to fail on purpose (batch norms left at their old
    width; the emptied part left in, its depthwise convolution with no channel), it raises
    ``SubnetCheckError`` naming the groups and the node, and the super-network is as it was."""
    model, x, space = mixnet
    if broken == "per_channel":
        monkeypatch.setattr("fxoto.subnet._slice_per_channel", lambda gm, node, drop: None)
    else:
        monkeypatch.setattr(type(space), "emptied", lambda self, erased: (set(erased), [], {}, None))
    before = _state(model)
    with torch.no_grad():
        expected = model(x)
    with pytest.raises(SubnetCheckError) as error:
        space.construct_subnet([0])
    message = str(error.value)
    assert isinstance(error.value, FxotoError)
    assert "groups [0] (g0: " in message and "-> blocks_0_pw_0)" in message
    assert ("node 'blocks_0_bn1'" if broken == "per_channel" else "node 'blocks_0_dw_0'") in message
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(x), expected)


# -- random super-networks whose every concat is split again -------------------------------------


@settings(max_examples=30, deadline=None)
@given(supernets(split_every_cat=True), st.sampled_from(["operations", "both"]), st.data())
def test_random_mixed_convolutions(net, structures, data):
    """Every concat split again (at the branches' bounds, anywhere, or chunked) into depthwise
    convolutions, norms, activations and 1x1 convolutions: each single removal that the validity
    check accepts, and a random valid one, gives a sub-network equal to the zeroed super-network
    and no larger than it less the removed groups; each refused one says why."""
    model, x = net
    space = fxoto.build_space(model, (x,), structures=structures)
    operations = [g.id for g in space.groups if g.kind == "operation"]
    for i in operations:
        problem = space.removal_problem([i])
        if problem is not None:
            assert "node '" in problem
            continue
        event(emptied_parts(space, [i]))
        sub = check_exact(model, x, space, [i])
        assert_groups_leave(space, [i], sub)
    ids = data.draw(valid_removals(space))
    event(f"{structures}: " + emptied_parts(space, ids))
    assert_groups_leave(space, ids, check_exact(model, x, space, ids))
