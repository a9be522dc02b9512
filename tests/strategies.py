"""Hypothesis strategies: random super-networks, and random valid removals in them.

A super-network is drawn as a small program (``NetSpec``): a list of steps,
each reading earlier values.  ``RandomSupNet`` runs that program; torch.fx
traces its loops away, so fxoto sees an ordinary DAG with:

* conv blocks (conv, optional batch norm, optional activation), optionally
  pre-activated (batch norm, ReLU, conv: the DenseNet ``cat -> BN -> ReLU -> conv`` chain);
* ``add`` joints of 2 to 4 branches, with or without an identity operand;
* ``cat`` joints of 2 to 4 branches, optionally followed by batch norm and ReLU, and then
  optionally split again (``torch.split`` with sizes, at the branches' bounds or anywhere, or
  ``torch.chunk``) into parts read by depthwise convolutions, batch norms, activations or 1x1
  convolutions and concatenated again (MixNet's mixed convolutions): a removal can empty a part;
* pooling and upsampling steps, values with several consumers, nested and
  residual branches, and steps whose value nobody reads;
* layers called at two or more places: a branch that reuses an earlier
  branch's module (in two branches of one joint, across an ``add``, before and
  after a ``cat``), and a branch applied twice in a row (a conv reading a
  concat and then its own output);
* a head: global pool or flatten (channel blocks of H*W columns), then linear.

Shrinking goes towards fewer, narrower steps, so a failure reads as a small net.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from hypothesis import strategies as st
from torch import nn

ACTIVATIONS = {
    "none": nn.Identity, "relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU,
    "relu_inplace": lambda: nn.ReLU(inplace=True),  # ResNet's habit: the rewrite must keep it safe
}


@dataclass(frozen=True)
class Branch:
    source: int  # index of the value it reads
    out: int  # output channels
    kernel: int
    norm: bool
    act: str
    pre_act: bool  # BN -> ReLU -> conv, reading the source's channels
    reuse: tuple[int, int] | None = None  # (step, branch): call that branch's module instead of a new one
    twice: bool = False  # apply the module twice in a row (its output has its input's channels and size)


@dataclass(frozen=True)
class Step:
    kind: str  # "block", "add", "cat", "pool", "up"
    branches: tuple[Branch, ...] = ()
    identity: int | None = None  # for "add": an earlier value added as is
    source: int = 0  # for "pool" / "up"
    post_norm: bool = False  # for "cat": BN + ReLU after the concat
    parts: tuple[int, ...] = ()  # for "cat": split the concat again into parts of these sizes ...
    chunk: bool = False  # ... with torch.chunk(len(parts)) instead of torch.split(parts)
    part_ops: tuple[str, ...] = ()  # what reads each part (PART_OPS), before the parts' concat
    mix_norm: bool = False  # BN after the parts' concat


@dataclass(frozen=True)
class NetSpec:
    in_channels: int
    size: int
    steps: tuple[Step, ...]
    head_flatten: bool
    classes: int

    def channels(self) -> list[int]:
        ch = [self.in_channels]
        for step in self.steps:
            if step.kind in ("pool", "up"):
                ch.append(ch[step.source])
            elif step.kind == "cat":
                ch.append(sum(b.out for b in step.branches))
            else:
                ch.append(step.branches[0].out)
        return ch

    def sizes(self) -> list[int]:
        sz = [self.size]
        for step in self.steps:
            if step.kind == "up":
                sz.append(sz[step.source] * 2)
            elif step.kind == "pool":
                sz.append(sz[step.source])
            elif step.kind == "add" and step.identity is not None:
                sz.append(sz[step.identity])
            else:
                sz.append(sz[step.branches[0].source])
        return sz


PART_OPS = ("dw3", "dw5_bn", "bn_relu", "conv", "none")


def _part_module(op: str, c: int) -> nn.Module:
    """What reads one part of a split concat: depthwise convolutions, per-channel ops, a 1x1 convolution."""
    if op == "dw3":
        return nn.Conv2d(c, c, 3, padding=1, groups=c)
    if op == "dw5_bn":
        return nn.Sequential(nn.Conv2d(c, c, 5, padding=2, groups=c), nn.BatchNorm2d(c))
    if op == "bn_relu":
        return nn.Sequential(nn.BatchNorm2d(c), nn.ReLU())
    return nn.Conv2d(c, c, 1) if op == "conv" else nn.Identity()


def chunk_sizes(c: int, n: int) -> tuple[int, ...]:
    """The sizes of ``torch.chunk`` of ``c`` channels into (at most) ``n`` parts."""
    return tuple(len(part) for part in torch.arange(c).chunk(n))


def _branch_module(b: Branch, in_ch: int, out_size: int, in_size: int) -> nn.Module:
    layers: list[nn.Module] = []
    if b.pre_act:
        layers += [nn.BatchNorm2d(in_ch), nn.ReLU()]
    if out_size != in_size:  # resample to the step's spatial size first
        layers.append(nn.Upsample(size=out_size) if out_size > in_size else nn.AdaptiveAvgPool2d(out_size))
    layers.append(nn.Conv2d(in_ch, b.out, b.kernel, padding=b.kernel // 2))
    if b.norm:
        layers.append(nn.BatchNorm2d(b.out))
    layers.append(ACTIVATIONS[b.act]())
    return nn.Sequential(*layers)


class RandomSupNet(nn.Module):
    """Runs a ``NetSpec``; every branch is a plain ``nn.Sequential`` (a reused one is the same object)."""

    def __init__(self, spec: NetSpec):
        super().__init__()
        self.spec = spec
        ch, sz = spec.channels(), spec.sizes()
        self.branches = nn.ModuleList()
        self.post = nn.ModuleList()
        self.parts = nn.ModuleList()
        for i, step in enumerate(spec.steps):
            out_size = sz[i + 1]
            modules = nn.ModuleList()
            for b in step.branches:
                if b.reuse is None:
                    modules.append(_branch_module(b, ch[b.source], out_size, sz[b.source]))
                else:
                    at, j = b.reuse
                    modules.append((modules if at == len(self.branches) else self.branches[at])[j])
            self.branches.append(modules)
            post = nn.Sequential(nn.BatchNorm2d(ch[i + 1]), nn.ReLU()) if step.post_norm else nn.Identity()
            self.post.append(post)
            parts = [_part_module(op, c) for op, c in zip(step.part_ops, step.parts)]
            self.parts.append(nn.ModuleList(parts + ([nn.BatchNorm2d(ch[i + 1])] if step.mix_norm else [])))
        last_ch, last_sz = ch[-1], sz[-1]
        features = last_ch * last_sz * last_sz if spec.head_flatten else last_ch
        self.pool = nn.Identity() if spec.head_flatten else nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(features, spec.classes)

    def forward(self, x):
        values = [x]
        for step, branches, post, parts in zip(self.spec.steps, self.branches, self.post, self.parts):
            if step.kind == "pool":
                values.append(nn.functional.max_pool2d(values[step.source], 3, 1, 1))
            elif step.kind == "up":
                values.append(nn.functional.interpolate(values[step.source], scale_factor=2.0))
            elif step.kind == "cat":
                h = post(torch.cat([_call(f, b, values) for f, b in zip(branches, step.branches)], 1))
                if step.parts:
                    split = torch.chunk(h, len(step.parts), 1) if step.chunk else torch.split(h, list(step.parts), 1)
                    h = torch.cat([parts[j](split[j]) for j in range(len(step.parts))], 1)
                    if step.mix_norm:
                        h = parts[-1](h)
                values.append(h)
            else:
                outs = [_call(f, b, values) for f, b in zip(branches, step.branches)]
                total = values[step.identity] if step.identity is not None else outs.pop(0)
                for o in outs:
                    total = total + o
                values.append(total)
        return self.head(torch.flatten(self.pool(values[-1]), 1))


def _call(f: nn.Module, b: Branch, values: list[torch.Tensor]) -> torch.Tensor:
    out = f(values[b.source])
    return f(out) if b.twice else out


@st.composite
def net_specs(draw, max_steps: int = 6, max_width: int = 6, split_every_cat: bool = False) -> NetSpec:
    in_channels = draw(st.integers(1, 3))
    size = draw(st.integers(2, 6))
    steps: list[Step] = []
    ch, sz = [in_channels], [size]

    cats: set[int] = set()  # values made by a concat
    drawn: list[tuple[int, int, Branch, int]] = []  # (step, position, branch, output size) of each new module

    def branch(j: int, out: int | None = None, size: int | None = None) -> Branch:
        """Branch ``j`` of the step: ``out`` channels (any if None) at spatial ``size`` (its source's if None)."""
        # Reuse an earlier module where one fits: a source with its input channels and size, its output.
        fits = [(i, k, b) for i, k, b, s in drawn
                if (out is None or b.out == out) and s == (sz[b.source] if size is None else size)]
        if fits and draw(st.integers(0, 3)) == 0:
            i, k, b = draw(st.sampled_from(fits))
            sources = [v for v, (c, z) in enumerate(zip(ch, sz)) if c == ch[b.source] and z == sz[b.source]]
            return replace(b, source=draw(st.sampled_from(sources)), reuse=(i, k))
        src = draw(st.one_of(st.just(len(ch) - 1), st.integers(0, len(ch) - 1)))  # the latest value more often
        out_size = sz[src] if size is None else size
        # A square module (as many channels out as in) can be called again on its own output;
        # after a concat that is a consumer read at two places with different channels.
        square = draw(st.integers(0, 1 if src in cats else 2)) == 0
        width = out if out is not None else ch[src] if square else draw(st.integers(1, max_width))
        b = Branch(
            source=src,
            out=width,
            kernel=draw(st.sampled_from([1, 3])),
            norm=draw(st.booleans()),
            act=draw(st.sampled_from(sorted(ACTIVATIONS))),
            pre_act=src > 0 and draw(st.booleans()),
            # Twice in a row: the module's output must fit its own input.
            twice=width == ch[src] and out_size == sz[src] and draw(st.booleans()),
        )
        drawn.append((len(steps), j, b, out_size))
        return b

    def branches(n: int, out: int | None = None, size: int | None = None) -> tuple[Branch, ...]:
        """``n`` branches resampled to one size: ``size``, or the first branch's source's."""
        first = branch(0, out, size)
        size = sz[first.source] if size is None else size
        return (first,) + tuple(branch(j, out, size) for j in range(1, n))

    for _ in range(draw(st.integers(1, max_steps))):
        kind = draw(st.sampled_from(["add", "cat", "add", "cat", "block", "pool", "up", "add", "cat"]))
        if kind in ("pool", "up"):
            source = draw(st.integers(0, len(ch) - 1))
            if kind == "up" and sz[source] > 8:
                kind = "pool"
            step = Step(kind, source=source)
        elif kind == "block":
            step = Step("block", branches(1))
        elif kind == "add":
            out = draw(st.integers(1, max_width))
            same = [i for i, c in enumerate(ch) if c == out]
            identity = draw(st.sampled_from(same)) if same and draw(st.booleans()) else None
            n = draw(st.integers(1 if identity is not None else 2, 4))
            step = Step("add", branches(n, out, None if identity is None else sz[identity]), identity=identity)
        else:
            n = draw(st.integers(2, 4))
            step = Step("cat", branches(n), post_norm=draw(st.booleans()))
            if split_every_cat or draw(st.integers(0, 2)) == 0:  # split again, MixNet's way
                step = _split_again(draw, step)
        steps.append(step)
        if step.kind == "cat":
            cats.add(len(steps))
        spec = NetSpec(in_channels, size, tuple(steps), False, 2)
        ch, sz = spec.channels(), spec.sizes()
    return NetSpec(in_channels, size, tuple(steps), draw(st.booleans()), draw(st.integers(1, 3)))


def _split_again(draw, step: Step) -> Step:
    """The concat of ``step`` split again into 2 or more parts, each read by its own op."""
    outs = [b.out for b in step.branches]
    c = sum(outs)
    how = draw(st.sampled_from(["bounds", "anywhere", "chunk"]))
    if how == "bounds":  # each branch its own part: erasing a branch empties a part
        parts = tuple(outs)
    elif how == "anywhere" and c >= 2:
        cuts = draw(st.sets(st.integers(1, c - 1), min_size=1, max_size=min(3, c - 1)))
        bounds = [0, *sorted(cuts), c]
        parts = tuple(b - a for a, b in zip(bounds, bounds[1:]))
    else:
        parts = chunk_sizes(c, draw(st.integers(2, 4)))
    if len(parts) < 2:
        return step
    ops = tuple(draw(st.sampled_from(PART_OPS)) for _ in parts)
    return replace(step, parts=parts, chunk=how == "chunk", part_ops=ops, mix_norm=draw(st.booleans()))


@torch.no_grad()
def randomize(model: nn.Module, seed: int, dtype=torch.float32) -> nn.Module:
    """Random weights, biases, norm variables and statistics; eval mode."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        for p in m.parameters(recurse=False):
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.running_mean is not None:
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model.to(dtype).eval()


@st.composite
def supernets(draw, dtype=torch.float32, **kw):
    """A random super-network (eval mode, random values) and an input for it."""
    return _randomized(draw, draw(net_specs(**kw)), RandomSupNet, dtype, st.integers(1, 3))


def _randomized(draw, spec, build, dtype, batch) -> tuple[nn.Module, torch.Tensor]:
    """``build(spec)`` with random values (``randomize``, a drawn seed) and an input of a drawn batch size."""
    seed = draw(st.integers(0, 2**16))
    model = randomize(build(spec), seed, dtype)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(draw(batch), spec.in_channels, spec.size, spec.size, generator=g).to(dtype)
    return model, x


def splits_after_concats(model: nn.Module) -> str:
    """For hypothesis' ``event``: whether a drawn ``RandomSupNet`` splits a concat again."""
    return f"a split after a concat: {'yes' if any(step.parts for step in model.spec.steps) else 'no'}"


def emptied_parts(space, ids) -> str:
    """For hypothesis' ``event``: whether a removal leaves a split's part with no channel."""
    segments = {space.groups[i].segment for i in ids if space.groups[i].kind == "operation"}
    segments |= space.channel_erasures(ids)[0]
    return f"a part emptied: {'yes' if space.emptied(segments)[1] else 'no'}"


@st.composite
def valid_removals(draw, space) -> list[int]:
    """A random valid removal: groups tried in a random order, kept while valid."""
    order = draw(st.permutations(range(len(space.groups))))
    return space.greedy_removal(order, draw(st.integers(0, len(space.groups))))


# -- plain chains, for channel groups --------------------------------------------------------

@dataclass(frozen=True)
class Layer:
    """One layer of a chain: ``kind`` with ``out`` channels; ``arg`` its variant (see ``_layer_module``)."""

    kind: str  # "conv", "grouped", "depthwise", "transposed", "norm", "act", "pool", "prelu", "again", "gate"
    out: int
    arg: str | int = ""
    twice: bool = False  # a square convolution called again on its own output (a shared layer)


@dataclass(frozen=True)
class ChainSpec:
    in_channels: int
    size: int
    layers: tuple[Layer, ...]
    head: str  # "pool", "flatten", "hidden_bn", "hidden_ln", "tokens"
    hidden: int
    classes: int


NORMS = ("bn", "gn", "in", "in_affine", "in_stats", "in_affine_stats", "bn_plain")


class Gate(nn.Module):
    """Squeeze-and-excitation: ``x * sigmoid(fc2(relu(fc1(pool(x)))))`` (``arg``: the squeezed width)."""

    def __init__(self, c: int, squeeze: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, squeeze, 1), nn.Conv2d(squeeze, c, 1)

    def forward(self, x):
        pooled = nn.functional.adaptive_avg_pool2d(x, 1)
        return x * torch.sigmoid(self.fc2(nn.functional.relu(self.fc1(pooled))))


def _layer_module(layer: Layer, c: int) -> nn.Module:
    if layer.kind in ("conv", "grouped", "depthwise"):
        groups = {"conv": 1, "grouped": layer.arg, "depthwise": c}[layer.kind]
        return nn.Conv2d(c, layer.out, 3, padding=1, groups=groups)
    if layer.kind == "transposed":
        return nn.ConvTranspose2d(c, layer.out, 3, padding=1)
    if layer.kind == "act":
        return ACTIVATIONS[layer.arg]()
    if layer.kind == "pool":
        return nn.MaxPool2d(3, 1, 1)
    if layer.kind == "prelu":
        return nn.PReLU(c)
    if layer.kind == "gate":
        return Gate(c, layer.arg)
    kind, groups = (layer.arg, 1) if isinstance(layer.arg, str) else ("gn", layer.arg)
    if kind == "gn":
        return nn.GroupNorm(groups, c)
    if kind.startswith("bn"):
        return nn.BatchNorm2d(c, affine=kind == "bn")
    return nn.InstanceNorm2d(c, affine="affine" in kind, track_running_stats="stats" in kind)


class ChainNet(nn.Module):
    """Runs a ``ChainSpec``: the layers in a row (an "again" layer calls an earlier module once more), then the head."""

    def __init__(self, spec: ChainSpec):
        super().__init__()
        self.spec = spec
        self.layers = nn.ModuleList()
        c = spec.in_channels
        for layer in spec.layers:
            self.layers.append(self.layers[layer.arg] if layer.kind == "again" else _layer_module(layer, c))
            c = layer.out
        h, hidden = spec.hidden, spec.head
        features = c * spec.size * spec.size if hidden == "flatten" else c
        if hidden in ("pool", "flatten"):
            self.head = nn.Linear(features, spec.classes)
        elif hidden == "tokens":
            self.head = nn.Sequential(nn.Linear(c, h), nn.GELU(), nn.Linear(h, spec.classes))
        else:
            norm = nn.BatchNorm1d(h) if hidden == "hidden_bn" else nn.LayerNorm(h)
            self.head = nn.Sequential(nn.Linear(c, h), norm, nn.ReLU(), nn.Linear(h, spec.classes))

    def forward(self, x):
        for layer, m in zip(self.spec.layers, self.layers):
            x = m(x)
            if layer.twice:
                x = m(x)
        if self.spec.head == "tokens":  # features on the last dim: [N, H*W, C]
            return self.head(x.flatten(2).transpose(1, 2)).mean(1)
        if self.spec.head != "flatten":
            x = nn.functional.adaptive_avg_pool2d(x, 1)
        return self.head(torch.flatten(x, 1))


@st.composite
def chain_specs(draw, max_layers: int = 7, max_width: int = 6) -> ChainSpec:
    c = in_channels = draw(st.integers(1, 3))
    layers: list[Layer] = []
    convs: list[int] = []  # indices of square convolutions (called again by "again")
    for _ in range(draw(st.integers(1, max_layers))):
        kind = draw(st.sampled_from(["conv", "conv", "grouped", "depthwise", "transposed", "norm", "norm", "act",
                                     "pool", "prelu", "again", "gate"]))
        divisors = [d for d in range(2, c + 1) if c % d == 0]
        fits = [i for i in convs if layers[i].out == c]
        if kind == "grouped" and divisors:
            g = draw(st.sampled_from(divisors))
            layer = Layer("grouped", g * draw(st.integers(1, 2)), g)
        elif kind == "depthwise":
            layer = Layer("depthwise", c)
        elif kind == "norm":
            layer = Layer("norm", c, draw(st.sampled_from(NORMS + tuple(divisors))))
        elif kind == "act":
            layer = Layer("act", c, draw(st.sampled_from(sorted(ACTIVATIONS))))
        elif kind in ("pool", "prelu"):
            layer = Layer(kind, c)
        elif kind == "gate":
            layer = Layer("gate", c, draw(st.integers(1, 3)))
        elif kind == "again" and fits:
            layer = Layer("again", c, draw(st.sampled_from(fits)))
        else:
            out = draw(st.integers(1, max_width))
            layer = Layer("transposed" if kind == "transposed" else "conv", out,
                          twice=out == c and draw(st.booleans()))
            if layer.kind == "conv" and out == c:
                convs.append(len(layers))
        layers.append(layer)
        c = layer.out
    head = draw(st.sampled_from(["pool", "flatten", "hidden_bn", "hidden_ln", "tokens"]))
    return ChainSpec(in_channels, draw(st.integers(2, 4)), tuple(layers), head, draw(st.integers(1, 5)),
                     draw(st.integers(1, 3)))


@st.composite
def chains(draw, dtype=torch.float32, **kw):
    """A random plain chain (eval mode, random values and statistics) and an input for it."""
    return _randomized(draw, draw(chain_specs(**kw)), ChainNet, dtype, st.integers(2, 3))
