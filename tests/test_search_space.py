"""The search space of the paper's DemoSupNet, checked against the paper's own words."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxoto
from fxoto.zoo import DemoSupNet
from util import randomize_, segment_ends


def small_demo():
    return randomize_(DemoSupNet(stem_width=6, branch_width=4, mid_width=5, add_width=7).eval())


@pytest.fixture(scope="module")
def demo():
    model = small_demo()
    return model, fxoto.build_space(model, (torch.randn(2, 1, 28, 28),))


def by_first_module(space):
    return {g.nodes[0] if not g.nodes[0].startswith(("maxpool", "avgpool")) else g.nodes[1]: g for g in space.groups}


def test_demosupnet_gezigs_are_the_papers(demo):
    _, space = demo
    assert [g.nodes for g in space.groups] == [
        ("conv2", "bn2"),
        ("maxpool", "conv3", "bn3"),
        ("avgpool", "conv4", "bn4"),
        ("conv7", "bn7"),
        ("conv8", "bn8"),
    ]
    g2 = space.groups[0]
    assert {str(m) for m in g2.members} == {"conv2.weight", "conv2.bias", "bn2.weight", "bn2.bias"}
    assert g2.numel == 6 * 4 * 9 + 4 + 4 + 4


def test_demosupnet_hierarchy(demo):
    _, space = demo
    g2, g3, g4, g7, g8 = range(5)
    # K = 3 in the paper: Conv2-BN2, MaxPool-Conv3-BN3 and Conv8-BN8.
    assert space.is_valid_removal([g2, g3, g8])
    # With Conv8-BN8 gone, erasing Conv7-BN7 too cuts every input-output path.
    assert not space.is_valid_removal([g7, g8])
    assert not space.is_valid_removal([g2, g3, g7, g8])
    # Every branch of the Concat gone leaves Conv6 without input.
    assert not space.is_valid_removal([g2, g3, g4])
    assert space.is_valid_removal([g2, g3, g4, g7]) is False
    assert space.is_valid_removal([])
    assert "would lose all of its inputs" in space.removal_problem([g7, g8])
    with pytest.raises(fxoto.InvalidRemovalError, match="add"):
        space.check_removal([g7, g8])


def test_demosupnet_groups_are_zero_invariant(demo):
    model, space = demo
    x = torch.randn(3, 1, 28, 28)
    before = segment_ends(space, x)
    assert all(v.abs().sum() > 0 for v in before.values())
    space.zero_(range(len(space.groups)))
    after = segment_ends(space, x)
    assert all(torch.equal(v, torch.zeros_like(v)) for v in after.values())
    assert space.zero_groups() == list(range(5))


def test_search_resolves_k_and_refuses_too_large():
    model = small_demo()
    x = torch.randn(1, 1, 28, 28)
    assert fxoto.search(model, 3, x).K == 3
    assert fxoto.search(model, 0.4, x).K == 2
    # 5 GeZIGs, but at most 3 can go together (one Concat branch and one Add branch stay).
    with pytest.raises(fxoto.KTooLargeError, match="at most 3"):
        fxoto.search(model, 4, x)
    with pytest.raises(fxoto.KTooLargeError, match="only 5 GeZIGs"):
        fxoto.search(model, 6, x)
    with pytest.raises(ValueError):
        fxoto.search(model, 1.5, x)


def test_search_leaves_the_model_untouched():
    model = small_demo().train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fxoto.search(model, 2, torch.randn(2, 1, 28, 28))
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 1)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.a(x) + self.b(x)
        return self.head(x.mean((2, 3)))


class DataDependent(Branchy):
    def forward(self, x):
        x = self.stem(x)
        if x.sum() > 0:
            x = x + self.a(x)
        return self.head(x.mean((2, 3)))


class Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.conv(x) if x.mean() > 0 else x


class NestedDataDependent(Branchy):
    def __init__(self):
        super().__init__()
        self.inner = Inner()

    def forward(self, x):
        x = self.stem(x)
        return self.head((x + self.inner(x)).mean((2, 3)))


class Tied(Branchy):
    """Branch ``b`` reuses branch ``a``'s convolution: called twice."""

    def forward(self, x):
        x = self.stem(x)
        y = x + self.a(x)
        z = y + self.b(y) + self.a(y)
        return self.head(z.mean((2, 3)))


def test_untraceable_model_names_the_module():
    with pytest.raises(fxoto.UntraceableModelError, match="DataDependent.*root.*leaf_modules"):
        fxoto.search(DataDependent(), 1, torch.randn(1, 3, 8, 8))
    with pytest.raises(fxoto.UntraceableModelError, match="module 'inner'"):
        fxoto.search(NestedDataDependent(), 1, torch.randn(1, 3, 8, 8))


def test_leaf_modules_make_an_untraceable_module_opaque():
    space = fxoto.build_space(NestedDataDependent(), (torch.randn(1, 3, 8, 8),), leaf_modules=[Inner])
    # The opaque module is unknown: it builds, but no group crosses it ...
    assert space.groups == []
    assert "node 'inner' (Inner, unknown)" in space.excluded[0].reason
    # ... until a rule says what it is.
    table = fxoto.DEFAULT_TABLE.extended(modules={Inner: fxoto.OpRule(fxoto.Role.STEM, fxoto.Zero.OWN_VARIABLES)})
    space = fxoto.build_space(NestedDataDependent(), (torch.randn(1, 3, 8, 8),), leaf_modules=["inner"], op_table=table)
    assert [g.nodes for g in space.groups] == [("inner",)]


def test_no_removable_structure_is_a_clear_error():
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
    plain(torch.randn(1, 3, 8, 8))
    with pytest.raises(fxoto.NoSearchSpaceError, match="no removable structure"):
        fxoto.search(plain, 1, torch.randn(1, 3, 8, 8))


def test_shared_parameters_are_never_split():
    space = fxoto.build_space(Tied(), (torch.randn(1, 3, 8, 8),))
    assert all("a" not in g.nodes and "a_1" not in g.nodes for g in space.groups)
    assert any("shared variables" in e.reason and "'a.weight'" in e.reason for e in space.excluded)
    assert [g.nodes for g in space.groups] == [("b",)]


def test_branchy_counts():
    space = fxoto.build_space(Branchy(), (torch.randn(1, 3, 8, 8),))
    assert [g.nodes for g in space.groups] == [("a",), ("b",)]


class DeadFork(nn.Module):
    """A concat's result read by a dead branch (its output unused) and by BN -> ReLU -> conv into
    an add: the hypothesis counterexample behind the fix (the dead conv was taken as the zeroing
    start, so the batch norm after the concat joined that group whole while the concat's inputs
    held its rows: two groups shared its variables)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.dead = nn.Conv2d(1, 1, 1), nn.Conv2d(1, 1, 1), nn.Conv2d(2, 1, 1)
        self.bn, self.conv, self.skip = nn.BatchNorm2d(2), nn.Conv2d(2, 1, 1), nn.Conv2d(1, 1, 1)
        self.head = nn.Linear(1, 3)

    def forward(self, x):
        c = torch.cat([F.gelu(self.a(x)), F.gelu(self.b(x))], 1)
        unused = torch.cat([x, self.dead(c)], 1)  # noqa: F841 (dead code, as a model may hold)
        y = F.gelu(self.conv(F.relu(self.bn(c)))) + F.gelu(self.skip(x))
        return self.head(F.adaptive_avg_pool2d(y, 1).flatten(1))


def test_dead_node_in_a_segment_is_no_member_and_groups_stay_disjoint():
    model = DeadFork().eval()
    x = torch.randn(2, 1, 4, 4)
    space = fxoto.build_space(model, (x[:1],))
    assert [[str(m) for m in g.members] for g in space.groups] == [
        ["a.weight", "a.bias", "bn.weight[0:1]", "bn.bias[0:1]"],
        ["b.weight", "b.bias", "bn.weight[1:2]", "bn.bias[1:2]"],
        ["conv.weight", "conv.bias"],
        ["skip.weight", "skip.bias"],
    ]
    for ids in ([0], [1], [2], [3], [0, 3], [1, 2]):
        twin = copy.deepcopy(model)
        s = fxoto.build_space(twin, (x[:1],))
        s.zero_(ids)
        with torch.no_grad():
            assert torch.allclose(s.construct_subnet()(x), twin(x), atol=1e-6)
