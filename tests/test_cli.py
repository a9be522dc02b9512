"""The command line: inspect, and one clear line for each error a user can cause."""

import pytest

from fxoto.cli import main


def test_inspect_prints_groups_and_writes_the_graph(tmp_path, capsys):
    assert main(["inspect", "demosupnet", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for nodes in ("conv2", "conv3", "conv4", "conv7", "conv8"):
        assert nodes in out
    assert (tmp_path / "demosupnet_graph.dot").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["inspect", "no_such_net"], "unknown model 'no_such_net'"),
        (["inspect", "no.such.module:make"], "cannot import 'no.such.module'"),
        (["inspect", "fxoto.zoo:no_factory"], "has no 'no_factory'"),
        (["search", "alexnet", "--K", "1"], "no removable structure"),
        (["search", "demosupnet", "--K", "9"], "only 5 GeZIGs"),
        (["search", "demosupnet", "--K", "4"], "larger than any valid removal"),
        (["search", "demosupnet", "--K", "x"], "K must be an int count"),
        (["search", "demosupnet", "--K", "2", "--data", "cifar10"], "no data root was given"),
        (["search", "demosupnet", "--K", "2", "--data", "cifar10", "--data-root", "/nonexistent"], "not found under '/nonexistent'"),
    ],
)
def test_errors_are_one_clear_line(argv, message, capsys, tmp_path):
    if argv[0] == "search":
        argv = argv + ["--out", str(tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err
    assert err.startswith(f"fxoto {argv[0]}: error:")
    assert len(err.splitlines()) == 1 or "no removable structure" in err
