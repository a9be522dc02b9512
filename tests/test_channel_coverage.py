"""tools/channel_coverage.py: fxoto's channels beside torch-pruning's (torch-pruning is in the test extra)."""

import importlib.util
import sys
from pathlib import Path

import torch

TOOL = Path(__file__).resolve().parents[1] / "tools" / "channel_coverage.py"


def _tool():
    spec = importlib.util.spec_from_file_location("channel_coverage", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)
    spec.loader.exec_module(module)
    return module


def test_plain_and_residual_networks_count_the_same_layer_channels(capsys):
    threads = str(torch.get_num_threads())  # the tool sets the process's threads: leave them as they are
    _tool().main(["--models", "alexnet", "resnet18", "--tablefmt", "plain", "--threads", threads])
    out = capsys.readouterr().out
    # Columns: model, input, fxoto channels, groups, layers, torch-pruning channels. alexnet: every
    # conv and the two hidden linears, 64+192+384+256+256+4096+4096; resnet18: every conv, the
    # shortcuts' included, 64 + 4*64 + 5*128 + 5*256 + 5*512 (the 1000-class fc ignored on both sides).
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split()[:1] in (["alexnet"], ["resnet18"])}
    assert rows["alexnet"][2] == rows["alexnet"][5] == "9,344"
    assert rows["resnet18"][2] == rows["resnet18"][5] == "4,800"
    assert "fxoto fewer on 0 of 2" in out


def test_tiny_bert_heads_and_channels_against_torch_pruning(capsys):
    """Tiny BERT (2 layers, 32 wide, 4 heads, 48 MLP units): fxoto's head groups hold every query head, as
    torch-pruning's attention groups do once told the heads; its channel groups the MLP units. torch-pruning
    also counts the q, k and v head dimensions (fxoto removes heads whole) and the LayerNorm residual
    stream's writers (two output projections a layer), which fxoto sets aside: the table says why."""
    tool = _tool()
    case = next(c for c in tool.hf_cases() if c.name == "hf-bert")
    model, x = case.build(), case.example()
    ours = tool.fxoto_channels(model, x)
    theirs = tool.torch_pruning_channels(model, x, 60, case.num_heads(model))
    assert ours.heads == theirs.heads == 2 * 4
    assert ours.channels == 2 * 48
    assert theirs.head_dims == (2 * 3, 2 * 3 * 32)
    assert theirs.channels == ours.channels + theirs.head_dims[1] + 2 * 2 * 32
    assert any("add" in reason for reason in ours.why)

    threads = str(torch.get_num_threads())
    tool.main(["--suite", "transformers", "--models", "hf-bert", "--tablefmt", "plain", "--threads", threads])
    out = capsys.readouterr().out
    assert "q, k and v head dimensions" in out
    assert f"fxoto {ours.channels} channels and {ours.heads} heads, torch-pruning {theirs.channels} channels" in out
