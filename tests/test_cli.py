"""The command line: inspect, and one clear line for each error a user can cause."""

import json

import pytest
import torch
from torch import nn

from fxoto.cli import build_parser, main


def plain_chain():
    """A chain with no joint, on 8x8 digits: nothing to remove as operations, 16 channels to slim."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10),
    )
    return model, torch.randn(1, 1, 8, 8)


def test_inspect_and_search_take_the_same_structures():
    for command in (["inspect", "m"], ["search", "m", "--K", "1"]):
        assert build_parser().parse_args(command).structures == "operations"
        for structures in ("operations", "channels", "both"):
            assert build_parser().parse_args([*command, "--structures", structures]).structures == structures


def test_inspect_channels_shows_each_layer_and_draws_its_note(tmp_path, capsys):
    assert main(["inspect", "tests.test_cli:plain_chain", "--structures", "channels", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "8 channels, 7 can go" in out and "16 channel groups over 2 layers" in out
    dot = next(tmp_path.glob("*_graph.dot")).read_text()
    assert dot.count("7 of 8 ch can go") == 2


def test_search_slims_channels_of_a_plain_chain(tmp_path, capsys):
    argv = ["search", "tests.test_cli:plain_chain", "--K", "6", "--epochs", "1", "--out", str(tmp_path)]
    assert main(argv) == 2
    assert "structures='channels'" in capsys.readouterr().err  # a plain chain has no operation to remove
    assert main([*argv, "--structures", "channels"]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert len(report["erased"]) == report["channel_groups_erased"] == 6
    assert report["max_output_difference"] < 1e-4
    sub, full = (row["parameters"] for row in reversed(report["rows"]))
    assert sub < full
    assert "0 GeZIGs and 6 channel groups" in (tmp_path / "report.md").read_text()
    assert "6 channel groups in" in (tmp_path / "graph_after.dot").read_text()


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


def test_demo_runs_end_to_end(tmp_path, capsys):
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "sub-network" in out and "max |super - sub| output difference" in out
    for name in ("subnet.pt", "report.md", "report.json", "graph_before.dot", "graph_after.dot", "subnet/module.py",
                 "checkpoints/last.pt"):
        assert (tmp_path / name).exists(), name


def test_demo_subnet_equals_the_trained_supernet_on_validation(tmp_path):
    import torch
    from torch.utils.data import DataLoader

    from fxoto.data import get_dataset
    from fxoto.pipeline import Fitted, run_demo

    result = run_demo(out=tmp_path, quick=True)
    model, sub = result.search.model.eval(), result.subnet
    _, val = get_dataset("digits")
    diff = 0.0
    with torch.no_grad():
        for x, _ in DataLoader(Fitted(val, (1, 28, 28)), batch_size=128):
            expected = model(x)
            diff = max(diff, (sub(x) - expected).abs().max().item() / max(1.0, expected.abs().max().item()))
    assert diff < 1e-5
    assert len(result.search.space.zero_groups()) == 3
    assert sum(p.numel() for p in sub.parameters()) < sum(p.numel() for p in model.parameters())
    assert result.report_data.max_output_difference < 1e-4


def test_demo_trains_on_the_chosen_device_in_bf16(tmp_path, capsys):
    import json

    assert main(["demo", "--quick", "--device", "cpu", "--amp", "bf16", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "trained on 1 process, device cpu, bf16 mixed precision" in out
    report = json.loads((tmp_path / "report.json").read_text())
    assert (report["world_size"], report["device"], report["amp"]) == (1, "cpu", "bf16")
    assert report["max_output_difference"] < 1e-4  # the sub-network is exact in float32 after bf16 training


def test_a_device_this_machine_lacks_is_one_clear_line(tmp_path, capsys):
    import torch

    missing = f"cuda:{torch.cuda.device_count()}"  # one past the last GPU, or any GPU where there is none
    assert main(["search", "demosupnet", "--K", "2", "--device", missing, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fxoto search: error: device") and len(err.splitlines()) == 1
    assert ("CUDA is not available" in err) if not torch.cuda.is_available() else ("CUDA device(s)" in err)
