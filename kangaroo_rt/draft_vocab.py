"""Drafting over a frequent-token vocabulary (FR-Spec's idea, arXiv 2502.14856, applied to Kangaroo).

A draft step costs the exit layers, the adapter and the LM head; on a large vocabulary the head dominates
(SmolLM2-135M: a 49152 x 576 head against ~3.5 M parameters per layer). With a draft vocabulary of the K most
frequent tokens, the draft head is the K rows of the target's head, gathered once into one contiguous (K, D)
weight, and drafting computes K logits instead of V. Verification keeps the full head, so output stays the
target's own:

* greedy: the draft is the argmax over the K rows, mapped back to its full-vocabulary id; a token outside the
  subset is never proposed, it can only arrive as the target's correction or bonus token;
* sampling: the draft distribution q is the one sampled from, the temperature/top-k/top-p transform applied to
  the K logits and zero outside the subset; acceptance min(1, p/q) and the residual max(p - q, 0) run over the
  full vocabulary, so the output distribution is exactly the target's;
* ``eta``: the confidence is the top-1 probability of the softmax over the K subset logits (renormalised over
  the subset, not over the full vocabulary). It is never lower than the full-vocabulary top-1 of the same
  logits, so a subset drafts at least as long at the same ``eta``.

On disk: ``draft_vocab.safetensors`` beside the adapter, holding ``ids`` (K,) int64, strictly increasing, and
optionally ``counts`` (V,) int64 and ``always`` (the token counts and always-included ids it was built from, so
that another K can be derived the same way: :func:`resize`), and
``draft_vocab_size`` / ``draft_vocab_source`` in the adapter's ``config.json``. Without the file, drafting uses
the full vocabulary and the folder is the official adapter format.
"""
from __future__ import annotations

import json
import os
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from . import ops

FILE = "draft_vocab.safetensors"
PathLike = Union[str, os.PathLike]


def check_ids(ids: torch.Tensor, vocab_size: int, what: str = "draft vocabulary") -> torch.Tensor:
    """``ids`` as a (K,) int64 tensor after checking it is non-empty, strictly increasing and in
    ``[0, vocab_size)``; ValueError naming the first offending entry otherwise."""
    if not isinstance(ids, torch.Tensor):
        ids = torch.as_tensor(ids)
    if ids.dim() != 1 or ids.numel() == 0 or ids.is_floating_point() or ids.dtype == torch.bool:
        raise ValueError(f"{what}: expected a non-empty 1-D integer id list, got shape {tuple(ids.shape)} "
                         f"{ids.dtype}")
    ids = ids.to(torch.int64)
    bad = ((ids < 0) | (ids >= vocab_size)).nonzero()
    if bad.numel():
        i = int(bad[0, 0])
        raise ValueError(f"{what}: id {int(ids[i])} at index {i} is outside the vocabulary [0, {vocab_size})")
    steps = ids[1:] - ids[:-1]
    bad = (steps <= 0).nonzero()
    if bad.numel():
        i = int(bad[0, 0])
        raise ValueError(f"{what}: ids must be sorted and unique; index {i + 1} holds {int(ids[i + 1])} after "
                         f"{int(ids[i])}")
    return ids


def count_tokens(sequences: Iterable[Sequence[int]], vocab_size: int) -> torch.Tensor:
    """(V,) int64 occurrence counts of the ids in ``sequences``."""
    counts = torch.zeros(vocab_size, dtype=torch.int64)
    for seq in sequences:
        t = torch.as_tensor(list(seq), dtype=torch.int64)
        if t.numel() == 0:
            continue
        if int(t.min()) < 0 or int(t.max()) >= vocab_size:
            raise ValueError(f"token id outside the vocabulary [0, {vocab_size}) in the counted data")
        counts += torch.bincount(t, minlength=vocab_size)
    return counts


def special_ids(tokenizer, vocab_size: int) -> List[int]:
    """The tokenizer's special tokens inside the vocabulary: what every draft vocabulary includes."""
    return sorted({i for i in tokenizer.all_special_ids if i is not None and 0 <= i < vocab_size})


def from_counts(counts: torch.Tensor, size: int, always: Sequence[int] = ()) -> torch.Tensor:
    """The sorted ids of the ``size`` most frequent tokens, ``always`` (EOS, special tokens) included and
    counted in ``size``; ties go to the lower id."""
    vocab_size = counts.numel()
    always = sorted({int(a) for a in always})
    if not 0 < size <= vocab_size:
        raise ValueError(f"draft vocabulary size must be in [1, {vocab_size}], got {size}")
    if len(always) > size:
        raise ValueError(f"draft vocabulary size {size} is smaller than the {len(always)} ids it must include")
    if always:
        check_ids(torch.tensor(always, dtype=torch.int64), vocab_size, "always-included ids")
    key = counts.to(torch.float64).clone()
    key[always] = float("inf")
    order = torch.sort(-key, stable=True).indices  # descending count; a stable sort keeps ties in id order
    return torch.sort(order[:size]).values


def save(folder: PathLike, ids: torch.Tensor, vocab_size: int, source: str,
         counts: Optional[torch.Tensor] = None, always: Sequence[int] = ()) -> str:
    """Write ``draft_vocab.safetensors`` into an adapter folder and record K and ``source`` in its
    ``config.json``. Returns the file's path."""
    from safetensors.torch import save_file

    folder = os.fspath(folder)
    ids = check_ids(ids.cpu(), vocab_size)
    tensors = {"ids": ids.contiguous()}
    if counts is not None:
        if counts.shape != (vocab_size,):
            raise ValueError(f"counts must have shape ({vocab_size},), got {tuple(counts.shape)}")
        tensors["counts"] = counts.to(torch.int64).cpu().contiguous()
        tensors["always"] = torch.tensor(sorted({int(a) for a in always}), dtype=torch.int64)
    path = os.path.join(folder, FILE)
    save_file(tensors, path, metadata={"source": source})
    config_path = os.path.join(folder, "config.json")
    with open(config_path) as f:
        config = json.load(f)
    config.update(draft_vocab_size=int(ids.numel()), draft_vocab_source=source)
    with open(config_path, "w") as f:
        json.dump(config, f, indent=2)
    return path


def _read(folder: PathLike) -> Tuple[str, Optional[Dict[str, torch.Tensor]]]:
    """(path of the folder's draft_vocab.safetensors, its tensors or None when there is no such file)."""
    from safetensors.torch import load_file

    path = os.path.join(os.fspath(folder), FILE)
    return path, (load_file(path) if os.path.isfile(path) else None)


def load(folder: PathLike, vocab_size: int) -> Optional[torch.Tensor]:
    """The (K,) draft ids stored in an adapter folder, checked, or None when it has no draft vocabulary."""
    path, tensors = _read(folder)
    if tensors is None:
        return None
    if "ids" not in tensors:
        raise ValueError(f"{path} has no 'ids' tensor")
    ids = check_ids(tensors["ids"], vocab_size, what=path)
    with open(os.path.join(os.fspath(folder), "config.json")) as f:
        recorded = json.load(f).get("draft_vocab_size")
    if recorded is not None and recorded != ids.numel():
        raise ValueError(f"{path} holds {ids.numel()} ids but config.json says draft_vocab_size={recorded}")
    return ids


def load_counts(folder: PathLike) -> Optional[torch.Tensor]:
    """The token counts a folder's draft vocabulary was built from, if it stored them."""
    return (_read(folder)[1] or {}).get("counts")


def load_always(folder: PathLike) -> List[int]:
    """The ids a folder's draft vocabulary always includes (specials), if it stored them."""
    always = (_read(folder)[1] or {}).get("always")
    return [] if always is None else [int(a) for a in always.tolist()]


def resize(folder: PathLike, size: int) -> torch.Tensor:
    """The ids of a ``size``-token vocabulary built like the folder's own (same counts, same always-included
    ids): what the folder would hold had it been built with K = ``size``."""
    path, tensors = _read(folder)
    if tensors is None:
        raise FileNotFoundError(f"{folder} has no {FILE}: build one with `kangaroo-rt draft-vocab`")
    if "counts" not in tensors:
        raise ValueError(f"{path} stores no token counts, so no other size can be derived from it")
    always = tensors["always"].tolist() if "always" in tensors else []
    return from_counts(tensors["counts"], size, always)


class DraftHead(nn.Module):
    """The target's LM head restricted to a draft vocabulary: its K rows gathered once (tied or not) into one
    contiguous (K, D) weight, and the maps from subset ids and probabilities back to the full vocabulary."""

    def __init__(self, lm_head_weight: torch.Tensor, ids: torch.Tensor) -> None:
        super().__init__()
        vocab_size = lm_head_weight.shape[0]
        ids = check_ids(ids.cpu(), vocab_size).to(lm_head_weight.device)
        self.vocab_size = vocab_size
        self.register_buffer("ids", ids, persistent=False)  # (K,) int64
        self.register_buffer("weight", lm_head_weight.detach().index_select(0, ids).contiguous(),
                             persistent=False)  # (K, D)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (B, D) -> subset logits (B, K)."""
        return ops.linear(hidden, self.weight)

    def full_ids(self, sub: torch.Tensor) -> torch.Tensor:
        """sub (B,) indices into the subset -> (B,) full-vocabulary ids."""
        return self.ids[sub]

    def full_probs(self, q: torch.Tensor) -> torch.Tensor:
        """q (B, K) over the subset -> (B, V), zero outside it."""
        full = torch.zeros(q.shape[0], self.vocab_size, dtype=q.dtype, device=q.device)
        return full.index_copy_(1, self.ids, q)
