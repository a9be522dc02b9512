"""Channel coverage: the channels fxoto can slim against those torch-pruning can prune.

For each torchvision classification model (random values, eval, one small input as in
``tests/zoo_models.py``) this counts, side by side, layer channels: the (layer, output
channel) pairs that some group removes, over the Conv and Linear layers.

* fxoto: the rows held by the channel groups of ``fxoto.build_space(model, x,
  structures="channels")`` and the entries of depthwise convolutions they slice, beside the number of groups (a channel coupled through an add
  is one group holding a row of each stem; a grouped convolution's group goes whole) and of
  layers;
* torch-pruning: the output channels removed by the pruning groups of
  ``DependencyGraph().get_all_groups`` (Conv and Linear roots, the 1000-class output layer
  ignored, as in torch-pruning's own examples), beside the number of groups.

Counting layer channels on both sides makes the two comparable whatever each couples: fxoto
removes a ResNeXt conv group's input and output channels in one group, torch-pruning
counts the two layers in two groups. Neither count says that all of a layer's channels may
go (fxoto keeps one per layer). Where fxoto counts fewer, the last column says why, from
``SearchSpace.excluded``: the layers set aside, grouped by reason (the node names dropped),
with their output channels, largest first. Totals at the end. torch-pruning is given up
after ``--timeout`` seconds per model.

    PYTHONPATH=. .venv/bin/python tools/channel_coverage.py [--models resnet18 vgg11_bn ...] [--threads 1]
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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from tabulate import tabulate  # noqa: E402
from torch import nn  # noqa: E402

import fxoto  # noqa: E402
from fxoto.shapes import SHAPE  # noqa: E402
from tests.zoo_models import TORCHVISION, build, input_size  # noqa: E402

_NAMED = re.compile(r"'[^']*' \(([^)]*)\)")  # "'add_3' (add)" -> "add"


def fxoto_channels(model: nn.Module, x: torch.Tensor) -> tuple[int, int, int, dict[str, tuple[int, int]]]:
    """Layer channels in groups, channel groups, their layers, and the set-aside layers: reason -> (layers, channels).

    Layer channels: the (layer, output channel) pairs that some channel group holds: its stems'
    rows, and the entries of a depthwise convolution on the way (a layer of its own, which
    torch-pruning counts as one).
    """
    space = fxoto.build_space(model, (x,), structures="channels")
    ids = [g.id for g in space.groups if g.kind == "channel"]
    nodes = {n.name: n for n in space.graph.nodes}
    layers = {name for name, n in nodes.items() if n.op == "call_module"
              and isinstance(model.get_submodule(n.target), (nn.Linear, nn.modules.conv._ConvNd))}
    channels = len({row for i in ids for row in space.slices[i].rows}
                   | {entry for i in ids for entry in space.slices[i].entries if entry[0] in layers})
    why: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for e in space.excluded:
        reason = _NAMED.sub(r"\1", e.reason.removeprefix("channels: ")).split(": ")[0]
        why[reason][0] += 1
        why[reason][1] += _out_channels(nodes.get(e.nodes[0]), model)
    return channels, len(ids), len(space.layers), {r: (n, c) for r, (n, c) in why.items()}


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


def torch_pruning_channels(model: nn.Module, x: torch.Tensor, timeout: int) -> tuple[int, int]:
    """Layer channels in torch-pruning's pruning groups, and the groups.

    Layer channels: the (Conv or Linear module, output channel) pairs that some group's
    output-channel pruning removes.

    Given up after ``timeout`` seconds (``_TimedOut``): on Swin, torch-pruning's
    ``get_all_groups`` ran for more than five minutes.
    """
    import torch_pruning as tp

    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(timeout)
    try:
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=x)
        classifier = [m for m in model.modules()  # the 1000-class output layer: Linear, or SqueezeNet's Conv
                      if getattr(m, "out_features", None) == 1000 or getattr(m, "out_channels", None) == 1000]
        groups = list(graph.get_all_groups(ignored_layers=classifier))
    finally:
        signal.alarm(0)
    pairs = {(id(item.dep.target.module), i) for g in groups for item in g
             if graph.is_out_channel_pruning_fn(item.dep.handler)
             and isinstance(item.dep.target.module, (nn.Linear, nn.modules.conv._ConvNd)) for i in item.idxs}
    return len(pairs), len(groups)


def why_fewer(why: dict[str, tuple[int, int]], limit: int = 3) -> str:
    """The reasons, most channels first, the classifier (it reaches the output, as torch-pruning ignores it) left out."""
    items = sorted(((c, n, r) for r, (n, c) in why.items() if r != "its channels reach the graph output"), reverse=True)
    text = "; ".join(f"{r} ({n} layer{'s' if n > 1 else ''}, {c:,} ch)" for c, n, r in items[:limit])
    return text + (f"; {len(items) - limit} more reasons" if len(items) > limit else "")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=TORCHVISION, help="torchvision model names (default: all 80)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--timeout", type=int, default=120,
                        help="seconds allowed to torch-pruning per model (default 120)")
    parser.add_argument("--tablefmt", default="github", help="tabulate's table format (default github)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)

    rows, totals, fewer, failed = [], [0, 0], 0, 0
    for name in args.models:
        start = time.perf_counter()
        model = build(name)
        size = input_size(name)
        x = torch.randn(1, 3, size, size)
        row = [name, size]
        try:
            ours, groups, layers, why = fxoto_channels(model, x)
        except Exception as exc:  # noqa: BLE001 (a row per model, whatever fails)
            ours, groups, layers, why = None, None, None, {f"fxoto failed: {type(exc).__name__}: {exc}"[:120]: (0, 0)}
        try:
            theirs, tp_groups = torch_pruning_channels(model, x, args.timeout)
        except _TimedOut:
            theirs, tp_groups = None, f"over {args.timeout} s"
        except Exception as exc:  # noqa: BLE001
            theirs, tp_groups = None, f"failed: {type(exc).__name__}"
        row += [ours, groups, layers, theirs, tp_groups]
        if ours is None or theirs is None:
            failed += 1
            row += ["-", why_fewer(why) if ours is None else ""]
        else:
            totals[0] += ours
            totals[1] += theirs
            fewer += ours < theirs
            row += [f"{ours / theirs:.2f}" if theirs else "-", why_fewer(why) if ours < theirs else ""]
        rows.append(row)
        print(f"  {name}: fxoto {ours}, torch-pruning {theirs} ({time.perf_counter() - start:.1f} s)",
              file=sys.stderr, flush=True)
        del model
        gc.collect()

    rows = [[f"{v:,}" if isinstance(v, int) else "" if v is None else v for v in row] for row in rows]
    print(tabulate(rows, headers=["model", "input", "fxoto channels", "fxoto groups", "fxoto layers", "torch-pruning channels",
                                  "tp groups", "fxoto / tp", "why fewer (fxoto's set-aside layers)"],
                   tablefmt=args.tablefmt, disable_numparse=True))
    compared = len(rows) - failed
    print(f"\ntotal over {compared} models both counted: fxoto {totals[0]:,} channels, torch-pruning "
          f"{totals[1]:,} channels ({totals[0] / max(totals[1], 1):.2f}); fxoto fewer on {fewer} of {compared}"
          + (f"; {failed} models not counted by one of them" if failed else ""))


if __name__ == "__main__":
    main()
