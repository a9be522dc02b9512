"""Patterns of several nodes folded into one call before the passes read the graph.

RMSNorm is written out in most models (Hugging Face's ``LlamaRMSNorm``, ``T5LayerNorm``,
user code): ``x * rsqrt(mean(x ** 2, -1, keepdim=True) + eps)``, cast back, times a weight.
No single node of it is a normalisation, so the op table could only call each of them
unknown.  ``fold_rms_norms`` finds the pattern (after either front end) and writes it as
one call of ``rms_norm``, which computes the same thing in the same order, so the
channel pass can treat it as what it is (DESIGN 6b): a per-channel norm whose weight
entries go with their channels and whose denominator the rewrite keeps (``eps`` and the
weight rescaled for the channels left).
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from fxoto.shapes import SHAPE, attr_value


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``weight * (x * rsqrt(mean(x ** 2 over the last dim) + eps)).to(dtype)``, as the folded nodes computed it."""
    h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    if dtype is not None:
        h = h.to(dtype)
    return weight * h


torch.fx.wrap("rms_norm")  # a re-traced sub-network keeps it as one call

_ADDS = (operator.add, torch.add)
_MULS = (operator.mul, torch.mul)


def _is(node, targets, method: str | None = None) -> bool:
    return isinstance(node, fx.Node) and (
        node.op == "call_function" and node.target in targets or node.op == "call_method" and node.target == method)


def _single_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _other(node: fx.Node, one) -> object:
    a, b = node.args[:2]
    return b if a is one else a if b is one else None


def _match(r: fx.Node, root) -> tuple[fx.Node, fx.Node, float, object, list[fx.Node], fx.Node] | None:
    """From ``rsqrt``: (x, weight node, eps, dtype, nodes to erase, output node), or None."""
    a = r.args[0]
    if not _is(a, _ADDS, "add") or a.kwargs or len(a.users) != 1:
        return None
    m = next((x for x in a.args[:2] if isinstance(x, fx.Node)), None)
    eps = _other(a, m)
    if m is None or not isinstance(eps, float) or len(m.users) != 1:
        return None
    if not _is(m, (torch.mean,), "mean"):
        return None
    dims = m.args[1] if len(m.args) > 1 else m.kwargs.get("dim")
    keep = m.args[2] if len(m.args) > 2 else m.kwargs.get("keepdim", False)
    p = m.args[0]
    shape = p.meta.get(SHAPE) if isinstance(p, fx.Node) else None
    if not isinstance(shape, torch.Size) or not keep or m.kwargs.get("dtype") is not None:
        return None
    if dims not in (-1, len(shape) - 1) and list(dims if isinstance(dims, (list, tuple)) else [dims]) not in (
            [-1], [len(shape) - 1]):
        return None
    if len(p.users) != 1:
        return None
    if _is(p, (torch.pow, operator.pow), "pow") and p.args[1] == 2:
        x = p.args[0]
    elif _is(p, _MULS, "mul") and p.args[0] is p.args[1]:
        x = p.args[0]
    else:
        return None
    y = _single_user(r)
    if y is None or not _is(y, _MULS, "mul") or _other(y, r) is not x or y.kwargs:
        return None
    chain, dtype, z = [p, m, a, r, y], None, y
    after = _single_user(y)
    if after is not None and after.op == "call_method" and after.target == "to" and len(after.args) == 2 \
            and isinstance(after.args[1], torch.dtype) and not after.kwargs:
        dtype, z = after.args[1], after
        chain.append(after)
    out = _single_user(z)
    if out is None or not _is(out, _MULS, "mul") or out.kwargs:
        return None
    w = _other(out, z)
    if not (isinstance(w, fx.Node) and w.op == "get_attr"):
        return None
    weight = attr_value(w, root)
    if not isinstance(weight, torch.nn.Parameter) or tuple(weight.shape) != (shape[-1],):
        return None
    return x, w, eps, dtype, chain, out


def fold_rms_norms(graph: fx.Graph, root) -> int:
    """Each RMSNorm written out in ``graph`` (module docstring) as one ``rms_norm`` call; how many."""
    folded = 0
    for r in list(graph.nodes):
        if r.graph is not graph or not _is(r, (torch.rsqrt,), "rsqrt"):
            continue
        found = _match(r, root)
        if found is None:
            continue
        x, w, eps, dtype, chain, out = found
        with graph.inserting_before(out):
            call = graph.call_function(rms_norm, (x, w, eps, dtype))
        call.meta = {k: v for k, v in out.meta.items() if k in (SHAPE, "nn_module_stack")}
        out.replace_all_uses_with(call)
        for node in reversed([*chain, out]):
            graph.erase_node(node)
        folded += 1
    return folded
