"""Load a Llama-family target from a local HF checkpoint folder or an in-memory transformers model.

Folders may hold ``model.safetensors``, sharded safetensors with ``model.safetensors.index.json``,
or ``pytorch_model.bin`` (sharded or not; read with ``weights_only=True``). Loading is strict: every
missing, unexpected or mis-shaped tensor is named in the error. A transformers model object is
wrapped without copying its tensors when dtype and device already match.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Iterable, List, Optional, Union

import torch

from . import hugepages
from .config import ModelConfig
from .model import Transformer, rope_inv_freq

PathLike = Union[str, os.PathLike]

# Keys some checkpoints carry that are derived, not learned; they are skipped silently.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def default_dtype(device: Union[str, torch.device], config_dict: Optional[Dict[str, Any]] = None) -> torch.dtype:
    """fp32 on CPU (half-precision matmuls are very slow there); the checkpoint's dtype (or fp16) elsewhere."""
    if torch.device(device).type == "cpu":
        return torch.float32
    name = (config_dict or {}).get("torch_dtype") or (config_dict or {}).get("dtype")
    if isinstance(name, str) and name in ("float16", "bfloat16", "float32"):
        return getattr(torch, name)
    return torch.float16


def _read_json(path: str) -> Dict[str, Any]:
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None


def read_folder_config(folder: PathLike, what: str = "checkpoint") -> Dict[str, Any]:
    """The ``config.json`` of a local folder; FileNotFoundError naming what is missing."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{what} folder {folder} does not exist (only local paths are supported)")
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"no config.json in {what} folder {folder}")
    return _read_json(config_path)


def _load_safetensors(path: str) -> Dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ValueError(f"cannot read safetensors file {path}: {e}") from None


def _load_bin(path: str) -> Dict[str, torch.Tensor]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for corrupt or unsafe pickles
        raise ValueError(f"cannot read {path} with weights_only=True: {e}") from None


def weight_files(folder: PathLike) -> List[str]:
    """The weight files of a checkpoint folder, in load order. Raises FileNotFoundError if none."""
    folder = os.fspath(folder)
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = os.path.join(folder, index_name)
        if os.path.isfile(index):
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index} has no 'weight_map'")
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not os.path.isfile(os.path.join(folder, f))]
            if missing:
                raise FileNotFoundError(f"{index} lists shard(s) that are missing: {', '.join(missing)}")
            return [os.path.join(folder, f) for f in files]
        if os.path.isfile(os.path.join(folder, single)):
            return [os.path.join(folder, single)]
    raise FileNotFoundError(
        f"no weights in {folder}: looked for model.safetensors(.index.json) and pytorch_model.bin(.index.json)"
    )


def read_tensors(files: Iterable[str]) -> Dict[str, torch.Tensor]:
    out: Dict[str, torch.Tensor] = {}
    for path in files:
        out.update(_load_safetensors(path) if path.endswith(".safetensors") else _load_bin(path))
    return out


def _strip_prefix(name: str) -> str:
    return name[len("model."):] if name.startswith("model.") else name


def assign_state_dict(module: torch.nn.Module, tensors: Dict[str, torch.Tensor], source: str,
                      dtype: torch.dtype, device: torch.device,
                      optional: Iterable[str] = ()) -> None:
    """Strictly assign ``tensors`` to ``module``'s parameters (no copy when dtype/device match).

    Raises ValueError naming every missing, unexpected and mis-shaped tensor. ``optional`` names
    expected keys that may be absent (tied weights).
    """
    expected = dict(module.state_dict(keep_vars=True))
    optional = set(optional)
    missing = sorted(k for k in expected if k not in tensors and k not in optional)
    unexpected = sorted(k for k in tensors if k not in expected)
    mis_shaped = sorted(
        f"{k}: checkpoint {tuple(t.shape)} vs model {tuple(expected[k].shape)}"
        for k, t in tensors.items() if k in expected and tuple(t.shape) != tuple(expected[k].shape)
    )
    problems = []
    if missing:
        problems.append(f"missing tensors: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {', '.join(unexpected)}")
    if mis_shaped:
        problems.append(f"mis-shaped tensors: {'; '.join(mis_shaped)}")
    if problems:
        raise ValueError(f"checkpoint {source} does not match the model: " + " | ".join(problems))
    converted = {k: t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device)
                 for k, t in tensors.items()}
    module.load_state_dict(converted, strict=False, assign=True)


def _build(config: ModelConfig, tensors: Dict[str, torch.Tensor], source: str, dtype: torch.dtype,
           device: torch.device) -> Transformer:
    tensors = {k: v for k, v in tensors.items() if not k.endswith(_IGNORED_SUFFIXES)}
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    with torch.device("meta"):
        model = Transformer(config)
    optional = ("lm_head.weight",) if config.tie_word_embeddings else ()
    assign_state_dict(model, tensors, source, dtype, device, optional=optional)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.inv_freq = rope_inv_freq(config).to(device)
    model = model.eval().fuse_projections()
    if device.type == "cpu":
        hugepages.place(model)  # a decode step streams every weight: 2 MB pages (see kangaroo_rt/hugepages.py)
        model.pack_for_cpu()  # bf16: the packed copies the decode stacks stream, made now rather than at the first step
    return model


GGUF_REQUIREMENTS = ("gguf", "accelerate")  # what transformers' GGUF loader needs beside it


def require_gguf_converters() -> None:
    """Raise, naming the install command, unless transformers' GGUF loader and its dependencies import."""
    missing = []
    for module in GGUF_REQUIREMENTS + ("transformers",):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise FileNotFoundError(f"converting a GGUF needs {', '.join(missing)}: pip install -e '.[hf,gguf]' "
                                "(or `pip install kangaroo_rt[hf,gguf]`)")


def load_gguf_hf(path: Union[str, os.PathLike], dtype: torch.dtype = torch.float32):
    """(transformers model, tokenizer) of a ``.gguf`` file, dequantized by transformers to ``dtype``."""
    require_gguf_converters()
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no GGUF file at {path}")
    folder, name = os.path.split(os.path.abspath(path))
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the loader warns once per tensor about dequantization
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    finally:
        transformers.logging.set_verbosity(verbosity)
    return model, tokenizer


def load_model(source: Union[PathLike, Any], dtype: Optional[torch.dtype] = None,
               device: Union[str, torch.device] = "cpu") -> Transformer:
    """Load the target from a local checkpoint folder, a ``.gguf`` file (dequantized by transformers; needs
    the ``gguf`` extra) or a transformers ``PreTrainedModel``."""
    device = torch.device(device)
    if isinstance(source, (str, os.PathLike)) and os.fspath(source).endswith(".gguf"):
        hf_model, _ = load_gguf_hf(source)  # transformers dequantizes it (needs the gguf extra)
        return load_model(hf_model, dtype=dtype, device=device)
    if isinstance(source, (str, os.PathLike)):
        folder = os.fspath(source)
        config_dict = read_folder_config(folder)
        config = ModelConfig.from_hf_dict(config_dict)
        dtype = dtype or default_dtype(device, config_dict)
        raw = read_tensors(weight_files(folder))
        return _build(config, {_strip_prefix(k): v for k, v in raw.items()}, folder, dtype, device)
    if isinstance(source, torch.nn.Module) and hasattr(source, "config") and hasattr(source.config, "to_dict"):
        config_dict = source.config.to_dict()
        config = ModelConfig.from_hf_dict(config_dict)
        first = next(source.parameters())
        dtype = dtype or first.dtype
        tensors = {_strip_prefix(k): v.detach() for k, v in source.state_dict().items()}
        return _build(config, tensors, type(source).__name__, dtype, device)
    raise ValueError(
        f"cannot load a model from {type(source).__name__}: pass a local checkpoint folder or a "
        "transformers PreTrainedModel"
    )


def save_model(model: Transformer, folder: PathLike, dtype: Optional[torch.dtype] = None) -> None:
    """Save as an HF folder (``config.json`` + ``model.safetensors``) that transformers loads too."""
    from safetensors.torch import save_file

    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    tensors = {}
    for k, v in model.state_dict().items():
        if model.config.tie_word_embeddings and k == "lm_head.weight":
            continue
        name = k if k == "lm_head.weight" else f"model.{k}"
        t = v.detach().to("cpu")
        # a copy of its own: fused projections share memory (model.FusedRows), which safetensors refuses
        tensors[name] = (t.to(dtype) if dtype is not None and t.is_floating_point() else t).clone(
            memory_format=torch.contiguous_format)
    save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    cfg = model.config.to_hf_dict()
    cfg["torch_dtype"] = str(dtype or model.dtype).replace("torch.", "")
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
