"""Step 1 of the pipeline (DESIGN section 1): trace a model and record shapes.

``trace(model, example_inputs)`` returns a ``torch.fx.GraphModule`` that shares
the model's submodules (and so its parameters: H2SPG trains the user's own
tensors), with every node's output shape in ``node.meta["shape"]``.

Shapes come from running the graph on the ``meta`` device: no arithmetic is
done, so a 224x224 ResNet-50 costs milliseconds.  The user's model is never
modified: the graph is traced in eval mode (the sub-network is an inference
graph; training-only branches such as Inception's auxiliary logits stay outside
the search space) and each module's training flag is restored afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.nn.utils.stateless import _reparametrize_module

from fxoto.errors import UntraceableModelError

SHAPE = "shape"  # node.meta key: torch.Size, tuple of those, or None


class Tracer(fx.Tracer):
    """torch.fx tracer with a configurable leaf-module policy.

    ``leaf_modules`` holds module classes or qualified module paths that are
    kept as single ``call_module`` nodes instead of being traced through (for
    modules fx cannot trace, or that you want treated as one operation).
    """

    def __init__(self, leaf_modules: Iterable[type | str] = ()):
        super().__init__()
        leaf_modules = tuple(leaf_modules)
        self.leaf_types = tuple(m for m in leaf_modules if isinstance(m, type))
        self.leaf_paths = frozenset(m for m in leaf_modules if isinstance(m, str))
        self.module_path: list[str] = []

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, self.leaf_types) or module_qualified_name in self.leaf_paths:
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        # On failure the stack is left as is: its top names the failing module.
        self.module_path.append(self.path_of_module(m))
        out = super().call_module(m, forward, args, kwargs)
        self.module_path.pop()
        return out


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def symbolic_trace(
    model: nn.Module,
    leaf_modules: Iterable[type | str] = (),
    concrete_args: dict[str, Any] | None = None,
) -> fx.GraphModule:
    """Trace ``model`` in eval mode; raise ``UntraceableModelError`` with a hint."""
    tracer = Tracer(leaf_modules)
    try:
        with _eval_mode(model):
            graph = tracer.trace(model, concrete_args=concrete_args)
    except Exception as exc:  # fx raises TraceError, TypeError, RuntimeError ...
        where = tracer.module_path[-1] if tracer.module_path else "<root>"
        where = where or f"<root: {type(model).__name__}>"
        raise UntraceableModelError(
            f"torch.fx could not trace {type(model).__name__}: the failure is in module "
            f"'{where}' ({type(exc).__name__}: {exc}). Hint: pass that module's class or path "
            f"in leaf_modules=... to keep it as one opaque operation, or fix data-dependent "
            f"Python control flow with concrete_args=..."
        ) from exc
    name = type(model).__name__
    gm = fx.GraphModule(model, graph, class_name=name)
    gm.training = model.training  # its submodules are the model's own: leave their flags alone
    return gm


def _to_meta(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return torch.empty_like(value, device="meta")
    if isinstance(value, (list, tuple)):
        return type(value)(_to_meta(v) for v in value)
    if isinstance(value, dict):
        return {k: _to_meta(v) for k, v in value.items()}
    return value


def _shape_of(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.shape
    if isinstance(value, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in value):
        return tuple(_shape_of(v) for v in value)
    return None


# Modules whose output has their input's shape: not worth running, even on meta
# (batch norm on meta goes through Python decompositions, 2 ms a call).
_SHAPE_KEEPING = (
    nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.ReLU, nn.ReLU6,
    nn.LeakyReLU, nn.PReLU, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid,
    nn.Tanh, nn.ELU, nn.Mish, nn.Identity, nn.Dropout, nn.Dropout2d, nn.Dropout1d,
    nn.AlphaDropout,
)


class _ShapeRecorder(fx.Interpreter):
    """Run the graph and keep only each node's output shape (``node.meta["shape"]``)."""

    def call_module(self, target, args, kwargs):
        if args and isinstance(args[0], torch.Tensor) and args[0].is_meta:
            if isinstance(self.fetch_attr(target), _SHAPE_KEEPING):
                return args[0]
        return super().call_module(target, args, kwargs)

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        n.meta[SHAPE] = _shape_of(out)
        return out


def propagate_shapes(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> None:
    """Record every node's output shape, on the meta device when the ops allow it."""
    state = dict(gm.named_parameters(remove_duplicate=False))
    state.update(gm.named_buffers(remove_duplicate=False))
    try:
        meta_state = {k: torch.empty_like(v, device="meta") for k, v in state.items()}
        with torch.no_grad(), _reparametrize_module(gm, meta_state):
            _ShapeRecorder(gm).run(*_to_meta(tuple(example_inputs)))
        return
    except (NotImplementedError, RuntimeError):
        pass  # an op without a meta kernel: fall back to real tensors, buffers cloned
    cloned = {k: v.detach().clone() for k, v in gm.named_buffers(remove_duplicate=False)}
    with torch.no_grad(), _reparametrize_module(gm, cloned):
        _ShapeRecorder(gm).run(*example_inputs)


def trace(
    model: nn.Module,
    example_inputs: Sequence[Any],
    leaf_modules: Iterable[type | str] = (),
    concrete_args: dict[str, Any] | None = None,
) -> fx.GraphModule:
    """Trace ``model`` and annotate each node with its output shape."""
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    gm = symbolic_trace(model, leaf_modules, concrete_args)
    propagate_shapes(gm, example_inputs)
    return gm
