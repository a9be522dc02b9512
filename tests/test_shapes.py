"""Recorded shapes (``fxoto.shapes``) are the shapes a real run produces.

The shape rules stand in for running conv, pooling, linear, arithmetic,
``flatten`` and ``cat``; each test draws an op with its arguments, runs it on
real tensors, and checks the recorded shape, or that recording fails exactly
when the real run fails.
"""

import operator

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from fxoto.shapes import SHAPE, propagate_shapes
from fxoto.trace import symbolic_trace
from strategies import supernets
from util import real_shapes


class Call(nn.Module):
    """``fn(x, *args, **kwargs)`` as a model, so that it traces to one node."""

    def __init__(self, fn, *args, **kwargs):
        super().__init__()
        self.fn, self.args, self.kwargs = fn, args, kwargs

    def forward(self, x):
        return self.fn(x, *self.args, **self.kwargs)


class Call2(Call):
    """``fn(x, y, *args, **kwargs)``."""

    def forward(self, x, y):
        return self.fn(x, y, *self.args, **self.kwargs)


def check(model: nn.Module, *inputs: torch.Tensor) -> None:
    """The recorded shapes equal the real ones, or recording fails as the real run does."""
    graph = symbolic_trace(model)
    try:
        with torch.no_grad():
            model(*inputs)
    except RuntimeError:
        with pytest.raises(RuntimeError):
            propagate_shapes(graph, model, inputs)
        return
    propagate_shapes(graph, model, inputs)
    assert {n.name: n.meta[SHAPE] for n in graph.nodes} == real_shapes(graph, model, inputs)


sizes = st.integers(1, 9)


@given(st.sampled_from([1, 2, 3]), st.integers(1, 3), st.data())
def test_convolution(nd, groups, data):
    conv = [nn.Conv1d, nn.Conv2d, nn.Conv3d][nd - 1]
    kernel = tuple(data.draw(st.integers(1, 4)) for _ in range(nd))
    padding = data.draw(st.one_of(st.sampled_from(["valid", "same"]), st.tuples(*[st.integers(0, 2)] * nd)))
    stride = 1 if padding == "same" else tuple(data.draw(st.integers(1, 3)) for _ in range(nd))
    dilation = tuple(data.draw(st.integers(1, 2)) for _ in range(nd))
    mode = data.draw(st.sampled_from(["zeros", "reflect"]))
    model = conv(2 * groups, groups * data.draw(st.integers(1, 2)), kernel, stride, padding, dilation, groups,
                 bias=data.draw(st.booleans()), padding_mode=mode)
    channels = data.draw(st.sampled_from([2 * groups, 2 * groups + 1]))
    batch = data.draw(st.sampled_from([(), (2,)]))
    check(model, torch.randn(*batch, channels, *(data.draw(sizes) for _ in range(nd))))


@given(st.data())
def test_pooling(data):
    kernel = data.draw(st.one_of(st.integers(1, 4), st.tuples(st.integers(1, 4), st.integers(1, 4))))
    stride = data.draw(st.one_of(st.none(), st.integers(1, 3), st.tuples(st.integers(1, 3), st.integers(1, 3))))
    padding = data.draw(st.integers(0, 2))
    ceil = data.draw(st.booleans())
    pool = data.draw(st.sampled_from([
        nn.MaxPool2d(kernel, stride, padding, dilation=data.draw(st.integers(1, 2)), ceil_mode=ceil),
        nn.AvgPool2d(kernel, stride, padding, ceil_mode=ceil),
        nn.AdaptiveAvgPool2d(data.draw(st.one_of(st.integers(1, 3), st.tuples(st.none() | st.integers(1, 3), st.integers(1, 3))))),
        Call(F.adaptive_avg_pool2d, data.draw(st.tuples(st.integers(1, 3), st.integers(1, 3)))),
    ]))
    batch = data.draw(st.sampled_from([(), (2,)]))
    check(pool, torch.randn(*batch, 3, data.draw(sizes), data.draw(sizes)))


@given(st.data())
def test_linear_and_flatten(data):
    shape = data.draw(st.lists(st.integers(1, 4), min_size=1, max_size=4))
    rank = len(shape)
    start = data.draw(st.integers(-rank, rank - 1))
    end = data.draw(st.integers(-rank, rank - 1))
    model = data.draw(st.sampled_from([
        nn.Linear(data.draw(st.sampled_from([shape[-1], shape[-1] + 1])), 3),
        Call(torch.flatten, start, end),
        Call(torch.flatten, start_dim=start),
        Call(lambda x, *a, **k: x.flatten(*a, **k), start, end_dim=end),
    ]))
    check(model, torch.randn(shape))


@given(st.data())
def test_broadcasting_arithmetic(data):
    a = data.draw(st.lists(st.integers(1, 3), max_size=4))
    b = [data.draw(st.sampled_from([1, n])) for n in a][data.draw(st.integers(0, len(a))):]
    if data.draw(st.booleans()):
        a, b = b, a
    dtypes = data.draw(st.sampled_from([(torch.float32, torch.float32), (torch.float64, torch.float32), (torch.int64, torch.int64)]))
    fn = data.draw(st.sampled_from([operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.mul]))
    x, y = torch.ones(a, dtype=dtypes[0]), torch.ones(b, dtype=dtypes[1])
    check(Call2(fn), x, y)
    check(Call(fn, data.draw(st.sampled_from([2, 0.5]))), x)


@given(st.data())
def test_cat(data):
    shape = data.draw(st.lists(st.integers(1, 3), min_size=1, max_size=4))
    dim = data.draw(st.integers(-len(shape), len(shape) - 1))
    other = list(shape)
    other[dim] = data.draw(st.integers(1, 3))
    if data.draw(st.booleans()):
        other[data.draw(st.integers(0, len(shape) - 1))] += 1  # may not match
    use_kwarg = data.draw(st.booleans())
    model = Call2(lambda x, y: torch.cat([x, y, x], dim=dim) if use_kwarg else torch.cat((x, y), dim))
    check(model, torch.randn(shape), torch.randn(other))


@given(st.sampled_from([F.relu, torch.relu, F.relu6, F.silu, F.gelu, F.hardswish, F.hardsigmoid, torch.sigmoid, torch.tanh,
                        F.dropout, F.leaky_relu, F.elu, lambda x: x.relu(), lambda x: x.sigmoid()]),
       st.sampled_from([torch.float32, torch.float64]))
def test_elementwise(fn, dtype):
    check(Call(fn), torch.ones(2, 3, dtype=dtype))
    check(Call(fn, inplace=True) if fn in (F.relu, F.relu6, F.silu, F.hardswish) else Call(fn), torch.ones(4, dtype=dtype))


def test_elementwise_on_integers_runs_the_op():
    check(Call(F.relu), torch.ones(2, 3, dtype=torch.int64))
    check(Call(torch.sigmoid), torch.ones(2, 3, dtype=torch.int64))  # int in, float out


@given(supernets())
def test_recorded_shapes_of_random_supernets(net):
    model, x = net
    check(model, x)


def test_ops_without_a_rule_run_on_meta():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Upsample(scale_factor=2), nn.PixelShuffle(2), nn.ConvTranspose2d(1, 2, 2, 2))
    check(model, torch.randn(1, 3, 8, 8))


class Counter(nn.Module):
    """A leaf module without a shape rule that writes to its buffer."""

    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        return x[:, :2]


def test_modules_without_a_rule_leave_the_models_state_alone():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), Counter()).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    graph = symbolic_trace(model, leaf_modules=[Counter])
    propagate_shapes(graph, model, (torch.randn(2, 3, 8, 8),))
    assert all(torch.equal(before[k], v) and not v.is_meta for k, v in model.state_dict().items())
    assert [n.meta[SHAPE] for n in graph.nodes][-1] == torch.Size([2, 2, 6, 6])


class Positive(nn.Module):
    """A data-dependent shape: no meta kernel can give it."""

    def forward(self, x):
        return torch.nonzero(x > 0).float() + 1.0


def test_data_dependent_shapes_run_on_real_tensors():
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2), Positive()).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(1, 1, 3, 3)
    graph = symbolic_trace(model)
    propagate_shapes(graph, model, (x,))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert {n.name: n.meta[SHAPE] for n in graph.nodes} == real_shapes(graph, model, (x,))


def test_forward_hooks_are_run():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    for m in model:
        m.register_forward_hook(lambda module, args, out: out[:, :2])
    check(model, torch.randn(1, 3, 8, 8))
