"""The end-of-search report: what was erased, what it saved, and proof of exactness."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from tabulate import tabulate

from fxoto.metrics import compare, report_table
from fxoto.train import count_correct


@dataclass(frozen=True)
class Report:
    rows: list[dict[str, Any]]
    erased: list[int]
    max_output_difference: float
    table: str
    channel_groups_erased: int = 0  # of ``erased``: the channel groups (the rest are GeZIGs)

    def markdown(self) -> str:
        headers = list(self.rows[0])
        body = [[r[h] for h in headers] for r in self.rows]
        if self.channel_groups_erased:
            n = self.channel_groups_erased
            erased = f"groups erased: {len(self.erased) - n} GeZIGs and {n} channel groups (ids in report.json)"
        else:
            erased = f"GeZIGs erased: {self.erased}"
        return (
            tabulate(body, headers=headers, tablefmt="github", floatfmt=".4g")
            + f"\n\n{erased}\n\nmax |super - sub| output difference: {self.max_output_difference:.3g}\n"
        )

    def as_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "erased": self.erased, "channel_groups_erased": self.channel_groups_erased,
                "max_output_difference": self.max_output_difference}


@torch.no_grad()
def _outputs(model, loader_or_input):
    model.eval()
    if isinstance(loader_or_input, torch.Tensor):
        return [model(loader_or_input)], None
    outs, correct, total = [], 0.0, 0
    for x, y in loader_or_input:
        out = model(x)
        outs.append(out)
        hits = count_correct(out, y)
        correct = None if hits is None or correct is None else correct + hits
        total += len(y)
    return outs, (None if correct is None or not total else correct / total)


def search_report(search, example_inputs=None, val_loader=None) -> Report:
    """Compare the trained super-network with its sub-network (eval mode)."""
    model, space = search.model, search.space
    sub = space.construct_subnet()
    erased = space.zero_groups()
    if example_inputs is None:
        example_inputs = next(iter(val_loader))[0][:1] if val_loader is not None else None
    if example_inputs is None:
        raise ValueError("report() needs example_inputs or a val_loader")
    x = example_inputs if isinstance(example_inputs, torch.Tensor) else example_inputs[0]
    rows = compare(model, sub, x, len(erased))
    super_out, super_acc = _outputs(model, val_loader if val_loader is not None else x)
    sub_out, sub_acc = _outputs(sub, val_loader if val_loader is not None else x)
    diff = max((a - b).abs().max().item() for a, b in zip(super_out, sub_out))
    for row, acc in zip(rows, (super_acc, sub_acc)):
        row["accuracy (%)"] = None if acc is None else round(100 * acc, 2)
    table = report_table(rows) + f"\nmax |super - sub| output difference: {diff:.3g}"
    channels = sum(space.groups[i].kind == "channel" for i in erased)
    return Report(rows, erased, diff, table, channels)
