"""Transformers, small enough for a regular test: Swin v1's wrapped window attention is a stem,
ViT's concat of the class token is no joint."""

import itertools

import torch
from torch import nn
from torchvision.models.swin_transformer import SwinTransformer
from torchvision.models.vision_transformer import VisionTransformer

import fxoto
from test_properties import check_subnet
from util import assert_groups_leave, randomize_


def small_swin():
    model = SwinTransformer(patch_size=[4, 4], embed_dim=8, depths=[2, 2], num_heads=[2, 2], window_size=[2, 2],
                            stochastic_depth_prob=0.0, num_classes=3)
    return randomize_(model).eval()


def test_swin_attention_branches_are_gezigs_with_exact_subnets():
    """torchvision wraps ``shifted_window_attention`` for fx: one call node whose output is
    ``proj(...)``, zero when its variables are; each block's attention and MLP branch is a GeZIG."""
    x = torch.randn(2, 3, 16, 16)
    space = fxoto.build_space(small_swin(), (x,))
    assert len(space.groups) == 8 and not space.excluded  # 4 blocks, attention and MLP each
    attention = [g for g in space.groups if "shifted_window_attention" in g.nodes[0]]
    assert len(attention) == 4
    assert {"features.1.0.attn.qkv.weight", "features.1.0.attn.proj.weight", "features.1.0.attn.proj.bias"} <= {
        m.param for m in attention[0].members}
    for seed in range(4):
        model = small_swin()
        space = fxoto.build_space(model, (x,))
        check_subnet(model, x, space.sample_removal(0.5, seed), space)


def test_vit_class_token_concat_is_no_joint():
    """An independent reading of the paper's rules counts two more GeZIGs in vit_b_16 (26) than fxoto
    (24, two per encoder layer): the two inputs of ``torch.cat([class_token, patches], dim=1)``, the
    class token and the patch embedding (conv_proj -> reshape -> permute).  That concat runs along the
    token dim, not the channels: the positional embedding is then added token by token and the head
    reads ``x[:, 0]``, so erasing either input shifts every later token and the sub-network would
    compute something else.  Neither is removable; fxoto sets the class token aside with that
    reason (the patch embedding's segment also feeds a shape read, so it is no candidate)."""
    model = randomize_(VisionTransformer(image_size=16, patch_size=8, num_layers=2, num_heads=2, hidden_dim=8,
                                         mlp_dim=16, num_classes=3)).eval()
    x = torch.randn(2, 3, 16, 16)
    space = fxoto.build_space(model, (x,))
    assert len(space.groups) == 4
    assert [e.nodes for e in space.excluded] == [("expand",)]
    assert "'cat' concatenates reaches node 'add'" in space.excluded[0].reason
    check_subnet(model, x, [0, 3], space)


class BiasedAttention(nn.Module):
    """LeViT's attention: a learned bias per head and relative offset, gathered by a buffer of
    indices (``attention_biases[:, attention_bias_idxs]``) and added to the logits."""

    def __init__(self, dim: int = 8, heads: int = 2, resolution: int = 3):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        points = list(itertools.product(range(resolution), repeat=2))
        offsets: dict[tuple[int, int], int] = {}
        idxs = [offsets.setdefault((abs(a[0] - b[0]), abs(a[1] - b[1])), len(offsets)) for a in points for b in points]
        self.attention_biases = nn.Parameter(torch.randn(heads, len(offsets)))
        self.register_buffer("attention_bias_idxs", torch.tensor(idxs).view(len(points), len(points)))

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        attn = q @ k.transpose(-2, -1) * self.head_dim ** -0.5 + self.attention_biases[:, self.attention_bias_idxs]
        return self.proj((attn.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c))


class TinyLeViT(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.attn, self.head = nn.Linear(4, 8), BiasedAttention(), nn.Linear(8, 3)

    def forward(self, x):
        h = self.embed(x)
        return self.head((h + self.attn(h)).mean(1))


def test_an_indexed_bias_table_leaves_the_subnet_with_its_group():
    """The bias table added to the logits is a group of its own (zero, the logits are q.k alone);
    erased, its parameter and index buffer leave the sub-network, not just the gather."""
    model = randomize_(TinyLeViT()).eval()
    x = torch.randn(2, 9, 4)
    space = fxoto.build_space(model, (x,))
    table = next(g for g in space.groups if [m.param for m in g.members] == ["attn.attention_biases"])
    sub = check_subnet(model, x, [table.id], space)
    assert_groups_leave(space, [table.id], sub)
    names = {name for name, _ in [*sub.named_parameters(), *sub.named_buffers()]}
    assert "attn.attention_biases" not in names and "attn.attention_bias_idxs" not in names
    assert "attn.qkv.weight" in names
