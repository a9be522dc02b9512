"""The sub-network in the user's own class: ``construct_subnet(in_place=True)`` on Hugging Face models.

Tiny random configurations as in tests/test_transformers.py, no download.  In place, a model
keeps its class (and ``generate()``, its KV cache, ``save_pretrained``), loses parameters and
computes what the ``GraphModule`` sub-network and the zeroed super-network compute; a forward
that reads a width fxoto does not update is refused with the model left exactly as it was.
"""

from __future__ import annotations

import copy
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxoto
from fxoto.errors import FxotoError, InPlaceError
from fxoto.uniform import blocks, is_uniform

transformers = pytest.importorskip("transformers")

from transformers import LlamaForCausalLM  # noqa: E402

from hf_models import bert as _bert  # noqa: E402
from hf_models import gpt2 as _gpt2  # noqa: E402
from hf_models import ids as _ids  # noqa: E402
from hf_models import images as _images  # noqa: E402
from hf_models import llama as _llama  # noqa: E402
from hf_models import vit as _vit  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


MODELS = {  # name: (builder, example, another input: other batch size and sequence length)
    "bert": (_bert, _ids(2, 7), _ids(3, 5, 1)),
    "llama-gqa": (_llama, _ids(2, 7), _ids(3, 5, 1)),
    "llama-gqa-causal-lm": (lambda: _llama(LlamaForCausalLM), _ids(2, 7), _ids(3, 5, 1)),
    "vit": (_vit, _images(2), _images(3, 1)),
}


def _leaves(out):
    return [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _assert_same(a, b):
    for x, y in zip(_leaves(a), _leaves(b), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)


def _removal(space, seed):
    """A random valid removal of head and channel groups: two heads, about a third of the neurons."""
    rng = random.Random(seed)
    heads = [g.id for g in space.groups if g.kind == "head"]
    channels = [g.id for g in space.groups if g.kind == "channel"]
    for _ in range(50):
        ids = sorted(rng.sample(heads, 2) + rng.sample(channels, len(channels) // 3))
        if space.is_valid_removal(ids):
            return ids
    raise AssertionError("no valid removal found")


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _attributes(model):
    return {path: {k: v for k, v in vars(m).items() if isinstance(v, (int, float, str, tuple, bool))}
            for path, m in model.named_modules()}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_in_place_keeps_the_class_and_equals_both_references(name):
    build, x, other = MODELS[name]
    torch.manual_seed(0)
    model = build()
    s = fxoto.search(model, 1, (x,), structures="both").space
    ids = _removal(s, 0)
    s.zero_(ids)
    zeroed = copy.deepcopy(model)
    graph_sub = s.construct_subnet(ids)
    before = sum(p.numel() for p in model.parameters())
    out = s.construct_subnet(ids, in_place=True)
    assert out is model and type(model) is type(zeroed)
    assert sum(p.numel() for p in model.parameters()) < before
    for inp in (x, other):
        _assert_same(model(inp), graph_sub(inp))
        _assert_same(model(inp), zeroed(inp))
    attention = s.attentions[0]
    q = model.get_submodule(next(n.target for n in s.graph.nodes if n.name == attention.q))
    assert q.out_features == (4 - len(s.removed_heads(ids) & {(attention.q, i) for i in range(4)})) * 8


def test_llama_generates_the_same_greedy_tokens_with_its_kv_cache():
    torch.manual_seed(0)
    model = _llama(LlamaForCausalLM)
    s = fxoto.search(model, 1, (_ids(2, 7),), structures="both").space
    ids = _removal(s, 1)
    s.zero_(ids)
    zeroed = copy.deepcopy(model)
    s.construct_subnet(ids, in_place=True)
    prompt = _ids(2, 6, 5)
    tokens = []
    for m in (zeroed, model):
        m.config.use_cache = True
        m.generation_config.eos_token_id = None  # always 16 new tokens
        tokens.append(m.generate(prompt, max_new_tokens=16, do_sample=False, use_cache=True,
                                 attention_mask=torch.ones_like(prompt)))
    assert tokens[0].shape == (2, 22)
    assert torch.equal(tokens[0], tokens[1])
    cache = model(prompt, use_cache=True).past_key_values  # the cache holds the key/value heads kept
    kept = [m.k_proj.out_features // 8 for m in (layer.self_attn for layer in model.model.layers)]
    assert [cache.layers[i].keys.shape[1] for i in range(2)] == kept and min(kept) < 2


def _train_a_little(model, s, steps=12):
    opt = s.optimizer(lr=1e-3, variant="adamw", warmup_steps=3, pruning_steps=6)
    model.train()
    for step in range(steps):
        batch = _ids(4, 12, step)
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def test_a_uniform_search_rewrites_the_config_and_round_trips_through_save_pretrained(tmp_path):
    torch.manual_seed(0)
    model = _llama(LlamaForCausalLM)
    x = _ids(2, 7)
    s = fxoto.search(model, {"heads": 2, "channels": 16}, (x,), structures="channels", uniform=True)
    _train_a_little(model, s)
    zero = s.space.zero_groups()
    assert len(zero) == 18 and is_uniform(s.space, zero)
    assert [len(set(zero) & set(b)) for b in blocks(s.space, "head")] == [1, 1]
    zeroed = copy.deepcopy(model)
    s.subnet(in_place=True)
    cfg = model.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size) == (2, 1, 8, 40)
    model.save_pretrained(tmp_path)
    loaded = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in model.parameters())
    y = _ids(3, 9, 2)
    torch.testing.assert_close(loaded(y).logits, zeroed(y).logits, rtol=1e-4, atol=1e-5)


def test_uniform_takes_k_per_kind_spread_evenly():
    model = _llama()
    with pytest.raises(ValueError, match="multiple of 2"):
        fxoto.search(model, {"heads": 1}, (_ids(2, 7),), structures="channels", uniform=True)
    with pytest.raises(ValueError, match="per kind"):
        fxoto.search(model, 2, (_ids(2, 7),), structures="channels", uniform=True)


def test_widths_that_differ_per_layer_leave_the_config_alone_and_say_so():
    model = _bert()  # BERT's config says no head size of its own: removed heads cannot be written there
    s = fxoto.search(model, 1, (_ids(2, 7),), structures="both").space
    ids = _removal(s, 2)
    s.zero_(ids)
    config = model.config.to_dict()
    with pytest.warns(UserWarning, match="differ from layer to layer.*torch.save"):
        s.construct_subnet(ids, in_place=True)
    assert model.config.to_dict() == config
    model = _bert()
    s = fxoto.search(model, 1, (_ids(2, 7),), structures="both").space
    ids = [b[0] for b in blocks(s, "head")]  # one head in every layer: uniform, but BERT's head size is hidden / heads
    s.zero_(ids)
    with pytest.warns(UserWarning, match="BertConfig cannot describe the new widths.*torch.save"):
        s.construct_subnet(ids, in_place=True)
    assert model.config.to_dict() == config


class WidthAttention(nn.Module):
    """An attention whose forward reads its width from an attribute fxoto does not know."""

    def __init__(self, dim=16, heads=4):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.head_dim = dim // heads
        self.width = dim

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = (p(x).view(b, s, -1, self.head_dim).transpose(1, 2) for p in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, scale=self.head_dim ** -0.5)
        return self.o(y.transpose(1, 2).reshape(b, s, self.width))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = WidthAttention()
        self.fc = nn.Linear(16, 16)

    def forward(self, x):
        x = x + self.attn(x)
        return x + self.fc(x)


def test_a_forward_reading_a_width_fxoto_does_not_update_is_refused_and_the_model_is_untouched():
    torch.manual_seed(0)
    model = Block().eval()
    x = torch.randn(2, 5, 16)
    s = fxoto.search(model, 1, (x,), structures="channels", tracer="export").space
    ids = [g.id for g in s.groups if g.kind == "head"][:1]
    assert ids
    s.zero_(ids)
    state, attributes = _state(model), _attributes(model)
    params = {k: id(v) for k, v in model.named_parameters()}
    with pytest.raises(InPlaceError, match=r"'attn' \(WidthAttention\)") as info:
        s.construct_subnet(ids, in_place=True)
    assert isinstance(info.value, FxotoError)
    assert {k: id(v) for k, v in model.named_parameters()} == params
    after = _state(model)
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)
    assert _attributes(model) == attributes
    torch.testing.assert_close(s.construct_subnet(ids)(x), model(x))  # the GraphModule still does it


def test_operation_groups_are_refused_in_place():
    model = _llama()
    s = fxoto.search(model, 1, (_ids(2, 7),), structures="both").space
    op = next(g.id for g in s.groups if g.kind == "operation")
    state = _state(model)
    with pytest.raises(InPlaceError, match="whole operations"):
        s.construct_subnet([op], in_place=True)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_the_language_model_run_quick():
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "lm_run.py"), "--quick"], capture_output=True,
                          text=True, timeout=120, cwd=ROOT, env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "perplexity" in done.stdout and "tokens/s" in done.stdout


def test_llama_residual_stream_sliced_in_place_generates_the_same_tokens():
    """The hidden width in place: embedding columns, every projection's rows and columns, and each RMSNorm's
    weight (times sqrt(N/N')) and ``variance_epsilon`` (times N/N')."""
    torch.manual_seed(0)
    model = _llama(LlamaForCausalLM)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    x = _ids(2, 7)
    s = fxoto.search(model, 1, (x,), structures="channels").space
    stream = [g.id for g in s.groups if any(m.param == "model.embed_tokens.weight" for m in g.members)]
    neurons = [g.id for g in s.groups if g.kind == "channel" and g.id not in stream]
    heads = [g.id for g in s.groups if g.kind == "head"]
    ids = stream[:8] + neurons[:10] + heads[:1]
    s.zero_(ids)
    zeroed = copy.deepcopy(model)
    eps = model.model.norm.variance_epsilon
    with pytest.warns(UserWarning, match="torch.save"):
        out = s.construct_subnet(ids, in_place=True)
    assert out is model and model.model.embed_tokens.embedding_dim == 24
    assert model.model.norm.weight.shape == (24,) and model.model.norm.variance_epsilon == pytest.approx(eps * 32 / 24)
    torch.testing.assert_close(model(_ids(3, 5, 1)).logits, zeroed(_ids(3, 5, 1)).logits, rtol=1e-4, atol=1e-5)
    kwargs = dict(max_new_tokens=8, do_sample=False, use_cache=True, attention_mask=torch.ones_like(x), pad_token_id=0)
    assert torch.equal(model.generate(x, **kwargs), zeroed.generate(x, **kwargs))


def test_gpt2_fused_heads_in_place():
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    model = _gpt2(GPT2LMHeadModel, bos_token_id=0, eos_token_id=0)
    x = _ids(2, 7)
    s = fxoto.search(model, 1, (x,), structures="channels").space
    heads = [g.id for g in s.groups if g.kind == "head"]
    ids = [heads[0], heads[5]] + [g.id for g in s.groups if g.kind == "channel"][:20]
    s.zero_(ids)
    zeroed = copy.deepcopy(model)
    with pytest.warns(UserWarning):
        s.construct_subnet(ids, in_place=True)
    assert type(model) is GPT2LMHeadModel
    assert [block.attn.num_heads for block in model.transformer.h] == [3, 3]
    assert model.transformer.h[0].attn.c_attn.nf == 3 * 24
    torch.testing.assert_close(model(_ids(3, 5, 1)).logits, zeroed(_ids(3, 5, 1)).logits, rtol=1e-4, atol=1e-5)


def test_query_heads_removed_unevenly_are_refused_in_place_and_built_as_a_graph():
    model = _llama()
    s = fxoto.search(model, 1, (_ids(2, 7),), structures="channels").space
    a = s.attentions[0]
    ids = [g.id for g in s.groups if g.kind == "head" and s._heads.heads[g.id] == frozenset({(a.q, 0)})]
    s.zero_(ids)
    state = _state(model)
    with pytest.raises(InPlaceError, match=r"keep \[1, 2\] query heads per key/value head"):
        s.construct_subnet(ids, in_place=True)
    assert all(torch.equal(a_, b_) for a_, b_ in zip(_state(model).values(), state.values()))
    sub = s.construct_subnet(ids)
    torch.testing.assert_close(sub(_ids(3, 5, 1)).last_hidden_state, model(_ids(3, 5, 1)).last_hidden_state,
                               rtol=1e-4, atol=1e-5)
