"""Schemathesis against the app in-process (ASGI transport, no network, the built-in model on a
small KV budget): every generated request, valid or not, gets a documented non-5xx answer whose
status, headers, content type and body conform to /openapi.json, and unsupported methods get 405
with an exact `Allow`.

Bounded: schemathesis' coverage phase (boundary values of every field, deterministic) plus
`FUZZ_EXAMPLES` random requests per operation, derandomized so that every run sends the same
requests.
"""

from __future__ import annotations

from typing import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from infinite_llm.async_engine import AsyncLLMEngine
from infinite_llm.config import CacheConfig, ClusterConfig, EngineConfig, SchedulerConfig
from infinite_llm.entrypoints.api_server import build_app

FUZZ_EXAMPLES = 25


def fuzz_config() -> EngineConfig:
    # 128 tokens of KV: a request without max_tokens stops within 128 tokens. A short waiting
    # queue bounds the work of a request with many choices (the rest of it gets 429).
    return EngineConfig(
        model="default",
        cache=CacheConfig(block_size=16, num_blocks_per_instance=8),
        cluster=ClusterConfig(num_instances=1),
        scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=256, max_waiting=8),
    )


@pytest.fixture(scope="module")
def api_schema() -> Iterator[schemathesis.schemas.BaseSchema]:
    engine = AsyncLLMEngine(fuzz_config())
    try:
        yield schemathesis.openapi.from_asgi("/openapi.json", build_app(engine))
    finally:
        engine.shutdown()


# Out of scope: POST /admin/instances starts an instance (seconds and memory each) and DELETE
# /admin/instances/{id} drains the only one, after which every request is a (documented) 503;
# neither takes a body to fuzz. tests/test_api_failover.py covers both.
schema = (
    schemathesis.pytest.from_fixture("api_schema")
    .exclude(method="POST", path="/admin/instances")
    .exclude(method="DELETE", path="/admin/instances/{instance}")
)


@schema.parametrize()
@settings(max_examples=FUZZ_EXAMPLES, derandomize=True, database=None, deadline=None,
          suppress_health_check=list(HealthCheck))
def test_api_conforms_to_its_schema(case: schemathesis.Case) -> None:
    # Every check but one: a schema-valid request may still be refused with 400 for what no
    # static schema can state (prompt + max_tokens over max_model_len, token ids past the
    # vocabulary, prompts x n over 64, unsupported options set), which that check calls a failure.
    case.call_and_validate(excluded_checks=[schemathesis.checks.positive_data_acceptance])
