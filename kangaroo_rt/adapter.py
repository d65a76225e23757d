"""The Kangaroo adapter: RMSNorm -> one Llama attention block -> residual -> RMSNorm.

It reads the target's hidden state after layer ``l-1`` (``hidden_states[l]`` in HF numbering), uses the
target's head layout and RoPE, keeps its own one-layer static KV cache, and feeds the target's
``lm_head`` (the target's final norm is not applied on the draft path).

Checkpoint format (the official one): a folder with ``config.json`` (a LlamaConfig with
``num_hidden_layers: 1``) and ``pytorch_model.bin`` holding exactly ``norm.weight``,
``layers.0.input_layernorm.weight`` and ``layers.0.self_attn.{q,k,v,o}_proj.weight``. We load it strictly
(``weights_only=True``) and also read and write ``model.safetensors``.

The MLP variant (the paper's FFN ablation): after the attention residual, ``x = x + MLP(RMSNorm_post(x))``
with an MLP of the target's shape (SiLU-gated, ``intermediate_size``), then the output norm. It is stored in
the same format with ``"kangaroo_adapter_mlp": true`` in config.json and exactly four more keys,
:data:`MLP_KEYS` (the Llama names of a decoder layer's second half); each variant loads strictly with
exactly the keys its config implies.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Dict, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from . import _cpu_ext, draft_vocab, reference
from .cache import StaticKVCache
from .config import ModelConfig, check_adapter_matches
from .loading import _load_bin, _load_safetensors, assign_state_dict, read_folder_config
from .model import MLP, Attention, FusesProjections, RMSNorm, Watch, _one_call_serves, init_random

PathLike = Union[str, os.PathLike]
ADAPTER_KEYS = (
    "norm.weight",
    "layers.0.input_layernorm.weight",
    "layers.0.self_attn.q_proj.weight",
    "layers.0.self_attn.k_proj.weight",
    "layers.0.self_attn.v_proj.weight",
    "layers.0.self_attn.o_proj.weight",
)
MLP_KEYS = (
    "layers.0.post_attention_layernorm.weight",
    "layers.0.mlp.gate_proj.weight",
    "layers.0.mlp.up_proj.weight",
    "layers.0.mlp.down_proj.weight",
)
MLP_FLAG = "kangaroo_adapter_mlp"  # config.json: true for the MLP variant


class _AdapterLayer(nn.Module):
    def __init__(self, config: ModelConfig, mlp: bool) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        if mlp:
            self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
            self.mlp = MLP(config)

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        """x + MLP(norm(x)) for the MLP variant, x itself for the paper's adapter. x: (B, q, D)."""
        if not hasattr(self, "mlp"):
            return x
        return x + self.mlp(self.post_attention_layernorm(x))


class Adapter(FusesProjections, nn.Module):
    """The draft head's body. ``forward`` returns the normed state that ``target.lm_head`` turns into logits."""

    def __init__(self, target_config: ModelConfig, mlp: bool = False) -> None:
        super().__init__()
        # The official adapter is a bias-free Llama block whatever the target's q/k/v bias.
        self.config = dataclasses.replace(target_config, qkv_bias=False, o_bias=False, num_hidden_layers=1)
        self.mlp = bool(mlp)
        self.layers = nn.ModuleList([_AdapterLayer(self.config, self.mlp)])
        self.norm = RMSNorm(self.config.hidden_size, self.config.rms_norm_eps)
        # Optional draft vocabulary (kangaroo_rt.draft_vocab): sorted (K,) int64 ids; None drafts over all tokens.
        self.register_buffer("draft_ids", None, persistent=False)
        self.draft_vocab_source: Optional[str] = None

    def set_draft_vocab(self, ids: Optional[torch.Tensor], source: str = "user") -> "Adapter":
        """Draft over ``ids`` (sorted, unique, in range; see :mod:`kangaroo_rt.draft_vocab`), or over the full
        vocabulary with None. Takes effect for decoders built afterwards (a new KangarooModel or Engine)."""
        self.draft_ids = None if ids is None else draft_vocab.check_ids(ids, self.config.vocab_size).to(self.device)
        self.draft_vocab_source = None if ids is None else source
        return self

    @classmethod
    def random(cls, target_config: ModelConfig, seed: int = 0, std: float = 0.02,
               dtype: torch.dtype = torch.float32, device: Union[str, torch.device] = "cpu",
               mlp: bool = False) -> "Adapter":
        """A freshly initialised adapter (normal(0, std) projections, unit norms), seeded; ``mlp`` adds the
        MLP block."""
        return init_random(cls(target_config, mlp=mlp), seed, std).to(dtype=dtype, device=device).fuse_projections()

    def fuse_projections(self) -> "Adapter":
        """Serve q/k/v (and the MLP variant's gate/up) by one call each (:class:`~kangaroo_rt.model.FusedRows`: the
        parameters become views of the fused tensors). Loading does this; after ``.to()`` it is redone."""
        layer = self.layers[0]
        layer.self_attn.fuse()
        if self.mlp:
            layer.mlp.fuse()
        self._fused = True
        self._forget_plans()  # the one-call plan (_cpu_layer) is built again
        return self

    @property
    def keys(self) -> tuple:
        """The checkpoint keys of this variant, exactly."""
        return ADAPTER_KEYS + (MLP_KEYS if self.mlp else ())

    @property
    def dtype(self) -> torch.dtype:
        return self.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    def new_cache(self, max_batch: int, max_len: int) -> StaticKVCache:
        c = self.config
        return StaticKVCache(1, max_batch, c.num_key_value_heads, max_len, c.head_dim,
                             dtype=self.dtype, device=self.device)

    def forward(self, exit_hidden: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor, cache: StaticKVCache, kv_len: Optional[int] = None) -> torch.Tensor:
        """exit_hidden: (B, q, D) at positions (B, q); cos/sin from the target's RoPE -> (B, q, D)."""
        layer = self.layers[0]
        k_cache, v_cache = cache.layer(0)
        entry = self._cpu_layer(exit_hidden, positions) if cos.dtype == sin.dtype == exit_hidden.dtype else None
        if entry is not None:  # the per-op path's bits in one extension call
            c = self.config
            weights, packed = entry
            return _cpu_ext.decoder_layers(exit_hidden, positions, cos, sin, weights, [None], [None], [k_cache],
                                           [v_cache], c.num_attention_heads, c.num_key_value_heads, c.head_dim,
                                           c.rms_norm_eps, kv_len, packed=packed)
        x = exit_hidden + layer.self_attn(layer.input_layernorm(exit_hidden), positions, cos, sin,
                                          k_cache, v_cache, kv_len)
        return self.norm(layer.feed_forward(x))

    def _cpu_layer(self, exit_hidden: torch.Tensor, positions: torch.Tensor):
        """The paper's adapter as an attention-only layer of :func:`kangaroo_rt._cpu_ext.decoder_layers` (input norm,
        fused q/k/v, o, the output norm; no gate/up, no down) with whether its matrices are packed copies (bf16:
        ``_cpu_ext.packed_bf16``), or None where the per-op path must serve (see
        :func:`kangaroo_rt.model._one_call_serves`; the MLP variant; q/k/v not fused; norms of other epsilons). The
        list is built once and kept while the modules, parameters and settings it comes from are the same
        (:class:`kangaroo_rt.model.Watch`): the checks cost ~25 us, a sixth of a draft step's adapter call."""
        if not _one_call_serves(exit_hidden, positions, self.dtype):
            return None
        packs = _cpu_ext.packs()  # (an A/B may swap the extension: bench_ab --in-process)
        entry = self.__dict__.get("_cpu_entry")
        if entry is None or entry[2] != packs or not entry[1].current():
            entry = self.__dict__["_cpu_entry"] = (*self._build_cpu_layer(), packs)
        return entry[0]

    def _build_cpu_layer(self):
        """-> ((the weights of :meth:`_cpu_layer`, packed) or None, the :class:`Watch` of what they come from)."""
        layer = self.layers[0]
        attn = layer.self_attn
        slots = [(self.__dict__, "mlp"), (self.__dict__, "config"), (self.config.__dict__, "rms_norm_eps"),
                 (self.layers._modules, "0"),
                 (self._modules, "norm"), (attn.__dict__, "qkv"), (layer.input_layernorm.__dict__, "eps"),
                 (self.norm.__dict__, "eps")]
        slots += [(layer._modules, name) for name in ("self_attn", "input_layernorm")]
        slots += [(attn._modules, name) for name in ("q_proj", "k_proj", "v_proj", "o_proj")]
        modules = (layer.input_layernorm, self.norm, attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj)
        slots += [(m._parameters, name) for m in modules for name in m._parameters]
        params = [p for m in modules for p in m._parameters.values() if p is not None]
        # (before the watch: serving moves the fused tensor's version on after a change of its views)
        fused = attn.qkv is not None and attn.qkv.serves((attn.q_proj, attn.k_proj, attn.v_proj))
        if attn.qkv is not None:  # (changed in place, the fused tensor changes the call too)
            params.append(attn.qkv.weight)
        watch = Watch(slots, params)
        same_eps = layer.input_layernorm.eps == self.norm.eps == self.config.rms_norm_eps
        if self.mlp or not (fused and same_eps):
            return None, watch
        weights = [layer.input_layernorm.weight, attn.qkv.weight, attn.o_proj.weight, self.norm.weight]
        if any(w.dtype != self.dtype or not w.is_contiguous() for w in weights) or attn.o_proj.bias is not None:
            return None, watch
        packed = _cpu_ext.pack_matrices(weights, self.dtype)
        return (weights + [None, None], packed), watch

    def forward_train(self, exit_hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Cache-free causal forward for training (plain torch, differentiable).

        exit_hidden: (B, T, D) for positions 0..T-1; cos/sin: (B, T, head_dim) -> (B, T, D).
        """
        layer = self.layers[0]
        attn = layer.self_attn
        b, t, _ = exit_hidden.shape
        x = layer.input_layernorm(exit_hidden)
        q = attn.q_proj(x).view(b, t, attn.n_heads, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(b, t, attn.n_kv, attn.head_dim).transpose(1, 2)
        v = attn.v_proj(x).view(b, t, attn.n_kv, attn.head_dim).transpose(1, 2)
        q, k = reference.apply_rope(q, cos, sin), reference.apply_rope(k, cos, sin)
        group = attn.n_heads // attn.n_kv
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, Hq, T, hd)
        out = attn.o_proj(out.transpose(1, 2).reshape(b, t, attn.n_heads * attn.head_dim))
        return self.norm(layer.feed_forward(exit_hidden + out))

    # -- checkpoint format --------------------------------------------------------------------
    def official_config(self) -> Dict[str, object]:
        c = self.config
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": c.hidden_size,
            "intermediate_size": c.intermediate_size,
            "num_hidden_layers": 1,
            "num_attention_heads": c.num_attention_heads,
            "num_key_value_heads": c.num_key_value_heads,
            "head_dim": c.head_dim,
            "vocab_size": c.vocab_size,
            "rms_norm_eps": c.rms_norm_eps,
            "rope_theta": c.rope_theta,
            "max_position_embeddings": c.max_position_embeddings,
            "hidden_act": "silu",
            "torch_dtype": str(self.dtype).replace("torch.", ""),
            **({MLP_FLAG: True} if self.mlp else {}),
        }

    def save_pretrained(self, folder: PathLike, safetensors: bool = False) -> None:
        """Write the official format (``pytorch_model.bin``) or, with ``safetensors=True``, ``model.safetensors``;
        a draft vocabulary goes beside it (``draft_vocab.safetensors``, K and source in config.json)."""
        folder = os.fspath(folder)
        os.makedirs(folder, exist_ok=True)
        # own copies: fused projections are views of one tensor (FusedRows), which safetensors refuses and the
        # official format does not have
        tensors = {k: v.detach().to("cpu").clone(memory_format=torch.contiguous_format) for k, v in
                   self.state_dict().items()}
        if safetensors:
            from safetensors.torch import save_file
            save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
        else:
            torch.save(tensors, os.path.join(folder, "pytorch_model.bin"))
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(self.official_config(), f, indent=2)
        if self.draft_ids is not None:
            draft_vocab.save(folder, self.draft_ids, self.config.vocab_size, self.draft_vocab_source or "user")

    @classmethod
    def from_pretrained(cls, folder: PathLike, target_config: ModelConfig, dtype: Optional[torch.dtype] = None,
                        device: Union[str, torch.device] = "cpu") -> "Adapter":
        """Load strictly; raise naming mismatched config fields or missing/unexpected/mis-shaped keys. A
        ``draft_vocab.safetensors`` in the folder is loaded and checked too (sorted, unique, in range)."""
        folder = os.fspath(folder)
        cfg = read_folder_config(folder, "adapter")
        layers = cfg.get("num_hidden_layers", 1)
        if layers != 1:
            raise ValueError(f"adapter config.json has num_hidden_layers={layers}; the Kangaroo adapter has 1")
        check_adapter_matches(cfg, target_config, what=f"adapter {folder}")
        st = os.path.join(folder, "model.safetensors")
        binary = os.path.join(folder, "pytorch_model.bin")
        if os.path.isfile(st):
            tensors = _load_safetensors(st)
        elif os.path.isfile(binary):
            tensors = _load_bin(binary)
        else:
            raise FileNotFoundError(f"no pytorch_model.bin or model.safetensors in adapter folder {folder}")
        mlp = cfg.get(MLP_FLAG, False)
        if not isinstance(mlp, bool):
            raise ValueError(f"adapter {folder}: config.json {MLP_FLAG} must be true or false, got {mlp!r}")
        with torch.device("meta"):
            adapter = cls(target_config, mlp=mlp)
        dtype = dtype or (torch.float32 if torch.device(device).type == "cpu" else torch.float16)
        assign_state_dict(adapter, tensors, folder, dtype, torch.device(device))
        ids = draft_vocab.load(folder, target_config.vocab_size)
        if ids is not None:
            adapter.set_draft_vocab(ids, source=cfg.get("draft_vocab_source") or "unknown")
        return adapter.fuse_projections()
