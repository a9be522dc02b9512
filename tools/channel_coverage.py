"""Channel and head coverage: the channels and attention heads fxoto can slim against torch-pruning's.

For each model (random values, eval, one small input) this counts, side by side, layer
channels: the (layer, output channel) pairs that some group removes, over the Conv and
Linear layers; and attention heads: the query heads that some group removes.

* fxoto: the rows held by the channel groups of ``fxoto.build_space(model, (x,),
  structures="channels")`` (``tracer="auto"``: torch.fx, else torch.export) and the entries of
  depthwise convolutions they slice, beside the number of groups (a channel coupled through an
  add is one group holding a row of each stem; a grouped convolution's group goes whole) and of
  layers; the query heads its head groups hold (a key/value head's group of grouped-query
  attention holds its query heads, or a query head is a group of its own);
* torch-pruning: the output channels removed by the pruning groups of
  ``DependencyGraph().get_all_groups`` (Conv and Linear roots, the output layer ignored as in
  torch-pruning's own examples: the 1000-class classifier, a causal LM's ``lm_head``, a pooler),
  beside the number of groups; and the query heads of its attention groups, the groups that
  prune the output channels of a layer it is told the heads of (``num_heads={q/k/v or qkv
  layer: heads}``, given by hand as its ViT and LLM examples do): the groups its
  ``BasePruner(num_heads=..., prune_num_heads=True)`` removes whole heads from.

Counting layer channels on both sides makes the two comparable whatever each couples: fxoto
removes a ResNeXt conv group's input and output channels in one group, torch-pruning
counts the two layers in two groups. Neither count says that all of a layer's channels or
all of an attention's heads may go (fxoto keeps one channel per layer and one head per
attention). Where fxoto counts fewer, the last column says why, from ``SearchSpace.excluded``:
the layers set aside, grouped by reason (the node names dropped), with their output channels,
largest first; and the attentions whose heads are not followed. Totals at the end.
torch-pruning is given up after ``--timeout`` seconds per model.

Models: every torchvision classification model (``tests/zoo_models.py``), or with
``--suite transformers`` timm's ViT-S, DeiT-T, ConvNeXt-Atto and Swin-T (``pretrained=False``;
``pip install timm``, the ``bench`` extra) and the tiny random Hugging Face models of
``tests/test_transformers.py``: BERT, LLaMA with grouped-query attention (the base model and
the causal LM), ViT and GPT-2.

    PYTHONPATH=. .venv/bin/python tools/channel_coverage.py [--models resnet18 vgg11_bn ...] [--threads 1]
    PYTHONPATH=. .venv/bin/python tools/channel_coverage.py --suite transformers
"""

from __future__ import annotations

import argparse
import gc
import re
import signal
import sys
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tabulate import tabulate  # noqa: E402
from torch import nn  # noqa: E402

import fxoto  # noqa: E402
from fxoto.shapes import SHAPE  # noqa: E402
from tests.zoo_models import TORCHVISION, build, input_size  # noqa: E402

_NAMED = re.compile(r"'[^']*' \(([^)]*)\)")  # "'add_3' (add)" -> "add"
_QUOTED = re.compile(r"'[^']*'(: )?")  # "'q_proj': its heads ..." -> "its heads ..."


def _output_layers(model: nn.Module) -> list[nn.Module]:
    """The layers that make a model's output, which torch-pruning's examples leave alone: the 1000-class
    classifier (a Linear, or SqueezeNet's Conv), a causal LM's ``lm_head``, a pooler's dense layer."""
    return [m for name, m in model.named_modules()
            if getattr(m, "out_features", None) == 1000 or getattr(m, "out_channels", None) == 1000
            or name == "lm_head" or name.endswith("pooler.dense")]


def _no_heads(model: nn.Module) -> dict[nn.Module, int]:
    return {}


@dataclass(frozen=True)
class Case:
    """One model of the comparison: how to build it, its example input, and the heads torch-pruning is told of."""

    name: str
    build: Callable[[], nn.Module]
    example: Callable[[], torch.Tensor]
    shown: str  # the input, as the table shows it
    num_heads: Callable[[nn.Module], dict[nn.Module, int]] = _no_heads


def torchvision_case(name: str) -> Case:
    size = input_size(name)
    return Case(name, lambda: build(name), lambda: torch.randn(1, 3, size, size), str(size))


def _timm_heads(model: nn.Module) -> dict[nn.Module, int]:
    """timm's attentions: one fused ``qkv`` layer and ``num_heads`` (torch-pruning's timm ViT example)."""
    return {m.qkv: m.num_heads for m in model.modules() if isinstance(getattr(m, "qkv", None), nn.Linear)
            and isinstance(getattr(m, "num_heads", None), int)}


def _hf_heads(model: nn.Module) -> dict[nn.Module, int]:
    """Hugging Face attentions (torch-pruning's HF ViT, BERT and LLM examples): BERT's query, key and value
    layers; LLaMA's and ViT's q_proj with the query heads, k_proj and v_proj with the key/value heads;
    GPT-2's fused ``c_attn``."""
    config = model.config
    found = {}
    for m in model.modules():
        if hasattr(m, "query") and hasattr(m, "num_attention_heads"):
            found.update({m.query: m.num_attention_heads, m.key: m.num_attention_heads, m.value: m.num_attention_heads})
        elif hasattr(m, "q_proj"):
            kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
            found.update({m.q_proj: config.num_attention_heads, m.k_proj: kv, m.v_proj: kv})
        elif hasattr(m, "c_attn"):
            found[m.c_attn] = config.n_head
    return found


TIMM = {  # name: input size (224 where the model is built for it: fixed position embeddings or windows)
    "vit_small_patch16_224": 224,
    "deit_tiny_patch16_224": 224,
    "convnext_atto": 64,
    "swin_tiny_patch4_window7_224": 224,
}


def timm_case(name: str) -> Case:
    """A timm model, imported only when it is built (timm is in the bench extra, not the test extra)."""
    def build():
        import timm

        return timm.create_model(name, pretrained=False).eval()

    size = TIMM[name]
    return Case(name, build, lambda: torch.randn(1, 3, size, size), str(size), _timm_heads)


def hf_cases() -> list[Case]:
    """The tiny random configurations of ``tests/test_transformers.py`` (2 layers, 32 wide, 4 heads; LLaMA with
    2 key/value heads), no download; token ids of batch 2 and length 7, or 16 x 16 images."""
    import transformers as hf

    vocab = 64

    def ids():
        return torch.randint(0, vocab, (2, 7), generator=torch.Generator().manual_seed(0))

    def images():
        return torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))

    def llama(cls):
        return lambda: cls(hf.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                          use_cache=False)).eval()

    bert = hf.BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=48, max_position_embeddings=64)
    vit = hf.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=48)
    gpt2 = hf.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=64, use_cache=False,
                         bos_token_id=0, eos_token_id=0)
    return [
        Case("hf-bert", lambda: hf.BertModel(bert).eval(), ids, "ids 2x7", _hf_heads),
        Case("hf-llama-gqa", llama(hf.LlamaModel), ids, "ids 2x7", _hf_heads),
        Case("hf-llama-gqa-causal-lm", llama(hf.LlamaForCausalLM), ids, "ids 2x7", _hf_heads),
        Case("hf-vit", lambda: hf.ViTModel(vit).eval(), images, "16", _hf_heads),
        Case("hf-gpt2", lambda: hf.GPT2Model(gpt2).eval(), ids, "ids 2x7", _hf_heads),
    ]


def transformers_cases() -> list[Case]:
    return [timm_case(name) for name in TIMM] + hf_cases()


@dataclass
class Counted:
    """What one tool removes on one model."""

    channels: int
    groups: int
    heads: int
    layers: int | None = None  # fxoto's layers in channel groups
    head_dims: tuple[int, int] = (0, 0)  # torch-pruning's: (layers, channels) of its attention groups (head dimensions)
    attentions: int = 0  # torch-pruning's attention groups
    why: dict[str, tuple[int, int]] = field(default_factory=dict)  # fxoto's set-aside layers: reason -> (layers, channels)


def fxoto_channels(model: nn.Module, x: torch.Tensor) -> Counted:
    """Layer channels in channel groups, the groups, query heads in head groups, the layers, and why some are set aside.

    Layer channels: the (layer, output channel) pairs that some channel group holds: its stems'
    rows, and the entries of a depthwise convolution on the way (a layer of its own, which
    torch-pruning counts as one). Heads: the query heads of the head groups (a key/value head's
    group holds the query heads that read it). Why: ``SearchSpace.excluded`` by reason, node names
    dropped (a channel reason counts the layers and their output channels, a head reason the
    attentions and no channels); attentions whose heads are not followed and that no exclusion
    names (a fused qkv projection is not viewed into heads as a layer of its own) get a reason here.
    """
    space = fxoto.build_space(model, (x,), structures="channels")
    ids = [g.id for g in space.groups if g.kind == "channel"]
    nodes = {n.name: n for n in space.graph.nodes}
    layers = {name for name, n in nodes.items() if n.op == "call_module"
              and isinstance(model.get_submodule(n.target), (nn.Linear, nn.modules.conv._ConvNd))}
    channels = len({row for i in ids for row in space.slices[i].rows}
                   | {entry for i in ids for entry in space.slices[i].entries if entry[0] in layers})
    queries = {a.q for a in space.attentions}
    heads = len({h for g in space.groups if g.kind == "head"
                 for h in space.removed_heads([g.id]) if h[0] in queries})
    why: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for e in space.excluded:
        if e.reason.startswith("heads: "):
            why["heads: " + _QUOTED.sub("", e.reason.removeprefix("heads: ")).split(": ")[0]][0] += 1
            continue
        reason = _NAMED.sub(r"\1", e.reason.removeprefix("channels: ")).split(": ")[0]
        why[reason][0] += 1
        why[reason][1] += _out_channels(nodes.get(e.nodes[0]), model)
    named = {a.node for a in space.attentions} | {e.nodes[0] for e in space.excluded if e.reason.startswith("heads: ")}
    unnamed = [n for n in space.graph.nodes if n.target is F.scaled_dot_product_attention and n.name not in named]
    if unnamed:
        why["heads: q, k and v not each a Linear layer's output viewed as [..., H, d] (a fused qkv)"][0] += len(unnamed)
    return Counted(channels, len(ids), heads, len(space.layers), why={r: (n, c) for r, (n, c) in why.items()})


def _out_channels(node, model: nn.Module) -> int:
    """A set-aside layer's output channels: a module's own count, else dim 1 of its output (0: unknown)."""
    if node is None:
        return 0
    if node.op == "call_module":
        m = model.get_submodule(node.target)
        for attr in ("out_channels", "out_features", "num_features", "embed_dim"):
            if isinstance(getattr(m, attr, None), int):
                return getattr(m, attr)
    shape = node.meta.get(SHAPE)
    return shape[1] if isinstance(shape, torch.Size) and len(shape) > 1 else 0


class _TimedOut(Exception):
    pass


def _alarm(signum, frame):
    raise _TimedOut


def torch_pruning_channels(model: nn.Module, x: torch.Tensor, timeout: int,
                           num_heads: dict[nn.Module, int] | None = None) -> Counted:
    """Layer channels in torch-pruning's pruning groups, the groups, and the query heads of its attention groups.

    Layer channels: the (Conv or Linear module, output channel) pairs that some group's
    output-channel pruning removes. Head dimensions: those of them in attention groups (q, k
    and v rows; ``prune_head_dims=True`` slims every head). Heads: per group that prunes the output channels of a layer
    in ``num_heads`` (what ``BasePruner`` takes for an attention group and removes whole heads
    from with ``prune_num_heads=True``), the most heads among those layers: the query heads
    (grouped-query attention gives k and v fewer).

    Given up after ``timeout`` seconds (``_TimedOut``): on Swin, torch-pruning's
    ``get_all_groups`` ran for more than five minutes.
    """
    import torch_pruning as tp

    num_heads = num_heads or {}
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(timeout)
    try:
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=x)
        groups = list(graph.get_all_groups(ignored_layers=_output_layers(model)))
    finally:
        signal.alarm(0)
    pairs = {(id(item.dep.target.module), i) for g in groups for item in g
             if graph.is_out_channel_pruning_fn(item.dep.handler)
             and isinstance(item.dep.target.module, (nn.Linear, nn.modules.conv._ConvNd)) for i in item.idxs}
    heads, dims, attentions = 0, set(), 0
    for g in groups:
        told = [num_heads[m] for m in {item.dep.target.module for item in g
                                       if graph.is_out_channel_pruning_fn(item.dep.handler)} if m in num_heads]
        heads += max(told, default=0)
        if told:
            attentions += 1
            dims |= {(id(item.dep.target.module), i) for item in g if graph.is_out_channel_pruning_fn(item.dep.handler)
                     and isinstance(item.dep.target.module, nn.Linear) for i in item.idxs}
    return Counted(len(pairs), len(groups), heads, head_dims=(len({m for m, _ in dims}), len(dims)),
                   attentions=attentions)


def why_fewer(why: dict[str, tuple[int, int]], limit: int = 3) -> str:
    """The reasons, head reasons first, then the most channels, the output layer's (it reaches the graph output,
    as torch-pruning ignores it) left out."""
    items = sorted(((r.startswith("heads: "), c, n, r) for r, (n, c) in why.items()
                    if r != "its channels reach the graph output"), reverse=True)
    text = "; ".join(f"{r} ({n} attention{'s' if n > 1 else ''})" if h
                     else f"{r} ({n} layer{'s' if n > 1 else ''}, {c:,} ch)" for h, c, n, r in items[:limit])
    return text + (f"; {len(items) - limit} more reasons" if len(items) > limit else "")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=("torchvision", "transformers"), default="torchvision",
                        help="torchvision: its 80 classification models (default); transformers: timm's and "
                             "Hugging Face's (the module docstring)")
    parser.add_argument("--models", nargs="*", help="model names of the suite (default: all of it)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--timeout", type=int, default=120,
                        help="seconds allowed to torch-pruning per model (default 120)")
    parser.add_argument("--tablefmt", default="github", help="tabulate's table format (default github)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)

    if args.suite == "torchvision":
        cases = [torchvision_case(name) for name in (args.models or TORCHVISION)]
    else:
        cases = [c for c in transformers_cases() if not args.models or c.name in args.models]
    rows, totals, fewer, failed = [], [0, 0, 0, 0], 0, 0
    for case in cases:
        start = time.perf_counter()
        model = case.build()
        x = case.example()
        row = [case.name, case.shown]
        try:
            ours = fxoto_channels(model, x)
        except Exception as exc:  # noqa: BLE001 (a row per model, whatever fails)
            ours = Counted(None, None, None, why={f"fxoto failed: {type(exc).__name__}: {exc}"[:120]: (0, 0)})
        try:
            theirs = torch_pruning_channels(model, x, args.timeout, case.num_heads(model))
            tp_note = theirs.groups
        except _TimedOut:
            theirs, tp_note = None, f"fails (over {args.timeout} s)"
        except Exception as exc:  # noqa: BLE001
            theirs, tp_note = None, f"fails ({type(exc).__name__}: {str(exc)[:60]})"
        row += [ours.channels, ours.groups, ours.layers, theirs and theirs.channels, tp_note,
                ours.heads, theirs and theirs.heads]
        if ours.channels is None or theirs is None:
            failed += 1
            row += ["-", why_fewer(ours.why) if ours.channels is None else ""]
        else:
            for i, n in enumerate((ours.channels, theirs.channels, ours.heads, theirs.heads)):
                totals[i] += n
            short = ours.channels < theirs.channels or ours.heads < theirs.heads
            fewer += short
            why = dict(ours.why)
            if theirs.head_dims[1]:
                why["q, k and v head dimensions, which torch-pruning prunes in its attention groups and fxoto keeps "
                    "(it removes heads whole)"] = theirs.head_dims
            if ours.heads < theirs.heads and not any(r.startswith("heads: ") for r in why):
                why["heads: attention not written as scaled_dot_product_attention (the attention fxoto's head groups "
                    "follow)"] = (theirs.attentions, 0)
            row += [f"{ours.channels / theirs.channels:.2f}" if theirs.channels else "-",
                    why_fewer(why) if short else ""]
        rows.append(row)
        print(f"  {case.name}: fxoto {ours.channels} channels {ours.heads} heads, torch-pruning "
              f"{theirs and theirs.channels} channels {theirs and theirs.heads} heads "
              f"({time.perf_counter() - start:.1f} s)", file=sys.stderr, flush=True)
        del model
        gc.collect()

    rows = [[f"{v:,}" if isinstance(v, int) else "" if v is None else v for v in row] for row in rows]
    print(tabulate(rows, headers=["model", "input", "fxoto channels", "fxoto groups", "fxoto layers",
                                  "torch-pruning channels", "tp groups", "fxoto heads", "tp heads", "fxoto / tp",
                                  "why fewer (fxoto's set-aside layers and attentions)"],
                   tablefmt=args.tablefmt, disable_numparse=True))
    compared = len(rows) - failed
    print(f"\ntotal over {compared} models both counted: fxoto {totals[0]:,} channels and {totals[2]:,} heads, "
          f"torch-pruning {totals[1]:,} channels ({totals[0] / max(totals[1], 1):.2f}) and {totals[3]:,} heads; "
          f"fxoto fewer on {fewer} of {compared}"
          + (f"; {failed} models not counted by one of them" if failed else ""))


if __name__ == "__main__":
    main()
