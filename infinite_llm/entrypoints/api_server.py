"""OpenAI-compatible HTTP server (FastAPI + uvicorn) on top of `AsyncLLMEngine`.

Endpoints: /v1/completions, /v1/chat/completions (streaming as server-sent events or not),
/v1/models, /health, /metrics (Prometheus). Errors use OpenAI's body
`{"error": {"message", "type", "param", "code"}}`: 400 for bad input (FastAPI's 422 validation
answers are turned into 400), 404 for an unknown model, 429 when the waiting queue is full, 503
once the engine died. A client that disconnects gets its requests aborted in the engine, which
frees all their KV blocks, local and remote.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Optional, Sequence, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from infinite_llm.async_engine import AsyncLLMEngine, EngineDeadError, RequestStream
from infinite_llm.config import EngineConfig
from infinite_llm.engine import QueueFullError, RequestOutput, RequestTooLongError
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
    ModelCard,
    ModelList,
    UsageInfo,
)
from infinite_llm.sampling import SamplingParams

logger = logging.getLogger(__name__)

# One HTTP request may fan out to at most this many engine requests (prompts x n).
MAX_CHOICES_PER_REQUEST = 64
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_SSE_DONE = "data: [DONE]\n\n"


class APIError(Exception):
    """An error with an HTTP status and an OpenAI-style body."""

    def __init__(
        self, status: int, message: str, type: str = "invalid_request_error",
        param: Optional[str] = None, code: Optional[str] = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code


def error_response(status: int, message: str, type: str, param: Optional[str] = None,
                   code: Optional[str] = None) -> JSONResponse:
    body = ErrorResponse(error=ErrorInfo(message=message, type=type, param=param, code=code))
    return JSONResponse(status_code=status, content=body.model_dump())


def _api_error_from(exc: BaseException) -> APIError:
    """Map an engine exception to the HTTP answer the client should see."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, QueueFullError):
        return APIError(429, str(exc), "rate_limit_error", code="queue_full")
    if isinstance(exc, RequestTooLongError):
        return APIError(400, str(exc), param="max_tokens", code="context_length_exceeded")
    if isinstance(exc, (ValueError, TypeError)):
        return APIError(400, str(exc))
    if isinstance(exc, EngineDeadError):
        return APIError(503, str(exc), "service_unavailable", code="engine_dead")
    return APIError(500, f"internal error: {exc!r}", "internal_error")


# ------------------------------------------------------------------------- request planning
@dataclass
class _Choice:
    """One engine request serving choice `index` of an HTTP request."""

    index: int
    prompt_index: int
    request_id: str
    prompt: Union[str, list[int]]
    params: SamplingParams


class _TextDelta:
    """Turns cumulative output text into stream deltas.

    While a request with stop strings is unfinished, the last `max(len(stop)) - 1` characters are
    held back: they could be the start of a stop string that the engine removes at finish, and
    text already sent cannot be taken back.
    """

    def __init__(self, stop: Sequence[str], prefix: str = "") -> None:
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.prefix = prefix
        self.sent = 0

    def update(self, output: RequestOutput) -> str:
        text = output.text
        limit = len(text) if output.finished else len(text) - self.hold
        delta = text[self.sent:limit] if limit > self.sent else ""
        self.sent = max(self.sent, limit)
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
    if n < 1:
        raise APIError(400, f"n must be >= 1, got {n}", param="n")
    if n * num_prompts > MAX_CHOICES_PER_REQUEST:
        raise APIError(400, f"prompts x n = {n * num_prompts} exceeds {MAX_CHOICES_PER_REQUEST}", param="n")


def _normalize_prompts(prompt: Any) -> list[Union[str, list[int]]]:
    """str | list[int] | list[str] | list[list[int]]  ->  a non-empty list of non-empty prompts."""
    if isinstance(prompt, str):
        prompts: list[Union[str, list[int]]] = [prompt]
    elif prompt and all(isinstance(t, int) for t in prompt):
        prompts = [list(prompt)]
    else:
        prompts = list(prompt)
    if not prompts:
        raise APIError(400, "the prompt is empty", param="prompt")
    for p in prompts:
        if len(p) == 0:
            raise APIError(400, "the prompt is empty: at least one token or character is required", param="prompt")
    return prompts


def _plan_choices(base_id: str, prompts: list[Union[str, list[int]]], n: int, make_params) -> list[_Choice]:
    choices = []
    for p_idx, prompt in enumerate(prompts):
        for j in range(n):
            index = p_idx * n + j
            try:
                params = make_params(j)
            except ValueError as exc:
                raise APIError(400, str(exc)) from exc
            choices.append(_Choice(index, p_idx, f"{base_id}-{index}", prompt, params))
    return choices


async def _admit(engine: AsyncLLMEngine, choices: list[_Choice], arrival: float) -> list[RequestStream]:
    """Admit all choices or none: on any refusal the admitted ones are aborted."""
    results = await asyncio.gather(
        *(engine.add_request(c.prompt, c.params, c.request_id, arrival) for c in choices),
        return_exceptions=True,
    )
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        for r in results:
            if isinstance(r, RequestStream):
                r.abort()
        raise _api_error_from(errors[0])
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
        completion_tokens += len(out.output_token_ids)
    return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=prompt_tokens + completion_tokens)


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _sse_error(exc: BaseException) -> str:
    err = _api_error_from(exc)
    body = ErrorResponse(error=ErrorInfo(message=err.message, type=err.type, param=err.param, code=err.code))
    return _sse(body.model_dump())


# ------------------------------------------------------------------------------- the app
def build_app(engine: AsyncLLMEngine) -> FastAPI:
    """The FastAPI app serving `engine`. The caller owns the engine's lifetime."""
    app = FastAPI(title="Infinite-LLM OpenAI-compatible server")
    app.state.engine = engine

    @app.exception_handler(APIError)
    async def _on_api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.type, exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def _on_validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems, param = [], None
        for err in exc.errors():
            loc = [str(x) for x in err.get("loc", ()) if x != "body"]
            if err.get("type") == "json_invalid":
                problems.append(f"the body is not valid JSON: {err.get('ctx', {}).get('error', err.get('msg'))}")
                continue
            if loc and loc[0] == "prompt":
                # A union's per-branch complaints are noise; say what a prompt may be once.
                message = "prompt must be a string, a list of token ids, or a list of strings or of token-id lists"
                if message not in problems:
                    problems.append(message)
                param = param or "prompt"
                continue
            param = param or (loc[0] if loc else None)
            problems.append(f"{'.'.join(loc) or 'body'}: {err.get('msg')}")
        return error_response(400, "; ".join(problems) or "invalid request", "invalid_request_error", param)

    @app.exception_handler(StarletteHTTPException)
    async def _on_http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(exc.status_code, str(exc.detail), kind)

    @app.exception_handler(Exception)
    async def _on_unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        err = _api_error_from(exc)
        return error_response(err.status, err.message, err.type, err.param, err.code)

    @app.get("/health")
    async def health() -> Response:
        if engine.is_healthy:
            return JSONResponse({"status": "ok"})
        return error_response(503, f"the engine is not running: {engine.dead_error}", "service_unavailable",
                              code="engine_dead")

    @app.get("/metrics")
    async def metrics() -> Response:
        if engine.metrics is None:
            return error_response(503, "metrics unavailable: the engine did not start", "service_unavailable")
        stats = engine.latest_stats()
        if stats is not None:
            engine.metrics.update_engine_stats(stats)
        body, content_type = engine.metrics.render()
        return Response(content=body, media_type=content_type)

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        cfg = engine.model_config
        card = ModelCard(id=engine.model_name, max_model_len=cfg.max_position_embeddings, vocab_size=cfg.vocab_size)
        return JSONResponse(ModelList(data=[card]).model_dump())

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        arrival = time.monotonic()
        _check_model(engine, body.model)
        _check_supported(body.unsupported_fields())
        prompts = _normalize_prompts(body.prompt)
        _check_n(body.n, len(prompts))
        base_id = f"cmpl-{uuid.uuid4().hex}"
        choices = _plan_choices(base_id, prompts, body.n, body.to_sampling_params)

        def echo_text() -> list[str]:
            # Decoded only once the engine admitted the prompts, so a bad token id gets the
            # engine's 400, not a decoding error.
            return [_prompt_text(engine, p) if body.echo else "" for p in prompts]

        def events(created: int, streams: list[RequestStream]) -> AsyncIterator[str]:
            return _completion_events(engine, body, base_id, created, choices, streams, echo_text())

        def response(created: int, by_index: dict[int, RequestOutput]) -> CompletionResponse:
            echo = echo_text()
            return CompletionResponse(
                id=base_id, created=created, model=engine.model_name,
                choices=[
                    CompletionChoice(index=c.index, text=echo[c.prompt_index] + by_index[c.index].text,
                                     finish_reason=by_index[c.index].finish_reason)
                    for c in choices
                ],
                usage=_usage(choices, by_index),
            )

        return await _serve_choices(engine, request, choices, arrival, body.stream, events, response)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        arrival = time.monotonic()
        _check_model(engine, body.model)
        _check_supported(body.unsupported_fields())
        if not body.messages:
            raise APIError(400, "messages must contain at least one message", param="messages")
        try:
            messages = [{"role": m.role, "content": m.text_content()} for m in body.messages]
            text = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except ValueError as exc:  # includes the template's own raise_exception
            raise APIError(400, f"cannot apply the chat template: {exc}", param="messages") from exc
        # The template already carries the special tokens (BOS); do not add them twice.
        prompt_ids = engine.tokenizer.encode(text, add_special_tokens=False)
        if not prompt_ids:
            raise APIError(400, "the chat prompt is empty", param="messages")
        _check_n(body.n, 1)
        base_id = f"chatcmpl-{uuid.uuid4().hex}"
        choices = _plan_choices(base_id, [prompt_ids], body.n, body.to_sampling_params)

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

        return await _serve_choices(engine, request, choices, arrival, body.stream, events, response)

    return app


def _ensure_healthy(engine: AsyncLLMEngine) -> None:
    if not engine.is_healthy:
        raise APIError(503, f"the engine is not running: {engine.dead_error}", "service_unavailable",
                       code="engine_dead")


async def _serve_choices(
    engine: AsyncLLMEngine,
    request: Request,
    choices: list[_Choice],
    arrival: float,
    stream: bool,
    events: Callable[[int, list[RequestStream]], AsyncIterator[str]],
    response: Callable[[int, dict[int, RequestOutput]], BaseModel],
) -> Response:
    """Admit `choices` and answer with them: the skeleton both endpoints share.

    Streaming: `events(created, streams)` is served as server-sent events (the generator aborts
    the requests however it ends). Otherwise every final output is awaited and
    `response(created, {choice index: output})` is sent as JSON, unless the client disconnects
    first: then every request is aborted (freeing its KV blocks) and 499 is returned.
    """
    _ensure_healthy(engine)
    streams = await _admit(engine, choices, arrival)
    created = int(time.time())
    if stream:
        return StreamingResponse(events(created, streams), media_type="text/event-stream", headers=_SSE_HEADERS)
    outputs = await _collect_unless_disconnected(request, streams)
    if outputs is None:
        return Response(status_code=499)
    by_index = {c.index: o for c, o in zip(choices, outputs)}
    return JSONResponse(response(created, by_index).model_dump())


def _prompt_text(engine: AsyncLLMEngine, prompt: Union[str, list[int]]) -> str:
    return prompt if isinstance(prompt, str) else engine.tokenizer.decode(prompt)


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
    then (with `include_usage`) a usage chunk, then `[DONE]`. An engine that dies mid-stream
    becomes an error event followed by `[DONE]`, since the 200 status is already sent.
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
    except EngineDeadError as exc:
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

    deltas = [_TextDelta(c.params.stop, echo_text[c.prompt_index]) for c in choices]
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
    deltas = [_TextDelta(c.params.stop) for c in choices]
    return _sse_stream(choices, streams, deltas, include_usage, chunk, chunks_for, opening)


def run_server(engine_config: EngineConfig, host: str = "127.0.0.1", port: int = 8000,
               log_level: str = "info") -> None:
    """Start the engine and serve it until interrupted (Ctrl-C), then stop the engine."""
    import uvicorn

    engine = AsyncLLMEngine(engine_config)
    try:
        uvicorn.run(build_app(engine), host=host, port=port, log_level=log_level, timeout_keep_alive=5)
    finally:
        engine.shutdown()
