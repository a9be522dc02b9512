"""Draw random super-networks from tests/strategies.py and check each one's sub-network.

    python tools/sweep_supernets.py [--count 2000] [--seed 0]

For each network (float32 or float64, layers called at several places included):
build the search space, draw a random valid removal, zero it, and compare the
sub-network with the super-network (``test_properties.check_subnet``: same
output within 1e-5 of its scale, fewer parameters, no single-input joint).
Prints how many networks were drawn, how many had shared layers, and each
one that differs or fails, with its ``NetSpec``; exits 1 if any did.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import torch  # noqa: E402
from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import fxoto  # noqa: E402
from strategies import supernets, valid_removals  # noqa: E402
from test_properties import check_subnet  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    stats: collections.Counter = collections.Counter()
    failures: list[tuple[str, str]] = []

    @seed(args.seed)
    @settings(max_examples=args.count, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(st.data(), st.sampled_from([torch.float32, torch.float64]))
    def one(data, dtype):
        model, x = data.draw(supernets(dtype=dtype))
        stats["networks"] += 1
        stats["with shared layers"] += any(b.reuse or b.twice for s in model.spec.steps for b in s.branches)
        try:
            space = fxoto.build_space(model, (x,))
            ids = data.draw(valid_removals(space))
            stats["groups erased"] += len(ids)
            check_subnet(model, x, ids, space)
        except Exception as error:  # every failure is reported, not only assertion errors
            failures.append((repr(model.spec), f"{type(error).__name__}: {error}"[:500]))

    start = time.perf_counter()
    one()
    print(f"{stats['networks']} networks ({stats['with shared layers']} with layers called at several places), "
          f"{stats['groups erased']} groups erased, {len(failures)} differ or fail "
          f"({time.perf_counter() - start:.0f} s)")
    for spec, error in failures:
        print(f"\n{error}\n{spec}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
