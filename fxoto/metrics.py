"""Size and cost of a super-network and of its sub-network (paper, Tables 1-3).

* ``count_parameters``: trainable variables, each shared tensor once.
* ``count_flops``: multiply-accumulates (MACs) counted by ``thop``. The paper's "FLOPs" are
  MACs (its Table 3 lists DARTS at 574 M, the multiply-add count DARTS reports for itself);
  two FLOPs per MAC gives FLOPs in the strict sense.
* ``count_flops_torch``: FLOPs (2 per MAC) counted by ``torch.utils.flop_counter``, an
  independent cross-check of ``count_flops``.
* ``compare`` / ``report_table``: the super-network beside its sub-network.
* ``HostReads``: how many times code reads tensor values back to the host (each such read waits
  for the GPU's queued work).

What each counter sees differs. thop hooks leaf modules (convolutions, linear layers, and also
batch norm, pooling and activations) and, through a ``TorchFunctionMode``, functional
products (``matmul``, ``F.linear``, ``einsum``, attention). Element-wise functional ops inside a
``GraphModule`` (the ``add`` and ``cat`` joints, ``relu`` called as a function) are not
counted. ``FlopCounterMode`` counts only the matrix products and convolutions (including
``F.conv*`` and ``matmul``) at the aten level, whatever module or function runs them. On a
network whose compute is in convolutions and linear layers the two agree to about 1 % (thop's
extra being batch norm and pooling).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from tabulate import tabulate
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["HostReads", "compare", "count_flops", "count_flops_torch", "count_parameters", "report_table"]


class HostReads(TorchDispatchMode):
    """Counts, while active, the reads of tensor values back to the host: aten's scalar reads
    (``item``, ``float(t)``, ``bool(t)``, indexing by a tensor) and ``Tensor.tolist``, which aten
    does not see.  On a GPU each one waits for all queued work; on the CPU they are counted
    alike, so a test without a GPU holds the same property.

        with HostReads() as reads:
            opt.step()
        assert reads.count == 0
    """

    READS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default)

    def __init__(self):
        super().__init__()
        self.count = 0
        self._tolist = None

    def __enter__(self):
        self._tolist = tolist = torch.Tensor.tolist

        def counted(t):
            self.count += 1
            return tolist(t)

        torch.Tensor.tolist = counted
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in self.READS
        return func(*args, **(kwargs or {}))


def _as_tuple(example_inputs: Any) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    return tuple(example_inputs)


def count_parameters(model: nn.Module) -> int:
    """Number of scalar parameters; a tensor shared by several modules counts once."""
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, example_inputs: Sequence[Any] | torch.Tensor) -> int:
    """Multiply-accumulates (MACs) of one forward pass, counted by ``thop.profile``.

    Works on a plain ``nn.Module`` and on a ``torch.fx.GraphModule`` (the sub-network), whose
    generated code calls the same leaf modules that thop hooks. thop runs on a deep copy in eval
    mode, so neither the caller's modules nor their train/eval flags are touched (older thop
    releases leave ``total_ops`` / ``total_params`` buffers on every module). Element-wise
    functional ops (``add``, ``cat``) are not counted; see the module docstring.
    """
    import thop

    macs, _params = thop.profile(copy.deepcopy(model).eval(), inputs=_as_tuple(example_inputs), verbose=False)
    return int(macs)


def count_flops_torch(model: nn.Module, example_inputs: Sequence[Any] | torch.Tensor) -> int:
    """FLOPs (two per multiply-accumulate) of one forward pass, by ``FlopCounterMode``.

    Counts convolutions and matrix products only. Runs on a deep copy in eval mode under
    ``torch.no_grad()``, so batch-norm statistics of the caller's model stay as they are.
    """
    from torch.utils.flop_counter import FlopCounterMode

    probe = copy.deepcopy(model).eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        probe(*_as_tuple(example_inputs))
    return int(counter.get_total_flops())


def compare(
    super_model: nn.Module,
    subnet: nn.Module,
    example_inputs: Sequence[Any] | torch.Tensor,
    erased_groups: int,
) -> list[dict[str, Any]]:
    """One row per network: parameters, MACs, their ratio to the super-network's, groups erased."""
    measured = [
        ("super-network", count_parameters(super_model), count_flops(super_model, example_inputs), 0),
        ("sub-network", count_parameters(subnet), count_flops(subnet, example_inputs), erased_groups),
    ]
    _, params, macs, _ = measured[0]
    return [
        {
            "network": name,
            "parameters": p,
            "MACs": m,
            "parameters ratio": p / params if params else float("nan"),
            "MACs ratio": m / macs if macs else float("nan"),
            "groups erased": erased,
        }
        for name, p, m, erased in measured
    ]


def report_table(rows: list[dict[str, Any]]) -> str:
    """``compare``'s rows as a text table: counts in millions, ratios in percent.

    Rows that carry an ``"accuracy (%)"`` (the search report's) get that column too.
    """
    accuracy = all("accuracy (%)" in row for row in rows)
    table = []
    for row in rows:
        table.append([
            row["network"],
            f"{row['parameters'] / 1e6:.3f}",
            f"{row['MACs'] / 1e6:.1f}",
            f"{100 * row['parameters ratio']:.1f}",
            f"{100 * row['MACs ratio']:.1f}",
            row["groups erased"],
        ])
        if accuracy:
            table[-1].append("-" if row["accuracy (%)"] is None else f"{row['accuracy (%)']:.2f}")
    headers = ["network", "params (M)", "MACs (M)", "params (%)", "MACs (%)", "groups erased"]
    headers += ["accuracy (%)"] if accuracy else []
    return tabulate(table, headers=headers, disable_numparse=True, colalign=("left",) + ("right",) * (len(headers) - 1))
