"""The embedded default model: a small Llama trained on the Python standard library, its tokenizer and
its Kangaroo adapter, shipped in ``kangaroo_rt/assets/embedded`` (see the model card there)."""
from __future__ import annotations

import json
import os
from typing import List, Optional, Union

import torch

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "embedded")


def load_default(dtype: Optional[torch.dtype] = None, device: Union[str, torch.device] = "cpu"):
    """The embedded model as a ready :class:`KangarooModel` with its tuned exit layer, gamma and eta."""
    from .config import KangarooConfig
    from .generate import KangarooModel

    adapter = os.path.join(ASSETS, "adapter")
    settings_path = os.path.join(adapter, "kangaroo.json")
    if not os.path.isfile(settings_path):
        raise FileNotFoundError(f"the embedded model is not present in {ASSETS} (expected adapter/kangaroo.json); "
                                "train it with scripts/train_embedded.py and scripts/train_embedded_adapter.py")
    with open(settings_path) as f:
        settings = json.load(f)
    kangaroo = KangarooConfig(gamma=settings["gamma"], eta=settings["eta"])
    return KangarooModel.from_pretrained(ASSETS, adapter, exit_layer=settings["exit_layer"], dtype=dtype,
                                         device=device, kangaroo=kangaroo)


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
