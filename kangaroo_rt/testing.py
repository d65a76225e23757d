"""Small seeded models for tests, examples and CPU benchmarks (no downloads, no training).

``agreeing_pair`` builds a target whose layers from ``exit_layer`` on only nudge the residual stream,
and an adapter that passes the exit state through to the target's final norm: its drafts agree with
the target most of the time (high but imperfect acceptance), which exercises long accepted runs,
full acceptance with the bonus token and the adapter's two-position catch-up.
"""
from __future__ import annotations

import json
import os
from typing import Optional, Sequence, Tuple

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


def edit_config(folder: str, **changes) -> None:
    """Update fields of ``folder/config.json`` in place (for tests of mismatched checkpoints)."""
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(path, "w") as f:
        json.dump(cfg, f)


def ragged_prompts(batch: int, vocab_size: int, seed: int, length: int = 9, low: int = 0,
                   device: str = "cpu") -> Tuple[torch.Tensor, torch.Tensor]:
    """(ids (batch, length) with tokens in [low, vocab_size), attention mask): odd rows left-padded by
    1 to 5 positions (different widths), seeded."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(low, vocab_size, (batch, length), generator=gen)
    mask = torch.ones_like(ids)
    for r in range(1, batch, 2):
        mask[r, : 1 + r % 5] = 0
    return ids.to(device), mask.to(device)


GRAPH_SETTINGS = ((1, 0.0), (4, 0.6), (6, 0.0))  # (gamma, eta): no middle step, eta stops, full chains


def check_graphs_match_eager_and_plain(model, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int,
                                       settings: Sequence[Tuple[int, float]] = GRAPH_SETTINGS) -> None:
    """Kangaroo through the fixed-shape (CUDA graph) rounds and through the eager loop both give plain greedy
    decoding's tokens, and the same accepted lengths, for every (gamma, eta); AssertionError otherwise."""
    from .config import KangarooConfig

    kw = dict(attention_mask=mask, max_new_tokens=max_new_tokens)
    plain = model.generate(ids, kangaroo=None, **kw)
    for gamma, eta in settings:
        kc = KangarooConfig(gamma=gamma, eta=eta)
        eager = model.generate(ids, kangaroo=kc, cuda_graphs=False, return_dict_in_generate=True, **kw)
        graph = model.generate(ids, kangaroo=kc, cuda_graphs=True, return_dict_in_generate=True, **kw)
        for name, out in (("eager", eager.sequences), ("graph", graph.sequences)):
            assert_same_tokens(model.target, ids, mask, plain, out,
                               f"{name} Kangaroo != plain greedy (gamma={gamma}, eta={eta})")
        assert graph.stats.accepted_lengths == eager.stats.accepted_lengths, (gamma, eta)


@torch.no_grad()
def next_token_margin(target: Transformer, prefix: torch.Tensor) -> Tuple[int, float, float]:
    """(greedy token, top-1 minus top-2 logit, largest |logit|) of the target's next-token logits after
    prefix (T,) int64, from one fresh full forward pass."""
    t = prefix.numel()
    positions = torch.arange(t, device=target.device)[None]
    logits = target(prefix[None].to(target.device), positions, target.new_cache(1, t))[0, -1].float()
    top = logits.topk(2)
    return int(top.indices[0]), float(top.values[0] - top.values[1]), float(logits.abs().max())


def difference_report(target: Transformer, ids: torch.Tensor, mask: torch.Tensor, want: torch.Tensor,
                      got: torch.Tensor) -> str:
    """Where ``got`` first departs from ``want`` (both (B, T + new) after prompts ids (B, T) with mask), and the
    target's top-2 logit margin there, also in units of the dtype's round-off at the largest logit. A margin of
    the order of the rounding error the layers accumulate means the two paths broke a near-tie differently
    (kernels of different shapes round differently); a margin far above it means a bug."""
    if want.shape != got.shape:
        return f"shapes differ: {tuple(want.shape)} vs {tuple(got.shape)}"
    diff = (want != got).nonzero()
    if diff.numel() == 0:
        return "no difference"
    row, col = diff[0].tolist()
    t = ids.shape[1]
    where = f"row {row}, column {col}: {want[row, col].item()} expected, {got[row, col].item()} got"
    if col < t:
        return where + " (inside the prompt)"
    prefix = torch.cat([ids[row][mask[row].bool()], want[row, t:col]])
    _, margin, scale = next_token_margin(target, prefix)
    ulps = margin / max(torch.finfo(target.dtype).eps * scale, torch.finfo(torch.float32).tiny)
    return (where + f" (new token {col - t}); the target's top-2 logit margin there is {margin:.3g}, "
            f"{ulps:.3g}x the {target.dtype} round-off of its largest logit ({scale:.3g})")


def assert_same_tokens(target: Transformer, ids: torch.Tensor, mask: torch.Tensor, want: torch.Tensor,
                       got: torch.Tensor, label: str) -> None:
    """AssertionError "label: <difference_report>" unless got equals want (the report is built only on failure)."""
    if not torch.equal(got, want):
        raise AssertionError(f"{label}: " + difference_report(target, ids, mask, want, got))
