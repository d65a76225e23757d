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
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional

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
    def _select(logits: torch.Tensor, sampling: SamplingConfig, gen: Optional[torch.Generator]) -> torch.Tensor:
        """logits (B, V) -> tokens (B,)."""
        if sampling.greedy:
            return logits.argmax(dim=-1)
        probs = ops.process_logits(logits, sampling.temperature, sampling.top_k, sampling.top_p)
        return torch.multinomial(probs, 1, generator=gen).squeeze(1)

    @staticmethod
    def _commit(rows: _Rows, tokens: torch.Tensor, count: torch.Tensor, eos: Optional[torch.Tensor],
                max_new: int) -> torch.Tensor:
        """Append tokens (B, n) of which the first ``count`` (B,) are valid, stopping after an EOS.

        Returns the number of tokens actually committed per row (B,).
        """
        return ops.commit_tokens(rows.out, rows.n_gen, rows.finished, tokens, count, eos, max_new)

    # -- prefill -----------------------------------------------------------------------------------
    def prefill(self, ids: torch.Tensor, lengths: torch.Tensor, sampling: SamplingConfig, max_new: int,
                gamma: int, eos: Optional[torch.Tensor], gen: Optional[torch.Generator]) -> _Rows:
        """ids: (B, T) right-padded prompts; lengths: (B,). Fills the caches, picks the first token."""
        target = self.target
        b, t = ids.shape
        positions = torch.arange(t, device=ids.device).expand(b, t)
        rope = target.rope(positions)
        h = target.embed(ids)
        rows_idx = torch.arange(b, device=ids.device)
        e_prev = None
        if self.adapter is not None:
            l = self.exit_layer
            exit_states = target.forward_layers(h, positions, 0, l, self.cache, kv_len=t, rope=rope)
            self.adapter(exit_states, positions, *rope, self.adapter_cache, kv_len=t)
            h = target.forward_layers(exit_states, positions, l, target.num_layers, self.cache, kv_len=t, rope=rope)
            e_prev = exit_states[rows_idx, lengths - 1]
        else:
            h = target.forward_layers(h, positions, 0, target.num_layers, self.cache, kv_len=t, rope=rope)
        logits = target.head(h[rows_idx, lengths - 1])  # (B, V)
        first = self._select(logits, sampling, gen)
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
    def ar_step(self, rows: _Rows, sampling: SamplingConfig, max_new: int, eos: Optional[torch.Tensor],
                gen: Optional[torch.Generator]) -> torch.Tensor:
        kv_len = int(rows.pos.max()) + 1
        logits = self.target(rows.t0[:, None], rows.pos[:, None], self.cache, kv_len=kv_len)[:, -1]
        tok = self._select(logits, sampling, gen)
        active = ~rows.finished
        committed = self._commit(rows, tok[:, None], torch.ones_like(rows.pos), eos, max_new)
        rows.pos += active.long()
        rows.t0 = tok
        self.cache.set_lengths(rows.pos)
        return committed

    # -- Kangaroo ------------------------------------------------------------------------------------
    def kangaroo_round(self, rows: _Rows, kcfg: KangarooConfig, sampling: SamplingConfig, max_new: int,
                       eos: Optional[torch.Tensor], gen: Optional[torch.Generator], stats: DecodeStats,
                       timed: bool) -> torch.Tensor:
        target, adapter, l = self.target, self.adapter, self.exit_layer
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
            if sampling.greedy:
                d, conf = ops.greedy_with_confidence(logits)
            else:
                q = ops.process_logits(logits, sampling.temperature, sampling.top_k, sampling.top_p)
                d = torch.multinomial(q, 1, generator=gen).squeeze(1)
                conf = q.max(dim=-1).values
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
        if sampling.greedy:
            # Accept, commit up to EOS and advance pos, in place and on the device.
            accepted, nxt, committed = ops.accept_greedy_commit(chain, n_drafts, logits.argmax(dim=-1), rows.out,
                                                                rows.n_gen, rows.finished, rows.pos, eos, max_new)
        else:
            p = ops.process_logits(logits, sampling.temperature, sampling.top_k, sampling.top_p)
            q = torch.stack(draft_probs, dim=1) if draft_probs else p[:, :0]
            u = torch.rand(b, k, device=dev, generator=gen)
            accepted, nxt = ops.accept_sampling(chain, n_drafts, p, q, u, gen)
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
