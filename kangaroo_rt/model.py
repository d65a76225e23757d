"""Llama-family decoder (llama, mistral, qwen2) over a static KV cache, with layer-range forward.

Parameter names follow transformers without the ``model.`` prefix (``layers.3.self_attn.q_proj.weight``,
``lm_head.weight``), so a checkpoint maps onto this module by stripping one prefix. One ``positions``
tensor (B, q) drives RoPE, the causal mask and where the cache is written (gpt-fast's ``input_pos``).

Kangaroo runs ``forward_layers(h, pos, 0, l, cache)`` to draft and ``forward_layers(h, pos, l, N, cache)``
to verify; ``embed``, ``norm`` and ``lm_head`` are callable on their own.
"""
from __future__ import annotations

import contextlib
import copy
import math
import threading
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import _cpu_ext, ops
from .cache import StaticKVCache
from .config import ModelConfig
from .reference import INVARIANT_MAX_QUERIES, rope_cos_sin


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Inverse frequencies (head_dim/2,) fp32, with linear or Llama-3 scaling applied."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = config.rope_scaling or {}
    if config.rope_type == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    elif config.rope_type == "llama3":
        factor = float(scaling["factor"])
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        old_len = float(scaling.get("original_max_position_embeddings", 8192))
        low_wavelen = old_len / low
        high_wavelen = old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


def init_random(module: nn.Module, seed: int, std: float) -> nn.Module:
    """Seeded init in place: norm weights 1, every other parameter normal(0, std). Returns ``module``."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, std, generator=gen)
    return module


def _linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` through :func:`ops.linear`: on CPU, the extension's kernel reads each weight once per call
    and gives every row the bits it has alone, whatever the row count (verify == single steps)."""
    return ops.linear(x, layer.weight, layer.bias)


class FusedRows:
    """Linear layers that read one input, served by one call: their weights (and biases) concatenated along the
    output rows into one tensor, and each layer's parameters made views of its rows.

    The layers keep their parameters (names, state dict, in-place loading all work as before); the fused tensor
    only shares their memory. It serves while every layer's weight is still the view it was given (a
    ``.to()``, a re-assigned parameter or a load with ``assign=True`` ends that; the layers are then called one
    by one) and while no gradient is wanted for them. One kernel call streams all the rows: on CPU the
    extension's linear gives each output the bits it has alone, so fusing changes no result.
    """

    def __init__(self, layers: Tuple[nn.Linear, ...]) -> None:
        weights = [layer.weight for layer in layers]
        self.sizes = [w.shape[0] for w in weights]
        self.weight = torch.cat([w.detach() for w in weights])  # (sum N, K)
        biases = [layer.bias for layer in layers]
        self.bias = None if biases[0] is None else torch.cat([b.detach() for b in biases])  # (sum N,)
        start = 0
        for layer, n in zip(layers, self.sizes):
            layer.weight.data = self.weight[start:start + n]
            if self.bias is not None:
                layer.bias.data = self.bias[start:start + n]
            start += n
        self._versions = self._weight_versions(layers)

    @staticmethod
    def fusable(layers: Tuple[nn.Linear, ...]) -> bool:
        w0 = layers[0].weight
        return (w0.device.type != "meta" and all(
            layer.weight.dtype == w0.dtype and layer.weight.device == w0.device and layer.weight.dim() == 2
            and layer.weight.shape[1] == w0.shape[1] and (layer.bias is None) == (layers[0].bias is None)
            for layer in layers))

    @staticmethod
    def _pointers(layers: Tuple[nn.Linear, ...]) -> Tuple[int, ...]:
        return tuple(t.data_ptr() for layer in layers for t in (layer.weight, layer.bias) if t is not None)

    def _view_pointers(self) -> Tuple[int, ...]:
        """The data pointers the layers' weights (and biases) have while they are the fused tensor's row views, in
        :meth:`_pointers`' order. Derived from the fused tensor itself, so that a deep copy (which copies the views
        as views of the copied tensor) or a move into other memory (:mod:`kangaroo_rt.hugepages`) keeps serving."""
        w_row = self.weight.stride(0) * self.weight.element_size()
        ptrs, start = [], 0
        for n in self.sizes:
            ptrs.append(self.weight.data_ptr() + start * w_row)
            if self.bias is not None:
                ptrs.append(self.bias.data_ptr() + start * self.bias.element_size())
            start += n
        return tuple(ptrs)

    @staticmethod
    def _weight_versions(layers: Tuple[nn.Linear, ...]) -> Tuple[int, ...]:
        return tuple(_cpu_ext.tensor_version(layer.weight) for layer in layers)

    def serves(self, layers: Tuple[nn.Linear, ...]) -> bool:
        """Whether one call on the fused tensor computes the layers now (this object keeps the fused memory
        alive, so equal pointers mean the parameters are still views of it). A weight changed in place since the
        last call (``load_state_dict``) moves the fused tensor's version on: the views keep version counters of their
        own, and what is derived from the fused tensor (its packed copy, ``_cpu_ext.packed_bf16``) follows its
        version."""
        if torch.is_grad_enabled() and any(layer.weight.requires_grad for layer in layers):
            return False
        if self._pointers(layers) != self._view_pointers():
            return False
        versions = self._weight_versions(layers)
        if versions != self._versions:
            if not self.weight.is_inference():  # (an inference tensor keeps no count: tensor_version)
                torch.autograd.graph.increment_version(self.weight)
            self._versions = versions
        return True

    def __call__(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """x: (..., K) -> one (..., N_i) view per layer."""
        return ops.linear(x, self.weight, self.bias).split(self.sizes, dim=-1)


def _fused_call(fused: Optional[FusedRows], layers: Tuple[nn.Linear, ...], x: torch.Tensor):
    if fused is not None and fused.serves(layers):
        return fused(x)
    return tuple(_linear(layer, x) for layer in layers)


class FusesProjections:
    """A module whose projections :meth:`fuse_projections` fuses (:class:`FusedRows`), and fuses again after
    ``.to()`` / ``.float()`` / ``.cuda()``, which give the parameters new memory and so end the fused views."""

    # what a module keeps of its one-call CPU plans (packed copies included): a deep copy leaves them out
    _DERIVED = ("_stacks", "_cpu_entry")

    def fuse_projections(self):
        raise NotImplementedError

    def _forget_plans(self) -> None:
        """Drop the one-call plans (:data:`_DERIVED`): built again at the next call."""
        for key in self._DERIVED:
            self.__dict__.pop(key, None)

    def _apply(self, fn, recurse: bool = True):
        result = super()._apply(fn, recurse)
        if getattr(self, "_fused", False):
            self.fuse_projections()
        return result

    def __getstate__(self):
        """Pickling (``torch.save(module)``) leaves the one-call plans out too: they are rebuilt on first use, and a
        bf16 model's packed copies would double the file."""
        return {k: v for k, v in super().__getstate__().items() if k not in self._DERIVED}

    def __deepcopy__(self, memo):
        """A deep copy fuses again too: ``nn.Parameter``'s deep copy clones its data, so the copied parameters are no
        longer views of the copied fused tensors (a copy that stayed unfused fell off the one-call CPU paths: its
        draft chain ran op by op, 2.4x the drafting time in ``kangaroo-rt bench --draft-vocab``)."""
        copied = type(self).__new__(type(self))
        memo[id(self)] = copied
        copied.__setstate__(copy.deepcopy(self.__getstate__(), memo))
        if getattr(copied, "_fused", False):
            copied.fuse_projections()
        return copied


_STACK_OPS = ("linear", "rms_norm", "add_rms_norm", "rope_cache_append", "attention", "silu_mul")
_ALL_CPU = ("cpu",) * len(_STACK_OPS)


def _one_call_serves(hidden: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether :func:`kangaroo_rt._cpu_ext.decoder_layers` may serve layers of a module of ``dtype`` on these
    inputs (RoPE tables of hidden's dtype): only where every op of the per-op path would go to the CPU extension
    anyway (CPU tensors of one kernel dtype, no autograd, at most ``INVARIANT_MAX_QUERIES`` queries, no backend
    forced away from it), since that call gives the per-op path's bits."""
    return (hidden.device.type == "cpu" and hidden.dim() == 3 and 0 < hidden.shape[1] <= INVARIANT_MAX_QUERIES
            and hidden.dtype == dtype and hidden.dtype in _cpu_ext._KERNEL_DTYPES
            and positions.dtype == torch.int64 and not torch.is_grad_enabled() and _cpu_ext.is_available()
            and ops.backends(_STACK_OPS, hidden.device) == _ALL_CPU)


_steady = threading.local()  # .scope: this thread's innermost steady() scope (an object), or absent / None


@contextlib.contextmanager
def steady() -> Iterator[None]:
    """Within, a call plan's :class:`Watch` is checked once, at its first use: for a loop of decode steps, which does
    not change the modules it runs (a decode call, an engine step). The check walks every module and parameter of
    the plan, which the weight stream of each step has evicted from the caches by then: ~130 us for SmolLM2's 30
    layers in a bf16 decode step (3% of it), ~50 us with the objects in cache. Per thread; nestable. Modules changed
    inside a scope (a streamer's callback that edits the model mid-generation) are seen at the next scope."""
    outer = getattr(_steady, "scope", None)
    _steady.scope = object()
    try:
        yield
    finally:
        _steady.scope = outer


class Watch:
    """What a cached call plan (the argument lists of an extension call) depends on: slots (an owner dict and a
    name: a module's ``_modules`` or ``_parameters``, or an object's ``__dict__``) and the parameters among them.
    :meth:`current` says whether every slot still holds its object (compared by id: the watch keeps the objects
    alive, so an id cannot be reused) and every parameter its memory and version (an in-place change, such as
    ``load_state_dict``, must reach the packed copies a bf16 plan streams: ``_cpu_ext.packed_bf16``): list
    comprehensions and comparisons (a per-item generator cost ~80 us per call over SmolLM2's 30 layers); inside a
    :func:`steady` scope, once."""

    def __init__(self, slots: List[Tuple[Dict, str]], params: List[torch.Tensor]) -> None:
        self.slots = slots
        self.objects = [owner.get(name) for owner, name in slots]
        self.ids = [id(obj) for obj in self.objects]
        self.params = params
        self.pointers = [p.data_ptr() for p in params]
        # (tensor_version only where an inference tensor needs it: raw _version is 2.5-3x faster, 19-30 against 61-74
        # us a call over SmolLM2's 330 parameters on the 2-core Zen 4 host; a parameter cannot become an inference
        # tensor without moving its memory, which the pointers catch first)
        self.inference = any(p.is_inference() for p in params)
        self.versions = self._versions()
        self.checked_in: Optional[object] = getattr(_steady, "scope", None)  # built (so checked) in this scope

    def _versions(self) -> List[int]:
        if self.inference:
            return [_cpu_ext.tensor_version(p) for p in self.params]
        return [p._version for p in self.params]

    def current(self) -> bool:
        scope = getattr(_steady, "scope", None)
        if scope is not None and self.checked_in is scope:
            return True
        ok = ([id(owner.get(name)) for owner, name in self.slots] == self.ids
              and [p.data_ptr() for p in self.params] == self.pointers
              and self._versions() == self.versions)
        if ok:
            self.checked_in = scope
        return ok


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    """One Llama attention block writing its keys/values into a static cache layer."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.n_kv = config.num_key_value_heads
        self.head_dim = config.head_dim
        d = config.hidden_size
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=config.o_bias)
        self.qkv: Optional[FusedRows] = None  # see fuse()

    def fuse(self) -> bool:
        """Serve q/k/v by one call over their concatenated weights (:class:`FusedRows`); False if they cannot."""
        layers = (self.q_proj, self.k_proj, self.v_proj)
        self.qkv = FusedRows(layers) if FusedRows.fusable(layers) else None
        return self.qkv is not None

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor, kv_len: Optional[int]) -> torch.Tensor:
        """x: (B, q, D); positions: (B, q); cos/sin: (B, q, head_dim); caches: (B_max, Hkv, T, hd)."""
        b, q_len, _ = x.shape
        q, k, v = _fused_call(self.qkv, (self.q_proj, self.k_proj, self.v_proj), x)
        q = q.view(b, q_len, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, q_len, self.n_kv, self.head_dim).transpose(1, 2)
        v = v.view(b, q_len, self.n_kv, self.head_dim).transpose(1, 2)
        q = ops.rope_cache_append(q, k, v, cos, sin, k_cache, v_cache, positions)  # k, v now in the cache
        out = ops.attention(q, k_cache, v_cache, positions, kv_len)  # (B, Hq, q, hd)
        return _linear(self.o_proj, out.transpose(1, 2).reshape(b, q_len, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.gate_up: Optional[FusedRows] = None  # see fuse()

    def fuse(self) -> bool:
        """Serve gate and up by one call over their concatenated weights (:class:`FusedRows`)."""
        layers = (self.gate_proj, self.up_proj)
        self.gate_up = FusedRows(layers) if FusedRows.fusable(layers) else None
        return self.gate_up is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = _fused_call(self.gate_up, (self.gate_proj, self.up_proj), x)
        return _linear(self.down_proj, ops.silu_mul(gate, up))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, h: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor, kv_len: Optional[int]) -> torch.Tensor:
        attn = self.self_attn(self.input_layernorm(h), positions, cos, sin, k_cache, v_cache, kv_len)
        h, x = ops.add_rms_norm(attn, h, self.post_attention_layernorm.weight, self.post_attention_layernorm.eps)
        return h + self.mlp(x)


class Transformer(FusesProjections, nn.Module):
    """The target model. Build with :func:`kangaroo_rt.loading.load_model` or :meth:`random`."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)

    @classmethod
    def random(cls, config: ModelConfig, seed: int = 0, std: float = 0.02,
               dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> "Transformer":
        """Random weights (normal(0, std) matrices, unit norms), seeded: for tests and benchmarks."""
        return init_random(cls(config), seed, std).to(dtype=dtype, device=device).eval().fuse_projections()

    def fuse_projections(self) -> "Transformer":
        """Make every layer serve q/k/v and gate/up by one call each (:class:`FusedRows`: the parameters become
        views of the fused tensors, memory is not doubled). Loading does this; after ``.to()`` it is redone."""
        for layer in self.layers:
            layer.self_attn.fuse()
            layer.mlp.fuse()
        self._fused = True
        self._forget_plans()  # the one-call layer stacks (_cpu_stack) are built again
        return self

    def pack_for_cpu(self) -> "Transformer":
        """Make the packed copies that a bf16 model's CPU decode path streams (``_cpu_ext.packed_bf16``: the layers'
        matrices and the head; 0.5 s for SmolLM2 on the 2-core host), so that the first decode call does not pay for
        them; nothing for other dtypes and devices, or without the CPU extension. ``load_model`` calls it. Returns
        self."""
        if self.device.type == "cpu" and self.dtype == torch.bfloat16 and _cpu_ext.is_available() and _cpu_ext.packs():
            with torch.no_grad():
                self._build_stack(0, self.num_layers)  # (the copies are kept per weight: every layer range reuses them)
                if self.lm_head.bias is None:
                    _cpu_ext.packed_bf16([self.lm_head.weight])
        return self

    # -- pieces ---------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids: (B, q) int64 -> (B, q, D)."""
        return self.embed_tokens(input_ids)

    def rope(self, positions: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """positions: (B, q) -> cos, sin (B, q, head_dim) in the model dtype."""
        return rope_cos_sin(positions, self.inv_freq, self.dtype)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head: (B, q, D) -> (B, q, V) logits."""
        return _linear(self.lm_head, self.norm(hidden))

    def new_cache(self, max_batch: int, max_len: int, huge_pages: Optional[bool] = None) -> StaticKVCache:
        """A cache for every layer (``huge_pages``: see :class:`StaticKVCache`)."""
        c = self.config
        return StaticKVCache(c.num_hidden_layers, max_batch, c.num_key_value_heads, max_len, c.head_dim,
                             dtype=self.dtype, device=self.device, huge_pages=huge_pages)

    # -- forward --------------------------------------------------------------------------------
    def forward_layers(self, hidden: torch.Tensor, positions: torch.Tensor, start: int, end: int,
                       cache: StaticKVCache, kv_len: Optional[int] = None,
                       rope: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        """Run layers ``start..end-1`` on hidden (B, q, D) at positions (B, q), writing their KV.

        kv_len: cache slots attention reads (>= max position + 1); None reads the whole cache.
        rope: precomputed ``self.rope(positions)`` to share between calls at the same positions.
        """
        if not 0 <= start <= end <= self.num_layers:
            raise ValueError(f"layer range {start}..{end} is outside 0..{self.num_layers}")
        cos, sin = rope if rope is not None else self.rope(positions)
        stack = self._cpu_stack(hidden, positions, start, end) if cos.dtype == sin.dtype == hidden.dtype else None
        if stack is not None:
            c = self.config
            k_caches, v_caches = cache.layers(start, end)
            weights, qkv_bias, o_bias, packed = stack
            return _cpu_ext.decoder_layers(hidden, positions, cos, sin, weights, qkv_bias, o_bias, k_caches, v_caches,
                                           c.num_attention_heads, c.num_key_value_heads, c.head_dim,
                                           c.rms_norm_eps, kv_len, packed=packed)
        for i in range(start, end):
            k_cache, v_cache = cache.layer(i)
            hidden = self.layers[i](hidden, positions, cos, sin, k_cache, v_cache, kv_len)
        return hidden

    def _cpu_stack(self, hidden: torch.Tensor, positions: torch.Tensor, start: int, end: int):
        """(weights, qkv biases, o biases, packed) for :func:`kangaroo_rt._cpu_ext.decoder_layers` over layers
        ``start..end-1`` (a bf16 model's matrices as their packed copies, packed True: ``_cpu_ext.packed_bf16``), or
        None when the per-op path must serve: where :func:`_one_call_serves` says no, or a
        layer's q/k/v or gate/up are not fused. The lists are built once per layer range and kept while every
        module and parameter of those layers is still the one it was, parameters (and the fused tensors) at the same
        memory and version (checked per call, or once in a :func:`steady` scope: a dict lookup per module and
        parameter, a pointer and a version per parameter)."""
        if end <= start or not _one_call_serves(hidden, positions, self.dtype):
            return None
        stacks = self.__dict__.setdefault("_stacks", {})
        key = (start, end, _cpu_ext.packs())  # (an A/B may swap the extension: bench_ab --in-process)
        entry = stacks.get(key)
        if entry is None or not entry[1].current():
            entry = stacks[key] = self._build_stack(start, end)
        return entry[0] if entry is not None else None

    def _build_stack(self, start: int, end: int):
        """-> ((weights, qkv biases, o biases, packed), the :class:`Watch` of the modules and parameters they come
        from), or None when a layer is not fused."""
        weights, qkv_bias, o_bias, slots, params = [], [], [], [], []
        for i in range(start, end):
            layer = self.layers[i]
            attn, mlp = layer.self_attn, layer.mlp
            slots += [(self.layers._modules, str(i))]
            slots += [(owner._modules, name) for owner, names in (
                (layer, ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm")),
                (attn, ("q_proj", "k_proj", "v_proj", "o_proj")), (mlp, ("gate_proj", "up_proj", "down_proj")))
                for name in names]
            if attn.qkv is None or mlp.gate_up is None or not (
                    attn.qkv.serves((attn.q_proj, attn.k_proj, attn.v_proj))
                    and mlp.gate_up.serves((mlp.gate_proj, mlp.up_proj))):
                return None
            weights += [layer.input_layernorm.weight, attn.qkv.weight, attn.o_proj.weight,
                        layer.post_attention_layernorm.weight, mlp.gate_up.weight, mlp.down_proj.weight]
            params += [attn.qkv.weight, mlp.gate_up.weight]  # (watched too: changed in place, they change the stack)
            qkv_bias.append(attn.qkv.bias)
            o_bias.append(attn.o_proj.bias)
            for module in (layer.input_layernorm, layer.post_attention_layernorm, attn.q_proj, attn.k_proj,
                           attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj):
                named = [(name, p) for name, p in module._parameters.items() if p is not None]
                slots += [(module._parameters, name) for name, _ in named]
                params += [p for _, p in named]
        if any(w.dtype != self.dtype or not w.is_contiguous() for w in weights) or any(
                b is not None and b.dtype != self.dtype for b in qkv_bias + o_bias):
            return None  # the per-op path sends a bias of another dtype to torch, with other bits
        packed = _cpu_ext.pack_matrices(weights, self.dtype)
        return (weights, qkv_bias, o_bias, packed), Watch(slots, params)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: StaticKVCache,
                kv_len: Optional[int] = None) -> torch.Tensor:
        """All layers: input_ids (B, q), positions (B, q) -> logits (B, q, V)."""
        h = self.forward_layers(self.embed(input_ids), positions, 0, self.num_layers, cache, kv_len)
        return self.head(h)
