"""The OpenAI-compatible server against the real engine (built-in default model, small KV budget),
served by uvicorn on 127.0.0.1 from a background thread."""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import os
import socket
import threading
import time
from typing import Callable, Optional

import httpx
import openai
import pytest
import uvicorn

from infinite_llm.async_engine import AsyncLLMEngine, EngineDeadError
from infinite_llm.config import CacheConfig, ClusterConfig, EngineConfig, SchedulerConfig
from infinite_llm.engine import LLMEngine, QueueFullError
from infinite_llm.entrypoints.api_server import DEFAULT_MAX_REQUEST_BYTES, build_app
from infinite_llm.sampling import SamplingParams

BLOCK_SIZE = 16
NUM_BLOCKS = 48  # 768 tokens of KV per instance


def small_config(num_instances: int = 1, max_num_seqs: int = 8, max_waiting: int = 64,
                 num_blocks: int = NUM_BLOCKS) -> EngineConfig:
    return EngineConfig(
        model="default",
        cache=CacheConfig(block_size=BLOCK_SIZE, num_blocks_per_instance=num_blocks),
        cluster=ClusterConfig(num_instances=num_instances),
        scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=256, max_waiting=max_waiting),
    )


class LiveServer:
    """An AsyncLLMEngine behind uvicorn on a free local port, in a background thread."""

    def __init__(self, config: Optional[EngineConfig] = None,
                 engine_factory: Optional[Callable[[], LLMEngine]] = None,
                 max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES) -> None:
        self.engine = AsyncLLMEngine(config, engine_factory=engine_factory)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))  # pre-bound: no race for the port
        self.port = sock.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(build_app(self.engine, max_request_bytes),
                                                   log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)

    def client(self, timeout: float = 60.0) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=timeout)

    def kv_blocks_used(self) -> int:
        stats = self.engine.latest_stats()
        return sum(entry["blocks_used"] for entry in stats.per_instance)

    def wait_until(self, predicate: Callable[[], bool], timeout: float = 15.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(0.02)
        return predicate()

    def wait_idle(self, timeout: float = 15.0) -> bool:
        """True once nothing runs or waits and every KV block is free again."""
        def idle() -> bool:
            stats = self.engine.latest_stats()
            return stats.num_running == 0 and stats.num_waiting == 0 and self.kv_blocks_used() == 0
        return self.wait_until(idle, timeout)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.engine.shutdown()


@pytest.fixture(scope="module")
def server():
    # Two instances, so per-instance metrics and pooled KV (lending) are in play.
    live = LiveServer(small_config(num_instances=2))
    yield live
    live.close()


@pytest.fixture()
def client(server):
    with server.client() as c:
        yield c


@pytest.fixture()
def oai(server):
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=60)


def sse_events(response: httpx.Response) -> list:
    """Parse an SSE body into JSON payloads; the final `[DONE]` is returned as the string."""
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
        else:
            assert line == "", f"unexpected SSE line {line!r}"
    return events


def assert_openai_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    return error


# ----------------------------------------------------------------------------- basics
def test_health_and_models(client):
    health = client.get("/health")
    assert health.status_code == 200
    body = health.json()
    assert body["status"] == "ok"
    assert [(i["instance"], i["state"]) for i in body["instances"]] == [(0, "alive"), (1, "alive")]
    assert 0 <= body["instances"][0]["last_heartbeat_age_s"] < 5
    models = client.get("/v1/models").json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == ["default"]
    assert models["data"][0]["vocab_size"] > 0


def test_models_reports_the_per_request_context_limit(server, client):
    """max_model_len is what one request can hold (KV cache under the placement policy), not the
    model's position count (1M for the built-in model)."""
    limit = client.get("/v1/models").json()["data"][0]["max_model_len"]
    assert limit < server.engine.model_config.max_position_embeddings
    prompt = [7] * (limit - 1)
    fits = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 1, "ignore_eos": True})
    assert fits.status_code == 200, fits.text
    assert fits.json()["usage"]["total_tokens"] == limit
    over = assert_openai_error(client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 2}), 400)
    assert (over["code"], over["param"]) == ("context_length_exceeded", "max_tokens")


def test_a_prompt_alone_too_long_names_the_prompt(client):
    limit = client.get("/v1/models").json()["data"][0]["max_model_len"]
    r = client.post("/v1/completions", json={"prompt": [7] * limit, "max_tokens": 1})
    error = assert_openai_error(r, 400)
    assert (error["code"], error["param"]) == ("context_length_exceeded", "prompt")
    assert str(limit) in error["message"]
    chat = {"messages": [{"role": "user", "content": "hello " * limit}], "max_tokens": 1}
    error = assert_openai_error(client.post("/v1/chat/completions", json=chat), 400)
    assert (error["code"], error["param"]) == ("context_length_exceeded", "messages")


def test_chat_without_max_tokens_is_bounded_by_the_context():
    """As at OpenAI: no max_tokens means "until the context is full", and /v1/models says where that is."""
    live = LiveServer(small_config(num_blocks=8))
    try:
        with live.client() as client:
            limit = client.get("/v1/models").json()["data"][0]["max_model_len"]
            chat = {"messages": [{"role": "user", "content": "hi"}], "ignore_eos": True}
            r = client.post("/v1/chat/completions", json=chat)
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["finish_reason"] == "length"
            assert r.json()["usage"]["total_tokens"] == limit
    finally:
        live.close()


def test_serve_help_says_where_a_request_without_max_tokens_stops():
    from infinite_llm.entrypoints.cli import build_parser

    serve = build_parser()._subparsers._group_actions[0].choices["serve"]  # type: ignore[union-attr]
    text = " ".join(serve.format_help().split())
    assert "max_model_len" in text and "without max_tokens" in text


def test_completion_non_stream_counts_usage(client, server):
    prompt = "Hello, my name is"
    r = client.post("/v1/completions", json={
        "model": "default", "prompt": prompt, "max_tokens": 7, "temperature": 0, "ignore_eos": True,
    })
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == "default"
    (choice,) = body["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] == "length" and isinstance(choice["text"], str)
    expected_prompt_tokens = len(server.engine.tokenizer.encode(prompt))
    assert body["usage"] == {"prompt_tokens": expected_prompt_tokens, "completion_tokens": 7,
                             "total_tokens": expected_prompt_tokens + 7}


def test_stream_text_equals_non_stream_text(client):
    request = {"prompt": [5, 17, 99, 250, 31], "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    full = client.post("/v1/completions", json=request).json()["choices"][0]["text"]
    with client.stream("POST", "/v1/completions", json={**request, "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "text_completion" and "usage" not in c for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == full
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


def test_stop_string_is_removed_also_when_streaming(client):
    base = {"prompt": "The quick brown fox", "max_tokens": 24, "temperature": 0, "ignore_eos": True}
    text = client.post("/v1/completions", json=base).json()["choices"][0]["text"]
    stop = text[6:9]  # a stop string that occurs mid-output
    assert len(stop) == 3, "the greedy output is too short for this test"
    cut = text[: text.index(stop)]
    body = client.post("/v1/completions", json={**base, "stop": stop}).json()
    assert body["choices"][0]["text"] == cut
    assert body["choices"][0]["finish_reason"] == "stop"
    with client.stream("POST", "/v1/completions", json={**base, "stop": [stop], "stream": True}) as r:
        events = sse_events(r)
    # Characters that might start the stop string are held back, so nothing past the cut leaks.
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == cut
    assert events[-2]["choices"][0]["finish_reason"] == "stop"


def test_batch_of_prompts_with_n(client):
    prompts = [[10, 11, 12], [40, 41, 42, 43, 44]]
    r = client.post("/v1/completions", json={
        "prompt": prompts, "n": 2, "max_tokens": 3, "temperature": 1.0, "seed": 7, "ignore_eos": True,
    })
    assert r.status_code == 200, r.text
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    # Each prompt counted once, whatever n is.
    assert body["usage"]["prompt_tokens"] == 3 + 5
    assert body["usage"]["completion_tokens"] == 4 * 3


def test_echo_prepends_the_prompt(client):
    request = {"prompt": "Echo me", "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    plain = client.post("/v1/completions", json=request).json()["choices"][0]["text"]
    echoed = client.post("/v1/completions", json={**request, "echo": True}).json()["choices"][0]["text"]
    assert echoed == "Echo me" + plain
    with client.stream("POST", "/v1/completions", json={**request, "echo": True, "stream": True}) as r:
        events = sse_events(r)
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == echoed


def test_seeded_sampling_is_reproducible(client):
    def sample(seed: int) -> str:
        r = client.post("/v1/completions", json={
            "prompt": "Once upon a time", "max_tokens": 16, "temperature": 1.0, "top_p": 0.95,
            "seed": seed, "ignore_eos": True,
        })
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    first = sample(1234)
    assert sample(1234) == first
    assert len({first, sample(1), sample(2)}) > 1, "different seeds should not all agree"


# ----------------------------------------------------------------------------- chat
def test_chat_non_stream_and_stream(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    request = {"model": "default", "messages": messages, "max_completion_tokens": 6, "temperature": 0,
               "ignore_eos": True}
    body = client.post("/v1/chat/completions", json=request).json()
    assert body["object"] == "chat.completion"
    (choice,) = body["choices"]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 6
    with client.stream("POST", "/v1/chat/completions", json={
        **request, "stream": True, "stream_options": {"include_usage": True},
    }) as r:
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    first, *middle, usage_chunk, _ = events
    assert first["object"] == "chat.completion.chunk"
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all("role" not in c["choices"][0]["delta"] for c in middle)
    assert middle[-1]["choices"][0]["finish_reason"] == "length"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in middle) == choice["message"]["content"]
    assert all(c["usage"] is None for c in [first, *middle])
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == body["usage"]


def test_openai_client_unchanged(oai):
    completion = oai.completions.create(model="default", prompt="Say something", max_tokens=5,
                                        temperature=0, extra_body={"ignore_eos": True})
    assert completion.usage.completion_tokens == 5
    streamed = "".join(
        chunk.choices[0].text
        for chunk in oai.completions.create(model="default", prompt="Say something", max_tokens=5,
                                            temperature=0, stream=True, extra_body={"ignore_eos": True})
    )
    assert streamed == completion.choices[0].text

    chat = oai.chat.completions.create(model="default", messages=[{"role": "user", "content": "Hello"}],
                                       max_tokens=4, temperature=0, extra_body={"ignore_eos": True})
    assert chat.choices[0].message.role == "assistant"
    assert chat.usage.completion_tokens == 4
    parts, usage = [], None
    for chunk in oai.chat.completions.create(model="default", messages=[{"role": "user", "content": "Hello"}],
                                             max_tokens=4, temperature=0, stream=True,
                                             stream_options={"include_usage": True},
                                             extra_body={"ignore_eos": True}):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            parts.append(choice.delta.content or "")
    assert "".join(parts) == chat.choices[0].message.content
    assert usage is not None and usage.completion_tokens == 4

    with pytest.raises(openai.NotFoundError):
        oai.completions.create(model="no-such-model", prompt="x", max_tokens=1)
    with pytest.raises(openai.BadRequestError):
        oai.completions.create(model="default", prompt="x", max_tokens=1, temperature=-2)


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "body, param",
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [[]]}, "prompt"),
        ({"prompt": "x", "temperature": -1}, "temperature"),
        ({"prompt": "x", "temperature": 2.5}, "temperature"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "x", "top_p": 0}, "top_p"),
        ({"prompt": "x", "top_p": 1.5}, "top_p"),
        ({"prompt": "x", "top_k": -2}, "top_k"),
        ({"prompt": "x", "seed": 1.5}, "seed"),
        ({"prompt": "x", "stop": [""]}, "stop"),
        ({"prompt": "x", "stop_token_ids": [-1]}, "stop_token_ids"),
        ({"prompt": "x", "presence_penalty": 3}, "presence_penalty"),
        ({"prompt": "x", "max_tokens": "many"}, "max_tokens"),  # FastAPI's 422 turned into 400
        ({"prompt": [1.5, 2]}, "prompt"),
        ({"prompt": [10**9]}, None),  # token id outside the vocabulary
        ({"prompt": "x", "n": 0}, "n"),
        ({"prompt": "x", "logprobs": 3}, "logprobs"),
        ({"prompt": "x", "frequency_penalty": 0.5}, "frequency_penalty"),
        ({}, "prompt"),
        ({"prompt": [-1]}, "prompt"),
        ({"prompt": ["a", ""]}, "prompt"),
        # Strict types, as at OpenAI: no bool for a number, no string for a bool or a number.
        ({"prompt": "x", "max_tokens": True}, "max_tokens"),
        ({"prompt": "x", "stream": "yes"}, "stream"),
        ({"prompt": "x", "stream": 1}, "stream"),
        ({"prompt": "x", "n": 2.0}, "n"),
        ({"prompt": "x", "echo": "true"}, "echo"),
        ({"prompt": "x", "temperature": "0.5"}, "temperature"),
        ({"prompt": "x", "stream_options": {"include_usage": "yes"}}, "stream_options"),
    ],
)
def test_invalid_completion_requests_get_400(client, body, param):
    error = assert_openai_error(client.post("/v1/completions", json=body), 400)
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param


def test_prompt_longer_than_the_cluster_kv_gets_400(client):
    too_long = [7] * (2 * NUM_BLOCKS * BLOCK_SIZE + 1)  # more than both instances hold together
    error = assert_openai_error(client.post("/v1/completions", json={"prompt": too_long, "max_tokens": 1}), 400)
    assert error["code"] == "context_length_exceeded"


@pytest.mark.parametrize("prompt", ["", [], [[]], ["a", ""], [[1], []]])
def test_an_empty_prompt_is_called_empty(client, prompt):
    error = assert_openai_error(client.post("/v1/completions", json={"prompt": prompt}), 400)
    assert error["param"] == "prompt" and "empty" in error["message"]


@pytest.mark.parametrize("fields, param", [({"max_tokens": True}, "max_tokens"), ({"stream": "yes"}, "stream"),
                                           ({"max_completion_tokens": 1.0}, "max_completion_tokens"),
                                           ({"messages": [{"role": "robot", "content": "x"}]}, "messages"),
                                           ({"messages": [{"role": "user", "content": 5}]}, "messages")])
def test_chat_types_are_strict(client, fields, param):
    body = {"messages": [{"role": "user", "content": "x"}], **fields}
    assert assert_openai_error(client.post("/v1/chat/completions", json=body), 400)["param"] == param


@pytest.mark.parametrize("path, body, where", [
    ("/v1/completions", r'{"prompt": ["fine", "ab\ud800c"]}', "the prompt"),
    ("/v1/completions", r'{"prompt": "fine", "stop": "ab\ud800c"}', "stop"),
    ("/v1/chat/completions", r'{"messages": [{"role": "system", "content": "ok"}, '
                             r'{"role": "user", "content": "ab\ud800c"}]}', "messages[1].content"),
])
def test_a_lone_surrogate_gets_a_clear_400(client, path, body, where):
    """Not the tokenizer's "TextInputSequence must be str": what is wrong, and where."""
    r = client.post(path, content=body.encode(), headers={"content-type": "application/json"})
    message = assert_openai_error(r, 400)["message"]
    assert f"{where} is not valid Unicode: lone surrogate '\\ud800' at character 2" in message, message


def test_malformed_json_and_wrong_shapes_get_400(client):
    for raw in (b"{not json", b"[1, 2, 3]", b'"just a string"'):
        r = client.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
        assert_openai_error(r, 400)
    assert_openai_error(client.post("/v1/chat/completions", json={"messages": []}), 400)
    assert_openai_error(client.post("/v1/chat/completions", json={"messages": [{"content": "no role"}]}), 400)
    bad_part = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}
    assert_openai_error(client.post("/v1/chat/completions", json=bad_part), 400)


def test_unknown_model_and_route_get_404(client):
    error = assert_openai_error(client.post("/v1/completions", json={"model": "gpt-9", "prompt": "x"}), 404)
    assert error["code"] == "model_not_found" and error["param"] == "model"
    chat = {"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}
    assert_openai_error(client.post("/v1/chat/completions", json=chat), 404)
    assert_openai_error(client.get("/v1/nothing-here"), 404)


def test_openapi_documents_what_the_server_answers(client):
    schema = client.get("/openapi.json").json()
    operations = [op for path in schema["paths"].values() for op in path.values()]
    assert not any("422" in op["responses"] for op in operations)  # validation errors are 400 here
    for path in ("/v1/completions", "/v1/chat/completions"):
        responses = schema["paths"][path]["post"]["responses"]
        assert {"200", "400", "404", "413", "429", "503"} <= set(responses)
        assert responses["429"]["headers"]["Retry-After"]["required"] is True
        assert set(responses["200"]["content"]) == {"application/json", "text/event-stream"}
    assert set(schema["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}
    assert client.get("/metrics").headers["content-type"].startswith("text/plain")
    models = schema["components"]["schemas"]
    prompt_shapes = models["CompletionRequest"]["properties"]["prompt"]["anyOf"]
    assert all(shape.get("minLength") == 1 or shape.get("minItems") == 1 for shape in prompt_shapes)
    assert models["ChatCompletionRequest"]["properties"]["messages"]["minItems"] == 1
    assert models["ChatMessage"]["properties"]["role"]["enum"] == ["system", "user", "assistant"]


def test_wrong_method_gets_405_with_allow(client):
    for method, path, allowed in (("PUT", "/v1/completions", "POST"), ("POST", "/v1/models", "GET"),
                                  ("GET", "/v1/chat/completions", "POST"),
                                  ("PUT", "/admin/instances", "GET, POST")):
        r = client.request(method, path)
        assert_openai_error(r, 405)
        assert r.headers["Allow"] == allowed


def test_server_is_healthy_after_bad_input(client):
    assert client.get("/health").status_code == 200
    assert client.post("/v1/completions", json={"prompt": "ok", "max_tokens": 1}).status_code == 200


# ----------------------------------------------------------------------------- sampling parameters
@pytest.mark.parametrize(
    "fields, param",
    [
        ('"temperature": NaN', "temperature"),
        ('"temperature": Infinity', "temperature"),
        ('"temperature": -Infinity', "temperature"),
        ('"top_p": NaN', "top_p"),
        ('"presence_penalty": NaN', "presence_penalty"),
        ('"frequency_penalty": Infinity', "frequency_penalty"),
    ],
)
def test_non_finite_sampling_parameters_get_400_naming_the_field(client, fields, param):
    # Python's json (and so FastAPI) reads NaN/Infinity; they must never reach the sampler.
    for path, start in (("/v1/completions", '"prompt": "x"'),
                        ("/v1/chat/completions", '"messages": [{"role": "user", "content": "x"}]')):
        raw = f'{{{start}, "max_tokens": 2, {fields}}}'
        r = client.post(path, content=raw.encode(), headers={"content-type": "application/json"})
        assert assert_openai_error(r, 400)["param"] == param
    assert client.get("/health").status_code == 200


def test_chat_names_the_token_limit_field_it_was_sent(client):
    messages = [{"role": "user", "content": "x"}]
    for field in ("max_tokens", "max_completion_tokens"):
        r = client.post("/v1/chat/completions", json={"messages": messages, field: 0})
        assert assert_openai_error(r, 400)["param"] == field
        r = client.post("/v1/chat/completions", json={"messages": messages, field: 10**6})
        error = assert_openai_error(r, 400)
        assert (error["code"], error["param"]) == ("context_length_exceeded", field)


def test_tiny_temperature_is_greedy_and_leaves_the_engine_healthy(client, oai):
    """Dividing logits by 1e-40 used to overflow, crash the engine thread and 503 every later request."""
    request = {"prompt": "x", "max_tokens": 8, "ignore_eos": True}
    greedy = client.post("/v1/completions", json={**request, "temperature": 0}).json()["choices"][0]["text"]
    r = client.post("/v1/completions", json={**request, "temperature": 1e-40})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == greedy
    assert client.post("/v1/completions", json={"prompt": "x", "temperature": 1e-40}).status_code == 200
    via_sdk = oai.completions.create(model="default", prompt="x", max_tokens=8, temperature=1e-40,
                                     extra_body={"ignore_eos": True})
    assert via_sdk.choices[0].text == greedy
    chat = oai.chat.completions.create(model="default", messages=[{"role": "user", "content": "x"}],
                                       max_tokens=4, temperature=1e-40)
    assert chat.choices[0].finish_reason in ("stop", "length")
    assert client.get("/health").json()["status"] == "ok"  # the engine survived all of that
    sampled = client.post("/v1/completions", json={**request, "temperature": 1.0, "seed": 3})
    assert sampled.status_code == 200


# ----------------------------------------------------------------------------- request size, tokenization
def test_body_over_the_limit_gets_413_before_parsing(client):
    huge = {"prompt": "a" * 10_000_000, "max_tokens": 1}
    started = time.monotonic()
    r = client.post("/v1/completions", json=huge)
    # Parsing and tokenizing 10M characters would take many seconds; the limit answers at once.
    assert time.monotonic() - started < 5.0
    error = assert_openai_error(r, 413)
    assert error["code"] == "request_too_large" and str(DEFAULT_MAX_REQUEST_BYTES) in error["message"]

    body = json.dumps(huge).encode()

    def chunked():  # no Content-Length: the server has to count what arrives
        for i in range(0, len(body), 1 << 16):
            yield body[i:i + (1 << 16)]

    r = client.post("/v1/completions", content=chunked(), headers={"content-type": "application/json"})
    assert assert_openai_error(r, 413)["code"] == "request_too_large"
    # Just under the limit is served (unknown fields are ignored, so the padding is harmless).
    padded = {"prompt": "hi", "max_tokens": 1, "user": "x" * (DEFAULT_MAX_REQUEST_BYTES - 100)}
    assert client.post("/v1/completions", json=padded).status_code == 200
    assert client.get("/health").status_code == 200


def _record_chunk_times(base_url: str, request: dict, times: list, stop: threading.Event) -> None:
    with httpx.Client(timeout=60) as c, c.stream("POST", f"{base_url}/v1/completions", json=request) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                times.append(time.monotonic())
                if stop.is_set():
                    return


@pytest.mark.parametrize("num_chars", [3_000_000, pytest.param(10_000_000, marks=pytest.mark.slow)])
def test_huge_prompt_is_tokenized_without_stalling_other_streams(num_chars):
    """Tokenizing in the engine thread froze every stream for as long as the biggest prompt took."""
    config = small_config()
    config.cache.num_blocks_per_instance = 320  # room for a long-running stream
    live = LiveServer(config, max_request_bytes=64 << 20)
    try:
        times: list[float] = []
        stop = threading.Event()
        stream = {"prompt": [5, 6, 7], "max_tokens": 5000, "temperature": 0, "ignore_eos": True, "stream": True}
        reader = threading.Thread(target=_record_chunk_times, args=(live.base_url, stream, times, stop), daemon=True)
        reader.start()
        assert live.wait_until(lambda: len(times) >= 3, timeout=30)
        text = ("The quick brown fox jumps over the lazy dog. " * (num_chars // 45 + 1))[:num_chars]
        with live.client() as client:
            started = time.monotonic()
            r = client.post("/v1/completions", json={"prompt": text, "max_tokens": 1})
            finished = time.monotonic()
        stop.set()
        assert assert_openai_error(r, 400)["code"] == "context_length_exceeded"  # far past the context
        during = [t for t in times if started < t < finished]
        marks = [started, *during, finished]
        max_gap = max(b - a for a, b in zip(marks, marks[1:]))
        # The other stream kept going: its longest silence is a small part of the tokenization.
        assert len(during) >= 3 and max_gap < (finished - started) / 3, (max_gap, finished - started)
        reader.join(30)
    finally:
        live.close()


# ----------------------------------------------------------------------------- disconnects
def test_disconnect_mid_stream_aborts_and_frees_all_blocks(server, client):
    assert server.wait_idle()
    request = {"prompt": list(range(3, 200)), "max_tokens": 1100, "temperature": 0, "ignore_eos": True,
               "stream": True}
    with client.stream("POST", "/v1/completions", json=request) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        for _ in range(3):  # a few tokens arrive, then the client hangs up
            while not next(lines).startswith("data: "):
                pass
        assert server.wait_until(lambda: server.kv_blocks_used() > 0)  # heartbeats lag up to 0.1 s
    # Left alone the request would run ~1100 decode steps; the abort frees it within a step or two.
    assert server.wait_idle(timeout=5), f"blocks still used: {server.engine.latest_stats()}"
    metrics = client.get("/metrics").text
    assert 'infinite_llm_request_finished_total{finish_reason="abort",model_name="default"}' in metrics


def test_disconnect_while_waiting_for_non_stream_result_frees_all_blocks(server):
    assert server.wait_idle()
    request = {"prompt": list(range(3, 200)), "max_tokens": 1100, "temperature": 0, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.base_url}/v1/completions", json=request, timeout=httpx.Timeout(5.0, read=0.5))
    # Left alone the request would run ~1100 decode steps; the abort frees it within a step or two.
    assert server.wait_idle(timeout=5), f"blocks still used: {server.engine.latest_stats()}"


# ----------------------------------------------------------------------------- metrics
def test_metrics_exposition(client):
    client.post("/v1/completions", json={"prompt": "metrics", "max_tokens": 3, "ignore_eos": True})
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples = {}
    for line in r.text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    for instance in ("0", "1"):
        for kind in ("used", "lent", "borrowed", "total"):
            assert f'infinite_llm_kv_blocks_{kind}{{instance="{instance}",model_name="default"}}' in samples
        assert samples[f'infinite_llm_kv_blocks_total{{instance="{instance}",model_name="default"}}'] == NUM_BLOCKS
    assert samples['infinite_llm_num_requests_running{model_name="default"}'] >= 0
    assert samples['infinite_llm_num_requests_waiting{model_name="default"}'] >= 0
    assert samples['infinite_llm_prompt_tokens_total{model_name="default"}'] > 0
    assert samples['infinite_llm_generation_tokens_total{model_name="default"}'] >= 3
    for hist in ("time_to_first_token_seconds", "time_per_output_token_seconds", "e2e_request_latency_seconds"):
        assert samples[f'infinite_llm_{hist}_count{{model_name="default"}}'] >= 1


# ----------------------------------------------------------------------------- async engine
def test_async_engine_raises_admission_errors_before_output(server):
    engine = server.engine

    async def scenario() -> None:
        with pytest.raises(ValueError):
            async for _ in engine.generate([], SamplingParams(max_tokens=1), "empty"):
                pass
        outputs = [o async for o in engine.generate([5, 6, 7], SamplingParams(temperature=0, max_tokens=4,
                                                                               ignore_eos=True), "ok")]
        assert [len(o.output_token_ids) for o in outputs][-1] == 4 and outputs[-1].finished
        # Stopping early (break) aborts the request in the engine.
        async for _ in engine.generate([5, 6, 7], SamplingParams(max_tokens=300, ignore_eos=True), "early"):
            break

    asyncio.run(scenario())
    assert server.wait_idle()


def _thread_cpu_seconds(native_id: int) -> float:
    fields = open(f"/proc/self/task/{native_id}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="needs Linux /proc")
def test_idle_engine_thread_blocks_instead_of_spinning(server):
    assert server.wait_idle()
    time.sleep(0.3)  # let a step already in flight (e.g. delivering an abort) finish
    steps = server.engine.latest_stats().num_steps
    native_id = server.engine._thread.native_id
    before = _thread_cpu_seconds(native_id)
    time.sleep(0.5)
    # A polling loop would burn about 0.5 s of CPU here; a blocked thread burns none.
    assert _thread_cpu_seconds(native_id) - before < 0.1
    assert server.engine.latest_stats().num_steps == steps


# ----------------------------------------------------------------------------- 429 and 503
def test_full_waiting_queue_gets_429():
    # Room for a request that runs far longer than the waiting one waits (2 s), however fast
    # the engine decodes; closing its stream at the end aborts it.
    live = LiveServer(small_config(max_num_seqs=1, max_waiting=1, num_blocks=1024))
    try:
        long_request = {"prompt": [9, 8, 7], "max_tokens": 300, "temperature": 0, "ignore_eos": True}
        running_request = {**long_request, "max_tokens": 16000, "stream": True}
        with live.client() as client, client.stream("POST", "/v1/completions", json=running_request) as running:
            assert running.status_code == 200
            lines = running.iter_lines()
            while not next(lines).startswith("data: "):  # the first request runs now
                pass
            outcome: list[str] = []

            def send_and_give_up() -> None:
                try:  # hangs up while still waiting, which aborts it
                    httpx.post(f"{live.base_url}/v1/completions", json=long_request, timeout=2.0)
                    outcome.append("answered")
                except httpx.ReadTimeout:
                    outcome.append("gave up")

            waiting = threading.Thread(target=send_and_give_up, daemon=True)
            waiting.start()  # it waits (max_num_seqs=1) and fills the queue (max_waiting=1)
            assert live.wait_until(lambda: live.engine.latest_stats().num_waiting == 1)
            refused = client.post("/v1/completions", json=long_request)
            assert assert_openai_error(refused, 429)["type"] == "rate_limit_error"
            assert int(refused.headers["Retry-After"]) >= 1  # tells clients when to come back
            waiting.join(5)
            assert outcome == ["gave up"]
        assert live.wait_idle()
    finally:
        live.close()


def crashing_engine(crash: threading.Event) -> Callable[[], LLMEngine]:
    """An engine factory whose engine's step raises once `crash` is set (the engine thread dies)."""
    def factory() -> LLMEngine:
        engine = LLMEngine(small_config())
        real_step = engine.step

        def step():
            if crash.is_set():
                raise RuntimeError("injected device failure")
            return real_step()

        engine.step = step  # type: ignore[method-assign]
        return engine

    return factory


def test_engine_crash_fails_requests_and_turns_unhealthy():
    crash = threading.Event()
    live = LiveServer(engine_factory=crashing_engine(crash))
    try:
        with live.client() as client:
            request = {"prompt": [4, 5, 6], "max_tokens": 300, "ignore_eos": True, "stream": True}
            with client.stream("POST", "/v1/completions", json=request) as r:
                lines = r.iter_lines()
                while not next(lines).startswith("data: "):
                    pass
                crash.set()
                rest = [json.loads(line[6:]) if line != "data: [DONE]" else "[DONE]"
                        for line in lines if line.startswith("data: ")]
            assert rest[-1] == "[DONE]"
            assert rest[-2]["error"]["code"] == "engine_dead"
            assert_openai_error(client.get("/health"), 503)
            error = assert_openai_error(client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}), 503)
            assert error["code"] == "engine_dead"
        assert not live.engine.is_healthy

        async def add_after_death() -> None:
            with pytest.raises(EngineDeadError):
                await live.engine.add_request("x", SamplingParams(max_tokens=1), "late")

        asyncio.run(add_after_death())
    finally:
        live.close()


def test_queue_full_error_is_raised_by_the_async_engine():
    live_engine = AsyncLLMEngine(small_config(max_num_seqs=1, max_waiting=1))

    async def scenario() -> None:
        params = SamplingParams(max_tokens=200, ignore_eos=True)
        first = await live_engine.add_request([3, 4], params, "a")
        await first.__anext__()  # "a" is running
        second = await live_engine.add_request([3, 4], params, "b")  # waits
        with pytest.raises(QueueFullError):
            await live_engine.add_request([3, 4], params, "c")
        first.abort()
        second.abort()

    try:
        asyncio.run(scenario())
    finally:
        live_engine.shutdown()



class _RecordErrors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _post_keep_alive(conn: http.client.HTTPConnection, path: str, body: dict) -> tuple[int, dict]:
    """POST on an open connection; raises if the server closed it after the previous answer."""
    conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    return response.status, json.loads(response.read())


def test_a_dead_engine_gets_clean_503s_on_a_kept_alive_connection():
    """Not "Exception in ASGI application" with the connection dropped: an answer like any other,
    also for an engine error surfacing where no route expected one."""
    crash = threading.Event()
    live = LiveServer(engine_factory=crashing_engine(crash))
    app = live.server.config.app

    async def engine_error_in_a_handler() -> None:  # e.g. the engine dying mid-request
        raise EngineDeadError("the engine crashed: injected")

    app.add_api_route("/test/engine-error", engine_error_in_a_handler, methods=["POST"])
    errors = _RecordErrors()
    uvicorn_log = logging.getLogger("uvicorn.error")
    uvicorn_log.addHandler(errors)
    conn = http.client.HTTPConnection("127.0.0.1", live.port, timeout=30)
    try:
        crash.set()
        assert _post_keep_alive(conn, "/v1/completions", {"prompt": "x", "max_tokens": 2})[0] == 503
        assert live.wait_until(lambda: not live.engine.is_healthy)
        requests = [("/test/engine-error", {}), ("/v1/completions", {"prompt": "x", "n": 2}),
                    ("/v1/completions", {"prompt": "x", "stream": True}),
                    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}),
                    ("/test/engine-error", {})]
        for path, body in requests:
            status, answer = _post_keep_alive(conn, path, body)
            assert status == 503 and answer["error"]["code"] == "engine_dead", (path, answer)
        assert not [m for m in errors.messages if "Exception in ASGI application" in m]
    finally:
        uvicorn_log.removeHandler(errors)
        conn.close()
        live.close()
