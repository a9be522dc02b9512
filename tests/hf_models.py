"""Tiny random configurations of Hugging Face models for the tests (2 layers, 32 wide, 4 heads, 48 MLP units;
LLaMA with 2 key/value heads), no download, and their inputs.  Import after ``pytest.importorskip("transformers")``."""

from __future__ import annotations

import torch
from transformers import BertConfig, BertModel, GPT2Config, GPT2Model, LlamaConfig, LlamaModel, ViTConfig, ViTModel

V = 64  # vocabulary


def llama(cls=LlamaModel, **config):
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, use_cache=False, **config)
    return cls(cfg).eval()


def bert():
    cfg = BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                     max_position_embeddings=64)
    return BertModel(cfg).eval()


def vit():
    cfg = ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                    num_attention_heads=4, intermediate_size=48)
    return ViTModel(cfg).eval()


def gpt2(cls=GPT2Model, **config):
    cfg = GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_inner=48, n_positions=64, use_cache=False,
                     **config)
    return cls(cfg).eval()


def ids(b, s, seed=0):
    return torch.randint(0, V, (b, s), generator=torch.Generator().manual_seed(seed))


def images(b, seed=0):
    return torch.randn(b, 3, 16, 16, generator=torch.Generator().manual_seed(seed))
