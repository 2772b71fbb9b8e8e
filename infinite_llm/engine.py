"""LLMEngine (add requests, step, stream outputs) and the offline `LLM.generate()` API.

The engine is the control plane's process: tokenizer, scheduler, cluster KV manager (rManagers
and the gManager) and the migration coordinator live here; the executor runs each StepPlan on
the instances (threads in this process, or Ray actors).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

from infinite_llm.config import EngineConfig
from infinite_llm.control.kv_manager import ClusterKVManager
from infinite_llm.control.migration import MigrationCoordinator, plan_step
from infinite_llm.control.request import FinishReason, Request
from infinite_llm.control.scheduler import QueueFullError, RequestTooLongError, Scheduler
from infinite_llm.sampling import SamplingParams

__all__ = [
    "LLMEngine",
    "LLM",
    "RequestOutput",
    "EngineStats",
    "QueueFullError",
    "RequestTooLongError",
    "SamplingParams",
]


@dataclass
class RequestOutput:
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


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    per_instance: list[dict] = field(default_factory=list)
    num_steps: int = 0
    num_preemptions: int = 0
    num_migrated_blocks: int = 0


class _Detokenizer:
    """Full-text detokenization with stop-string detection for one request."""

    def __init__(self, tokenizer, params: SamplingParams):
        self.tokenizer = tokenizer
        self.params = params
        self.text = ""

    def update(self, output_ids: list[int]) -> Optional[str]:
        """Refresh the text; return the matched stop string if one appeared."""
        text = self.tokenizer.decode(output_ids, skip_special_tokens=True)
        # Hold back an incomplete UTF-8 sequence (decoded as U+FFFD) until it completes.
        while text.endswith("\ufffd"):
            text = text[:-1]
        # Only the newly added tail (plus room for a straddling stop string) needs scanning.
        scan_from = max(0, len(self.text) - max((len(s) for s in self.params.stop), default=0))
        self.text = text
        for stop in self.params.stop:
            at = text.find(stop, scan_from)
            if at != -1:
                end = at + len(stop) if self.params.include_stop_str_in_output else at
                self.text = text[:end]
                return stop
        return None


class LLMEngine:
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
        self.kv = ClusterKVManager(
            num_instances=cluster.num_instances,
            num_blocks_per_instance=cache.num_blocks_per_instance,
            block_size=cache.block_size,
            lend_fraction=cache.lend_fraction,
            placement=cluster.placement,
        )
        self.scheduler = Scheduler(config.scheduler, self.kv)
        eos = set(self.tokenizer.eos_token_ids) | set(self.model_config.eos_token_ids)
        self.scheduler.eos_token_ids = frozenset(eos)
        self.migrations = MigrationCoordinator.for_engine(config, self.kv, self.model_config)
        self.executor = self._make_executor()
        self._detok: dict[str, _Detokenizer] = {}
        self._pending_outputs: list[RequestOutput] = []
        self._ids = itertools.count()
        self.num_steps = 0

    def _make_executor(self):
        cluster = self.config.cluster
        dtype = self.config.cache.dtype if self.config.cache.dtype != "auto" else None
        if cluster.backend == "local":
            from infinite_llm.runtime.executor import LocalExecutor

            return LocalExecutor(
                self.model_path, self.model_config, self.config.cache, cluster.num_instances,
                device=cluster.device, dtype=dtype, seed=self.config.seed,
            )
        if cluster.backend == "ray":
            from infinite_llm.runtime.cluster import RayExecutor

            return RayExecutor(
                self.model_path, self.model_config, self.config.cache, cluster.num_instances,
                device=cluster.device, dtype=dtype, seed=self.config.seed, ray_address=cluster.ray_address,
            )
        raise ValueError(f"unknown cluster backend {cluster.backend!r}; choose 'local' or 'ray'")

    # ------------------------------------------------------------------ requests
    def add_request(
        self,
        request_id: Optional[str],
        prompt: Union[str, list[int]],
        params: Optional[SamplingParams] = None,
        arrival_time: Optional[float] = None,
    ) -> str:
        params = params or SamplingParams()
        params.validate()
        if request_id is None:
            request_id = f"req-{next(self._ids)}"
        if isinstance(prompt, str):
            token_ids = self.tokenizer.encode(prompt)
        else:
            token_ids = list(prompt)
            vocab = self.model_config.vocab_size
            bad = [t for t in token_ids if not isinstance(t, int) or not 0 <= t < vocab]
            if bad:
                raise ValueError(f"prompt token ids must be integers in [0, {vocab}); got {bad[:5]}")
        request = Request(
            request_id=request_id,
            prompt_token_ids=token_ids,
            sampling=params,
            arrival_time=arrival_time if arrival_time is not None else time.monotonic(),
            max_total_tokens=self.model_config.max_position_embeddings,
        )
        self.scheduler.add_request(request)
        self._detok[request_id] = _Detokenizer(self.tokenizer, params)
        return request_id

    def abort_request(self, request_id: str) -> None:
        request = self.scheduler.abort(request_id)
        if request is not None:
            self.migrations.forget(request_id)
            request.finished_time = time.monotonic()
            self._pending_outputs.append(self._output(request))
            self._release(request_id)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---------------------------------------------------------------------- step
    def step(self) -> list[RequestOutput]:
        outputs, self._pending_outputs = self._pending_outputs, []
        now = time.monotonic()
        sched_out = plan_step(self.kv, self.scheduler, self.migrations, now, self.num_steps)
        if sched_out.plan.is_empty():
            return outputs
        results = self.executor.execute(sched_out.plan)
        self.num_steps += 1
        now = time.monotonic()
        for request in self.scheduler.update(sched_out, results, now):
            detok = self._detok[request.request_id]
            stop = detok.update(request.output_token_ids)
            if stop is not None and not request.is_finished:
                self.scheduler.finish(request.request_id, FinishReason.STOP, now)
            outputs.append(self._output(request))
            if request.is_finished:
                self.migrations.forget(request.request_id)
                self._release(request.request_id)
        return outputs

    def _output(self, request: Request) -> RequestOutput:
        detok = self._detok.get(request.request_id)
        return RequestOutput(
            request_id=request.request_id,
            prompt_token_ids=request.prompt_token_ids,
            output_token_ids=list(request.output_token_ids),
            text=detok.text if detok else "",
            finished=request.is_finished,
            finish_reason=request.finish_reason.value if request.finish_reason else None,
            arrival_time=request.arrival_time,
            first_token_time=request.first_token_time,
            finished_time=request.finished_time,
            num_preemptions=request.num_preemptions,
        )

    def _release(self, request_id: str) -> None:
        self._detok.pop(request_id, None)
        self.scheduler.pop_finished(request_id)

    def stats(self) -> EngineStats:
        per_instance = []
        for i in range(self.kv.num_instances):
            usage = self.kv.usage(i)
            per_instance.append(
                {
                    "instance": i,
                    "blocks_total": self.config.cache.num_blocks_per_instance,
                    "blocks_used": usage["used"],
                    "blocks_free": usage["free"],
                    "blocks_lent": usage["lent"],
                    "blocks_borrowed": usage["borrowed"],
                }
            )
        return EngineStats(
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting,
            per_instance=per_instance,
            num_steps=self.num_steps,
            num_preemptions=self.scheduler.num_preemptions,
            num_migrated_blocks=self.migrations.num_migrated_blocks,
        )

    def shutdown(self) -> None:
        self.executor.shutdown()


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
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError("sampling_params must be one object or one per prompt")
        ids = [self.engine.add_request(None, p, sp) for p, sp in zip(prompts, params_list)]
        final: dict[str, RequestOutput] = {}
        progress = None
        if use_tqdm:
            from tqdm import tqdm

            progress = tqdm(total=len(ids), desc="generate", unit="req")
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.finished:
                    final[out.request_id] = out
                    if progress is not None:
                        progress.update(1)
        if progress is not None:
            progress.close()
        return [final[i] for i in ids]

    def shutdown(self) -> None:
        self.engine.shutdown()
