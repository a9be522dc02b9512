"""The op table: what each fx node is to the search space (DESIGN section 2).

One table answers three questions about every operation, so the rules live in
one place instead of ``if`` chains through the passes:

* ``role``: stem, accessory, joint or unknown (paper, section 3.1);
* ``zero``: does it map a zero input to zero by itself (``PRESERVES``), only
  when its own variables are zero too (``OWN_VARIABLES``), or not (``BREAKS``);
* ``channel``: how a channel index flows through it, for the channel
  bookkeeping after a ``cat`` (DESIGN sections 3 and 6).

The default table is ``DEFAULT_TABLE``.  Extend it for your own modules and
functions without touching fxoto::

    table = fxoto.DEFAULT_TABLE.extended(modules={MyGate: OpRule(Role.UNKNOWN)})
    fxoto.search(model, K, x, op_table=table)

A rule is an ``OpRule`` or a function ``(node, module) -> OpRule`` for rules that
depend on configuration (a batch norm with or without affine parameters, a
grouped convolution).  Anything missing from the table is unknown: no group
crosses it.
"""

from __future__ import annotations

import enum
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Union

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torchvision.models.swin_transformer import shifted_window_attention
from torchvision.ops import stochastic_depth

from fxoto.patterns import gelu_tanh, rms_norm
from fxoto.shapes import submodule


class Role(enum.Enum):
    STEM = "stem"
    ACCESSORY = "accessory"
    JOINT = "joint"
    UNKNOWN = "unknown"


class Zero(enum.Enum):
    PRESERVES = "preserves"  # f(0) = 0 whatever its variables
    OWN_VARIABLES = "own"  # f(x) = 0 when its own variables are zero (conv, linear, affine norms)
    BREAKS = "breaks"  # f(0) != 0 in general (sigmoid, + constant, norm without affine)


class Channel(enum.Enum):
    ELEMENTWISE = "elementwise"  # same shape, position by position
    PER_CHANNEL = "per_channel"  # per-channel variables along dim 1 (batch norm, PReLU)
    SPATIAL = "spatial"  # channel dim 1 kept, other dims resized (pooling, upsample)
    FLATTEN = "flatten"  # merges the channel dim with the dims after it
    REDUCE = "reduce"  # reduces dims other than the channel dim (mean over H, W)
    CONSUME = "consume"  # a stem reading the channel dim (conv, linear): slice its weight
    OPAQUE = "opaque"  # anything else: channels cannot be followed


class Joint(enum.Enum):
    ADD = "add"
    CAT = "cat"


@dataclass(frozen=True)
class OpRule:
    role: Role
    zero: Zero = Zero.BREAKS
    channel: Channel = Channel.OPAQUE
    joint: Joint | None = None
    # For CONSUME: the input dim the stem reads (1 for conv, -1 for linear) and
    # the weight dim holding one slice per input feature.
    reads: int | None = None
    weight_in_dim: int | None = None


Rule = Union[OpRule, Callable[[fx.Node, Any], OpRule]]

UNKNOWN = OpRule(Role.UNKNOWN)
ELEMENTWISE = OpRule(Role.ACCESSORY, Zero.PRESERVES, Channel.ELEMENTWISE)
BREAKS_ELEMENTWISE = OpRule(Role.ACCESSORY, Zero.BREAKS, Channel.ELEMENTWISE)
SPATIAL = OpRule(Role.ACCESSORY, Zero.PRESERVES, Channel.SPATIAL)
FLATTEN = OpRule(Role.ACCESSORY, Zero.PRESERVES, Channel.FLATTEN)
RESHAPE = OpRule(Role.ACCESSORY, Zero.PRESERVES, Channel.OPAQUE)
REDUCE = OpRule(Role.ACCESSORY, Zero.PRESERVES, Channel.REDUCE)
ADD = OpRule(Role.JOINT, Zero.PRESERVES, Channel.OPAQUE, joint=Joint.ADD)
CAT = OpRule(Role.JOINT, Zero.PRESERVES, Channel.OPAQUE, joint=Joint.CAT)
LINEAR = OpRule(Role.STEM, Zero.OWN_VARIABLES, Channel.CONSUME, reads=-1, weight_in_dim=1)
# A linear layer that keeps its weight as [in, out] (GPT-2's ``Conv1D``): output rows along dim 1.
LINEAR_T = OpRule(Role.STEM, Zero.OWN_VARIABLES, Channel.CONSUME, reads=-1, weight_in_dim=0)


def is_transposed_linear(m: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (``x @ weight + bias``, weight [in, out]), known by its qualified
    name so that fxoto need not import ``transformers``."""
    return type(m).__name__ == "Conv1D" and type(m).__module__ == "transformers.pytorch_utils"


# By (transposed, grouped): the weight's input dim, and whether channels can be followed.
# A grouped convolution mixes no channels across groups, but erasing channels
# is exact only when whole groups go: not followed (DESIGN 6).
_CONV = {
    (transposed, grouped): OpRule(Role.STEM, Zero.OWN_VARIABLES, Channel.OPAQUE if grouped else Channel.CONSUME,
                                  reads=1, weight_in_dim=0 if transposed else 1)
    for transposed in (False, True) for grouped in (False, True)
}
AFFINE_NORM = OpRule(Role.ACCESSORY, Zero.OWN_VARIABLES, Channel.PER_CHANNEL)
# Without affine variables, eval mode maps 0 to -mean/std: not zero.
PLAIN_NORM = OpRule(Role.ACCESSORY, Zero.BREAKS, Channel.OPAQUE)


# A depthwise convolution (one filter per channel, groups == in == out channels) maps
# channel c to channel c alone: per-channel variables, like a batch norm's, sliced with
# the channels after a cat (DESIGN 3, 6).
DEPTHWISE = OpRule(Role.STEM, Zero.OWN_VARIABLES, Channel.PER_CHANNEL)


def _conv(node: fx.Node, m: nn.Module) -> OpRule:
    transposed = isinstance(m, nn.modules.conv._ConvTransposeNd)
    if not transposed and m.groups > 1 and m.groups == m.in_channels == m.out_channels:
        return DEPTHWISE
    return _CONV[transposed, m.groups != 1]


def _batch_norm(node: fx.Node, m: nn.Module) -> OpRule:
    return AFFINE_NORM if m.affine else PLAIN_NORM


def _layer_norm(node: fx.Node, m: nn.Module) -> OpRule:
    # LN(0) = bias: zero when its own variables are. It mixes channels.
    affine = getattr(m, "elementwise_affine", getattr(m, "affine", False))
    return OpRule(Role.ACCESSORY, Zero.OWN_VARIABLES if affine else Zero.PRESERVES)


def _prelu(node: fx.Node, m: nn.Module) -> OpRule:
    channel = Channel.ELEMENTWISE if m.num_parameters == 1 else Channel.PER_CHANNEL
    return OpRule(Role.ACCESSORY, Zero.PRESERVES, channel)


def _functional_stem(node: fx.Node, m: None) -> OpRule:
    groups = node.kwargs.get("groups", node.args[6] if len(node.args) > 6 else 1)
    channel = Channel.CONSUME if groups == 1 else Channel.OPAQUE
    return OpRule(Role.STEM, Zero.OWN_VARIABLES, channel, reads=1, weight_in_dim=1)


def _functional_linear(node: fx.Node, m: None) -> OpRule:
    return LINEAR


def _functional_norm(node: fx.Node, m: None) -> OpRule:
    has_weight = any(isinstance(a, fx.Node) and a.op == "get_attr" for a in node.args[1:])
    has_weight |= any(isinstance(a, fx.Node) for a in node.kwargs.values())
    return OpRule(Role.ACCESSORY, Zero.OWN_VARIABLES if has_weight else Zero.PRESERVES)


def _add(node: fx.Node, m: None) -> OpRule:
    # torch.add(x, y, alpha=a) scales one operand: dropping the other is not exact.
    return ADD if node.kwargs.get("alpha", 1) == 1 else UNKNOWN


FIXED = "fxoto.fixed"  # node.meta: computed from variables and constants alone, never from a graph input
FACTORS = "fxoto.factors"  # node.meta of a product: its operands computed from variables (see _scale)


def _operands(node: fx.Node) -> list:
    if node.op == "call_method":
        return list(node.args[:2])
    return [node.args[0] if node.args else node.kwargs.get("input"),
            node.args[1] if len(node.args) > 1 else node.kwargs.get("other")]


def _fixed(arg) -> bool:
    return not isinstance(arg, fx.Node) or arg.meta.get(FIXED, False)


def _scale(node: fx.Node, m: None) -> OpRule:
    """``x * c``: a scaling by a number, a buffer, a parameter or anything computed from
    variables alone (``gamma.view(1, -1, 1, 1)``, ``softplus(gain)``) maps zero to zero.

    Such operands are the product's factors (``node.meta["fxoto.factors"]``): they
    are no data input of the product, and their variables are the product's own.
    A product of two activations is no joint (DESIGN 2) and is left to the segment
    pass (two data inputs).
    """
    operands = _operands(node)
    if sum(not _fixed(a) for a in operands) == 1:
        node.meta[FACTORS] = tuple(a for a in operands if isinstance(a, fx.Node) and _fixed(a))
    return ELEMENTWISE


def _quotient(node: fx.Node, m: None) -> OpRule:
    """``x / c`` with ``c`` fixed (a number, or computed from variables alone) scales ``x``."""
    x, c = _operands(node)
    if _fixed(x) or not _fixed(c) or node.kwargs.get("rounding_mode") is not None:
        return UNKNOWN
    if isinstance(c, fx.Node):
        node.meta[FACTORS] = (c,)
    return ELEMENTWISE


def _view(node: fx.Node, m: None) -> OpRule:
    # view/reshape can be followed like a flatten only when the merged size is
    # given as -1 (a literal size would go stale once channels are removed).
    sizes = node.args[1:]
    if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
        sizes = tuple(sizes[0])
    return FLATTEN if len(sizes) == 2 and sizes[-1] == -1 else RESHAPE


def _getitem(node: fx.Node, m: None) -> OpRule:
    # Output 0 of attention is zero when its variables are; output 1 (the
    # attention weights) is not.
    source = node.args[0]
    if isinstance(source, fx.Node) and source.meta.get("fxoto.attention") and node.args[1] != 0:
        return OpRule(Role.ACCESSORY, Zero.BREAKS)
    return RESHAPE


def _attention(node: fx.Node, m: nn.Module) -> OpRule:
    node.meta["fxoto.attention"] = True
    return OpRule(Role.STEM, Zero.OWN_VARIABLES)


_STEMS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_ACTIVATIONS = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Hardswish, nn.Tanh, nn.ELU,
    nn.Mish, nn.Hardtanh, nn.Softshrink, nn.Hardshrink, nn.Tanhshrink, nn.CELU, nn.SELU,
)
_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
_POOLS = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample,
    nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d, nn.ZeroPad2d,
)

_DEFAULT_MODULES: dict[type, Rule] = {
    **{t: _conv for t in _STEMS},
    nn.Linear: LINEAR,
    nn.modules.batchnorm._BatchNorm: _batch_norm,
    nn.LayerNorm: _layer_norm,
    nn.GroupNorm: _layer_norm,
    nn.PReLU: _prelu,
    **{t: ELEMENTWISE for t in _ACTIVATIONS + _DROPOUTS + (nn.Identity,)},
    **{t: SPATIAL for t in _POOLS},
    nn.Flatten: FLATTEN,
    nn.Sigmoid: BREAKS_ELEMENTWISE,
    nn.Hardsigmoid: BREAKS_ELEMENTWISE,
    nn.Softmax: UNKNOWN,
    # out_proj(attention): zero when all its variables are.
    nn.MultiheadAttention: _attention,
    # A lookup: no operation group starts at it (its input is no activation); fxoto.channels
    # reads its weight's columns as the output channels of a stem.
    nn.Embedding: UNKNOWN,
}

_ELEMENTWISE_FUNCTIONS = (
    F.relu, torch.relu, F.relu_, torch.relu_, F.relu6, F.gelu, F.silu, F.hardswish,
    F.leaky_relu, F.elu, F.mish, F.tanh, torch.tanh, F.hardtanh, F.dropout, F.dropout1d,
    F.dropout2d, F.dropout3d, torch.clone, operator.neg, torch.neg,
)
_SPATIAL_FUNCTIONS = (
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.interpolate,
)

_DEFAULT_FUNCTIONS: dict[Callable, Rule] = {
    **{f: ELEMENTWISE for f in _ELEMENTWISE_FUNCTIONS},
    **{f: SPATIAL for f in _SPATIAL_FUNCTIONS},
    torch.flatten: FLATTEN,
    stochastic_depth: ELEMENTWISE,
    # Swin's attention, wrapped for fx: its output is proj(...), zero when its variables
    # (qkv and proj weights and biases, v2's logit scale) are.  Its second tensor input,
    # the relative-position bias, is computed from a table and read only here.
    shifted_window_attention: OpRule(Role.STEM, Zero.OWN_VARIABLES),
    torch.sigmoid: BREAKS_ELEMENTWISE,
    F.sigmoid: BREAKS_ELEMENTWISE,
    F.hardsigmoid: BREAKS_ELEMENTWISE,
    F.conv1d: _functional_stem,
    F.conv2d: _functional_stem,
    F.conv3d: _functional_stem,
    F.linear: _functional_linear,
    F.layer_norm: _functional_norm,
    F.group_norm: _functional_norm,
    operator.add: _add,
    operator.iadd: _add,
    torch.add: _add,
    operator.mul: _scale,
    torch.mul: _scale,
    operator.truediv: _quotient,
    torch.div: _quotient,
    operator.getitem: _getitem,
    torch.permute: RESHAPE,
    torch.transpose: RESHAPE,
    torch.reshape: _view,
    torch.mean: REDUCE,
    # RMSNorm folded into one call (fxoto.patterns): zero stays zero; its channels are
    # followed by fxoto.channels (weight entries per channel, the denominator kept).
    rms_norm: OpRule(Role.ACCESSORY, Zero.PRESERVES, Channel.OPAQUE),
    gelu_tanh: ELEMENTWISE,
    torch.cat: CAT,
    torch.concat: CAT,
    torch.concatenate: CAT,
}

_DEFAULT_METHODS: dict[str, Rule] = {
    **{name: ELEMENTWISE for name in ("relu", "relu_", "contiguous", "clone", "tanh", "neg", "to")},
    "flatten": FLATTEN,
    "view": _view,
    "reshape": _view,
    **{name: RESHAPE for name in ("permute", "transpose", "squeeze", "unsqueeze", "chunk", "split")},
    "mean": REDUCE,
    "add": _add,
    "add_": _add,
    "mul": _scale,
    "mul_": _scale,
    "div": _quotient,
    "div_": _quotient,
    "sigmoid": BREAKS_ELEMENTWISE,
}


@dataclass(frozen=True)
class OpTable:
    """Rules by module class (matched along the MRO), function, and method name."""

    modules: Mapping[type, Rule] = field(default_factory=dict)
    functions: Mapping[Callable, Rule] = field(default_factory=dict)
    methods: Mapping[str, Rule] = field(default_factory=dict)

    def __post_init__(self):
        for name in ("modules", "functions", "methods"):
            object.__setattr__(self, name, MappingProxyType(dict(getattr(self, name))))

    def extended(self, modules=None, functions=None, methods=None) -> OpTable:
        """A new table with these rules added (or replacing existing ones)."""
        return OpTable(
            {**self.modules, **(modules or {})},
            {**self.functions, **(functions or {})},
            {**self.methods, **(methods or {})},
        )

    def rule(self, node: fx.Node, root: nn.Module) -> OpRule:
        """The rule for one node (``root`` owns the graph's targets); ``UNKNOWN`` when the table has none."""
        module = None
        if node.op == "call_module":
            module = submodule(root, node.target)
            found = self.modules.get(type(module))  # the class itself, else the nearest base
            if found is None:
                found = next((self.modules[t] for t in type(module).__mro__ if t in self.modules), None)
            if found is None and is_transposed_linear(module):
                found = LINEAR_T
        elif node.op == "call_function":
            found = self.functions.get(node.target)
        elif node.op == "call_method":
            found = self.methods.get(node.target)
        else:
            found = None
        if found is None:
            return UNKNOWN
        return found if isinstance(found, OpRule) else found(node, module)


DEFAULT_TABLE = OpTable(_DEFAULT_MODULES, _DEFAULT_FUNCTIONS, _DEFAULT_METHODS)
