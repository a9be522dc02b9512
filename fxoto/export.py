"""Step 1, second front end (DESIGN section 6b): capture a model with ``torch.export``.

``torch.fx.symbolic_trace`` cannot take most current transformers (Python control flow
over shapes, item assignment on proxies, ...); ``torch.export.export(strict=False)``
captures them as a graph of ATen operations.  ``export_graph`` hands the rest of the
pipeline the same things the fx front end does, so that every later pass is the one
it already is:

* a ``torch.fx.Graph`` whose ``get_attr`` and ``call_module`` targets are paths in the
  user's own model (the exported graph names parameters by their fully qualified
  names), every node with ``node.meta["shape"]``;
* the calls of the leaf modules the op table knows (``nn.Linear``, convolutions,
  norms, ...), which ``torch.export`` inlines into ATen operations, folded back into one
  ``call_module`` node each (``_fold_modules``), as fx would have recorded them;
* the remaining ATen operations written as the torch-level calls whose rules the op
  table holds (``ATEN``: one table, one place for a new rule): ``aten.add.Tensor`` is
  ``operator.add``, ``aten.view`` is ``Tensor.view`` ...  An ATen operation missing
  from it stays as it is, and the op table treats it as unknown: no group crosses it.

Every dimension of the inputs is captured as dynamic where the model allows it
(``Dim.AUTO``: batch and sequence, not a ViT's patch grid), so the sizes in views and
reshapes are read from the inputs (``x.size(0)``) and the sub-network takes the
batch sizes and sequence lengths the model does.  The graph keeps the exported
program's pytree code generation: the ``GraphModule`` takes the model's own
arguments and returns its own output structure (a ``ModelOutput`` stays one).
"""

from __future__ import annotations

import inspect
import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree

from fxoto.roles import DEFAULT_TABLE, OpTable, is_transposed_linear
from fxoto.shapes import CONSTANT, fetch_attr, propagate_shapes, submodule

aten = torch.ops.aten

__all__ = ["ATEN", "export_graph", "export_program"]


def _function(target: Callable, args: Callable[[tuple], tuple] | None = None):
    """A rule of ``ATEN``: call ``target`` with the ATen node's arguments (rearranged by ``args``)."""
    return "call_function", target, args


def _method(name: str, args: Callable[[tuple], tuple] | None = None):
    """A rule of ``ATEN``: call the tensor method ``name`` with the ATen node's arguments."""
    return "call_method", name, args


def _spread(args: tuple) -> tuple:
    """``aten.view(x, [a, b])`` as ``x.view(a, b)``."""
    return (args[0], *args[1])


# Each ATen operation with the torch-level call that fx would have recorded for it.
ATEN: dict[Any, tuple[str, Any, Callable | None]] = {
    aten.add.Tensor: _function(operator.add),
    aten.add_.Tensor: _function(operator.add),
    aten.mul.Tensor: _function(operator.mul),
    aten.div.Tensor: _function(operator.truediv),
    aten.relu.default: _function(F.relu),
    aten.relu_.default: _function(F.relu),
    aten.gelu.default: _function(F.gelu),
    aten.silu.default: _function(F.silu),
    aten.silu_.default: _function(F.silu),
    aten.tanh.default: _function(torch.tanh),
    aten.neg.default: _function(torch.neg),
    aten.sigmoid.default: _function(torch.sigmoid),
    aten.hardswish.default: _function(F.hardswish),
    aten.clone.default: _function(torch.clone),
    aten.dropout.default: _function(F.dropout),
    aten.cat.default: _function(torch.cat),
    aten.concat.default: _function(torch.cat),
    aten.flatten.using_ints: _function(torch.flatten),
    aten.transpose.int: _function(torch.transpose),
    aten.permute.default: _function(torch.permute),
    aten.mean.dim: _function(torch.mean),
    aten.adaptive_avg_pool2d.default: _function(F.adaptive_avg_pool2d),
    aten.max_pool2d.default: _function(F.max_pool2d),
    aten.avg_pool2d.default: _function(F.avg_pool2d),
    aten.scaled_dot_product_attention.default: _function(F.scaled_dot_product_attention),
    aten.view.default: _method("view", _spread),
    aten.reshape.default: _method("reshape", _spread),
    aten.expand.default: _method("expand", _spread),
    aten.unsqueeze.default: _method("unsqueeze"),
    aten.squeeze.dim: _method("squeeze"),
    aten.contiguous.default: _method("contiguous"),
    aten.split.Tensor: _function(torch.split),
    aten.split_with_sizes.default: _function(torch.split),
    aten.chunk.default: _function(torch.chunk),
    aten.unbind.int: _function(torch.unbind),
    aten.sym_size.int: _method("size"),
    aten.pow.Tensor_Scalar: _function(torch.pow),
    aten.rsqrt.default: _function(torch.rsqrt),
    aten.to.dtype: _method("to"),
}

# Nodes that only check what the capture assumed (shapes, dtypes); the graph computes the same without them.
_CHECKS = (aten._assert_tensor_metadata.default, aten._assert_scalar.default, aten.sym_constrain_range_for_size.default)


def _dynamic_shapes(model: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any] | None:
    """Every dimension of every tensor input as ``Dim.AUTO``: dynamic where the model lets it be (batch,
    sequence), specialised to the example's size where the model fixes it (channels, a ViT's patches)."""
    auto = torch.export.Dim.AUTO

    def spec(x):
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            return None
        return {d: auto for d in range(x.dim())}

    signature = inspect.signature(model.forward)
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError:
        return None
    shapes = {}
    for name, value in bound.arguments.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            shapes[name] = {k: pytree.tree_map(spec, v) for k, v in value.items()}
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            shapes[name] = tuple(pytree.tree_map(spec, v) for v in value)
        else:
            shapes[name] = pytree.tree_map(spec, value)
    return shapes


def export_program(model: nn.Module, args: tuple, kwargs: dict) -> torch.export.ExportedProgram:
    """``torch.export.export`` (non-strict) with dynamic batch and sequence dimensions where the model allows them.

    Where a dynamic capture fails (a model that asserts its sequence length, say), the
    capture is repeated with the example's shapes: the sub-network then takes those alone.
    """
    shapes = _dynamic_shapes(model, args, kwargs)
    if shapes is not None:
        try:
            return torch.export.export(model, args, kwargs, strict=False, dynamic_shapes=shapes)
        except Exception:  # noqa: BLE001 (any refusal of the dynamic capture: try the static one)
            pass
    return torch.export.export(model, args, kwargs, strict=False)


def export_graph(model: nn.Module, args: Sequence[Any], kwargs: dict[str, Any] | None = None,
                 op_table: OpTable = DEFAULT_TABLE) -> tuple[fx.Graph, list[Any]]:
    """The model's graph through ``torch.export``, in the fx front end's form, and its flat example inputs.

    ``model`` is in eval mode (the caller's ``_eval_mode``).  Raises whatever
    ``torch.export`` raises; the caller words it.
    """
    args, kwargs = tuple(args), dict(kwargs or {})
    ep = export_program(model, args, kwargs)
    gm = ep.module()
    graph = gm.graph
    graph._owning_module = None  # from here on its targets are paths in the user's model
    graph._tracer_cls, graph._tracer_extras = None, {}  # a saved sub-network reloads with fx's own tracer
    _drop_checks(graph)
    _hold_constants(graph, gm, model)
    _fold_modules(graph, model, op_table)
    _translate(graph)
    _drop_unused(graph)
    graph.lint()
    flat = pytree.tree_leaves((args, kwargs))
    propagate_shapes(graph, model, flat)
    return graph, flat


def _drop_checks(graph: fx.Graph) -> None:
    for node in reversed(list(graph.nodes)):
        if node.op == "call_module" and node.target == "_guards_fn" or node.target in _CHECKS:
            graph.erase_node(node)


def _drop_unused(graph: fx.Graph) -> None:
    """Dead-code elimination without an owning module (fx's asks it about ``call_module`` purity)."""
    for node in reversed(list(graph.nodes)):
        if node.users or node.op in ("placeholder", "output", "call_module"):
            continue
        if node.op == "get_attr" or not node.is_impure():
            graph.erase_node(node)


def _hold_constants(graph: fx.Graph, gm: fx.GraphModule, model: nn.Module) -> None:
    """A ``get_attr`` of a tensor the capture lifted (made in forward) holds it in its node, as the fx front end does."""
    for node in graph.nodes:
        if node.op == "get_attr":
            try:
                fetch_attr(model, node.target)
            except AttributeError:
                node.meta[CONSTANT] = fetch_attr(gm, node.target)


def _innermost(node: fx.Node) -> tuple[str, str] | None:
    """(call key, module path) of the innermost module whose forward made ``node``."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    key, (path, _) = next(reversed(stack.items()))
    return key, path


def _folds(module: nn.Module, table: OpTable) -> bool:
    """Whether a module's calls become one ``call_module`` node: a leaf the op table has a rule for."""
    if next(iter(module.children()), None) is not None:
        return False
    return any(t in table.modules for t in type(module).__mro__) or is_transposed_linear(module)


def _fold_modules(graph: fx.Graph, model: nn.Module, table: OpTable) -> None:
    """Each call of a leaf module the op table knows, one ``call_module`` node (as fx records it).

    A call's nodes (the same innermost ``nn_module_stack`` entry) read one tensor from
    outside (besides the module's own variables and sizes) and give one tensor to
    the rest of the graph; a call that does not is left as its ATen operations.
    """
    calls: dict[str, list[fx.Node]] = {}
    paths: dict[str, str] = {}
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        inner = _innermost(node)
        if inner is None or not inner[1]:
            continue
        calls.setdefault(inner[0], []).append(node)
        paths[inner[0]] = inner[1]
    for key, nodes in calls.items():
        path = paths[key]
        try:
            module = submodule(model, path)
        except AttributeError:
            continue
        if not _folds(module, table):
            continue
        inside = set(nodes)
        own = f"{path}."
        inputs = []
        for n in nodes:
            for a in n.all_input_nodes:
                if a in inside or a in inputs:
                    continue
                if a.op == "get_attr" and a.target.startswith(own):
                    continue
                if a.op == "call_function" and a.target is aten.sym_size.int:
                    continue
                inputs.append(a)
        outputs = [n for n in nodes if any(u not in inside for u in n.users)]
        if len(inputs) != 1 or len(outputs) != 1:
            continue
        with graph.inserting_after(outputs[0]):
            call = graph.create_node("call_module", path, (inputs[0],))
        call.meta["nn_module_stack"] = dict(outputs[0].meta.get("nn_module_stack", {}))
        outputs[0].replace_all_uses_with(call)
        for n in reversed(nodes):
            graph.erase_node(n)


def _translate(graph: fx.Graph) -> None:
    """Every ATen operation in ``ATEN`` as the torch-level call fx would have recorded."""
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in ATEN:
            continue
        if node.target is aten.add.Tensor and node.kwargs.get("alpha", 1) != 1:
            continue
        op, target, rearrange = ATEN[node.target]
        node.args = rearrange(node.args) if rearrange else node.args
        node.op, node.target = op, target
