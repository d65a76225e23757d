"""Drop-in ``generate`` (transformers-style keyword arguments) and the :class:`KangarooModel` wrapper."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple, Union

import torch

from . import ops
from .adapter import Adapter
from .config import (KangarooConfig, ModelConfig, SamplingConfig, check_adapter_matches, check_exit_layer,
                     check_positive_int, eos_ids)
from .graphs import GraphRunner, cuda_graphs_enabled
from .loading import load_model
from .model import Transformer
from .speculative import DecodeStats, Decoder

_MODEL_DEFAULT: Any = object()  # sentinel: "use the model's own KangarooConfig"


@dataclass
class GenerateOutput:
    """What ``generate(..., return_dict_in_generate=True)`` returns."""

    sequences: torch.Tensor  # (B, T + new) prompt followed by the new tokens, padded after EOS
    stats: DecodeStats

    @property
    def rounds(self) -> List[int]:
        return self.stats.rounds

    @property
    def mat(self) -> List[float]:
        return self.stats.mat

    @property
    def acceptance_by_position(self) -> List[float]:
        return self.stats.acceptance_by_position()

    @property
    def draft_steps(self) -> List[int]:
        return [sum(d) for d in self.stats.draft_lengths]

    @property
    def wall_time_s(self) -> float:
        return self.stats.wall_time_s


def _check_adapter_placement(adapter: Adapter, target: Transformer) -> None:
    """The adapter runs on the target's hidden states and feeds the target's lm_head: same dtype, same device."""
    if adapter.dtype != target.dtype or adapter.device != target.device:
        raise ValueError(f"the adapter is {adapter.dtype} on {adapter.device} but the target is {target.dtype} on "
                         f"{target.device}; convert the adapter first: adapter.to(dtype={target.dtype}, "
                         f"device='{target.device}') (KangarooModel.from_pretrained does this when it loads one)")


class KangarooModel:
    """A target model plus an optional Kangaroo adapter exiting at ``exit_layer``.

    ``max_len`` fixes the cache capacity (requests that do not fit raise ``ValueError``); by default
    the cache grows to what each call needs and is reused across calls.
    """

    def __init__(self, target: Transformer, adapter: Optional[Adapter] = None, exit_layer: int = 2,
                 kangaroo: Optional[KangarooConfig] = None, max_len: Optional[int] = None) -> None:
        if not isinstance(target, Transformer):
            raise ValueError(f"target must be a kangaroo_rt Transformer, got {type(target).__name__}; "
                             "use KangarooModel.from_pretrained for checkpoints and transformers models")
        check_exit_layer(exit_layer, target.num_layers)
        if adapter is not None:
            check_adapter_matches(adapter.config, target.config)
            _check_adapter_placement(adapter, target)
        check_positive_int("max_len", max_len, allow_none=True)
        self.target = target
        self.adapter = adapter
        self.exit_layer = exit_layer
        self.kangaroo = kangaroo if kangaroo is not None else KangarooConfig()
        self.decoder = Decoder(target, adapter, exit_layer, max_len=max_len)
        self._graph_runner: Optional[GraphRunner] = None

    @classmethod
    def from_pretrained(cls, target: Union[str, os.PathLike, Any], adapter: Union[str, os.PathLike, Adapter, None] = None,
                        exit_layer: int = 2, dtype: Optional[torch.dtype] = None,
                        device: Union[str, torch.device] = "cpu", kangaroo: Optional[KangarooConfig] = None,
                        max_len: Optional[int] = None) -> "KangarooModel":
        """target: a local HF checkpoint folder or a transformers model; adapter: a folder in the
        official format (or safetensors), an :class:`Adapter`, or None for plain decoding only."""
        model = load_model(target, dtype=dtype, device=device)
        if isinstance(adapter, (str, os.PathLike)):
            adapter = Adapter.from_pretrained(adapter, model.config, dtype=model.dtype, device=model.device)
        elif adapter is not None and not isinstance(adapter, Adapter):
            raise ValueError(f"adapter must be a folder path or an Adapter, got {type(adapter).__name__}")
        return cls(model, adapter, exit_layer=exit_layer, kangaroo=kangaroo, max_len=max_len)

    @property
    def config(self) -> ModelConfig:
        return self.target.config

    @property
    def device(self) -> torch.device:
        return self.target.device

    @property
    def dtype(self) -> torch.dtype:
        return self.target.dtype

    @property
    def max_len(self) -> Optional[int]:
        """The fixed cache capacity (None: the caches grow to what each call needs); the decoder enforces it."""
        return self.decoder.max_len

    @max_len.setter
    def max_len(self, value: Optional[int]) -> None:
        check_positive_int("max_len", value, allow_none=True)
        self.decoder.max_len = value

    @property
    def graph_runner(self) -> GraphRunner:
        """The fixed-shape (CUDA graph) rounds over this model's decoder and caches, made on first use."""
        if self._graph_runner is None:
            self._graph_runner = GraphRunner(self.decoder)
        return self._graph_runner

    def kangaroo_plan(self, kangaroo: Any = _MODEL_DEFAULT) -> Tuple[Optional[KangarooConfig], int]:
        """What a call decodes with: (the Kangaroo config, None for plain decoding; its exit layer). ``kangaroo``:
        by default the model's own, or plain decoding when the model has no adapter; None or ``gamma=0``
        decodes plainly; any other config needs an adapter."""
        kcfg = self.kangaroo if kangaroo is _MODEL_DEFAULT else kangaroo
        if kcfg is not None and not isinstance(kcfg, KangarooConfig):
            raise ValueError(f"kangaroo must be a KangarooConfig or None, got {type(kcfg).__name__}")
        if kcfg is not None and kcfg.gamma > 0 and self.adapter is None and kangaroo is not _MODEL_DEFAULT:
            raise ValueError("Kangaroo decoding needs an adapter; load one or pass kangaroo=None for plain decoding")
        if kcfg is None or kcfg.gamma == 0 or self.adapter is None:
            return None, self.exit_layer
        if kcfg.exit_layer is not None:
            check_exit_layer(kcfg.exit_layer, self.target.num_layers)
        return kcfg, kcfg.exit_layer or self.exit_layer

    def generate(self, input_ids: torch.Tensor, **kwargs: Any):
        """See :func:`kangaroo_rt.generate`."""
        return generate(self, input_ids, **kwargs)


def prepare_prompts(input_ids: Any, attention_mask: Any, vocab: int):
    """Validate and right-align prompts (ValueError names what is wrong). Returns (input_ids 2-D, packed (B, T)
    right-padded, lengths (B,))."""
    if not isinstance(input_ids, torch.Tensor):
        raise ValueError(f"input_ids must be a torch.Tensor of token ids, got {type(input_ids).__name__}")
    if input_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape (batch, seq_len), got {tuple(input_ids.shape)}")
    b, t = input_ids.shape
    if b == 0 or t == 0:
        raise ValueError(f"input_ids is empty (shape {tuple(input_ids.shape)}); every prompt needs >= 1 token")
    input_ids = input_ids.long()
    if attention_mask is None:
        mask = torch.ones_like(input_ids, dtype=torch.bool)
    else:
        if not isinstance(attention_mask, torch.Tensor):
            raise ValueError("attention_mask must be a torch.Tensor")
        if attention_mask.dim() == 1:
            attention_mask = attention_mask[None]
        if tuple(attention_mask.shape) != (b, t):
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {(b, t)}")
        if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
            raise ValueError("attention_mask must contain only 0 and 1")
        mask = attention_mask.to(input_ids.device).bool()
    lengths = mask.long().sum(dim=1)
    if bool((lengths == 0).any()):
        rows = (lengths == 0).nonzero().flatten().tolist()
        raise ValueError(f"prompt row(s) {rows} are empty (attention_mask is all zeros)")
    # Valid tokens of each row must be contiguous (left or right padding).
    first = mask.long().argmax(dim=1)
    span = torch.arange(t, device=mask.device)[None, :]
    contiguous = ((span >= first[:, None]) & (span < (first + lengths)[:, None])) == mask
    if not bool(contiguous.all()):
        raise ValueError("attention_mask must mark one contiguous run of tokens per row (left or right padding)")
    valid_ids = input_ids[mask]
    if bool(((valid_ids < 0) | (valid_ids >= vocab)).any()):
        bad = valid_ids[(valid_ids < 0) | (valid_ids >= vocab)][:5].tolist()
        raise ValueError(f"input_ids contain ids outside the vocabulary [0, {vocab}): {bad}")
    gather = (first[:, None] + span).clamp(max=t - 1)
    packed = input_ids.gather(1, gather)
    packed = torch.where(span < lengths[:, None], packed, torch.zeros_like(packed))
    width = int(lengths.max())
    return input_ids, packed[:, :width].contiguous(), lengths


def generate(model: KangarooModel, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
             max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 1.0,
             top_k: Optional[int] = None, top_p: Optional[float] = None,
             eos_token_id: Union[None, int, Sequence[int]] = None, pad_token_id: Optional[int] = None,
             streamer: Any = None, return_dict_in_generate: bool = False,
             kangaroo: Optional[KangarooConfig] = _MODEL_DEFAULT, seed: Optional[int] = None,
             ignore_eos: bool = False, cuda_graphs: Optional[bool] = None):
    """Generate like ``transformers``' ``generate`` with Kangaroo self-speculative decoding.

    Output equals the target's own decode: token for token under greedy (``do_sample=False`` or
    ``temperature=0``), in distribution under sampling. ``kangaroo=None`` (or ``gamma=0``) runs plain
    autoregressive decoding over the same cache. ``eos_token_id=None`` takes the model config's EOS;
    ``ignore_eos=True`` always produces exactly ``max_new_tokens``. ``cuda_graphs`` (None: on for CUDA
    devices, see :func:`kangaroo_rt.graphs.cuda_graphs_enabled`) runs greedy Kangaroo in fixed-shape
    rounds replayed from CUDA graphs (:mod:`kangaroo_rt.graphs`; eager off CUDA), with the same tokens.
    Returns the (B, T + new) sequences, or a :class:`GenerateOutput` with statistics when
    ``return_dict_in_generate``.
    """
    if not isinstance(model, KangarooModel):
        raise ValueError(f"model must be a KangarooModel, got {type(model).__name__}")
    check_positive_int("max_new_tokens", max_new_tokens)
    sampling = SamplingConfig(do_sample=bool(do_sample), temperature=temperature, top_k=top_k, top_p=top_p)
    kcfg, exit_layer = model.kangaroo_plan(kangaroo)
    vocab = model.config.vocab_size
    device = model.device
    if isinstance(input_ids, torch.Tensor):
        input_ids = input_ids.to(device)
    original, packed, lengths = prepare_prompts(input_ids, attention_mask, vocab)
    batch = original.shape[0]
    if streamer is not None and batch != 1:
        raise ValueError("streamers support batch size 1 only (as in transformers)")
    stop_ids = [] if ignore_eos else eos_ids(eos_token_id, model.config)
    eos = torch.tensor(stop_ids, dtype=torch.long, device=device) if stop_ids else None
    if pad_token_id is None:
        pad_token_id = model.config.pad_token_id
    if pad_token_id is None:
        pad_token_id = int(eos[0]) if eos is not None else 0
    model.decoder.exit_layer = exit_layer
    gen = torch.Generator(device=device).manual_seed(int(seed)) if seed is not None else None

    on_tokens = None
    if streamer is not None:
        streamer.put(original.cpu())
        sent = [0]

        def on_tokens(out: torch.Tensor, n_gen: torch.Tensor) -> None:
            n = int(n_gen[0])
            if n > sent[0]:
                streamer.put(out[0, sent[0]:n].cpu())
                sent[0] = n

    use_graphs = cuda_graphs_enabled(cuda_graphs, device)  # validates the option whatever the path
    with ops.device_context(device):
        if kcfg is not None and sampling.greedy and use_graphs:
            out, n_gen, stats = model.graph_runner.decode(packed, lengths, max_new_tokens, kcfg, eos,
                                                          on_tokens=on_tokens)
        else:
            out, n_gen, stats = model.decoder.decode(packed, lengths, max_new_tokens, sampling, kcfg, eos, gen,
                                                     on_tokens=on_tokens)
    if streamer is not None:
        streamer.end()
    width = int(n_gen.max())
    new = out[:, :width]
    cols = torch.arange(width, device=device)[None, :]
    new = torch.where(cols < n_gen[:, None], new, torch.full_like(new, pad_token_id))
    sequences = torch.cat([original, new], dim=1)
    if return_dict_in_generate:
        return GenerateOutput(sequences=sequences, stats=stats)
    return sequences
