"""Step 1 of the pipeline (DESIGN section 1): trace a model and record shapes.

``trace(model, example_inputs)`` returns the model's ``torch.fx.Graph``, every
node's output shape in ``node.meta["shape"]`` (``fxoto.shapes``).  Its
``call_module`` and ``get_attr`` targets are paths in the model itself: the
passes read modules and parameters from the model, and ``graph_module`` wraps
graph and model into a ``GraphModule`` (it generates and compiles Python code,
about as long as the trace itself) only where one is run or rewritten.

The user's model is never modified: the graph is traced in eval mode (the
sub-network is an inference graph; training-only branches such as Inception's
auxiliary logits stay outside the search space) and each module's training
flag is restored afterwards.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx import traceback as fx_traceback

from fxoto.errors import UntraceableModelError
from fxoto.shapes import SHAPE, propagate_shapes

__all__ = ["SHAPE", "Tracer", "graph_module", "propagate_shapes", "symbolic_trace", "trace"]

_PLAIN = frozenset({int, float, bool, str, type(None)})


class Tracer(fx.Tracer):
    """torch.fx tracer with a configurable leaf-module policy.

    ``leaf_modules`` holds module classes or qualified module paths that are
    kept as single ``call_module`` nodes instead of being traced through (for
    modules fx cannot trace, or that you want treated as one operation).

    ``call_module``, ``create_node`` and ``create_arg`` are fx's own with the
    bookkeeping a search space never reads left out (the scope copied at each
    module call, ``node_name_to_scope``), fast paths for the common arguments,
    and the leaf decision taken once per module class; the graph, node names
    and ``nn_module_stack`` are fx's.
    """

    def __init__(self, leaf_modules: Iterable[type | str] = ()):
        super().__init__()
        leaf_modules = tuple(leaf_modules)
        self.leaf_types = tuple(m for m in leaf_modules if isinstance(m, type))
        self.leaf_paths = frozenset(m for m in leaf_modules if isinstance(m, str))
        self._leaf_by_class: dict[type, bool] = {}  # apart from leaf_paths, a module's class decides

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaf_paths:
            return True
        leaf = self._leaf_by_class.get(type(m))
        if leaf is None:
            leaf = isinstance(m, self.leaf_types) or super().is_leaf_module(m, module_qualified_name)
            self._leaf_by_class[type(m)] = leaf
        return leaf

    def call_module(self, m, forward, args, kwargs):
        path = self.submodule_paths.get(m) if self.submodule_paths else None
        if path is None:
            path = self.path_of_module(m)
        # On failure the stack is left as is: its top names the failing module.
        calls = self.num_calls.get(path, 0)
        key = f"{path}@{calls}" if calls else path
        self.module_stack[key] = (path, type(m))
        self.num_calls[path] = calls + 1
        if self.is_leaf_module(m, path):
            out = self.create_proxy("call_module", path, args, kwargs)
        else:
            out = forward(*args, **kwargs)
        self.module_stack.popitem()
        return out

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None):
        if self.record_stack_traces or self.check_mutable_operations or fx_traceback.has_preserved_node_meta():
            return super().create_node(kind, target, args, kwargs, name, type_expr)
        node = self.graph.create_node(kind, target, args, kwargs, name, type_expr)
        if self.module_stack:
            node.meta["nn_module_stack"] = collections.OrderedDict(self.module_stack)
        return node

    def create_arg(self, a: Any) -> Any:
        kind = type(a)
        if kind is fx.Proxy:
            return a.node
        if kind is tuple:
            return tuple([self.create_arg(v) for v in a])
        if kind is list:
            return [self.create_arg(v) for v in a]
        if kind is dict and all(type(k) is str for k in a):
            return {k: self.create_arg(v) for k, v in a.items()}
        if kind in _PLAIN:
            return a
        return super().create_arg(a)


def _modules(model: nn.Module) -> list[nn.Module]:
    """``list(model.modules())`` through the ``_modules`` dicts (four times faster)."""
    found, seen = [model], {id(model)}
    for module in found:
        for child in module._modules.values():
            if child is not None and id(child) not in seen:
                seen.add(id(child))
                found.append(child)
    return found


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    modules = _modules(model)
    if not any(m.training for m in modules):
        yield
        return
    flags = [(m, m.training) for m in modules]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            if m.training != flag:
                m.training = flag


def symbolic_trace(
    model: nn.Module,
    leaf_modules: Iterable[type | str] = (),
    concrete_args: dict[str, Any] | None = None,
) -> fx.Graph:
    """Trace ``model`` in eval mode; raise ``UntraceableModelError`` with a hint."""
    tracer = Tracer(leaf_modules)
    try:
        with _eval_mode(model):
            return tracer.trace(model, concrete_args=concrete_args)
    except Exception as exc:  # fx raises TraceError, TypeError, RuntimeError ...
        where = next(reversed(tracer.module_stack.values()))[0] if tracer.module_stack else "<root>"
        where = where or f"<root: {type(model).__name__}>"
        raise UntraceableModelError(
            f"torch.fx could not trace {type(model).__name__}: the failure is in module "
            f"'{where}' ({type(exc).__name__}: {exc}). Hint: pass that module's class or path "
            f"in leaf_modules=... to keep it as one opaque operation, or fix data-dependent "
            f"Python control flow with concrete_args=..."
        ) from exc


def graph_module(model: nn.Module, graph: fx.Graph) -> fx.GraphModule:
    """``graph`` as a runnable ``GraphModule`` that shares ``model``'s submodules and parameters."""
    gm = fx.GraphModule(model, graph, class_name=type(model).__name__)
    gm.training = model.training  # its submodules are the model's own: leave their flags alone
    return gm


def trace(
    model: nn.Module,
    example_inputs: Sequence[Any],
    leaf_modules: Iterable[type | str] = (),
    concrete_args: dict[str, Any] | None = None,
) -> fx.Graph:
    """Trace ``model`` and annotate each node with its output shape."""
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    graph = symbolic_trace(model, leaf_modules, concrete_args)
    propagate_shapes(graph, model, example_inputs)
    return graph
