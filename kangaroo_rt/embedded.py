"""The embedded default model: a small Llama trained on the Python standard library, its tokenizer and
its Kangaroo adapter, shipped in ``kangaroo_rt/assets/embedded`` (see the model card there)."""
from __future__ import annotations

import json
import os
from typing import List, Optional, Union

import torch

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "embedded")


def load_default(dtype: Optional[torch.dtype] = None, device: Union[str, torch.device] = "cpu",
                 name: str = "embedded"):
    """A named model of :mod:`kangaroo_rt.models` (default: the embedded one) as a ready :class:`KangarooModel`
    with its shipped adapter and tuned exit layer, gamma and eta. ``smollm2`` must be fetched first."""
    from .models import load_named

    return load_named(name, dtype=dtype, device=device)


def load_tokenizer(folder: str = ASSETS):
    """The embedded model's tokenizer (transformers ``PreTrainedTokenizerFast``)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(folder)


def heldout_prompt_ids(limit: Optional[int] = None, folder: str = ASSETS) -> List[torch.Tensor]:
    """Token ids (1, T) of the first ``limit`` held-out completion prompts (``heldout_prompts.jsonl``)."""
    tok = load_tokenizer(folder)
    with open(os.path.join(folder, "heldout_prompts.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [tok(r["prompt"], return_tensors="pt").input_ids for r in rows[:limit]]
