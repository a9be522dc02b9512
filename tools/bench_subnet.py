"""Sub-network construction time and inference latency against the super-network.

    python tools/bench_subnet.py [--repeats 10] [--threads 2] [--models resnet50 resnet50-channels ...]

For resnet50, densenet121, mobilenet_v2 and DemoSupNet, about half of the GeZIGs
are erased (the groups are tried in a seeded random order and kept while the
removal stays valid); for ``resnet50-channels`` (``structures="channels"``)
about half of its channel groups, drawn the same way, so every layer is slimmed.
Printed in one table, measured in one process: ``construct_subnet()`` time, the
largest output difference sub / zeroed super (relative), the parameters and MACs ratios
(thop), the super-network's CPU latency and the latency ratio sub / super at batch 1
and batch 32 (median of ``--repeats`` rounds in which the two take turns, on
``--threads`` threads) and its ratio to the MACs ratio. Target: the latency ratio within 15% of the MACs ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torchvision
from tabulate import tabulate

import fxoto
from fxoto.metrics import count_flops, count_parameters
from fxoto.zoo import DemoSupNet

MODELS = {  # name: (builder, input shape, structures)
    "resnet50": (lambda: torchvision.models.resnet50(), (3, 224, 224), "operations"),
    "densenet121": (lambda: torchvision.models.densenet121(), (3, 224, 224), "operations"),
    "mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(), (3, 224, 224), "operations"),
    "demosupnet": (lambda: DemoSupNet(), (1, 28, 28), "operations"),
    "resnet50-channels": (lambda: torchvision.models.resnet50(), (3, 224, 224), "channels"),
}


@torch.no_grad()
def latencies(models, x, repeats):
    """Median forward time of each model, the models taking turns in every round (shared load falls alike)."""
    for model in models:
        model(x)
    times = [[] for _ in models]
    for _ in range(repeats):
        for model, spent in zip(models, times):
            t = time.perf_counter()
            model(x)
            spent.append(time.perf_counter() - t)
    return [statistics.median(spent) for spent in times]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats}, "
          f"load average {os.getloadavg()[0]:.2f} (1 min) at the start", flush=True)
    rows = []
    for name in args.models:
        make, shape, structures = MODELS[name]
        torch.manual_seed(0)
        model = make().eval()
        x1 = torch.randn(1, *shape)
        space = fxoto.build_space(model, (x1,), structures=structures)
        ids = space.sample_removal(0.5)
        space.zero_(ids)
        t = time.perf_counter()
        sub = space.construct_subnet()
        build = time.perf_counter() - t
        macs = count_flops(sub, x1) / count_flops(model, x1)
        params = count_parameters(sub) / count_parameters(model)
        with torch.no_grad():
            expected = model(x1)
            diff = (sub(x1) - expected).abs().max().item() / max(1.0, expected.abs().max().item())
        row = [name, f"{len(ids)}/{len(space.groups)}", f"{build:.3f}", f"{diff:.1e}", f"{params:.3f}", f"{macs:.3f}"]
        for batch in (1, 32):
            x = torch.randn(batch, *shape)
            t_sub, t_super = latencies([sub, model], x, args.repeats)
            ratio = t_sub / t_super
            row += [f"{1e3 * t_super:.1f}", f"{ratio:.3f}", f"{ratio / macs:.2f}"]
        rows.append(row)
        print(tabulate(rows[-1:], tablefmt="plain"), flush=True)
    headers = ["model", "erased", "construct (s)", "rel. output diff", "params ratio", "MACs ratio",
               "super b1 (ms)", "latency ratio b1", "vs MACs b1", "super b32 (ms)", "latency ratio b32", "vs MACs b32"]
    print()
    print(tabulate(rows, headers=headers, disable_numparse=True, tablefmt="github"))
    print(f"\nload average {os.getloadavg()[0]:.2f} (1 min) at the end")


if __name__ == "__main__":
    main()
