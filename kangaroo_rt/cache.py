"""Static KV cache: allocated once and reused; rollback moves positions, nothing is copied."""
from __future__ import annotations

from typing import List, Optional, Tuple, Union

import torch

from . import huge_mapping


def _free_device_bytes(device: torch.device) -> Optional[int]:
    """Free memory on ``device`` in bytes, or None when it cannot be told (CPU: available RAM)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        # Blocks torch's caching allocator holds but no tensor uses (a replaced cache's, say) are free to torch,
        # though mem_get_info counts them as taken.
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free) + max(0, int(cached))
    if device.type == "cpu":
        return huge_mapping.proc_kb_field("/proc/meminfo", "MemAvailable")
    return None


class StaticKVCache:
    """Keys and values for ``num_layers`` layers, shape (num_layers, max_batch, kv_heads, max_len, head_dim).

    The cache keeps no lengths: the decoder's per-row positions say what is valid. Slots past a row's
    position hold stale data that attention never reads (a query at position p sees keys 0..p only, and every
    slot is rewritten before it is read again), so rolling back is moving the positions, never a copy.

    On the CPU, keys and values of HUGE_PAGE bytes or more live in one anonymous mapping advised for 2 MB pages
    (:mod:`kangaroo_rt.huge_mapping`, as the weights do), zero-filled as ``torch.zeros`` would be: attention reads
    each kv head's keys and values as one run, which in 4 KB pages crosses a page (a TLB miss, and a restart of the
    hardware prefetchers) every 32 bf16 keys of 64 dims. Measured on SmolLM2 in bf16 (a 2-core AMD EPYC 9004,
    benchmarks/bench_hugepages.py --kv-cache): see docs/design.md. ``huge_pages``: None decides so (off with
    ``KANGAROO_RT_HUGEPAGES=0``), False never, True wherever :func:`huge_mapping.available` allows.
    """

    def __init__(self, num_layers: int, max_batch: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: Union[str, torch.device] = "cpu",
                 huge_pages: Optional[bool] = None) -> None:
        for name, value in (("num_layers", num_layers), ("max_batch", max_batch), ("kv_heads", kv_heads),
                            ("max_len", max_len), ("head_dim", head_dim)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"StaticKVCache: {name} must be a positive int, got {value!r}")
        device = torch.device(device)
        shape = (num_layers, max_batch, kv_heads, max_len, head_dim)
        element = torch.empty((), dtype=dtype).element_size()
        needed = 2 * element * num_layers * max_batch * kv_heads * max_len * head_dim
        free = _free_device_bytes(device)
        if free is not None and needed > free:
            raise ValueError(
                f"KV cache of shape {shape} in {dtype} needs {needed / 2**20:.1f} MiB but only "
                f"{free / 2**20:.1f} MiB are free on {device}; lower max_batch or max_len"
            )
        self.shape = shape
        self.dtype = dtype
        self.device = device
        self.k, self.v = self._allocate(shape, dtype, device, needed, huge_pages)

    @staticmethod
    def _allocate(shape: Tuple[int, ...], dtype: torch.dtype, device: torch.device, needed: int,
                  huge_pages: Optional[bool]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Zeroed keys and values of ``shape``: in 2 MB pages where the class docstring says, else torch's."""
        wanted = huge_pages is not False and (huge_pages or needed >= huge_mapping.HUGE_PAGE)
        if wanted and device.type == "cpu":
            kv = huge_mapping.zeros([(shape, dtype)] * 2)  # v right after k, on a cache line
            if kv is not None:
                return kv[0], kv[1]
        return torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device)

    @property
    def num_layers(self) -> int:
        return self.shape[0]

    @property
    def max_batch(self) -> int:
        return self.shape[1]

    @property
    def max_len(self) -> int:
        return self.shape[3]

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def layer(self, index: int):
        """(k, v) of one layer, each (max_batch, kv_heads, max_len, head_dim)."""
        return self.k[index], self.v[index]

    def layers(self, start: int, end: int) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """([k of layers start..end-1], [v of them]): the views of :meth:`layer`, made once per range and kept
        (a decode step asks for the same ranges every time; 28 fresh views cost about 40 us)."""
        views = self.__dict__.setdefault("_layer_views", {})
        got = views.get((start, end))
        if got is None:
            got = views[(start, end)] = ([self.k[i] for i in range(start, end)], [self.v[i] for i in range(start, end)])
        return got

    def rows(self, start: int, stop: int) -> "StaticKVCache":
        """Rows ``start..stop-1`` as a cache of their own (views, no copy): the model writes and reads row
        ``start + i`` when it is given batch row ``i``."""
        if not 0 <= start < stop <= self.max_batch:
            raise ValueError(f"rows {start}..{stop - 1} are outside the cache's {self.max_batch} rows")
        view = object.__new__(StaticKVCache)
        view.k, view.v, view.dtype, view.device = self.k[:, start:stop], self.v[:, start:stop], self.dtype, self.device
        view.shape = tuple(view.k.shape)
        return view
