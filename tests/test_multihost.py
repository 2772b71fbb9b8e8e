"""The engine across three "hosts": network namespaces joined by veth links to a bridge, a Ray
head in one and Ray workers in the others (tests/multihost_netns.py builds and removes them).

One request homed on each instance, striped so that every request's KV lies on all three hosts:
the greedy tokens equal transformers', every actor runs in a different host namespace with its
ZeroMQ endpoint bound to that host's link address, and each link's byte counters grow by at least
the per-layer query/partial payload the DistAttention exchange must carry (Ray's own background
traffic over the same span is subtracted first).

The same cluster then runs `infinite-llm serve --backend ray --ray-address ...` (issue 14, item
1): one instance per host, completions requests with token-id prompts answered with the text of
transformers' greedy tokens, and a SIGTERM that drains and exits 0.

Run: sudo python -m pytest -m slow tests/test_multihost.py -s   (about a minute on 2 cores)
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.engine_helpers import prompts
from tests.multihost_netns import (
    Cluster,
    Host,
    all_link_bytes,
    free_port,
    http_in_host,
    instance_actor_namespaces,
    multihost,
    run_driver,
    start_server,
    stop_server,
    unavailable_reason,
    wait_healthy,
)

pytestmark = pytest.mark.slow
ray = pytest.importorskip("ray")
transformers = pytest.importorskip("transformers")

NUM_HOSTS = 3
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def cluster():
    # Probed here, not at import: collecting the default (not slow) suite must not create namespaces.
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(f"no namespaced hosts on this machine: {reason}")
    with multihost(NUM_HOSTS) as made:
        yield made


def _checkpoint(path):
    from tests.hf_fixtures import write_tiny_checkpoint

    # Wider than the default tiny shape: a query is 1 KB per token and layer, so the DistAttention
    # exchange dwarfs Ray's background chatter on the links.
    return write_tiny_checkpoint(path, arch="llama", seed=21, hidden_size=256, intermediate_size=512,
                                 num_attention_heads=8, num_key_value_heads=4, num_hidden_layers=4)


def _delta(report: dict, ns: str, key: str) -> tuple[int, int]:
    """(bytes in the generation window, background bytes scaled to the same span) for one link."""
    run = report["runs"][0]
    moved = run["links_after"][ns][key] - run["links_before"][ns][key]
    idle = report["idle"]
    background = idle["after"][ns][key] - idle["before"][ns][key]
    return moved, int(background * run["elapsed_s"] / max(idle["seconds"], 1e-3))


def test_striped_requests_across_namespaced_hosts(cluster: Cluster, tmp_path):
    from tests.hf_fixtures import hf_greedy

    model = _checkpoint(tmp_path / "model")  # the shared filesystem: every host reads it
    # 8-token blocks, 16 per instance: 40-60 token prompts are striped over all three hosts.
    batch = prompts(5, [50, 40, 60])
    report = run_driver(cluster, ["--model", str(model), "--prompts", json.dumps(batch),
                                  "--max-tokens", str(MAX_TOKENS), "--blocks", "16", "--block-size", "8",
                                  "--placement", "striped"])

    hosts = {h.ns: h for h in cluster.hosts}
    print("\nactor -> host:")
    for rank, actor in enumerate(report["actors"]):
        print(f"  instance {rank}: pid {actor['pid']} in {actor['netns']} (node {actor['node_ip']}), zmq {actor['zmq']}")
    gm = report["gmanager"]
    print(f"  gManager: pid {gm['pid']} in {gm['netns']}, zmq {gm['zmq']}; router (driver) zmq {report['router_zmq']}")
    # One instance per host, each bound to its own host's link address (not loopback), so every
    # message between two instances has to cross two veth links.
    assert sorted(a["netns"] for a in report["actors"]) == sorted(hosts), report["actors"]
    # Every host offers 4 CPUs, so this is the engine's placement (least-used node first) at
    # work: Ray's default scheduling put two instances on host 1 here.
    for actor in report["actors"]:
        host: Host = hosts[actor["netns"]]
        assert actor["node_ip"] == host.ip
        assert actor["zmq"].startswith(f"tcp://{host.ip}:")
        assert actor["placed_on"] in (None, actor["node_id"]), "the actor is not on the node the engine chose"

    outputs = report["runs"][0]["outputs"]
    for i, prompt in enumerate(batch):
        out = outputs[f"r{i}"]
        assert out["error"] is None, out["error"]
        assert out["tokens"] == hf_greedy(model, prompt, MAX_TOKENS), f"request r{i} (homed on instance {i})"
    print(f"greedy output identical to transformers for {len(batch)} requests x {MAX_TOKENS} tokens")

    # Each host is home to one request (queries out, partials back, to and from 2 holders) and
    # holder for the other two (queries in, partials out): the same payload bound each way.
    bound = report["per_request_payload_bound"]
    for rank, sent in enumerate(report["runs"][0]["sent"]):
        print(f"  instance {rank} sent {sent['messages']} messages, {sent['bytes']} serialized bytes")
    print(f"link bytes during generation (background subtracted), lower bound {bound} each way:")
    for ns in hosts:
        tx, tx_bg = _delta(report, ns, "tx")
        rx, rx_bg = _delta(report, ns, "rx")
        print(f"  {ns}/eth0: tx {tx} (background {tx_bg}), rx {rx} (background {rx_bg})")
        assert tx - tx_bg >= bound, f"{ns}: only {tx - tx_bg} bytes sent over its link, expected >= {bound}"
        assert rx - rx_bg >= bound, f"{ns}: only {rx - rx_bg} bytes received over its link, expected >= {bound}"


def _completion_call(base_url: str, prompt: list[int]) -> dict:
    # Token ids, not text: the prompt the engine sees is exactly the one transformers saw.
    return {"method": "POST", "url": f"{base_url}/v1/completions",
            "body": {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}}


def _query_bytes_bound(model: Path, decode_tokens: int, num_requests: int) -> int:
    """A lower bound on one host's link bytes (tx + rx) for requests striped over every host:
    per request, decode token and layer, a host either sends queries (as home) or receives one
    (as holder), whichever instance the server made home. Only the float32 query is counted."""
    cfg = json.loads((model / "config.json").read_text())
    query = cfg["hidden_size"] * 4  # num_heads * head_dim float32 values
    return num_requests * decode_tokens * cfg["num_hidden_layers"] * query


def _link_growth(before: dict, after: dict, ns: str) -> int:
    return sum(after[ns][k] - before[ns][k] for k in ("tx", "rx"))


def _measure_idle(cluster: Cluster, seconds: float) -> dict[str, float]:
    """Each link's bytes per second with the server up and idle (Ray and engine heartbeats):
    subtracted from the request window so that background traffic cannot pass the check."""
    before = all_link_bytes(cluster.hosts)
    time.sleep(seconds)
    after = all_link_bytes(cluster.hosts)
    return {h.ns: _link_growth(before, after, h.ns) / seconds for h in cluster.hosts}


def _wait_actors_gone(cluster: Cluster, timeout_s: float = 30) -> dict[int, str]:
    """Ray ends a driver's actors after the driver exits; returns those still there at the end."""
    deadline = time.monotonic() + timeout_s
    left = instance_actor_namespaces(cluster.hosts)
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = instance_actor_namespaces(cluster.hosts)
    return left


def test_serve_cli_one_instance_per_host(cluster: Cluster, tmp_path: Path):
    from infinite_llm.tokenizer import load_tokenizer
    from tests.hf_fixtures import hf_greedy

    model = _checkpoint(tmp_path / "model")
    batch = prompts(7, [50, 40, 60])
    # The text the server must return: transformers' greedy ids decoded by the tokenizer the
    # server loads (the server's incremental detokenizer adds up to exactly this decode).
    tokenizer = load_tokenizer(model)
    expected = [tokenizer.decode(hf_greedy(model, prompt, MAX_TOKENS)) for prompt in batch]
    assert len(set(expected)) == len(batch), "the prompts must tell the requests' answers apart"
    # Ray ends the previous test's actors asynchronously; counting them here would skew the map.
    assert _wait_actors_gone(cluster) == {}, "instance actors of an earlier driver are still running"

    host = cluster.head
    base_url = f"http://{host.ip}:{free_port(host)}"
    log = tmp_path / "serve.log"
    # 8-token blocks, 16 per instance, striped: every 40-60 token prompt lies on all three hosts.
    proc = start_server(cluster, ["--model", str(model), "--num-instances", str(NUM_HOSTS),
                                  "--placement", "striped", "--kv-blocks-per-instance", "16", "--block-size", "8",
                                  "--port", base_url.rsplit(":", 1)[1]], log)
    try:
        health = wait_healthy(proc, host, base_url, NUM_HOSTS, log)
        print(f"\nserve at {base_url}: /health {health}")
        actors = instance_actor_namespaces(cluster.hosts)
        print(f"instance actor pid -> host: {actors}")
        # One instance per host: the engine's placement, as in the driver test (each host has
        # room for four).
        assert sorted(actors.values()) == sorted(h.ns for h in cluster.hosts), actors

        idle_rate = _measure_idle(cluster, 2.0)
        before = all_link_bytes(cluster.hosts)
        t0 = time.monotonic()
        answers = http_in_host(host, [_completion_call(base_url, prompt) for prompt in batch])
        elapsed = time.monotonic() - t0
        after = all_link_bytes(cluster.hosts)

        for i, answer in enumerate(answers):
            assert answer["status"] == 200, answer
            choice = answer["body"]["choices"][0]
            assert answer["body"]["usage"]["completion_tokens"] == MAX_TOKENS, answer["body"]
            assert choice["text"] == expected[i], f"request {i}: {choice['text']!r} != {expected[i]!r}"
        print(f"completions text identical to transformers' greedy decode for {len(batch)} requests x "
              f"{MAX_TOKENS} tokens")

        bound = _query_bytes_bound(model, MAX_TOKENS - 1, len(batch))
        print(f"link bytes (tx + rx) during the requests, background subtracted, lower bound {bound}:")
        for h in cluster.hosts:
            moved = _link_growth(before, after, h.ns)
            background = int(idle_rate[h.ns] * elapsed)
            print(f"  {h.ns}/eth0: {moved} (background {background})")
            assert moved - background >= bound, f"{h.ns}: only {moved - background} bytes over its link"
    finally:
        rc = stop_server(proc)
    print(f"server exited {rc} after SIGTERM")
    assert rc == 0, log.read_text(errors="replace")[-4000:]
    # The cluster stays usable: the server's actors went with it, the Ray nodes did not.
    assert _wait_actors_gone(cluster) == {}
