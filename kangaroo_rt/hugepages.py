"""CPU weights in transparent huge pages.

A CPU decode step streams every weight from DRAM once (SmolLM2 in bf16: 270 MB a step). In 4 KB pages that is one
TLB miss every 4 KB, and the hardware prefetchers start over at every 4 KB page boundary. Linux backs an anonymous
mapping with 2 MB pages where it is advised to (``madvise(MADV_HUGEPAGE)``; the kernel's default policy on most
distributions, ``/sys/kernel/mm/transparent_hugepage/enabled`` = ``madvise``, gives none otherwise), and torch's
allocator does not advise (unless ``THP_MEM_ALLOC_ENABLE=1`` was set before torch's first allocation).

:func:`place` copies a module's CPU parameters and buffers, and the fused projection tensors that views of them
point into (:class:`kangaroo_rt.model.FusedRows`), into one such mapping, keeping every view a view of the same
bytes: the values, dtypes, shapes and strides are unchanged, so every result keeps its bits. Measured on SmolLM2
in bf16 (AMD EPYC, 2 cores; in one process against the same model in 4 KB pages, 8 Spec-Bench prompts x 400 tokens
twice, alternating: benchmarks/bench_hugepages.py): plain decoding 1.03x, Kangaroo 1.03-1.06x, every token
identical. :func:`kangaroo_rt.loading.load_model` places every model it loads onto the CPU (MIN_BYTES and up).

``KANGAROO_RT_HUGEPAGES=0`` turns it off; off Linux, or where huge pages are disabled (``never``), it does nothing.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from .huge_mapping import HUGE_PAGE, MIN_BYTES, arena, available, copy, huge_page_bytes


def _fused_holders(module: nn.Module) -> List[object]:
    from .model import FusedRows

    return [value for m in module.modules() for value in vars(m).values() if isinstance(value, FusedRows)]


def place(module: nn.Module, min_bytes: Optional[int] = None) -> int:
    """Move ``module``'s CPU parameters and buffers (and its fused projections) into one mapping advised for huge
    pages; returns the bytes moved (0 when nothing was: not available, under ``min_bytes``, or not on the CPU).
    Views stay views of one another (fused q/k/v and gate/up keep serving). Call it after loading, with no
    gradient wanted: the parameters get new memory, as ``.to()`` would give them. ``min_bytes``: MIN_BYTES by
    default."""
    if not available():
        return 0
    holders = _fused_holders(module)
    tensors: Dict[int, torch.Tensor] = {}
    for t in list(module.parameters()) + list(module.buffers()):
        tensors.setdefault(id(t), t)
    for h in holders:
        for t in (h.weight, h.bias):
            if t is not None:
                tensors.setdefault(id(t), t)
    if not tensors or any(t.device.type != "cpu" or t.is_sparse for t in tensors.values()):
        return 0
    storages: Dict[int, torch.UntypedStorage] = {}
    for t in tensors.values():
        storages.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage())
    offsets: Dict[int, int] = {}
    total = 0
    for ptr, storage in storages.items():
        offsets[ptr] = total
        total += (storage.nbytes() + 63) // 64 * 64
    if total < (MIN_BYTES if min_bytes is None else min_bytes):
        return 0
    block = arena(total)
    if block is None:
        return 0
    raw, start = block.untyped_storage(), block.storage_offset()
    # One storage at a time: copy it, then point every tensor on it at the copy, so that the old storage is freed
    # before the next one is copied (the peak is the mapping plus one storage, not the model twice).
    by_storage: Dict[int, List[int]] = {}
    for key, t in tensors.items():
        by_storage.setdefault(t.untyped_storage().data_ptr(), []).append(key)
    buffer_slots = [(m, name) for m in module.modules() for name, b in m._buffers.items() if b is not None]
    for ptr, keys in by_storage.items():
        storage = storages.pop(ptr)
        block[offsets[ptr]:offsets[ptr] + storage.nbytes()].copy_(torch.empty(0, dtype=torch.uint8).set_(storage))
        del storage
        moved: Dict[int, torch.Tensor] = {}
        for key in keys:
            t = tensors[key]
            moved[key] = torch.empty(0, dtype=t.dtype).set_(
                raw, (offsets[ptr] + start) // t.element_size() + t.storage_offset(), t.shape, t.stride())
        for key in keys:
            t = tensors[key]
            if isinstance(t, nn.Parameter):
                t.data = moved[key]
        for m, name in buffer_slots:
            if id(m._buffers[name]) in moved:
                m._buffers[name] = moved[id(m._buffers[name])]
        for h in holders:
            if id(h.weight) in moved:
                h.weight = moved[id(h.weight)]
            if h.bias is not None and id(h.bias) in moved:
                h.bias = moved[id(h.bias)]
        for key in keys:  # (drops this function's last reference to the old storage)
            tensors[key] = moved[key]
    return total


__all__: Tuple[str, ...] = ("available", "place", "copy", "huge_page_bytes", "HUGE_PAGE", "MIN_BYTES")
