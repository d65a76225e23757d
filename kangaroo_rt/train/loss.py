"""Soft-label distillation loss of the adapter against the frozen target."""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

from ..adapter import Adapter
from ..model import Transformer


def distill_loss(target: Transformer, adapter: Adapter, exit_hidden: torch.Tensor, final_hidden: torch.Tensor,
                 mask: torch.Tensor, chunk: int = 1024) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cross-entropy between the target's softmax(lm_head(norm(final))) and the draft's
    log_softmax(lm_head(adapter(exit))), summed over the positions where ``mask`` is set.

    exit_hidden, final_hidden: (B, T, D); mask: (B, T) bool.
    Returns (loss summed over trained positions, number of positions, number where the draft's
    top-1 equals the target's). The sum (not the mean) lets a distributed step normalise by the
    token count of the whole global batch. Logits are formed ``chunk`` positions at a time.
    """
    b, t, _ = exit_hidden.shape
    positions = torch.arange(t, device=exit_hidden.device).expand(b, t)
    cos, sin = target.rope(positions)
    y = adapter.forward_train(exit_hidden.to(adapter.dtype), cos.to(adapter.dtype), sin.to(adapter.dtype))
    y, final_hidden = y[mask], final_hidden[mask]  # (n, D)
    total = y.new_zeros(())
    agree = torch.zeros((), dtype=torch.long, device=y.device)
    for lo in range(0, y.shape[0], chunk):
        draft_logits = target.lm_head(y[lo:lo + chunk]).float()
        with torch.no_grad():
            teacher_logits = target.head(final_hidden[lo:lo + chunk].to(target.dtype)).float()
            teacher = teacher_logits.softmax(dim=-1)
        total = total + -(teacher * F.log_softmax(draft_logits, dim=-1)).sum()
        agree += (draft_logits.argmax(-1) == teacher_logits.argmax(-1)).sum()
    return total, torch.tensor(y.shape[0], device=y.device), agree
