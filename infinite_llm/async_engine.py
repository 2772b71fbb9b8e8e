"""AsyncLLMEngine: an asyncio front for the single-threaded LLMEngine.

One background thread owns the engine and is the only thread that ever touches it (the engine is
not thread-safe). Coroutines talk to it in two directions:

* commands (add, abort, stop) go to the engine thread through a thread-safe `queue.SimpleQueue`;
  when the engine has no work the thread blocks on that queue, so an idle server burns no CPU;
* results go back to each request's `asyncio.Queue` through `loop.call_soon_threadsafe`, one
  call per event loop per engine step (not one per token).

Admission errors of `add_request` (ValueError, RequestTooLongError, QueueFullError) are raised to
the caller before any output. If the engine thread crashes, every pending request receives an
`EngineDeadError`, new requests are refused with it, and `is_healthy` turns False: nothing hangs.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Optional, Union

from infinite_llm.config import EngineConfig
from infinite_llm.metrics import ServingMetrics
from infinite_llm.sampling import SamplingParams

if TYPE_CHECKING:  # the engine module pulls in torch; import it lazily in the engine thread
    from infinite_llm.engine import EngineStats, LLMEngine, RequestOutput

logger = logging.getLogger(__name__)

Prompt = Union[str, list[int]]

# While requests are unfinished but a step made no progress (nothing schedulable), wait this long
# for a command instead of spinning.
_STALL_WAIT_S = 0.01


class EngineDeadError(RuntimeError):
    """The engine thread is not running (it crashed or was shut down); HTTP 503."""


class _Admitted:
    """Marker delivered to a request's queue once the engine accepted it."""


_ADMITTED = _Admitted()


@dataclass
class _AddCommand:
    request_id: str
    prompt: Prompt
    params: SamplingParams
    arrival_time: float
    stream: "RequestStream"


@dataclass
class _AbortCommand:
    request_id: str


class _StopCommand:
    pass


@dataclass
class _Tracked:
    """Engine-thread bookkeeping of one admitted request."""

    stream: "RequestStream"
    num_output_tokens_seen: int = 0
    prompt_counted: bool = False


class RequestStream:
    """Async iterator over the `RequestOutput`s of one admitted request (cumulative outputs).

    Iteration ends after the output with `finished=True`; an engine failure is raised from
    `__anext__`. `abort()` stops the request in the engine (idempotent, no-op once finished);
    `fail(error)` does too, and makes the consumer see `error`.
    """

    def __init__(self, owner: "AsyncLLMEngine", request_id: str, loop: asyncio.AbstractEventLoop) -> None:
        self.request_id = request_id
        self.finished = False
        self._owner = owner
        self._loop = loop
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._failure: Optional[BaseException] = None  # set by fail(), raised by the next __anext__

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> "RequestOutput":
        if self._failure is not None:
            error, self._failure = self._failure, None
            raise error
        if self.finished:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self.finished = True
            self._failure = None  # a consumer already waiting is woken by the failure itself
            raise item
        if item.finished:
            self.finished = True
        return item

    def abort(self) -> None:
        if not self.finished:
            self.finished = True
            self._owner._abort_nowait(self.request_id)

    def fail(self, error: BaseException) -> None:
        """End the stream with `error` and abort the request in the engine (frees its blocks).

        For a server that gives up on its running requests (bounded shutdown): the consumer,
        whether waiting in `__anext__` now or calling it later, gets `error` raised instead of
        the plain end of iteration that `abort()` gives. Call from the stream's event loop;
        no-op once the stream finished.
        """
        if self.finished:
            return
        self._failure = error
        self.abort()
        self._queue.put_nowait(error)


class AsyncLLMEngine:
    """Drive one `LLMEngine` from a background thread; serve it to asyncio code.

    `engine_factory` (default: `LLMEngine(engine_config)`) is called in the engine thread, so
    the engine is created and used by that thread only. Construction blocks until the engine is
    ready and re-raises its construction error.
    """

    def __init__(
        self,
        engine_config: Optional[EngineConfig] = None,
        *,
        engine_factory: Optional[Callable[[], "LLMEngine"]] = None,
        startup_timeout_s: float = 600.0,
    ) -> None:
        if engine_factory is None:
            if engine_config is None:
                raise ValueError("AsyncLLMEngine needs an engine_config or an engine_factory")
            config = engine_config

            def engine_factory() -> "LLMEngine":
                from infinite_llm.engine import LLMEngine

                return LLMEngine(config)

        self._factory = engine_factory
        self._commands: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._tracked: dict[str, _Tracked] = {}
        self._unapplied: list[Any] = []  # commands taken off the queue, not yet applied
        # Guards the dead flag against racing submissions: once `_dead` is set under the lock,
        # no command can enter the queue, so the final drain fails every waiting caller.
        self._lock = threading.Lock()
        self._dead: Optional[BaseException] = None
        self._stats: Optional["EngineStats"] = None
        self._ready = threading.Event()
        self._startup_error: Optional[BaseException] = None
        self.engine: Optional["LLMEngine"] = None
        self.metrics: Optional[ServingMetrics] = None
        self._thread = threading.Thread(target=self._run, name="llm-engine", daemon=True)
        self._thread.start()
        if not self._ready.wait(startup_timeout_s):
            self._mark_dead(EngineDeadError(f"the engine did not start within {startup_timeout_s:.0f} s"))
            raise self._dead  # type: ignore[misc]
        if self._startup_error is not None:
            raise self._startup_error

    # ---------------------------------------------------------------- read-only engine facts
    # These attributes are set once in the engine's constructor and never mutated, so reading
    # them from other threads is safe.
    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer  # type: ignore[union-attr]

    @property
    def model_name(self) -> str:
        return self.engine.model_name  # type: ignore[union-attr]

    @property
    def model_config(self) -> Any:
        return self.engine.model_config  # type: ignore[union-attr]

    @property
    def is_healthy(self) -> bool:
        return self._dead is None and self._thread.is_alive()

    @property
    def dead_error(self) -> Optional[BaseException]:
        return self._dead

    def instance_health(self) -> list[dict]:
        """Per-instance liveness (safe from any thread: it comes from the gManager's view)."""
        return self.engine.instance_health() if self.engine is not None else []

    def can_serve(self) -> bool:
        return self.is_healthy and self.engine is not None and self.engine.can_serve()

    # Membership changes go to the router and the launcher (both thread-safe), not to the
    # engine thread's request state, so they may be called from any thread.
    def add_instance(self) -> int:
        """Start one more instance and wait until it serves (blocks: call it off the event loop)."""
        self._check_running()
        return self.engine.add_instance()  # type: ignore[union-attr]

    def remove_instance(self, instance: int) -> None:
        self._check_running()
        self.engine.remove_instance(instance)  # type: ignore[union-attr]

    def _check_running(self) -> None:
        if self.engine is None or not self.is_healthy:
            raise EngineDeadError(f"the engine is not running: {self._dead}")

    def latest_stats(self) -> Optional["EngineStats"]:
        """The cluster's stats as the gManager last heard them (safe from any thread: they come
        from heartbeats, not from the engine thread's state)."""
        if self.engine is None or self._dead is not None:
            return self._stats
        return self.engine.stats()

    # ------------------------------------------------------------------------ public API
    async def add_request(
        self,
        prompt: Prompt,
        params: SamplingParams,
        request_id: str,
        arrival_time: Optional[float] = None,
    ) -> RequestStream:
        """Submit a request; return its output stream once the engine admitted it.

        Raises the engine's admission error (ValueError, RequestTooLongError, QueueFullError) or
        EngineDeadError. Cancelling the caller while it waits aborts the request.
        """
        loop = asyncio.get_running_loop()
        stream = RequestStream(self, request_id, loop)
        arrival = time.monotonic() if arrival_time is None else arrival_time
        self._submit(_AddCommand(request_id, prompt, params, arrival, stream))
        try:
            first = await stream._queue.get()
        except asyncio.CancelledError:
            stream.abort()
            raise
        if isinstance(first, BaseException):
            stream.finished = True
            raise first
        assert first is _ADMITTED, f"unexpected first item {first!r}"
        return stream

    async def generate(
        self,
        prompt: Prompt,
        params: SamplingParams,
        request_id: str,
        arrival_time: Optional[float] = None,
    ) -> AsyncIterator["RequestOutput"]:
        """Yield the request's cumulative outputs; the last one has `finished=True`.

        If the consumer stops early (break, cancellation, client disconnect) the request is
        aborted in the engine and all its KV blocks are freed.
        """
        stream = await self.add_request(prompt, params, request_id, arrival_time)
        try:
            async for output in stream:
                yield output
        finally:
            stream.abort()

    async def abort(self, request_id: str) -> None:
        self._abort_nowait(request_id)

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Stop the engine thread (pending requests get EngineDeadError) and free the engine."""
        with self._lock:
            if self._dead is None:
                self._commands.put(_StopCommand())
        self._thread.join(timeout_s)

    # ---------------------------------------------------------------------- internals
    def _submit(self, command: Any) -> None:
        with self._lock:
            if self._dead is not None:
                raise EngineDeadError(f"the engine is not running: {self._dead}")
            self._commands.put(command)

    def _abort_nowait(self, request_id: str) -> None:
        with self._lock:
            if self._dead is None:
                self._commands.put(_AbortCommand(request_id))

    # Everything below runs in the engine thread.
    def _run(self) -> None:
        try:
            engine = self._factory()
            self.engine = engine
            self.metrics = ServingMetrics(engine.model_name)
            self._stats = engine.stats()
        except BaseException as exc:  # noqa: BLE001 - reported to the constructor's caller
            self._startup_error = exc
            self._mark_dead(EngineDeadError(f"the engine failed to start: {exc!r}"))
            self._ready.set()
            return
        self._ready.set()
        reason: BaseException = EngineDeadError("the engine was shut down")
        try:
            self._serve(engine)
        except BaseException as exc:  # noqa: BLE001 - any crash must fail requests, not hang them
            logger.exception("engine thread crashed")
            reason = EngineDeadError(f"the engine crashed: {exc!r}")
            reason.__cause__ = exc
        finally:
            self._mark_dead(reason)
            try:
                engine.shutdown()
            except Exception:  # noqa: BLE001 - best effort while going down
                logger.exception("engine shutdown failed")

    def _serve(self, engine: "LLMEngine") -> None:
        flush_pending = False  # an abort queued an output that only step() hands out
        stalled = False
        while True:
            busy = flush_pending or engine.has_unfinished_requests()
            # Kept on self until applied, so a crash in the middle still answers every add.
            self._unapplied = self._take_commands(block=not busy, timeout=_STALL_WAIT_S if stalled else None)
            while self._unapplied:
                command = self._unapplied.pop(0)
                if isinstance(command, _StopCommand):
                    return
                if isinstance(command, _AddCommand):
                    self._apply_add(engine, command)
                elif isinstance(command, _AbortCommand):
                    engine.abort_request(command.request_id)
                    flush_pending = True
            if not (flush_pending or engine.has_unfinished_requests()):
                self._stats = engine.stats()
                stalled = False
                continue
            steps_before = self._stats.num_steps if self._stats is not None else -1
            outputs = engine.step()
            flush_pending = False
            self._dispatch(outputs)
            self._stats = engine.stats()
            stalled = not outputs and self._stats.num_steps == steps_before

    def _take_commands(self, block: bool, timeout: Optional[float]) -> list[Any]:
        commands: list[Any] = []
        if block or timeout is not None:
            try:
                commands.append(self._commands.get(timeout=timeout))
            except queue.Empty:
                return commands
        while True:
            try:
                commands.append(self._commands.get_nowait())
            except queue.Empty:
                return commands

    def _apply_add(self, engine: "LLMEngine", command: _AddCommand) -> None:
        if command.stream.finished:  # the caller gave up before the engine saw the request
            return
        try:
            engine.add_request(command.request_id, command.prompt, command.params, command.arrival_time)
        except Exception as exc:  # noqa: BLE001 - admission errors belong to the caller
            self._deliver({command.stream._loop: [(command.stream, exc)]})
            return
        self._tracked[command.request_id] = _Tracked(command.stream)
        self._deliver({command.stream._loop: [(command.stream, _ADMITTED)]})

    def _dispatch(self, outputs: list["RequestOutput"]) -> None:
        batches: dict[asyncio.AbstractEventLoop, list[tuple[RequestStream, Any]]] = {}
        metrics = self.metrics
        for output in outputs:
            tracked = self._tracked.get(output.request_id)
            if tracked is None:
                continue
            if metrics is not None:
                if not tracked.prompt_counted:
                    metrics.observe_prompt(len(output.prompt_token_ids))
                    tracked.prompt_counted = True
                num_out = output.num_output_tokens
                metrics.observe_generated(num_out - tracked.num_output_tokens_seen)
                tracked.num_output_tokens_seen = max(num_out, tracked.num_output_tokens_seen)
                if output.finished:
                    metrics.observe_finished(
                        output.finish_reason, num_out, output.arrival_time,
                        output.first_token_time, output.finished_time,
                    )
            if output.finished:
                del self._tracked[output.request_id]
            batches.setdefault(tracked.stream._loop, []).append((tracked.stream, output))
        self._deliver(batches)

    @staticmethod
    def _deliver(batches: dict[asyncio.AbstractEventLoop, list[tuple[RequestStream, Any]]]) -> None:
        for loop, items in batches.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the consumer's loop is closed: nobody is listening
                pass

    def _mark_dead(self, reason: BaseException) -> None:
        """Refuse new commands, then fail every request still waiting for an answer."""
        with self._lock:
            if self._dead is None:
                self._dead = reason
        message = str(self._dead)
        batches: dict[asyncio.AbstractEventLoop, list[tuple[RequestStream, Any]]] = {}
        # One exception object per waiter: each is raised in its own coroutine.
        for tracked in self._tracked.values():
            batches.setdefault(tracked.stream._loop, []).append((tracked.stream, EngineDeadError(message)))
        self._tracked.clear()
        leftovers, self._unapplied = self._unapplied, []
        while True:
            try:
                leftovers.append(self._commands.get_nowait())
            except queue.Empty:
                break
        for command in leftovers:
            if isinstance(command, _AddCommand):
                batches.setdefault(command.stream._loop, []).append((command.stream, EngineDeadError(message)))
        self._deliver(batches)


def _put_all(items: list[tuple[RequestStream, Any]]) -> None:
    """Runs in the consumer's event loop."""
    for stream, item in items:
        stream._queue.put_nowait(item)
