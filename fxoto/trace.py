"""Step 1 of the pipeline (DESIGN section 1): trace a model and record shapes.

``trace(model, example_inputs)`` returns the model's ``torch.fx.Graph``, every
node's output shape in ``node.meta["shape"]`` (``fxoto.shapes``).  Its
``call_module`` and ``get_attr`` targets are paths in the model itself: the
passes read modules and parameters from the model, and ``graph_module`` wraps
graph and model into a ``GraphModule`` (it generates and compiles Python code,
about as long as the trace itself) only where one is run or rewritten.

The user's model is never modified: the graph is traced in eval mode (the
sub-network is an inference graph; training-only branches such as Inception's
auxiliary logits stay outside the search space), each module's training
flag is restored afterwards, and a tensor made in ``forward`` is held by its
``get_attr`` node (``shapes.CONSTANT``), not stored on the model as fx does.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import inspect
import types
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx import _symbolic_trace as _fx
from torch.fx import traceback as fx_traceback

from fxoto.errors import DeviceError, ExampleInputError, UntraceableModelError
from fxoto.patterns import fold_patterns
from fxoto.shapes import CONSTANT, SHAPE, propagate_shapes

__all__ = ["SHAPE", "Tracer", "check_device", "graph_module", "propagate_shapes", "symbolic_trace", "trace"]

_PLAIN = frozenset({int, float, bool, str, type(None)})
_CALLS = frozenset({"call_function", "call_method", "call_module"})

# The parts of fx's ``Tracer.trace`` that ``Tracer.trace`` reuses; where a torch version lacks
# one of them, ``Tracer.trace`` is fx's own.
_FX_PARTS = all(hasattr(_fx, name) for name in (
    "_get_is_fx_tracing", "_set_is_fx_tracing", "_new_patcher", "_patch_wrapped_functions",
    "_autowrap_check", "_orig_module_call", "_orig_module_getattr", "_constant_attribute_types"))


class Tracer(fx.Tracer):
    """torch.fx tracer with a configurable leaf-module policy.

    ``leaf_modules`` holds module classes or qualified module paths that are
    kept as single ``call_module`` nodes instead of being traced through (for
    modules fx cannot trace, or that you want treated as one operation).

    ``trace``, ``call_module``, ``create_node`` and ``create_arg`` are fx's own
    with the bookkeeping a search space never reads left out (the scope copied
    at each module call, ``node_name_to_scope``), fast paths for the common
    arguments, the leaf decision taken once per module class, and the module
    tree walked once per trace; the graph, node names and ``nn_module_stack``
    are fx's.
    """

    def __init__(self, leaf_modules: Iterable[type | str] = ()):
        super().__init__()
        leaf_modules = tuple(leaf_modules)
        self.leaf_types = tuple(m for m in leaf_modules if isinstance(m, type))
        self.leaf_paths = frozenset(m for m in leaf_modules if isinstance(m, str))
        self._leaf_by_class: dict[type, bool] = {}  # apart from leaf_paths, a module's class decides
        self.constants: dict[str, torch.Tensor] = {}  # tensors made in forward, by get_attr target
        self._buffers: tuple[nn.Module, dict[int, str]] | None = None  # the root's buffers by id

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaf_paths:
            return True
        leaf = self._leaf_by_class.get(type(m))
        if leaf is None:
            leaf = isinstance(m, self.leaf_types) or super().is_leaf_module(m, module_qualified_name)
            self._leaf_by_class[type(m)] = leaf
        return leaf

    def trace(self, root, concrete_args: dict[str, Any] | None = None) -> fx.Graph:
        """fx's ``Tracer.trace`` for a module, its two walks over the module tree made one.

        fx maps each submodule to its path (``named_modules``) and each tensor
        held as a plain module attribute to its path (``tensor_attrs``, for
        constants the forward uses) in two recursive walks, a fifth of the
        trace (regnet_x_400mf: 1.7 of 8.4 ms); ``_module_tree`` makes both maps
        in one, five times faster.  The rest is fx's.  Functions, GraphModules
        (fx recompiles a lazy one first) and torch versions without the fx
        helpers used here are traced by fx's own ``trace``.
        """
        fn = getattr(type(root), self.traced_func_name, None)
        module = _FX_PARTS and isinstance(root, nn.Module) and not isinstance(root, fx.GraphModule)
        if not (module and isinstance(fn, types.FunctionType)):
            return super().trace(root, concrete_args)  # with fx's errors
        was_tracing = _fx._get_is_fx_tracing()
        _fx._set_is_fx_tracing(True)
        try:
            self.root = root
            self.root_module_name = root._get_name()
            self.submodule_paths, self.tensor_attrs = _module_tree(root)
            self.graph = fx.Graph(tracer_cls=type(self))
            code = fn.__code__
            self.graph._co_fields = {
                "co_name": code.co_name, "co_filename": code.co_filename, "co_firstlineno": code.co_firstlineno,
            }
            fn_globals = fn.__globals__  # read before it is patched
            fn, args = self.create_args_for_root(fn, True, concrete_args)
            parameter_proxy_cache: dict[str, fx.Proxy] = {}

            @functools.wraps(_fx._orig_module_getattr)
            def module_getattr_wrapper(mod, attr):
                return self.getattr(attr, _fx._orig_module_getattr(mod, attr), parameter_proxy_cache)

            @functools.wraps(_fx._orig_module_call)
            def module_call_wrapper(mod, *args, **kwargs):
                def forward(*args, **kwargs):
                    return _fx._orig_module_call(mod, *args, **kwargs)

                _fx._autowrap_check(
                    patcher, getattr(getattr(mod, "forward", mod), "__globals__", {}), self._autowrap_function_ids
                )
                return self.call_module(mod, forward, args, kwargs)

            with _fx._new_patcher() as patcher:
                # duplicate patches allowed, for nested traces
                patcher.patch_method(nn.Module, "__getattr__", module_getattr_wrapper, deduplicate=False)
                patcher.patch_method(nn.Module, "__call__", module_call_wrapper, deduplicate=False)
                _fx._patch_wrapped_functions(patcher)
                _fx._autowrap_check(patcher, fn_globals, self._autowrap_function_ids)
                for module in self._autowrap_search:
                    _fx._autowrap_check(patcher, module.__dict__, self._autowrap_function_ids)
                returns = inspect.get_annotations(inspect.unwrap(fn)).get("return", None)
                self.create_node("output", "output", (self.create_arg(fn(*args)),), {}, type_expr=returns)
            self.submodule_paths = None
        finally:
            _fx._set_is_fx_tracing(was_tracing)
        return self.graph

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
        if kind in _CALLS and (args or kwargs):
            # fx's Graph.create_node walks a call's arguments (pytree) for a raw SymInt to warn
            # about, which a trace without symbolic shapes never holds: the node is made bare and
            # its arguments set through Node's setters, which record them as Node() does.
            node = self.graph.create_node(kind, target, (), {}, name, type_expr)
            node.args = args
            if kwargs:
                node.kwargs = kwargs
        else:
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
        if isinstance(a, torch.Tensor) and not isinstance(a, nn.Parameter):
            return self._constant(a)
        return super().create_arg(a)

    def _constant(self, a: torch.Tensor) -> fx.Node:
        """A ``get_attr`` node for tensor ``a``: a buffer's or model attribute's path, or, for a tensor made in
        ``forward``, a fresh ``_tensor_constantN`` name as fx gives it.  fx stores such a tensor
        on the root module, the user's model; here the node holds it (``CONSTANT``) and the
        model stays as it was.  ``graph_module`` puts it on the GraphModule."""
        if self._buffers is None or self._buffers[0] is not self.root:
            self._buffers = (self.root, {id(t): name for name, t in self.root.named_buffers()})
        buffer = self._buffers[1].get(id(a))
        if buffer is not None:  # fx looks buffers up first
            return self.create_node("get_attr", buffer, (), {})
        qualname = self.tensor_attrs.get(a)
        if qualname is None:
            i = len(self.constants)
            while hasattr(self.root, f"_tensor_constant{i}") or f"_tensor_constant{i}" in self.constants:
                i += 1
            qualname = self.tensor_attrs[a] = f"_tensor_constant{i}"
            self.constants[qualname] = a
        node = self.create_node("get_attr", qualname, (), {})
        if qualname in self.constants:
            node.meta[CONSTANT] = a
        return node


def _module_tree(root: nn.Module) -> tuple[dict[nn.Module, str], dict[Any, str]]:
    """fx's ``submodule_paths`` and ``tensor_attrs`` of ``root`` in one walk over ``_modules``.

    The walk is fx's ``collect_tensor_attrs``: depth first, each module's
    ``__dict__`` before its children, a module shared by two parents visited
    under each (the last path a constant is met under wins), a cycle a
    ``RecursionError``.  A module's path is the first it is met under, as in
    ``named_modules``.  A type whose value is not a constant (a tensor, a
    script object, ...) is not asked about again: most modules hold only
    such values (flags, hook dicts) and are passed over in one set test.
    """
    paths: dict[nn.Module, str] = {}
    constants: dict[Any, str] = {}
    plain: set[type] = set()

    def visit(module: nn.Module, path: str) -> None:
        paths.setdefault(module, path)
        prefix = f"{path}." if path else ""
        attrs = module.__dict__
        if not plain.issuperset(map(type, attrs.values())):
            for name, value in attrs.items():
                if type(value) not in plain:
                    if isinstance(value, _fx._constant_attribute_types):
                        constants[value] = prefix + name
                    else:
                        plain.add(type(value))
        seen = set()
        for name, child in module._modules.items():
            if child is not None and child not in seen:
                seen.add(child)
                visit(child, prefix + name)

    visit(root, "")
    return paths, constants


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
    constants = {n.target: n.meta[CONSTANT] for n in graph.nodes if n.op == "get_attr" and CONSTANT in n.meta}
    try:  # fx copies get_attr targets from the root: the constants stand on the model for that moment only
        for name, value in constants.items():
            setattr(model, name, value)
        gm = fx.GraphModule(model, graph, class_name=type(model).__name__)
        if isinstance(graph._codegen, fx.graph._PyTreeCodeGen):  # a torch.export capture: the model's own
            gm._in_spec = graph._codegen.pytree_info.in_spec     # arguments in, its output structure out
            gm._out_spec = graph._codegen.pytree_info.out_spec
    finally:
        for name in constants:
            delattr(model, name)
    gm.training = model.training  # its submodules are the model's own: leave their flags alone
    return gm


def check_device(model: nn.Module) -> torch.device | None:
    """The one device that holds all of the model's parameters and buffers (None if it has none).

    Raises ``DeviceError`` for a model spread over several devices (the rewrite
    and H2SPG put every tensor they make beside the one it works with, which
    needs one device) or holding ``meta`` tensors (no values to search).
    """
    found: dict[torch.device, str] = {}
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        found.setdefault(t.device, name)
    what = type(model).__name__
    if any(d.type == "meta" for d in found):
        name = next(n for d, n in found.items() if d.type == "meta")
        raise DeviceError(
            f"{what} holds tensors on the meta device (first: '{name}'): they have shapes but no values, so there is "
            f"nothing to search or train. Materialise the model first, e.g. model.to_empty(device='cpu') and then "
            f"load_state_dict(...)."
        )
    if len(found) > 1:
        where = ", ".join(f"'{n}' on {d}" for d, n in found.items())
        raise DeviceError(
            f"{what} is spread over {len(found)} devices ({where}): fxoto searches a model held on one device. "
            f"Move it first, e.g. model.to('{next(iter(found))}')."
        )
    return next(iter(found), None)


TRACERS = ("auto", "fx", "export")


def trace(
    model: nn.Module,
    example_inputs: Sequence[Any],
    leaf_modules: Iterable[type | str] = (),
    concrete_args: dict[str, Any] | None = None,
    *,
    example_kwargs: dict[str, Any] | None = None,
    tracer: str = "auto",
    op_table=None,
) -> fx.Graph:
    """Capture ``model`` and annotate each node with its output shape.

    ``tracer``: ``"fx"`` (symbolic tracing), ``"export"`` (``torch.export``, non-strict:
    ``fxoto.export``) or ``"auto"``: fx, and where fx cannot trace the model (or the
    example needs keyword arguments), ``torch.export``.  When both fail, one
    ``UntraceableModelError`` gives both reasons.
    """
    if tracer not in TRACERS:
        raise ValueError(f"tracer must be one of {', '.join(map(repr, TRACERS))}; got {tracer!r}")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    check_device(model)
    fx_error = None
    if tracer == "fx" or (tracer == "auto" and not example_kwargs):
        if tracer == "fx" and example_kwargs:
            raise ValueError("tracer='fx' takes positional example inputs only; use tracer='export' for example_kwargs")
        try:
            graph = symbolic_trace(model, leaf_modules, concrete_args)
        except UntraceableModelError as exc:
            if tracer == "fx":
                raise
            fx_error = exc
        else:
            propagate_shapes(graph, model, example_inputs)
            fold_patterns(graph, model)
            return graph
    graph = _export(model, example_inputs, example_kwargs, op_table, fx_error)
    fold_patterns(graph, model)
    return graph


def _export(model, example_inputs, example_kwargs, op_table, fx_error) -> fx.Graph:
    from fxoto.export import export_graph
    from fxoto.roles import DEFAULT_TABLE

    try:
        with _eval_mode(model):
            graph, _ = export_graph(model, example_inputs, example_kwargs, op_table or DEFAULT_TABLE)
    except Exception as exc:  # torch.export raises many kinds (UserError, RuntimeError, ...)
        if isinstance(exc, ExampleInputError):
            raise
        where = _export_failure_site(exc)
        said = f"torch.export could not capture {type(model).__name__}{where} ({type(exc).__name__}: " \
               f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''})"
        if fx_error is None:
            raise UntraceableModelError(said + ". Hint: check that the model runs on the example inputs, "
                                        "or try tracer='fx'.") from exc
        raise UntraceableModelError(
            f"neither capture took {type(model).__name__}.\n  - {fx_error}\n  - {said}. Hint: keep the failing "
            f"modules opaque with leaf_modules=... (fx), or make the forward exportable (torch.export)."
        ) from exc
    return graph


def _export_failure_site(exc: Exception) -> str:
    """`` in module 'layers.0.attn'``: the deepest frame of the failure that lies in a module's forward."""
    tb, site = exc.__traceback__, ""
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        if isinstance(owner, nn.Module) and tb.tb_frame.f_code.co_name == "forward":
            site = f" in a {type(owner).__name__}.forward"
        tb = tb.tb_next
    return site
