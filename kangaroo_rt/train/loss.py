"""Soft-label distillation loss of the adapter against the frozen target."""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

from .. import ops
from ..adapter import Adapter
from ..model import Transformer


LABELS = ("soft", "top1")


def distill_loss(target: Transformer, adapter: Adapter, exit_hidden: torch.Tensor, final_hidden: torch.Tensor,
                 mask: torch.Tensor, chunk: int = 1024,
                 labels: str = "soft") -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cross-entropy between the target's softmax(lm_head(norm(final))) and the draft's
    log_softmax(lm_head(adapter(exit))), summed over the positions where ``mask`` is set.

    ``labels="soft"`` (the paper) uses the target's whole distribution; ``labels="top1"`` uses its argmax
    only, which is what greedy verification checks: the adapter's capacity goes to the target's top-1, and
    its softmax maximum becomes an estimate of P(draft accepted), the quantity the ``eta`` exit thresholds.

    exit_hidden, final_hidden: (B, T, D); mask: (B, T) bool.
    Returns (loss summed over trained positions, number of positions, number where the draft's
    top-1 equals the target's). The sum (not the mean) lets a distributed step normalise by the
    token count of the whole global batch. Logits are formed ``chunk`` positions at a time.
    """
    if labels not in LABELS:
        raise ValueError(f"labels must be one of {LABELS}, got {labels!r}")
    b, t, _ = exit_hidden.shape
    positions = torch.arange(t, device=exit_hidden.device).expand(b, t)
    cos, sin = target.rope(positions)
    y = adapter.forward_train(exit_hidden.to(adapter.dtype), cos.to(adapter.dtype), sin.to(adapter.dtype))
    y, final_hidden = y[mask], final_hidden[mask]  # (n, D)
    total = y.new_zeros(())
    agree = torch.zeros((), dtype=torch.long, device=y.device)
    for lo in range(0, y.shape[0], chunk):
        # y is the adapter's dtype (fp32 master weights against a half target without --amp): the frozen lm_head
        # runs in its own dtype, and the cast passes the gradient back to the adapter.
        draft_logits = target.lm_head(y[lo:lo + chunk].to(target.lm_head.weight.dtype)).float()
        with torch.no_grad(), ops.device_context(target.device):  # the norm may be a Triton kernel
            teacher_logits = target.head(final_hidden[lo:lo + chunk].to(target.dtype)).float()
            teacher_top1 = teacher_logits.argmax(-1)
        if labels == "soft":
            total = total + -(teacher_logits.softmax(dim=-1) * F.log_softmax(draft_logits, dim=-1)).sum()
        else:
            total = total + F.cross_entropy(draft_logits, teacher_top1, reduction="sum")
        agree += (draft_logits.argmax(-1) == teacher_top1).sum()
    return total, torch.tensor(y.shape[0], device=y.device), agree
