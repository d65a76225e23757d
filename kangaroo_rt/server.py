"""OpenAI-compatible HTTP server over the :class:`~kangaroo_rt.engine.Engine` (FastAPI + uvicorn: ``[serve]``).

Endpoints: ``POST /v1/completions`` and ``POST /v1/chat/completions`` (streamed as server-sent events
with ``"stream": true``), ``GET /v1/models``, ``GET /health`` and ``GET /metrics`` (Prometheus text).
Bad requests get a 4xx status with an OpenAI-style JSON body ``{"error": {"message", "type", "param",
"code"}}``; a client that disconnects, mid-stream or while waiting, has its request aborted and its
slot freed before the next engine step.

One background thread owns the engine and runs :meth:`Engine.step` while there is work; HTTP handlers
hand it their requests to add before its next step (from a worker thread, so the event loop never waits
for a step) and receive their outputs through an asyncio queue.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import json
import threading
import time
import uuid
from typing import Any, AsyncIterator, Callable, Deque, Dict, List, Literal, Optional, Tuple, Union

from .engine import AdmissionError, Engine, RequestOutput, RequestParams

try:
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("kangaroo_rt.server needs the [serve] extra: pip install 'kangaroo_rt[serve]' "
                      f"(fastapi, uvicorn); {exc}") from exc


DISCONNECT_CHECK_S = 0.25  # how often a handler asks whether its client is still connected


class EngineRunner:
    """Drives an :class:`Engine` from a background thread for asyncio handlers.

    Only that thread touches the engine. Other threads hand it work between two steps (:meth:`submit`,
    :meth:`metrics`) and wait at most one step for it: a lock the stepping thread took back after every step
    would starve them while requests run (CPython's locks are not fair), so new requests and /metrics would
    wait for every running request to finish.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._cond = threading.Condition()  # guards _calls, _aborts, _stop and _accepting
        self._calls: Deque[Tuple[Callable[[], Any], concurrent.futures.Future]] = collections.deque()
        self._queues: Dict[str, Tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._aborts: Deque[str] = collections.deque()
        self._stop = False
        self._accepting = False  # the thread runs and will serve queued calls
        self.error: Optional[str] = None
        self._thread = threading.Thread(target=self._loop, name="kangaroo-rt-engine", daemon=True)

    def start(self) -> None:
        with self._cond:
            self._accepting = True
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout=30)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    def _between_steps(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the engine's thread before its next step and return its result (or raise its error).
        With no thread stepping the engine (not started, stopped, failed), or called from that thread, ``fn`` runs
        here."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            queued = self._accepting and threading.current_thread() is not self._thread  # (it would wait on itself)
            if queued:
                self._calls.append((fn, future))
                self._cond.notify()
        return future.result() if queued else fn()

    def submit(self, prompt_ids: List[int], params: RequestParams, loop: asyncio.AbstractEventLoop) -> Tuple[str, asyncio.Queue]:
        """Add a request before the next step (blocks up to one step: call from a worker thread).
        Raises AdmissionError, or RuntimeError once the engine has failed or stopped."""
        queue: asyncio.Queue = asyncio.Queue()

        def add() -> str:
            if self.error is not None:
                raise RuntimeError(f"the engine failed earlier: {self.error}")
            if self._stop or not self._thread.is_alive():
                raise RuntimeError("the engine is not running")
            rid = self.engine.add_request(prompt_ids, params)
            self._queues[rid] = (loop, queue)
            return rid

        return self._between_steps(add), queue

    def abort_soon(self, request_id: str) -> None:
        """Abort before the next step; never waits for a step (safe from the event loop and from finalizers).
        A request whose last output was already delivered is left alone."""
        if request_id in self._queues:
            with self._cond:
                self._aborts.append(request_id)
                self._cond.notify()

    def metrics(self) -> Dict[str, Any]:
        """The engine's metrics, read between two steps (blocks up to one step)."""
        return self._between_steps(self.engine.metrics)

    def _deliver(self, request_id: str, item: Any, last: bool) -> None:
        target = self._queues.pop(request_id, None) if last else self._queues.get(request_id)
        if target is None:
            return
        loop, queue = target
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass

    @staticmethod
    def _serve(calls: List[Tuple[Callable[[], Any], concurrent.futures.Future]]) -> None:
        for fn, future in calls:
            try:
                future.set_result(fn())
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting caller
                future.set_exception(exc)

    def _take_work(self) -> Tuple[List[Tuple[Callable[[], Any], concurrent.futures.Future]], List[str], bool]:
        """Wait for work; return the queued calls, the aborts, and whether to stop."""
        with self._cond:
            while not (self._stop or self._calls or self._aborts or self.engine.has_unfinished()):
                self._cond.wait()
            calls, aborts = list(self._calls), list(self._aborts)
            self._calls.clear()
            self._aborts.clear()
            return calls, aborts, self._stop

    def _loop(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # noqa: BLE001 - outside step(): reported by /health and to submitters
            if self.error is None:
                self.error = f"engine thread ended: {type(exc).__name__}: {exc}"
            raise
        finally:  # however the thread ends, later calls run in their callers and queued ones are served
            with self._cond:
                self._accepting = False
                calls = list(self._calls)
                self._calls.clear()
            self._serve(calls)

    def _run(self) -> None:
        while True:
            calls, aborts, stop = self._take_work()
            self._serve(calls)  # after a stop these see _stop and refuse new requests
            if stop:
                return
            for rid in aborts:
                self.engine.abort(rid)
                self._queues.pop(rid, None)
            if not self.engine.has_unfinished():
                continue
            try:
                outputs = self.engine.step()
            except Exception as exc:  # noqa: BLE001 - reported to every waiting client and to /health
                self.error = f"{type(exc).__name__}: {exc}"
                for rid in list(self._queues):
                    self.engine.abort(rid)
                    self._deliver(rid, RuntimeError(self.error), last=True)
                return  # _loop stops the queue; queued submissions raise (error set), metrics still read
            for out in outputs:
                self._deliver(out.request_id, out, last=out.finished)


# -- request bodies -------------------------------------------------------------------------------------
class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: Optional[float] = Field(default=None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(default=None, gt=0.0, le=1.0)
    top_k: Optional[int] = Field(default=None, ge=1)
    n: Optional[int] = Field(default=1, ge=1)
    stream: Optional[bool] = False
    stream_options: Optional[Dict[str, Any]] = None
    stop: Optional[Union[str, List[str]]] = None
    seed: Optional[int] = Field(default=None, ge=0, lt=2 ** 63)
    presence_penalty: Optional[float] = 0.0
    frequency_penalty: Optional[float] = 0.0
    logit_bias: Optional[Dict[str, float]] = None
    logprobs: Optional[Union[bool, int]] = None
    user: Optional[str] = None


class CompletionBody(_Body):
    prompt: Union[str, List[int], List[str], List[List[int]]]
    max_tokens: Optional[int] = Field(default=16, ge=1)
    echo: Optional[bool] = False
    best_of: Optional[int] = None
    suffix: Optional[str] = None


class _ContentPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[Union[str, List[_ContentPart]]] = None


class ChatBody(_Body):
    messages: List[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    top_logprobs: Optional[int] = None


class APIError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind


def _error_response(status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                    kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse(status_code=status,
                        content={"error": {"message": message, "type": kind, "param": param, "code": code}})


# -- the app -------------------------------------------------------------------------------------------------
class _Server:
    def __init__(self, runner: EngineRunner, tokenizer: Any, model_name: str) -> None:
        self.runner = runner
        self.tok = tokenizer
        self.model_name = model_name
        self.http_counts: Dict[Tuple[str, int], int] = collections.Counter()
        self.started = time.time()

    # -- validation ------------------------------------------------------------------------------
    def check_common(self, body: _Body) -> None:
        if body.model != self.model_name:
            raise APIError(404, f"the model {body.model!r} does not exist; this server serves {self.model_name!r}",
                           "model", "model_not_found")
        if body.n not in (None, 1):
            raise APIError(400, f"n={body.n} is not supported; only n=1", "n", "unsupported_parameter")
        if body.logprobs not in (None, False, 0):
            raise APIError(400, "logprobs are not supported", "logprobs", "unsupported_parameter")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(body, name) not in (None, 0, 0.0):
                raise APIError(400, f"{name} is not supported (only 0)", name, "unsupported_parameter")
        if body.logit_bias:
            raise APIError(400, "logit_bias is not supported", "logit_bias", "unsupported_parameter")
        stops = self.stops(body)
        if len(stops) > 4 or any(not s for s in stops):
            raise APIError(400, "stop must be up to 4 non-empty strings", "stop")

    @staticmethod
    def stops(body: _Body) -> List[str]:
        if body.stop is None:
            return []
        return [body.stop] if isinstance(body.stop, str) else list(body.stop)

    def params(self, body: _Body, max_tokens: Optional[int], prompt_len: int) -> RequestParams:
        engine = self.runner.engine
        room = engine.capacity(prompt_len)
        if room <= 0:
            raise APIError(400, f"the prompt has {prompt_len} tokens; this server's context (max_len "
                                f"{engine.max_len}, {engine.gamma + 1} positions kept for drafting) fits prompts of "
                                f"at most {engine.max_len - engine.gamma - 2} tokens", "prompt",
                           "context_length_exceeded")
        if max_tokens is not None and max_tokens > room:
            raise APIError(400, f"max_tokens={max_tokens} does not fit after a {prompt_len}-token prompt: at most "
                                f"{room} new tokens fit (max_len {engine.max_len})", "max_tokens",
                           "context_length_exceeded")
        temperature = 1.0 if body.temperature is None else body.temperature
        return RequestParams(max_new_tokens=max_tokens, temperature=temperature, top_k=body.top_k, top_p=body.top_p,
                             seed=body.seed)

    def completion_prompts(self, body: CompletionBody) -> List[List[int]]:
        if body.echo:
            raise APIError(400, "echo is not supported", "echo", "unsupported_parameter")
        if body.best_of not in (None, 1):
            raise APIError(400, "best_of is not supported (only 1)", "best_of", "unsupported_parameter")
        if body.suffix:
            raise APIError(400, "suffix is not supported", "suffix", "unsupported_parameter")
        p = body.prompt
        if isinstance(p, str):
            prompts: List[Any] = [p]
        elif p and all(isinstance(x, int) for x in p):
            prompts = [p]
        else:
            prompts = list(p)
        if not prompts:
            raise APIError(400, "prompt is empty", "prompt")
        vocab = self.runner.engine.target.config.vocab_size
        out = []
        for item in prompts:
            ids = self.tok(item).input_ids if isinstance(item, str) else list(item)
            if not ids:
                raise APIError(400, "a prompt is empty (no tokens)", "prompt")
            bad = [i for i in ids if not 0 <= i < vocab]
            if bad:
                raise APIError(400, f"prompt token ids outside the vocabulary [0, {vocab}): {bad[:5]}", "prompt")
            out.append(ids)
        return out

    def chat_prompt(self, body: ChatBody) -> List[int]:
        if getattr(self.tok, "chat_template", None) is None:
            raise APIError(400, "this model's tokenizer has no chat template; use /v1/completions", "messages",
                           "chat_template_missing")
        messages = []
        for m in body.messages:
            content = m.content if isinstance(m.content, str) or m.content is None else \
                "".join(part.text for part in m.content)
            messages.append({"role": m.role, "content": content or ""})
        try:
            text = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # noqa: BLE001 - template errors (jinja raise_exception) are the client's input
            raise APIError(400, f"the chat template rejected these messages: {exc}", "messages") from None
        ids = self.tok(text, add_special_tokens=False).input_ids
        if not ids:
            raise APIError(400, "the chat template produced an empty prompt", "messages")
        return ids

    # -- generation ------------------------------------------------------------------------------
    async def submit(self, ids: List[int], params: RequestParams) -> Tuple[str, asyncio.Queue]:
        loop = asyncio.get_running_loop()
        try:
            return await run_in_threadpool(self.runner.submit, ids, params, loop)
        except AdmissionError as exc:
            if exc.reason == "queue_full":
                raise APIError(429, str(exc), None, "queue_full", "server_overloaded") from None
            raise APIError(400, str(exc), "prompt", "context_length_exceeded" if exc.reason == "too_long" else None)
        except RuntimeError as exc:
            raise APIError(503, str(exc), None, "engine_failed", "server_error") from None

    async def generate(self, ids: List[int], params: RequestParams, stops: List[str], request: Request,
                       rids: List[str]) -> AsyncIterator[Tuple[str, Optional[str], int]]:
        """Yield (text delta, finish reason or None, tokens so far). The engine request id goes into ``rids``
        so that the caller can abort it; left early (disconnect, cancel, stop string), it aborts itself."""
        rid, queue = await self.submit(ids, params)
        rids.append(rid)
        tokens: List[int] = []
        emitted = 0
        hold = max((len(s) for s in stops), default=1) - 1
        engine_done = False
        loop = asyncio.get_running_loop()
        next_check = loop.time() + DISCONNECT_CHECK_S
        try:
            while True:
                try:
                    item = await asyncio.wait_for(queue.get(), timeout=DISCONNECT_CHECK_S)
                except asyncio.TimeoutError:
                    item = None
                if loop.time() >= next_check:  # a client that left frees its slot within ~DISCONNECT_CHECK_S
                    if await request.is_disconnected():
                        return
                    next_check = loop.time() + DISCONNECT_CHECK_S
                if item is None:
                    continue
                if isinstance(item, Exception):
                    engine_done = True
                    raise APIError(500, f"generation failed: {item}", None, "engine_failed", "server_error")
                out: RequestOutput = item
                engine_done = out.finished
                tokens.extend(out.new_token_ids)
                text = self.tok.decode(tokens, skip_special_tokens=True)
                reason = out.finish_reason if out.finished else None
                cut = min((i for i in (text.find(s, max(0, emitted - hold)) for s in stops) if i >= 0), default=-1)
                if cut >= 0:
                    text, reason = text[:cut], "stop"
                if reason is None:
                    safe = len(text) - hold
                    while safe > emitted and text[safe - 1] == "\ufffd":
                        safe -= 1  # an incomplete UTF-8 sequence: wait for the next token
                else:
                    safe = len(text)
                if safe > emitted or reason is not None:
                    yield text[emitted:max(safe, emitted)], reason, len(tokens)
                    emitted = max(safe, emitted)
                if reason is not None:
                    return
        finally:
            if not engine_done:
                self.runner.abort_soon(rid)

    async def collect(self, ids: List[int], params: RequestParams, stops: List[str],
                      request: Request) -> Tuple[str, str, int]:
        parts, reason, n = [], "length", 0
        async for delta, fin, n in self.generate(ids, params, stops, request, []):
            parts.append(delta)
            reason = fin or reason
        return "".join(parts), reason, n

    async def collect_all(self, prompts: List[List[int]], plist: List[RequestParams], stops: List[str],
                          request: Request) -> List[Tuple[str, str, int]]:
        tasks = [asyncio.ensure_future(self.collect(ids, p, stops, request)) for ids, p in zip(prompts, plist)]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for t in tasks:
                t.cancel()

    async def open_streams(self, prompts: List[List[int]], plist: List[RequestParams], stops: List[str],
                           request: Request, rids: List[str]) -> Tuple[List[AsyncIterator], List[Any]]:
        """Start one generation per prompt and fetch each one's first chunk before the response starts, so
        that admission errors become 4xx responses; on an error the started ones are aborted."""
        streams, first = [], []
        try:
            for ids, p in zip(prompts, plist):
                streams.append(self.generate(ids, p, stops, request, rids))
                first.append(await _first(streams[-1]))
        except BaseException:
            for rid in rids:
                self.runner.abort_soon(rid)
            raise
        return streams, first


def _sse(payload: Any) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def create_app(runner: EngineRunner, tokenizer: Any, model_name: str = "kangaroo-rt") -> "FastAPI":
    """The FastAPI app over a started :class:`EngineRunner` and a transformers tokenizer."""
    app = FastAPI(title="kangaroo_rt", docs_url=None, redoc_url=None)
    srv = _Server(runner, tokenizer, model_name)
    app.state.server = srv

    app.add_middleware(_CountRequests, counts=srv.http_counts)

    @app.exception_handler(APIError)
    async def api_error(_request: Request, exc: APIError):
        return _error_response(exc.status, exc.message, exc.param, exc.code, exc.kind)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        detail = "; ".join(f"{'.'.join(str(x) for x in e.get('loc', ()) if x != 'body') or 'body'}: {e.get('msg')}"
                           for e in errors[:5])
        return _error_response(400, f"invalid request: {detail}", ".".join(loc) or None, "invalid_request")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException):
        return _error_response(exc.status_code, str(exc.detail), None, None,
                               "invalid_request_error" if exc.status_code < 500 else "server_error")

    @app.exception_handler(Exception)
    async def internal_error(_request: Request, exc: Exception):
        return _error_response(500, f"internal error: {type(exc).__name__}: {exc}", None, None, "server_error")

    @app.get("/health")
    async def health():
        if not runner.alive:
            return _error_response(503, f"engine not running: {runner.error}", None, "engine_failed", "server_error")
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        m = await run_in_threadpool(runner.metrics)
        return PlainTextResponse(_prometheus(m, srv.http_counts, srv.started),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": int(srv.started),
                                            "owned_by": "kangaroo_rt"}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request):
        srv.check_common(body)
        prompts = srv.completion_prompts(body)
        plist = [srv.params(body, body.max_tokens, len(ids)) for ids in prompts]
        stops = srv.stops(body)
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": cid, "object": "text_completion", "created": created, "model": model_name}
        if not body.stream:
            results = await srv.collect_all(prompts, plist, stops, request)
            n_out = sum(r[2] for r in results)
            n_in = sum(len(ids) for ids in prompts)
            return {**head, "choices": [{"index": i, "text": text, "logprobs": None, "finish_reason": reason}
                                        for i, (text, reason, _) in enumerate(results)],
                    "usage": {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}}
        rids: List[str] = []
        streams, first = await srv.open_streams(prompts, plist, stops, request, rids)

        def chunk(index: int, delta: str, reason: Optional[str]) -> Dict[str, Any]:
            return {**head, "choices": [{"index": index, "text": delta, "logprobs": None, "finish_reason": reason}]}

        return StreamingResponse(_stream_events(runner, streams, first, chunk, prompts, body, rids),
                                 media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, request: Request):
        srv.check_common(body)
        ids = srv.chat_prompt(body)
        params = srv.params(body, body.max_completion_tokens or body.max_tokens, len(ids))
        stops = srv.stops(body)
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": cid, "object": "chat.completion", "created": created, "model": model_name}
        if not body.stream:
            text, reason, n_out = await srv.collect(ids, params, stops, request)
            return {**head, "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                         "logprobs": None, "finish_reason": reason}],
                    "usage": {"prompt_tokens": len(ids), "completion_tokens": n_out, "total_tokens": len(ids) + n_out}}
        rids: List[str] = []
        streams, first = await srv.open_streams([ids], [params], stops, request, rids)
        sent_role = [False]

        def chunk(index: int, delta: str, reason: Optional[str]) -> Dict[str, Any]:
            d: Dict[str, Any] = {} if reason is not None and not delta else {"content": delta}
            if not sent_role[0]:
                d["role"] = "assistant"
                sent_role[0] = True
            return {**head, "object": "chat.completion.chunk",
                    "choices": [{"index": index, "delta": d, "logprobs": None, "finish_reason": reason}]}

        return StreamingResponse(_stream_events(runner, streams, first, chunk, [ids], body, rids),
                                 media_type="text/event-stream")

    return app


_ROUTES = ("/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions")


class _CountRequests:
    """ASGI middleware counting responses by (route, status); pure ASGI so that streaming and disconnect
    detection pass through untouched."""

    def __init__(self, app: Any, counts: Dict[Tuple[str, int], int]) -> None:
        self.app = app
        self.counts = counts

    async def __call__(self, scope: Dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = [500]

        async def send_status(message: Dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("path") if scope.get("path") in _ROUTES else "other"
            self.counts[(route, status[0])] += 1
_END = object()


async def _first(stream: AsyncIterator) -> Any:
    """The stream's first item (or _END), fetched before the response starts so that errors are 4xx."""
    try:
        return await stream.__anext__()
    except StopAsyncIteration:
        return _END


async def _stream_events(runner: EngineRunner, streams: List[AsyncIterator], first: List[Any], chunk,
                         prompts: List[List[int]], body: _Body, rids: List[str]) -> AsyncIterator[str]:
    """Interleave the SSE chunks of one or more generations, then the usage chunk (if asked) and [DONE].
    Closed early (the client left), it aborts the generations without awaiting anything: under a cancelled
    anyio scope every await raises again."""
    queue: asyncio.Queue = asyncio.Queue()
    counts = [0] * len(streams)

    async def pump(index: int) -> None:
        try:
            item = first[index]
            while item is not _END:
                await queue.put((index, item))
                item = await _first(streams[index])
        except APIError as exc:
            await queue.put((index, exc))
        finally:
            await queue.put((index, _END))

    tasks = [asyncio.create_task(pump(i)) for i in range(len(streams))]
    try:
        open_streams = len(streams)
        while open_streams:
            index, item = await queue.get()
            if item is _END:
                open_streams -= 1
                continue
            if isinstance(item, APIError):
                yield _sse({"error": {"message": item.message, "type": item.kind, "param": None, "code": item.code}})
                continue
            delta, reason, n = item
            counts[index] = n
            yield _sse(chunk(index, delta, reason))
        include_usage = bool((body.stream_options or {}).get("include_usage"))
        if include_usage:
            head = chunk(0, "", None)
            n_in = sum(len(p) for p in prompts)
            yield _sse({**{k: head[k] for k in ("id", "object", "created", "model")}, "choices": [],
                        "usage": {"prompt_tokens": n_in, "completion_tokens": sum(counts),
                                  "total_tokens": n_in + sum(counts)}})
        yield "data: [DONE]\n\n"
    finally:
        for t in tasks:
            t.cancel()
        for rid in rids:
            runner.abort_soon(rid)  # a no-op for finished requests


def _prometheus(m: Dict[str, Any], http_counts: Dict[Tuple[str, int], int], started: float) -> str:
    lines: List[str] = []

    def metric(name: str, kind: str, help_text: str, samples: List[Tuple[str, Any]]) -> None:
        lines.append(f"# HELP kangaroo_rt_{name} {help_text}")
        lines.append(f"# TYPE kangaroo_rt_{name} {kind}")
        for labels, value in samples:
            lines.append(f"kangaroo_rt_{name}{labels} {float(value):.6g}" if isinstance(value, float)
                         else f"kangaroo_rt_{name}{labels} {value}")

    metric("slots", "gauge", "Cache slots (max concurrent requests).", [("", m["slots_total"])])
    metric("requests_running", "gauge", "Requests holding a slot.", [("", m["requests_running"])])
    metric("requests_waiting", "gauge", "Requests queued for a slot.", [("", m["requests_waiting"])])
    for key, text in (("added", "Requests accepted."), ("finished", "Requests that finished."),
                      ("aborted", "Requests aborted (client left or stop string)."),
                      ("refused", "Requests refused at admission.")):
        metric(f"requests_{key}_total", "counter", text, [("", m[f"requests_{key}_total"])])
    metric("prompt_tokens_total", "counter", "Prompt tokens of accepted requests.", [("", m["prompt_tokens_total"])])
    metric("generation_tokens_total", "counter", "Tokens generated.", [("", m["generated_tokens_total"])])
    metric("steps_total", "counter", "Engine steps.", [("", m["steps_total"])])
    metric("rounds_total", "counter", "Kangaroo rounds (row-rounds).", [("", m["rounds_total"])])
    metric("mean_accepted_tokens", "gauge", "Tokens committed per Kangaroo round, bonus included (MAT).",
           [("", float(m["mat"]))])
    metric("draft_acceptance_rate", "gauge", "P(draft i accepted | proposed), by draft position.",
           [(f'{{position="{i + 1}"}}', float(a)) for i, a in enumerate(m["acceptance_by_position"]) if a is not None])
    metric("phase_seconds_total", "counter", "Engine time by phase.",
           [(f'{{phase="{p}"}}', float(m[f"{p}_time_s"])) for p in ("prefill", "draft", "verify", "step")])
    metric("http_requests_total", "counter", "HTTP requests by route and status.",
           [(f'{{route="{route}",status="{status}"}}', count) for (route, status), count in sorted(http_counts.items())])
    metric("uptime_seconds", "gauge", "Seconds since the server started.", [("", float(time.time() - started))])
    return "\n".join(lines) + "\n"


def load_engine(model: Optional[str] = None, adapter: Optional[str] = None, tokenizer: Optional[str] = None,
                exit_layer: int = 2, gamma: Optional[int] = None, eta: Optional[float] = None,
                no_kangaroo: bool = False, dtype: Optional[str] = None, device: str = "cpu", max_batch: int = 8,
                max_len: Optional[int] = None, max_queue: int = 1024,
                max_verify_tokens: Optional[int] = None) -> Tuple[Engine, Any]:
    """(engine, tokenizer) for a local target folder (+ adapter folder), or for a named model of
    :mod:`kangaroo_rt.models` (None: the embedded one) with its shipped adapter and settings. EOS: the model config's ids plus the tokenizer's ``eos_token_id``."""
    import torch

    from .config import KangarooConfig
    from .generate import KangarooModel

    torch_dtype = getattr(torch, dtype) if dtype else None
    from . import models

    if model is None or model in models.REGISTRY:
        name = model or "embedded"
        kmodel, tok = models.load_named(name, dtype=torch_dtype, device=device), models.load_tokenizer(name)
        base = kmodel.kangaroo
    else:
        from transformers import AutoTokenizer

        if adapter is None and not no_kangaroo:
            raise ValueError("--adapter is required with --model unless --no-kangaroo")
        kmodel = KangarooModel.from_pretrained(model, None if no_kangaroo else adapter, exit_layer=exit_layer,
                                               dtype=torch_dtype, device=device)
        tok = AutoTokenizer.from_pretrained(tokenizer or model, local_files_only=True)
        base = KangarooConfig()
    kcfg = None if no_kangaroo else KangarooConfig(gamma=base.gamma if gamma is None else gamma,
                                                   eta=base.eta if eta is None else eta)
    eos = list(kmodel.config.eos_token_ids)
    if getattr(tok, "eos_token_id", None) is not None and tok.eos_token_id not in eos:
        eos.append(tok.eos_token_id)
    engine = Engine(kmodel, max_batch=max_batch, max_len=max_len, kangaroo=kcfg, eos_token_id=eos,
                    max_queue=max_queue, max_verify_tokens=max_verify_tokens)
    return engine, tok


def serve(engine: Engine, tokenizer: Any, host: str = "127.0.0.1", port: int = 8000,
          model_name: str = "kangaroo-rt", log_level: str = "info") -> None:
    """Run the server until interrupted (blocking)."""
    import uvicorn

    runner = EngineRunner(engine)
    runner.start()
    try:
        uvicorn.run(create_app(runner, tokenizer, model_name), host=host, port=port, log_level=log_level)
    finally:
        runner.stop()


__all__ = ["EngineRunner", "create_app", "load_engine", "serve"]
