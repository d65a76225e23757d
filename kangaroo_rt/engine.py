"""Step-level API for serving stacks: requests join and leave between steps (continuous batching).

::

    engine = Engine(model, max_batch=8, max_len=1024)
    rid = engine.add_request(prompt_ids, RequestParams(max_new_tokens=64, temperature=0.7, seed=1))
    while engine.has_unfinished():
        for out in engine.step():          # new tokens of every running request
            print(out.request_id, out.new_token_ids, out.finished, out.finish_reason)

Every request owns one row ("slot") of a static KV cache allocated once for ``max_batch`` rows of
``max_len`` positions. :meth:`Engine.step` first admits waiting requests into free slots (prefill into that
slot's cache row, while other slots are mid-generation), then runs one Kangaroo round (or one plain
decoding step) over the occupied slots with per-row lengths, limits and sampling parameters, and finally
frees the slots of finished requests. Free slots are masked like finished rows; the round runs over
slots ``0..k`` where ``k`` is the highest occupied slot (requests take the lowest free slot).

Guarantees:

- greedy requests (``temperature == 0``) get exactly the target model's greedy tokens, the same as
  :func:`kangaroo_rt.generate` on that prompt alone, whatever else is in the batch, up to fp32 round-off
  between batched and single-row kernels (the tests check token equality on CPU);
- a sampled request draws random numbers only from its own generator (seeded by ``seed``, else from
  torch's global RNG when it is added), in the same order as ``generate(prompt, do_sample=True,
  seed=seed)`` on that prompt alone, so a seeded request gets those same tokens, whatever else is in the
  batch, with the same fp32 proviso;
- a request that can never fit the cache is refused at :meth:`Engine.add_request` with an
  :class:`AdmissionError` saying why; one that fits waits for a free slot (up to ``max_queue`` waiting).

The engine is not thread-safe: call it from one thread (a server serializes calls with a lock).
"""
from __future__ import annotations

import time
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Any, Deque, Dict, List, Optional, Sequence, Union

import torch

from . import ops
from .config import KangarooConfig, SamplingConfig, check_positive_int, eos_ids
from .generate import _MODEL_DEFAULT, KangarooModel, prepare_prompts
from .model import steady
from .speculative import DecodeState, DecodeStats, Decoder, RowSampling


class AdmissionError(ValueError):
    """A request the engine refuses. ``reason``: ``"too_long"`` (it can never fit the cache),
    ``"queue_full"`` (``max_queue`` requests already wait; retry later) or ``"invalid"`` (bad input)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class RequestParams:
    """Per-request generation settings.

    ``max_new_tokens=None`` generates until EOS or until the cache row is full. ``temperature=0`` is
    greedy; otherwise tokens are sampled after temperature, top-k and top-p (in that order), from a
    generator seeded with ``seed`` (None: drawn from torch's global RNG at :meth:`Engine.add_request`).
    """

    max_new_tokens: Optional[int] = 16
    temperature: float = 0.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    seed: Optional[int] = None

    def __post_init__(self) -> None:
        check_positive_int("max_new_tokens", self.max_new_tokens, allow_none=True)
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)
                                      or not 0 <= self.seed < 2 ** 63):
            raise ValueError(f"seed must be an int in [0, 2**63), got {self.seed!r}")
        self.sampling_config()  # validates temperature, top_k, top_p

    def sampling_config(self) -> SamplingConfig:
        return SamplingConfig(do_sample=self.temperature > 0, temperature=float(self.temperature),
                              top_k=self.top_k, top_p=self.top_p)


@dataclass
class RequestOutput:
    """What one :meth:`Engine.step` produced for one request."""

    request_id: str
    new_token_ids: List[int]  # tokens generated in this step
    finished: bool
    finish_reason: Optional[str]  # "stop" (an EOS token, included in the tokens), "length", None if running
    num_prompt_tokens: int
    num_generated_tokens: int  # tokens generated so far, this step's included
    rounds: int  # Kangaroo rounds this request has taken part in (0 in plain decoding)


@dataclass
class _Request:
    request_id: str
    prompt: torch.Tensor  # (T,) int64 on the model's device
    max_new: int
    sampling: SamplingConfig
    gen: Optional[torch.Generator]
    slot: int = -1
    sent: int = 0
    rounds_before: int = 0  # the slot's round count when the request took it


class Engine:
    """Continuous-batching decode engine over one static KV cache (see the module docstring).

    model: a :class:`KangarooModel` (its target, adapter and exit layer; the engine allocates caches of its
    own). kangaroo: as in :meth:`KangarooModel.kangaroo_plan` (the model's own config by default; ``None`` or
    ``gamma=0`` decodes plainly). max_len: cache positions per slot (prompt + new tokens + ``gamma + 1`` for
    drafting); default the model's ``max_len`` or ``min(2048, max_position_embeddings)``. eos_token_id: the
    model config's EOS by default; ``ignore_eos=True`` stops on length only. max_queue: how many requests may
    wait for a slot before :meth:`add_request` refuses more. max_verify_tokens: a verification budget, off by
    default: each Kangaroo round caps every row's drafts at ``max_verify_tokens // running requests - 1`` (at most
    ``gamma``; 0 gives a round without drafts, about a plain step, that keeps the adapter's cache whole), so that a
    round verifies at most max(max_verify_tokens, running requests) positions. With many requests a round's
    verification is bound by arithmetic, not by the weight stream, and long chains cost more than their accepted
    tokens gain (docs/engine.md). Greedy requests keep their tokens; a seeded sampled request draws one uniform per
    draft slot of a round, so with a budget its tokens depend on the load (still distribution-exact).
    """

    def __init__(self, model: KangarooModel, max_batch: int = 8, max_len: Optional[int] = None,
                 kangaroo: Optional[KangarooConfig] = _MODEL_DEFAULT,
                 eos_token_id: Union[None, int, Sequence[int]] = None, ignore_eos: bool = False,
                 max_queue: int = 1024, max_verify_tokens: Optional[int] = None) -> None:
        if not isinstance(model, KangarooModel):
            raise ValueError(f"model must be a KangarooModel, got {type(model).__name__}")
        target = model.target
        self.kangaroo, exit_layer = model.kangaroo_plan(kangaroo)
        if max_len is None:
            max_len = model.max_len or min(2048, target.config.max_position_embeddings)
        for name, value in (("max_batch", max_batch), ("max_len", max_len), ("max_queue", max_queue)):
            check_positive_int(name, value)
        check_positive_int("max_verify_tokens", max_verify_tokens, allow_none=True)
        self.max_verify_tokens = max_verify_tokens
        self.gamma = self.kangaroo.gamma if self.kangaroo is not None else 0
        if max_len < self.gamma + 3:
            raise ValueError(f"max_len={max_len} leaves no room for a 1-token prompt, 1 new token and "
                             f"gamma + 1 = {self.gamma + 1} drafting positions; use max_len >= {self.gamma + 3}")
        self.target = target
        self.max_batch = max_batch
        self.max_len = max_len
        self.max_queue = max_queue
        self.device = target.device
        stop_ids = [] if ignore_eos else eos_ids(eos_token_id, target.config)
        self.eos = torch.tensor(stop_ids, dtype=torch.long, device=self.device) if stop_ids else None
        self._eos_ids = set(stop_ids)
        adapter = model.adapter if self.kangaroo is not None else None
        self.decoder = Decoder(target, adapter, exit_layer, max_len=max_len)
        self.decoder.ensure_caches(max_batch, max_len)
        hidden = None if adapter is None else target.config.hidden_size
        self._state = DecodeState.allocate(max_batch, max_len + self.gamma + 2, self.device, hidden, target.dtype,
                                           self.eos)
        self._slots: List[Optional[_Request]] = [None] * max_batch
        self._waiting: Deque[_Request] = deque()
        self._requests: Dict[str, _Request] = {}
        self._counters = dict(added=0, finished=0, aborted=0, refused=0, prompt_tokens=0, generated_tokens=0,
                              steps=0)
        self._stats = DecodeStats.empty(max_batch, self.gamma, history=False)  # per slot, totals since construction
        self._step_time_s = 0.0

    # -- admission -------------------------------------------------------------------------------------
    def capacity(self, prompt_len: int) -> int:
        """How many new tokens fit after a prompt of ``prompt_len`` tokens (<= 0: the prompt does not fit)."""
        return self.max_len - prompt_len - self.gamma - 1

    def _as_prompt(self, prompt_ids: Any) -> torch.Tensor:
        """A list of ids or a tensor (T,) or (1, T), validated as ``generate`` validates its prompts -> (T,) int64."""
        if isinstance(prompt_ids, (list, tuple)):
            if not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt_ids):
                raise AdmissionError("invalid", "prompt_ids must be a list of int token ids")
            prompt_ids = torch.tensor(list(prompt_ids), dtype=torch.long)
        elif not isinstance(prompt_ids, torch.Tensor):
            raise AdmissionError("invalid", f"prompt_ids must be a list of ints or a tensor, got {type(prompt_ids).__name__}")
        if prompt_ids.dim() > 2 or (prompt_ids.dim() == 2 and prompt_ids.shape[0] != 1):
            raise AdmissionError("invalid", f"prompt_ids must be 1-D (or (1, T)), got shape {tuple(prompt_ids.shape)}")
        try:
            _, packed, _ = prepare_prompts(prompt_ids.to(self.device), None, self.target.config.vocab_size)
        except ValueError as exc:
            raise AdmissionError("invalid", str(exc).replace("input_ids", "prompt_ids")) from None
        return packed[0]

    def add_request(self, prompt_ids: Union[Sequence[int], torch.Tensor], params: Optional[RequestParams] = None,
                    request_id: Optional[str] = None) -> str:
        """Queue a request; it starts at the next :meth:`step` that finds a free slot. Returns its id.

        Raises :class:`AdmissionError` when the request can never fit the cache (``reason="too_long"``),
        when ``max_queue`` requests already wait (``"queue_full"``) or on bad input (``"invalid"``).
        """
        try:
            if params is None:
                params = RequestParams()
            if not isinstance(params, RequestParams):
                raise AdmissionError("invalid", f"params must be a RequestParams, got {type(params).__name__}")
            if request_id is not None and (not isinstance(request_id, str) or not request_id):
                raise AdmissionError("invalid", f"request_id must be a non-empty str, got {request_id!r}")
            if request_id in self._requests:
                raise AdmissionError("invalid", f"request id {request_id!r} is already in use")
            ids = self._as_prompt(prompt_ids)
            n = ids.numel()
            room = self.capacity(n)
            wanted = params.max_new_tokens if params.max_new_tokens is not None else max(room, 1)
            if wanted > room:
                fits = (f"at most {room} new tokens fit after this prompt" if room > 0 else
                        f"prompts of at most {self.max_len - self.gamma - 2} tokens fit")
                raise AdmissionError(
                    "too_long",
                    f"prompt of {n} tokens + max_new_tokens {wanted} + {self.gamma + 1} drafting positions needs "
                    f"{n + wanted + self.gamma + 1} cache positions but the engine's max_len is {self.max_len}; {fits}")
            if len(self._waiting) >= self.max_queue:
                raise AdmissionError("queue_full", f"{len(self._waiting)} requests are already waiting "
                                                   f"(max_queue={self.max_queue}); retry later")
        except AdmissionError:
            self._counters["refused"] += 1
            raise
        sampling = params.sampling_config()
        gen = None
        if not sampling.greedy:
            seed = params.seed if params.seed is not None else int(torch.randint(0, 2 ** 62, (1,)))
            gen = torch.Generator(device=self.device).manual_seed(seed)
        rid = request_id if request_id is not None else uuid.uuid4().hex
        req = _Request(rid, ids, wanted, sampling, gen)
        self._requests[rid] = req
        self._waiting.append(req)
        self._counters["added"] += 1
        self._counters["prompt_tokens"] += n
        return rid

    def abort(self, request_id: str) -> bool:
        """Drop a waiting or running request and free its slot at once. False if the id is unknown
        (never added, already finished or already aborted). An aborted request gets no more outputs."""
        req = self._requests.pop(request_id, None)
        if req is None:
            return False
        if req.slot < 0:
            self._waiting.remove(req)
        else:
            self._free(req.slot)
        self._counters["aborted"] += 1
        return True

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    @property
    def num_running(self) -> int:
        return sum(r is not None for r in self._slots)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def _free(self, slot: int) -> None:
        self._slots[slot] = None
        self._state.rows(slot, slot + 1).clear()

    def _prefill(self, req: _Request, slot: int) -> None:
        """Prefill ``req`` into cache row ``slot`` and pick its first token; other slots are untouched."""
        state = self._state.rows(slot, slot + 1)
        state.sampler = RowSampling([(req.sampling, req.gen)])
        lengths = torch.tensor([req.prompt.numel()], dtype=torch.long, device=self.device)
        self.decoder.prefill(req.prompt[None], lengths, state, req.max_new, first_row=slot)
        req.slot, req.rounds_before = slot, self._stats.rounds[slot]
        self._slots[slot] = req

    # -- one step ----------------------------------------------------------------------------------------
    def step(self) -> List[RequestOutput]:
        """Admit waiting requests into free slots, run one round over the occupied slots, free the finished
        ones. Returns one output per request that got tokens or finished in this step."""
        with ops.device_context(self.device), steady():  # call plans checked once a step
            return self._step()

    @torch.no_grad()
    def _step(self) -> List[RequestOutput]:
        t_start = time.perf_counter()
        while self._waiting and None in self._slots:
            req = self._waiting.popleft()
            t_prefill = time.perf_counter()
            self._prefill(req, self._slots.index(None))
            self._stats.prefill_time_s += time.perf_counter() - t_prefill
        occupied = [s for s, r in enumerate(self._slots) if r is not None]
        if not occupied:
            return []
        n = occupied[-1] + 1
        state = self._state.rows(0, n)
        live = state.finished.logical_not().tolist()
        state.sampler = RowSampling([(r.sampling, r.gen) if r is not None and live[s] else None
                                     for s, r in enumerate(self._slots[:n])])
        if any(live):
            if self.kangaroo is None:
                self.decoder.ar_step(state)
            else:
                self.decoder.kangaroo_round(state, self.kangaroo, self._stats, timed=False,
                                            max_drafts=self.draft_cap(sum(live)))
        outputs = self._collect(n)
        self._counters["steps"] += 1
        self._step_time_s += time.perf_counter() - t_start
        return outputs

    def draft_cap(self, running: int) -> Optional[int]:
        """Drafts a row in a round over ``running`` requests under ``max_verify_tokens`` (None: no budget, so
        ``gamma``)."""
        if self.max_verify_tokens is None:
            return None
        return min(self.gamma, max(0, self.max_verify_tokens // max(running, 1) - 1))

    def _collect(self, n: int) -> List[RequestOutput]:
        n_gen = self._state.n_gen[:n].tolist()
        finished = self._state.finished[:n].tolist()
        outputs = []
        for s in range(n):
            req = self._slots[s]
            if req is None or (n_gen[s] == req.sent and not finished[s]):
                continue
            new = self._state.out[s, req.sent:n_gen[s]].tolist()
            req.sent = n_gen[s]
            self._counters["generated_tokens"] += len(new)
            reason = None
            if finished[s]:
                last = self._state.out[s, n_gen[s] - 1].item() if n_gen[s] else None
                reason = "stop" if last in self._eos_ids else "length"
                self._free(s)
                del self._requests[req.request_id]
                self._counters["finished"] += 1
            outputs.append(RequestOutput(req.request_id, new, finished[s], reason, req.prompt.numel(), n_gen[s],
                                         self._stats.rounds[s] - req.rounds_before))
        return outputs

    # -- metrics ------------------------------------------------------------------------------------------
    def metrics(self) -> Dict[str, Any]:
        """Counters since construction: requests, tokens, steps, MAT (tokens per Kangaroo round, bonus token
        included), acceptance rate per draft position, queue length, time spent by phase."""
        c, stats = self._counters, self._stats.summary()
        return {
            "mode": "kangaroo" if self.kangaroo is not None else "plain",
            "slots_total": self.max_batch,
            "max_len": self.max_len,
            "requests_running": self.num_running,
            "requests_waiting": self.num_waiting,
            "requests_added_total": c["added"],
            "requests_finished_total": c["finished"],
            "requests_aborted_total": c["aborted"],
            "requests_refused_total": c["refused"],
            "prompt_tokens_total": c["prompt_tokens"],
            "generated_tokens_total": c["generated_tokens"],
            "steps_total": c["steps"],
            "rounds_total": stats["rounds"],
            "mat": stats["mat"],
            "mean_draft_length": stats["mean_draft_length"],
            "acceptance_by_position": stats["acceptance_by_position"],
            "prefill_time_s": self._stats.prefill_time_s,
            "draft_time_s": self._stats.draft_time_s,
            "verify_time_s": self._stats.verify_time_s,
            "step_time_s": self._step_time_s,
        }


__all__ = ["AdmissionError", "Engine", "RequestOutput", "RequestParams"]
