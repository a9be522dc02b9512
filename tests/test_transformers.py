"""Hugging Face transformers through the torch.export front end: tiny random configurations, no download.

For each model: ``structures="both"`` finds groups of every kind that applies (operations,
MLP neurons as channels, attention heads), three random valid removals with heads in them
give a smaller sub-network equal to the zeroed super-network, on the example and on inputs
of another batch size and sequence length, and the sub-network's head and neuron counts are
the ones removed.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch
import torchvision
from torch import nn

import fxoto
import fxoto.patterns
from util import assert_groups_leave
from fxoto.errors import UntraceableModelError

transformers = pytest.importorskip("transformers")  # in the test extra; no skip where it is installed

from transformers import LlamaForCausalLM  # noqa: E402

from hf_models import bert as _bert  # noqa: E402
from hf_models import gpt2 as _gpt2  # noqa: E402
from hf_models import ids as _ids  # noqa: E402
from hf_models import images as _images  # noqa: E402
from hf_models import llama as _llama  # noqa: E402
from hf_models import vit as _vit  # noqa: E402


MODELS = {
    # name: (builder, example, other input (other batch size and sequence length), heads per layer, kv heads)
    "llama-gqa": (_llama, _ids(2, 7), _ids(3, 5, 1), 4, 2),
    "bert": (_bert, _ids(2, 7), _ids(3, 5, 1), 4, 4),
    "vit": (_vit, _images(2), _images(3, 1), 4, 4),
    "gpt2 (fused qkv, Conv1D)": (_gpt2, _ids(2, 7), _ids(3, 5, 1), 4, 4),
}


def _hidden(out):
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out


def _kinds(space):
    found = {}
    for g in space.groups:
        found[g.kind] = found.get(g.kind, 0) + 1
    return found


def _removal(space, seed):
    """A random valid removal: some groups of every kind, at least one head."""
    rng = random.Random(seed)
    heads = [g.id for g in space.groups if g.kind == "head"]
    for _ in range(50):
        ids = sorted(set(space.sample_removal(0.3, seed=rng.randrange(1000)) + rng.sample(heads, 2)))
        if space.is_valid_removal(ids):
            return ids
    raise AssertionError("no valid removal with heads found")


@pytest.mark.parametrize("name", sorted(MODELS))
def test_heads_neurons_and_operations_are_exact(name):
    build, x, other, heads, kv_heads = MODELS[name]
    torch.manual_seed(0)
    model = build()
    space = fxoto.search(model, 1, (x,), structures="both").space
    kinds = _kinds(space)
    assert kinds["operation"] == 4  # attention and MLP branches of two blocks
    assert kinds["channel"] == 2 * 48  # one group per MLP hidden unit
    assert kinds["head"] == 2 * kv_heads
    before = sum(p.numel() for p in model.parameters())
    trained = copy.deepcopy(model.state_dict())
    for seed in range(3):  # one capture, three removals: the model's values restored after each
        ids = _removal(space, seed)
        space.zero_(ids)
        sub = space.construct_subnet()
        assert type(sub(x)) is type(model(x))  # a ModelOutput stays one
        for inp in (x, other):
            torch.testing.assert_close(_hidden(sub(inp)), _hidden(model(inp)), rtol=1e-4, atol=1e-5)
        assert sum(p.numel() for p in sub.parameters()) < before
        assert_groups_leave(space, ids, sub)
        _check_head_counts(space, sub, ids, heads, kv_heads)
        model.load_state_dict(trained)


def _check_head_counts(space, sub, ids, heads, kv_heads):
    """Each attention's projections lose d rows per removed head (a fused qkv layer, of each piece)."""
    removed = space.removed_heads(ids)
    names = {n.name: n for n in sub.graph.nodes}
    for a in space.attentions:
        if a.node not in names:
            continue  # erased with its operation group
        rows: dict[str, int] = {}
        for key, stem, _ in a.rows:
            count = heads if key == a.q else kv_heads
            width = a.head_dim if key == a.q else a.kv_dim
            rows[stem] = rows.get(stem, 0) + width * sum((key, h) not in removed for h in range(count))
        for stem, n in rows.items():
            module = sub.get_submodule(names[stem].target)
            assert getattr(module, "out_features", getattr(module, "nf", None)) == n
        gone_kv = sum((a.k, j) in removed for j in range(kv_heads))
        assert len(a.kept_queries(removed)) <= heads - gone_kv * (heads // kv_heads)
    # every layer slimmed by channel groups (MLP neurons, a stream's writers) lost exactly their rows
    heads_stems = {stem for a in space.attentions for _, stem, _ in a.rows}
    lost: dict[str, int] = {}
    for i in ids:
        if space.groups[i].kind == "channel":
            for stem, _ in space.slices[i].rows:
                lost[stem] = lost.get(stem, 0) + 1
    for stem, n in lost.items():
        if stem in names and stem not in heads_stems:
            module = sub.get_submodule(names[stem].target)
            width = getattr(module, "out_features", getattr(module, "nf", getattr(module, "embedding_dim", None)))
            assert width == space.layers[stem].channels - n, stem


def _members(group):
    by_param = {}
    for m in group.members:
        by_param.setdefault(m.param, []).append((m.dim, m.start, m.stop))
    return by_param


def test_llama_gqa_key_value_heads_and_query_heads_are_groups():
    model = _llama()
    space = fxoto.search(model, 1, (_ids(2, 7),), structures="channels").space
    heads = [g for g in space.groups if g.kind == "head"]
    assert len(heads) == 2 * (2 + 4)  # per layer: 2 key/value heads, 4 query heads
    # key/value head 0 of layer 0: rows 0..7 of k and v (its query heads read zeros and go with it)
    assert _members(heads[0]) == {"layers.0.self_attn.k_proj.weight": [(0, 0, 8)],
                                  "layers.0.self_attn.v_proj.weight": [(0, 0, 8)]}
    # query head 1 of layer 0: rows 8..15 of q and columns 8..15 of the output projection
    assert _members(heads[3]) == {"layers.0.self_attn.q_proj.weight": [(0, 8, 16)],
                                  "layers.0.self_attn.o_proj.weight": [(1, 8, 16)]}


def test_llama_gqa_with_operations_keeps_query_heads_in_their_key_value_group():
    """With "both" the output projection stays whole in the attention's operation group, so a query head
    alone could not be zeroed: each key/value head's group holds the q rows of its query heads."""
    space = fxoto.search(_llama(), 1, (_ids(2, 7),), structures="both").space
    head = next(g for g in space.groups if g.kind == "head")
    assert _members(head) == {"layers.0.self_attn.k_proj.weight": [(0, 0, 8)],
                              "layers.0.self_attn.v_proj.weight": [(0, 0, 8)],
                              "layers.0.self_attn.q_proj.weight": [(0, 0, 8), (0, 8, 16)]}


@pytest.mark.parametrize("removed", [[("q", 1)], [("q", 0), ("q", 3)], [("q", 2), ("q", 3)], [("k", 0), ("q", 2)]])
def test_llama_gqa_query_heads_removed_inside_their_key_value_group(removed):
    """Query heads removed unevenly from their key/value groups: k and v's repeated heads are indexed down."""
    model = _llama()
    s = fxoto.search(model, 1, (_ids(2, 7),), structures="channels").space
    a = s.attentions[0]
    stems = {"q": a.q, "k": a.k}
    ids = [g.id for g in s.groups if g.kind == "head" and s._heads.heads[g.id] in
           [frozenset({(stems[p], i)}) | ({(a.v, i)} if p == "k" else set()) for p, i in removed]]
    assert len(ids) == len(removed)
    s.zero_(ids)
    sub = s.construct_subnet()
    gone = s.removed_heads(ids)
    q = sub.get_submodule("layers.0.self_attn.q_proj")
    assert q.out_features == 8 * len(a.kept_queries(gone))
    for inp in (_ids(2, 7), _ids(3, 5, 1)):
        torch.testing.assert_close(sub(inp).last_hidden_state, model(inp).last_hidden_state, rtol=1e-4, atol=1e-5)


def test_llama_rmsnorm_stream_channels_are_removed_exactly():
    """A causal LM's residual stream (embedding columns, output projections' rows, RMSNorm weights): a stream
    channel zero in every writer goes, and the RMSNorms keep their denominator (weight x sqrt(N/N'), eps x N/N')."""
    torch.manual_seed(0)
    model = _llama(LlamaForCausalLM)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    x = _ids(2, 7)
    space = fxoto.search(model, 1, (x,), structures="channels").space
    stream = [g for g in space.groups if g.kind == "channel"
              and any(m.param == "model.embed_tokens.weight" for m in g.members)]
    assert len(stream) == 32
    one = {m.param for m in stream[0].members}
    assert {"model.embed_tokens.weight", "model.norm.weight", "model.layers.1.mlp.down_proj.weight",
            "model.layers.0.self_attn.o_proj.weight", "model.layers.0.input_layernorm.weight"} <= one
    eps = model.model.norm.variance_epsilon
    ids = [g.id for g in stream[:12]]
    space.zero_(ids)
    sub = space.construct_subnet()
    assert sub.get_submodule("model.embed_tokens").embedding_dim == 20
    assert sub.get_submodule("lm_head").in_features == 20
    norm = next(n for n in sub.graph.nodes if n.target is fxoto.patterns.rms_norm and "model_norm" in n.args[1].name)
    assert norm.args[2] == pytest.approx(eps * 32 / 20)
    for inp in (x, _ids(3, 5, 1)):
        torch.testing.assert_close(sub(inp).logits, model(inp).logits, rtol=1e-4, atol=1e-5)


def test_a_model_whose_output_is_the_stream_keeps_it():
    space = fxoto.search(_llama(), 1, (_ids(2, 7),), structures="channels").space
    assert not any(m.param == "embed_tokens.weight" for g in space.groups for m in g.members)
    assert any("graph output" in e.reason for e in space.excluded)


def test_removing_every_head_of_an_attention_is_refused():
    model = _bert()
    space = fxoto.search(model, 1, (_ids(2, 7),), structures="channels").space
    attention = space.attentions[0]
    ids = [g.id for g in space.groups if g.kind == "head" and attention.node in g.nodes]
    assert len(ids) == 4
    assert not space.is_valid_removal(ids)
    assert attention.k in space.removal_problem(ids)
    assert space.is_valid_removal(ids[:3])


def test_the_sub_network_keeps_the_model_signature_and_exports_and_saves_again(tmp_path):
    model = _llama()
    s = fxoto.search(model, 1, (_ids(2, 7),), structures="channels").space
    ids = [g.id for g in s.groups if g.kind == "head"][:1] + [g.id for g in s.groups if g.kind == "channel"][:5]
    s.zero_(ids)
    sub = s.construct_subnet()
    x = _ids(1, 9, 3)
    torch.testing.assert_close(sub(input_ids=x).last_hidden_state, model(x).last_hidden_state, rtol=1e-4, atol=1e-5)
    torch.export.save(torch.export.export(sub, (_ids(2, 7),), strict=False), tmp_path / "sub.pt2")
    loaded = torch.export.load(tmp_path / "sub.pt2").module()
    y = _ids(2, 7, 4)
    torch.testing.assert_close(loaded(y).last_hidden_state, model(y).last_hidden_state, rtol=1e-4, atol=1e-5)


def test_keyword_example_inputs_go_through_export():
    model = _bert()
    x, mask = _ids(2, 7), torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    s = fxoto.search(model, 1, example_kwargs={"input_ids": x, "attention_mask": mask}, structures="both").space
    ids = _removal(s, 0)
    s.zero_(ids)
    sub = s.construct_subnet()
    torch.testing.assert_close(sub(input_ids=x, attention_mask=mask).last_hidden_state,
                               model(input_ids=x, attention_mask=mask).last_hidden_state, rtol=1e-4, atol=1e-5)


def test_fx_models_keep_the_fx_path():
    model = torchvision.models.resnet18(num_classes=10).eval()
    space = fxoto.build_space(model, (torch.randn(1, 3, 32, 32),))
    assert any(n.op == "call_module" and n.target == "layer1.0.conv1" for n in space.graph.nodes)
    assert len(space.groups) == 11
    assert not hasattr(space.gm, "_in_spec")  # traced by fx, not exported


def test_tracer_fx_refuses_what_only_export_takes():
    model = _bert()
    with pytest.raises(UntraceableModelError, match="torch.fx could not trace BertModel"):
        fxoto.search(model, 1, (_ids(2, 7),), tracer="fx")


def test_when_both_captures_fail_one_error_gives_both_reasons():
    class Sized(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: neither capture takes it
                return self.fc(x)
            return x

    with pytest.raises(UntraceableModelError) as info:
        fxoto.search(Sized(), 1, (torch.randn(2, 4),))
    assert "torch.fx could not trace Sized" in str(info.value)
    assert "torch.export could not capture Sized" in str(info.value)


def test_h2spg_delivers_heads_and_neurons_on_a_tiny_llama():
    torch.manual_seed(0)
    model = _llama(LlamaForCausalLM)
    model.train()
    x = _ids(4, 12)
    s = fxoto.search(model, {"heads": 2, "channels": 0.25}, (x,), structures="channels")
    opt = s.optimizer(lr=1e-3, variant="adamw", warmup_steps=3, pruning_steps=6)
    for step in range(12):
        batch = _ids(4, 12, step)
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    zero = s.space.zero_groups()
    kinds = {}
    for i in zero:
        kinds[s.space.groups[i].kind] = kinds.get(s.space.groups[i].kind, 0) + 1
    # 96 MLP neurons and 32 residual-stream channels (every norm on the stream is an RMSNorm): a quarter is 32
    assert sum(g.kind == "channel" for g in s.space.groups) == 128
    assert kinds == {"head": 2, "channel": 32} == s.K_per_kind
    sub = s.subnet()
    torch.testing.assert_close(sub(x).logits, model(x).logits, rtol=1e-4, atol=1e-5)
    assert sum(p.numel() for p in sub.parameters()) < sum(p.numel() for p in model.parameters())


def test_hugging_face_resnet_goes_through_export_with_any_image_size():
    from transformers import ResNetConfig, ResNetModel

    torch.manual_seed(0)
    model = ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")).eval()
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(UntraceableModelError):
        fxoto.search(model, 1, (x,), tracer="fx")
    space = fxoto.search(model, 1, (x,), structures="both").space
    assert {g.kind for g in space.groups} == {"operation", "channel"}
    space.zero_(space.sample_removal(0.5, seed=0))
    sub = space.construct_subnet()
    for inp in (x, torch.randn(3, 3, 48, 40)):  # batch and image size captured as dynamic
        torch.testing.assert_close(sub(inp).pooler_output, model(inp).pooler_output, rtol=1e-4, atol=1e-5)
    assert sum(p.numel() for p in sub.parameters()) < sum(p.numel() for p in model.parameters())
