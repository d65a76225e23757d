"""The decoding core: prefill, plain autoregressive steps, and Kangaroo rounds, batched and ragged.

A batch's state is a :class:`DecodeState` of device tensors. A Kangaroo round is written once, as the steps of
:class:`Decoder`: :meth:`~Decoder.begin_round` (each row's draft cap), per step :meth:`~Decoder.shallow_step`
(layers ``0..l-1``), :meth:`DraftChain.keep_drafting` (``eta`` and the cap) and :meth:`~Decoder.draft_step`
(adapter, then :meth:`~Decoder.propose`: head and token choice), then :meth:`~Decoder.verify` (layers
``l..N-1``, accept, commit up to EOS and the limits, rollback by moving ``pos``) and
:meth:`DecodeStats.add_round`. The eager loop (:meth:`Decoder.kangaroo_round`) stops drafting when no row
drafts and attends over the live length; :mod:`kangaroo_rt.graphs` runs the same steps at fixed shapes.

Token choice goes through a sampler: :class:`BatchSampling` (one config and generator for the batch) or
:class:`RowSampling` (per-row configs and generators, for batches that mix requests). See docs/design.md.
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from . import _cpu_ext, ops
from .adapter import Adapter
from .cache import StaticKVCache
from .config import KangarooConfig, SamplingConfig
from .draft_vocab import DraftHead
from .model import Transformer, steady


@dataclass
class DecodeStats:
    """Per-row statistics of decoding (lists have one entry per row). ``history=False`` keeps the totals only
    (``accepted_lengths`` and ``draft_lengths`` stay empty): what a long-running engine needs."""

    rounds: List[int]
    new_tokens: List[int]
    committed: List[int]  # tokens committed in rounds, bonus included
    drafted: List[int]  # drafts proposed
    accepted_lengths: List[List[int]]  # per round: tokens committed, bonus included
    draft_lengths: List[List[int]]  # per round: drafts proposed
    position_attempts: List[List[int]]  # [row][i]: rounds in which draft i+1 was proposed
    position_accepts: List[List[int]]  # [row][i]: rounds in which draft i+1 was accepted
    histogram: Counter = field(default_factory=Counter)  # tokens committed in a round -> rounds (all rows)
    history: bool = True
    draft_time_s: float = 0.0
    verify_time_s: float = 0.0
    prefill_time_s: float = 0.0
    wall_time_s: float = 0.0
    # tokens a verify pass ran over (k + 1, the batch's widest) -> [passes, seconds], where the rounds are timed
    verify_by_tokens: Dict[int, List[float]] = field(default_factory=dict)

    @classmethod
    def empty(cls, batch: int, gamma: int, history: bool = True) -> "DecodeStats":
        rows = range(batch)
        return cls(rounds=[0] * batch, new_tokens=[0] * batch, committed=[0] * batch, drafted=[0] * batch,
                   accepted_lengths=[[] for _ in rows], draft_lengths=[[] for _ in rows],
                   position_attempts=[[0] * gamma for _ in rows], position_accepts=[[0] * gamma for _ in rows],
                   history=history)

    def add_round(self, active: Sequence[int], committed: Sequence[int], n_drafts: Sequence[int],
                  accepted: Sequence[int]) -> None:
        """Count one round: per row whether it took part, tokens committed, drafts proposed, drafts accepted."""
        for r in (r for r, on in enumerate(active) if on):
            self.rounds[r] += 1
            self.committed[r] += committed[r]
            self.drafted[r] += n_drafts[r]
            self.histogram[committed[r]] += 1
            if self.history:
                self.accepted_lengths[r].append(committed[r])
                self.draft_lengths[r].append(n_drafts[r])
            for i in range(n_drafts[r]):
                self.position_attempts[r][i] += 1
                self.position_accepts[r][i] += int(i < accepted[r])

    def add_verify(self, tokens: int, seconds: float) -> None:
        """Count one verify pass over ``tokens`` positions that took ``seconds``."""
        entry = self.verify_by_tokens.setdefault(tokens, [0, 0.0])
        entry[0] += 1
        entry[1] += seconds

    @property
    def mat(self) -> List[float]:
        """Mean accepted tokens per round (bonus token included), per row."""
        return [c / n if n else 0.0 for c, n in zip(self.committed, self.rounds)]

    @property
    def mean_draft_length(self) -> List[float]:
        return [d / n if n else 0.0 for d, n in zip(self.drafted, self.rounds)]

    def acceptance_by_position(self) -> List[Optional[float]]:
        """Over all rows: P(draft i accepted | draft i proposed), for i = 1..gamma (None: never proposed)."""
        tried, ok = ([sum(column) for column in zip(*rows)] for rows in (self.position_attempts, self.position_accepts))
        return [a / t if t else None for a, t in zip(ok, tried)]

    def accepted_length_histogram(self) -> dict:
        return dict(sorted(self.histogram.items()))

    @property
    def draft_time_fraction(self) -> float:
        total = self.draft_time_s + self.verify_time_s
        return self.draft_time_s / total if total else 0.0

    def summary(self) -> dict:
        rounds = sum(self.rounds)
        return {
            "rounds": rounds,
            "mat": sum(self.committed) / rounds if rounds else 0.0,
            "new_tokens": sum(self.new_tokens),
            "mean_draft_length": sum(self.drafted) / rounds if rounds else 0.0,
            "acceptance_by_position": self.acceptance_by_position(),
            "accepted_length_histogram": self.accepted_length_histogram(),
            "draft_time_fraction": self.draft_time_fraction,
            "wall_time_s": self.wall_time_s,
        }


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """logits (..., V) -> (...,) int64: ``logits.argmax(dim=-1)``, the first maximal index (:func:`ops.argmax`: on
    CPU the extension's one pass per row, else torch's, 16-bit CPU logits widened first)."""
    return ops.argmax(logits)


def _probs(sampling: SamplingConfig, logits: torch.Tensor) -> torch.Tensor:
    """logits (..., V) -> probabilities after temperature, top-k and top-p (fp32)."""
    return ops.process_logits(logits, sampling.temperature, sampling.top_k, sampling.top_p)


def _uniforms(shape: Tuple[int, ...], gen: Optional[torch.Generator], device: torch.device) -> torch.Tensor:
    """float64 uniforms in [0, 1) of ``shape`` from ``gen`` (drawn on its device: a CUDA generator cannot fill a CPU
    tensor; the default CPU one without it), on ``device``."""
    on = gen.device if gen is not None else torch.device("cpu")
    return torch.rand(shape, dtype=torch.float64, generator=gen, device=on).to(device)


class BatchSampling:
    """One :class:`SamplingConfig` and one generator for the whole batch (what ``generate`` uses)."""

    def __init__(self, sampling: SamplingConfig, gen: Optional[torch.Generator]) -> None:
        self.sampling = sampling
        self.gen = gen
        self.round_u: Optional[torch.Tensor] = None  # (B, gamma) float64: this round's draft uniforms

    @property
    def greedy(self) -> bool:
        return self.sampling.greedy

    def begin_round(self, batch: int, gamma: int, device: torch.device) -> None:
        """Draw the round's draft uniforms (B, gamma), one a row and step, before any draft: the step-by-step
        path and the one-call chain then take the same random numbers (rows that stop early leave theirs)."""
        if not self.greedy:
            self.round_u = _uniforms((batch, gamma), self.gen, device)

    def select(self, logits: torch.Tensor) -> torch.Tensor:
        """logits (B, V) -> tokens (B,)."""
        if self.greedy:
            return greedy_tokens(logits)
        return ops.sample(_probs(self.sampling, logits), self.gen)

    def draft(self, logits: torch.Tensor, active: torch.Tensor, step: Union[int, torch.Tensor] = 0):
        """logits (B, V), active (B,) bool, the draft step -> (draft (B,), confidence (B,), draft probs (B, V) or
        None); a sampled draft takes the round's uniform of its step (:meth:`begin_round`)."""
        if self.greedy:
            return (*ops.greedy_with_confidence(logits), None)
        q = _probs(self.sampling, logits)
        return ops.sample(q, self.gen, self.round_u[:, step].reshape(-1)), q.max(dim=-1).values, q

    def row_settings(self, batch: int, vocab: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each row's (temperature (B,) float64, 0 for greedy; top_k (B,) int64, 0 for none; top_p (B,) float64, 1
        for none) over ``vocab`` logits, as the one-call CPU paths take them."""
        return _settings([None if self.greedy else self.sampling] * batch, vocab)

    def pass_uniforms(self, batch: int, n_drafts: Optional[torch.Tensor],
                      k: int) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The uniforms a pass's choice takes, drawn as :meth:`accept` (a verification of ``k`` drafts, n_drafts
        (B,)) or :meth:`select` (n_drafts None) draws them: (next tokens' (B,) float64, acceptance's (B, k) fp32 or
        None)."""
        u_accept = None if n_drafts is None else torch.rand(batch, k, dtype=torch.float32, generator=self.gen)
        return torch.rand(batch, dtype=torch.float64, generator=self.gen), u_accept

    def accept(self, chain: torch.Tensor, n_drafts: torch.Tensor, logits: torch.Tensor,
               draft_probs: List[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Sampling acceptance. chain (B, K); n_drafts (B,); logits (B, K+1, V); draft_probs K x (B, V)."""
        p = _probs(self.sampling, logits)
        q = torch.stack(draft_probs, dim=1) if draft_probs else p[:, :0]
        u = torch.rand(chain.shape, dtype=torch.float32, device=chain.device, generator=self.gen)
        return ops.accept_sampling(chain, n_drafts, p, q, u, self.gen)


class RowSampling:
    """Per-row sampling parameters and generators (the engine's batches mix requests).

    ``rows[r]`` is ``(SamplingConfig, generator)`` for row r, or None for a free slot (treated as greedy,
    consumes no randomness). A row draws random numbers only from its own generator (gamma draft uniforms a round,
    then what its acceptance and tokens need), in the same order as a batch of one under :class:`BatchSampling`:
    a seeded request gets the tokens it would get alone, whatever else is in the batch (up to
    floating-point differences between batched and single-row kernels).
    """

    def __init__(self, rows: Sequence[Optional[Tuple[SamplingConfig, Optional[torch.Generator]]]]) -> None:
        self.rows = list(rows)
        self.sampled = [r for r, item in enumerate(self.rows) if item is not None and not item[0].greedy]
        self.round_u: Optional[torch.Tensor] = None

    @property
    def greedy(self) -> bool:
        return not self.sampled

    def begin_round(self, batch: int, gamma: int, device: torch.device) -> None:
        """Each sampled row draws its round's gamma draft uniforms from its own generator (as
        :meth:`BatchSampling.begin_round` does for a batch of one)."""
        if self.greedy:
            return
        self.round_u = torch.zeros(batch, gamma, dtype=torch.float64, device=device)
        for r in self.sampled:
            self.round_u[r] = _uniforms((gamma,), self.rows[r][1], device)

    def select(self, logits: torch.Tensor) -> torch.Tensor:
        """logits (B, V) -> tokens (B,)."""
        tokens = greedy_tokens(logits)
        for r in self.sampled:
            sampling, gen = self.rows[r]
            tokens[r] = ops.sample(_probs(sampling, logits[r:r + 1]), gen)[0]
        return tokens

    def draft(self, logits: torch.Tensor, active: torch.Tensor, step: Union[int, torch.Tensor] = 0):
        """logits (B, V), active (B,) bool, the draft step -> (draft (B,), confidence (B,), draft probs (B, V) or
        None)."""
        token, conf = ops.greedy_with_confidence(logits)
        if self.greedy:
            return token, conf, None
        q = torch.zeros(logits.shape, dtype=torch.float32, device=logits.device)
        for r in self.sampled:  # (rows that stopped drafting too, as BatchSampling and the one-call chain do)
            sampling, gen = self.rows[r]
            q[r] = _probs(sampling, logits[r:r + 1])[0]
            token[r] = ops.sample(q[r:r + 1], gen, self.round_u[r, step].reshape(1))[0]
            conf[r] = q[r].max()
        return token, conf, q

    def row_settings(self, batch: int, vocab: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """As :meth:`BatchSampling.row_settings`, each row's own (free slots and greedy rows: greedy)."""
        return _settings([self.rows[r][0] if r in self.sampled else None for r in range(batch)], vocab)

    def pass_uniforms(self, batch: int, n_drafts: Optional[torch.Tensor],
                      k: int) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """As :meth:`BatchSampling.pass_uniforms`, drawn as :meth:`accept` / :meth:`select` draw them: each sampled
        row from its own generator, its acceptance's n_drafts[r] uniforms, then its next token's (zeros
        elsewhere)."""
        u_next = torch.zeros(batch, dtype=torch.float64)
        u_accept = None if n_drafts is None else torch.zeros(batch, k, dtype=torch.float32)
        counts = None if n_drafts is None else n_drafts.tolist()
        for r in self.sampled:
            gen = self.rows[r][1]
            if counts is not None:
                u_accept[r, :counts[r]] = torch.rand(1, counts[r], dtype=torch.float32, generator=gen)
            u_next[r] = torch.rand(1, dtype=torch.float64, generator=gen)[0]
        return u_next, u_accept

    def accept(self, chain: torch.Tensor, n_drafts: torch.Tensor, logits: torch.Tensor,
               draft_probs: List[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Greedy rows accept greedily, sampled rows by speculative sampling with their own generator.
        chain (B, K); n_drafts (B,); logits (B, K+1, V); draft_probs K x (B, V)."""
        accepted, nxt = ops.accept_greedy(chain, n_drafts, greedy_tokens(logits))
        q_all = torch.stack(draft_probs, dim=1) if draft_probs else None  # (B, K, V)
        counts = n_drafts.tolist()
        for r in self.sampled:
            sampling, gen = self.rows[r]
            p = _probs(sampling, logits[r:r + 1])  # (1, K+1, V)
            q = q_all[r:r + 1] if q_all is not None else p[:, :0]
            u = torch.zeros(1, chain.shape[1], device=chain.device)
            u[:, :counts[r]] = torch.rand(1, counts[r], dtype=torch.float32, device=chain.device, generator=gen)
            a_r, n_r = ops.accept_sampling(chain[r:r + 1], n_drafts[r:r + 1], p, q, u, gen)
            accepted[r], nxt[r] = a_r[0], n_r[0]
        return accepted, nxt


Sampler = Union[BatchSampling, RowSampling]


def _settings(rows: Sequence[Optional[SamplingConfig]], vocab: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(temperature, top_k, top_p) (B,) tensors of per-row configs (None or greedy: temperature 0), the filters as
    the kernels take them over ``vocab`` logits (:func:`_cpu_ext.filter_args`)."""
    temperature = [0.0 if s is None or s.greedy else float(s.temperature) for s in rows]
    filters = [(0, 1.0) if s is None or s.greedy else _cpu_ext.filter_args(vocab, s.top_k, s.top_p) for s in rows]
    return (torch.tensor(temperature, dtype=torch.float64), torch.tensor([k for k, _ in filters], dtype=torch.long),
            torch.tensor([p for _, p in filters], dtype=torch.float64))


@dataclass
class DecodeState:
    """The device-side state of a batch being decoded, one row per sequence (rows are updated in place, so a
    :meth:`rows` view of an engine's slots is decoded directly).

    ``out`` (B, W) int64 holds the tokens generated so far (its last column is a trash slot for masked
    writes); ``n_gen`` (B,) counts them; ``finished`` (B,) bool; ``pos`` (B,) int64 is the position of
    ``token`` (B,), the newest token, which is not in the cache yet; ``max_new`` (B,) int64 is each row's
    token limit; ``eos`` (E,) int64 the EOS ids (or None); ``e_prev`` (B, D) the exit state at ``pos - 1``
    (Kangaroo only, else None); ``sampler`` picks tokens (:class:`BatchSampling` or :class:`RowSampling`).
    """

    out: torch.Tensor
    n_gen: torch.Tensor
    finished: torch.Tensor
    pos: torch.Tensor
    token: torch.Tensor
    max_new: torch.Tensor
    eos: Optional[torch.Tensor] = None
    e_prev: Optional[torch.Tensor] = None
    sampler: Optional["Sampler"] = None

    @classmethod
    def allocate(cls, batch: int, width: int, device: torch.device, hidden: Optional[int] = None,
                 dtype: Optional[torch.dtype] = None, eos: Optional[torch.Tensor] = None) -> "DecodeState":
        """Empty rows (see :meth:`clear`); ``e_prev`` (batch, hidden) when ``hidden`` is given."""
        i64 = dict(dtype=torch.long, device=device)
        state = cls(out=torch.empty(batch, width, **i64), n_gen=torch.empty(batch, **i64),
                    finished=torch.empty(batch, dtype=torch.bool, device=device), pos=torch.empty(batch, **i64),
                    token=torch.empty(batch, **i64), max_new=torch.empty(batch, **i64), eos=eos,
                    e_prev=None if hidden is None else torch.empty(batch, hidden, dtype=dtype, device=device))
        state.clear()
        return state

    def clear(self) -> None:
        """Make every row empty padding: finished, nothing generated, at position 1 (drafting reads ``pos - 1``)."""
        for t, value in ((self.out, 0), (self.n_gen, 0), (self.finished, True), (self.pos, 1), (self.token, 0),
                         (self.max_new, 0), (self.e_prev, 0)):
            if t is not None:
                t.fill_(value)

    @property
    def batch(self) -> int:
        return self.pos.shape[0]

    def rows(self, start: int, stop: int) -> "DecodeState":
        """Rows ``start..stop-1`` as views: what the decoder does to them reaches this state."""
        return DecodeState(out=self.out[start:stop], n_gen=self.n_gen[start:stop],
                           finished=self.finished[start:stop], pos=self.pos[start:stop],
                           token=self.token[start:stop], max_new=self.max_new[start:stop], eos=self.eos,
                           e_prev=None if self.e_prev is None else self.e_prev[start:stop], sampler=self.sampler)

    def start(self, first: torch.Tensor, lengths: torch.Tensor, max_new: int,
              e_prev: Optional[torch.Tensor] = None) -> None:
        """Start every row after its prefill: prompt lengths (B,) are the positions of the first tokens (B,),
        which are committed; ``e_prev`` (B, D) is the exit state at the last prompt position."""
        self.n_gen.zero_()
        self.finished.zero_()
        self.pos.copy_(lengths)
        self.token.copy_(first)
        self.max_new.fill_(max_new)
        if e_prev is not None:
            self.e_prev.copy_(e_prev)
        self.commit(first[:, None], torch.ones_like(lengths))

    def finish_at_limit(self) -> None:
        """Rows that reached their token limit finish (the commit ops stop at EOS only)."""
        self.finished |= self.n_gen >= self.max_new

    def commit(self, tokens: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        """Append tokens (B, n), the first ``count`` (B,) of each row valid, stopping after an EOS and at the
        row's limit. Returns the tokens committed per row (B,)."""
        committed = ops.commit_tokens(self.out, self.n_gen, self.finished, tokens, count, self.eos)
        self.finish_at_limit()
        return committed


@dataclass
class DraftChain:
    """One round's draft chain, at fixed shapes (the graph rounds keep one per bucket and reuse it).

    ``cap`` (B,) drafts allowed this round; ``active`` (B,) bool rows still drafting; ``conf`` (B,) fp32
    confidence of the newest draft; ``x`` (B,) the token the next step embeds; ``drafts`` (B, gamma) int64,
    -1 past ``n_drafts`` (B,); ``exits`` (B, gamma + 1, D) the exit states to verify; ``probs``: the draft
    distributions (B, V) per step under sampling (empty under greedy), or (B, K) over the token ids
    ``probs_ids`` (K,) (a draft vocabulary's, zero elsewhere) where the one-call chain left them so.
    """

    cap: torch.Tensor
    active: torch.Tensor
    conf: torch.Tensor
    x: torch.Tensor
    drafts: torch.Tensor
    n_drafts: torch.Tensor
    exits: torch.Tensor
    probs: List[torch.Tensor] = field(default_factory=list)
    probs_ids: Optional[torch.Tensor] = None
    probs_vocab: int = 0  # the vocabulary size ``probs_ids`` index into

    def full_probs(self) -> List[torch.Tensor]:
        """``probs`` over the whole vocabulary (B, V) each: zero outside ``probs_ids`` where those are set."""
        if self.probs_ids is None:
            return self.probs
        return [torch.zeros(q.shape[0], self.probs_vocab, dtype=q.dtype, device=q.device).index_copy_(
            1, self.probs_ids, q) for q in self.probs]

    def set_probs(self, probs: List[torch.Tensor], ids: Optional[torch.Tensor] = None, vocab: int = 0) -> None:
        """The round's draft distributions: (B, V) each, or (B, K) over the token ids ``ids`` of a ``vocab``."""
        self.probs[:] = probs
        self.probs_ids, self.probs_vocab = ids, vocab

    @classmethod
    def allocate(cls, batch: int, gamma: int, hidden: int, dtype: torch.dtype, device: torch.device) -> "DraftChain":
        i64 = dict(dtype=torch.long, device=device)
        return cls(cap=torch.zeros(batch, **i64), active=torch.zeros(batch, dtype=torch.bool, device=device),
                   conf=torch.zeros(batch, dtype=torch.float32, device=device), x=torch.zeros(batch, **i64),
                   drafts=torch.full((batch, gamma), -1, **i64), n_drafts=torch.zeros(batch, **i64),
                   exits=torch.zeros(batch, gamma + 1, hidden, dtype=dtype, device=device))

    def keep_drafting(self, step: Union[int, torch.Tensor], eta: Union[float, torch.Tensor]) -> None:
        """Before draft step ``step`` >= 1: rows whose last draft's confidence fell below ``eta``, or that
        reached their cap, stop."""
        self.active &= (self.conf >= eta) & (step < self.cap)


def _put(buffer: torch.Tensor, step: Union[int, torch.Tensor], value: torch.Tensor) -> None:
    """buffer[:, step] = value; ``step`` an int or a (1,) device tensor (no host read)."""
    if isinstance(step, int):
        buffer[:, step] = value
    else:
        buffer.index_copy_(1, step, value[:, None])


class Decoder:
    """Runs generation for a target (+ optional adapter) over caches it owns and reuses.

    ``max_len`` fixes the cache capacity (None: the caches grow to what a call needs)."""

    def __init__(self, target: Transformer, adapter: Optional[Adapter] = None, exit_layer: Optional[int] = None,
                 max_len: Optional[int] = None):
        self.target = target
        self.adapter = adapter
        self.exit_layer = exit_layer
        self.max_len = max_len
        # The adapter's draft vocabulary, if any: the head's K rows gathered once (kangaroo_rt.draft_vocab).
        ids = None if adapter is None else adapter.draft_ids
        self.draft_head = None if ids is None else DraftHead(target.lm_head.weight, ids)
        # Draft logits from the draft head's int8 form where the CPU extension serves (:meth:`_draft_q8`); False:
        # from its own weights (so does KANGAROO_RT_DRAFT_INT8=0). Either way the output is the target's.
        self.draft_int8 = True
        self.cache: Optional[StaticKVCache] = None
        self.adapter_cache: Optional[StaticKVCache] = None

    def ensure_caches(self, batch: int, needed: int, quantum: int = 1) -> None:
        """Make the caches hold at least ``batch`` rows of ``needed`` positions rounded up to ``quantum`` (or the
        fixed ``max_len``). A cache that must grow is reallocated once, never smaller than before in either
        dimension."""
        if self.max_len is not None and needed > self.max_len:
            raise ValueError(f"prompt + max_new_tokens (+ gamma + 1 for drafting) needs {needed} cache positions but "
                             f"the model's cache holds max_len={self.max_len}")
        length = self.max_len if self.max_len is not None else -(-needed // quantum) * quantum
        window = self.target.config.sliding_window
        if window is not None and length > window:
            raise ValueError(f"sequence needs {length} positions but the model's sliding_window is {window}; "
                             "sliding-window attention is not supported beyond the window")
        self._grow("cache", self.target.new_cache, batch, length)
        if self.adapter is not None:
            self._grow("adapter_cache", self.adapter.new_cache, self.cache.max_batch, self.cache.max_len)

    def _grow(self, name: str, new_cache: Callable[[int, int], StaticKVCache], batch: int, length: int) -> None:
        old = getattr(self, name)
        if old is None or old.max_batch < batch or old.max_len < length:
            if old is not None:
                batch, length = max(batch, old.max_batch), max(length, old.max_len)
            setattr(self, name, None)  # free the old one before allocating
            del old
            setattr(self, name, new_cache(batch, length))

    # -- prefill -----------------------------------------------------------------------------------
    def prefill(self, ids: torch.Tensor, lengths: torch.Tensor, state: DecodeState, max_new: int,
                first_row: int = 0) -> None:
        """ids: (B, T) right-padded prompts; lengths: (B,). Writes the prompts' KV into cache rows ``first_row``
        onwards (the others are untouched: the engine prefills a request while others are mid-generation), then
        starts ``state``'s rows: the first token, picked by ``state.sampler``, is committed."""
        target, (b, t) = self.target, ids.shape
        cache = self.cache.rows(first_row, first_row + b)
        adapter_cache = None if self.adapter_cache is None else self.adapter_cache.rows(first_row, first_row + b)
        positions = torch.arange(t, device=ids.device).expand(b, t)
        rope = target.rope(positions)
        h = target.embed(ids)
        last = (torch.arange(b, device=ids.device), lengths - 1)
        e_prev = None
        if self.adapter is not None:
            l = self.exit_layer
            exit_states = target.forward_layers(h, positions, 0, l, cache, kv_len=t, rope=rope)
            self.adapter(exit_states, positions, *rope, adapter_cache, kv_len=t)
            h = target.forward_layers(exit_states, positions, l, target.num_layers, cache, kv_len=t, rope=rope)
            e_prev = exit_states[last]
        else:
            h = target.forward_layers(h, positions, 0, target.num_layers, cache, kv_len=t, rope=rope)
        state.start(state.sampler.select(target.head(h[last])), lengths, max_new, e_prev)

    # -- plain decoding ----------------------------------------------------------------------------
    def ar_step(self, state: DecodeState) -> torch.Tensor:
        """One plain decoding step for every unfinished row. Returns the tokens committed per row (B,)."""
        kv_len = int(state.pos.max()) + 1
        fused = self._cpu_pass(state, None, 0, kv_len)
        if fused is not None:
            return fused[1]
        logits = self.target(state.token[:, None], state.pos[:, None], self.cache, kv_len=kv_len)[:, -1]
        token = state.sampler.select(logits)
        active = ~state.finished
        committed = state.commit(token[:, None], torch.ones_like(state.pos))
        state.pos += active.long()
        state.token.copy_(token)
        return committed

    # -- one Kangaroo round, step by step (the graph rounds call the same steps) ----------------------
    def begin_round(self, state: DecodeState, chain: DraftChain) -> None:
        """Each row's draft cap: ``gamma``, or what is left of its limit after the round's bonus token."""
        gamma = chain.drafts.shape[1]
        cap = (state.max_new - state.n_gen - 1).clamp(min=0, max=gamma)
        chain.cap.copy_(torch.where(state.finished, torch.zeros_like(cap), cap))
        chain.active.copy_(chain.cap > 0)
        chain.drafts.fill_(-1)
        chain.n_drafts.zero_()
        chain.x.copy_(state.token)
        chain.set_probs([])

    def shallow_step(self, state: DecodeState, chain: DraftChain, step: Union[int, torch.Tensor], kv_len: int):
        """Target layers ``0..l-1`` on ``chain.x`` at ``pos + step``: writes the shallow KV and
        ``chain.exits[:, step]``. Returns (exit state (B, 1, D), positions (B, 1), their rope)."""
        target = self.target
        pos = (state.pos + step)[:, None]
        rope = target.rope(pos)
        exit_state = target.forward_layers(target.embed(chain.x[:, None]), pos, 0, self.exit_layer, self.cache,
                                           kv_len=kv_len, rope=rope)
        _put(chain.exits, step, exit_state[:, 0])
        return exit_state, pos, rope

    def draft_step(self, state: DecodeState, chain: DraftChain, step: Union[int, torch.Tensor], kv_len: int,
                   exit_state: torch.Tensor, pos: torch.Tensor, rope) -> None:
        """The adapter on the exit state of ``step`` (step 0 also on ``e_prev`` at ``pos - 1``), then
        :meth:`propose`; rows in ``chain.active`` get the draft ``chain.drafts[:, step]``, the others -1."""
        if isinstance(step, int) and step == 0:
            hidden = self.adapter_catch_up(state, exit_state, pos, kv_len)
        else:
            hidden = self.adapter(exit_state, pos, *rope, self.adapter_cache, kv_len=kv_len)[:, -1]
        token, conf, probs = self.propose(hidden, state.sampler, chain.active, step)
        if probs is not None:
            chain.probs.append(probs)
        _put(chain.drafts, step, torch.where(chain.active, token, torch.full_like(token, -1)))
        chain.n_drafts.add_(chain.active.long())
        chain.conf.copy_(conf)
        chain.x.copy_(token)

    def adapter_catch_up(self, state: DecodeState, exit_state: torch.Tensor, pos: torch.Tensor,
                         kv_len: int) -> torch.Tensor:
        """The adapter over two positions, ``e_prev`` at ``pos - 1`` and ``exit_state`` (B, 1, D) at ``pos`` (B, 1):
        a round's first draft step, which also writes the adapter's KV of the last round's final position. Returns
        the adapter's output at ``pos`` (B, D)."""
        a_in = torch.cat([state.e_prev[:, None], exit_state], dim=1)
        pos = torch.cat([pos - 1, pos], dim=1)
        return self.adapter(a_in, pos, *self.target.rope(pos), self.adapter_cache, kv_len=kv_len)[:, -1]

    def propose(self, hidden: torch.Tensor, sampler: "Sampler", active: torch.Tensor,
                step: Union[int, torch.Tensor] = 0):
        """The draft head: the adapter's output (B, D) -> (draft token (B,), confidence (B,), draft
        distribution (B, V) or None under greedy). The one place that maps a draft state to a draft token.
        With a draft vocabulary the choice, its confidence and q are over the K subset logits; the token and
        q are mapped back to the full vocabulary (q is zero outside the subset)."""
        rows = hidden[:, None]  # (B, 1, D): one token a row, so ops.linear serves any batch as decode rows
        q8 = self._draft_q8(hidden)
        if q8 is not None:  # the head's int8 estimates, as the one-call chain reads them
            logits = _cpu_ext.screen_estimate(hidden, q8)
        elif self.draft_head is None:
            logits = ops.linear(rows, self.target.lm_head.weight, self.target.lm_head.bias)[:, 0]
        else:
            logits = self.draft_head(rows)[:, 0]
        if self.draft_head is None:
            return sampler.draft(logits, active, step)
        sub, conf, q = sampler.draft(logits, active, step)
        return self.draft_head.full_ids(sub), conf, None if q is None else self.draft_head.full_probs(q)

    def _draft_q8(self, x: torch.Tensor) -> Optional[tuple]:
        """The int8 form of the draft head (the draft vocabulary's rows, or the target's head without a bias) whose
        estimates (:func:`_cpu_ext.screen_estimate`) are the draft logits, on both drafting paths alike: where the
        CPU extension serves the linears of ``x``'s device and dtype, ``draft_int8`` is set and
        KANGAROO_RT_DRAFT_INT8 is not "0"; else None (the head's own logits). Drafts only propose: the tokens kept
        are the target's either way, and a draft head read as int8 streams half the bytes of a bf16 one
        (docs/design.md)."""
        if not self.draft_int8 or x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16):
            return None
        if ops.backends(("linear",), x.device) != ("cpu",):
            return None
        head = self.draft_head if self.draft_head is not None else self.target.lm_head
        if self.draft_head is None and (head.bias is not None or head.weight.dtype != x.dtype):
            return None
        return _cpu_ext.draft_head_q8(head)

    def verify(self, state: DecodeState, chain: DraftChain, k: int, kv_len: int):
        """Target layers ``l..N-1`` over the first ``k + 1`` exit states (the one-call pass: each row's first
        ``n_drafts + 1`` only, the positions its acceptance reads), the head, acceptance and commit (up to
        EOS and the row limits), ``pos`` advanced past the committed tokens, ``token`` and ``e_prev`` set for the
        next round. Returns (rows that were active (B,) bool, accepted drafts (B,), committed tokens (B,))."""
        was_active = ~state.finished
        fused = self._cpu_pass(state, chain, k, kv_len)
        if fused is not None:
            return was_active, *fused
        target = self.target
        exits = chain.exits[:, :k + 1]
        vpos = state.pos[:, None] + torch.arange(k + 1, device=state.pos.device)[None, :]
        h = target.forward_layers(exits, vpos, self.exit_layer, target.num_layers, self.cache, kv_len=kv_len)
        logits = target.head(h)  # (B, K+1, V)
        drafts = chain.drafts[:, :k]
        if state.sampler.greedy:  # accept, commit up to EOS and advance pos, in place and on the device
            accepted, nxt, committed = ops.accept_greedy_commit(drafts, chain.n_drafts, greedy_tokens(logits),
                                                                state.out, state.n_gen, state.finished, state.pos,
                                                                state.eos)
            state.finish_at_limit()
        else:
            accepted, nxt = state.sampler.accept(drafts, chain.n_drafts, logits, chain.full_probs())
            run = torch.cat([drafts, torch.zeros_like(nxt)[:, None]], dim=1)  # (B, K+1)
            run.scatter_(1, accepted[:, None], nxt[:, None])
            committed = state.commit(run, accepted + 1)
            state.pos += torch.where(was_active, accepted + 1, torch.zeros_like(accepted))
        state.e_prev.copy_(exits[torch.arange(state.batch, device=accepted.device), accepted])
        state.token.copy_(nxt)
        return was_active, accepted, committed

    def draft_round(self, state: DecodeState, chain: DraftChain, gamma: int, eta: float, base_len: int) -> int:
        """A round's drafting, step by step: :meth:`begin_round`, then :meth:`shallow_step`,
        :meth:`DraftChain.keep_drafting` and :meth:`draft_step` until no row drafts or ``gamma`` drafts. The exit
        states of ``chain.exits[:, :k + 1]`` are set. Returns k, the drafting steps run."""
        self.begin_round(state, chain)
        step = 0
        while True:
            exit_state, pos, rope = self.shallow_step(state, chain, step, base_len + step)
            if step == gamma:
                if gamma == 0:  # a round without drafts still takes the new exit state into the adapter's cache
                    self.adapter_catch_up(state, exit_state, pos, base_len)
                return step
            if step > 0:
                chain.keep_drafting(step, eta)
            if not bool(chain.active.any()):
                return step
            self.draft_step(state, chain, step, base_len + step, exit_state, pos, rope)
            step += 1

    def _cpu_chain(self, state: DecodeState, chain: DraftChain, gamma: int, eta: float, base_len: int) -> Optional[int]:
        """:meth:`draft_round` in one extension call (csrc/cpu/draft.cpp), with the same bits, where every op of
        it would be served by the CPU extension anyway (:meth:`_chain_inputs`). Returns k, or None when the
        step-by-step path must serve."""
        if base_len + gamma > self.cache.max_len:
            return None
        inputs = self._chain_inputs(state, chain, gamma, eta)
        if inputs is None:
            return None
        if state.sampler.greedy:
            return _cpu_ext.draft_chain(*inputs, base_len=base_len)
        u = state.sampler.round_u
        if u is None or tuple(u.shape) != (state.batch, gamma) or u.device.type != "cpu":
            return None  # (no round's uniforms: the sampler's begin_round did not run for this round's shape)
        q = self._chain_q_for(state.batch, gamma, inputs[8].shape[0])  # inputs[8]: the draft head (N, D)
        k = _cpu_ext.draft_chain(*inputs, base_len=base_len,
                                 sampled=(q, u, *state.sampler.row_settings(state.batch, q.shape[2])))
        head = self.draft_head
        chain.set_probs([q[:, j] for j in range(k)], None if head is None else head.ids,
                        0 if head is None else head.vocab_size)
        return k

    def _chain_q_for(self, batch: int, gamma: int, rows: int) -> torch.Tensor:
        """The one-call chain's sampled draft probabilities (batch, gamma, rows) fp32 over the draft head's rows,
        allocated once for these sizes."""
        key = (batch, gamma, rows)
        if getattr(self, "_chain_q_key", None) != key:
            self._chain_q = torch.empty(batch, gamma, rows, dtype=torch.float32)
            self._chain_q_key = key
        return self._chain_q

    def _chain_inputs(self, state: DecodeState, chain: DraftChain, gamma: int, eta: float) -> Optional[tuple]:
        """The arguments of :func:`_cpu_ext.draft_chain` but ``base_len`` where it serves a round: greedy choice, or
        sampling (per batch or per row) from CPU generators; CPU tensors, the target's layers ``0..l-1`` and the
        adapter each servable in one call, the head served by the extension's linear and argmax (sampled: also
        process_logits and sample); else None."""
        target, adapter, l, c = self.target, self.adapter, self.exit_layer, self.target.config
        sampled = not state.sampler.greedy
        if state.e_prev is None or chain.drafts.shape[1] != gamma:
            return None
        probe = chain.exits[:, :1]  # (B, 1, D)
        positions = state.pos[:, None]
        stack = target._cpu_stack(probe, positions, 0, l)
        adapter_weights = adapter._cpu_layer(probe, positions)
        choice = ("process_logits", "sample", "greedy_with_confidence") if sampled else ("greedy_with_confidence",)
        if stack is None or adapter_weights is None or set(ops.backends(choice, probe.device)) != {"cpu"}:
            return None
        if sampled and not _cpu_generators(state.sampler):
            return None
        if self.draft_head is not None:
            head, ids = self.draft_head.weight, self.draft_head.ids
        elif target.lm_head.bias is None:
            head, ids = target.lm_head.weight, None
        else:
            return None
        a = adapter.config  # the call runs the adapter with the target's head layout, on caches of one layout
        if not (_dense_of(target.dtype, head, target.embed_tokens.weight)
                and (a.num_attention_heads, a.num_key_value_heads, a.head_dim)
                == (c.num_attention_heads, c.num_key_value_heads, c.head_dim)
                and self.adapter_cache.k.shape[1:] == self.cache.k.shape[1:]
                and self.adapter_cache.k.stride()[1:] == self.cache.k.stride()[1:]):
            return None
        return (state, chain, target.embed_tokens.weight, self._rope_tables(), stack, self.cache.layers(0, l),
                adapter_weights, self.adapter_cache.layer(0), head, ids, c.num_attention_heads,
                c.num_key_value_heads, c.head_dim, c.rms_norm_eps, a.rms_norm_eps, eta, self._draft_q8(probe[:, 0]))

    def _cpu_pass(self, state: DecodeState, chain: Optional[DraftChain], k: int,
                  kv_len: int) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """A plain step (``chain`` None) or the verification of ``chain``'s first ``k`` drafts, with the head, the
        sampler's choice (greedy, or sampled from uniforms it draws here as its step-by-step choice would) and the
        commit, in one extension call (csrc/cpu/target_pass.cpp) with the same bits and tokens as :meth:`ar_step` /
        :meth:`verify`, where every op of them would be served by the CPU extension anyway (:meth:`_pass_inputs`).
        Returns (accepted, committed) (B,), or None when the step-by-step path must serve."""
        if kv_len > self.cache.max_len:
            return None
        inputs = self._pass_inputs(state, chain, k)
        if inputs is None:
            return None
        args, kwargs = inputs
        sampler = state.sampler
        if not sampler.greedy:  # this pass's uniforms, drawn as the sampler's accept / select draw them
            u_next, u_accept = sampler.pass_uniforms(state.batch, None if chain is None else chain.n_drafts, k)
            kwargs = dict(kwargs, sampled=(u_next, u_accept, *self._draft_q(chain, k),
                                           *sampler.row_settings(state.batch, self.target.lm_head.weight.shape[0])))
        return _cpu_ext.target_pass(*args, kv_len=kv_len, **kwargs)

    def _draft_q(self, chain: Optional[DraftChain], k: int) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """The first ``k`` drafts' probabilities as a (B, >= k, N) fp32 tensor with contiguous rows, and the token ids
        of its N columns (None: the whole vocabulary) ((None, None) for none): the one-call chain's own buffer where
        it drafted them, else stacked."""
        if chain is None or k == 0:
            return None, None
        q = getattr(self, "_chain_q", None)
        if q is not None and chain.probs[0].data_ptr() == q.data_ptr() and q.shape[0] == chain.probs[0].shape[0] \
                and q.shape[2] == chain.probs[0].shape[1]:
            return q, chain.probs_ids
        return torch.stack(chain.probs[:k], dim=1), chain.probs_ids

    def _pass_inputs(self, state: DecodeState, chain: Optional[DraftChain], k: int) -> Optional[Tuple[tuple, dict]]:
        """The arguments of :func:`_cpu_ext.target_pass` but ``kv_len`` (positional, keywords) for a pass over
        ``k + 1`` tokens a row where it serves: greedy choice, or sampling (per batch or per row) from CPU
        generators; CPU tensors, the layers servable in one call, the head without bias, the final norm, head and
        embedding dense in the model's dtype; else None. (A sampled pass also takes its uniforms: :meth:`_cpu_pass`
        draws them.)"""
        target, sampler = self.target, state.sampler
        if target.lm_head.bias is not None or not (sampler.greedy or _cpu_generators(sampler)):
            return None
        start = 0 if chain is None else self.exit_layer
        positions = state.pos[:, None]
        probe = chain.exits[:, :k + 1] if chain is not None else torch.empty(
            state.batch, 1, 0, dtype=target.dtype, device=positions.device)
        stack = target._cpu_stack(probe, positions, start, target.num_layers)
        choice = ("argmax", "accept_greedy_commit") if sampler.greedy else \
            ("process_logits", "sample", "accept_sampling", "commit_tokens", "argmax")
        if stack is None or set(ops.backends(choice, positions.device)) != {"cpu"}:
            return None
        if not _dense_of(target.dtype, target.lm_head.weight, target.norm.weight, target.embed_tokens.weight):
            return None  # (the step-by-step path sends these to torch, with other bits)
        c = target.config
        return ((state, self._rope_tables(), stack, self.cache.layers(start, target.num_layers), target.norm,
                 target.lm_head, k + 1, c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.rms_norm_eps),
                dict(embed=target.embed_tokens.weight if chain is None else None, chain=chain))

    def _cpu_decode(self, state: DecodeState, kcfg: Optional[KangarooConfig], stats: DecodeStats) -> None:
        """Plain steps (``kcfg`` None) or Kangaroo rounds until every row is finished, in one extension call
        (:func:`_cpu_ext.decode_loop`) where each of them would take the one-call paths above anyway: the same
        tokens and bits as :meth:`ar_step` / :meth:`kangaroo_round` a step at a time (sampled: the same uniforms from
        the same generator, in the same order), without the Python and the argument checks around each step's calls;
        ``stats`` count the rounds as :meth:`kangaroo_round` does. Whatever it does not run (a round that would read
        past the cache) is left to the caller's loop. (The engine's RowSampling steps a round a call.)"""
        if state.pos.device.type != "cpu" or not _cpu_ext.is_available():
            return
        unfinished = ~state.finished
        if not bool(unfinished.any()):
            return
        max_rounds = int((state.max_new - state.n_gen)[unfinished].clamp(min=0).max())  # a round commits >= 1
        sampler, b = state.sampler, state.batch
        sampled = not sampler.greedy
        if sampled and not isinstance(sampler, BatchSampling):
            return  # (the loop draws from one generator; the engine's rows have their own, and step a round a call)
        draft = pass_sampling = None
        if kcfg is None:
            inputs = self._pass_inputs(state, None, 0)
        else:
            chain = self._chain_for(state, kcfg.gamma)
            chain_inputs = self._chain_inputs(state, chain, kcfg.gamma, float(kcfg.eta))
            inputs = None if chain_inputs is None else self._pass_inputs(state, chain, kcfg.gamma)
        if inputs is None:
            return
        if sampled:  # buffers the loop refills with each round's uniforms
            vocab = self.target.lm_head.weight.shape[0]
            filters = sampler.row_settings(b, vocab)
            gamma = 0 if kcfg is None else kcfg.gamma
            head = self.draft_head
            q = None if kcfg is None else self._chain_q_for(b, gamma, vocab if head is None else head.ids.shape[0])
            pass_sampling = (torch.zeros(b, dtype=torch.float64), torch.zeros(b, gamma, dtype=torch.float32), q,
                             None if head is None or kcfg is None else head.ids, *filters)
            chain_sampling = None if kcfg is None else (q, torch.zeros(b, gamma, dtype=torch.float64), *filters)
        if kcfg is not None:
            draft = _cpu_ext.plan_draft_chain(*chain_inputs, sampled=chain_sampling if sampled else None)
        plan = _cpu_ext.plan_target_pass(*inputs[0], sampled=pass_sampling, **inputs[1])
        rounds, active, committed, n_drafts, accepted, steps, seconds = _cpu_ext.decode_loop(
            plan, draft, max_rounds, sampler.gen if sampled else None)
        if kcfg is None:
            return
        for act, com, nd, acc, k, (draft_s, verify_s) in zip(active.tolist(), committed.tolist(), n_drafts.tolist(),
                                                             accepted.tolist(), steps.tolist(), seconds.tolist()):
            stats.draft_time_s += draft_s
            stats.verify_time_s += verify_s
            stats.add_verify(k + 1, verify_s)
            stats.add_round(act, com, nd, acc)

    def _rope_tables(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (T, head_dim) of positions 0..T-1 for the cache's T, by :meth:`Transformer.rope` (elementwise,
        so row p has the bits of ``rope`` at position p), kept while T, the dtype and ``inv_freq`` are the same."""
        t = self.target
        key = (self.cache.max_len, t.dtype, t.inv_freq.data_ptr(), _cpu_ext.tensor_version(t.inv_freq))
        if getattr(self, "_rope_key", None) != key:
            cos, sin = t.rope(torch.arange(self.cache.max_len, device=t.device)[None])
            self._rope_table_pair, self._rope_key = (cos[0], sin[0]), key
        return self._rope_table_pair

    def _chain_for(self, state: DecodeState, gamma: int) -> DraftChain:
        """A :class:`DraftChain` for this batch size and gamma, allocated once and reused by every round (each
        round's begin_round, :meth:`begin_round` or the one-call chain's, resets it; ``probs``, which only the
        step-by-step path fills, only the former)."""
        t = self.target
        key = (state.batch, gamma, t.config.hidden_size, t.dtype, state.pos.device)
        if getattr(self, "_chain_key", None) != key:
            self._chain = DraftChain.allocate(state.batch, gamma, t.config.hidden_size, t.dtype, state.pos.device)
            self._chain_key = key
        return self._chain

    def kangaroo_round(self, state: DecodeState, kcfg: KangarooConfig, stats: DecodeStats, timed: bool,
                       max_drafts: Optional[int] = None) -> torch.Tensor:
        """One draft-verify-accept round, eagerly: drafting stops when no row drafts, attention reads the live
        length. ``timed``: on CUDA, synchronize so that the draft and verify seconds in ``stats`` are the device's
        (the engine does not). ``max_drafts``: at most this many drafts a row this round instead of ``gamma`` (the
        engine's verification budget); 0 runs a round without drafts, the shallow step and the adapter's catch-up
        (its cache stays whole for later rounds) then a verification of one position: about a plain step. Returns
        the tokens committed per row (B,)."""
        gamma, eta = kcfg.gamma, float(kcfg.eta)
        if max_drafts is not None:
            gamma = max(0, min(gamma, max_drafts))
        chain = self._chain_for(state, gamma)
        base_len = int(state.pos.max()) + 1
        sync = timed and state.pos.device.type == "cuda"
        t_start = time.perf_counter()
        state.sampler.begin_round(state.batch, gamma, state.pos.device)
        step = self._cpu_chain(state, chain, gamma, eta, base_len)
        if step is None:
            step = self.draft_round(state, chain, gamma, eta, base_len)
        t_verify = clock(state.pos.device, sync)
        was_active, accepted, committed = self.verify(state, chain, step, base_len + step)
        stats.draft_time_s += t_verify - t_start
        verify_s = clock(state.pos.device, sync) - t_verify
        stats.verify_time_s += verify_s
        stats.add_verify(step + 1, verify_s)
        stats.add_round(was_active.tolist(), committed.tolist(), chain.n_drafts.tolist(), accepted.tolist())
        return committed

    # -- the whole call ----------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, ids: torch.Tensor, lengths: torch.Tensor, max_new: int, sampling: SamplingConfig,
               kcfg: Optional[KangarooConfig], eos: Optional[torch.Tensor], gen: Optional[torch.Generator],
               on_tokens: Optional[Callable[[torch.Tensor, torch.Tensor], None]] = None,
               state: Optional[DecodeState] = None,
               rounds: Optional[Callable[[DecodeStats, Callable[[], None]], None]] = None):
        """Generate up to ``max_new`` tokens per row of ids (B, T) right-padded, lengths (B,). Returns
        (out (B, max_new), n_gen (B,), stats). on_tokens(out, n_gen) is called after every commit (streaming).

        :mod:`kangaroo_rt.graphs` passes the rows of its static buffers as ``state`` (its caches already hold
        them) and runs the rounds itself: ``rounds(stats, emit)`` decodes every row to the end, calling ``emit``
        after each round when streaming. Without them the rows are fresh and rounds run eagerly."""
        use_kangaroo = kcfg is not None and kcfg.gamma > 0 and self.adapter is not None
        gamma = kcfg.gamma if use_kangaroo else 0
        b = ids.shape[0]
        if state is None:
            self.ensure_caches(b, ids.shape[1] + max_new + gamma + 1)
            state = DecodeState.allocate(b, max_new + gamma + 2, ids.device, eos=eos, dtype=self.target.dtype,
                                         hidden=None if self.adapter is None else self.target.config.hidden_size)
        state.sampler = BatchSampling(sampling, gen)
        stats = DecodeStats.empty(b, gamma)
        start = time.perf_counter()
        self.prefill(ids, lengths, state, max_new)
        stats.prefill_time_s = time.perf_counter() - start

        def emit() -> None:
            if on_tokens is not None:
                on_tokens(state.out, state.n_gen)

        emit()
        if rounds is not None:
            rounds(stats, emit)
        with steady():  # the layer stacks' and the adapter's call plans checked once for the loop
            if on_tokens is None:  # (a streamer is called after every round: the rounds stay in Python)
                self._cpu_decode(state, kcfg if use_kangaroo else None, stats)
            while not bool(state.finished.all()):
                if use_kangaroo:
                    self.kangaroo_round(state, kcfg, stats, timed=True)
                else:
                    self.ar_step(state)
                emit()
        stats.wall_time_s = clock(ids.device, ids.device.type == "cuda") - start
        stats.new_tokens = state.n_gen.tolist()
        return state.out[:, :max_new], state.n_gen, stats


def _cpu_generators(sampler: Sampler) -> bool:
    """Whether a sampler's uniforms come from CPU generators (None: torch's default one), which the one-call CPU
    paths draw from."""
    gens = [sampler.gen] if isinstance(sampler, BatchSampling) else [sampler.rows[r][1] for r in sampler.sampled]
    return all(gen is None or gen.device.type == "cpu" for gen in gens)


def _dense_of(dtype: torch.dtype, *tensors: torch.Tensor) -> bool:
    """Whether every tensor is a contiguous CPU tensor of ``dtype``: what the one-call CPU paths read by pointer."""
    return all(t.dtype == dtype and t.is_cpu and t.is_contiguous() for t in tensors)


def clock(device: torch.device, sync: bool) -> float:
    """``time.perf_counter()``, after the work queued on ``device`` is done when ``sync`` (a CUDA device)."""
    if sync:
        torch.cuda.synchronize(device)
    return time.perf_counter()
