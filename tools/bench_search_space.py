"""Search-space build time: fxoto against torch-pruning, and growth with graph size (DESIGN 8).

For six torchvision models (random init, eval, one 1x3x224x224 input) this times, in one process
and on the same model objects, ``fxoto.build_space`` (operations, the default), ``fxoto.build_space``
with ``structures="both"`` (operation and channel groups) and ``"channels"``, and torch-pruning's
``DependencyGraph().build_dependency``, taking turns for ``--repeats`` rounds after one warm-up,
and prints the median and the minimum of each and their ratios to torch-pruning (targets: 0.5
or less for operations, 1 or less for both). Both trace the model and find which tensors must change together, though not the same
thing: torch-pruning's graph couples channels for channel pruning, fxoto's groups are whole
removable segments. torch-pruning runs a real forward pass at 224x224 (most of its time is in
``conv2d``), fxoto computes shapes without arithmetic; so torch-pruning's time follows the
load on the machine far more than fxoto's does, and the minima are the steadier comparison.

``build_space`` returns everything the search and H2SPG need; the runnable ``GraphModule``
(``SearchSpace.gm``, for ``construct_subnet``, pictures and tests) is built on first use. That
first use is timed apart, in the last column, and is not in the ratio.  So are, for "both", the
per-channel groups (``SearchSpace.groups`` and ``.slices``, one GeZIG per channel class), made on
first use: like torch-pruning's groups, which its ``get_all_groups`` makes from the graph.

Then it times fxoto on the super-network zoo (``fxoto.zoo.MODELS``), with the fx node count and
the time per node, so that the growth from darts8 to darts14 can be read off as about linear.
``--update-docs`` writes the GeZIG counts and build times into ``docs/zoo.md``.

    PYTHONPATH=. .venv/bin/python tools/bench_search_space.py [--repeats 5] [--threads 2] [--update-docs]

Runs on ``--threads`` threads (default 2, as the operations timings in the docs were taken).
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torchvision  # noqa: E402
from tabulate import tabulate  # noqa: E402

import fxoto  # noqa: E402
from fxoto.zoo import MODELS, example_input  # noqa: E402

TORCHVISION = ["resnet18", "resnet50", "mobilenet_v2", "densenet121", "efficientnet_b0", "regnet_x_400mf"]
TARGET = 0.5
TARGET_BOTH = 1.0


def timings(fns: list[Callable[[], object]], repeats: int) -> list[list[float]]:
    """Wall times of each of ``fns`` over ``repeats`` rounds, after one warm-up round.

    The functions take turns within each round, so that load from other processes on the
    machine falls on all of them alike.
    """
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, spent in zip(fns, times):
            gc.collect()
            start = time.perf_counter()
            fn()
            spent.append(time.perf_counter() - start)
    return times


def first_use(build: Callable[[], fxoto.SearchSpace], use: Callable[[fxoto.SearchSpace], object],
              repeats: int) -> float:
    """Median time of ``use`` on a fresh search space (what it reads is made on first use)."""
    spent = []
    for _ in range(repeats):
        space = build()
        gc.collect()
        start = time.perf_counter()
        use(space)
        spent.append(time.perf_counter() - start)
    return statistics.median(spent)


def bench_torchvision(names: list[str], repeats: int) -> list[list]:
    import torch_pruning as tp

    rows = []
    for name in names:
        model = torchvision.models.get_model(name).eval()
        x = torch.randn(1, 3, 224, 224)
        space = fxoto.build_space(model, (x,))
        both = fxoto.build_space(model, (x,), structures="both")
        channels = fxoto.build_space(model, (x,), structures="channels")
        all_fxoto, all_both, all_channels, all_tp = timings([
            lambda: fxoto.build_space(model, (x,)),
            lambda: fxoto.build_space(model, (x,), structures="both"),
            lambda: fxoto.build_space(model, (x,), structures="channels"),
            lambda: tp.DependencyGraph().build_dependency(model, example_inputs=x),
        ], repeats)
        t_fxoto, t_both, t_tp = statistics.median(all_fxoto), statistics.median(all_both), statistics.median(all_tp)
        ratio, ratio_both = t_fxoto / t_tp, t_both / t_tp
        t_gm = first_use(lambda: fxoto.build_space(model, (x,)), lambda space: space.gm, repeats)
        t_groups = first_use(lambda: fxoto.build_space(model, (x,), structures="both"),
                             lambda space: (space.groups, space.slices), repeats)
        n_channels = sum(g.kind == "channel" for g in both.groups)
        rows.append([name, len(space.graph.nodes), len(space.groups), 1e3 * t_fxoto, 1e3 * min(all_fxoto),
                     1e3 * t_tp, 1e3 * min(all_tp), ratio, min(all_fxoto) / min(all_tp),
                     "yes" if ratio <= TARGET else "NO", 1e3 * t_gm,
                     n_channels, 1e3 * t_both, 1e3 * min(all_both), ratio_both, min(all_both) / min(all_tp),
                     "yes" if ratio_both <= TARGET_BOTH else "NO", 1e3 * t_groups,
                     len(channels.groups), 1e3 * statistics.median(all_channels), statistics.median(all_channels) / t_tp])
        print(f"  {name}: fxoto {1e3 * t_fxoto:.1f} ms, both {1e3 * t_both:.1f} ms, torch-pruning {1e3 * t_tp:.1f} ms",
              file=sys.stderr, flush=True)
    return rows


def bench_zoo(names: list[str], repeats: int) -> list[list]:
    rows = []
    for name in names:
        torch.manual_seed(0)
        model = MODELS[name]().eval()
        x = example_input(name)
        space = fxoto.build_space(model, (x,))
        seconds = statistics.median(timings([lambda: fxoto.build_space(model, (x,))], repeats)[0])
        nodes = len(space.graph.nodes)
        rows.append([name, "x".join(map(str, x.shape[1:])), nodes, len(space.groups), 1e3 * seconds, 1e6 * seconds / nodes])
        print(f"  {name}: {1e3 * seconds:.1f} ms", file=sys.stderr, flush=True)
    return rows


def update_zoo_doc(rows: list[list], doc: Path) -> None:
    """Fill the last two columns (GeZIGs, build time) of each model's row in ``docs/zoo.md``."""
    text = doc.read_text()
    for name, _shape, _nodes, groups, ms, _per_node in rows:
        pattern = re.compile(rf"^(\| `{re.escape(name)}` \|.*?)\|[^|\n]*\|[^|\n]*\|[ \t]*$", re.M)
        text, n = pattern.subn(lambda m: f"{m.group(1)}| {groups} | {ms:.0f} ms |", text)
        if n != 1:
            raise SystemExit(f"{doc}: found {n} table rows for `{name}`, expected one")
    doc.write_text(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs after one warm-up (default 5)")
    parser.add_argument("--models", nargs="*", default=TORCHVISION, help="torchvision models to compare")
    parser.add_argument("--zoo", nargs="*", default=list(MODELS), help="fxoto.zoo super-networks to time")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--update-docs", action="store_true", help="write GeZIGs and build time into docs/zoo.md")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats} after 1 warm-up, "
          f"load average {os.getloadavg()[0]:.2f} (1 min) at the start\n")

    if args.models:
        rows = bench_torchvision(args.models, args.repeats)
        print(tabulate([row[:11] for row in rows],
                       headers=["model (224x224)", "fx nodes", "GeZIGs", "fxoto median (ms)", "fxoto min",
                                "torch-pruning median (ms)", "tp min", "ratio of medians", "ratio of minima",
                                f"median ratio <= {TARGET}", "GraphModule, first use (ms)"],
                       floatfmt=(".0f", ".0f", ".0f", ".1f", ".1f", ".1f", ".1f", ".3f", ".3f", "", ".1f"), tablefmt="github"))
        print('\nstructures="both" (operation and channel groups), timed in the same rounds:\n')
        print(tabulate([[row[0], row[2], *row[11:]] for row in rows],
                       headers=["model (224x224)", "GeZIGs", "channel groups", "both median (ms)", "both min",
                                "both / tp, medians", "both / tp, minima", f"median ratio <= {TARGET_BOTH:g}",
                                "groups, first use (ms)", '"channels" groups', '"channels" median (ms)',
                                '"channels" / tp, medians'],
                       floatfmt=(".0f", ".0f", ".0f", ".1f", ".1f", ".3f", ".3f", "", ".1f", ".0f", ".1f", ".3f"),
                       tablefmt="github"))
        print('\nIn "both", a layer inside a GeZIG is set aside so that the two kinds stay disjoint (where every '
              'convolution lies in a GeZIG, "both" has no channel groups); "channels" times the '
              'channel walk over every layer.')
        print("\nfxoto's time is build_space's; the GraphModule (SearchSpace.gm) and, in \"both\", the channel groups "
              "(SearchSpace.groups and .slices) are made on first use, timed apart")
        print(f"load average {os.getloadavg()[0]:.2f} (1 min) at the end of the comparison\n")
    if args.zoo:
        zoo = bench_zoo(args.zoo, args.repeats)
        print(tabulate(zoo, headers=["super-network", "input", "fx nodes", "GeZIGs", "fxoto (ms)", "us per node"],
                       floatfmt=(".0f", ".0f", ".0f", ".0f", ".1f", ".1f"), tablefmt="github"))
        darts = {row[0]: row for row in zoo if row[0] in ("darts8", "darts14")}
        if len(darts) == 2:
            small, large = darts["darts8"], darts["darts14"]
            print(f"\ndarts8 -> darts14: {large[2] / small[2]:.2f}x the nodes, {large[4] / small[4]:.2f}x the time")
        if args.update_docs:
            update_zoo_doc(zoo, ROOT / "docs" / "zoo.md")
            print("updated docs/zoo.md")


if __name__ == "__main__":
    main()
