"""Small seeded models for tests, examples and CPU benchmarks (no downloads, no training).

``agreeing_pair`` builds a target whose layers from ``exit_layer`` on only nudge the residual stream,
and an adapter that passes the exit state through to the target's final norm: its drafts agree with
the target most of the time (high but imperfect acceptance), which exercises long accepted runs,
full acceptance with the bonus token and the adapter's two-position catch-up.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .adapter import Adapter
from .config import ModelConfig
from .model import Transformer


def tiny_config(vocab_size: int = 97, hidden_size: int = 64, num_layers: int = 4, num_heads: int = 4,
                num_kv_heads: int = 2, intermediate_size: int = 128, model_type: str = "llama",
                eos_token_id: Optional[int] = None, **kw) -> ModelConfig:
    return ModelConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                       num_hidden_layers=num_layers, num_attention_heads=num_heads,
                       num_key_value_heads=num_kv_heads, model_type=model_type, eos_token_id=eos_token_id,
                       qkv_bias=model_type == "qwen2", **kw)


def random_target(config: ModelConfig, seed: int = 0, head_scale: float = 1.0) -> Transformer:
    """Random fp32 target whose LM head is scaled up so that logits are peaked: greedy choices then
    have clear margins, and token equality tests do not hinge on fp32 round-off between shapes."""
    # Matrices at std 1/sqrt(d) so that every layer moves the residual stream as in a trained model.
    model = Transformer.random(config, seed=seed, std=config.hidden_size ** -0.5)
    with torch.no_grad():
        model.embed_tokens.weight.mul_(config.hidden_size ** 0.5)  # unit-scale embeddings
        if not config.tie_word_embeddings:
            model.lm_head.weight.mul_(head_scale)
    return model


def agreeing_pair(config: ModelConfig, exit_layer: int, seed: int = 0,
                  deep_scale: float = 0.2, head_scale: float = 1.0) -> Tuple[Transformer, Adapter]:
    """(target, adapter) whose drafts mostly agree with the target (see the module docstring)."""
    target = random_target(config, seed=seed, head_scale=head_scale)
    with torch.no_grad():
        for layer in target.layers[exit_layer:]:
            layer.self_attn.o_proj.weight.mul_(deep_scale)
            layer.mlp.down_proj.weight.mul_(deep_scale)
    adapter = Adapter.random(config, seed=seed + 1)
    with torch.no_grad():
        adapter.layers[0].self_attn.o_proj.weight.mul_(0.1)
        adapter.norm.weight.copy_(target.norm.weight)
    return target, adapter
