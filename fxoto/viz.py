"""Looking at a search space: a text summary and the dependency graph of segments.

* ``summary``: one row per GeZIG and per set of layers whose channel groups are coupled
  (``channel_sets``), totals, and the segments and layers set aside with their reasons.
* ``to_dot``: Graphviz DOT of the dependency graph of segments (paper, Figure 1b), with the
  GeZIGs filled in distinct colours; groups in ``erased`` are drawn dashed and grey, as the
  paper draws the removed vertices (Figure 3). Channel groups are drawn per set of coupled
  layers: a note beside the segments that hold them, in a colour of its own, saying how many
  channels can go (or, with ``erased``, how many are erased).
* ``render``: the DOT file and, by Graphviz's ``dot`` when installed, an SVG; without Graphviz
  a PNG drawn by matplotlib (when importable) in a layered layout.
"""

from __future__ import annotations

import colorsys
import re
import shutil
import subprocess
import textwrap
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tabulate import tabulate

from fxoto.space import SearchSpace

__all__ = ["ChannelSet", "channel_sets", "render", "summary", "to_dot"]

_GOLDEN = 0.618033988749895
_GREY_FILL = "#eeeeee"
_GREY_LINE = "#999999"
_SHAPES = {"source": "ellipse", "output": "ellipse", "joint": "hexagon"}  # the rest are boxes


def _abbreviate(nodes: Sequence[str], limit: int = 4) -> list[str]:
    """The node names to show: all of them when few, else the first two, '...' and the last."""
    if len(nodes) <= limit:
        return list(nodes)
    return [nodes[0], nodes[1], f"... ({len(nodes) - 3} more)", nodes[-1]]


def _shorten(name: str, width: int = 32) -> str:
    """A long name cut in the middle (torchvision's are like 'features_denseblock4_denselayer16_conv2')."""
    if len(name) <= width:
        return name
    half = (width - 3) // 2
    return f"{name[:half]}...{name[-(width - 3 - half):]}"


def _colour(i: int) -> str:
    """The fill of GeZIG ``i``: hues a golden angle apart, so neighbours never look alike."""
    r, g, b = colorsys.hsv_to_rgb((i * _GOLDEN) % 1.0, 0.40, 0.97)
    return f"#{round(r * 255):02x}{round(g * 255):02x}{round(b * 255):02x}"


@dataclass(frozen=True)
class ChannelSet:
    """Channel groups whose channels are rows of the same stems (coupled through joints).

    ``rows``: per group id, how many output channels of ``stems[0]`` it holds;
    ``channels``: their sum (the channels of ``stems[0]`` in this set); ``can_go``: how many
    of them a removal of this set's groups alone can take, every stem keeping a channel.
    """

    stems: tuple[str, ...]
    ids: tuple[int, ...]
    rows: dict[int, int]
    channels: int
    can_go: int


def channel_sets(space: SearchSpace) -> list[ChannelSet]:
    """The channel groups by the stems they slim, in order of their first group."""
    by_stems: dict[tuple[str, ...], list[int]] = {}
    for g in space.groups:
        if g.kind == "channel":
            stems = tuple(dict.fromkeys(stem for stem, _ in space.slices[g.id].rows))
            by_stems.setdefault(stems, []).append(g.id)
    sets = []
    for stems, ids in by_stems.items():
        rows = {i: _rows(space, i) for i in ids}
        gone: dict[str, int] = {}
        can_go = 0
        for i in ids:  # greedily, as SearchSpace.removal_problem counts: each stem keeps a channel
            if all(gone.get(stem, 0) + n < space.layers[stem].channels for stem, n in rows[i].items()):
                for stem, n in rows[i].items():
                    gone[stem] = gone.get(stem, 0) + n
                can_go += rows[i].get(stems[0], 0)
        first = {i: r.get(stems[0], 0) for i, r in rows.items()}
        sets.append(ChannelSet(stems, tuple(ids), first, sum(first.values()), can_go))
    return sets


def _rows(space: SearchSpace, i: int) -> dict[str, int]:
    """How many output channels of each stem channel group ``i`` holds."""
    rows: dict[str, int] = {}
    for stem, _ in space.slices[i].rows:
        rows[stem] = rows.get(stem, 0) + 1
    return rows


def summary(space: SearchSpace) -> str:
    """A table of the GeZIGs (id, nodes, members, parameters), totals and the exclusions.

    Channel groups take one row per set of coupled layers (``channel_sets``): their ids,
    the stems and per-channel modules, how many channels of the first stem there are and
    how many can go, and their parameters.
    """
    operations = [g for g in space.groups if g.kind == "operation"]
    rows = [
        [f"g{g.id}", g.segment, " -> ".join(_abbreviate([_shorten(n, 40) for n in g.nodes])), len(g.members), g.numel]
        for g in operations
    ]
    sets = channel_sets(space)
    for cs in sets:
        groups = [space.groups[i] for i in cs.ids]
        nodes = " -> ".join(_abbreviate([_shorten(n, 40) for n in groups[0].nodes]))
        count = f"{cs.channels} channels, {cs.can_go} can go"
        if len(cs.ids) != cs.channels:
            count += f" ({len(cs.ids)} groups)"
        ids = f"g{cs.ids[0]}..g{cs.ids[-1]}" if len(cs.ids) > 1 else f"g{cs.ids[0]}"
        rows.append([ids, "-", nodes, count, sum(g.numel for g in groups)])
    table = tabulate(rows, headers=["GeZIG", "segment", "nodes", "members", "params"], intfmt=",")
    in_groups = sum(g.numel for g in space.groups)
    total = sum(p.numel() for p in space.model.parameters())
    share = f" ({100 * in_groups / total:.1f} %)" if total else ""
    n_ops = len(operations)
    channels = (f" and {len(space.groups) - n_ops:,} channel groups over {len(space.layers)} layers"
                f"{f' ({len(sets)} coupled sets)' if len(sets) != len(space.layers) else ''}") if sets else ""
    lines = [
        table,
        "",
        f"{n_ops} GeZIG{'' if n_ops == 1 else 's'} over {len(space.segments)} segments{channels}; "
        f"{in_groups:,} of {total:,} parameters{share} lie in {'groups' if sets else 'GeZIGs'}",
    ]
    if space.excluded:
        n = len(space.excluded)
        lines.append(f"{n} segment{'s' if n > 1 else ''} set aside:")
        for e in space.excluded:
            lines.append(f"  - {' -> '.join(_abbreviate(e.nodes))}: {e.reason}")
    return "\n".join(lines)


def _quote(text: str) -> str:
    """A DOT double-quoted string; ``\\n`` between lines is DOT's own line break."""
    lines = str(text).split("\n")
    return '"' + r"\n".join(line.replace("\\", "\\\\").replace('"', '\\"') for line in lines) + '"'


def _attrs(**attrs: str) -> str:
    return "[" + ", ".join(f"{k}={_quote(v)}" for k, v in attrs.items()) + "]"


def to_dot(space: SearchSpace, erased: Iterable[int] = ()) -> str:
    """The dependency graph of segments in Graphviz DOT (paper, Figure 1b; Figure 3 with ``erased``).

    One vertex per segment, named ``s<id>``: GeZIGs filled (a colour each) and labelled
    ``g<id>``, joint segments as hexagons, the source and output as ellipses, other segments
    as boxes. Edges follow ``Segment.inputs``. Segments of the groups in ``erased``, and the
    segments that would then no longer reach the output, are dashed and grey.

    A layer with channel groups is a note ``c<first id>`` joined by a dotted line to its
    segment, filled in a colour of its own: ``"conv1: 63 of 64 ch can go"`` (every channel
    but one), or with ``erased`` ``"conv1: 32 of 64 ch erased"``; a set of layers coupled
    through joints (``channel_sets``) is one note, named by its first stem (``"conv1 +2
    coupled"``), joined to the segment of each. The caption counts the erased channel groups
    and the layers they slim rather than listing their ids.
    """
    erased = sorted(set(erased))
    problem = space.removal_problem(erased) if erased else None  # also checks the ids
    group_of = {g.segment: g for g in space.groups if g.kind == "operation"}
    gone = {space.groups[i].segment for i in erased if space.groups[i].kind == "operation"}
    dead = _unreached(space, gone) if gone else set()
    sets = channel_sets(space)
    gone_ids = set(erased)
    slimmed = {cs.ids[0]: sum(cs.rows[i] for i in cs.ids if i in gone_ids) for cs in sets}
    slimmed = {first: n for first, n in slimmed.items() if n}

    lines = [
        "digraph fxoto {",
        "  rankdir=TB;",
        '  graph [fontname="Helvetica", fontsize=10];',
        '  node [fontname="Helvetica", fontsize=10, shape=box];',
        '  edge [color="#555555", arrowsize=0.7];',
    ]
    if erased:
        operations = [i for i in erased if space.groups[i].kind == "operation"]
        caption = "erased: " + " ".join(f"g{i}" for i in operations)
        channel_ids = [i for i in erased if space.groups[i].kind == "channel"]
        if channel_ids:
            n, stems = len(channel_ids), {stem for i in channel_ids for stem in _rows(space, i)}
            caption += ("; " if operations else "") + f"{n:,} channel group{'s' if n > 1 else ''} in " \
                f"{len(stems)} layer{'s' if len(stems) > 1 else ''}"
        caption += f"\n(not a valid removal: {problem})" if problem else ""
        lines.append(f'  labelloc=b; label={_quote(caption)};')
    for seg in space.segments:
        label = [_shorten(n) for n in _abbreviate(seg.nodes)]
        attrs = {"shape": _SHAPES.get(seg.kind, "box")}
        style = []
        group = group_of.get(seg.id)
        if group is not None:
            label.insert(0, f"g{group.id}")
            style.append("filled")
            attrs["fillcolor"] = _colour(group.id)
        if seg.id in gone or seg.id in dead:
            style = ["dashed", "filled"]
            attrs.update(fillcolor=_GREY_FILL, color=_GREY_LINE, fontcolor=_GREY_LINE)
        if style:
            attrs["style"] = ",".join(style)
        attrs["label"] = "\n".join(label)
        lines.append(f"  s{seg.id} {_attrs(**attrs)};")
    for seg in space.segments:
        for i in seg.inputs:
            faded = {seg.id, i} & (gone | dead)
            style = " " + _attrs(style="dashed", color=_GREY_LINE) if faded else ""
            lines.append(f"  s{i} -> s{seg.id}{style};")
    segment_of = {name: seg.id for seg in space.segments for name in seg.nodes}
    for cs in sets:
        first = cs.ids[0]
        name = _shorten(cs.stems[0]) + (f" +{len(cs.stems) - 1} coupled" if len(cs.stems) > 1 else "")
        if first in slimmed:
            text = f"{name}: {slimmed[first]} of {cs.channels} ch erased"
        else:
            text = f"{name}: {cs.can_go} of {cs.channels} ch can go"
        segments = sorted({segment_of[stem] for stem in cs.stems if stem in segment_of})
        attrs = {"shape": "note", "style": "filled", "fillcolor": _colour(first), "label": text}
        if all(i in gone or i in dead for i in segments):
            attrs.update(style="dashed,filled", fillcolor=_GREY_FILL, color=_GREY_LINE, fontcolor=_GREY_LINE)
        lines.append(f"  c{first} {_attrs(**attrs)};")
        for i in segments:
            lines.append(f"  s{i} -> c{first} {_attrs(style='dotted', arrowhead='none')};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _unreached(space: SearchSpace, gone: set[int]) -> set[int]:
    """Segments that no longer reach the output once ``gone`` are erased (they die with them)."""
    output = next(s.id for s in space.segments if s.kind == "output")
    reach, stack = {output}, [output]
    while stack:
        for i in space.segments[stack.pop()].inputs:
            if i not in gone and i not in reach:
                reach.add(i)
                stack.append(i)
    return {s.id for s in space.segments} - reach - gone


def render(dot: str, path: str | Path) -> Path:
    """Write ``dot`` to ``<path>.dot`` and draw it; return the picture, or the .dot without one.

    With Graphviz's ``dot`` on the PATH the picture is ``<path>.svg``; otherwise, when
    matplotlib is importable, ``<path>.png`` in a layered layout (vertices by longest-path
    depth). The fallback reads the DOT that ``to_dot`` writes, not DOT in general. A suffix
    ``.dot``, ``.gv``, ``.svg`` or ``.png`` on ``path`` is replaced.
    """
    path = Path(path)
    if path.suffix in (".dot", ".gv", ".svg", ".png"):
        path = path.with_suffix("")
    path.parent.mkdir(parents=True, exist_ok=True)
    dot_file = path.with_name(path.name + ".dot")
    dot_file.write_text(dot, encoding="utf-8")

    graphviz = shutil.which("dot")
    if graphviz is not None:
        svg = path.with_name(path.name + ".svg")
        done = subprocess.run([graphviz, "-Tsvg", str(dot_file), "-o", str(svg)], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"Graphviz could not draw {dot_file}: {done.stderr.strip()}")
        return svg
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return dot_file
    png = path.with_name(path.name + ".png")
    _draw_png(_parse_dot(dot), png)
    return png


# -- the matplotlib fallback -------------------------------------------------------------

_NODE = re.compile(r"^\s*(\w+)\s*\[(.*)\];\s*$")
_EDGE = re.compile(r"^\s*(\w+)\s*->\s*(\w+)\s*(?:\[(.*)\])?;\s*$")
_ATTR = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|[^,\s\]]+)')
_GRAPH_LABEL = re.compile(r'^\s*labelloc=\w+;\s*label=("(?:[^"\\]|\\.)*");\s*$')


def _unquote(value: str) -> str:
    if not value.startswith('"'):
        return value
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), value[1:-1])


def _parse_attrs(text: str | None) -> dict[str, str]:
    return {k: _unquote(v) for k, v in _ATTR.findall(text or "")}


def _parse_dot(dot: str) -> tuple[dict[str, dict[str, str]], list[tuple[str, str, dict[str, str]]], str]:
    """Vertices, edges and the graph label of a DOT text in ``to_dot``'s form (a statement a line)."""
    nodes: dict[str, dict[str, str]] = {}
    edges: list[tuple[str, str, dict[str, str]]] = []
    caption = ""
    for line in dot.splitlines():
        if m := _EDGE.match(line):
            edges.append((m.group(1), m.group(2), _parse_attrs(m.group(3))))
        elif m := _GRAPH_LABEL.match(line):
            caption = _unquote(m.group(1))
        elif (m := _NODE.match(line)) and m.group(1) not in ("node", "edge", "graph"):
            nodes[m.group(1)] = _parse_attrs(m.group(2))
    for a, b, _ in edges:
        nodes.setdefault(a, {})
        nodes.setdefault(b, {})
    return nodes, edges, caption


def _layers(nodes: Iterable[str], edges: list[tuple[str, str, dict]]) -> list[list[str]]:
    """Vertices by longest-path depth from the sources, each layer ordered by its parents' places."""
    parents: dict[str, list[str]] = {n: [] for n in nodes}
    children: dict[str, list[str]] = {n: [] for n in nodes}
    for a, b, _ in edges:
        parents[b].append(a)
        children[a].append(b)
    # Kahn's order; a cycle (not produced by to_dot) falls back to the listed order.
    indegree = {n: len(p) for n, p in parents.items()}
    order = [n for n, d in indegree.items() if d == 0]
    for n in order:
        for c in children[n]:
            indegree[c] -= 1
            if indegree[c] == 0:
                order.append(c)
    order += [n for n in parents if n not in set(order)]
    depth: dict[str, int] = {}
    for n in order:
        depth[n] = max((depth.get(p, 0) + 1 for p in parents[n]), default=0)
    layers: list[list[str]] = [[] for _ in range(max(depth.values(), default=-1) + 1)]
    for n in order:
        layers[depth[n]].append(n)
    place: dict[str, float] = {}
    for layer in layers:
        layer.sort(key=lambda n: sum(place[p] for p in parents[n] if p in place) / max(len(parents[n]), 1))
        for i, n in enumerate(layer):
            place[n] = i - (len(layer) - 1) / 2
    return layers


def _draw_png(parsed, png: Path) -> None:
    """Draw ``_parse_dot``'s vertices and edges in layers, top to bottom, into ``png``."""
    # Agg directly, not pyplot: no global backend switch, no figure left open.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import FancyArrowPatch

    nodes, edges, caption = parsed
    layers = _layers(nodes, edges)
    width = max((len(layer) for layer in layers), default=1)
    labels = [attrs.get("label", name).split("\n") for name, attrs in nodes.items()]
    # A column as wide as the widest label (8-point text: about 0.075 inch a character), a row
    # as tall as the tallest; margins and the caption in inches.
    column = max(1.2, 0.075 * max((len(line) for label in labels for line in label), default=1) + 0.5)
    row = max(0.9, 0.16 * max((len(label) for label in labels), default=1) + 0.5)
    margin = 0.3
    wide = column * width + 2 * margin
    caption = "\n".join(w for line in caption.splitlines() for w in textwrap.wrap(line, max(24, int(wide / 0.08))))
    top = margin + (0.2 * (caption.count("\n") + 1) if caption else 0.0)
    size = (wide, row * len(layers) + margin + top)
    dpi = min(100, int(60000 / max(size)))  # keep within the Agg backend's pixel limit
    fig = Figure(figsize=size, dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((margin / size[0], margin / size[1], 1 - 2 * margin / size[0], 1 - (margin + top) / size[1]))
    ax.set_xlim(-width / 2, width / 2)
    ax.set_ylim(-len(layers) + 0.5, 0.5)
    ax.axis("off")
    boxstyle = {"box": "square,pad=0.4", "ellipse": "round,pad=0.5", "hexagon": "round4,pad=0.4",
                "note": "round,pad=0.3"}
    texts = {}
    for level, layer in enumerate(layers):
        for i, name in enumerate(layer):
            attrs = nodes[name]
            dashed = "dashed" in attrs.get("style", "")
            filled = "filled" in attrs.get("style", "")
            texts[name] = ax.text(
                i - (len(layer) - 1) / 2, -level, attrs.get("label", name),
                ha="center", va="center", fontsize=8, zorder=3, color=attrs.get("fontcolor", "black"),
                bbox={
                    "boxstyle": boxstyle.get(attrs.get("shape", "box"), "square,pad=0.4"),
                    "facecolor": attrs.get("fillcolor", "white") if filled else "white",
                    "edgecolor": attrs.get("color", "black"),
                    "linestyle": "--" if dashed else "-",
                },
            )
    if caption:
        fig.text(0.5, 1 - margin / size[1], caption, ha="center", va="top", fontsize=9)
    fig.canvas.draw()  # places the label boxes, which the arrows are clipped to
    depth = {name: d for d, layer in enumerate(layers) for name in layer}
    for a, b, attrs in edges:
        skips = depth[b] - depth[a] > 1  # bowed, so that it passes beside the layers between
        ax.add_patch(FancyArrowPatch(
            texts[a].get_position(), texts[b].get_position(),
            patchA=texts[a].get_bbox_patch(), patchB=texts[b].get_bbox_patch(),
            connectionstyle=f"arc3,rad={0.3 if skips else 0.0}",
            arrowstyle="-" if attrs.get("arrowhead") == "none" else "-|>", mutation_scale=10, zorder=4,
            color=attrs.get("color", "#555555"),
            linestyle={"dashed": "--", "dotted": ":"}.get(attrs.get("style", ""), "-"),
        ))
    fig.savefig(png, dpi=dpi)
