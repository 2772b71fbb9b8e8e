"""LLMEngine (add requests, collect outputs) and the offline `LLM.generate()` API.

The engine is the front end: tokenizer, admission checks, the router and detokenization. The
instances (threads of this process or Ray actors) and the gManager run on their own; the engine
hands requests to the router and turns the instances' token deltas into `RequestOutput`s.
"""

from __future__ import annotations

import collections
import itertools
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

from infinite_llm.cluster.router import Router
from infinite_llm.config import EngineConfig
from infinite_llm.control.home_kv import PLACEMENT_POLICIES, lend_cap_for, max_tokens_per_request
from infinite_llm.control.dispatch import NoLiveInstanceError
from infinite_llm.control.messages import InstanceDown, MigrationOrder, RequestUpdate
from infinite_llm.control.request import FinishReason, Request
from infinite_llm.control.scheduler import QueueFullError, RequestTooLongError
from infinite_llm.detokenizer import IncrementalDetokenizer
from infinite_llm.sampling import SamplingParams

__all__ = [
    "LLMEngine",
    "LLM",
    "RequestOutput",
    "EngineStats",
    "FailureStats",
    "NoLiveInstanceError",
    "QueueFullError",
    "RequestTooLongError",
    "SamplingParams",
]


@dataclass
class RequestOutput:
    """One request's progress. With `output_kind="delta"` `output_token_ids` and `text` hold only
    what is new since the previous output; otherwise everything so far. `num_output_tokens` is
    always the total."""

    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    text: str
    finished: bool
    finish_reason: Optional[str]
    arrival_time: float
    first_token_time: Optional[float] = None
    finished_time: Optional[float] = None
    num_preemptions: int = 0
    error: Optional[str] = None  # why the request failed, when it failed on an instance
    num_output_tokens: int = 0


@dataclass
class FailureStats:
    """What instance failures cost so far (cumulative)."""

    num_instance_failures: int = 0
    num_redispatched_requests: int = 0  # homed on a dead instance, recomputed on another
    recovery_seconds: list[float] = field(default_factory=list)  # death known -> first new token


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    per_instance: list[dict] = field(default_factory=list)
    num_steps: int = 0
    num_preemptions: int = 0
    num_migrated_blocks: int = 0
    num_recomputed_on_home: int = 0  # requests recomputed by their homes after a holder died
    failures: FailureStats = field(default_factory=FailureStats)


@dataclass
class _Tracked:
    """The router side's record of one request: what it asked for and what came back."""

    request: Request
    detok: IncrementalDetokenizer
    finished: bool = False
    error: Optional[str] = None
    reported_tokens: int = 0  # output tokens handed out so far (for delta outputs)
    recovering_since: Optional[float] = None  # re-dispatched after its home died, no token yet


class LLMEngine:
    """The front end over the cluster: admission, routing, detokenization, outputs.

    Instances run their own loops; `step()` only collects what they reported (waiting up to
    `timeout_s` for it), so the caller never steps the cluster.
    """

    def __init__(self, config: EngineConfig):
        from infinite_llm.model.loader import load_model_config, resolve_model_path
        from infinite_llm.tokenizer import load_tokenizer

        self.config = config
        path = resolve_model_path(config.model)
        self.model_path = str(path)
        self.model_config = load_model_config(path)
        config.model_config = self.model_config
        self.tokenizer = load_tokenizer(path)
        self.model_name = config.served_model_name or (
            "default" if config.model == "default" else path.name
        )
        cluster, cache = config.cluster, config.cache
        if cluster.num_instances < 1:
            raise ValueError(f"num_instances must be >= 1, got {cluster.num_instances}")
        if cluster.placement not in PLACEMENT_POLICIES:
            raise ValueError(f"unknown placement policy {cluster.placement!r}; expected one of {PLACEMENT_POLICIES}")
        if not 0.0 <= config.scheduler.headroom_fraction < 1.0:
            raise ValueError(f"headroom_fraction must be in [0, 1), got {config.scheduler.headroom_fraction}")
        self.eos_token_ids = frozenset(self.tokenizer.eos_token_ids) | frozenset(self.model_config.eos_token_ids)
        self.cluster = self._start_cluster()
        self.router = Router(self.cluster.router_endpoint, cluster.num_instances, cache.block_size,
                             config.scheduler.max_num_batched_tokens)
        try:
            self.router.wait_ready(timeout_s=120)
        except BaseException:
            self.shutdown()
            raise
        self._requests: dict[str, _Tracked] = {}  # until their last output is handed out
        # Requests admitted that have no token yet: the cluster-wide waiting queue (HTTP 429).
        self._awaiting_first_token: set[str] = set()
        self._pending_outputs: list[RequestOutput] = []
        self._ids = itertools.count()
        self.num_steps = 0
        self.failures = FailureStats()

    def _start_cluster(self):
        backend = self.config.cluster.backend
        if backend == "local":
            from infinite_llm.cluster.local import LocalCluster

            return LocalCluster(self.config, self.model_path, self.model_config)
        if backend == "ray":
            from infinite_llm.cluster.ray_cluster import RayCluster

            return RayCluster(self.config, self.model_path, self.model_config)
        raise ValueError(f"unknown cluster backend {backend!r}; choose 'local' or 'ray'")

    def max_context(self) -> int:
        """The longest context (prompt + output) one request can hold under the policy, on the
        live instances."""
        cache, cluster = self.config.cache, self.config.cluster
        per = cache.num_blocks_per_instance
        cap = lend_cap_for(cluster.placement, per, cache.lend_fraction)
        live = max(1, len(self.router.live_instances()))
        tokens = max_tokens_per_request(cluster.placement, live, per, cap, cache.block_size)
        return min(tokens, self.model_config.max_position_embeddings)

    # ------------------------------------------------------------------ requests
    def add_request(
        self,
        request_id: Optional[str],
        prompt: Union[str, list[int]],
        params: Optional[SamplingParams] = None,
        arrival_time: Optional[float] = None,
        home: Optional[int] = None,
    ) -> str:
        """Admit a request; `home` pins it to an instance (default: the router's choice)."""
        params = params or SamplingParams()
        token_ids, capacity = self._checked(prompt, params)
        if request_id is None:
            request_id = f"req-{next(self._ids)}"
        if request_id in self._requests:
            raise ValueError(f"duplicate request id {request_id!r}")
        if not self.has_waiting_room():
            raise QueueFullError(
                f"the waiting queue is full ({self.config.scheduler.max_waiting} requests); retry later"
            )
        request = Request(
            request_id=request_id, prompt_token_ids=token_ids, sampling=params,
            arrival_time=arrival_time if arrival_time is not None else time.monotonic(),
            max_total_tokens=capacity,
        )
        if home is not None and home not in self.router.live_instances():
            raise ValueError(f"home instance {home} is not a live instance (live: {self.router.live_instances()})")
        request.home = self.router.dispatch(request, home)
        self._requests[request_id] = _Tracked(request, IncrementalDetokenizer(self.tokenizer, params))
        self._awaiting_first_token.add(request_id)
        return request_id

    def check_request(self, prompt: Union[str, list[int]], params: SamplingParams) -> list[int]:
        """The prompt's token ids, if the request passes every admission check but queue room
        (which changes as requests start): lets a batch fail before any of it is queued."""
        return self._checked(prompt, params)[0]

    def has_waiting_room(self) -> bool:
        """Whether one more request fits in the waiting queue now (else add_request raises
        QueueFullError)."""
        return len(self._awaiting_first_token) < self.config.scheduler.max_waiting

    def _checked(self, prompt: Union[str, list[int]], params: SamplingParams) -> tuple[list[int], int]:
        """(token ids, the context one request may hold now), or the reason it cannot be admitted."""
        params.validate()
        token_ids = self._prompt_ids(prompt)
        capacity = self.max_context()
        wanted = len(token_ids) + (params.max_tokens or 1)
        if wanted > capacity:
            raise RequestTooLongError(
                f"prompt ({len(token_ids)} tokens) plus max_tokens ({params.max_tokens}) exceeds the "
                f"{capacity} tokens of KV cache one request can use under the "
                f"'{self.config.cluster.placement}' placement policy"
            )
        return token_ids, capacity

    def _prompt_ids(self, prompt: Union[str, list[int]]) -> list[int]:
        if isinstance(prompt, str):
            token_ids = self.tokenizer.encode(prompt)
        else:
            token_ids = list(prompt)
            vocab = self.model_config.vocab_size
            bad = [t for t in token_ids if not isinstance(t, int) or not 0 <= t < vocab]
            if bad:
                raise ValueError(f"prompt token ids must be integers in [0, {vocab}); got {bad[:5]}")
        if not token_ids:
            raise ValueError("the prompt is empty: at least one token is required")
        return token_ids

    # ------------------------------------------------------------------ membership
    def add_instance(self, timeout_s: float = 120.0) -> int:
        """Start one more instance (a new id) and wait until it serves; returns its id. Also the
        way to replace a dead instance."""
        instance = self.cluster.add_instance()
        deadline = time.monotonic() + timeout_s
        while instance not in self.router.view():
            if time.monotonic() > deadline:
                raise TimeoutError(f"instance {instance} did not report within {timeout_s:.0f} s")
            time.sleep(0.01)
        return instance

    def remove_instance(self, instance: int) -> None:
        """Take a live instance out: its requests, and those with KV on it, are recomputed on the
        others (their streams go on), then it stops."""
        live = self.router.live_instances()
        if instance not in live:
            raise ValueError(f"instance {instance} is not a live instance (live: {live})")
        if len(live) == 1:
            raise ValueError(f"instance {instance} is the last live instance; the cluster needs one")
        self.cluster.remove_instance(instance)

    def order_migration(self, request_id: str, src: int, dst: int, num_blocks: int) -> None:
        """Ask the request's home to move `num_blocks` full blocks from `src` to `dst` (the
        gManager's path; for tests and operators)."""
        self.router.order_migration(MigrationOrder(request_id, src, dst, num_blocks))

    def abort_request(self, request_id: str) -> None:
        tracked = self._requests.get(request_id)
        if tracked is None or tracked.finished:
            return
        self.router.abort(request_id)
        self._finish(tracked, FinishReason.ABORT)
        self._pending_outputs.append(self._output(tracked, tracked.detok.flush()))  # handed out by step()

    def has_unfinished_requests(self) -> bool:
        return bool(self._pending_outputs) or bool(self._requests)

    # ---------------------------------------------------------------------- step
    def step(self, timeout_s: float = 0.01) -> list[RequestOutput]:
        """Outputs of the requests that progressed since the last call."""
        outputs, self._pending_outputs = self._pending_outputs, []
        updates = self.router.poll(0.0 if outputs else timeout_s)
        if updates:
            self.num_steps += 1
        for update in updates:
            if isinstance(update, InstanceDown):
                outputs.extend(self._redispatch_from(update.instance))
                continue
            tracked = self._requests.get(update.request_id)
            if tracked is None or tracked.finished or update.instance != tracked.request.home:
                continue  # finished here (e.g. by a stop string), or a report from a former home
            output = self._apply(tracked, update)
            if output is not None:
                outputs.append(output)
        for out in outputs:
            if out.finished:
                self._requests.pop(out.request_id, None)
        return outputs

    def _redispatch_from(self, dead: int) -> list[RequestOutput]:
        """Recompute the requests homed on a dead instance on live ones: each new home gets the
        prompt and every token generated so far, so its stream goes on with no gap and no
        repeat. Returns the final outputs of those that cannot be placed anywhere."""
        self.failures.num_instance_failures += 1
        failed = []
        now = time.monotonic()
        for tracked in self._requests.values():
            request = tracked.request
            if tracked.finished or request.home != dead:
                continue
            try:
                request.home = self.router.dispatch(request, resumed=True)
            except NoLiveInstanceError as exc:
                self._finish(tracked, FinishReason.ABORT, error=f"instance {dead} died and {exc}")
                failed.append(self._output(tracked, tracked.detok.flush()))
                continue
            tracked.recovering_since = now
            self.failures.num_redispatched_requests += 1
        return failed

    def _apply(self, tracked: _Tracked, update: RequestUpdate) -> Optional[RequestOutput]:
        request = tracked.request
        if tracked.recovering_since is not None and update.new_token_ids:
            self.failures.recovery_seconds.append(time.monotonic() - tracked.recovering_since)
            tracked.recovering_since = None
        request.output_token_ids.extend(update.new_token_ids)
        request.num_preemptions = update.num_preemptions
        request.first_token_time = request.first_token_time or update.first_token_time
        if request.output_token_ids:
            self._awaiting_first_token.discard(request.request_id)
        delta, stop = tracked.detok.update(update.new_token_ids)
        if stop is not None:
            if not update.finished:
                self.router.abort(request.request_id)  # frees its blocks on the home
            self._finish(tracked, FinishReason.STOP, update.finished_time)
        elif update.finished:
            delta += tracked.detok.flush()
            reason = FinishReason(update.finish_reason) if update.finish_reason else FinishReason.ABORT
            self._finish(tracked, reason, update.finished_time, update.error)
        if request.sampling.output_kind == "final_only" and not tracked.finished:
            return None
        return self._output(tracked, delta)

    def _finish(self, tracked: _Tracked, reason: FinishReason, when: Optional[float] = None,
                error: Optional[str] = None) -> None:
        tracked.finished = True
        self._awaiting_first_token.discard(tracked.request.request_id)
        tracked.request.finish_reason = reason
        tracked.request.finished_time = when or time.monotonic()
        tracked.error = error

    def _output(self, tracked: _Tracked, text_delta: str) -> RequestOutput:
        request = tracked.request
        if request.sampling.output_kind == "delta":
            token_ids = request.output_token_ids[tracked.reported_tokens:]
            text = text_delta
        else:
            token_ids, text = list(request.output_token_ids), tracked.detok.text
        tracked.reported_tokens = len(request.output_token_ids)
        return RequestOutput(
            request_id=request.request_id,
            prompt_token_ids=request.prompt_token_ids,
            output_token_ids=token_ids,
            text=text,
            finished=tracked.finished,
            finish_reason=request.finish_reason.value if tracked.finished and request.finish_reason else None,
            arrival_time=request.arrival_time,
            first_token_time=request.first_token_time,
            finished_time=request.finished_time if tracked.finished else None,
            num_preemptions=request.num_preemptions,
            error=tracked.error,
            num_output_tokens=len(request.output_token_ids),
        )

    def stats(self) -> EngineStats:
        """Cluster figures as the gManager last heard them (lag: one heartbeat period)."""
        per_instance = []
        running = waiting = preemptions = migrated = recomputed = 0
        for i, s in sorted(self.router.view().items()):
            recomputed += s.load.num_recomputed
            if s.state != "dead":  # a dead instance's last report is not running anything
                running += s.load.batch_size
                waiting += s.load.num_waiting
            preemptions += s.load.num_preemptions
            migrated += s.load.num_migrated_blocks
            per_instance.append({
                "instance": i, "blocks_total": s.num_blocks, "blocks_used": s.num_blocks - s.num_free,
                "blocks_free": s.num_free, "blocks_lent": s.num_lent, "blocks_borrowed": s.num_borrowed,
                "num_steps": s.load.num_steps, "state": s.state,
            })
        return EngineStats(
            num_running=running, num_waiting=waiting, per_instance=per_instance, num_steps=self.num_steps,
            num_preemptions=preemptions, num_migrated_blocks=migrated, num_recomputed_on_home=recomputed,
            failures=FailureStats(self.failures.num_instance_failures, self.failures.num_redispatched_requests,
                                  list(self.failures.recovery_seconds)),
        )

    def instance_health(self) -> list[dict]:
        """Per instance: its state ("starting", "alive", "suspect" or "dead") and the age of its
        latest heartbeat, as the gManager last judged them."""
        view = self.router.view()
        health = []
        for i in list(self.router.members):
            status = view.get(i)
            state = "dead" if i in self.router.dead else (status.state if status else "starting")
            age = round(status.heartbeat_age_s, 3) if status else None
            health.append({"instance": i, "state": state, "last_heartbeat_age_s": age})
        return health

    def can_serve(self) -> bool:
        """Some instance is alive (or only late with its heartbeats)."""
        return any(h["state"] in ("alive", "suspect") for h in self.instance_health())

    def shutdown(self) -> None:
        self.cluster.shutdown()
        self.router.close()


class LLM:
    """Offline batch generation: `LLM().generate(["Hello"], SamplingParams(temperature=0))`."""

    def __init__(self, model: str = "default", config: Optional[EngineConfig] = None, **overrides):
        config = config or EngineConfig(model=model)
        config.model = model if config.model == "default" else config.model
        for key, value in overrides.items():
            for section in (config, config.cache, config.cluster, config.scheduler):
                if hasattr(section, key):
                    setattr(section, key, value)
                    break
            else:
                raise TypeError(f"unknown engine option {key!r}")
        self.engine = LLMEngine(config)
        self.tokenizer = self.engine.tokenizer

    def generate(
        self,
        prompts: Union[str, Sequence[str], Sequence[list[int]]],
        sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """One finished output per prompt, in the prompts' order.

        Every prompt is checked before any is queued, so an invalid one fails the call with
        nothing left behind. Prompts are then fed in waves as the waiting queue has room (any
        number of prompts, whatever `max_waiting`). If the call fails midway (an instance error,
        KeyboardInterrupt), what it queued is aborted and the LLM stays usable.
        """
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        params_list = _params_per_prompt(sampling_params, len(prompts))
        checked = [self.engine.check_request(p, sp) for p, sp in zip(prompts, params_list)]
        ids: list[str] = []
        progress = None
        if use_tqdm:
            from tqdm import tqdm

            progress = tqdm(total=len(checked), desc="generate", unit="req")
        try:
            final = self._run_in_waves(list(zip(checked, params_list)), ids, progress)
        except BaseException:
            self._abort(ids)
            raise
        finally:
            if progress is not None:
                progress.close()
        return [final[i] for i in ids]

    def _run_in_waves(self, work: list[tuple[list[int], SamplingParams]], ids: list[str],
                      progress: Optional[Any]) -> dict[str, RequestOutput]:
        """Admit `work` as queue room frees up, appending each request id to `ids` as it is queued
        (the caller aborts those if this raises); returns the final outputs by request id."""
        pending = collections.deque(work)
        queued: set[str] = set()  # the engine may also serve requests added by someone else
        final: dict[str, RequestOutput] = {}
        while pending or len(final) < len(ids):
            while pending and self.engine.has_waiting_room():
                token_ids, params = pending.popleft()
                ids.append(self.engine.add_request(None, token_ids, params))
                queued.add(ids[-1])
            for out in self.engine.step(timeout_s=0.05):
                if out.finished and out.request_id in queued:
                    final[out.request_id] = out
                    if progress is not None:
                        progress.update(1)
        return final

    def _abort(self, ids: list[str]) -> None:
        """Abort the given requests and take their final outputs (the step hands out every
        pending output, and forgets each finished request), so none stays in the engine."""
        for request_id in ids:
            self.engine.abort_request(request_id)
        self.engine.step(timeout_s=0.0)

    def shutdown(self) -> None:
        self.engine.shutdown()


def _params_per_prompt(sampling_params: Union[SamplingParams, Sequence[SamplingParams], None],
                       num_prompts: int) -> list[SamplingParams]:
    if sampling_params is None or isinstance(sampling_params, SamplingParams):
        return [sampling_params or SamplingParams()] * num_prompts
    params_list = list(sampling_params)
    if len(params_list) != num_prompts:
        raise ValueError("sampling_params must be one object or one per prompt")
    return params_list
