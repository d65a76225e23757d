"""Checks shared by the token-equality tests (CPU, emulated graphs, GPU): graph == eager == plain, and where two
token sequences part, with the target's top-2 logit margin there."""
import json
import os
from typing import Sequence, Tuple

import torch

from kangaroo_rt.config import KangarooConfig
from kangaroo_rt.model import Transformer

GRAPH_SETTINGS = ((1, 0.0), (4, 0.6), (6, 0.0))  # (gamma, eta): no middle step, eta stops, full chains


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


def check_graphs_match_eager_and_plain(model, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int,
                                       settings: Sequence[Tuple[int, float]] = GRAPH_SETTINGS) -> None:
    """Kangaroo through the fixed-shape (CUDA graph) rounds and through the eager loop both give plain greedy
    decoding's tokens, and the same accepted lengths, for every (gamma, eta); AssertionError otherwise."""
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
