"""OpenAI-compatible HTTP server (FastAPI + uvicorn) on top of `AsyncLLMEngine`.

Endpoints: /v1/completions, /v1/chat/completions (streaming as server-sent events or not),
/v1/models (its `max_model_len` is the real per-request limit: the model's positions or the KV
cache the placement policy lets one request hold, whichever is less), /health (per-instance
liveness; 503 only when no instance can serve), /metrics (Prometheus text), and /admin/instances
(GET: list, POST: add one, DELETE /admin/instances/{id}: drain one). /openapi.json documents
what each route answers; tests/test_api_fuzz.py holds the server to it.

Errors use OpenAI's body `{"error": {"message", "type", "param", "code"}}`: 400 for bad input
(validation errors included, which FastAPI would answer with 422; `param` names the field; types
are strict as at OpenAI), 404 for an unknown model, 405 (with `Allow`) for a wrong method, 413 for
a body over `max_request_bytes` (refused before it is parsed), 429 (with `Retry-After`) when the
waiting queue is full, 503 once the engine died or while the server shuts down. A client that
disconnects gets its requests aborted in the engine, which frees all their KV blocks, local and
remote.

String prompts and chat templates are tokenized here, in worker threads, and the engine gets
token ids: tokenizing in the engine thread would stall every running stream for as long as the
biggest prompt takes (seconds for megabytes of text).

`run_server` shuts down in bounded time: on SIGTERM/SIGINT new requests get 503, running ones
may finish for up to `shutdown_timeout_s`, then the rest are aborted (a stream's last event is an
error saying why, a non-streamed request gets 503) and the process exits 0. A second signal exits
at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import queue
import signal
import threading
import time
import uuid
import weakref
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable, Iterator, Mapping, Optional, Sequence, Union

import uvicorn
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from infinite_llm.async_engine import AsyncLLMEngine, EngineDeadError, RequestStream
from infinite_llm.config import EngineConfig
from infinite_llm.engine import NoLiveInstanceError, QueueFullError, RequestOutput, RequestTooLongError
from infinite_llm.entrypoints.openai_protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    ErrorInfo,
    ErrorResponse,
    MAX_CHOICES_PER_REQUEST,
    HealthResponse,
    ModelCard,
    ModelList,
    UsageInfo,
)
from infinite_llm.sampling import SamplingParams

logger = logging.getLogger(__name__)
# Shutdown progress goes where uvicorn reports its own (configured by uvicorn, --log-level).
_server_log = logging.getLogger("uvicorn.error")

DEFAULT_MAX_REQUEST_BYTES = 4 << 20
DEFAULT_SHUTDOWN_TIMEOUT_S = 30.0
SHUTDOWN_MESSAGE = "server shutting down"
# After the shutdown timeout aborted the remaining requests, their responses end within a step;
# this bounds the wait for them (and uvicorn's wait for connections) if a client stops reading.
_ABORT_GRACE_S = 5.0
# A refused body is still read (and dropped) up to this size: a server that answers without
# reading what the client is sending makes the client's kernel see a reset, and the client
# usually loses the answer. Bigger bodies are cut off.
_DISCARD_LIMIT = 64 << 20
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_SSE_DONE = "data: [DONE]\n\n"
# Sent with 429 (full waiting queue). The queue drains as running requests finish, which takes
# about a second at typical output lengths; a client that honours it does not hammer the server.
RETRY_AFTER_S = 1


class APIError(Exception):
    """An error with an HTTP status and an OpenAI-style body."""

    def __init__(
        self, status: int, message: str, type: str = "invalid_request_error",
        param: Optional[str] = None, code: Optional[str] = None, headers: Optional[dict[str, str]] = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers


class ServerShuttingDownError(RuntimeError):
    """The server is shutting down: the request was refused, or aborted after the timeout."""


def error_response(status: int, message: str, type: str, param: Optional[str] = None,
                   code: Optional[str] = None, headers: Optional[Mapping[str, str]] = None) -> JSONResponse:
    body = ErrorResponse(error=ErrorInfo(message=message, type=type, param=param, code=code))
    return JSONResponse(status_code=status, content=body.model_dump(), headers=headers)


def _api_error_response(err: APIError) -> JSONResponse:
    return error_response(err.status, err.message, err.type, err.param, err.code, err.headers)


def _api_error_from(exc: BaseException) -> APIError:
    """Map an engine exception to the HTTP answer the client should see."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, QueueFullError):
        return APIError(429, str(exc), "rate_limit_error", code="queue_full",
                        headers={"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(exc, RequestTooLongError):
        return APIError(400, str(exc), param="max_tokens", code="context_length_exceeded")
    if isinstance(exc, (ValueError, TypeError)):
        # SamplingParamError (a ValueError) names the offending field.
        return APIError(400, str(exc), param=getattr(exc, "param", None))
    if isinstance(exc, NoLiveInstanceError):
        return APIError(503, str(exc), "service_unavailable", code="no_live_instance")
    if isinstance(exc, EngineDeadError):
        return APIError(503, str(exc), "service_unavailable", code="engine_dead")
    if isinstance(exc, ServerShuttingDownError):
        return APIError(503, str(exc), "service_unavailable", code="shutting_down")
    return APIError(500, f"internal error: {exc!r}", "internal_error")


# --------------------------------------------------------------- blocking work off the loop
class WorkerPool:
    """A few daemon threads for blocking calls (tokenization) made from async code.

    Not `asyncio.to_thread`/`concurrent.futures`: their worker threads are joined when the loop
    or the interpreter exits, so a huge prompt being tokenized would hold up a bounded shutdown.
    Threads start on first use.
    """

    def __init__(self, num_threads: int = min(4, os.cpu_count() or 1), name: str = "api-worker") -> None:
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._num_threads, self._name = max(1, num_threads), name
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(*args)` in a worker thread; its result or exception."""
        self._start()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._jobs.put((loop, future, fn, args))
        return await future

    def _start(self) -> None:
        with self._lock:
            while len(self._threads) < self._num_threads:
                thread = threading.Thread(target=self._work, name=f"{self._name}-{len(self._threads)}", daemon=True)
                thread.start()
                self._threads.append(thread)

    def _work(self) -> None:
        while True:
            loop, future, fn, args = self._jobs.get()
            if future.cancelled():  # the caller gave up (e.g. the client disconnected) before we started
                continue
            try:
                result, error = fn(*args), None
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
                result, error = None, exc
            with contextlib.suppress(RuntimeError):  # the caller's loop is closed: nobody is waiting
                loop.call_soon_threadsafe(_settle, future, result, error)


def _settle(future: asyncio.Future, result: Any, error: Optional[BaseException]) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _encode(tokenizer: Any, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    """Token ids of `texts`; runs in a worker thread.

    `encode_batch` of the `tokenizers` library releases the GIL while it works; its `encode`
    holds it for the whole call, which would freeze the event loop and the engine thread (so
    every stream) just as much as tokenizing in the engine did.
    """
    # Texts are valid Unicode by now (the request models and `_encode_chat` refuse lone
    # surrogates, on which `tokenizers` fails with "TextInputSequence must be str").
    backend = getattr(tokenizer, "backend", None)
    if backend is not None and hasattr(backend, "encode_batch"):
        return [e.ids for e in backend.encode_batch(texts, add_special_tokens=add_special_tokens)]
    return [tokenizer.encode(t, add_special_tokens=add_special_tokens) for t in texts]


class _InvalidText(ValueError):
    """Text that is no valid Unicode; the message says where."""


def _unicode_problem(text: Any, where: str) -> str:
    """Why `text` is no valid Unicode. A Python str can hold a lone surrogate (JSON "\ud800"),
    which no tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as bad:
        return f"{where} is not valid Unicode: lone surrogate {text[bad.start]!r} at character {bad.start}"
    except AttributeError:  # not a str at all
        pass
    return f"{where} is not valid Unicode"


def _check_unicode(text: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise _InvalidText(_unicode_problem(text, where)) from None


def _encode_chat(tokenizer: Any, messages: list[dict]) -> list[int]:
    """Render the chat template and tokenize it; runs in a worker thread."""
    # Checked per message: once rendered, a bad character's position means nothing to the client.
    for i, message in enumerate(messages):
        _check_unicode(message["content"], f"messages[{i}].content")
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    # The template already carries the special tokens (BOS); do not add them twice.
    return _encode(tokenizer, [text], add_special_tokens=False)[0]


def _decode_all(tokenizer: Any, prompts: list[list[int]]) -> list[str]:
    return [tokenizer.decode(p) for p in prompts]


# ----------------------------------------------------------------------- body size limit
class _BodyTooLarge(StarletteHTTPException):
    # An HTTPException, so that FastAPI's body reading passes it through instead of turning it
    # into "There was an error parsing the body" (400).
    def __init__(self, limit: int, seen: Optional[int] = None) -> None:
        size = f" ({seen} bytes)" if seen is not None else ""
        super().__init__(413, f"the request body{size} exceeds this server's limit of {limit} bytes "
                              "(--max-request-bytes)")


def _too_large_response(exc: _BodyTooLarge) -> JSONResponse:
    return error_response(413, str(exc.detail), "invalid_request_error", code="request_too_large")


async def _discard_body(receive: Receive, budget: int) -> None:
    """Read and drop the rest of a refused body (see `_DISCARD_LIMIT`)."""
    seen = 0
    while seen <= budget:
        message = await receive()
        if message["type"] != "http.request":
            return
        seen += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


class BodyLimitMiddleware:
    """Answer 413 to a request whose body exceeds `max_bytes`, before anything parses it.

    A declared Content-Length over the limit is refused at once. Otherwise the bytes are counted
    as they arrive (chunked uploads declare no length), and the request fails as soon as the
    count passes the limit.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = _content_length(headers.get(b"content-length"))
        if declared is not None and declared > self.max_bytes:
            # A client waiting for "100 Continue" has not sent the body, and never will now.
            if headers.get(b"expect", b"").lower() != b"100-continue" and declared <= _DISCARD_LIMIT:
                await _discard_body(receive, declared)
            await _too_large_response(_BodyTooLarge(self.max_bytes, declared))(scope, receive, send)
            return
        seen = 0

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    if message.get("more_body", False):
                        await _discard_body(receive, _DISCARD_LIMIT - seen)
                    raise _BodyTooLarge(self.max_bytes)
            return message

        try:
            await self.app(scope, counting_receive, send)
        except _BodyTooLarge as exc:  # raised where no exception handler turned it into a 413
            await _too_large_response(exc)(scope, receive, send)


def _content_length(raw: Optional[bytes]) -> Optional[int]:
    try:
        return int(raw) if raw is not None else None
    except ValueError:
        return None  # the HTTP layer rejects a malformed Content-Length; nothing to add here


# ------------------------------------------------------------------------------ lifecycle
class ServerLifecycle:
    """In-flight requests and the shutdown state of one app.

    `LifecycleMiddleware` counts the HTTP requests being served (a streamed response counts until
    its last byte is sent); handlers refuse new work once `draining`, and register their engine
    streams so that `drain()` can abort whatever outlives the timeout.
    """

    def __init__(self) -> None:
        self.draining = False
        self.aborted = False
        self.num_inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        # Weak: a stream whose response is gone needs no abort and must not be kept alive.
        self._streams: "weakref.WeakSet[RequestStream]" = weakref.WeakSet()

    def request_started(self) -> None:
        self.num_inflight += 1
        self._idle.clear()

    def request_finished(self) -> None:
        self.num_inflight -= 1
        if self.num_inflight == 0:
            self._idle.set()

    def check_accepting(self) -> None:
        if self.draining:
            raise APIError(503, f"{SHUTDOWN_MESSAGE}: not accepting new requests", "service_unavailable",
                           code="shutting_down")

    def track(self, streams: Sequence[RequestStream]) -> None:
        """Register admitted streams; past the timeout they are aborted straight away."""
        for stream in streams:
            if self.aborted:
                stream.fail(ServerShuttingDownError(SHUTDOWN_MESSAGE))
            else:
                self._streams.add(stream)

    async def wait_idle(self, timeout_s: float) -> bool:
        """True once no request is in flight; False if that takes longer than `timeout_s`."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
            return True
        except asyncio.TimeoutError:
            return False

    async def drain(self, timeout_s: float) -> int:
        """Stop accepting, let in-flight requests finish for up to `timeout_s`, then abort the
        rest. Returns the number of engine requests aborted."""
        self.draining = True
        if await self.wait_idle(timeout_s):
            return 0
        self.aborted = True
        running = [s for s in list(self._streams) if not s.finished]
        for stream in running:
            stream.fail(ServerShuttingDownError(SHUTDOWN_MESSAGE))
        await self.wait_idle(_ABORT_GRACE_S)
        return len(running)


class LifecycleMiddleware:
    """Counts in-flight HTTP requests for `ServerLifecycle` (the ASGI call of a streamed
    response returns only after its last chunk)."""

    def __init__(self, app: ASGIApp, lifecycle: ServerLifecycle) -> None:
        self.app, self.lifecycle = app, lifecycle

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        self.lifecycle.request_started()
        try:
            await self.app(scope, receive, send)
        finally:
            self.lifecycle.request_finished()


# ------------------------------------------------------------------------- request planning
@dataclass
class _Choice:
    """One engine request serving choice `index` of an HTTP request."""

    index: int
    prompt_index: int
    request_id: str
    prompt: list[int]
    params: SamplingParams


class _TextDelta:
    """A stream's text pieces: the engine's delta outputs (its detokenizer already holds back
    text that could still turn into a stop string), after an echoed prompt, if any."""

    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix

    def update(self, output: RequestOutput) -> str:
        delta = output.text
        if self.prefix:
            delta, self.prefix = self.prefix + delta, ""
        return delta


def _check_model(engine: AsyncLLMEngine, model: Optional[str]) -> None:
    if model is not None and model != engine.model_name:
        raise APIError(404, f"The model `{model}` does not exist; this server serves `{engine.model_name}`.",
                       param="model", code="model_not_found")


def _check_supported(unsupported: list[str]) -> None:
    if unsupported:
        raise APIError(400, f"not supported by this server: {', '.join(unsupported)}", param=unsupported[0])


def _check_n(n: int, num_prompts: int) -> None:
    # n alone is bounded by the request model; the product only here.
    if n * num_prompts > MAX_CHOICES_PER_REQUEST:
        raise APIError(400, f"prompts x n = {n * num_prompts} exceeds {MAX_CHOICES_PER_REQUEST}", param="n")


def _normalize_prompts(prompt: Any) -> list[Union[str, list[int]]]:
    """str | list[int] | list[str] | list[list[int]]  ->  a list of prompts. The request model
    already refused empty ones."""
    if isinstance(prompt, str):
        return [prompt]
    if all(isinstance(t, int) for t in prompt):
        return [list(prompt)]
    return list(prompt)


def _make_params(n: int, make_params: Callable[[int], SamplingParams], stream: bool) -> list[SamplingParams]:
    """The sampling params of choices 0..n-1 of each prompt, validated before any tokenizing.
    A stream takes delta outputs (O(1) work per token), a plain response only the final one."""
    try:
        params = [make_params(j) for j in range(n)]
    except ValueError as exc:  # SamplingParamError names the field
        raise APIError(400, str(exc), param=getattr(exc, "param", None)) from exc
    for p in params:
        p.output_kind = "delta" if stream else "final_only"
    return params


def _plan_choices(base_id: str, prompts: list[list[int]], params: list[SamplingParams]) -> list[_Choice]:
    n = len(params)
    return [
        _Choice(p_idx * n + j, p_idx, f"{base_id}-{p_idx * n + j}", prompt, params[j])
        for p_idx, prompt in enumerate(prompts)
        for j in range(n)
    ]


def _context_limit(engine: AsyncLLMEngine) -> int:
    """The most tokens (prompt + output) one request may hold: the model's positions or what the
    placement policy lets one request keep in the KV cache on the live instances, whichever is
    less. It changes as instances join or die; `LLMEngine.max_context` is safe from any thread."""
    return engine.engine.max_context()  # type: ignore[union-attr]


def _check_fits_context(engine: AsyncLLMEngine, prompt: list[int], param: str) -> None:
    # A prompt with no room left for one output token can never run. Refusing it here spares the
    # engine thread an O(prompt) validation of a request it would refuse anyway, and names the
    # prompt (not max_tokens) as the field at fault.
    limit = _context_limit(engine)
    if len(prompt) + 1 > limit:
        raise APIError(400, f"the prompt has {len(prompt)} tokens; this server's limit of {limit} tokens per "
                            "request (max_model_len in /v1/models) leaves no room for a completion",
                       param=param, code="context_length_exceeded")


async def _tokenize_prompts(workers: WorkerPool, engine: AsyncLLMEngine,
                            prompts: list[Union[str, list[int]]]) -> list[list[int]]:
    """Token ids of every prompt; the string ones are tokenized in a worker thread, together."""
    texts = [p for p in prompts if isinstance(p, str)]
    encoded: Iterator[list[int]] = iter(())
    if texts:
        try:
            encoded = iter(await workers.run(_encode, engine.tokenizer, texts, True))
        except ValueError as exc:
            raise APIError(400, f"cannot tokenize the prompt: {exc}", param="prompt") from exc
    token_lists = [next(encoded) if isinstance(p, str) else list(p) for p in prompts]
    for ids in token_lists:
        _check_fits_context(engine, ids, "prompt")
    return token_lists


async def _admit(engine: AsyncLLMEngine, choices: list[_Choice], arrival: float,
                 limit_field: str) -> list[RequestStream]:
    """Admit all choices or none: on any refusal the admitted ones are aborted. A prompt that
    fits but not with its output names `limit_field`, the token limit the client sent."""
    results = await asyncio.gather(
        *(engine.add_request(c.prompt, c.params, c.request_id, arrival) for c in choices),
        return_exceptions=True,
    )
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        for r in results:
            if isinstance(r, RequestStream):
                r.abort()
        err = _api_error_from(errors[0])
        if err.code == "context_length_exceeded":
            err.param = limit_field
        raise err
    return list(results)  # type: ignore[arg-type]


async def _merge(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several request streams as (position, output), in arrival order."""
    if len(streams) == 1:
        async for output in streams[0]:
            yield 0, output
        return
    queue: asyncio.Queue[tuple[int, Optional[RequestOutput], Optional[BaseException]]] = asyncio.Queue()

    async def pump(position: int, stream: RequestStream) -> None:
        try:
            async for output in stream:
                queue.put_nowait((position, output, None))
        except Exception as exc:  # noqa: BLE001 - forwarded to the consumer
            queue.put_nowait((position, None, exc))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(streams)
    try:
        while remaining:
            position, output, error = await queue.get()
            if error is not None:
                raise error
            assert output is not None
            if output.finished:
                remaining -= 1
            yield position, output
    finally:
        for task in tasks:
            task.cancel()


async def _collect(streams: list[RequestStream]) -> list[RequestOutput]:
    final: list[Optional[RequestOutput]] = [None] * len(streams)
    async for position, output in _merge(streams):
        final[position] = output
    return [o for o in final if o is not None]


async def _wait_for_disconnect(request: Request) -> None:
    # The body has been read, so the next ASGI message can only be the disconnect.
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _collect_unless_disconnected(request: Request, streams: list[RequestStream]) -> Optional[list[RequestOutput]]:
    """Wait for all final outputs; None (and every request aborted) if the client went away first."""
    work = asyncio.ensure_future(_collect(streams))
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if work in done:
            return work.result()
        return None
    finally:
        watcher.cancel()
        work.cancel()
        for stream in streams:
            stream.abort()


def _usage(choices: list[_Choice], outputs: dict[int, RequestOutput]) -> UsageInfo:
    # The prompt is counted once per prompt, however many choices (n) it has.
    prompt_tokens, seen_prompts, completion_tokens = 0, set(), 0
    for c in choices:
        out = outputs.get(c.index)
        if out is None:
            continue
        if c.prompt_index not in seen_prompts:
            seen_prompts.add(c.prompt_index)
            prompt_tokens += len(out.prompt_token_ids)
        completion_tokens += out.num_output_tokens
    return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=prompt_tokens + completion_tokens)


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _sse_error(exc: BaseException) -> str:
    err = _api_error_from(exc)
    body = ErrorResponse(error=ErrorInfo(message=err.message, type=err.type, param=err.param, code=err.code))
    return _sse(body.model_dump())


# -------------------------------------------------------------------------------- routes
# What each route may answer, for /openapi.json (the fuzz test holds the server to it).
_ERROR_DESCRIPTIONS = {
    400: "invalid request; `param` names the field at fault",
    404: "unknown model",
    413: "request body over --max-request-bytes",
    429: "the waiting queue is full; retry after Retry-After seconds",
    500: "the instance could not be started",
    503: "the engine is dead, no instance is alive, or the server is shutting down",
}
# Before OpenAPI 3.2 (`itemSchema`), the schema of text/event-stream describes one event.
_SSE_SCHEMA = {"schema": {
    "type": "object", "required": ["data"],
    "properties": {"data": {"type": "string", "description": "a chunk object as JSON; an error object as JSON "
                                                            "if the stream fails; the last event is [DONE]"}},
}}


def _schema_ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _error_responses(*statuses: int) -> dict[Union[int, str], dict[str, Any]]:
    responses: dict[Union[int, str], dict[str, Any]] = {
        s: {"model": ErrorResponse, "description": _ERROR_DESCRIPTIONS[s]} for s in statuses}
    if 429 in responses:
        responses[429]["headers"] = {"Retry-After": {"required": True, "schema": {"type": "integer"},
                                                     "description": "seconds to wait before retrying"}}
    return responses


# Routes read the engine and helpers from `request.app.state` (set by `build_app`), so one
# module-level router serves any number of apps.
router = APIRouter()


def _engine(request: Request) -> AsyncLLMEngine:
    return request.app.state.engine


@router.get("/health", response_model=None, responses={
    200: {"model": HealthResponse, "description": "some instance can serve"},
    503: {"description": "shutting down, the engine is dead, or no instance is alive",
          "content": {"application/json": {"schema": {"anyOf": [_schema_ref(ErrorResponse), _schema_ref(HealthResponse)]}}}},
})
async def health(request: Request) -> Response:
    engine = _engine(request)
    if request.app.state.lifecycle.draining:  # load balancers should stop sending work here
        return error_response(503, SHUTDOWN_MESSAGE, "service_unavailable", code="shutting_down")
    if not engine.is_healthy:
        return error_response(503, f"the engine is not running: {engine.dead_error}", "service_unavailable",
                              code="engine_dead")
    instances = engine.instance_health()
    if not engine.can_serve():
        body = {"status": "unavailable", "instances": instances,
                "error": {"message": "no instance is alive", "type": "service_unavailable", "code": "no_live_instance"}}
        return JSONResponse(body, status_code=503)
    status = "ok" if all(i["state"] == "alive" for i in instances) else "degraded"
    return JSONResponse({"status": status, "instances": instances})


@router.get("/admin/instances", responses={200: {"description": "every member instance and its health"}})
async def list_instances(request: Request) -> JSONResponse:
    return JSONResponse({"instances": _engine(request).instance_health()})


@router.post("/admin/instances", status_code=201, responses=_error_responses(500, 503))
async def add_instance(request: Request) -> JSONResponse:
    """Start one more instance (also how a dead one is replaced: the new one gets a new id)."""
    engine = _engine(request)
    try:
        instance = await asyncio.to_thread(engine.add_instance)
    except Exception as exc:  # noqa: BLE001 - reported to the operator
        raise _api_error_from(exc) from exc
    return JSONResponse({"instance": instance, "instances": engine.instance_health()}, status_code=201)


@router.delete("/admin/instances/{instance}", responses=_error_responses(400, 503))
async def remove_instance(request: Request, instance: int) -> JSONResponse:
    """Drain an instance: its requests (and those with KV on it) are recomputed elsewhere."""
    engine = _engine(request)
    try:
        engine.remove_instance(instance)
    except Exception as exc:  # noqa: BLE001 - e.g. not a live instance: 400
        raise _api_error_from(exc) from exc
    return JSONResponse({"removed": instance})


@router.get("/metrics", response_class=PlainTextResponse, responses={
    200: {"description": "Prometheus text exposition", "content": {"text/plain": {"schema": {"type": "string"}}}},
    503: {"description": "the engine did not start",  # JSON, unlike the route's text/plain
          "content": {"application/json": {"schema": _schema_ref(ErrorResponse)}}},
})
async def metrics(request: Request) -> Response:
    engine = _engine(request)
    if engine.metrics is None:
        return error_response(503, "metrics unavailable: the engine did not start", "service_unavailable")
    stats = engine.latest_stats()
    if stats is not None:
        engine.metrics.update_engine_stats(stats)
    body, content_type = engine.metrics.render()
    return Response(content=body, media_type=content_type)


@router.get("/v1/models", responses={200: {"model": ModelList, "description": "the served model"}})
async def models(request: Request) -> JSONResponse:
    engine = _engine(request)
    card = ModelCard(id=engine.model_name, max_model_len=_context_limit(engine),
                     vocab_size=engine.model_config.vocab_size)
    return JSONResponse(ModelList(data=[card]).model_dump())


@router.post("/v1/completions", responses={
    200: {"model": CompletionResponse, "description": "the completion (stream: server-sent events)",
          "content": {"text/event-stream": _SSE_SCHEMA}},
    **_error_responses(400, 404, 413, 429, 503),
})
async def completions(body: CompletionRequest, request: Request) -> Response:
    arrival = time.monotonic()
    engine, state = _engine(request), request.app.state
    state.lifecycle.check_accepting()
    _ensure_healthy(engine)  # before tokenizing: a dead engine needs no prompt
    _check_model(engine, body.model)
    _check_supported(body.unsupported_fields())
    prompts = _normalize_prompts(body.prompt)
    _check_n(body.n, len(prompts))
    params = _make_params(body.n, body.to_sampling_params, body.stream)
    base_id = f"cmpl-{uuid.uuid4().hex}"
    choices = _plan_choices(base_id, await _tokenize_prompts(state.workers, engine, prompts), params)
    echo = [""] * len(prompts)

    async def decode_echo() -> None:
        # Decoded only once the engine admitted the prompts, so a bad token id gets the
        # engine's 400, not a decoding error.
        ids = [p for p in prompts if not isinstance(p, str)]
        decoded = iter(await state.workers.run(_decode_all, engine.tokenizer, ids) if ids else ())
        echo[:] = [p if isinstance(p, str) else next(decoded) for p in prompts]

    def events(created: int, streams: list[RequestStream]) -> AsyncIterator[str]:
        return _completion_events(engine, body, base_id, created, choices, streams, echo)

    def response(created: int, by_index: dict[int, RequestOutput]) -> CompletionResponse:
        return CompletionResponse(
            id=base_id, created=created, model=engine.model_name,
            choices=[
                CompletionChoice(index=c.index, text=echo[c.prompt_index] + by_index[c.index].text,
                                 finish_reason=by_index[c.index].finish_reason)
                for c in choices
            ],
            usage=_usage(choices, by_index),
        )

    return await _serve_choices(request, choices, arrival, body.stream, events, response,
                                prepare=decode_echo if body.echo else None)


@router.post("/v1/chat/completions", responses={
    200: {"model": ChatCompletionResponse, "description": "the chat completion (stream: server-sent events)",
          "content": {"text/event-stream": _SSE_SCHEMA}},
    **_error_responses(400, 404, 413, 429, 503),
})
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    arrival = time.monotonic()
    engine, state = _engine(request), request.app.state
    state.lifecycle.check_accepting()
    _ensure_healthy(engine)
    _check_model(engine, body.model)
    _check_supported(body.unsupported_fields())
    _check_n(body.n, 1)
    params = _make_params(body.n, body.to_sampling_params, body.stream)
    try:
        messages = [{"role": m.role, "content": m.text_content()} for m in body.messages]
        prompt_ids = await state.workers.run(_encode_chat, engine.tokenizer, messages)
    except _InvalidText as exc:
        raise APIError(400, str(exc), param="messages") from exc
    except ValueError as exc:  # includes the template's own raise_exception
        raise APIError(400, f"cannot apply the chat template: {exc}", param="messages") from exc
    if not prompt_ids:
        raise APIError(400, "the chat prompt is empty", param="messages")
    _check_fits_context(engine, prompt_ids, "messages")
    base_id = f"chatcmpl-{uuid.uuid4().hex}"
    choices = _plan_choices(base_id, [prompt_ids], params)

    def events(created: int, streams: list[RequestStream]) -> AsyncIterator[str]:
        return _chat_events(engine, body, base_id, created, choices, streams)

    def response(created: int, by_index: dict[int, RequestOutput]) -> ChatCompletionResponse:
        return ChatCompletionResponse(
            id=base_id, created=created, model=engine.model_name,
            choices=[
                ChatChoice(index=c.index, message=AssistantMessage(content=by_index[c.index].text),
                           finish_reason=by_index[c.index].finish_reason)
                for c in choices
            ],
            usage=_usage(choices, by_index),
        )

    return await _serve_choices(request, choices, arrival, body.stream, events, response,
                                limit_field=body.token_limit_field)


# ------------------------------------------------------------------------------- the app
_ENGINE_ERRORS = (EngineDeadError, ServerShuttingDownError, NoLiveInstanceError, QueueFullError,
                  RequestTooLongError)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _on_api_error(_: Request, exc: APIError) -> JSONResponse:
        return _api_error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _on_validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if isinstance(exc, _BodyTooLarge):
            return _too_large_response(exc)
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        headers = dict(exc.headers or {})
        if exc.status_code == 405:  # RFC 9110: a 405 lists the methods the resource supports
            headers["Allow"] = ", ".join(_allowed_methods(request))
        return error_response(exc.status_code, str(exc.detail), kind, headers=headers)

    async def _on_engine_error(_: Request, exc: Exception) -> JSONResponse:
        return _api_error_response(_api_error_from(exc))

    # The engine's refusals and failures, wherever in a handler they surface, are answers, not
    # crashes. They must not reach the catch-all below: Starlette re-raises after that one, so
    # uvicorn logs "Exception in ASGI application" and drops the keep-alive connection.
    for expected in _ENGINE_ERRORS:
        app.add_exception_handler(expected, _on_engine_error)

    @app.exception_handler(Exception)
    async def _on_unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        return _api_error_response(_api_error_from(exc))


_PROMPT_SHAPE = ("prompt must be a string, a list of token ids (integers >= 0), or a list of strings or of "
                 "token-id lists")
_EMPTY_PROMPT = "the prompt is empty: every prompt needs at least one token or character"
_TOO_SHORT = ("string_too_short", "too_short")
_BRANCH_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})


_HTTP_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at this path. Starlette's own 405 names only the first
    route matching the path (GET /admin/instances hid POST). Each method is tried against the
    routes, since included routers do not expose their routes' methods."""
    routes = request.app.router.routes
    return [method for method in _HTTP_METHODS
            if any(route.matches({**request.scope, "method": method})[0] == Match.FULL for route in routes)]


def _prompt_problem(errors: list[dict[str, Any]]) -> str:
    """One message for a prompt that fits no shape: the union's per-branch complaints are noise."""
    for err in errors:
        if err.get("type") == "string_unicode":
            return _unicode_problem(err.get("input"), "the prompt")
    if any(err.get("type") in _TOO_SHORT for err in errors):
        return _EMPTY_PROMPT
    return _PROMPT_SHAPE


def _field_path(loc: Sequence[Any]) -> list[str]:
    """A pydantic error location as the client's field path: without "body" and without the
    names pydantic gives the branches of a union ("str", "constrained-str", "list[int]")."""
    return [str(x) for x in loc
            if x != "body" and (isinstance(x, int) or (x.isidentifier() and x not in _BRANCH_TAGS))]


def _validation_error_response(exc: RequestValidationError) -> JSONResponse:
    problems: list[str] = []
    param = None
    errors = [{**err, "loc": _field_path(err.get("loc", ()))} for err in exc.errors()]
    prompt_errors = [err for err in errors if err["loc"][:1] == ["prompt"]]
    if prompt_errors:
        problems.append(_prompt_problem(prompt_errors))
        param = "prompt"
    for err in errors:
        loc = err["loc"]
        if err.get("type") == "json_invalid":
            problems.append(f"the body is not valid JSON: {err.get('ctx', {}).get('error', err.get('msg'))}")
        elif loc[:1] != ["prompt"]:
            param = param or (loc[0] if loc else None)
            field = ".".join(loc) or "body"
            problem = (_unicode_problem(err.get("input"), field) if err.get("type") == "string_unicode"
                       else f"{field}: {err.get('msg')}")
            if problem not in problems:
                problems.append(problem)
    return error_response(400, "; ".join(problems) or "invalid request", "invalid_request_error", param)


def _openapi_as_served(app: FastAPI) -> Callable[[], dict[str, Any]]:
    """`app.openapi`, minus the 422 answers FastAPI documents for every route with parameters:
    this server turns validation errors into 400 (`_validation_error_response`), which each route
    documents itself."""
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            for operations in schema.get("paths", {}).values():
                for operation in operations.values():
                    operation.get("responses", {}).pop("422", None)
            components = schema.get("components", {}).get("schemas", {})
            for unused in ("HTTPValidationError", "ValidationError"):
                components.pop(unused, None)
            app.openapi_schema = schema
        return app.openapi_schema
    return openapi


def build_app(engine: AsyncLLMEngine, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES) -> FastAPI:
    """The FastAPI app serving `engine`. The caller owns the engine's lifetime.

    `app.state.lifecycle` is the app's `ServerLifecycle` (`run_server` drains it on SIGTERM).
    """
    if max_request_bytes < 1:
        raise ValueError(f"max_request_bytes must be positive, got {max_request_bytes}")
    app = FastAPI(title="Infinite-LLM OpenAI-compatible server")
    app.state.engine = engine
    app.state.lifecycle = ServerLifecycle()
    app.state.workers = WorkerPool()
    _install_error_handlers(app)
    app.include_router(router)
    app.openapi = _openapi_as_served(app)  # type: ignore[method-assign]
    # Added last = outermost: a request is counted from its first byte, and an oversized body
    # is refused before anything inside reads it.
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_request_bytes)
    app.add_middleware(LifecycleMiddleware, lifecycle=app.state.lifecycle)
    return app


def _ensure_healthy(engine: AsyncLLMEngine) -> None:
    if not engine.is_healthy:
        raise APIError(503, f"the engine is not running: {engine.dead_error}", "service_unavailable",
                       code="engine_dead")


async def _serve_choices(
    request: Request,
    choices: list[_Choice],
    arrival: float,
    stream: bool,
    events: Callable[[int, list[RequestStream]], AsyncIterator[str]],
    response: Callable[[int, dict[int, RequestOutput]], BaseModel],
    prepare: Optional[Callable[[], Awaitable[None]]] = None,
    limit_field: str = "max_tokens",
) -> Response:
    """Admit `choices` and answer with them: the skeleton both endpoints share.

    `prepare()` runs once the engine admitted every choice. Streaming: `events(created, streams)`
    is served as server-sent events (the generator aborts the requests however it ends).
    Otherwise every final output is awaited and `response(created, {choice index: output})` is
    sent as JSON, unless the client disconnects first: then every request is aborted (freeing
    its KV blocks) and 499 is returned.
    """
    engine, lifecycle = _engine(request), request.app.state.lifecycle
    streams = await _admit(engine, choices, arrival, limit_field)
    lifecycle.track(streams)
    try:
        if prepare is not None:
            await prepare()
    except BaseException:
        for s in streams:
            s.abort()
        raise
    created = int(time.time())
    if stream:
        return StreamingResponse(events(created, streams), media_type="text/event-stream", headers=_SSE_HEADERS)
    try:
        outputs = await _collect_unless_disconnected(request, streams)
    except (EngineDeadError, ServerShuttingDownError) as exc:
        raise _api_error_from(exc) from exc
    if outputs is None:
        return Response(status_code=499)
    by_index = {c.index: o for c, o in zip(choices, outputs)}
    return JSONResponse(response(created, by_index).model_dump())


async def _sse_stream(
    choices: list[_Choice],
    streams: list[RequestStream],
    deltas: list[_TextDelta],
    include_usage: bool,
    chunk: Callable[[list, Optional[UsageInfo]], str],
    chunks_for: Callable[[_Choice, str, RequestOutput], list[str]],
    opening: Sequence[str] = (),
) -> AsyncIterator[str]:
    """The event stream both endpoints share; they differ only in how a chunk looks.

    Yields `opening`, then `chunks_for(choice, new text, output)` for every output as it comes,
    then (with `include_usage`) a usage chunk, then `[DONE]`. An engine that dies mid-stream, or
    a shutdown that aborts the stream, becomes an error event followed by `[DONE]`, since the
    200 status is already sent.
    """
    final: dict[int, RequestOutput] = {}
    try:
        for event in opening:
            yield event
        async for position, output in _merge(streams):
            c = choices[position]
            text = deltas[position].update(output)
            if output.finished:
                final[c.index] = output
            for event in chunks_for(c, text, output):
                yield event
        if include_usage:
            yield chunk([], _usage(choices, final))
        yield _SSE_DONE
    except (EngineDeadError, ServerShuttingDownError) as exc:
        yield _sse_error(exc)
        yield _SSE_DONE
    finally:
        # Runs on normal end, on error and when the client disconnects (the task is cancelled).
        for stream in streams:
            stream.abort()


def _completion_events(
    engine: AsyncLLMEngine, body: CompletionRequest, base_id: str, created: int,
    choices: list[_Choice], streams: list[RequestStream], echo_text: list[str],
) -> AsyncIterator[str]:
    include_usage = body.include_usage_in_stream

    def chunk(choice_list: list[CompletionChoice], usage: Optional[UsageInfo] = None) -> str:
        payload = CompletionChunk(id=base_id, created=created, model=engine.model_name,
                                  choices=choice_list, usage=usage).model_dump()
        if not include_usage:
            payload.pop("usage")
        return _sse(payload)

    def chunks_for(c: _Choice, text: str, output: RequestOutput) -> list[str]:
        if not (text or output.finished):
            return []
        finish_reason = output.finish_reason if output.finished else None
        return [chunk([CompletionChoice(index=c.index, text=text, finish_reason=finish_reason)])]

    deltas = [_TextDelta(echo_text[c.prompt_index]) for c in choices]
    return _sse_stream(choices, streams, deltas, include_usage, chunk, chunks_for)


def _chat_events(
    engine: AsyncLLMEngine, body: ChatCompletionRequest, base_id: str, created: int,
    choices: list[_Choice], streams: list[RequestStream],
) -> AsyncIterator[str]:
    include_usage = body.include_usage_in_stream

    def chunk(choice_list: list[ChatChunkChoice], usage: Optional[UsageInfo] = None) -> str:
        payload = ChatCompletionChunk(id=base_id, created=created, model=engine.model_name,
                                      choices=choice_list, usage=usage).model_dump()
        for choice in payload["choices"]:  # OpenAI omits unset delta fields
            choice["delta"] = {k: v for k, v in choice["delta"].items() if v is not None}
        if not include_usage:
            payload.pop("usage")
        return _sse(payload)

    def chunks_for(c: _Choice, text: str, output: RequestOutput) -> list[str]:
        events = []
        if text:
            events.append(chunk([ChatChunkChoice(index=c.index, delta=DeltaMessage(content=text))]))
        if output.finished:
            events.append(chunk([ChatChunkChoice(index=c.index, delta=DeltaMessage(),
                                                 finish_reason=output.finish_reason)]))
        return events

    # The role comes first, once per choice.
    opening = [chunk([ChatChunkChoice(index=c.index, delta=DeltaMessage(role="assistant", content=""))])
               for c in choices]
    deltas = [_TextDelta() for c in choices]
    return _sse_stream(choices, streams, deltas, include_usage, chunk, chunks_for, opening)


# ------------------------------------------------------------------------------- serving
class _DrainingServer(uvicorn.Server):
    """uvicorn, with a bounded drain on SIGTERM/SIGINT instead of uvicorn's own signal handling.

    uvicorn waits on a signal for every open response (unbounded: streams can run for minutes),
    exits early only on a second SIGINT, and re-raises the signal once it stopped, so a clean
    shutdown still ends as "killed by SIGTERM". Here the first signal runs `drain` and then stops
    the server; a second one exits the process at once.
    """

    def __init__(self, config: uvicorn.Config, drain: Callable[[], Awaitable[None]]) -> None:
        super().__init__(config)
        self._drain = drain
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._signalled = False
        self._drain_task: Optional[asyncio.Task] = None

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():  # signals need the main thread
            yield
            return
        self._loop = asyncio.get_running_loop()
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        # Runs in the main thread, between bytecodes; the event loop may be anywhere.
        if self._signalled:
            os.write(2, f"received {signal.Signals(signum).name} again: exiting now\n".encode())
            os._exit(128 + signum)
        self._signalled = True
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drain_task = asyncio.ensure_future(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        try:
            await self._drain()
        except Exception:  # noqa: BLE001 - the server must stop all the same
            _server_log.exception("draining failed")
        finally:
            self.should_exit = True


async def _drain_engine(engine: AsyncLLMEngine, lifecycle: ServerLifecycle, timeout_s: float) -> None:
    """The shutdown sequence: drain the app, then report what the aborts left in the engine."""
    _server_log.info("shutting down: refusing new requests, letting %d in flight finish for up to %.0f s "
                "(a second SIGTERM/SIGINT exits at once)", lifecycle.num_inflight, timeout_s)
    aborted = await lifecycle.drain(timeout_s)
    if not aborted:
        _server_log.info("shutting down: every request finished")
        return
    # The aborts free the requests' KV blocks within an engine step or two.
    deadline = time.monotonic() + _ABORT_GRACE_S
    stats = engine.latest_stats()
    while engine.is_healthy and stats is not None and (stats.num_running or stats.num_waiting):
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.02)
        stats = engine.latest_stats()
    used = sum(i["blocks_used"] for i in stats.per_instance) if stats is not None else -1
    _server_log.info("shutting down: aborted %d request(s) still running after %.0f s; KV blocks in use: %d",
                aborted, timeout_s, used)


def run_server(engine_config: EngineConfig, host: str = "127.0.0.1", port: int = 8000,
               log_level: str = "info", shutdown_timeout_s: float = DEFAULT_SHUTDOWN_TIMEOUT_S,
               max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES) -> None:
    """Start the engine and serve it until SIGTERM/SIGINT, then shut down in bounded time:
    in-flight requests get `shutdown_timeout_s` to finish, the rest are aborted."""
    if not shutdown_timeout_s >= 0:
        raise ValueError(f"the shutdown timeout must be >= 0 seconds, got {shutdown_timeout_s}")
    if max_request_bytes < 1:  # checked before the engine spends its start-up time
        raise ValueError(f"the request size limit must be positive, got {max_request_bytes}")
    engine = AsyncLLMEngine(engine_config)
    try:
        app = build_app(engine, max_request_bytes=max_request_bytes)
        config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_keep_alive=5,
                                timeout_graceful_shutdown=int(_ABORT_GRACE_S))
        server = _DrainingServer(config, lambda: _drain_engine(engine, app.state.lifecycle, shutdown_timeout_s))
        server.run()
    finally:
        engine.shutdown()
