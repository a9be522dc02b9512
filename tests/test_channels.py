"""Slim operations, first slice: channel groups beside GeZIGs."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import event, given, settings
from hypothesis import strategies as st
from torch import nn

import fxoto
from fxoto.errors import InvalidRemovalError, KTooLargeError, NoSearchSpaceError
from fxoto.optimizer import H2SPG
from strategies import (Branch, NetSpec, RandomSupNet, Step, emptied_parts, randomize, splits_after_concats, supernets,
                        valid_removals)
from util import assert_groups_leave, randomize_


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
    theirs = {t.data_ptr() for t in [*model.parameters(), *model.buffers()]}
    assert not theirs & {t.data_ptr() for t in [*sub.parameters(), *sub.buffers()]}  # its own copies


def test_all_channels_of_a_layer_cannot_go():
    space = fxoto.build_space(vgg(), X, structures="channels")
    first = [g.id for g in space.groups if g.nodes[0] == "_0"]
    assert space.is_valid_removal(first[:-1])
    assert "all 8 output channels of node '_0'" in space.removal_problem(first)
    with pytest.raises(InvalidRemovalError):
        space.construct_subnet(first)


def test_operations_first_in_both_and_channels_nest_inside_them():
    # The operation groups come first, with their ids, segments and nodes; the layers before
    # the nodes that decide a group's output (the branch's first conv and its batch norm) are
    # slimmed by channel groups, which hold their variables: the operation group keeps the
    # rest (the last conv and batch norm), so zeroing it still zeroes the branch.
    ops = fxoto.build_space(Residual(), X)
    both = fxoto.build_space(Residual(), X, structures="both")
    assert [g.kind for g in ops.groups] == ["operation"]
    head = both.groups[: len(ops.groups)]
    assert [(g.id, g.segment, g.nodes, g.kind) for g in head] == [(g.id, g.segment, g.nodes, g.kind) for g in ops.groups]
    assert [m.param for m in head[0].members] == ["branch.3.weight", "branch.3.bias", "branch.4.weight", "branch.4.bias"]
    assert set(head[0].members) < set(ops.groups[0].members)
    channel = both.groups[len(ops.groups):]
    assert sorted({g.nodes[0] for g in channel}) == ["branch_0", "stem_0"] and len(channel) == 16
    held = {m.param for g in both.groups for m in g.members}
    assert {"branch.0.weight", "branch.1.weight"} <= held  # in channel groups now
    reasons = {e.nodes[0]: e.reason for e in both.excluded}
    assert "node 'branch_4' lies in an operation group" in reasons["pre_0"]  # its channels reach the decisive BN
    assert "operation group" in reasons["branch_3"]  # the decisive conv: kept whole


def test_a_block_made_thinner_and_another_erased_is_exact():
    model = Residual()
    space = fxoto.build_space(model, X, structures="both")
    inner = [g.id for g in space.groups if g.kind == "channel" and g.nodes[0] == "branch_0"]
    assert_exact(space, inner[:5], X)  # the branch keeps 3 of its 8 inner channels
    space = fxoto.build_space(Residual(), X, structures="both")
    assert_exact(space, [0] + inner[:7], X)  # the branch erased, inner channels chosen with it


@pytest.mark.parametrize("seed", range(4))
def test_mixed_removals_are_exact(seed):
    model = Residual()
    randomize_(model).eval()
    space = fxoto.build_space(model, X, structures="both")
    ids = sorted({0} | set(space.sample_removal(0.5, seed=seed)[:4]))  # the residual branch and channels
    assert space.is_valid_removal(ids) and any(space.groups[i].kind == "channel" for i in ids)
    assert_exact(space, ids, X)


def test_channels_coupled_through_an_add():
    """Channel c of both inputs of the add is one group: pre's row c and branch.3's row c (and their
    batch norms' entries c); the readers after the add (the head) lose column c."""
    model = randomize_(Residual()).eval()
    space = fxoto.build_space(model, X, structures="channels")
    by_stem = {}
    for g in space.groups:
        by_stem.setdefault(g.nodes[0], []).append(g)
    assert {k: len(v) for k, v in by_stem.items()} == {"stem_0": 8, "pre_0": 8, "branch_0": 8}
    g = by_stem["pre_0"][2]
    assert [str(m) for m in g.members] == ["pre.0.weight[2:3]", "pre.0.bias[2:3]", "branch.3.weight[2:3]",
                                           "branch.3.bias[2:3]", "pre.1.weight[2:3]", "pre.1.bias[2:3]",
                                           "branch.4.weight[2:3]", "branch.4.bias[2:3]"]
    cut = space.slices[g.id]
    assert cut.rows == (("pre_0", 2), ("branch_3", 2))
    assert set(cut.columns) == {("branch_0", 2, 1), ("head", 2, 1)}
    ids = [g.id for g in space.groups if g.members[0].start % 2 == 0]
    sub = assert_exact(space, ids, X)
    assert sub.get_submodule("branch.3").out_channels == sub.get_submodule("pre.0").out_channels == 4
    assert sub.get_submodule("branch.3").in_channels == 4 and sub.get_submodule("head").in_features == 4


class Block(nn.Module):
    """torchvision's BasicBlock: conv-bn-relu-conv-bn, plus the input or a 1x1 conv-bn downsample."""

    def __init__(self, i, o, stride=1):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(i, o, 3, stride, 1), nn.BatchNorm2d(o)
        self.conv2, self.bn2 = nn.Conv2d(o, o, 3, 1, 1), nn.BatchNorm2d(o)
        self.down = nn.Sequential(nn.Conv2d(i, o, 1, stride), nn.BatchNorm2d(o)) if stride != 1 or i != o else None

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        out += x if self.down is None else self.down(x)
        return F.relu(out)


class ResNetLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.blocks = nn.Sequential(Block(4, 4), Block(4, 4), Block(4, 6, 2), Block(6, 6))
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        x = self.blocks(F.relu(self.bn(self.stem(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def test_a_residual_stream_through_several_blocks_is_one_group_per_channel():
    model = randomize_(ResNetLike()).eval()
    space = fxoto.build_space(model, X, structures="channels")
    stream = [space.slices[g.id] for g in space.groups if g.nodes[0] == "stem"]
    assert len(stream) == 4  # channel c: the stem and both blocks' conv2, bn and bn2 entries
    assert stream[1].rows == (("stem", 1), ("blocks_0_conv2", 1), ("blocks_1_conv2", 1))
    assert {n for n, _ in stream[1].entries} == {"bn", "blocks_0_bn2", "blocks_1_bn2"}
    assert {n for n, _, _ in stream[1].columns} == {"blocks_0_conv1", "blocks_1_conv1", "blocks_2_conv1",
                                                   "blocks_2_down_0"}
    second = [space.slices[g.id] for g in space.groups if g.nodes[0] == "blocks_2_conv2"]
    assert len(second) == 6 and second[0].rows == (("blocks_2_conv2", 0), ("blocks_2_down_0", 0),
                                                   ("blocks_3_conv2", 0))
    assert [e.reason for e in space.excluded] == ["channels: its channels reach the graph output"]
    for seed in range(3):
        randomize_(model, seed)
        assert_exact(space, space.sample_removal(0.6, seed=seed), X)
    all_but_one = [g.id for g in space.groups if g.nodes[0] == "stem"][:3]
    sub = assert_exact(space, all_but_one, X)
    assert sub.get_submodule("blocks.1.conv2").out_channels == 1


class DenseLayer(nn.Module):
    def __init__(self, i, growth):
        super().__init__()
        self.norm, self.conv = nn.BatchNorm2d(i), nn.Conv2d(i, growth, 3, padding=1)

    def forward(self, features):
        return self.conv(F.relu(self.norm(torch.cat(features, 1))))


class DenseNetLike(nn.Module):
    """torchvision's DenseNet in small: each layer reads the concat of all before it."""

    def __init__(self, c=4, growth=3, layers=3):
        super().__init__()
        self.conv0, self.norm0 = nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c)
        self.layers = nn.ModuleList(DenseLayer(c + i * growth, growth) for i in range(layers))
        self.norm5 = nn.BatchNorm2d(c + layers * growth)
        self.fc = nn.Linear(c + layers * growth, 5)

    def forward(self, x):
        features = [F.relu(self.norm0(self.conv0(x)))]
        for layer in self.layers:
            features.append(layer(features))
        x = F.relu(self.norm5(torch.cat(features, 1)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def test_channels_through_concats_keep_their_offsets():
    model = randomize_(DenseNetLike()).eval()
    space = fxoto.build_space(model, X, structures="channels")
    assert len(space.groups) == 4 + 3 * 3 and not space.excluded[1:]
    second = space.slices[next(g.id for g in space.groups if g.nodes[0] == "layers_1_conv")]  # its channel 0
    assert second.rows == (("layers_1_conv", 0),)
    assert sorted(second.entries) == [("layers_2_norm", 7), ("norm5", 7)]  # offset 4 + 3
    assert sorted(second.columns) == [("fc", 7, 1), ("layers_2_conv", 7, 1)]
    first = space.slices[space.groups[1].id]
    assert sorted(first.entries) == [("layers_0_norm", 1), ("layers_1_norm", 1), ("layers_2_norm", 1),
                                     ("norm0", 1), ("norm5", 1)]
    for seed in range(4):
        randomize_(model, seed)
        sub = assert_exact(space, space.sample_removal(0.5, seed=seed), X)
    assert sub.get_submodule("norm5").num_features < 13


class GroupedAndNormed(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 4, 3, padding=1, groups=2)
        self.d = nn.Conv2d(4, 8, 1)
        self.gn = nn.GroupNorm(2, 8)
        self.b = nn.Conv2d(8, 8, 1)
        self.c = nn.Conv2d(8, 8, 1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = self.grouped(self.a(x))
        x = self.gn(self.d(x))
        x = self.b(x) + self.c(x)
        return self.head(x).mean((2, 3))


def test_grouped_convolutions_and_group_norms_drop_whole_groups():
    model = randomize_(GroupedAndNormed()).eval()
    space = fxoto.build_space(model, X, structures="channels")
    rows = [space.slices[g.id].rows for g in space.groups]
    assert rows[:2] == [tuple(("a", c) for c in range(4)) + (("grouped", 0), ("grouped", 1)),
                        tuple(("a", c) for c in range(4, 8)) + (("grouped", 2), ("grouped", 3))]
    assert rows[2:4] == [tuple(("d", c) for c in range(4)), tuple(("d", c) for c in range(4, 8))]
    assert rows[4:] == [(("b", c), ("c", c)) for c in range(8)]
    assert [(e.nodes, e.reason) for e in space.excluded] == [(("head",), "channels: its channels reach the graph output")]
    sub = assert_exact(space, [1, 2, 5, 7], X)
    assert (sub.get_submodule("grouped").groups, sub.get_submodule("grouped").in_channels) == (1, 4)
    assert (sub.get_submodule("gn").num_groups, sub.get_submodule("gn").num_channels) == (1, 4)
    assert space.removal_problem([0, 1]) is not None  # every channel of 'a'


class Unsupported(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.up = nn.ConvTranspose2d(8, 8, 2, stride=2)
        self.b = nn.Conv2d(8, 8, 1)
        self.ln = nn.LayerNorm(8)
        self.c = nn.Linear(8, 8)
        self.d = nn.Linear(8, 8)

    def forward(self, x):
        x = self.b(self.up(self.a(x))).mean((2, 3))
        x = self.c(self.ln(x))
        return self.d(torch.sigmoid(x) * x)


def test_unsupported_layers_are_set_aside_with_a_reason():
    model = randomize_(Unsupported()).eval()
    space = fxoto.build_space(model, X, structures="channels")
    assert [g.nodes[0] for g in space.groups] == ["a"] * 8 + ["up"] * 8
    assert [str(m) for m in space.groups[9].members] == ["up.weight[:, 1:2]", "up.bias[1:2]"]  # [in, out, k, k]
    reasons = {e.nodes[0]: e.reason for e in space.excluded}
    assert "layer norm over the channels" in reasons["b"]
    # sigmoid(x) * x: a product of one space with itself couples nothing new, but a factor that does not keep
    # zero zero is one fxoto does not take (conservative: the other factor would zero the product)
    assert "not zero-invariant: 'sigmoid' (sigmoid) does not map zero to zero" in reasons["c"]
    assert "graph output" in reasons["d"]
    assert len(reasons) == len(space.excluded) == 3
    sub = assert_exact(space, [0, 3, 9, 10, 15], X)
    assert sub.get_submodule("up").weight.shape[:2] == (6, 5) and sub.get_submodule("b").in_channels == 5


def test_h2spg_over_transposed_convolution_channels():
    """A transposed convolution's output channels are weight slices along dim 1: H2SPG zeroes them."""
    torch.manual_seed(0)
    model = nn.Sequential(*conv_bn_relu(3, 6), nn.ConvTranspose2d(6, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                          nn.MaxPool2d(2), nn.Flatten(), nn.Linear(6 * 16, 10))
    s = fxoto.search(model, {"channels": 0.5}, X, structures="channels")
    assert any(m.dim == 1 for g in s.space.groups for m in g.members)
    opt = H2SPG(s.space, s.K, 0.05, warmup_steps=2, pruning_steps=4)
    g = train_eight_steps(model, opt)
    assert sorted(opt.redundant) == s.space.zero_groups() and len(opt.redundant) == 6
    assert_trained_subnet_exact(model, s, g)


def test_k_per_kind():
    space = fxoto.build_space(vgg(), X, structures="channels")
    assert fxoto.search(vgg(), {"channels": 0.25}, X, structures="channels").K == 8
    with pytest.raises(ValueError, match="has none"):
        fxoto.search(vgg(), {"operations": 1}, X, structures="channels")
    with pytest.raises(ValueError, match="kinds"):
        fxoto.space.resolve_k({"channel": 1}, space)
    both = fxoto.search(Residual(), {"operations": 1, "channels": 2}, X, structures="both")
    assert both.K == 3
    with pytest.raises(KTooLargeError, match="channel groups"):
        fxoto.search(vgg(), {"channels": 32}, X, structures="channels")  # every layer keeps a channel
    with pytest.raises(ValueError, match="structures"):
        fxoto.build_space(vgg(), X, structures="layers")


def assert_trained_subnet_exact(model, s, g: torch.Generator) -> None:
    """After training: the sub-network equals the trained super-network on new inputs and is smaller."""
    model.eval()
    x = torch.randn(4, 3, 8, 8, generator=g)
    with torch.no_grad():
        expected = model(x)
        sub = s.subnet()
        assert torch.allclose(sub(x), expected, atol=1e-5 * max(1.0, float(expected.abs().max())))
    assert size(sub) < size(model)


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
    assert_trained_subnet_exact(model, s, g)


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
    assert {stem: layer.channels for stem, layer in space.layers.items()} == {"_0": 6, "_5": 5, "_7": 7}
    first = space.slices[0]
    assert first.rows == (("_0", 0),) and first.entries == (("_1", 0), ("_2", 0), ("_3", 0))
    assert first.columns == (("_5", 0, 1),) and space.slices[7].columns == (("_7", 4, 4),)
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


def test_a_per_channel_module_used_twice_couples_the_channels_it_sees():
    """``act`` reads ``a``'s channels and ``b``'s: its weight entry c is channel c at both calls, so
    ``a``'s channel c and ``b``'s go together, and the entry is sliced once."""
    space = fxoto.build_space(randomize_(SharedPReLU()).eval(), X, structures="channels")
    assert [(s.rows, s.entries) for s in space.slices.values()] == [((("a", c), ("b", c)), (("act", c),))
                                                                     for c in range(4)]
    assert [(e.nodes, e.reason) for e in space.excluded] == [(("c",), "channels: its channels reach the graph output")]
    assert space.layers["a"].segment is None and space.layers["a"].again == ()
    sub = assert_exact(space, [1, 2], X)
    assert sub.act.num_parameters == 2 and sub.b.weight.shape == (2, 2, 1, 1)
    assert "all 4 output channels of node 'a'" in space.removal_problem(range(4))


class SharedNorm(nn.Module):
    """One batch norm after two convolutions, and a depthwise convolution called twice in a row."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        x = F.relu(self.bn(self.b(F.relu(self.bn(self.a(x))))))
        return self.head(self.dw(self.dw(x)).mean((2, 3)))


@pytest.mark.parametrize("seed", range(4))
def test_batch_norm_and_depthwise_convolution_called_twice_are_exact(seed):
    space = fxoto.build_space(randomize_(SharedNorm(), seed).eval(), X, structures="channels")
    assert [str(m) for m in space.groups[0].members] == [f"{p}[0:1]" for p in (
        "a.weight", "a.bias", "b.weight", "b.bias", "bn.weight", "bn.bias", "dw.weight", "dw.bias")]
    assert space.slices[0].entries == (("bn", 0), ("dw", 0))
    sub = assert_exact(space, space.sample_removal(0.5, seed=seed), X)
    assert sub.bn.num_features == sub.dw.groups == sub.a.out_channels == sub.b.out_channels


@pytest.mark.parametrize("foreach", [False, True])
def test_h2spg_delivers_k_per_kind(foreach):
    """K per kind: that many groups of each kind go to zero, and the sub-network is exact."""
    torch.manual_seed(0)
    model = Residual()
    s = fxoto.search(model, {"operations": 1, "channels": 3}, X, structures="both")
    opt = H2SPG(s.space, {"operations": 1, "channels": 3}, 0.05, warmup_steps=2, pruning_steps=4, foreach=foreach)
    g = train_eight_steps(model, opt)
    kinds = [s.space.groups[i].kind for i in opt.redundant]
    assert sorted(kinds) == ["channel"] * 3 + ["operation"]
    assert sorted(opt.redundant) == s.space.zero_groups()
    resumed = H2SPG(s.space, 1, 0.05, warmup_steps=2, pruning_steps=4, foreach=foreach)
    resumed.load_state_dict(opt.state_dict())
    assert resumed.K_per_kind == {"operation": 1, "channel": 3}
    model.eval()
    x = torch.randn(4, 3, 8, 8, generator=g)
    with torch.no_grad():
        expected = model(x)
        assert torch.allclose(s.subnet()(x), expected, atol=1e-5 * max(1.0, float(expected.abs().max())))


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
    ours = [g for g in space.groups if g.kind == "operation"]
    assert [(g.id, g.segment, g.nodes) for g in ours] == \
        ([(g.id, g.segment, g.nodes) for g in operations] if structures == "both" else [])
    assert all(set(a.members) <= set(b.members) for a, b in zip(ours, operations))  # nested channels hold the rest
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
    assert_groups_leave(space, ids, sub)
    event(f"channel groups removed: {'some' if any(space.groups[i].kind == 'channel' for i in ids) else 'none'}")
    event(splits_after_concats(model))
    event(emptied_parts(space, ids))


def test_summary_has_one_row_per_layer():
    from fxoto import viz

    text = viz.summary(fxoto.build_space(vgg(), X, structures="channels"))
    assert "g0..g7" in text and "8 channels, 7 can go" in text and "g16..g31" in text
    assert "0 GeZIGs over 3 segments and 32 channel groups over 3 layers" in text


def test_search_hands_k_per_kind_to_h2spg():
    s = fxoto.search(Residual(), {"operations": 1, "channels": 3}, X, structures="both")
    assert s.K == 4 and s.K_per_kind == {"operation": 1, "channel": 3}
    assert s.optimizer(total_steps=10).K_per_kind == {"operation": 1, "channel": 3}


def test_every_channel_of_a_layer_feeding_concats_erases_its_segment():
    """A dense layer's growth convolution feeds only concats: all of its channels going erases the
    dense layer, as its GeZIG would; elsewhere the last channel stays (a clear refusal)."""
    model = randomize_(DenseNetLike()).eval()
    space = fxoto.build_space(model, X, structures="channels")
    assert space.layers["layers_1_conv"].segment is not None
    assert space.layers["conv0"].segment is None  # its channels reach a one-input cat: no joint
    growth = [g.id for g in space.groups if g.nodes[0] == "layers_1_conv"]
    assert space.is_valid_removal(growth) and space.channel_erasures(growth)[0] == {space.layers["layers_1_conv"].segment}
    inner = [g.id for g in space.groups if g.nodes[0] == "layers_0_conv"][:2]
    sub = assert_exact(space, growth + inner, X)
    assert not any("layers.1" in name for name, _ in sub.named_modules())
    assert sub.get_submodule("norm5").num_features == 13 - 3 - 2
    first = [g.id for g in space.groups if g.nodes[0] == "conv0"]
    assert "its channels do not end at concat joints" in space.removal_problem(first)
    with pytest.raises(InvalidRemovalError, match="all 4 output channels of node 'conv0'"):
        space.construct_subnet(first)
    walk = space.greedy_removal(range(len(space.groups)))
    assert set(growth) <= set(walk) and not set(first) <= set(walk)
    assert space.is_valid_removal(walk)


def test_every_channel_of_a_layer_inside_an_erased_operation_group():
    space = fxoto.build_space(randomize_(Residual()).eval(), X, structures="both")
    inner = [g.id for g in space.groups if g.kind == "channel" and g.nodes[0] == "branch_0"]
    assert inner, "the branch's first convolution should get channel groups nested inside its operation group"
    assert "all 8 output channels of node 'branch_0'" in space.removal_problem(inner)
    assert space.is_valid_removal([0] + inner)  # erased with the branch: nothing left to keep
    assert_exact(space, [0] + inner, X)


class TokenMLP(nn.Module):
    """A transformer's MLP on [N, T, D] tokens: the hidden features lie on the last dim."""

    def __init__(self, d=6, hidden=8):
        super().__init__()
        self.embed = nn.Conv2d(3, d, 2, 2)
        self.fc1, self.fc2, self.head = nn.Linear(d, hidden), nn.Linear(hidden, d), nn.Linear(d, 3)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        t = t + self.fc2(F.gelu(self.fc1(t)))
        return self.head(t.mean(1))


def test_linear_over_tokens_slims_its_hidden_features():
    model = randomize_(TokenMLP()).eval()
    space = fxoto.build_space(model, X, structures="channels")
    assert [g.nodes[0] for g in space.groups] == ["fc1"] * 8
    assert space.slices[3].columns == (("fc2", 3, 1),)
    reasons = {e.nodes[0]: e.reason for e in space.excluded}
    assert "'flatten'" in reasons["embed"] and "graph output" in reasons["head"]  # flatten(2): no block
    sub = assert_exact(space, [0, 2, 3, 7], X)
    assert sub.get_submodule("fc1").out_features == sub.get_submodule("fc2").in_features == 4


@pytest.mark.parametrize("affine, stats", [(True, False), (False, False), (True, True), (False, True)])
def test_instance_norms(affine, stats):
    model = randomize_(nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.InstanceNorm2d(6, affine=affine,
                                                                                    track_running_stats=stats),
                                     nn.ReLU(), nn.Conv2d(6, 4, 1), nn.Flatten(), nn.Linear(4 * 64, 2)).eval())
    space = fxoto.build_space(model, X, structures="channels")
    if stats and not affine:  # eval mode: maps a zero channel to -mean/std
        assert "uses running statistics and has no affine variables" in space.excluded[0].reason
        return
    first = [g for g in space.groups if g.nodes[0] == "_0"]
    assert len(first) == 6 and len(first[0].members) == (4 if affine else 2)
    sub = assert_exact(space, [g.id for g in first[:4]], X)
    assert sub.get_submodule("1").num_features == 2


class SqueezeExcite(nn.Module):
    """torchvision's inverted residual with squeeze-and-excitation: x * sigmoid(fc2(relu(fc1(pool(x)))))."""

    def __init__(self, c=6, squeeze=3):
        super().__init__()
        self.expand, self.bn = nn.Conv2d(3, c, 1), nn.BatchNorm2d(c)
        self.fc1, self.fc2 = nn.Conv2d(c, squeeze, 1), nn.Conv2d(squeeze, c, 1)
        self.project = nn.Conv2d(c, 4, 1)

    def forward(self, x):
        x = F.silu(self.bn(self.expand(x)))
        scale = torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))
        return self.project(scale * x).mean((2, 3))


def test_squeeze_and_excitation_gates_go_with_the_channels_they_scale():
    model = randomize_(SqueezeExcite()).eval()
    space = fxoto.build_space(model, X, structures="channels")
    expand = [space.slices[g.id] for g in space.groups if g.nodes[0] == "expand"]
    assert len(expand) == 6 and expand[2].rows == (("expand", 2), ("fc2", 2))  # the gate's row goes too
    assert sorted(expand[2].columns) == [("fc1", 2, 1), ("project", 2, 1)]
    assert [g.nodes[0] for g in space.groups if g.nodes[0] != "expand"] == ["fc1"] * 3
    sub = assert_exact(space, [0, 2, 3, 6], X)
    assert sub.get_submodule("fc2").out_channels == sub.get_submodule("project").in_channels == 3


@pytest.mark.parametrize("structures", ["channels", "both"])
def test_zero_groups_finds_exactly_the_zeroed_groups(structures):
    """``zero_`` writes each parameter once and ``zero_groups`` reads each once (tens of thousands
    of channel groups): both agree with the group-by-group definition on the live tensors."""
    model = randomize_(Residual().eval())
    space = fxoto.build_space(model, X, structures=structures)
    assert space.zero_groups() == []
    ids = space.sample_removal(0.5, seed=3)
    space.zero_(ids)
    by_group = [g.id for g in space.groups if all(not t.any() for t in space.tensors(g))]
    assert space.zero_groups() == by_group == sorted(ids)
    with torch.no_grad():  # one row of a zeroed group's stem back: that group alone is no longer zero
        i = next(i for i in ids if space.groups[i].kind == "channel")
        space.tensors(i)[0].fill_(0.5)
    assert space.zero_groups() == sorted(set(ids) - {i})


class ConvInARow(nn.Module):
    """One convolution called twice in a row, ``conv(relu(conv(x)))``: a shared stem."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 5, 3, padding=1)
        self.conv = nn.Conv2d(5, 5, 3, padding=1)
        self.head = nn.Linear(5, 4)

    def forward(self, x):
        x = self.conv(torch.relu(self.conv(torch.relu(self.stem(x)))))
        return self.head(torch.relu(x).mean((2, 3)))


class CalledAgainLater(nn.Module):
    """A convolution called once more later in the chain, on another layer's channels."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.a = nn.Conv2d(6, 6, 3, padding=1)
        self.b = nn.Conv2d(6, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.head = nn.Linear(6 * 4, 4)

    def forward(self, x):
        x = F.relu(self.a(F.relu(self.stem(x))))
        x = F.relu(self.a(F.relu(self.bn(self.b(x)))))
        return self.head(F.adaptive_avg_pool2d(x, 2).flatten(1))


@pytest.mark.parametrize("make, shared", [(ConvInARow, "conv"), (CalledAgainLater, "a")])
def test_a_stem_called_at_several_places_has_one_group_per_channel(make, shared):
    """Channel c of every call of the module is one channel: its weight row and bias entry, held once."""
    space = fxoto.build_space(randomize_(make()).eval(), X, structures="channels")
    assert not [e for e in space.excluded if shared in e.nodes], space.excluded
    mine = [g for g in space.groups if g.nodes[0] == shared]
    assert len(mine) == space.layers[shared].channels == make().get_submodule(shared).out_channels
    assert space.layers[shared].again == (f"{shared}_1",) and space.layers[shared].segment is None
    for c, g in enumerate(mine):
        assert [str(m) for m in g.members] == [f"{shared}.weight[{c}:{c + 1}]", f"{shared}.bias[{c}:{c + 1}]"]
    for g in space.groups:
        assert len(set(g.members)) == len(g.members)
    assert not [n for n in space.layers if n.startswith(f"{shared}_")]  # one layer, at its first call


@pytest.mark.parametrize("make", [ConvInARow, CalledAgainLater])
@pytest.mark.parametrize("seed", range(6))
def test_random_removals_around_a_shared_stem_are_exact(make, seed):
    space = fxoto.build_space(randomize_(make(), seed).eval(), X, structures="channels")
    ids = space.sample_removal(0.5, seed=seed)
    assert_exact(space, ids, X)


@pytest.mark.parametrize("make, shared", [(ConvInARow, "conv"), (CalledAgainLater, "a")])
def test_the_largest_removal_around_a_shared_stem_is_exact(make, shared):
    space = fxoto.build_space(randomize_(make()).eval(), X, structures="channels")
    ids = space.greedy_max_removal()
    assert sum(space.groups[i].nodes[0] == shared for i in ids) == space.layers[shared].channels - 1
    sub = assert_exact(space, ids, X)
    assert sub.get_submodule(shared).out_channels == 1
    # The module stays one module with one weight: the calls that read other channels read slices of it.
    assert sum(1 for p in sub.parameters() if p is sub.get_submodule(shared).weight) == 1


def test_a_shared_stem_reads_its_own_channels_at_its_second_call():
    space = fxoto.build_space(randomize_(ConvInARow()).eval(), X, structures="channels")
    second = [i for i in range(len(space.groups)) if space.groups[i].nodes[0] == "conv"][1:3]
    assert space.slices[second[0]].columns == (("conv_1", 1, 1), ("head", 1, 1))  # both read its output
    sub = assert_exact(space, second, X)
    assert sub.conv.weight.shape == (3, 5, 3, 3)  # rows sliced once; the first call reads all 5 columns
    assert len([n for n in sub.graph.nodes if n.target is torch.index_select]) == 1


@pytest.mark.parametrize("make, shared", [(ConvInARow, "conv"), (CalledAgainLater, "a")])
def test_every_channel_of_a_shared_stem_cannot_go(make, shared):
    space = fxoto.build_space(make(), X, structures="channels")
    mine = [g.id for g in space.groups if g.nodes[0] == shared]
    assert space.is_valid_removal(mine[:-1])
    problem = space.removal_problem(mine)
    assert f"all {len(mine)} output channels of node '{shared}'" in problem and f"'{shared}_1'" in problem
    with pytest.raises(InvalidRemovalError, match=f"node '{shared}'"):
        space.construct_subnet(mine)


class SharedTwiceWithOtherUse(nn.Module):
    """A convolution called twice whose weight is also read functionally: set aside, with the reason."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.head = nn.Conv2d(3, 2, 1)

    def forward(self, x):
        y = self.conv(self.conv(x)) + F.conv2d(x, self.conv.weight)
        return self.head(y).mean((2, 3))


def test_a_shared_stem_whose_weight_is_read_elsewhere_is_set_aside():
    space = fxoto.build_space(SharedTwiceWithOtherUse(), X, structures="channels")
    reasons = {e.nodes[0]: e.reason for e in space.excluded}
    assert "shared variables: parameter 'conv.weight' is also used by node 'conv2d'" in reasons["conv"]


def test_a_shared_stem_before_a_concat_whose_norm_an_operation_group_slices_is_set_aside():
    """Found by hypothesis: one branch of a concat calls its module twice, the other branches are
    operation groups holding slices of the batch norm after the concat.  The batch norm stays with
    them (a channel group must not take the whole variable), so the shared stem is set aside."""
    b = lambda out, reuse=None: Branch(0, out, 1, False, "gelu", False, reuse=reuse)  # noqa: E731
    spec = NetSpec(in_channels=2, size=2, head_flatten=False, classes=1,
                   steps=(Step("cat", (b(1), b(2), b(1), b(1, (0, 2))), post_norm=True),))
    x = torch.randn(2, 2, 2, 2)
    space = fxoto.build_space(randomize(RandomSupNet(spec), 0), (x,), structures="both")
    assert [g.kind for g in space.groups] == ["operation"] * 2
    assert [str(m) for m in space.groups[0].members][2:] == ["post.0.0.weight[0:1]", "post.0.0.bias[0:1]"]
    reasons = {e.nodes[0]: e.reason for e in space.excluded if e.reason.startswith("channels: ")}
    assert "node 'post_0_0' lies in an operation group" in reasons["branches_0_2_0"]
    assert_exact(space, [0], x)


class GroupedTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.g, self.head = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 3, padding=1, groups=2), nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.g(torch.relu(self.g(self.a(x)))).mean((2, 3)))


class TransposedTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.t, self.head = nn.Conv2d(3, 4, 1), nn.ConvTranspose2d(4, 4, 3, padding=1), nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.t(torch.relu(self.t(torch.relu(self.a(x))))).mean((2, 3)))


class LinearTwiceOverTokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.fc, self.head = nn.Linear(5, 6), nn.Linear(6, 6), nn.Linear(6, 2)

    def forward(self, x):
        return self.head(torch.relu(self.fc(torch.relu(self.fc(torch.relu(self.a(x)))))))


def test_a_grouped_convolution_called_twice_is_set_aside():
    space = fxoto.build_space(GroupedTwice(), X, structures="channels")
    reasons = {e.nodes[0]: e.reason for e in space.excluded}
    assert "'g_1' (Conv2d) is a grouped convolution called again (first at 'g')" in reasons["g"]
    assert space.groups == []  # its groups tie 'a''s channels to its own


@pytest.mark.parametrize("make, x", [(TransposedTwice, X), (LinearTwiceOverTokens, torch.randn(3, 4, 5))])
@pytest.mark.parametrize("seed", range(3))
def test_transposed_and_token_linear_stems_called_twice_are_exact(make, x, seed):
    space = fxoto.build_space(randomize_(make(), seed).eval(), (x,), structures="channels")
    shared = "t" if make is TransposedTwice else "fc"
    assert space.layers[shared].again == (f"{shared}_1",)
    assert_exact(space, space.sample_removal(0.5, seed=seed) if seed < 2 else space.greedy_max_removal(), x)
