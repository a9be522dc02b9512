"""Transformers, small enough for a regular test: Swin v1's wrapped window attention is a stem,
ViT's concat of the class token is no joint."""

import torch
from torchvision.models.swin_transformer import SwinTransformer
from torchvision.models.vision_transformer import VisionTransformer

import fxoto
from test_properties import check_subnet
from util import randomize_


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
