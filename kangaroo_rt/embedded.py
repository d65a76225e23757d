"""The embedded default model: a small Llama trained on the Python standard library, its tokenizer and
its Kangaroo adapter, shipped in ``kangaroo_rt/assets/embedded`` (see the model card there)."""
from __future__ import annotations

import json
import os
from typing import Optional, Union

import torch

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "embedded")


def default_path() -> str:
    """Folder of the embedded model (HF layout: config.json, model.safetensors, tokenizer.json, adapter/)."""
    return ASSETS


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


def load_tokenizer():
    """The embedded model's tokenizer (transformers ``PreTrainedTokenizerFast``)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(ASSETS)
