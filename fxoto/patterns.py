"""Patterns of several nodes folded into one call before the passes read the graph.

``rms_norm`` and ``gelu_tanh`` compute exactly what the nodes they replace computed, in the
same order, so the graph's values do not change by a bit.

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


def gelu_tanh(x: torch.Tensor, scale: float, cubic: float) -> torch.Tensor:
    """GELU's tanh approximation as GPT-2's ``NewGELUActivation`` writes it, in the same order:
    ``x * 0.5 * (1 + tanh(scale * (x + cubic * x ** 3)))``.  Zero stays zero."""
    return (x * 0.5) * (torch.tanh((x + torch.pow(x, 3.0) * cubic) * scale) + 1.0)


torch.fx.wrap("rms_norm")  # a re-traced sub-network keeps them as one call
torch.fx.wrap("gelu_tanh")

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


def _match(r: fx.Node, root) -> tuple[tuple, list[fx.Node], fx.Node] | None:
    """From ``rsqrt``: (``rms_norm``'s arguments: x, weight node, eps, dtype; nodes to erase; output node), or None."""
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
    return (x, w, eps, dtype), chain, out


def _match_gelu(t: fx.Node) -> tuple[tuple, list[fx.Node], fx.Node] | None:
    """From ``tanh``: (``gelu_tanh``'s arguments: x, scale, cubic; nodes to erase; output node), or None."""
    def single(node):
        return isinstance(node, fx.Node) and len(node.users) == 1

    u = t.args[0]
    if not (single(u) and _is(u, _MULS, "mul") and isinstance(u.args[1], float)):
        return None
    v = u.args[0]
    if not (single(v) and _is(v, _ADDS, "add") and isinstance(v.args[1], fx.Node)):
        return None
    x, w = v.args[:2]
    if not (single(w) and _is(w, _MULS, "mul") and isinstance(w.args[1], float)):
        return None
    p = w.args[0]
    if not (single(p) and _is(p, (torch.pow, operator.pow), "pow") and p.args[0] is x and p.args[1] == 3.0):
        return None
    a = _single_user(t)
    if not (a is not None and single(a) and _is(a, _ADDS, "add") and a.args[0] is t and a.args[1] == 1.0):
        return None
    out = _single_user(a)
    if not (out is not None and _is(out, _MULS, "mul") and out.args[1] is a):
        return None
    h = out.args[0]
    if not (single(h) and _is(h, _MULS, "mul") and h.args[0] is x and h.args[1] == 0.5):
        return None
    return (x, u.args[1], w.args[1]), [h, p, w, v, u, t, a], out


def fold_patterns(graph: fx.Graph, root) -> None:
    """Every pattern of this module folded into its one call."""
    fold_rms_norms(graph, root)
    fold_gelus(graph)


def fold_rms_norms(graph: fx.Graph, root) -> int:
    """Each RMSNorm written out in ``graph`` (module docstring) as one ``rms_norm`` call; how many."""
    return _fold(graph, torch.rsqrt, "rsqrt", lambda r: _match(r, root), rms_norm)


def fold_gelus(graph: fx.Graph) -> int:
    """Each tanh-approximated GELU written out (GPT-2's) as one ``gelu_tanh`` call; how many."""
    return _fold(graph, torch.tanh, "tanh", _match_gelu, gelu_tanh)


def _fold(graph: fx.Graph, function, method: str, match, fn) -> int:
    """Replace each match found from a call of ``function`` (or ``method``) by one call of ``fn``.

    ``match(node)`` gives (``fn``'s arguments, the nodes it replaces, the output node) or None.
    """
    folded = 0
    for anchor in list(graph.nodes):
        if anchor.graph is not graph or not _is(anchor, (function,), method):
            continue  # erased with an earlier match, or not an anchor
        found = match(anchor)
        if found is None:
            continue
        args, chain, out = found
        with graph.inserting_before(out):
            call = graph.call_function(fn, args)
        call.meta = {k: v for k, v in out.meta.items() if k in (SHAPE, "nn_module_stack")}
        out.replace_all_uses_with(call)
        for node in reversed([*chain, out]):
            graph.erase_node(node)
        folded += 1
    return folded
