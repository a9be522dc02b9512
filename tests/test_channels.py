"""Slim operations, first slice: channel groups beside GeZIGs (issue 11)."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import event, given, settings
from hypothesis import strategies as st
from torch import nn

import fxoto
from fxoto.errors import InvalidRemovalError, NoSearchSpaceError
from fxoto.optimizer import H2SPG
from strategies import supernets, valid_removals
from util import randomize_


def conv_bn_relu(i, o):
    return [nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU()]


def vgg(widths=(8, 8, 16), size=8, classes=10):
    layers, c = [], 3
    for w in widths:
        layers += conv_bn_relu(c, w)
        c = w
    layers += [nn.MaxPool2d(2), nn.Flatten(), nn.Dropout(), nn.Linear(c * (size // 2) ** 2, classes)]
    return randomize_(nn.Sequential(*layers).eval())


class Residual(nn.Module):
    """stem -> conv-bn-relu -> [conv-bn-relu-conv-bn] + skip -> relu -> pool -> linear."""

    def __init__(self, c=8):
        super().__init__()
        self.stem = nn.Sequential(*conv_bn_relu(3, c))
        self.pre = nn.Sequential(*conv_bn_relu(c, c))
        self.branch = nn.Sequential(*conv_bn_relu(c, c), nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c))
        self.head = nn.Linear(c, 10)

    def forward(self, x):
        x = self.pre(self.stem(x))
        x = F.relu(self.branch(x) + x)
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


def size(m):
    return sum(p.numel() for p in m.parameters())


def assert_exact(space, ids, x):
    """Zero the groups, rewrite: the sub-network is strictly smaller and equals the super-network."""
    space.zero_(ids)
    with torch.no_grad():
        expected = space.model(x)
        sub = space.construct_subnet(ids)
        assert torch.allclose(sub(x), expected, atol=1e-5 * max(1.0, float(expected.abs().max())))
    assert size(sub) < size(space.model)
    return sub


X = torch.randn(2, 3, 8, 8)


def test_vgg_chain_has_one_group_per_channel():
    model = vgg()
    space = fxoto.build_space(model, X, structures="channels")
    assert [g.kind for g in space.groups] == ["channel"] * (8 + 8 + 16)
    assert [g.id for g in space.groups] == list(range(32))
    g = space.groups[9]  # second layer, channel 1: conv row, bias, batch norm weight and bias
    assert [str(m) for m in g.members] == ["3.weight[1:2]", "3.bias[1:2]", "4.weight[1:2]", "4.bias[1:2]"]
    assert g.numel == 8 * 9 + 3
    assert [(e.nodes, e.reason) for e in space.excluded] == [(("_12",), "channels: its channels reach the graph output")]
    with pytest.raises(NoSearchSpaceError):
        fxoto.search(vgg(), 1, X)  # operations alone: a chain has none


@pytest.mark.parametrize("seed", range(5))
def test_random_channel_removals_are_exact(seed):
    model = vgg()
    space = fxoto.build_space(model, X, structures="channels")
    ids = space.sample_removal(0.5, seed=seed)
    sub = assert_exact(space, ids, X)
    kept = {stem: space.layers[stem].channels - sum(space.groups[i].nodes[0] == stem for i in ids) for stem in space.layers}
    assert sub.get_submodule("0").out_channels == kept["_0"] == sub.get_submodule("1").num_features
    assert sub.get_submodule("3").in_channels == kept["_0"]
    assert sub.get_submodule("1").running_mean.shape == (kept["_0"],)
    assert sub.get_submodule("12").in_features == kept["_6"] * 16


def test_all_channels_of_a_layer_cannot_go():
    space = fxoto.build_space(vgg(), X, structures="channels")
    first = [g.id for g in space.groups if g.nodes[0] == "_0"]
    assert space.is_valid_removal(first[:-1])
    assert "all 8 output channels of node '_0'" in space.removal_problem(first)
    with pytest.raises(InvalidRemovalError):
        space.construct_subnet(first)


def test_operations_are_unchanged_and_first_in_both():
    ops = fxoto.build_space(Residual(), X)
    both = fxoto.build_space(Residual(), X, structures="both")
    assert [g.kind for g in ops.groups] == ["operation"]
    assert both.groups[: len(ops.groups)] == ops.groups
    channel = both.groups[len(ops.groups):]
    assert {g.nodes[0] for g in channel} == {"stem_0"} and len(channel) == 8
    reasons = {e.nodes[0]: e.reason for e in both.excluded}
    assert "joint" in reasons["pre_0"]  # its channels go into the add
    assert "operation group" in reasons["branch_0"]  # inside the GeZIG: kept whole


@pytest.mark.parametrize("seed", range(4))
def test_mixed_removals_are_exact(seed):
    model = Residual()
    randomize_(model).eval()
    space = fxoto.build_space(model, X, structures="both")
    ids = sorted({0} | set(space.sample_removal(0.5, seed=seed)[:4]))  # the residual branch and channels
    assert space.is_valid_removal(ids) and any(space.groups[i].kind == "channel" for i in ids)
    assert_exact(space, ids, X)


def test_channels_inside_a_residual_branch():
    model = randomize_(Residual()).eval()
    space = fxoto.build_space(model, X, structures="channels")
    assert {g.nodes[0] for g in space.groups} == {"stem_0", "branch_0"}
    ids = [g.id for g in space.groups if g.members[0].start % 2 == 0]
    sub = assert_exact(space, ids, X)
    assert sub.get_submodule("branch.3").in_channels == 4


class Unsupported(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.d = nn.Conv2d(8, 8, 1)
        self.gn = nn.GroupNorm(2, 8)
        self.b = nn.Conv2d(8, 8, 1)
        self.c = nn.Conv2d(8, 8, 1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = self.grouped(self.a(x))
        x = self.gn(self.d(x))
        x = self.b(x) + self.c(x)
        return self.head(x).mean((2, 3))


def test_unsupported_layers_are_set_aside_with_a_reason():
    space = fxoto.build_space(Unsupported(), X, structures="channels")
    assert space.groups == []
    reasons = {e.nodes[0]: e.reason for e in space.excluded}
    assert "grouped convolution" in reasons["a"]  # a feeds a grouped conv: not followed
    assert "grouped convolution (groups=2)" in reasons["grouped"]
    assert "GroupNorm" in reasons["d"]
    assert "joint" in reasons["b"] and "joint" in reasons["c"]
    assert "graph output" in reasons["head"]
    assert len(reasons) == len(space.excluded) == 6


def test_k_per_kind():
    space = fxoto.build_space(vgg(), X, structures="channels")
    assert fxoto.search(vgg(), {"channels": 0.25}, X, structures="channels").K == 8
    with pytest.raises(ValueError, match="has none"):
        fxoto.search(vgg(), {"operations": 1}, X, structures="channels")
    with pytest.raises(ValueError, match="kinds"):
        fxoto.space.resolve_k({"channel": 1}, space)
    with pytest.raises(ValueError, match="one kind"):
        fxoto.search(Residual(), {"channels": 2}, X, structures="both")
    with pytest.raises(ValueError, match="structures"):
        fxoto.build_space(vgg(), X, structures="layers")


def train_eight_steps(model, opt) -> torch.Generator:
    """Eight steps on random batches; returns the generator, to draw test inputs after them."""
    g = torch.Generator().manual_seed(0)
    for _ in range(8):
        x, y = torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return g


def test_h2spg_delivers_k_channel_groups():
    torch.manual_seed(0)
    model = vgg()
    model.train()
    s = fxoto.search(model, {"channels": 0.25}, X, structures="channels")
    opt = H2SPG(s.space, s.K, 0.05, warmup_steps=2, pruning_steps=4)
    g = train_eight_steps(model, opt)
    assert opt.phase == "pruned"
    assert sorted(opt.redundant) == s.space.zero_groups() and len(opt.redundant) == 8
    model.eval()
    x = torch.randn(4, 3, 8, 8, generator=g)
    with torch.no_grad():
        expected = model(x)
        sub = s.subnet()
        assert torch.allclose(sub(x), expected, atol=1e-5 * max(1.0, float(expected.abs().max())))
    assert size(sub) < size(model)


@settings(max_examples=25, deadline=None)
@given(widths=st.lists(st.integers(1, 6), min_size=1, max_size=4), pool=st.booleans(), seed=st.integers(0, 99))
def test_random_chains_random_removals(widths, pool, seed):
    layers, c = [], 3
    for w in widths:
        layers += conv_bn_relu(c, w)
        c = w
    if pool:
        layers.append(nn.MaxPool2d(2))
    layers += [nn.Flatten(), nn.Linear(c * (4 if pool else 16), 3)]
    model = randomize_(nn.Sequential(*layers).eval(), seed)
    x = torch.randn(2, 3, 4, 4)
    space = fxoto.build_space(model, x, structures="channels")
    assert len(space.groups) == sum(widths)
    ids = space.sample_removal(0.5, seed=seed)
    if not ids:  # every layer one channel wide: nothing can go
        return
    assert_exact(space, ids, x)


@pytest.mark.parametrize("structures", ["channels", "both"])
def test_greedy_walk_is_the_checked_walk(structures):
    """The walk counts channels per layer; it accepts what removal_problem accepts, group by group."""
    space = fxoto.build_space(Residual(), X, structures=structures)
    order = torch.randperm(len(space.groups), generator=torch.Generator().manual_seed(1)).tolist()
    naive = []
    for i in order:
        if space.is_valid_removal(naive + [i]):
            naive.append(i)
    assert space.greedy_removal(order) == naive
    assert space.is_valid_removal(space.greedy_max_removal())


def test_other_per_channel_modules_and_stems():
    """Conv1d, PReLU per channel, a depthwise convolution, Linear into BatchNorm1d into Linear."""
    model = randomize_(nn.Sequential(
        nn.Conv1d(3, 6, 3, padding=1), nn.PReLU(6), nn.Conv1d(6, 6, 3, padding=1, groups=6), nn.BatchNorm1d(6),
        nn.AvgPool1d(2), nn.Conv1d(6, 5, 1), nn.Flatten(), nn.Linear(5 * 4, 7), nn.BatchNorm1d(7), nn.GELU(),
        nn.Linear(7, 2),
    ).eval())
    with torch.no_grad():
        model[1].weight.uniform_(0.1, 0.5)
    x = torch.randn(3, 3, 8)
    space = fxoto.build_space(model, x, structures="channels")
    layers = {stem: (layer.channels, layer.per_channel, layer.consumers) for stem, layer in space.layers.items()}
    assert layers == {"_0": (6, ("_1", "_2", "_3"), (("_5", 1),)), "_5": (5, (), (("_7", 4),)),
                      "_7": (7, ("_8",), (("_10", 1),))}
    assert [str(m) for m in space.groups[0].members] == ["0.weight[0:1]", "0.bias[0:1]", "2.weight[0:1]",
                                                         "2.bias[0:1]", "3.weight[0:1]", "3.bias[0:1]"]
    sub = assert_exact(space, [0, 2, 3, 6, 9, 11, 12], x)
    assert sub.get_submodule("1").num_parameters == sub.get_submodule("2").groups == 3
    assert sub.get_submodule("7").in_features == 12 and sub.get_submodule("10").in_features == 5


class SharedPReLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 2, 1)
        self.act = nn.PReLU(4)

    def forward(self, x):
        return self.c(self.act(self.b(self.act(self.a(x))))).mean((2, 3))


def test_a_per_channel_module_used_twice_is_set_aside():
    space = fxoto.build_space(SharedPReLU(), X, structures="channels")
    reasons = {e.nodes[0]: e.reason for e in space.excluded}
    assert space.groups == [] and "shared variables: parameter 'act.weight'" in reasons["a"]


def test_h2spg_over_both_kinds():
    torch.manual_seed(0)
    model = Residual()
    s = fxoto.search(model, 4, X, structures="both")
    opt = H2SPG(s.space, s.K, 0.05, warmup_steps=2, pruning_steps=4)
    g = train_eight_steps(model, opt)
    assert sorted(opt.redundant) == s.space.zero_groups() and len(opt.redundant) == 4
    model.eval()
    x = torch.randn(4, 3, 8, 8, generator=g)
    with torch.no_grad():
        expected = model(x)
        assert torch.allclose(s.subnet()(x), expected, atol=1e-5 * max(1.0, float(expected.abs().max())))


@settings(max_examples=40, deadline=None)
@given(st.data(), st.sampled_from(["channels", "both"]))
def test_random_supernets_mixed_removals_are_exact(data, structures):
    """The random super-networks of the other properties: the operation groups are those of the
    default, and random valid removals of both kinds give an exact sub-network."""
    model, x = data.draw(supernets())
    space = fxoto.build_space(model, (x,), structures=structures)
    operations = fxoto.build_space(model, (x,)).groups
    assert [g for g in space.groups if g.kind == "operation"] == (operations if structures == "both" else [])
    assert [g.id for g in space.groups] == list(range(len(space.groups)))
    ids = data.draw(valid_removals(space))
    space.zero_(ids)
    with torch.no_grad():
        expected = model(x)
        sub = space.construct_subnet(ids)
        got = sub(x)
    assert torch.allclose(got, expected, atol=1e-5 * max(1.0, float(expected.abs().max())), rtol=0)
    if ids:
        assert size(sub) < size(model)
    event(f"channel groups removed: {'some' if any(space.groups[i].kind == 'channel' for i in ids) else 'none'}")


def test_summary_has_one_row_per_layer():
    from fxoto import viz

    text = viz.summary(fxoto.build_space(vgg(), X, structures="channels"))
    assert "g0..g7" in text and "8 channels, 7 can go" in text and "g16..g31" in text
    assert "0 GeZIGs over 3 segments and 32 channel groups in 3 layers" in text
