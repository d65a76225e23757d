"""Configuration objects: the target model's shape, Kangaroo's knobs, and generation settings.

Every config validates itself on construction and raises ``ValueError`` naming the offending field,
so a bad ``config.json`` or a bad keyword argument fails before anything is allocated.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Union

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")

# Fields of an HF config that change the computation and that we do not implement. Any of them set to
# a value other than the listed "harmless" one raises an error naming it.
_HARMLESS_VALUES: Dict[str, Sequence[Any]] = {
    "hidden_act": ("silu",),
    "mlp_bias": (False, None),
    "pretraining_tp": (1, None),
    "attention_dropout": (0.0, 0, None),
    "use_sliding_window": (False, None),
}


@dataclass
class ModelConfig:
    """Shape of a Llama-family decoder (llama, mistral without sliding window, qwen2)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: Optional[int] = None
    head_dim: Optional[int] = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Optional[Dict[str, Any]] = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    sliding_window: Optional[int] = None
    model_type: str = "llama"
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[Union[int, List[int]]] = None
    pad_token_id: Optional[int] = None

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                    f"{self.num_attention_heads}; set head_dim explicitly"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim"):
            check_positive_int(f"ModelConfig.{name}", getattr(self, name))
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.model_type not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {self.model_type!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if self.rope_scaling is not None:
            rope_type = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            if rope_type not in SUPPORTED_ROPE_TYPES:
                raise ValueError(
                    f"unsupported rope_scaling type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
                )
            if rope_type in ("linear", "llama3") and "factor" not in self.rope_scaling:
                raise ValueError(f"rope_scaling of type {rope_type!r} needs a 'factor'")

    @property
    def rope_type(self) -> str:
        if self.rope_scaling is None:
            return "default"
        return self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))

    @property
    def eos_token_ids(self) -> List[int]:
        if self.eos_token_id is None:
            return []
        if isinstance(self.eos_token_id, int):
            return [self.eos_token_id]
        return list(self.eos_token_id)

    def to_hf_dict(self) -> Dict[str, Any]:
        """A ``config.json`` dictionary that ``transformers`` reads back into the same architecture."""
        arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
        out: Dict[str, Any] = {
            "architectures": [arch[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
        }
        if self.model_type == "llama":
            out["attention_bias"] = self.qkv_bias
        if self.model_type == "mistral":
            out["sliding_window"] = self.sliding_window
        return out

    @classmethod
    def from_hf_dict(cls, d: Dict[str, Any]) -> "ModelConfig":
        """Read an HF ``config.json`` dictionary, refusing anything we would compute differently."""
        model_type = d.get("model_type")
        if model_type is None:
            raise ValueError("config.json has no 'model_type'; cannot tell the architecture")
        if model_type not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture model_type={model_type!r} (architectures={d.get('architectures')}); "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        for name, ok in _HARMLESS_VALUES.items():
            if name in d and d[name] not in ok:
                raise ValueError(f"unsupported config field {name}={d[name]!r} (supported: {list(ok)})")
        layer_types = d.get("layer_types")
        if layer_types and any(t != "full_attention" for t in layer_types):
            raise ValueError(f"unsupported config field layer_types: only 'full_attention' layers are supported")
        # transformers >= 5 stores rope_theta and the scaling inside rope_parameters.
        rope = d.get("rope_parameters") or d.get("rope_scaling")
        rope_theta = d.get("rope_theta")
        rope_scaling = None
        if rope:
            rope = dict(rope)
            rope_theta = rope.pop("rope_theta", rope_theta)
            rope_type = rope.get("rope_type", rope.get("type", "default"))
            if rope_type != "default":
                rope_scaling = rope
        sliding_window = None
        if model_type == "mistral":
            sliding_window = d.get("sliding_window")
        attention_bias = bool(d.get("attention_bias", False))
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=d["num_attention_heads"],
            num_key_value_heads=d.get("num_key_value_heads"),
            head_dim=d.get("head_dim"),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
            rope_scaling=rope_scaling,
            max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or attention_bias,
            o_bias=model_type == "llama" and attention_bias,
            sliding_window=sliding_window,
            model_type=model_type,
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"),
        )


@dataclass
class KangarooConfig:
    """Kangaroo's double early exit: draft from layer ``exit_layer`` for at most ``gamma`` steps,
    stopping early once the draft's top-1 probability falls below ``eta``.

    ``exit_layer=None`` takes the model's own (the one it was loaded with). ``gamma=0`` is plain
    autoregressive decoding.
    """

    gamma: int = 6
    eta: float = 0.6
    exit_layer: Optional[int] = None

    MAX_GAMMA = 64

    def __post_init__(self) -> None:
        if not isinstance(self.gamma, int) or isinstance(self.gamma, bool):
            raise ValueError(f"gamma must be an int, got {self.gamma!r}")
        if self.gamma < 0 or self.gamma > self.MAX_GAMMA:
            raise ValueError(f"gamma must be in [0, {self.MAX_GAMMA}], got {self.gamma}")
        if not isinstance(self.eta, (int, float)) or isinstance(self.eta, bool) or math.isnan(self.eta):
            raise ValueError(f"eta must be a float in [0, 1], got {self.eta!r}")
        if not 0.0 <= float(self.eta) <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {self.eta}")
        check_positive_int("exit_layer", self.exit_layer, allow_none=True)


@dataclass
class SamplingConfig:
    """Token selection: greedy (``do_sample=False`` or ``temperature == 0``) or sampling with
    temperature, top-k and top-p applied in that order (as transformers does)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None

    def __post_init__(self) -> None:
        t = self.temperature
        if not isinstance(t, (int, float)) or isinstance(t, bool) or t < 0 or math.isnan(t):
            raise ValueError(f"temperature must be a number >= 0, got {t!r}")
        check_positive_int("top_k", self.top_k, allow_none=True)
        if self.top_p is not None and not (0.0 < float(self.top_p) <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")

    @property
    def greedy(self) -> bool:
        return (not self.do_sample) or self.temperature == 0


# Fields of an adapter's config that must equal its target's.
ADAPTER_MATCHING_FIELDS = ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size")


def check_adapter_matches(adapter: Union[ModelConfig, Dict[str, Any]], target: ModelConfig,
                          what: str = "the adapter") -> None:
    """Raise ValueError naming every field of :data:`ADAPTER_MATCHING_FIELDS` where ``adapter`` (a config, or
    a ``config.json`` dictionary with HF defaults) differs from ``target``."""
    if isinstance(adapter, ModelConfig):
        adapter = dataclasses.asdict(adapter)
    else:
        adapter = dict(adapter)
        adapter.setdefault("num_key_value_heads", adapter.get("num_attention_heads"))
        hidden, heads = adapter.get("hidden_size"), adapter.get("num_attention_heads")
        if adapter.get("head_dim") is None and isinstance(hidden, int) and isinstance(heads, int) and heads > 0:
            adapter["head_dim"] = hidden // heads
    bad = [f"{f}: adapter {adapter.get(f)!r} vs target {getattr(target, f)!r}"
           for f in ADAPTER_MATCHING_FIELDS if adapter.get(f) != getattr(target, f)]
    if bad:
        raise ValueError(f"{what} was made for another model: {'; '.join(bad)}")


def check_positive_int(name: str, value: Any, allow_none: bool = False) -> None:
    """``value`` must be an int > 0 (a bool is not), or None when ``allow_none``."""
    if not (allow_none and value is None) and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
        raise ValueError(f"{name} must be a positive int{' or None' if allow_none else ''}, got {value!r}")


def check_exit_layer(exit_layer: Any, num_layers: int) -> None:
    """exit_layer must be an int in [1, num_layers - 1]."""
    if not isinstance(exit_layer, int) or isinstance(exit_layer, bool):
        raise ValueError(f"exit_layer must be an int, got {exit_layer!r}")
    if not 1 <= exit_layer < num_layers:
        raise ValueError(f"exit_layer must be in [1, {num_layers - 1}] for a {num_layers}-layer target, got {exit_layer}")


def eos_ids(eos_token_id: Union[None, int, Sequence[int]], config: ModelConfig) -> List[int]:
    """The EOS ids to stop on: ``eos_token_id`` (an id or a list), or the config's when None; each checked to
    be a token id of the vocabulary."""
    if eos_token_id is None:
        ids = config.eos_token_ids
    elif isinstance(eos_token_id, int):
        ids = [eos_token_id]
    else:
        ids = list(eos_token_id)
    for i in ids:
        if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < config.vocab_size:
            raise ValueError(f"eos_token_id {i!r} is not a token id in [0, {config.vocab_size})")
    return ids


__all__ = ["ModelConfig", "KangarooConfig", "SamplingConfig", "SUPPORTED_ARCHITECTURES", "check_adapter_matches",
           "check_exit_layer", "check_positive_int", "eos_ids"]
