"""The search-space summary and drawing, and the parameter and MAC counts, on DemoSupNet."""

import re
import shutil
import subprocess
import sys

import pytest
import torch
from torch import nn

import fxoto
from fxoto import metrics, viz
from fxoto.zoo import DemoSupNet

X = torch.randn(1, 1, 28, 28, generator=torch.Generator().manual_seed(0))


@pytest.fixture()
def demo():
    torch.manual_seed(0)
    model = DemoSupNet().eval()
    return model, fxoto.build_space(model, (X,))


class SigmoidBranch(nn.Module):
    """A residual block whose branch ends in a sigmoid: not zero-invariant, so set aside."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.gate = nn.Sigmoid()

    def forward(self, x):
        x = self.stem(x)
        return x + self.a(x) + self.gate(self.b(x))


# -- summary -----------------------------------------------------------------------------

def test_summary_lists_every_gezig_and_the_totals(demo):
    model, space = demo
    text = viz.summary(space)
    for g in space.groups:
        row = next(line for line in text.splitlines() if line.startswith(f"g{g.id} "))
        assert " -> ".join(g.nodes) in row
        assert f"{g.numel:,}" in row
    in_groups = sum(g.numel for g in space.groups)
    total = sum(p.numel() for p in model.parameters())
    assert f"5 GeZIGs over {len(space.segments)} segments" in text
    assert f"{in_groups:,} of {total:,} parameters" in text
    assert "set aside" not in text


def test_summary_gives_the_reason_a_segment_is_set_aside():
    space = fxoto.build_space(SigmoidBranch().eval(), (X,))
    assert len(space.excluded) == 1 and space.excluded[0].nodes == ("b", "gate")
    text = viz.summary(space)
    assert "1 segment set aside:" in text and "b -> gate" in text
    for e in space.excluded:
        assert e.reason in text


# -- DOT ---------------------------------------------------------------------------------

def _vertices(dot):
    return {int(m.group(1)): line for line in dot.splitlines() if (m := re.match(r"\s*s(\d+) \[", line))}


def test_dot_has_one_vertex_per_segment_and_the_segment_edges(demo):
    _, space = demo
    dot = viz.to_dot(space)
    unquoted = re.sub(r'"(?:[^"\\]|\\.)*"', '""', dot)
    assert unquoted.count("{") == unquoted.count("}") == 1
    assert dot.startswith("digraph") and dot.rstrip().endswith("}")
    vertices = _vertices(dot)
    assert sorted(vertices) == [s.id for s in space.segments]
    edges = re.findall(r"^\s*s(\d+) -> s(\d+)", dot, flags=re.M)
    assert sorted((int(a), int(b)) for a, b in edges) == sorted((i, s.id) for s in space.segments for i in s.inputs)
    for g in space.groups:
        line = vertices[g.segment]
        assert f'label="g{g.id}\\n' in line and "filled" in line and "dashed" not in line
    fills = {re.search(r'fillcolor="([^"]+)"', vertices[g.segment]).group(1) for g in space.groups}
    assert len(fills) == len(space.groups)
    joints = [s.id for s in space.segments if s.kind == "joint"]
    ends = [s.id for s in space.segments if s.kind in ("source", "output")]
    assert all('shape="hexagon"' in vertices[i] for i in joints)
    assert all('shape="ellipse"' in vertices[i] for i in ends)


def test_erased_groups_are_dashed_and_grey(demo):
    _, space = demo
    dot = viz.to_dot(space, erased=[0, 1, 4])
    vertices = _vertices(dot)
    for g in space.groups:
        dashed = "dashed" in vertices[g.segment]
        assert dashed == (g.id in (0, 1, 4)), vertices[g.segment]
    assert "erased: g0 g1 g4" in dot
    assert "not a valid removal" not in dot
    assert "not a valid removal" in viz.to_dot(space, erased=[3, 4])


def test_dot_labels_are_escaped():
    text = 'a "quoted" name\\with a backslash\nand a second line'
    quoted = viz._quote(text)
    assert quoted.count('"') == 2 + 2 and '\\"quoted\\"' in quoted and "\n" not in quoted
    assert viz._unquote(quoted) == text


def test_graphviz_accepts_the_dot(demo):
    assert shutil.which("dot"), "Graphviz's dot is needed: apt-get install graphviz (tools/run.sh does it as root)"
    _, space = demo
    for erased in ((), (0, 1, 4)):
        done = subprocess.run(["dot", "-Tsvg"], input=viz.to_dot(space, erased), capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert "<svg" in done.stdout


def _notes(dot):
    """The channel-layer notes: first group id -> (label, the segment it hangs from)."""
    labels = dict(re.findall(r'^\s*c(\d+) \[.*label="([^"]*)"', dot, flags=re.M))
    segments = dict((c, s) for s, c in re.findall(r"^\s*s(\d+) -> c(\d+)", dot, flags=re.M))
    return {int(c): (label, int(segments[c])) for c, label in labels.items()}


def test_channel_layers_are_notes_saying_how_many_channels_can_go(demo):
    model, _ = demo
    space = fxoto.build_space(model, (X,), structures="both")
    layers = {}
    for g in space.groups:
        if g.kind == "channel":
            layers.setdefault(g.nodes[0], []).append(g.id)
    assert layers  # DemoSupNet's conv1 and conv6 feed only convolutions
    notes = _notes(viz.to_dot(space))
    assert sorted(notes) == sorted(ids[0] for ids in layers.values())
    for stem, ids in layers.items():
        label, segment = notes[ids[0]]
        assert label == f"{stem}: {len(ids) - 1} of {len(ids)} ch can go"
        assert stem in space.segments[segment].nodes
    vertices = _vertices(viz.to_dot(space))
    assert sorted(vertices) == [s.id for s in space.segments]  # the notes are no segments
    fills = re.findall(r'^\s*[sc]\d+ \[.*fillcolor="([^"]+)"', viz.to_dot(space), flags=re.M)
    assert len(fills) == len(set(fills))  # a colour per GeZIG and per layer


def test_erased_channels_are_counted_per_layer(demo):
    model, _ = demo
    space = fxoto.build_space(model, (X,), structures="both")
    operation = next(g.id for g in space.groups if g.kind == "operation")
    channels = [g for g in space.groups if g.kind == "channel"]
    stem = channels[0].nodes[0]
    slimmed = [g.id for g in channels if g.nodes[0] == stem][:5]
    dot = viz.to_dot(space, erased=[operation, *slimmed])
    label, _ = _notes(dot)[slimmed[0]]
    assert label.startswith(f"{stem}: 5 of ") and label.endswith(" ch erased")
    assert f"erased: g{operation}; 5 channel groups in 1 layer" in dot
    nodes, edges, caption = viz._parse_dot(dot)  # the fallback reads the notes too
    assert nodes[f"c{slimmed[0]}"]["label"] == label
    assert caption == f"erased: g{operation}; 5 channel groups in 1 layer"


class Residual(nn.Module):
    """stem -> x + b(a(x)) -> head: stem's and b's channels meet at the add, a's do not."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 6, 3, padding=1)
        self.a = nn.Conv2d(6, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 6, 3, padding=1)
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        x = self.stem(x)
        return self.head(x + self.b(torch.relu(self.a(x))))


def test_layers_coupled_through_an_add_are_one_note_joined_to_each_segment():
    space = fxoto.build_space(Residual().eval(), (X,), structures="channels")
    sets = viz.channel_sets(space)
    assert sorted(cs.stems for cs in sets) == [("a",), ("stem", "b")]
    coupled = next(cs for cs in sets if len(cs.stems) == 2)
    assert (coupled.channels, coupled.can_go, len(coupled.ids)) == (6, 5, 6)
    label, _ = _notes(viz.to_dot(space))[coupled.ids[0]]
    assert label == "stem +1 coupled: 5 of 6 ch can go"
    joined = re.findall(rf"^\s*s(\d+) -> c{coupled.ids[0]} ", viz.to_dot(space), flags=re.M)
    segment_of = {n: seg.id for seg in space.segments for n in seg.nodes}
    assert sorted(map(int, joined)) == sorted({segment_of["stem"], segment_of["b"]})
    text = viz.summary(space)
    assert "6 channels, 5 can go" in text and "4 channels, 3 can go" in text
    assert "10 channel groups over 3 layers (2 coupled sets)" in text


def test_graphviz_accepts_the_channel_notes(demo):
    assert shutil.which("dot"), "Graphviz's dot is needed"
    model, _ = demo
    space = fxoto.build_space(model, (X,), structures="channels")
    erased = space.sample_removal(0.2)
    done = subprocess.run(["dot", "-Tsvg"], input=viz.to_dot(space, erased), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "ch erased" in done.stdout


# -- render ------------------------------------------------------------------------------

def test_render_with_graphviz_writes_dot_and_svg(demo, tmp_path):
    _, space = demo
    out = viz.render(viz.to_dot(space), tmp_path / "demo.svg")
    assert out == tmp_path / "demo.svg"
    assert (tmp_path / "demo.dot").read_text().startswith("digraph")
    assert "<svg" in out.read_text()


def test_render_without_graphviz_draws_a_png(demo, tmp_path, monkeypatch):
    _, space = demo
    monkeypatch.setattr(shutil, "which", lambda name: None)
    out = viz.render(viz.to_dot(space, erased=[0, 1, 4]), tmp_path / "demo")
    assert out == tmp_path / "demo.png"
    assert out.read_bytes().startswith(b"\x89PNG")
    assert (tmp_path / "demo.dot").exists()


def test_render_without_graphviz_draws_the_channel_notes(demo, tmp_path, monkeypatch):
    model, _ = demo
    space = fxoto.build_space(model, (X,), structures="both")
    monkeypatch.setattr(shutil, "which", lambda name: None)
    out = viz.render(viz.to_dot(space, erased=space.sample_removal(0.2)), tmp_path / "both")
    assert out.read_bytes().startswith(b"\x89PNG")


def test_render_without_graphviz_or_matplotlib_writes_only_the_dot(demo, tmp_path, monkeypatch):
    _, space = demo
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    dot = viz.to_dot(space)
    out = viz.render(dot, tmp_path / "sub" / "demo")
    assert out == tmp_path / "sub" / "demo.dot"
    assert out.read_text() == dot
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["demo.dot"]


def test_fallback_layout_parses_what_to_dot_writes(demo):
    _, space = demo
    nodes, edges, caption = viz._parse_dot(viz.to_dot(space, erased=[4]))
    assert set(nodes) == {f"s{s.id}" for s in space.segments}
    assert nodes[f"s{space.groups[0].segment}"]["label"] == "g0\nconv2\nbn2"
    assert len(edges) == sum(len(s.inputs) for s in space.segments)
    assert caption == "erased: g4"
    layers = viz._layers(nodes, edges)
    depth = {n: d for d, layer in enumerate(layers) for n in layer}
    assert all(depth[a] < depth[b] for a, b, _ in edges)


# -- metrics -----------------------------------------------------------------------------

def test_parameters_counted_by_hand():
    assert metrics.count_parameters(nn.Linear(3, 4)) == 3 * 4 + 4
    assert metrics.count_parameters(nn.Conv2d(2, 3, 3)) == 2 * 3 * 9 + 3
    assert metrics.count_parameters(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))) == 16 + 10
    shared = nn.Linear(4, 4)
    assert metrics.count_parameters(nn.Sequential(shared, nn.ReLU(), shared)) == 20  # a tied tensor counts once


def test_macs_counted_by_hand():
    mlp = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(5, 3)
    assert metrics.count_flops(mlp, x) == 5 * (3 * 4 + 4 * 2)
    assert metrics.count_flops_torch(mlp, (x,)) == 2 * 5 * (3 * 4 + 4 * 2)


def test_thop_macs_agree_with_torch_flop_counter(demo):
    model, _ = demo
    macs = metrics.count_flops(model, X)
    flops = metrics.count_flops_torch(model, X)
    assert macs == pytest.approx(flops / 2, rel=0.02)  # thop also counts batch norm and pooling


def test_counting_leaves_the_model_untouched(demo):
    model, _ = demo
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    metrics.count_flops(model, X)
    metrics.count_flops_torch(model, X)
    assert model.training and all(m.training for m in model.modules())
    assert not any(hasattr(m, "total_ops") or hasattr(m, "total_params") for m in model.modules())
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_subnet_graph_module_is_smaller_and_cheaper(demo):
    model, space = demo
    space.zero_([0, 1, 4])
    subnet = space.construct_subnet()
    assert isinstance(subnet, torch.fx.GraphModule)
    rows = metrics.compare(model, subnet, X, erased_groups=3)
    sup, sub = rows
    assert sup["parameters"] == metrics.count_parameters(model) and sup["MACs"] == metrics.count_flops(model, X)
    assert sub["parameters"] < sup["parameters"] and sub["MACs"] < sup["MACs"]
    # Erased: conv2-bn2, conv3-bn3, conv8-bn8 and the columns of conv6 that read the first two.
    conv6 = model.conv6
    lost = 2 * 41616 + 221952 + 2 * conv6.out_channels * 48 * conv6.kernel_size[0] * conv6.kernel_size[1]
    assert sup["parameters"] - sub["parameters"] == lost
    assert sub["parameters ratio"] == pytest.approx(sub["parameters"] / sup["parameters"])
    assert (sup["groups erased"], sub["groups erased"]) == (0, 3)
    table = metrics.report_table(rows)
    assert "super-network" in table and "sub-network" in table
    assert f"{sub['MACs'] / 1e6:.1f}" in table
