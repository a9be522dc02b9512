"""Sub-network construction time and inference latency against the super-network.

    python tools/bench_subnet.py [--repeats 10]

For resnet50, densenet121, mobilenet_v2 and DemoSupNet, about half of the GeZIGs
are erased (the groups are tried in a seeded random order and kept while the
removal stays valid).  Printed in one table, measured in one process:
``construct_subnet()`` time, the MACs ratio (thop), and the CPU latency ratio
sub / super at batch 1 and batch 32 (median of ``--repeats`` runs, 2 threads).
Target: the latency ratio within 15% of the MACs ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchvision
from tabulate import tabulate

import fxoto
from fxoto.metrics import count_flops, count_parameters
from fxoto.zoo import DemoSupNet

MODELS = {
    "resnet50": (lambda: torchvision.models.resnet50(), (3, 224, 224)),
    "densenet121": (lambda: torchvision.models.densenet121(), (3, 224, 224)),
    "mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(), (3, 224, 224)),
    "demosupnet": (lambda: DemoSupNet(), (1, 28, 28)),
}


@torch.no_grad()
def latency(model, x, repeats):
    model(x)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = []
    for name in args.models:
        make, shape = MODELS[name]
        model = make().eval()
        x1 = torch.randn(1, *shape)
        space = fxoto.build_space(model, (x1,))
        ids = space.sample_removal(0.5)
        space.zero_(ids)
        t = time.perf_counter()
        sub = space.construct_subnet()
        build = time.perf_counter() - t
        macs = count_flops(sub, x1) / count_flops(model, x1)
        params = count_parameters(sub) / count_parameters(model)
        row = [name, f"{len(ids)}/{len(space.groups)}", f"{build:.3f}", f"{params:.3f}", f"{macs:.3f}"]
        for batch in (1, 32):
            x = torch.randn(batch, *shape)
            ratio = latency(sub, x, args.repeats) / latency(model, x, args.repeats)
            row += [f"{ratio:.3f}", f"{ratio / macs:.2f}"]
        rows.append(row)
        print(tabulate(rows[-1:], tablefmt="plain"), flush=True)
    headers = ["model", "erased", "construct (s)", "params ratio", "MACs ratio",
               "latency ratio b1", "vs MACs b1", "latency ratio b32", "vs MACs b32"]
    print()
    print(tabulate(rows, headers=headers, disable_numparse=True))


if __name__ == "__main__":
    main()
