"""A small LLaMA-style language model searched end to end: H2SPG on heads and neurons, the sub-network in its own class.

The corpus is on every machine without a download: the Python standard library's own source files
(``sysconfig.get_paths()["stdlib"]``, ``*.py``, sorted by path), read as bytes (tokens 0..255); every
20th file is held out for validation.  A ``LlamaForCausalLM`` built from a config (4 layers, 192 wide,
6 query heads sharing 2 key/value heads of 32, 512 MLP neurons, tied embeddings: 1.7 M parameters) is
trained on 100 batches of 16 windows of 64 bytes

* with AdamW (the baseline), and
* with H2SPG (AdamW variant), ``K = {"heads": 4, "channels": 0.5}`` with ``uniform=True``: half the
  key/value heads (with their query heads) and half the MLP neurons, as many in every layer,

on the same batches.  The H2SPG super-network is then sliced in place
(``construct_subnet(in_place=True)``): a ``LlamaForCausalLM`` again, its config rewritten, with
``generate()`` and its KV cache.  One table: validation perplexity of the three models, parameters and
MACs (per 64-byte sequence) kept, and greedy generation speed (tokens per second, KV cache on) of the
sub-network against the super-network at batch 1 and batch 16, timed alternately, median of
``--repeats``.

    PYTHONPATH=. .venv/bin/python tools/lm_run.py            # 15 minutes on 2 cores shared with other jobs
    PYTHONPATH=. .venv/bin/python tools/lm_run.py --quick    # a tiny model and a few steps (the test suite)
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import sysconfig
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fxoto  # noqa: E402
from fxoto.metrics import count_flops_torch, count_parameters  # noqa: E402


@dataclass(frozen=True)
class Setting:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    neurons: int
    steps: int
    batch: int
    seq: int
    corpus_mb: float
    val_batches: int
    new_tokens: int
    lr: float = 2e-3


FULL = Setting(hidden=192, layers=4, heads=6, kv_heads=2, neurons=512, steps=100, batch=16, seq=64, corpus_mb=8.0,
               val_batches=32, new_tokens=64)
QUICK = Setting(hidden=64, layers=2, heads=4, kv_heads=2, neurons=64, steps=8, batch=4, seq=32, corpus_mb=0.5,
                val_batches=2, new_tokens=4)


def corpus(megabytes: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Bytes of the standard library's ``.py`` files (sorted by path): (train, validation), every 20th file held out."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py"))
    train, val, size = [], [], 0
    for i, path in enumerate(files):
        if "site-packages" in path.parts:
            continue
        data = path.read_bytes()
        (val if i % 20 == 0 else train).append(data)
        size += len(data)
        if size >= megabytes * 2**20:
            break
    as_tensor = lambda parts: torch.frombuffer(bytearray(b"".join(parts)), dtype=torch.uint8).long()  # noqa: E731
    return as_tensor(train), as_tensor(val)


def batches(data: torch.Tensor, count: int, batch: int, seq: int, seed: int):
    """``count`` batches of random windows of ``seq`` bytes."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(count):
        starts = torch.randint(0, len(data) - seq, (batch,), generator=g)
        yield torch.stack([data[s:s + seq] for s in starts.tolist()])


def build(s: Setting):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=256, hidden_size=s.hidden, intermediate_size=s.neurons, num_hidden_layers=s.layers,
                      num_attention_heads=s.heads, num_key_value_heads=s.kv_heads, max_position_embeddings=4 * s.seq,
                      use_cache=False, tie_word_embeddings=True, bos_token_id=None, eos_token_id=None, pad_token_id=0)
    return LlamaForCausalLM(cfg)


def train(model, opt, data: torch.Tensor, s: Setting, seed: int) -> None:
    model.train()
    for batch in batches(data, s.steps, s.batch, s.seq, seed):
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()


@torch.no_grad()
def perplexity(model, data: torch.Tensor, s: Setting) -> float:
    model.eval()
    losses = [model(input_ids=b, labels=b).loss.item() for b in batches(data, s.val_batches, s.batch, s.seq, 12345)]
    return math.exp(sum(losses) / len(losses))


@torch.no_grad()
def tokens_per_second(models, prompt: torch.Tensor, new_tokens: int, repeats: int) -> list[float]:
    """Greedy generation with the KV cache, the models timed in turn after a warm-up; median of ``repeats``."""
    times = [[] for _ in models]
    for r in range(repeats + 1):
        for i, m in enumerate(models):
            start = time.perf_counter()
            m.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, use_cache=True)
            if r:
                times[i].append(time.perf_counter() - start)
    return [prompt.shape[0] * new_tokens / statistics.median(t) for t in times]


def run(s: Setting, seed: int = 0, repeats: int = 3, log=print) -> dict:
    train_data, val_data = corpus(s.corpus_mb)
    log(f"corpus: {len(train_data) / 2**20:.1f} MiB train, {len(val_data) / 2**20:.2f} MiB validation (stdlib .py)")
    torch.manual_seed(seed)
    baseline = build(s)
    supernet = copy.deepcopy(baseline)
    start = time.perf_counter()
    train(baseline, torch.optim.AdamW(baseline.parameters(), lr=s.lr), train_data, s, seed)
    log(f"AdamW: {s.steps} steps in {time.perf_counter() - start:.0f} s")

    example = next(batches(train_data, 1, 2, s.seq, seed))
    kv_groups = s.layers * s.kv_heads
    K = {"heads": kv_groups // 2, "channels": 0.5}
    search = fxoto.search(supernet, K, (example,), structures="channels", uniform=True)
    opt = search.optimizer(lr=s.lr, variant="adamw", total_steps=s.steps)
    start = time.perf_counter()
    train(supernet, opt, train_data, s, seed)
    log(f"H2SPG: {s.steps} steps in {time.perf_counter() - start:.0f} s, {len(search.space.zero_groups())} groups zero")

    trained = copy.deepcopy(supernet)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        sub = search.subnet(in_place=True)  # supernet itself, sliced: a LlamaForCausalLM
    assert type(sub) is type(trained)
    for m in (trained, sub):
        m.config.use_cache = True
    seq = torch.zeros(1, s.seq, dtype=torch.long)
    prompt = val_data[:16 * 32].view(16, 32)
    speed1 = tokens_per_second([trained, sub], prompt[:1], s.new_tokens, repeats)
    speed16 = tokens_per_second([trained, sub], prompt, s.new_tokens, repeats)
    return {
        "baseline": perplexity(baseline, val_data, s),
        "supernet": perplexity(trained, val_data, s),
        "subnet": perplexity(sub, val_data, s),
        "params": (count_parameters(trained), count_parameters(sub)),
        "macs": (count_flops_torch(trained, (seq,)) // 2, count_flops_torch(sub, (seq,)) // 2),
        "speed1": speed1, "speed16": speed16, "seq": s.seq,
        "config": {k: getattr(sub.config, k) for k in ("num_attention_heads", "num_key_value_heads", "head_dim",
                                                       "intermediate_size")},
        "sample": bytes(sub.generate(prompt[:1], attention_mask=torch.ones_like(prompt[:1]), max_new_tokens=48,
                                     do_sample=False)[0, 32:].tolist()).decode("utf-8", "replace"),
    }


def table(r: dict) -> str:
    (p0, p1), (m0, m1) = r["params"], r["macs"]
    rows = [
        ["validation perplexity", f"{r['baseline']:.3f}", f"{r['supernet']:.3f}", f"{r['subnet']:.3f}"],
        ["parameters", f"{p0:,}", f"{p0:,}", f"{p1:,} ({p1 / p0:.1%} kept)"],
        [f"MACs per {r['seq']}-byte sequence", f"{m0:,}", f"{m0:,}", f"{m1:,} ({m1 / m0:.1%} kept)"],
        ["generate tokens/s, batch 1", "", f"{r['speed1'][0]:.0f}",
         f"{r['speed1'][1]:.0f} ({r['speed1'][1] / r['speed1'][0]:.2f}x)"],
        ["generate tokens/s, batch 16", "", f"{r['speed16'][0]:.0f}",
         f"{r['speed16'][1]:.0f} ({r['speed16'][1] / r['speed16'][0]:.2f}x)"],
    ]
    return tabulate(rows, headers=["", "AdamW baseline", "H2SPG super-network", "sub-network (in place)"],
                    tablefmt="github", disable_numparse=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny model and a few steps")
    parser.add_argument("--steps", type=int, help="training steps of each run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="timed generations per model and batch size")
    parser.add_argument("--threads", type=int, help="torch threads (default: 2, and 1 with --quick: a tiny model)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads or (1 if args.quick else 2))
    s = QUICK if args.quick else FULL
    if args.steps:
        s = Setting(**{**s.__dict__, "steps": args.steps})
    r = run(s, args.seed, 1 if args.quick else args.repeats)
    print(table(r))
    print(f"sub-network config: {r['config']}")
    print(f"sub-network sample: {r['sample']!r}")


if __name__ == "__main__":
    main()
