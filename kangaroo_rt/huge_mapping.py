"""Anonymous memory in 2 MB pages: the mapping primitives under :mod:`kangaroo_rt.hugepages` (which moves a loaded
model's weights into such a mapping), kept apart from it so that the CPU extension's wrappers
(:mod:`kangaroo_rt._cpu_ext`, which puts the screened head's int8 copy there) can use them without importing the
model. ``KANGAROO_RT_HUGEPAGES=0`` turns both off."""
from __future__ import annotations

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


def copy(tensors: Sequence[torch.Tensor], min_bytes: Optional[int] = None) -> List[torch.Tensor]:
    """Contiguous copies of CPU ``tensors`` (same values, dtypes and shapes) in one mapping advised for huge pages,
    for tensors made after loading that a step streams (the screened head's int8 copy of the head:
    ``_cpu_ext.head_screen``); the tensors themselves when :func:`available` is false, any is not on the CPU, or they
    hold fewer than ``min_bytes`` (MIN_BYTES by default)."""
    tensors = list(tensors)
    if not available() or any(t.device.type != "cpu" or t.is_sparse for t in tensors):
        return tensors
    sizes = [(t.numel() * t.element_size() + 63) // 64 * 64 for t in tensors]
    total = sum(sizes)
    if total == 0 or total < (MIN_BYTES if min_bytes is None else min_bytes):
        return tensors
    block = arena(total)
    if block is None:
        return tensors
    out, at = [], 0
    with torch.no_grad():
        for t, size in zip(tensors, sizes):
            n = t.numel() * t.element_size()
            out.append(block[at:at + n].view(t.dtype).view(t.shape).copy_(t))
            at += size
    return out


def huge_page_bytes() -> int:
    """This process's anonymous memory in huge pages (``AnonHugePages`` of /proc/self/smaps_rollup), or -1."""
    try:
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                if line.startswith("AnonHugePages:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return -1


__all__: Tuple[str, ...] = ("available", "arena", "copy", "huge_page_bytes", "HUGE_PAGE", "MIN_BYTES")
