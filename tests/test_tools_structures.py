"""tools/reproduce_structures.py on narrow networks for one epoch: K per kind delivered, the
sub-network equal to the trained super-network and smaller than the SGD baseline."""

import importlib.util
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parent.parent / "tools" / "reproduce_structures.py"


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("reproduce_structures", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def rows(tool):
    return tool.main(["--epochs", "1", "--narrow", "8", "--threads", "1"])


def test_vgg_has_no_operations(tool):
    assert "refused" in tool.operations_alone("vgg", 8)
    assert "5 operation groups" in tool.operations_alone("demosupnet", 8)


def test_h2spg_rows(rows):
    base = {r["network"]: r for r in rows if r["optimizer"] == "SGD"}
    found = [r for r in rows if r["optimizer"] == "H2SPG"]
    assert sorted(r["network"] for r in found) == ["demosupnet", "vgg"]
    for r in found:
        assert {kind: zero for kind, (zero, _) in r["zeroed"].items()} == r["asked"], r["network"]
        assert r["diff"] < 1e-4
        assert r["parameters"] < base[r["network"]]["parameters"]
        assert r["macs"] < base[r["network"]]["macs"]
    assert set(next(r for r in found if r["network"] == "vgg")["zeroed"]) == {"channel"}
