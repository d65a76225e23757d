"""kangaroo_rt: a decoding runtime for Kangaroo self-speculative decoding (arXiv 2404.18911).

Quick use::

    import kangaroo_rt
    model = kangaroo_rt.KangarooModel.from_pretrained(target_dir, adapter_dir, exit_layer=2)
    out = model.generate(input_ids, max_new_tokens=64)           # Kangaroo, lossless
    out = model.generate(input_ids, max_new_tokens=64, kangaroo=None)  # plain decoding baseline
"""
from .adapter import Adapter
from .cache import StaticKVCache
from .config import KangarooConfig, ModelConfig, SamplingConfig
from .embedded import load_default, load_tokenizer
from .engine import AdmissionError, Engine, RequestOutput, RequestParams
from .generate import GenerateOutput, KangarooModel, generate
from .loading import load_model, save_model
from .model import Transformer
from .speculative import DecodeStats

__version__ = "0.1.0"

__all__ = [
    "Adapter",
    "AdmissionError",
    "DecodeStats",
    "Engine",
    "GenerateOutput",
    "KangarooConfig",
    "KangarooModel",
    "ModelConfig",
    "RequestOutput",
    "RequestParams",
    "SamplingConfig",
    "StaticKVCache",
    "Transformer",
    "generate",
    "load_default",
    "load_tokenizer",
    "load_model",
    "save_model",
]
