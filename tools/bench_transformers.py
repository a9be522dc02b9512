"""Hugging Face transformers through the export front end: capture and build time, groups, against torch-pruning.

For tiny random configurations (no download) of BERT, LLaMA with grouped-query attention and ViT,
and a larger BERT-base-shaped one (12 layers, 768 wide, 12 heads), this times, in one process on
the same model objects and taking turns for ``--repeats`` rounds after a warm-up:

* the capture alone (``fxoto.export.export_program``: ``torch.export`` with dynamic batch and sequence);
* ``fxoto.build_space(..., structures="both")`` (capture, shapes, operation, channel and head groups);
* torch-pruning's ``DependencyGraph().build_dependency`` on the same input,

and prints the medians, the ratio of fxoto's build to torch-pruning's, and the groups fxoto finds
per kind (operations, MLP neurons as channels, heads) beside the heads torch-pruning would need to be
told about by hand (its ``num_heads`` argument).

    PYTHONPATH=. .venv/bin/python tools/bench_transformers.py [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
from tabulate import tabulate

import fxoto
from fxoto.export import export_program


def _models():
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaModel, ViTConfig, ViTModel

    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    llama = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=64, use_cache=False)
    bert = BertConfig(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=8,
                      intermediate_size=96, max_position_embeddings=64)
    base = BertConfig(vocab_size=1000, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                      intermediate_size=3072, max_position_embeddings=128)
    vit = ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=64, num_hidden_layers=2,
                    num_attention_heads=8, intermediate_size=96)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return {
        "bert (tiny)": (BertModel(bert).eval(), ids),
        "llama gqa (tiny)": (LlamaModel(llama).eval(), ids),
        "vit (tiny)": (ViTModel(vit).eval(), images),
        "bert-base shape": (BertModel(base).eval(), ids),
    }


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import torch_pruning as tp

    rows = []
    for name, (model, x) in _models().items():
        def export():
            return export_program(model, (x,), {})

        def build():
            return fxoto.build_space(model, (x,), structures="both")

        def prune():
            return tp.DependencyGraph().build_dependency(model, example_inputs=x)

        takes = {"export": [], "fxoto": [], "tp": []}
        tp_error = None
        for round_ in range(args.repeats + 1):
            for key, fn in (("export", export), ("fxoto", build), ("tp", prune)):
                if key == "tp" and tp_error is not None:
                    continue
                try:
                    seconds = _time(fn)
                except Exception as exc:  # noqa: BLE001 (torch-pruning's failure is a result)
                    tp_error = f"{type(exc).__name__}"
                    continue
                if round_:
                    takes[key].append(seconds)
        space = build()
        kinds = {}
        for g in space.groups:
            kinds[g.kind] = kinds.get(g.kind, 0) + 1
        med = {k: statistics.median(v) if v else None for k, v in takes.items()}
        rows.append([
            name, f"{med['export']:.2f}", f"{med['fxoto']:.2f}",
            f"{med['tp']:.2f}" if med["tp"] else f"fails ({tp_error})",
            f"{med['fxoto'] / med['tp']:.2f}x" if med["tp"] else "-",
            kinds.get("operation", 0), kinds.get("channel", 0), kinds.get("head", 0),
        ])
    print(tabulate(rows, headers=["model", "capture s", "fxoto build s", "tp build s", "fxoto / tp",
                                  "operations", "neurons", "heads"]))


if __name__ == "__main__":
    main()
