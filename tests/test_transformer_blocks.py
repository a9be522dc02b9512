"""Random transformer blocks (hypothesis) under both front ends: exact sub-networks, heads as groups,
and no group across a LayerNorm stream.

A block draws its heads, key/value heads (grouped-query attention), head size, pre- or
post-norm, LayerNorm or RMSNorm, a gated or plain MLP, rotary embeddings or none, separate
q, k, v layers or one fused qkv layer (timm's layout), and the depth; the same network is captured by torch.fx and by torch.export.
"""

from __future__ import annotations

import copy
import os

import torch
import torch.nn.functional as F
from hypothesis import event, given, settings
from hypothesis import strategies as st
from torch import nn

import fxoto
from util import assert_groups_leave


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Block(nn.Module):
    def __init__(self, dim, heads, kv_heads, head_dim, pre_norm, rms, gated, hidden, rotary, fused=False):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.pre_norm, self.gated, self.rotary, self.fused = pre_norm, gated, rotary, fused
        if fused:  # timm's layout: one qkv layer, reshaped to [B, N, 3, H, d], the 3 moved first and unbound
            assert heads == kv_heads
            self.qkv = nn.Linear(dim, 3 * heads * head_dim)
        else:
            self.q = nn.Linear(dim, heads * head_dim)
            self.k = nn.Linear(dim, kv_heads * head_dim)
            self.v = nn.Linear(dim, kv_heads * head_dim)
        self.o = nn.Linear(heads * head_dim, dim)
        self.norm1 = RMSNorm(dim) if rms else nn.LayerNorm(dim)
        self.norm2 = RMSNorm(dim) if rms else nn.LayerNorm(dim)
        if gated:
            self.gate, self.up, self.down = nn.Linear(dim, hidden), nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        else:
            self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def attention(self, h):
        b, s, _ = h.shape
        if self.fused:
            q, k, v = self.qkv(h).reshape(b, s, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q = self.q(h).view(b, s, self.heads, self.head_dim).transpose(1, 2)
            k = self.k(h).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
            v = self.v(h).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        if self.rotary:
            angle = torch.arange(s, dtype=h.dtype).unsqueeze(-1) * torch.linspace(0.1, 1.0, self.head_dim)
            cos, sin = angle.cos().unsqueeze(0).unsqueeze(0), angle.sin().unsqueeze(0).unsqueeze(0)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
        rep = self.heads // self.kv_heads
        if rep > 1:
            k = k.unsqueeze(2).expand(b, self.kv_heads, rep, s, self.head_dim).reshape(b, self.heads, s, self.head_dim)
            v = v.unsqueeze(2).expand(b, self.kv_heads, rep, s, self.head_dim).reshape(b, self.heads, s, self.head_dim)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(a.transpose(1, 2).reshape(b, s, self.heads * self.head_dim))

    def mlp(self, h):
        if self.gated:
            return self.down(F.silu(self.gate(h)) * self.up(h))
        return self.fc2(self.act(self.fc1(h)))

    def forward(self, x):
        if self.pre_norm:
            x = x + self.attention(self.norm1(x))
            return x + self.mlp(self.norm2(x))
        x = self.norm1(x + self.attention(x))
        return self.norm2(x + self.mlp(x))


class Net(nn.Module):
    def __init__(self, dim, blocks, out=5):
        super().__init__()
        self.inp = nn.Linear(6, dim)
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Linear(dim, out)

    def forward(self, x):
        h = self.inp(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


@st.composite
def transformers_nets(draw):
    kv_heads = draw(st.integers(1, 2))
    heads = kv_heads * draw(st.integers(1, 3))
    head_dim = draw(st.sampled_from([2, 4]))
    dim = draw(st.sampled_from([8, 12]))
    rms = draw(st.booleans())
    fused = heads == kv_heads and draw(st.booleans())
    blocks = [Block(dim, heads, kv_heads, head_dim, draw(st.booleans()), rms, draw(st.booleans()),
                    draw(st.integers(3, 8)), draw(st.booleans()), fused)
              for _ in range(draw(st.integers(1, 2)))]
    event(f"fused qkv: {fused}")
    event(f"grouped-query attention: {heads > kv_heads}")
    torch.manual_seed(draw(st.integers(0, 2**16)))
    net = Net(dim, blocks).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return net, draw(st.sampled_from(["fx", "export"])), draw(st.integers(0, 1000)), rms, \
        draw(st.sampled_from(["channels", "both"]))


def _stream_params(net: Net) -> set[str]:
    """The parameters that write or normalise the residual stream."""
    names = {"inp.weight", "inp.bias"}
    for i, block in enumerate(net.blocks):
        writers = ["o", "norm1", "norm2"] + (["down"] if block.gated else ["fc2"])  # norms: their entries
        names.update(f"blocks.{i}.{w}.{p}" for w in writers for p in ("weight", "bias"))
    return names


@settings(max_examples=int(os.environ.get("FXOTO_BLOCK_EXAMPLES", "8")))
@given(transformers_nets())
def test_random_transformer_blocks_are_exact_under_both_front_ends(drawn):
    net, tracer, seed, rms, structures = drawn
    x = torch.randn(2, 5, 6)
    other = torch.randn(3, 4, 6)
    space = fxoto.search(net, 1, (x,), tracer=tracer, structures=structures).space
    kinds = {g.kind for g in space.groups}
    assert "head" in kinds and "channel" in kinds
    assert len(space.attentions) == len(net.blocks)
    stream = _stream_params(net)
    on_stream = [g for g in space.groups if g.kind == "channel"
                 and any(m.param in stream and m.dim == 0 for m in g.members)]
    event(f"RMSNorm stream, {structures}: {len(on_stream)} stream groups" if rms else "LayerNorm stream")
    if not rms:
        assert not on_stream, "a group straddles a LayerNorm stream"
    elif structures == "channels":
        assert len(on_stream) == net.inp.out_features  # every channel of the stream: all its norms are RMSNorms
    supernet = copy.deepcopy(net)
    s = fxoto.search(supernet, 1, (x,), tracer=tracer, structures=structures).space
    ids = s.sample_removal(0.4, seed=seed)
    heads = [g.id for g in s.groups if g.kind == "head"]
    ids = sorted(set(ids) | set(heads[:1]))
    if not s.is_valid_removal(ids):
        ids = s.sample_removal(0.4, seed=seed)
    s.zero_(ids)
    sub = s.construct_subnet()
    for inp in (x, other):
        torch.testing.assert_close(sub(inp), supernet(inp), rtol=1e-4, atol=1e-5)
    assert sum(p.numel() for p in sub.parameters()) < sum(p.numel() for p in net.parameters())
    assert_groups_leave(s, ids, sub)
