"""The HTTP server through an instance failure: open streams finish with the text of an
undisturbed run, /health reports each instance and stays 200 while one can serve, /metrics
counts the failure, the operator adds and drains instances through /admin/instances; with no
instance left, /health and new requests get 503."""

from __future__ import annotations

import json
import threading

import httpx

from infinite_llm.config import CacheConfig, ClusterConfig, EngineConfig, SchedulerConfig
from tests.test_api_server import LiveServer


def _config() -> EngineConfig:
    return EngineConfig(
        model="default",
        cache=CacheConfig(block_size=16, num_blocks_per_instance=48),
        cluster=ClusterConfig(num_instances=2, instance_timeout_s=1.0, heartbeat_interval_s=0.05,
                              debug_step_delay_s={0: 0.03, 1: 0.03}),  # streams outlive the fault
        scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=256),
    )


def _crash(server: LiveServer, rank: int) -> None:
    def boom():
        raise RuntimeError("injected fault: this instance's step crashed")

    server.engine.engine.cluster.instances[rank].scheduler.schedule = boom


def _stream_text(client: httpx.Client, prompt: str, started: threading.Event, out: dict) -> None:
    body = {"model": "default", "prompt": prompt, "max_tokens": 40, "temperature": 0, "ignore_eos": True,
            "stream": True}
    text = []
    with client.stream("POST", "/v1/completions", json=body) as response:
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            text.append(event["choices"][0]["text"])
            if len("".join(text)) > 0:
                started.set()
            if event["choices"][0]["finish_reason"]:
                out[prompt] = ("".join(text), event["choices"][0]["finish_reason"])


def test_streams_survive_an_instance_and_health_reports_it():
    server = LiveServer(_config())
    try:
        prompts = ["The capital of France is", "Once upon a time"]
        with server.client() as client:
            expected = {
                p: client.post("/v1/completions", json={"model": "default", "prompt": p, "max_tokens": 40,
                                                         "temperature": 0, "ignore_eos": True}).json()
                ["choices"][0]["text"]
                for p in prompts
            }
            router = server.engine.engine.router
            out: dict = {}
            started = [threading.Event() for _ in prompts]
            threads = [threading.Thread(target=_stream_text, args=(server.client(), p, e, out))
                       for p, e in zip(prompts, started)]
            for t in threads:
                t.start()
            for e in started:
                assert e.wait(30)
            victim = max(router.homes.values())  # the home of at least one stream
            survivor = 1 - victim
            on_victim = list(router.homes.values()).count(victim)
            _crash(server, victim)
            for t in threads:
                t.join(60)
            assert out == {p: (expected[p], "length") for p in prompts}

            health = client.get("/health")
            assert health.status_code == 200
            assert health.json()["status"] == "degraded"
            assert health.json()["instances"][victim]["state"] == "dead"
            assert health.json()["instances"][survivor]["state"] == "alive"
            metrics = client.get("/metrics").text
            assert 'infinite_llm_instance_failures_total{model_name="default"} 1.0' in metrics
            assert f'infinite_llm_recomputed_requests_total{{model_name="default"}} {on_victim}.0' in metrics
            assert f'infinite_llm_instance_up{{instance="{victim}",model_name="default"}} 0.0' in metrics

            # The operator replaces the dead instance, then drains the replacement again.
            added = client.post("/admin/instances")
            assert added.status_code == 201 and added.json()["instance"] == 2
            assert [i["state"] for i in client.get("/admin/instances").json()["instances"]][2] == "alive"
            assert client.post("/v1/completions", json={"model": "default", "prompt": prompts[0], "max_tokens": 40,
                                                        "temperature": 0, "ignore_eos": True}).json()["choices"][0]["text"] \
                == expected[prompts[0]]
            refused = client.delete(f"/admin/instances/{victim}")
            assert refused.status_code == 400 and "not a live instance" in refused.json()["error"]["message"]
            assert client.delete("/admin/instances/2").json() == {"removed": 2}
            assert server.wait_until(lambda: client.get("/health").json()["instances"][2]["state"] == "dead")

            _crash(server, survivor)
            client.post("/v1/completions", json={"model": "default", "prompt": "x", "max_tokens": 2})
            assert server.wait_until(lambda: client.get("/health").status_code == 503)
            assert client.get("/health").json()["error"]["code"] == "no_live_instance"
            refused = client.post("/v1/completions", json={"model": "default", "prompt": "x", "max_tokens": 2})
            assert refused.status_code == 503
            assert refused.json()["error"]["code"] == "no_live_instance"
    finally:
        server.close()
