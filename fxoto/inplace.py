"""The sub-network in the user's own class (DESIGN 6c): slice the model's modules in place.

``construct_in_place(space, ids)`` removes the zero channel and head groups from the
model the space was built on, module by module, so that a Hugging Face model keeps
its class, its ``generate()``, its KV cache and its ``save_pretrained()``:

1. the stems lose their weight rows and bias entries (``out_features``, ``out_channels``),
   the per-channel modules their entries, the readers their input columns
   (``in_features``), each module once however often it is called;
2. each attention whose heads go has its head counts rewritten where the module keeps
   them (``HEAD_COUNTS``: ``num_heads``, ``num_key_value_heads``, ``all_head_size`` ...);
3. the result is run beside the ``GraphModule`` sub-network (``fxoto.subnet``) on the
   example inputs.  Where they differ (a forward that reads a width fxoto did not
   update), every parameter, buffer and attribute is put back as it was
   (``_Snapshot``: slicing makes new tensors, so the old ones are intact) and
   ``InPlaceError`` names the module where the outputs part;
4. where every repeated block lost the same widths, the model's ``config`` is
   rewritten so that ``save_pretrained`` / ``from_pretrained`` round-trip (checked by
   building the class from the new config on the ``meta`` device and comparing every
   parameter's shape); elsewhere the config is left alone, with a warning.

Operation groups are refused: an attention or MLP branch erased as a whole segment
cannot be taken out of a module's ``forward`` (an attention with no heads left cannot
even be viewed as [..., -1, d]); ``construct_subnet()`` erases them in its
``GraphModule``.  After a successful call the space no longer describes the model.
"""

from __future__ import annotations

import copy
import warnings
from collections import defaultdict

import torch
from torch import nn
from torch.utils import _pytree as pytree

from fxoto.errors import InPlaceError
from fxoto.patterns import rms_norm
from fxoto.roles import DEFAULT_TABLE
from fxoto.slicing import _cut_rms_weight, _keep, _slice_in_place, _slice_param, _slice_per_channel, _slice_stem
from fxoto.subnet import _channel_drops, _erased_nodes, _head_cuts, construct_subnet
from fxoto.uniform import blocks

# Attributes an attention module may keep its head counts in: what each counts.
HEAD_COUNTS = {
    "num_heads": "queries", "num_attention_heads": "queries", "n_heads": "queries", "n_head": "queries",
    "num_key_value_heads": "kv", "num_kv_heads": "kv", "n_kv_heads": "kv",
    "num_key_value_groups": "groups", "all_head_size": "width", "split_size": "width",
}


class _Snapshot:
    """Every module's parameters, buffers and plain attributes, by reference (no tensor is copied)."""

    def __init__(self, model: nn.Module):
        self.saved = [(m, dict(m._parameters), dict(m._buffers),
                       {k: v for k, v in vars(m).items() if not k.startswith("_")}) for m in model.modules()]

    def restore(self) -> None:
        for m, params, buffers, attrs in self.saved:
            m._parameters.clear()
            m._parameters.update(params)
            m._buffers.clear()
            m._buffers.update(buffers)
            for k in [k for k in vars(m) if not k.startswith("_") and k not in attrs]:
                delattr(m, k)
            vars(m).update(attrs)


def construct_in_place(space, ids=None, rtol: float = 1e-4, atol: float = 1e-5) -> nn.Module:
    """Remove the groups ``ids`` (default: every zero group) from ``space.model`` itself; returns the model.

    Raises ``InPlaceError`` (the model untouched) where a removal holds operation groups,
    a module called at several places would lose different columns at each, or the
    sliced model differs from the ``GraphModule`` sub-network on the example inputs.
    """
    ids = space.zero_groups() if ids is None else sorted(set(ids))
    model = space.model
    if space.stale:
        raise InPlaceError(f"this search space's {type(model).__name__} was already sliced in place; "
                           f"search the sliced model again for another round")
    space.check_removal(ids)
    erased = _erased_nodes(space, ids)
    if erased:
        ops = [i for i in ids if space.groups[i].kind == "operation"]
        raise InPlaceError(
            f"in_place=True cannot erase whole operations (groups {ops or 'of layers losing every channel'}; nodes "
            f"{sorted(erased)[:4]} ...): a module's forward still calls them. Remove channel and head groups alone "
            f"in place, or use construct_subnet() for a GraphModule that erases them")
    if (ragged := _ragged_heads(space, ids)) is not None:
        raise InPlaceError(f"in_place=True: {ragged}; use construct_subnet() (it indexes the repeated heads), or "
                           f"uniform=True in the search")
    args, kwargs = space.example
    nodes = {n.name: n for n in space.graph.nodes}
    columns = _columns(space, ids, nodes)
    reference = construct_subnet(space, ids)  # before the model's modules change: it reads them
    snapshot = _Snapshot(model)
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            expected = reference(*args, **kwargs)
            before = _module_outputs(model, args, kwargs)
            _slice(space, ids, nodes, columns)
            _check(model, args, kwargs, expected, before, rtol, atol)
    except BaseException:
        snapshot.restore()
        raise
    finally:
        for m, flag in flags:
            m.training = flag
    space.stale = True
    _rewrite_config(model, space, ids)
    return model


def _columns(space, ids, nodes) -> dict[str, set[int]]:
    """Input columns to drop, by one call of each module: refused where its calls drop different ones."""
    per_call: dict[str, set[int]] = defaultdict(set)
    for cut in filter(None, map(space.slices.get, ids)):
        for name, lo, n in cut.columns:
            per_call[name].update(range(lo, lo + n))
    calls: dict[str, list[str]] = defaultdict(list)
    for node in space.graph.nodes:
        if node.op == "call_module":
            calls[node.target].append(node.name)
    by_module: dict[str, set[int]] = {}  # by one node calling each module: it is sliced once
    for name in per_call:
        target = nodes[name].target
        if any(nodes[call].target == target for call in by_module):
            continue
        drops = {frozenset(per_call.get(call, ())) for call in calls[target]}
        if len(drops) > 1:
            raise InPlaceError(
                f"module '{target}' is called at {len(calls[target])} places (nodes {calls[target]}) that lose "
                f"different input features: one module cannot be sliced for each; use construct_subnet()")
        by_module[name] = per_call[name]
    return by_module


def _slice(space, ids, nodes, columns) -> None:
    """Slice the model's modules (``fxoto.subnet``'s slicing, on the model instead of a copy of its graph)."""
    model = space.model
    drops = _channel_drops(space, ids)
    columns = defaultdict(set, {name: set(drop) for name, drop in columns.items()})
    _head_cuts(space, ids, drops, columns, set())
    for stem, drop in drops.items():
        _slice_stem(model, nodes[stem], drop)
    for name, drop in columns.items():
        _slice_in_place(model, nodes[name], drop)
    entries: dict[str, set[int]] = defaultdict(set)
    norms: dict[str, set[int]] = defaultdict(set)
    for cut in filter(None, map(space.slices.get, ids)):
        for name, c in cut.entries:
            if nodes[name].target is rms_norm:
                norms[name].add(c)
            else:
                entries[nodes[name].target].add(c)
    for target, drop in entries.items():
        _slice_entries(model, target, nodes, drop)
    for name, drop in norms.items():
        _slice_rms_module(model, nodes[name], drop)
    _set_head_counts(space, ids, nodes)


def _slice_entries(model: nn.Module, target: str, nodes, drop: set[int]) -> None:
    """A per-channel module's entries: norms over the last dim and embeddings as well as ``fxoto.subnet``'s."""
    module = model.get_submodule(target)
    if isinstance(module, nn.LayerNorm) or hasattr(module, "normalized_shape"):
        keep = _keep(module.normalized_shape[-1], drop, module.weight.device)
        for name in ("weight", "bias"):
            _slice_param(module, name, 0, keep)
        module.normalized_shape = (*module.normalized_shape[:-1], len(keep))
    elif isinstance(module, nn.Embedding):
        keep = _keep(module.embedding_dim, drop, module.weight.device)
        _slice_param(module, "weight", 1, keep)
        module.embedding_dim = len(keep)
    else:
        _slice_per_channel(model, next(n for n in nodes.values() if n.target == target), drop)


def _slice_rms_module(model: nn.Module, node, drop: set[int]) -> None:
    """An RMSNorm module (folded into ``fxoto.patterns.rms_norm``): its weight sliced and times sqrt(N/N'),
    its epsilon attribute (the float that holds the folded ``eps``) times N/N' (DESIGN 6b)."""
    _, weight_node, eps, _ = node.args
    path, _, attr = weight_node.target.rpartition(".")
    module = model.get_submodule(path)
    names = [k for k, v in vars(module).items() if isinstance(v, float) and v == eps]
    if len(names) != 1:
        raise InPlaceError(f"the RMSNorm '{path}' ({type(module).__name__}) keeps its epsilon {eps} in "
                           f"{len(names)} attributes: fxoto cannot tell which to rescale; use construct_subnet()")
    n, kept = _cut_rms_weight(model, weight_node.target, drop)
    setattr(module, names[0], eps * (n / kept))
    for shape_attr in ("normalized_shape", "hidden_size", "dim"):
        value = getattr(module, shape_attr, None)
        if value == n:
            setattr(module, shape_attr, kept)
        elif isinstance(value, tuple) and value == (n,):
            setattr(module, shape_attr, (kept,))


def _ragged_heads(space, ids) -> str | None:
    """An attention whose key/value heads would keep different numbers of query heads: a module repeats each
    key/value head the same number of times."""
    removed = space.removed_heads(ids)
    for a in space.attentions:
        kept = [sum((a.q, i) not in removed for i, jj in enumerate(a.kv_of_query) if jj == j)
                for j in sorted(set(a.kv_of_query)) if (a.k, j) not in removed]
        if len(set(kept)) > 1:
            return (f"the attention at node '{a.node}' would keep {kept} query heads per key/value head: its "
                    f"module repeats every key/value head as often")
    return None


def _set_head_counts(space, ids, nodes) -> None:
    """Write the heads kept into the attention modules' head counts (``HEAD_COUNTS``), where they hold the old ones."""
    removed = space.removed_heads(ids)
    model = space.model
    for a in space.attentions:
        queries = len(a.kv_of_query)
        kv = max(a.kv_of_query) + 1
        gone_q = sum((a.q, i) in removed for i in range(queries))
        if not gone_q:
            continue
        gone_kv = sum((a.k, j) in removed for j in range(kv))
        old = {"queries": queries, "kv": kv, "groups": queries // kv, "width": queries * a.head_dim}
        new = {"queries": queries - gone_q, "kv": kv - gone_kv, "groups": (queries - gone_q) // (kv - gone_kv),
               "width": (queries - gone_q) * a.head_dim}
        path = _common_parent([nodes[stem].target for _, stem, _ in a.rows] + [nodes[a.out].target])
        module = model.get_submodule(path)
        for attr, what in HEAD_COUNTS.items():
            if isinstance(getattr(module, attr, None), int) and getattr(module, attr) == old[what]:
                setattr(module, attr, new[what])


def _common_parent(paths: list[str]) -> str:
    parts = [p.split(".")[:-1] for p in paths]
    common = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return ".".join(common)


def _leaf(module: nn.Module) -> bool:
    """A module whose widths fxoto updates itself (a leaf the op table has a rule for)."""
    return next(iter(module.children()), None) is None and any(t in DEFAULT_TABLE.modules for t in type(module).__mro__)


def _first_tensor(out):
    return next((t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)), None)


def _module_outputs(model: nn.Module, args, kwargs, stack: list | None = None):
    """Each module's first output tensor, in the order the calls end (inner modules first), and the model's output."""
    found: list[tuple[str, nn.Module, torch.Tensor | None]] = []
    handles = []

    def enter(path, module):
        if stack is not None:
            stack.append((path, module))

    def leave(path, module, out):
        found.append((path, module, _first_tensor(out)))
        if stack:
            stack.pop()

    for path, m in model.named_modules():
        handles.append(m.register_forward_pre_hook(lambda mod, a, p=path: enter(p, mod)))
        handles.append(m.register_forward_hook(lambda mod, a, out, p=path: leave(p, mod, out)))
    try:
        out = model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return found, out


def _named(path: str, module: nn.Module) -> str:
    return f"'{path or '<root>'}' ({type(module).__name__})"


def _culprit(stack) -> tuple[str, nn.Module]:
    """The innermost module on ``stack`` that fxoto does not slice itself (else the innermost)."""
    return next(((p, m) for p, m in reversed(stack) if not _leaf(m)), stack[-1])


def _check(model, args, kwargs, expected, before, rtol, atol) -> None:
    """The sliced model against the ``GraphModule`` sub-network; on a difference, name where it starts."""
    stack: list[tuple[str, nn.Module]] = []
    try:
        after, got = _module_outputs(model, args, kwargs, stack)
    except Exception as error:
        if not stack:
            raise
        path, module = _culprit(stack)
        raise InPlaceError(
            f"after slicing in place, module {_named(path, module)} fails ({type(error).__name__}: {error}): its "
            f"forward reads a width fxoto did not update (only {', '.join(HEAD_COUNTS)} and the leaf modules' own "
            f"widths are). The model is left as it was; use construct_subnet() for a GraphModule") from error
    want = [t for t in pytree.tree_leaves(expected) if isinstance(t, torch.Tensor)]
    have = [t for t in pytree.tree_leaves(got) if isinstance(t, torch.Tensor)]
    if len(want) == len(have) and all(a.shape == b.shape and torch.allclose(a, b, rtol=rtol, atol=atol)
                                      for a, b in zip(want, have)):
        return
    was = {p: t for p, _, t in before[0]}
    differ = [(p, m) for p, m, t in after
              if t is not None and isinstance(was.get(p), torch.Tensor) and was[p].shape == t.shape
              and not torch.allclose(was[p], t, rtol=rtol, atol=atol)]
    where = _named(*next(((p, m) for p, m in differ if not _leaf(m)), differ[0])) if differ else "the model"
    raise InPlaceError(
        f"after slicing in place, the output of {where} differs from the zeroed super-network's (and the model's "
        f"from the GraphModule sub-network's): its forward reads a width fxoto did not update. The model is left "
        f"as it was; use construct_subnet() for a GraphModule")


def _rewrite_config(model: nn.Module, space, ids) -> None:
    """Write the new widths into a Hugging Face ``config`` where one config describes every block."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(type(model), "_from_config"):
        return
    removed = space.removed_heads(ids)
    heads = {(len(a.kv_of_query) - sum((a.q, i) in removed for i in range(len(a.kv_of_query))),
              max(a.kv_of_query) + 1 - sum((a.k, j) in removed for j in range(max(a.kv_of_query) + 1)), a.head_dim)
             for a in space.attentions}
    width = getattr(config, "intermediate_size", None)
    drops = _channel_drops(space, ids)
    mlp = {stem for block in blocks(space, "channel") for stem, _ in space.slices[block[0]].rows}  # not the stream
    kept = {space.layers[stem].channels - len(drops.get(stem, ())) for stem in mlp
            if space.layers[stem].channels == width}
    uneven = [what for what, found in (("attention heads", heads), ("MLP neurons", kept)) if len(found) > 1]
    changes = {}
    if len(heads) == 1 and hasattr(config, "num_attention_heads"):
        q, kv, d = heads.pop()
        changes.update(num_attention_heads=q, head_dim=d)
        if hasattr(config, "num_key_value_heads"):
            changes["num_key_value_heads"] = kv
    if len(kept) == 1:
        changes["intermediate_size"] = kept.pop()
    changes = {k: v for k, v in changes.items() if getattr(config, k, None) != v}
    if not changes and not uneven:
        return
    candidate = copy.deepcopy(config)
    for k, v in changes.items():
        setattr(candidate, k, v)
    if not uneven and _shapes(model) == _shapes_from(type(model), candidate):
        for k, v in changes.items():
            setattr(config, k, v)
        return
    why = (f"the {' and '.join(uneven)} kept differ from layer to layer" if uneven else
           f"{type(config).__name__} cannot describe the new widths ({changes})")
    warnings.warn(
        f"{type(model).__name__} was sliced in place, but {why}, so model.config is left as it was: save the model "
        f"with torch.save(model), not save_pretrained. fxoto.search(..., uniform=True) removes the same widths in "
        f"every block.", stacklevel=4)


def _shapes(model: nn.Module) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in model.state_dict().items()}


def _shapes_from(cls, config) -> dict[str, torch.Size] | None:
    try:
        with torch.device("meta"):
            return _shapes(cls._from_config(config))
    except Exception:  # noqa: BLE001 (a config the class refuses cannot describe the model)
        return None
