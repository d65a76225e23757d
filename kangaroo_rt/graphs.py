"""Fixed-shape Kangaroo rounds on static buffers: CUDA-graph capture and replay, and its eager twin.

:class:`GraphRunner` runs greedy Kangaroo over a :class:`~kangaroo_rt.speculative.Decoder`'s caches with the
decoder's own round steps at fixed shapes (so the tokens equal the eager rounds and plain greedy decoding):
``first`` (caps, draft step 0 with the adapter's catch-up), ``mid`` (draft steps 1..gamma-1, the index in a
device buffer, so one graph serves them all), ``last`` (shallow layers only) and ``verify`` (verify + accept,
then the round log). Every round runs ``gamma + 1`` steps with stopped and padding rows masked, and attention
reads the whole cache. Each step is captured once per key (bucket, gamma, exit layer, EOS slots, caches and
weights) into one shared pool; ``eta``, the limits and the EOS ids are device buffers. Off CUDA the steps run
eagerly.

Host-loop modes (``mode``): ``sync`` (a host sync per round), ``blocks`` (as many rounds as must all run, then
one sync), ``ext_loop`` (that schedule launched from C++ by ``kangaroo_rt._C``), ``while_graph`` (a CUDA >= 12.4
conditional while node of the extension: ``torch.cond`` captures only an *if* node with functional branches,
and our layers write the cache in place), and ``auto`` (each mode timed on a key's first calls, then the
fastest kept). See docs/design.md.
"""
from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from . import _ext
from .config import KangarooConfig, SamplingConfig, check_positive_int
from .speculative import BatchSampling, DecodeState, DecodeStats, Decoder, DraftChain, clock

BUCKETS: Tuple[int, ...] = (1, 2, 4, 8, 16)
LENGTH_QUANTUM = 256  # cache capacity is rounded up to a multiple of this (fewer reallocations, captures)
MODES = ("sync", "blocks", "ext_loop", "while_graph")
AUTO_TRIALS = 2  # calls timed per mode before ``auto`` picks one


def bucket_for(batch: int, buckets: Sequence[int] = BUCKETS) -> int:
    """The smallest bucket >= ``batch``; beyond the largest, the next multiple of the largest."""
    check_positive_int("batch", batch)
    if not buckets or any(b <= 0 for b in buckets) or list(buckets) != sorted(set(buckets)):
        raise ValueError(f"buckets must be increasing positive ints, got {tuple(buckets)!r}")
    for b in buckets:
        if batch <= b:
            return b
    top = buckets[-1]
    return -(-batch // top) * top


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

    state: DecodeState  # the rows (padding rows finished); eos (E,) with -1 in unused slots
    chain: DraftChain
    eta: torch.Tensor  # (1,) fp32 confidence threshold
    step: torch.Tensor  # (1,) int64 index of the next middle draft step
    rounds: torch.Tensor  # (1,) int64 rounds in which some row was active
    loop_iters: torch.Tensor  # (1,) int64 iterations of the device while loop (a safety bound)
    log: torch.Tensor  # (R+1, 4, Bk) int64 per round: the arguments of DecodeStats.add_round; row R is a trash row

    @classmethod
    def allocate(cls, bucket: int, gamma: int, hidden: int, dtype: torch.dtype, device: torch.device,
                 width: int, eos_slots: int) -> "RoundBuffers":
        """width: output columns (>= max_new + gamma + 2); the log holds ``width`` rounds."""
        if bucket <= 0 or gamma <= 0 or width < gamma + 3 or eos_slots <= 0:
            raise ValueError(f"bad buffer sizes: bucket={bucket}, gamma={gamma}, width={width}, eos_slots={eos_slots}")
        i64 = dict(dtype=torch.long, device=device)
        state = DecodeState.allocate(bucket, width, device, hidden, dtype, eos=torch.full((eos_slots,), -1, **i64))
        state.sampler = BatchSampling(SamplingConfig(), None)  # greedy
        return cls(state=state, chain=DraftChain.allocate(bucket, gamma, hidden, dtype, device),
                   eta=torch.zeros(1, dtype=torch.float32, device=device), step=torch.zeros(1, **i64),
                   rounds=torch.zeros(1, **i64), loop_iters=torch.zeros(1, **i64),
                   log=torch.zeros(width + 1, 4, bucket, **i64))

    @property
    def bucket(self) -> int:
        return self.state.batch

    @property
    def width(self) -> int:
        return self.state.out.shape[1]

    def tensors(self) -> List[torch.Tensor]:
        """Every static tensor (what a capture may read and write)."""
        return [t for part in (self, self.state, self.chain) for t in vars(part).values() if isinstance(t, torch.Tensor)]

    def rows(self, batch: int, max_new: int, eta: float, eos: Optional[torch.Tensor]) -> DecodeState:
        """Set up a call of ``batch`` <= bucket rows: the others become finished padding, at position 1 (the
        catch-up reads ``pos - 1``); ``eta`` and the EOS ids are loaded. Returns rows ``0..batch-1``, to prefill."""
        st = self.state
        n_eos = 0 if eos is None else eos.numel()
        if batch > self.bucket:
            raise ValueError(f"batch {batch} does not fit the bucket of {self.bucket} rows")
        if max_new + 2 > self.width:
            raise ValueError(f"max_new_tokens={max_new} does not fit the output buffer of {self.width} columns")
        if n_eos > st.eos.numel():
            raise ValueError(f"{n_eos} EOS ids do not fit {st.eos.numel()} slots")
        st.clear()
        st.eos.fill_(-1)
        self.rounds.zero_()
        if n_eos:
            st.eos[:n_eos].copy_(eos.reshape(-1))
        self.eta.fill_(eta)
        return st.rows(0, batch)


@dataclass
class _Entry:
    """What one key owns: its buffers, captured graphs (CUDA) and the ``auto`` mode's timings."""

    buffers: RoundBuffers
    graphs: Dict[str, object] = field(default_factory=dict)  # step name -> torch.cuda.CUDAGraph
    while_graph: Optional[object] = None  # kangaroo_rt._C.WhileGraph
    disabled: set = field(default_factory=set)  # modes that failed for this key
    timings: Dict[str, List[float]] = field(default_factory=dict)  # mode -> seconds per useful round
    chosen: Optional[str] = None

    def next_mode(self, available: Sequence[str], trials: int = AUTO_TRIALS) -> str:
        """``auto``'s mode to run now: one still on trial, else the fastest by its lower median (of two trials
        the faster, so that a one-off cost in a mode's first call, building its while graph say, does not decide)."""
        modes = [m for m in available if m not in self.disabled]
        if not modes:
            raise RuntimeError("no host-loop mode is available")
        if self.chosen not in modes:
            on_trial = [m for m in modes if len(self.timings.get(m, ())) < trials]
            self.chosen = None if on_trial else min(modes, key=lambda m: sorted(self.timings[m])[(trials - 1) // 2])
            return on_trial[0] if on_trial else self.chosen
        return self.chosen

    def record(self, mode: str, seconds: float, useful_rounds: int, trials: int = AUTO_TRIALS) -> None:
        """Keep a timing while the mode is still on trial (a long-running server adds nothing once chosen)."""
        samples = self.timings.setdefault(mode, [])
        if useful_rounds > 0 and self.chosen is None and len(samples) < trials:
            samples.append(seconds / useful_rounds)


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
        modes = ["sync", "blocks"]
        if _captures(self.decoder.target.device) and _ext.is_available():
            if all(hasattr(g, "raw_cuda_graph_exec") for g in entry.graphs.values()):
                modes.append("ext_loop")
            if _ext.supports_while_graph() and all(hasattr(g, "raw_cuda_graph") for g in entry.graphs.values()):
                modes.append("while_graph")
        return [m for m in modes if m not in entry.disabled]

    # -- the steps (captured on CUDA, eager elsewhere): the decoder's round, at fixed shapes -------------
    def _draft_first(self, st: RoundBuffers, kcfg: KangarooConfig) -> None:
        """Draft step 0: the round's caps, shallow layers on the newest token, the adapter's catch-up, head."""
        d, kv_len = self.decoder, self.decoder.cache.max_len
        d.begin_round(st.state, st.chain)
        d.draft_step(st.state, st.chain, 0, kv_len, *d.shallow_step(st.state, st.chain, 0, kv_len))
        st.step.fill_(1)

    def _draft_mid(self, st: RoundBuffers, kcfg: KangarooConfig) -> None:
        """Draft step s = ``st.step`` in 1..gamma-1 (read on the device)."""
        d, kv_len = self.decoder, self.decoder.cache.max_len
        shallow = d.shallow_step(st.state, st.chain, st.step, kv_len)
        st.chain.keep_drafting(st.step, st.eta)
        d.draft_step(st.state, st.chain, st.step, kv_len, *shallow)
        st.step.add_(1)

    def _draft_last(self, st: RoundBuffers, kcfg: KangarooConfig) -> None:
        """Step gamma: shallow layers only (its exit state is verified, it drafts nothing)."""
        self.decoder.shallow_step(st.state, st.chain, kcfg.gamma, self.decoder.cache.max_len)

    def _verify(self, st: RoundBuffers, kcfg: KangarooConfig) -> None:
        """The decoder's verify + accept over all gamma + 1 positions, then the round log (on the device)."""
        d = self.decoder
        was_active, accepted, committed = d.verify(st.state, st.chain, kcfg.gamma, d.cache.max_len)
        any_active = was_active.any()
        slot = torch.where(any_active, st.rounds, torch.full_like(st.rounds, st.log.shape[0] - 1))
        st.log.index_copy_(0, slot, torch.stack([was_active.long(), committed, st.chain.n_drafts, accepted])[None])
        st.rounds.add_(any_active.long())

    def _steps(self, gamma: int) -> List[Tuple[str, Callable]]:
        steps = [("first", self._draft_first)]
        steps += [("mid", self._draft_mid)] * (gamma - 1)
        return steps + [("last", self._draft_last), ("verify", self._verify)]

    # -- one round, the loops, capture ----------------------------------------------------------------
    def run_round(self, entry: _Entry, kcfg: KangarooConfig, stats: Optional[DecodeStats] = None) -> None:
        """One round: graph replays when captured, else the steps eagerly (adding their draft and verify seconds
        to ``stats`` when given)."""
        if entry.graphs:
            for name, _ in self._steps(kcfg.gamma):
                entry.graphs[name].replay()
            return
        t_start = time.perf_counter()
        for name, step in self._steps(kcfg.gamma):
            if name == "verify" and stats is not None:
                t_verify = time.perf_counter()
                stats.draft_time_s += t_verify - t_start
            step(entry.buffers, kcfg)
        if stats is not None:
            stats.verify_time_s += time.perf_counter() - t_verify

    def _loop(self, entry: _Entry, mode: str, kcfg: KangarooConfig, batch: int, emit: Callable[[], None],
              stats: Optional[DecodeStats]) -> None:
        st = entry.buffers
        if mode == "sync":
            while not bool(st.state.finished[:batch].all()):
                self.run_round(entry, kcfg, stats)
                emit()
        elif mode == "while_graph":
            if entry.while_graph is None:
                raws = [entry.graphs[name].raw_cuda_graph() for name, _ in self._steps(kcfg.gamma)]
                entry.while_graph = _ext.load().WhileGraph(raws, st.state.finished, st.loop_iters, st.width + 1)
            st.loop_iters.zero_()
            entry.while_graph.launch()
        else:  # blocks of ceil(max remaining / (gamma + 1)) rounds, which must all run, then one sync
            if mode == "ext_loop":
                execs = [entry.graphs[name].raw_cuda_graph_exec() for name, _ in self._steps(kcfg.gamma)]
                run_rounds = partial(_ext.load().replay_rounds, execs)
            else:
                def run_rounds(n: int) -> None:
                    for _ in range(n):
                        self.run_round(entry, kcfg, stats)
            live = st.state.rows(0, batch)
            while True:
                remaining = torch.where(live.finished, torch.zeros_like(live.n_gen), live.max_new - live.n_gen).max()
                n = math.ceil(int(remaining) / (kcfg.gamma + 1))
                if n == 0:
                    break
                run_rounds(n)

    def _capture(self, entry: _Entry, kcfg: KangarooConfig) -> None:
        """Capture the four step graphs into the shared pool (after an eager round warmed them up)."""
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graphs = {}
        for name, step in dict(self._steps(kcfg.gamma)).items():
            g = _new_cuda_graph()
            with torch.cuda.graph(g, pool=self._pool):
                step(entry.buffers, kcfg)
            if hasattr(g, "instantiate"):
                g.instantiate()
            graphs[name] = g
            self.captures += 1
        entry.graphs = graphs

    def _warm_up_and_capture(self, entry: _Entry, kcfg: KangarooConfig, emit: Callable[[], None]) -> None:
        """Run the first round eagerly on a side stream (a real round: it warms Triton, cuBLAS and the
        allocator up), then capture; a failed capture disables graphs for this key with a warning."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.run_round(entry, kcfg)
        torch.cuda.current_stream().wait_stream(side)
        emit()
        try:
            self._capture(entry, kcfg)
        except RuntimeError as exc:
            entry.graphs = {}
            entry.disabled.add("capture")
            warnings.warn(f"kangaroo_rt graphs: capture failed ({exc}); running these rounds eagerly", RuntimeWarning)

    # -- the whole call ------------------------------------------------------------------------------
    def decode(self, ids: torch.Tensor, lengths: torch.Tensor, max_new: int, kcfg: KangarooConfig,
               eos: Optional[torch.Tensor],
               on_tokens: Optional[Callable[[torch.Tensor, torch.Tensor], None]] = None):
        """Greedy Kangaroo over ids (B, T) right-padded, lengths (B,): :meth:`Decoder.decode` on this runner's
        static rows, with the rounds run here. Returns (out (B, max_new), n_gen (B,), stats), copied out of the
        buffers that the next call reuses."""
        if kcfg is None or kcfg.gamma <= 0:
            raise ValueError("GraphRunner runs Kangaroo rounds: pass a KangarooConfig with gamma >= 1")
        d, b = self.decoder, ids.shape[0]
        bucket = bucket_for(b, self.buckets)
        # One allocation, at the bucket's rows and a rounded length (the caches never shrink, so a key's
        # graphs stay valid until a larger request moves the caches).
        d.ensure_caches(bucket, ids.shape[1] + max_new + kcfg.gamma + 1, LENGTH_QUANTUM)
        entry = self.entry(bucket, kcfg, eos_slots_for(0 if eos is None else eos.numel()))
        rows = entry.buffers.rows(b, max_new, float(kcfg.eta), eos)
        run = partial(self._run, entry, kcfg, b, streaming=on_tokens is not None)
        out, n_gen, stats = d.decode(ids, lengths, max_new, SamplingConfig(), kcfg, eos, None, on_tokens, state=rows,
                                     rounds=run)
        return out.clone(), n_gen.clone(), stats

    def _run(self, entry: _Entry, kcfg: KangarooConfig, batch: int, stats: DecodeStats, emit: Callable[[], None],
             streaming: bool) -> None:
        """Every round of a call, after its prefill: capture on a key's first call, pick the host-loop mode, run
        it (falling back to ``sync`` if it fails), time it for ``auto``, and fill ``stats`` from the round log."""
        st, device = entry.buffers, self.decoder.target.device
        cuda = _captures(device)
        if cuda and not entry.graphs and "capture" not in entry.disabled:
            self._warm_up_and_capture(entry, kcfg, emit)
        if streaming or (cuda and not entry.graphs):
            mode = "sync"
        elif self.mode != "auto":
            mode = self.mode if self.mode in self.available_modes(entry) else "sync"
        else:
            mode = entry.next_mode(self.available_modes(entry) if cuda else ["sync"])
        t_loop = clock(device, cuda)  # prefill and capture are not the loop's: the timer starts on an idle device
        rounds_before = int(st.rounds)
        timing = None if cuda else stats
        try:
            self._loop(entry, mode, kcfg, batch, emit, timing)
        except RuntimeError as exc:
            if mode == "sync":
                raise
            warnings.warn(f"kangaroo_rt graphs: host-loop mode {mode!r} failed ({exc}); using 'sync'", RuntimeWarning)
            entry.disabled.add(mode)
            mode = "sync"
            self._loop(entry, mode, kcfg, batch, emit, timing)
        if self.mode == "auto":
            entry.record(mode, clock(device, cuda) - t_loop, int(st.rounds) - rounds_before)
        for round_log in st.log[:int(st.rounds), :, :batch].tolist():
            stats.add_round(*round_log)
        self.last_mode = mode
