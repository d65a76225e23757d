"""Anonymous memory in 2 MB pages: the mapping primitives under :mod:`kangaroo_rt.hugepages` (which moves a loaded
model's weights into such a mapping), kept apart from it so that the CPU extension's wrappers
(:mod:`kangaroo_rt._cpu_ext`, which puts the screened head's int8 copy there) can use them without importing the
model. ``KANGAROO_RT_HUGEPAGES=0`` turns both off."""
from __future__ import annotations

import math
import mmap
import os
from typing import List, Optional, Sequence, Tuple

import torch

HUGE_PAGE = 2 << 20
MIN_BYTES = 8 << 20  # smaller models gain nothing measurable; a 2 MB-aligned mapping would waste most of itself
_THP_POLICY = "/sys/kernel/mm/transparent_hugepage/enabled"


def available() -> bool:
    """Whether huge pages can be advised here, for :func:`kangaroo_rt.hugepages.place` and :func:`copy` (Linux, not
    disabled by the kernel's policy or by ``KANGAROO_RT_HUGEPAGES=0``)."""
    if os.environ.get("KANGAROO_RT_HUGEPAGES", "1") == "0" or not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        with open(_THP_POLICY) as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def arena(total: int) -> Optional[torch.Tensor]:
    """``total`` bytes (uint8) starting on a 2 MB boundary of a new anonymous mapping advised for huge pages (the
    tensor keeps the mapping alive while any view of it lives), or None where the advice fails."""
    size = (total + 2 * HUGE_PAGE - 1) // HUGE_PAGE * HUGE_PAGE
    mapping = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    raw = torch.frombuffer(mapping, dtype=torch.uint8)
    start = (-raw.data_ptr()) % HUGE_PAGE
    try:
        mapping.madvise(mmap.MADV_HUGEPAGE)
    except OSError:
        return None
    return raw[start:start + total]


def _carve(specs: Sequence[Tuple[Sequence[int], torch.dtype]], min_bytes: int) -> Optional[List[torch.Tensor]]:
    """Tensors of each (shape, dtype) of ``specs``, one after another in one new mapping advised for huge pages,
    each starting on a cache line; as a fresh anonymous mapping they read as zeros. None where :func:`available` is
    false, they hold no bytes or fewer than ``min_bytes`` (counted with their 64-byte rounding), or the advice fails."""
    if not available():
        return None
    nbytes = [math.prod(shape) * torch.empty((), dtype=dtype).element_size() for shape, dtype in specs]
    sizes = [(n + 63) // 64 * 64 for n in nbytes]
    total = sum(sizes)
    if total == 0 or total < min_bytes:
        return None
    block = arena(total)
    if block is None:
        return None
    out, at = [], 0
    for (shape, dtype), n, size in zip(specs, nbytes, sizes):
        out.append(block[at:at + n].view(dtype).view(tuple(shape)))
        at += size
    return out


def zeros(specs: Sequence[Tuple[Sequence[int], torch.dtype]]) -> Optional[List[torch.Tensor]]:
    """Zeroed tensors of each (shape, dtype) of ``specs`` in one mapping advised for huge pages (pages never
    written take no memory), each on a cache line, for buffers a step streams that are made in place (the KV cache:
    :class:`kangaroo_rt.StaticKVCache`); None where :func:`available` is false or the advice fails."""
    return _carve(specs, 0)


def copy_room(specs: Sequence[Tuple[Sequence[int], torch.dtype]],
              min_bytes: Optional[int] = None) -> Optional[List[torch.Tensor]]:
    """Room for tensors of each (shape, dtype) of ``specs`` that a caller fills itself, made after loading, that a
    step streams (the decode stacks' packed weights: ``_cpu_ext.packed_bf16``), in one mapping advised for huge
    pages; None where :func:`copy` would return its tensors (not available, or under ``min_bytes``: MIN_BYTES)."""
    return _carve(specs, MIN_BYTES if min_bytes is None else min_bytes)


def copy(tensors: Sequence[torch.Tensor], min_bytes: Optional[int] = None) -> List[torch.Tensor]:
    """Contiguous copies of CPU ``tensors`` (same values, dtypes and shapes) in one mapping advised for huge pages,
    for tensors made after loading that a step streams (the screened head's int8 copy of the head:
    ``_cpu_ext.head_screen``); the tensors themselves when :func:`available` is false, any is not on the CPU, or they
    hold fewer than ``min_bytes`` (MIN_BYTES by default)."""
    tensors = list(tensors)
    if any(t.device.type != "cpu" or t.is_sparse for t in tensors):
        return tensors
    out = copy_room([(t.shape, t.dtype) for t in tensors], min_bytes)
    if out is None:
        return tensors
    with torch.no_grad():
        for copied, t in zip(out, tensors):
            copied.copy_(t)
    return out


def proc_kb_field(path: str, field: str) -> Optional[int]:
    """The ``field:  N kB`` line of a /proc file (meminfo, smaps_rollup) in bytes, or None where it cannot be read."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def huge_page_bytes() -> int:
    """This process's anonymous memory in huge pages (``AnonHugePages`` of /proc/self/smaps_rollup), or -1."""
    got = proc_kb_field("/proc/self/smaps_rollup", "AnonHugePages")
    return -1 if got is None else got


__all__: Tuple[str, ...] = ("available", "arena", "copy", "zeros", "huge_page_bytes", "HUGE_PAGE", "MIN_BYTES")
