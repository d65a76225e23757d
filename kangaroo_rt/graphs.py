"""Fixed-shape Kangaroo rounds on static buffers: CUDA-graph capture and replay, and its eager twin.

:class:`GraphRunner` wraps a :class:`~kangaroo_rt.speculative.Decoder` (its model calls, its caches and
its prefill) and runs greedy Kangaroo rounds whose shapes never change, so that each step can be
captured once and replayed:

- ``first`` (draft step 0): embedding -> layers ``0..l-1`` -> the adapter's two-position catch-up ->
  head -> argmax and confidence;
- ``mid`` (draft steps ``1..gamma-1``): the same on one position; the step index lives in a device
  buffer, so one graph serves every middle step;
- ``last`` (step ``gamma``): layers ``0..l-1`` only;
- ``verify``: layers ``l..N-1`` over the ``(B, gamma+1)`` exit states, head, argmax and the fused
  accept + commit kernel, then the per-row limits and the round log.

The draft chain always has ``gamma + 1`` steps: rows that stopped drafting (confidence below ``eta``,
their ``max_new_tokens`` cap, finished rows, padding rows of the bucket) are masked exactly as the
eager loop masks them, and the extra positions they compute lie past what the round commits, where
every cache slot is rewritten before it is read. Attention reads ``kv_len = cache.max_len`` slots
(positions mask the rest). So the tokens equal the eager :meth:`Decoder.kangaroo_round` and plain
greedy decoding, token for token.

Graphs are captured per key (batch bucket, gamma, exit layer, EOS slots, cache and weights) on the
first call that needs them (``eta``, the token budget and the EOS ids live in device buffers, so any
value reuses the key's graphs), with one memory pool shared by all of them, and reused by later
``generate`` calls. Off CUDA the same step functions run eagerly (the path the CPU tests exercise).

Host loop modes (``mode``):

- ``sync``: one host sync per round (reading whether every row finished);
- ``blocks``: run ``ceil(max remaining / (gamma + 1))`` rounds without a sync (no row can finish its
  token budget sooner), then sync once; rounds after every row hit EOS are no-ops on the device;
- ``ext_loop``: the ``blocks`` schedule, with the graph launches of a block issued by the C++ loop of
  ``kangaroo_rt._C`` (needs the extension and ``CUDAGraph.raw_cuda_graph_exec``);
- ``while_graph``: one launch of a CUDA conditional while-node graph (CUDA >= 12.4, the extension)
  whose body is the round and whose condition is "some row still active", set on the device;
- ``auto``: times every available mode on the first calls of a key (per useful round) and keeps the
  fastest.

PyTorch captures ``torch.cond`` as a conditional *if* node (``CUDAGraphCaptureControlFlowOpDispatchMode``)
but has no while-loop node, and its branches must be functional while our layers write the KV cache in
place: the device-side loop is therefore the extension's.
"""
from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from . import ops
from .config import KangarooConfig, SamplingConfig
from .speculative import DecodeStats, Decoder

BUCKETS: Tuple[int, ...] = (1, 2, 4, 8, 16)
LENGTH_QUANTUM = 256  # cache capacity is rounded up to a multiple of this (fewer reallocations, captures)
MODES = ("sync", "blocks", "ext_loop", "while_graph")
AUTO_TRIALS = 2  # calls timed per mode before ``auto`` picks one


def bucket_for(batch: int, buckets: Sequence[int] = BUCKETS) -> int:
    """The smallest bucket >= ``batch``; beyond the largest, the next multiple of the largest."""
    if not isinstance(batch, int) or batch <= 0:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    if not buckets or any(b <= 0 for b in buckets) or list(buckets) != sorted(set(buckets)):
        raise ValueError(f"buckets must be increasing positive ints, got {tuple(buckets)!r}")
    for b in buckets:
        if batch <= b:
            return b
    top = buckets[-1]
    return -(-batch // top) * top


def capacity_for(needed: int, fixed_max_len: Optional[int], quantum: int = LENGTH_QUANTUM) -> int:
    """Cache positions to allocate: the model's fixed ``max_len``, or ``needed`` rounded up to ``quantum``."""
    if needed <= 0:
        raise ValueError(f"needed must be positive, got {needed}")
    if fixed_max_len is not None:
        if needed > fixed_max_len:
            raise ValueError(f"prompt + max_new_tokens (+ gamma + 1 for drafting) needs {needed} cache positions "
                             f"but the model's cache holds max_len={fixed_max_len}")
        return fixed_max_len
    return -(-needed // quantum) * quantum


def eos_slots_for(n_eos: int) -> int:
    """Static EOS buffer size for ``n_eos`` ids: a power of two >= max(1, n_eos)."""
    return 1 << max(0, n_eos - 1).bit_length()


def cuda_graphs_enabled(flag: Optional[bool], device: torch.device) -> bool:
    """Resolve the ``cuda_graphs`` option: None means on for CUDA devices (``KANGAROO_RT_CUDA_GRAPHS=0|1``
    overrides), off elsewhere; True off CUDA runs the same fixed-shape rounds eagerly."""
    if flag is not None:
        if not isinstance(flag, bool):
            raise ValueError(f"cuda_graphs must be True, False or None, got {flag!r}")
        return flag
    env = os.environ.get("KANGAROO_RT_CUDA_GRAPHS", "").strip()
    if env not in ("", "0", "1"):
        raise ValueError(f"KANGAROO_RT_CUDA_GRAPHS must be 0 or 1, got {env!r}")
    if env:
        return env == "1" and device.type == "cuda"
    return device.type == "cuda"


@dataclass
class RoundBuffers:
    """Static state of one bucket: every tensor a round reads or writes (allocated once, reused)."""

    out: torch.Tensor  # (Bk, W) int64 generated tokens, last column a trash slot
    n_gen: torch.Tensor  # (Bk,) int64
    finished: torch.Tensor  # (Bk,) bool; padding rows are finished
    pos: torch.Tensor  # (Bk,) int64 position of t0
    t0: torch.Tensor  # (Bk,) int64 newest token, not yet in the cache
    e_prev: torch.Tensor  # (Bk, D) exit state at pos - 1
    max_new: torch.Tensor  # (Bk,) int64 per-row token budget
    eos: torch.Tensor  # (E,) int64 EOS ids, -1 in unused slots
    eta: torch.Tensor  # (1,) fp32 confidence threshold
    cap: torch.Tensor  # (Bk,) int64 drafts allowed this round
    active: torch.Tensor  # (Bk,) bool row still drafting
    conf: torch.Tensor  # (Bk,) fp32 confidence of the newest draft
    x: torch.Tensor  # (Bk,) int64 newest draft token
    step: torch.Tensor  # (1,) int64 index of the next middle draft step
    drafts: torch.Tensor  # (Bk, gamma) int64, -1 beyond n_drafts
    n_drafts: torch.Tensor  # (Bk,) int64
    exits: torch.Tensor  # (Bk, gamma+1, D) exit states of the chain
    rounds: torch.Tensor  # (1,) int64 rounds in which some row was active
    loop_iters: torch.Tensor  # (1,) int64 iterations of the device while loop (a safety bound)
    log_committed: torch.Tensor  # (R+1, Bk) int64 per round; row R is a trash row
    log_drafts: torch.Tensor  # (R+1, Bk) int64
    log_accepted: torch.Tensor  # (R+1, Bk) int64
    log_active: torch.Tensor  # (R+1, Bk) bool

    @classmethod
    def allocate(cls, bucket: int, gamma: int, hidden: int, dtype: torch.dtype, device: torch.device,
                 width: int, eos_slots: int) -> "RoundBuffers":
        """width: output columns (>= max_new + gamma + 2); the log holds ``width`` rounds."""
        if bucket <= 0 or gamma <= 0 or width < gamma + 3 or eos_slots <= 0:
            raise ValueError(f"bad buffer sizes: bucket={bucket}, gamma={gamma}, width={width}, eos_slots={eos_slots}")
        i64 = dict(dtype=torch.long, device=device)
        log = (width + 1, bucket)
        return cls(
            out=torch.zeros(bucket, width, **i64), n_gen=torch.zeros(bucket, **i64),
            finished=torch.ones(bucket, dtype=torch.bool, device=device), pos=torch.ones(bucket, **i64),
            t0=torch.zeros(bucket, **i64), e_prev=torch.zeros(bucket, hidden, dtype=dtype, device=device),
            max_new=torch.zeros(bucket, **i64), eos=torch.full((eos_slots,), -1, **i64),
            eta=torch.zeros(1, dtype=torch.float32, device=device),
            cap=torch.zeros(bucket, **i64), active=torch.zeros(bucket, dtype=torch.bool, device=device),
            conf=torch.zeros(bucket, dtype=torch.float32, device=device), x=torch.zeros(bucket, **i64),
            step=torch.zeros(1, **i64), drafts=torch.full((bucket, gamma), -1, **i64),
            n_drafts=torch.zeros(bucket, **i64),
            exits=torch.zeros(bucket, gamma + 1, hidden, dtype=dtype, device=device),
            rounds=torch.zeros(1, **i64), loop_iters=torch.zeros(1, **i64),
            log_committed=torch.zeros(log, **i64), log_drafts=torch.zeros(log, **i64),
            log_accepted=torch.zeros(log, **i64), log_active=torch.zeros(log, dtype=torch.bool, device=device),
        )

    @property
    def bucket(self) -> int:
        return self.out.shape[0]

    @property
    def width(self) -> int:
        return self.out.shape[1]

    def load(self, out: torch.Tensor, n_gen: torch.Tensor, finished: torch.Tensor, pos: torch.Tensor,
             t0: torch.Tensor, e_prev: torch.Tensor, max_new: int, eos: Optional[torch.Tensor],
             eta: float = 0.0) -> None:
        """Copy the state after prefill of B <= bucket rows in; the other rows become finished padding.

        out: (B, >=1) int64 with the first token in column 0; n_gen, pos, t0: (B,) int64; finished: (B,)
        bool; e_prev: (B, D); eos: (E,) int64 or None; eta: the round's confidence threshold.
        """
        b = n_gen.shape[0]
        if b > self.bucket:
            raise ValueError(f"batch {b} does not fit the bucket of {self.bucket} rows")
        if max_new + 2 > self.width:
            raise ValueError(f"max_new_tokens={max_new} does not fit the output buffer of {self.width} columns")
        n_eos = 0 if eos is None else eos.numel()
        if n_eos > self.eos.numel():
            raise ValueError(f"{n_eos} EOS ids do not fit {self.eos.numel()} slots")
        self.out.zero_()
        self.out[:b, :1].copy_(out[:, :1])
        for dst, src, pad in ((self.n_gen, n_gen, 0), (self.pos, pos, 1), (self.t0, t0, 0)):
            dst.fill_(pad)
            dst[:b].copy_(src)
        self.finished.fill_(True)
        self.finished[:b].copy_(finished)
        self.e_prev.zero_()
        self.e_prev[:b].copy_(e_prev)
        self.max_new.fill_(max_new)
        self.eta.fill_(eta)
        self.eos.fill_(-1)
        if n_eos:
            self.eos[:n_eos].copy_(eos.reshape(-1))
        self.rounds.zero_()
        self.log_active.zero_()


@dataclass
class _Entry:
    """What one key owns: its buffers, captured graphs (CUDA) and mode timings."""

    buffers: RoundBuffers
    graphs: Dict[str, object] = field(default_factory=dict)  # step name -> torch.cuda.CUDAGraph
    while_graph: Optional[object] = None  # kangaroo_rt._C.WhileGraph
    disabled: set = field(default_factory=set)  # modes that failed for this key
    timings: Dict[str, List[float]] = field(default_factory=dict)  # mode -> seconds per useful round
    chosen: Optional[str] = None


class ModeChooser:
    """Picks the fastest host-loop mode per key from measured seconds per useful round."""

    def __init__(self, trials: int = AUTO_TRIALS) -> None:
        if trials <= 0:
            raise ValueError(f"trials must be positive, got {trials}")
        self.trials = trials

    def next_mode(self, entry: _Entry, available: Sequence[str]) -> str:
        """The mode to run now: an untried (or under-tried) one first, then the fastest (lower median)."""
        modes = [m for m in available if m not in entry.disabled]
        if not modes:
            raise RuntimeError("no host-loop mode is available")
        if entry.chosen in modes:
            return entry.chosen
        for m in modes:
            if len(entry.timings.get(m, [])) < self.trials:
                return m
        entry.chosen = min(modes, key=lambda m: _lower_median(entry.timings[m]))
        return entry.chosen

    def record(self, entry: _Entry, mode: str, seconds: float, useful_rounds: int) -> None:
        """Keep a timing while the mode is still on trial (a long-running server adds nothing once chosen)."""
        samples = entry.timings.setdefault(mode, [])
        if useful_rounds > 0 and entry.chosen is None and len(samples) < self.trials:
            samples.append(seconds / useful_rounds)


def _lower_median(values: List[float]) -> float:
    """The lower median: of two trials the faster, so that a one-off cost in a mode's first call (building
    its while graph, say) does not decide."""
    s = sorted(values)
    return s[(len(s) - 1) // 2]


def _captures(device: torch.device) -> bool:
    """Whether rounds on ``device`` are captured as CUDA graphs (tests/test_graphs_emulated.py swaps in an
    emulation of capture and replay to run the CUDA host-loop code on CPU)."""
    return device.type == "cuda"


def _new_cuda_graph():
    """A CUDAGraph that keeps its cudaGraph_t (for the while node) where this torch can."""
    try:
        return torch.cuda.CUDAGraph(keep_graph=True)
    except TypeError:
        return torch.cuda.CUDAGraph()


class GraphRunner:
    """Greedy Kangaroo decoding in fixed-shape rounds over ``decoder``'s caches (see the module docstring).

    mode: "auto" or one of :data:`MODES` (``KANGAROO_RT_GRAPH_MODE`` sets the default); off CUDA only
    "sync" and "blocks" exist and nothing is captured.
    """

    def __init__(self, decoder: Decoder, buckets: Sequence[int] = BUCKETS, mode: Optional[str] = None) -> None:
        if decoder.adapter is None:
            raise ValueError("GraphRunner needs a decoder with an adapter (Kangaroo decoding)")
        mode = mode or os.environ.get("KANGAROO_RT_GRAPH_MODE") or "auto"
        if mode != "auto" and mode not in MODES:
            raise ValueError(f"mode must be 'auto' or one of {MODES}, got {mode!r}")
        bucket_for(1, buckets)  # validates the buckets
        self.decoder = decoder
        self.buckets = tuple(buckets)
        self.mode = mode
        self.chooser = ModeChooser()
        self._entries: Dict[tuple, _Entry] = {}
        self._storage_id: Optional[tuple] = None
        self._pool = None
        self.captures = 0  # graphs captured so far (tests check reuse)
        self.last_mode: Optional[str] = None

    # -- keys and buffers --------------------------------------------------------------------------
    def _storage(self) -> tuple:
        """Identity of the memory the graphs bake in: caches and weights."""
        d = self.decoder
        return (d.cache.k.data_ptr(), d.cache.v.data_ptr(), d.adapter_cache.k.data_ptr(),
                d.cache.max_len, d.cache.max_batch, d.target.embed_tokens.weight.data_ptr(),
                d.target.lm_head.weight.data_ptr(), d.adapter.norm.weight.data_ptr())

    def entry(self, bucket: int, kcfg: KangarooConfig, eos_slots: int) -> _Entry:
        """The buffers (and graphs) of one key, created on first use; stale keys are dropped when the
        caches or weights moved."""
        storage = self._storage()
        if storage != self._storage_id:
            self._entries.clear()
            self._storage_id = storage
        d = self.decoder
        key = (bucket, kcfg.gamma, d.exit_layer, eos_slots)
        e = self._entries.get(key)
        if e is None:
            t = d.target
            width = d.cache.max_len + kcfg.gamma + 2
            e = _Entry(RoundBuffers.allocate(bucket, kcfg.gamma, t.config.hidden_size, t.dtype, t.device,
                                             width, eos_slots))
            self._entries[key] = e
        return e

    def available_modes(self, entry: _Entry) -> List[str]:
        if not _captures(self.decoder.target.device):
            return ["sync", "blocks"]
        from . import _ext

        modes = ["sync", "blocks"]
        if _ext.is_available():
            if all(hasattr(g, "raw_cuda_graph_exec") for g in entry.graphs.values()):
                modes.append("ext_loop")
            if _ext.supports_while_graph() and all(hasattr(g, "raw_cuda_graph") for g in entry.graphs.values()):
                modes.append("while_graph")
        return [m for m in modes if m not in entry.disabled]

    # -- the steps (captured on CUDA, eager elsewhere) ------------------------------------------------
    def _draft_first(self, st: RoundBuffers, kcfg: KangarooConfig) -> None:
        """Draft step 0: shallow layers on t0, the adapter on (pos - 1, pos), head, argmax."""
        d = self.decoder
        target, l, kv_len = d.target, d.exit_layer, d.cache.max_len
        cap = (st.max_new - st.n_gen - 1).clamp(min=0, max=kcfg.gamma)
        cap = torch.where(st.finished, torch.zeros_like(cap), cap)
        st.cap.copy_(cap)
        pos = st.pos[:, None]  # (Bk, 1)
        rope = target.rope(pos)
        e = target.forward_layers(target.embed(st.t0[:, None]), pos, 0, l, d.cache, kv_len=kv_len, rope=rope)
        st.exits[:, 0].copy_(e[:, 0])
        a_pos = torch.cat([pos - 1, pos], dim=1)  # (Bk, 2)
        a_in = torch.cat([st.e_prev[:, None], e], dim=1)
        y = d.adapter(a_in, a_pos, *target.rope(a_pos), d.adapter_cache, kv_len=kv_len)[:, -1]
        token, conf = ops.greedy_with_confidence(target.lm_head(y))
        active = cap > 0
        st.drafts.fill_(-1)
        st.drafts[:, 0].copy_(torch.where(active, token, torch.full_like(token, -1)))
        st.n_drafts.copy_(active.long())
        st.active.copy_(active)
        st.conf.copy_(conf)
        st.x.copy_(token)
        st.step.fill_(1)

    def _draft_mid(self, st: RoundBuffers, kcfg: KangarooConfig) -> None:
        """Draft step s = ``st.step`` in 1..gamma-1 (read on the device)."""
        d = self.decoder
        target, l, kv_len = d.target, d.exit_layer, d.cache.max_len
        s = st.step  # (1,)
        pos = (st.pos + s)[:, None]
        rope = target.rope(pos)
        e = target.forward_layers(target.embed(st.x[:, None]), pos, 0, l, d.cache, kv_len=kv_len, rope=rope)
        st.exits.index_copy_(1, s, e)
        active = st.active & (st.conf >= st.eta) & (s < st.cap)
        y = d.adapter(e, pos, *rope, d.adapter_cache, kv_len=kv_len)[:, -1]
        token, conf = ops.greedy_with_confidence(target.lm_head(y))
        st.drafts.index_copy_(1, s, torch.where(active, token, torch.full_like(token, -1))[:, None])
        st.n_drafts.add_(active.long())
        st.active.copy_(active)
        st.conf.copy_(conf)
        st.x.copy_(token)
        st.step.add_(1)

    def _draft_last(self, st: RoundBuffers, kcfg: KangarooConfig) -> None:
        """Step gamma: shallow layers only (its exit state is verified, it drafts nothing)."""
        d = self.decoder
        target = d.target
        pos = (st.pos + kcfg.gamma)[:, None]
        e = target.forward_layers(target.embed(st.x[:, None]), pos, 0, d.exit_layer, d.cache,
                                  kv_len=d.cache.max_len)
        st.exits[:, kcfg.gamma].copy_(e[:, 0])

    def _verify(self, st: RoundBuffers, kcfg: KangarooConfig) -> None:
        """Deep layers over (Bk, gamma+1), head, fused accept + commit, per-row limits, round log."""
        d = self.decoder
        target = d.target
        bucket = st.bucket
        vpos = st.pos[:, None] + torch.arange(kcfg.gamma + 1, device=st.pos.device)[None, :]
        h = target.forward_layers(st.exits, vpos, d.exit_layer, target.num_layers, d.cache, kv_len=d.cache.max_len)
        target_tokens = target.head(h).argmax(dim=-1)  # (Bk, gamma+1)
        was_active = ~st.finished
        accepted, nxt, committed = ops.accept_greedy_commit(st.drafts, st.n_drafts, target_tokens, st.out,
                                                            st.n_gen, st.finished, st.pos, st.eos)
        st.finished.logical_or_(st.n_gen >= st.max_new)
        rows = torch.arange(bucket, device=st.pos.device)
        st.e_prev.copy_(st.exits[rows, accepted])
        st.t0.copy_(nxt)
        d.cache.set_lengths(st.pos)
        d.adapter_cache.set_lengths(st.pos)
        any_active = was_active.any()
        slot = torch.where(any_active, st.rounds, torch.full_like(st.rounds, st.log_active.shape[0] - 1))
        st.log_committed.index_copy_(0, slot, committed[None])
        st.log_drafts.index_copy_(0, slot, st.n_drafts[None])
        st.log_accepted.index_copy_(0, slot, accepted[None])
        st.log_active.index_copy_(0, slot, was_active[None])
        st.rounds.add_(any_active.long())

    def _steps(self, gamma: int) -> List[Tuple[str, Callable]]:
        steps = [("first", self._draft_first)]
        steps += [("mid", self._draft_mid)] * (gamma - 1)
        return steps + [("last", self._draft_last), ("verify", self._verify)]

    # -- one round and blocks of rounds -------------------------------------------------------------
    def run_round(self, entry: _Entry, kcfg: KangarooConfig, times: Optional[List[float]] = None) -> None:
        """One round: graph replays when captured, else the steps eagerly (``times`` accumulates draft and
        verify seconds when given)."""
        if entry.graphs:
            for name, _ in self._steps(kcfg.gamma):
                entry.graphs[name].replay()
            return
        t0 = time.perf_counter()
        for name, fn in self._steps(kcfg.gamma):
            if name == "verify" and times is not None:
                t1 = time.perf_counter()
                fn(entry.buffers, kcfg)
                times[0] += t1 - t0
                times[1] += time.perf_counter() - t1
            else:
                fn(entry.buffers, kcfg)

    def _capture(self, entry: _Entry, kcfg: KangarooConfig) -> None:
        """Capture the four step graphs into the shared pool (after an eager round warmed them up)."""
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graphs = {}
        for name, fn in dict(self._steps(kcfg.gamma)).items():
            g = _new_cuda_graph()
            with torch.cuda.graph(g, pool=self._pool):
                fn(entry.buffers, kcfg)
            if hasattr(g, "instantiate"):
                g.instantiate()
            graphs[name] = g
            self.captures += 1
        entry.graphs = graphs

    def _block_rounds(self, st: RoundBuffers, batch: int, gamma: int) -> int:
        """Rounds that every schedule must still run (one host sync): 0 when every row finished."""
        finished, n_gen, max_new = (t[:batch] for t in (st.finished, st.n_gen, st.max_new))
        remaining = torch.where(finished, torch.zeros_like(n_gen), max_new - n_gen).max()
        return math.ceil(int(remaining) / (gamma + 1))

    def _loop(self, entry: _Entry, mode: str, kcfg: KangarooConfig, batch: int,
              on_tokens: Optional[Callable], times: Optional[List[float]]) -> None:
        st = entry.buffers
        if mode == "sync":
            while not bool(st.finished[:batch].all()):
                self.run_round(entry, kcfg, times)
                if on_tokens is not None:
                    on_tokens(st.out[:batch], st.n_gen[:batch])
        elif mode == "blocks":
            while True:
                n = self._block_rounds(st, batch, kcfg.gamma)
                if n == 0:
                    break
                for _ in range(n):
                    self.run_round(entry, kcfg, times)
        elif mode == "ext_loop":
            from . import _ext

            execs = [entry.graphs[name].raw_cuda_graph_exec() for name, _ in self._steps(kcfg.gamma)]
            while True:
                n = self._block_rounds(st, batch, kcfg.gamma)
                if n == 0:
                    break
                _ext.load().replay_rounds(execs, n)
        elif mode == "while_graph":
            from . import _ext

            if entry.while_graph is None:
                raws = [entry.graphs[name].raw_cuda_graph() for name, _ in self._steps(kcfg.gamma)]
                entry.while_graph = _ext.load().WhileGraph(raws, st.finished, st.loop_iters, st.width + 1)
            st.loop_iters.zero_()
            entry.while_graph.launch()
        else:
            raise ValueError(f"unknown mode {mode!r}")

    # -- the whole call ------------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, ids: torch.Tensor, lengths: torch.Tensor, max_new: int, kcfg: KangarooConfig,
               eos: Optional[torch.Tensor], fixed_max_len: Optional[int] = None,
               on_tokens: Optional[Callable[[torch.Tensor, torch.Tensor], None]] = None):
        """Greedy Kangaroo over ids (B, T) right-padded, lengths (B,). Returns (out (B, max_new), n_gen (B,),
        stats), as :meth:`Decoder.decode` does."""
        if kcfg is None or kcfg.gamma <= 0:
            raise ValueError("GraphRunner runs Kangaroo rounds: pass a KangarooConfig with gamma >= 1")
        d = self.decoder
        b = ids.shape[0]
        gamma = kcfg.gamma
        bucket = bucket_for(b, self.buckets)
        needed = ids.shape[1] + max_new + gamma + 1
        d.ensure_caches(bucket, capacity_for(needed, fixed_max_len), fixed_max_len=fixed_max_len)
        entry = self.entry(bucket, kcfg, eos_slots_for(0 if eos is None else eos.numel()))
        st = entry.buffers
        stats = DecodeStats(rounds=[0] * b, new_tokens=[0] * b, accepted_lengths=[[] for _ in range(b)],
                            draft_lengths=[[] for _ in range(b)], position_attempts=[[0] * gamma for _ in range(b)],
                            position_accepts=[[0] * gamma for _ in range(b)])
        cuda = _captures(ids.device)
        start = time.perf_counter()
        rows = d.prefill(ids, lengths, SamplingConfig(), max_new, gamma, eos, None)
        st.load(rows.out, rows.n_gen, rows.finished, rows.pos, rows.t0, rows.e_prev, max_new, eos, float(kcfg.eta))
        stats.prefill_time_s = time.perf_counter() - start
        if on_tokens is not None:
            on_tokens(st.out[:b], st.n_gen[:b])
        times = None if cuda else [0.0, 0.0]
        if cuda and not entry.graphs and "capture" not in entry.disabled:
            self._warm_up_and_capture(entry, kcfg, b, on_tokens)
        if on_tokens is not None or (cuda and not entry.graphs):
            mode = "sync"
        elif self.mode != "auto":
            mode = self.mode if self.mode in self.available_modes(entry) else "sync"
        else:
            mode = self.chooser.next_mode(entry, ["sync"] if not cuda else self.available_modes(entry))
        t_loop = time.perf_counter()
        rounds_before = int(st.rounds)
        try:
            self._loop(entry, mode, kcfg, b, on_tokens, times)
        except RuntimeError as exc:
            if mode == "sync":
                raise
            warnings.warn(f"kangaroo_rt graphs: host-loop mode {mode!r} failed ({exc}); using 'sync'", RuntimeWarning)
            entry.disabled.add(mode)
            self._loop(entry, "sync", kcfg, b, on_tokens, times)
            mode = "sync"
        if cuda:
            torch.cuda.synchronize(ids.device)
        useful = int(st.rounds) - rounds_before
        if self.mode == "auto":
            self.chooser.record(entry, mode, time.perf_counter() - t_loop, useful)
        stats.wall_time_s = time.perf_counter() - start
        if times is not None:
            stats.draft_time_s, stats.verify_time_s = times
        self._fill_stats(stats, st, b, gamma)
        self.last_mode = mode
        return st.out[:b, :max_new].clone(), st.n_gen[:b].clone(), stats

    def _warm_up_and_capture(self, entry: _Entry, kcfg: KangarooConfig, batch: int,
                             on_tokens: Optional[Callable]) -> None:
        """Run the first round eagerly on a side stream (a real round: it warms Triton, cuBLAS and the
        allocator up), then capture; a failed capture disables graphs for this key with a warning."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.run_round(entry, kcfg)
        torch.cuda.current_stream().wait_stream(side)
        if on_tokens is not None:
            on_tokens(entry.buffers.out[:batch], entry.buffers.n_gen[:batch])
        try:
            self._capture(entry, kcfg)
        except RuntimeError as exc:
            entry.graphs = {}
            entry.disabled.add("capture")
            warnings.warn(f"kangaroo_rt graphs: capture failed ({exc}); running these rounds eagerly", RuntimeWarning)

    @staticmethod
    def _fill_stats(stats: DecodeStats, st: RoundBuffers, batch: int, gamma: int) -> None:
        """Per-row statistics from the device round log (one host read)."""
        n = int(st.rounds)
        active = st.log_active[:n, :batch].T.tolist()
        committed = st.log_committed[:n, :batch].T.tolist()
        drafts = st.log_drafts[:n, :batch].T.tolist()
        accepted = st.log_accepted[:n, :batch].T.tolist()
        stats.new_tokens = st.n_gen[:batch].tolist()
        for r in range(batch):
            for i in range(n):
                if not active[r][i]:
                    continue
                stats.rounds[r] += 1
                stats.accepted_lengths[r].append(committed[r][i])
                stats.draft_lengths[r].append(drafts[r][i])
                for j in range(drafts[r][i]):
                    stats.position_attempts[r][j] += 1
                    stats.position_accepts[r][j] += int(j < accepted[r][i])


def runner_for(model) -> GraphRunner:
    """The :class:`GraphRunner` attached to a KangarooModel (created on first use, then reused)."""
    runner = getattr(model, "_graph_runner", None)
    if runner is None or runner.decoder is not model.decoder:
        runner = GraphRunner(model.decoder)
        model._graph_runner = runner
    return runner
