"""The decoding core: prefill, plain autoregressive steps, and Kangaroo rounds, batched and ragged.

State per row lives in device tensors: ``pos`` (position of the newest uncommitted token ``t0``),
``n_gen`` (tokens generated), ``finished``. A Kangaroo round:

1. draft: step ``s`` runs target layers ``0..l-1`` on the newest token at ``pos + s`` (writing the
   shallow KV); rows that may still draft run the adapter and the LM head, giving draft ``d_{s+1}``
   and its confidence. A row stops drafting once ``s`` reaches its cap (``gamma`` or what is left of
   ``max_new_tokens``) or its last draft's confidence fell below ``eta``; the loop ends when no row
   drafts. Stopped rows are masked. The first adapter call of a round takes two positions
   (``pos - 1`` and ``pos``): after a fully accepted chain the adapter has no KV for the last draft.
2. verify: target layers ``l..N-1`` once over the stacked exit states ``(B, K+1, D)``.
3. accept and commit up to EOS (greedy: ``ops.accept_greedy_commit``, one fused op that also advances
   ``pos``; sampling: ``ops.accept_sampling`` then ``ops.commit_tokens``), and roll back by moving
   ``pos``: stale cache entries past it are never read, so nothing is copied.

``max_new`` is one int for the batch (``generate``) or a (B,) tensor of per-row limits (the engine): a row
never drafts past its own limit, so a round never commits past it either. Token choice goes through a
sampler: :class:`BatchSampling` (one config and generator for the batch) or :class:`RowSampling` (per-row
configs and generators, for batches that mix requests). :class:`CacheRowsView` lets a prefill write
chosen cache rows while other rows are mid-generation.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch

from . import ops
from .adapter import Adapter
from .cache import StaticKVCache
from .config import KangarooConfig, SamplingConfig
from .model import Transformer


@dataclass
class DecodeStats:
    """Per-row statistics of one decode call (lists have one entry per row)."""

    rounds: List[int]
    new_tokens: List[int]
    accepted_lengths: List[List[int]]  # tokens committed per round, bonus included
    draft_lengths: List[List[int]]  # drafts proposed per round
    position_attempts: List[List[int]]  # [row][i]: rounds in which draft i+1 was proposed
    position_accepts: List[List[int]]  # [row][i]: rounds in which draft i+1 was accepted
    draft_time_s: float = 0.0
    verify_time_s: float = 0.0
    prefill_time_s: float = 0.0
    wall_time_s: float = 0.0

    @property
    def mat(self) -> List[float]:
        """Mean accepted tokens per round (bonus token included), per row."""
        return [sum(a) / len(a) if a else 0.0 for a in self.accepted_lengths]

    @property
    def mean_draft_length(self) -> List[float]:
        return [sum(d) / len(d) if d else 0.0 for d in self.draft_lengths]

    def acceptance_by_position(self) -> List[Optional[float]]:
        """Over all rows: P(draft i accepted | draft i proposed), for i = 1..gamma (None: never proposed)."""
        width = max((len(a) for a in self.position_attempts), default=0)
        out = []
        for i in range(width):
            tried = sum(a[i] for a in self.position_attempts)
            ok = sum(a[i] for a in self.position_accepts)
            out.append(ok / tried if tried else None)
        return out

    def accepted_length_histogram(self) -> dict:
        hist: dict = {}
        for row in self.accepted_lengths:
            for n in row:
                hist[n] = hist.get(n, 0) + 1
        return dict(sorted(hist.items()))

    @property
    def draft_time_fraction(self) -> float:
        total = self.draft_time_s + self.verify_time_s
        return self.draft_time_s / total if total else 0.0

    def summary(self) -> dict:
        rounds = sum(self.rounds)
        tokens = sum(sum(a) for a in self.accepted_lengths)
        return {
            "rounds": rounds,
            "mat": tokens / rounds if rounds else 0.0,
            "new_tokens": sum(self.new_tokens),
            "mean_draft_length": (sum(sum(d) for d in self.draft_lengths) / rounds) if rounds else 0.0,
            "acceptance_by_position": self.acceptance_by_position(),
            "accepted_length_histogram": self.accepted_length_histogram(),
            "draft_time_fraction": self.draft_time_fraction,
            "wall_time_s": self.wall_time_s,
        }


@dataclass
class _Rows:
    """Device-side decode state of a batch."""

    out: torch.Tensor  # (B, max_new + gamma + 2) int64, generated tokens; the last column is a trash slot
    n_gen: torch.Tensor  # (B,) int64
    finished: torch.Tensor  # (B,) bool
    pos: torch.Tensor  # (B,) int64, position of t0
    t0: torch.Tensor  # (B,) int64, newest token, not yet in the cache
    e_prev: Optional[torch.Tensor] = None  # (B, D) exit state at pos - 1 (Kangaroo only)
    stats_rounds: List[int] = field(default_factory=list)


MaxNew = Union[int, torch.Tensor]  # one limit for every row, or a (B,) int64 tensor of per-row limits


def _finish_at_limit(rows: _Rows, max_new: MaxNew) -> None:
    """Rows that reached their token limit finish (the commit ops only stop at EOS; the draft cap keeps a
    round from committing past the limit)."""
    rows.finished |= rows.n_gen >= max_new


class BatchSampling:
    """One :class:`SamplingConfig` and one generator for the whole batch (what ``generate`` uses)."""

    def __init__(self, sampling: SamplingConfig, gen: Optional[torch.Generator]) -> None:
        self.sampling = sampling
        self.gen = gen

    @property
    def greedy(self) -> bool:
        return self.sampling.greedy

    def select(self, logits: torch.Tensor) -> torch.Tensor:
        """logits (B, V) -> tokens (B,)."""
        sampling = self.sampling
        if sampling.greedy:
            return logits.argmax(dim=-1)
        probs = ops.process_logits(logits, sampling.temperature, sampling.top_k, sampling.top_p)
        return torch.multinomial(probs, 1, generator=self.gen).squeeze(1)

    def draft(self, logits: torch.Tensor, active: torch.Tensor):
        """logits (B, V), active (B,) bool -> (draft (B,), confidence (B,), draft probs (B, V) or None)."""
        sampling = self.sampling
        if sampling.greedy:
            d, conf = ops.greedy_with_confidence(logits)
            return d, conf, None
        q = ops.process_logits(logits, sampling.temperature, sampling.top_k, sampling.top_p)
        d = torch.multinomial(q, 1, generator=self.gen).squeeze(1)
        return d, q.max(dim=-1).values, q

    def accept(self, chain: torch.Tensor, n_drafts: torch.Tensor, logits: torch.Tensor,
               draft_probs: List[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Sampling acceptance. chain (B, K); n_drafts (B,); logits (B, K+1, V); draft_probs K x (B, V)."""
        sampling = self.sampling
        b, k = chain.shape
        p = ops.process_logits(logits, sampling.temperature, sampling.top_k, sampling.top_p)
        q = torch.stack(draft_probs, dim=1) if draft_probs else p[:, :0]
        u = torch.rand(b, k, device=chain.device, generator=self.gen)
        return ops.accept_sampling(chain, n_drafts, p, q, u, self.gen)


class RowSampling:
    """Per-row sampling parameters and generators (the engine's batches mix requests).

    ``rows[r]`` is ``(SamplingConfig, generator)`` for row r, or None for a free slot (treated as greedy,
    consumes no randomness). A row draws random numbers only from its own generator, and only as many as
    its own drafts and tokens need, in the same order as a batch of one under :class:`BatchSampling`:
    a seeded request gets the tokens it would get alone, whatever else is in the batch (up to
    floating-point differences between batched and single-row kernels).
    """

    def __init__(self, rows: Sequence[Optional[Tuple[SamplingConfig, Optional[torch.Generator]]]]) -> None:
        self.rows = list(rows)
        self.sampled = [r for r, item in enumerate(self.rows) if item is not None and not item[0].greedy]

    @property
    def greedy(self) -> bool:
        return not self.sampled

    def _probs(self, r: int, logits: torch.Tensor) -> torch.Tensor:
        sampling = self.rows[r][0]
        return ops.process_logits(logits, sampling.temperature, sampling.top_k, sampling.top_p)

    def select(self, logits: torch.Tensor) -> torch.Tensor:
        """logits (B, V) -> tokens (B,)."""
        tokens = logits.argmax(dim=-1)
        for r in self.sampled:
            probs = self._probs(r, logits[r:r + 1])
            tokens[r] = torch.multinomial(probs, 1, generator=self.rows[r][1])[0, 0]
        return tokens

    def draft(self, logits: torch.Tensor, active: torch.Tensor):
        """logits (B, V), active (B,) bool -> (draft (B,), confidence (B,), draft probs (B, V) or None)."""
        d, conf = ops.greedy_with_confidence(logits)
        if self.greedy:
            return d, conf, None
        q = torch.zeros(logits.shape, dtype=torch.float32, device=logits.device)
        on = active.tolist()
        for r in self.sampled:
            if not on[r]:
                continue
            q_r = self._probs(r, logits[r:r + 1])
            q[r] = q_r[0]
            d[r] = torch.multinomial(q_r, 1, generator=self.rows[r][1])[0, 0]
            conf[r] = q_r.max()
        return d, conf, q

    def accept(self, chain: torch.Tensor, n_drafts: torch.Tensor, logits: torch.Tensor,
               draft_probs: List[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Greedy rows accept greedily, sampled rows by speculative sampling with their own generator.
        chain (B, K); n_drafts (B,); logits (B, K+1, V); draft_probs K x (B, V)."""
        accepted, nxt = ops.accept_greedy(chain, n_drafts, logits.argmax(dim=-1))
        k = chain.shape[1]
        q_all = torch.stack(draft_probs, dim=1) if draft_probs else None  # (B, K, V)
        counts = n_drafts.tolist()
        for r in self.sampled:
            gen = self.rows[r][1]
            p = self._probs(r, logits[r:r + 1])  # (1, K+1, V)
            q = q_all[r:r + 1] if q_all is not None else p[:, :0]
            u = torch.zeros(1, k, device=chain.device)
            u[:, :counts[r]] = torch.rand(1, counts[r], device=chain.device, generator=gen)
            a_r, n_r = ops.accept_sampling(chain[r:r + 1], n_drafts[r:r + 1], p, q, u, gen)
            accepted[r], nxt[r] = a_r[0], n_r[0]
        return accepted, nxt


Sampler = Union[BatchSampling, RowSampling]


def _sampler(sampling: Union[SamplingConfig, Sampler], gen: Optional[torch.Generator]) -> Sampler:
    if isinstance(sampling, (BatchSampling, RowSampling)):
        return sampling
    return BatchSampling(sampling, gen)


class CacheRowsView:
    """Rows ``start..stop-1`` of a :class:`StaticKVCache` as a cache of their own (views, no copy): the
    model writes and reads row ``start + i`` when it is given batch row ``i``."""

    def __init__(self, cache: StaticKVCache, start: int, stop: int) -> None:
        if not 0 <= start < stop <= cache.max_batch:
            raise ValueError(f"rows {start}..{stop - 1} are outside the cache's {cache.max_batch} rows")
        self.k = cache.k[:, start:stop]
        self.v = cache.v[:, start:stop]
        self.lengths = cache.lengths[start:stop]

    @property
    def max_batch(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def layer(self, index: int):
        """(k, v) of one layer, each (rows, kv_heads, max_len, head_dim)."""
        return self.k[index], self.v[index]

    def set_lengths(self, lengths: torch.Tensor) -> None:
        """lengths: (rows,) int64."""
        self.lengths.copy_(lengths)


class Decoder:
    """Runs generation for a target (+ optional adapter) over caches it owns and reuses."""

    def __init__(self, target: Transformer, adapter: Optional[Adapter] = None, exit_layer: Optional[int] = None):
        self.target = target
        self.adapter = adapter
        self.exit_layer = exit_layer
        self.cache: Optional[StaticKVCache] = None
        self.adapter_cache: Optional[StaticKVCache] = None

    def ensure_caches(self, batch: int, max_len: int, fixed_max_len: Optional[int] = None) -> None:
        """Allocate (or grow) the caches; with ``fixed_max_len`` the capacity never changes."""
        if fixed_max_len is not None:
            if max_len > fixed_max_len:
                raise ValueError(
                    f"prompt + max_new_tokens (+ gamma + 1 for drafting) needs {max_len} cache positions but "
                    f"the model's cache holds max_len={fixed_max_len}"
                )
            max_len = fixed_max_len
        window = self.target.config.sliding_window
        if window is not None and max_len > window:
            raise ValueError(
                f"sequence needs {max_len} positions but the model's sliding_window is {window}; "
                "sliding-window attention is not supported beyond the window"
            )
        c = self.cache
        if c is None or c.max_batch < batch or c.max_len < max_len:
            self.cache = None  # free the old one before allocating
            self.cache = self.target.new_cache(batch, max_len)
        if self.adapter is not None:
            a = self.adapter_cache
            if a is None or a.max_batch < batch or a.max_len < self.cache.max_len:
                self.adapter_cache = None
                self.adapter_cache = self.adapter.new_cache(self.cache.max_batch, self.cache.max_len)

    # -- token selection -------------------------------------------------------------------------
    @staticmethod
    def _commit(rows: _Rows, tokens: torch.Tensor, count: torch.Tensor, eos: Optional[torch.Tensor],
                max_new: MaxNew) -> torch.Tensor:
        """Append tokens (B, n) of which the first ``count`` (B,) are valid, stopping after an EOS.

        Returns the number of tokens actually committed per row (B,).
        """
        committed = ops.commit_tokens(rows.out, rows.n_gen, rows.finished, tokens, count, eos)
        _finish_at_limit(rows, max_new)
        return committed

    # -- prefill -----------------------------------------------------------------------------------
    def prefill_logits(self, ids: torch.Tensor, lengths: torch.Tensor, cache=None, adapter_cache=None):
        """ids: (B, T) right-padded prompts; lengths: (B,). Writes the prompts' KV into ``cache`` (default: the
        decoder's own; a :class:`CacheRowsView` targets chosen rows) and returns (next-token logits (B, V),
        exit state at the last prompt position (B, D) or None without an adapter)."""
        target = self.target
        cache = self.cache if cache is None else cache
        adapter_cache = self.adapter_cache if adapter_cache is None else adapter_cache
        b, t = ids.shape
        positions = torch.arange(t, device=ids.device).expand(b, t)
        rope = target.rope(positions)
        h = target.embed(ids)
        rows_idx = torch.arange(b, device=ids.device)
        e_prev = None
        if self.adapter is not None:
            l = self.exit_layer
            exit_states = target.forward_layers(h, positions, 0, l, cache, kv_len=t, rope=rope)
            self.adapter(exit_states, positions, *rope, adapter_cache, kv_len=t)
            h = target.forward_layers(exit_states, positions, l, target.num_layers, cache, kv_len=t, rope=rope)
            e_prev = exit_states[rows_idx, lengths - 1]
        else:
            h = target.forward_layers(h, positions, 0, target.num_layers, cache, kv_len=t, rope=rope)
        return target.head(h[rows_idx, lengths - 1]), e_prev

    def prefill(self, ids: torch.Tensor, lengths: torch.Tensor, sampling: Union[SamplingConfig, Sampler],
                max_new: int, gamma: int, eos: Optional[torch.Tensor], gen: Optional[torch.Generator]) -> _Rows:
        """ids: (B, T) right-padded prompts; lengths: (B,). Fills the caches, picks the first token."""
        b = ids.shape[0]
        logits, e_prev = self.prefill_logits(ids, lengths)  # (B, V)
        first = _sampler(sampling, gen).select(logits)
        rows = _Rows(
            out=torch.zeros(b, max_new + gamma + 2, dtype=torch.long, device=ids.device),
            n_gen=torch.zeros(b, dtype=torch.long, device=ids.device),
            finished=torch.zeros(b, dtype=torch.bool, device=ids.device),
            pos=lengths.clone(),
            t0=first,
            e_prev=e_prev,
        )
        self._commit(rows, first[:, None], torch.ones_like(lengths), eos, max_new)
        self.cache.set_lengths(lengths)
        return rows

    # -- plain decoding ----------------------------------------------------------------------------
    def ar_step(self, rows: _Rows, sampling: Union[SamplingConfig, Sampler], max_new: MaxNew,
                eos: Optional[torch.Tensor], gen: Optional[torch.Generator]) -> torch.Tensor:
        """One plain decoding step for every unfinished row; max_new: int or (B,) int64 per-row limits."""
        kv_len = int(rows.pos.max()) + 1
        logits = self.target(rows.t0[:, None], rows.pos[:, None], self.cache, kv_len=kv_len)[:, -1]
        tok = _sampler(sampling, gen).select(logits)
        active = ~rows.finished
        committed = self._commit(rows, tok[:, None], torch.ones_like(rows.pos), eos, max_new)
        rows.pos += active.long()
        rows.t0 = tok
        self.cache.set_lengths(rows.pos)
        return committed

    # -- Kangaroo ------------------------------------------------------------------------------------
    def kangaroo_round(self, rows: _Rows, kcfg: KangarooConfig, sampling: Union[SamplingConfig, Sampler],
                       max_new: MaxNew, eos: Optional[torch.Tensor], gen: Optional[torch.Generator],
                       stats: DecodeStats, timed: bool) -> torch.Tensor:
        """One draft-verify-accept round; max_new: int or (B,) int64 per-row limits. Returns committed (B,)."""
        target, adapter, l = self.target, self.adapter, self.exit_layer
        sampler = _sampler(sampling, gen)
        dev = rows.pos.device
        b = rows.pos.shape[0]
        gamma, eta = kcfg.gamma, float(kcfg.eta)
        cap = (max_new - rows.n_gen - 1).clamp(min=0, max=gamma)
        cap = torch.where(rows.finished, torch.zeros_like(cap), cap)
        active = cap > 0
        pos0 = rows.pos
        base_len = int(pos0.max()) + 1
        drafts = torch.full((b, max(gamma, 1)), -1, dtype=torch.long, device=dev)
        n_drafts = torch.zeros(b, dtype=torch.long, device=dev)
        draft_probs: List[torch.Tensor] = []
        exits: List[torch.Tensor] = []
        conf = None
        x = rows.t0
        t_start = time.perf_counter()
        s = 0
        while True:
            pos_s = (pos0 + s)[:, None]  # (B, 1)
            rope_s = target.rope(pos_s)
            e_s = target.forward_layers(target.embed(x[:, None]), pos_s, 0, l, self.cache,
                                        kv_len=base_len + s, rope=rope_s)  # (B, 1, D)
            exits.append(e_s)
            if s == gamma:
                break
            if s > 0:
                active = active & (conf >= eta)
            active = active & (s < cap)
            if not bool(active.any()):
                break
            if s == 0:  # two-position catch-up: the exit state at pos - 1 and the new one
                a_in = torch.cat([rows.e_prev[:, None], e_s], dim=1)
                a_pos = torch.stack([pos0 - 1, pos0], dim=1)
                a_rope = target.rope(a_pos)
            else:
                a_in, a_pos, a_rope = e_s, pos_s, rope_s
            y = adapter(a_in, a_pos, *a_rope, self.adapter_cache, kv_len=base_len + s)[:, -1]
            logits = target.lm_head(y)  # (B, V)
            d, conf, q = sampler.draft(logits, active)
            if q is not None:
                draft_probs.append(q)
            drafts[:, s] = torch.where(active, d, torch.full_like(d, -1))
            n_drafts += active.long()
            x = d
            s += 1
        k = len(exits) - 1
        if timed and dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t_mid = time.perf_counter()

        stacked = torch.cat(exits, dim=1)  # (B, K+1, D)
        vpos = pos0[:, None] + torch.arange(k + 1, device=dev)[None, :]
        h = target.forward_layers(stacked, vpos, l, target.num_layers, self.cache, kv_len=base_len + k)
        logits = target.head(h)  # (B, K+1, V)
        chain = drafts[:, :k]
        was_active = ~rows.finished
        if sampler.greedy:
            # Accept, commit up to EOS and advance pos, in place and on the device.
            accepted, nxt, committed = ops.accept_greedy_commit(chain, n_drafts, logits.argmax(dim=-1), rows.out,
                                                                rows.n_gen, rows.finished, rows.pos, eos)
            _finish_at_limit(rows, max_new)
        else:
            accepted, nxt = sampler.accept(chain, n_drafts, logits, draft_probs)
            run = torch.cat([chain, torch.zeros_like(nxt)[:, None]], dim=1)  # (B, K+1)
            run.scatter_(1, accepted[:, None], nxt[:, None])
            committed = self._commit(rows, run, accepted + 1, eos, max_new)
            rows.pos += torch.where(was_active, accepted + 1, torch.zeros_like(accepted))
        rows_idx = torch.arange(b, device=dev)
        rows.e_prev = stacked[rows_idx, accepted]
        rows.t0 = nxt
        self.cache.set_lengths(rows.pos)
        self.adapter_cache.set_lengths(rows.pos)
        if timed and dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t_end = time.perf_counter()
        stats.draft_time_s += t_mid - t_start
        stats.verify_time_s += t_end - t_mid
        self._record(stats, was_active, committed, n_drafts, accepted, gamma)
        return committed

    @staticmethod
    def _record(stats: DecodeStats, was_active: torch.Tensor, committed: torch.Tensor, n_drafts: torch.Tensor,
                accepted: torch.Tensor, gamma: int) -> None:
        act = was_active.tolist()
        com, nd, acc = committed.tolist(), n_drafts.tolist(), accepted.tolist()
        for r, on in enumerate(act):
            if not on:
                continue
            stats.rounds[r] += 1
            stats.accepted_lengths[r].append(com[r])
            stats.draft_lengths[r].append(nd[r])
            for i in range(nd[r]):
                stats.position_attempts[r][i] += 1
                stats.position_accepts[r][i] += int(i < acc[r])

    # -- the whole call ----------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, ids: torch.Tensor, lengths: torch.Tensor, max_new: int, sampling: SamplingConfig,
               kcfg: Optional[KangarooConfig], eos: Optional[torch.Tensor], gen: Optional[torch.Generator],
               on_tokens: Optional[Callable[[torch.Tensor, torch.Tensor], None]] = None,
               timed: bool = True):
        """Generate up to ``max_new`` tokens per row. Returns (out (B, max_new), n_gen (B,), stats).

        on_tokens(out, n_gen) is called after every commit (streaming).
        """
        use_kangaroo = kcfg is not None and kcfg.gamma > 0 and self.adapter is not None
        gamma = kcfg.gamma if use_kangaroo else 0
        b = ids.shape[0]
        stats = DecodeStats(rounds=[0] * b, new_tokens=[0] * b, accepted_lengths=[[] for _ in range(b)],
                            draft_lengths=[[] for _ in range(b)],
                            position_attempts=[[0] * gamma for _ in range(b)],
                            position_accepts=[[0] * gamma for _ in range(b)])
        t0 = time.perf_counter()
        rows = self.prefill(ids, lengths, sampling, max_new, gamma, eos, gen)
        stats.prefill_time_s = time.perf_counter() - t0
        if on_tokens is not None:
            on_tokens(rows.out, rows.n_gen)
        while not bool(rows.finished.all()):
            if use_kangaroo:
                self.kangaroo_round(rows, kcfg, sampling, max_new, eos, gen, stats, timed)
            else:
                self.ar_step(rows, sampling, max_new, eos, gen)
            if on_tokens is not None:
                on_tokens(rows.out, rows.n_gen)
        if timed and ids.device.type == "cuda":
            torch.cuda.synchronize(ids.device)
        stats.wall_time_s = time.perf_counter() - t0
        stats.new_tokens = rows.n_gen.tolist()
        return rows.out[:, :max_new], rows.n_gen, stats
