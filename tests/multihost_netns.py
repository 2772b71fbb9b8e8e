"""Several "hosts" on one machine: network namespaces joined by veth links to a bridge, a Ray
cluster across them, and a driver that runs the engine inside host 1.

Topology (all names carry PREFIX so that cleanup can find them after a crash)::

    illm-h1 [eth0 10.77.0.1] ──veth── h1 ┐
    illm-h2 [eth0 10.77.0.2] ──veth── h2 ├─ br0 in namespace illm-sw (the "switch")
    illm-h3 [eth0 10.77.0.3] ──veth── h3 ┘

The root namespace is never touched (no interface, route or bridge is added there), so nothing
here can disturb other work on the machine. Every byte between two hosts crosses two veth
links; the counters of each host's eth0 are "what went over that host's link".

Processes: a Ray head in h1 and a Ray worker in each other host (`ray start`, each with its own
--temp-dir). Each host offers `cpus_per_host` CPUs (default 4): more than one instance actor
fits on a host, so "one instance per host" is the engine's placement at work, not something the
resources force. They run in the host's network namespace but in the machine's pid namespace,
so `ray stop` would also kill unrelated Ray processes of other users of this machine: cleanup
instead kills exactly the processes that `ip netns pids` lists in our namespaces, then deletes
the namespaces (which deletes the veths and the bridge).

The driver (`python -m tests.multihost_netns drive ...`, run with `ip netns exec illm-h1`) builds
the engine with backend="ray" on that cluster, runs requests under link conditions (plain, tc
shaping, or the user-space delay switch of tests/netns_delay_switch.py), and prints one JSON line
with the outputs, where each actor ran, and the links' byte counters around each run.

The server helpers (`start_server`, `wait_healthy`, `http_in_host`, `stop_server`) run
`infinite-llm serve --backend ray` in host 1 instead, and its HTTP clients in host 1 too: the root
namespace has no route to the hosts. `instance_actor_namespaces` finds the instance actors of a
process that is not the caller's by their Ray process titles in each host namespace.
"""

from __future__ import annotations

import argparse
import atexit
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

PREFIX = "illm"
SWITCH_NS = f"{PREFIX}-sw"
SUBNET = "10.77.0"
HOST_IF = "eth0"  # the host's end of its link, inside the host namespace
RAY_PORT = 6390
WORKDIR = Path("/tmp/netns")
REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Host:
    index: int  # 1-based

    @property
    def ns(self) -> str:
        return f"{PREFIX}-h{self.index}"

    @property
    def ip(self) -> str:
        return f"{SUBNET}.{self.index}"

    @property
    def switch_port(self) -> str:
        """The link's other end, plugged into the bridge in the switch namespace."""
        return f"h{self.index}"


@dataclass
class Cluster:
    hosts: list[Host]
    ray_port: int = RAY_PORT
    cpus_per_host: int = 4
    workdir: Path = field(default_factory=lambda: WORKDIR)

    @property
    def head(self) -> Host:
        return self.hosts[0]

    @property
    def ray_address(self) -> str:
        return f"{self.head.ip}:{self.ray_port}"


# ---------------------------------------------------------------------------------- helpers


def run(cmd: list[str], *, check: bool = True, env: Optional[dict] = None, timeout: float = 120
        ) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, capture_output=True, text=True, env=env, timeout=timeout)


def in_ns(ns: str, cmd: list[str]) -> list[str]:
    return ["ip", "netns", "exec", ns, *cmd]


def unavailable_reason() -> Optional[str]:
    """Why this machine cannot build namespaced hosts (None when it can)."""
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "creating network namespaces and veth links needs root"
    if shutil.which("ip") is None:
        return "the `ip` tool (iproute2) is not installed"
    if shutil.which("ray") is None:
        return "the `ray` CLI is not installed"
    probe = f"{PREFIX}-probe"
    try:
        made = run(["ip", "netns", "add", probe], check=False)
        if made.returncode != 0:
            return f"`ip netns add` fails here: {made.stderr.strip()}"
        veth = run(["ip", "-n", probe, "link", "add", "p0", "type", "veth", "peer", "name", "p1"], check=False)
        if veth.returncode != 0:
            return f"veth links cannot be created here: {veth.stderr.strip()}"
    finally:
        run(["ip", "netns", "del", probe], check=False)
    return None


def our_namespaces() -> list[str]:
    out = run(["ip", "netns", "list"], check=False).stdout
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    return [n for n in names if n.startswith(f"{PREFIX}-")]


def netns_inode(ns: str) -> int:
    return os.stat(f"/run/netns/{ns}").st_ino


def namespace_of_pid(pid: int) -> Optional[str]:
    """Which of our namespaces a process runs in (None: another one, e.g. the root namespace)."""
    try:
        inode = os.stat(f"/proc/{pid}/ns/net").st_ino
    except FileNotFoundError:
        return None
    for ns in our_namespaces():
        if netns_inode(ns) == inode:
            return ns
    return None


# ---------------------------------------------------------------------------------- topology


def create_topology(num_hosts: int) -> list[Host]:
    """The switch namespace with a bridge, and one namespace per host linked to it by a veth."""
    hosts = [Host(i) for i in range(1, num_hosts + 1)]
    run(["ip", "netns", "add", SWITCH_NS])
    run(["ip", "-n", SWITCH_NS, "link", "add", "br0", "type", "bridge"])
    run(["ip", "-n", SWITCH_NS, "link", "set", "br0", "up"])
    for host in hosts:
        run(["ip", "netns", "add", host.ns])
        # Created straight inside the namespaces: no temporary name ever appears in the root one.
        run(["ip", "-n", host.ns, "link", "add", HOST_IF, "type", "veth", "peer", "name", host.switch_port,
             "netns", SWITCH_NS])
        run(["ip", "-n", SWITCH_NS, "link", "set", host.switch_port, "master", "br0", "up"])
        run(["ip", "-n", host.ns, "addr", "add", f"{host.ip}/24", "dev", HOST_IF])
        run(["ip", "-n", host.ns, "link", "set", HOST_IF, "up"])
        run(["ip", "-n", host.ns, "link", "set", "lo", "up"])
        # A default route: Ray (and anything else) finding "my IP" by routing toward a public
        # address then gets the link's address instead of falling back to 127.0.0.1.
        run(["ip", "-n", host.ns, "route", "add", "default", "dev", HOST_IF])
    return hosts


def link_bytes(host: Host) -> dict[str, int]:
    """The host's link counters, read from sysfs inside the host's namespace."""
    stats = f"/sys/class/net/{HOST_IF}/statistics"
    out = run(in_ns(host.ns, ["cat", f"{stats}/rx_bytes", f"{stats}/tx_bytes"])).stdout.split()
    return {"rx": int(out[0]), "tx": int(out[1])}


def all_link_bytes(hosts: list[Host]) -> dict[str, dict[str, int]]:
    return {h.ns: link_bytes(h) for h in hosts}


def shape_links(hosts: list[Host], delay_ms: float, rate: str) -> str:
    """Shape every host's egress (its eth0): each host-to-host packet is delayed and paced once,
    at its sender, so "0.5 ms" is the one-way delay between two hosts.

    Tries netem (delay + rate). Kernels built without sch_netem get tbf with the same rate and
    no delay; the returned string says which was applied.
    """
    devices = [(h.ns, HOST_IF) for h in hosts]
    netem = ["netem", "delay", f"{delay_ms}ms", "rate", rate]
    if run(["tc", "-n", devices[0][0], "qdisc", "replace", "dev", devices[0][1], "root", *netem],
           check=False).returncode == 0:
        for ns, dev in devices[1:]:
            run(["tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", *netem])
        return f"netem {delay_ms}ms {rate}"
    # burst: a few 64 KB segments may leave at line speed; latency bounds the queue.
    tbf = ["tbf", "rate", rate, "burst", "256kb", "latency", "50ms"]
    for ns, dev in devices:
        run(["tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", *tbf])
    return f"tbf {rate}, NO delay (no sch_netem)"


def clear_shaping(hosts: list[Host]) -> None:
    for host in hosts:
        run(["tc", "-n", host.ns, "qdisc", "del", "dev", HOST_IF, "root"], check=False)


def start_delay_switch(hosts: list[Host], delay_ms: float) -> subprocess.Popen:
    """Replace the bridge by the user-space delay switch (tests/netns_delay_switch.py): the
    fallback for link delay where the kernel has no netem. Undo with `stop_delay_switch`."""
    ports = [h.switch_port for h in hosts]
    for port in ports:  # off the bridge first: two forwarders would loop frames
        run(["ip", "-n", SWITCH_NS, "link", "set", port, "nomaster"])
    proc = subprocess.Popen(
        in_ns(SWITCH_NS, [sys.executable, "-m", "tests.netns_delay_switch", "--ports", ",".join(ports),
                          "--delay-ms", str(delay_ms)]),
        stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT, env=ray_env())
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "ready":
        proc.kill()
        _attach_ports(hosts)
        raise RuntimeError(f"the delay switch did not start (exit {proc.wait()})")
    return proc


def stop_delay_switch(proc: subprocess.Popen, hosts: list[Host]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    _attach_ports(hosts)


def _attach_ports(hosts: list[Host]) -> None:
    for host in hosts:
        run(["ip", "-n", SWITCH_NS, "link", "set", host.switch_port, "master", "br0"])


# ---------------------------------------------------------------------------------- ray


def ray_env() -> dict[str, str]:
    env = dict(os.environ)
    # This Ray version turns token authentication on for new clusters unless told otherwise;
    # the namespaces are private to this machine, and every party would need the token.
    env["RAY_AUTH_MODE"] = "disabled"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def _ray_start_common(host: Host, cluster: Cluster) -> list[str]:
    # Each node its own temp dir: sockets and logs never collide with another node's (or with
    # another Ray on this machine), and cleanup removes them.
    return ["--node-ip-address", host.ip, "--num-cpus", str(cluster.cpus_per_host), "--num-gpus", "0",
            "--object-store-memory", str(100 * 1024 * 1024), "--disable-usage-stats",
            "--temp-dir", str(cluster.workdir / f"ray-{host.ns}")]


def start_ray(cluster: Cluster) -> None:
    env = ray_env()
    head = ["ray", "start", "--head", "--port", str(cluster.ray_port), "--include-dashboard", "false",
            *_ray_start_common(cluster.head, cluster)]
    _checked_ray_start(cluster.head, head, env)
    for host in cluster.hosts[1:]:
        worker = ["ray", "start", "--address", cluster.ray_address, *_ray_start_common(host, cluster)]
        _checked_ray_start(host, worker, env)


def _checked_ray_start(host: Host, cmd: list[str], env: dict[str, str]) -> None:
    done = run(in_ns(host.ns, cmd), check=False, env=env, timeout=180)
    if done.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed in {host.ns}:\n{done.stdout}\n{done.stderr}")


# ---------------------------------------------------------------------------------- cleanup


def kill_namespace_processes(ns: str, grace_s: float = 5.0) -> list[int]:
    """SIGTERM, then SIGKILL, every process in namespace `ns`; returns the pids found."""
    def pids() -> list[int]:
        out = run(["ip", "netns", "pids", ns], check=False).stdout.split()
        return [int(p) for p in out if p.isdigit()]

    found = pids()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while pids() and time.monotonic() < deadline:
            time.sleep(0.1)
        if not pids():
            break
    return found


def teardown(workdir: Path = WORKDIR) -> None:
    """Remove everything this module may have made, including leftovers of a crashed run."""
    for ns in our_namespaces():
        kill_namespace_processes(ns)
    for ns in our_namespaces():
        run(["ip", "netns", "del", ns], check=False)  # takes its veths and bridge with it
    for path in workdir.glob(f"ray-{PREFIX}-*"):
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def multihost(num_hosts: int = 3, cpus_per_host: int = 4, workdir: Path = WORKDIR) -> Iterator[Cluster]:
    """Namespaces, links and a running Ray cluster; everything is removed on exit, on error, and
    (atexit) if the interpreter exits without leaving the block.

    The namespace names are fixed, so a lock file serializes users of this machine (a second run
    started meanwhile waits instead of tearing down the first one's hosts).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    with open(workdir / ".multihost.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        teardown(workdir)  # a previous run killed before its cleanup leaves namespaces behind
        atexit.register(teardown, workdir)
        try:
            cluster = Cluster(create_topology(num_hosts), cpus_per_host=cpus_per_host, workdir=workdir)
            start_ray(cluster)
            yield cluster
        finally:
            teardown(workdir)
            atexit.unregister(teardown)


def run_driver(cluster: Cluster, args: list[str], timeout: float = 240) -> dict:
    """Run the driver inside host 1 and return its JSON report."""
    cmd = in_ns(cluster.head.ns, [sys.executable, "-m", "tests.multihost_netns", "drive",
                                  "--address", cluster.ray_address, "--num-hosts", str(len(cluster.hosts)),
                                  *args])
    done = subprocess.run(cmd, capture_output=True, text=True, env=ray_env(), cwd=REPO_ROOT, timeout=timeout,
                          check=False)
    reports = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not reports:
        raise RuntimeError(f"driver failed ({done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-8000:]}")
    return json.loads(reports[-1])


# ---------------------------------------------------------------------------------- server


# What Ray titles an instance actor's worker process (`ray::<class>`, then `.<method>` while
# one runs): how a process in a host namespace is recognized as an engine instance.
INSTANCE_ACTOR_TITLE = "ray::_InstanceActor"


def free_port(host: Host) -> int:
    """A TCP port nothing listens on in the host's namespace (asked of the kernel there)."""
    probe = "import socket; s = socket.socket(); s.bind(('', 0)); print(s.getsockname()[1])"
    return int(run(in_ns(host.ns, [sys.executable, "-c", probe])).stdout)


def start_server(cluster: Cluster, args: list[str], log: Path) -> subprocess.Popen:
    """`infinite-llm serve --backend ray` on the cluster, inside host 1; output goes to `log`
    (a pipe nobody reads would block the server once full)."""
    cmd = ["infinite-llm", "serve", "--backend", "ray", "--ray-address", cluster.ray_address,
           "--host", cluster.head.ip, *args]
    with open(log, "wb") as out:
        return subprocess.Popen(in_ns(cluster.head.ns, cmd), stdout=out, stderr=subprocess.STDOUT,
                                env=ray_env(), cwd=REPO_ROOT)


def stop_server(proc: subprocess.Popen, timeout_s: float = 60) -> int:
    """SIGTERM (the server drains, then exits 0); SIGKILL if it does not exit in time."""
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


def http_in_host(host: Host, calls: list[dict], timeout: float = 240) -> list[dict]:
    """Make HTTP calls from inside `host` (the root namespace has no route to the hosts), all at
    once; each call is {"method", "url", "body"?} and comes back as {"status", "body"}."""
    cmd = in_ns(host.ns, [sys.executable, "-m", "tests.multihost_netns", "http", json.dumps(calls)])
    done = subprocess.run(cmd, capture_output=True, text=True, env=ray_env(), cwd=REPO_ROOT, timeout=timeout,
                          check=False)
    if done.returncode != 0:
        raise RuntimeError(f"http client failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.splitlines()[-1])


def wait_healthy(proc: subprocess.Popen, host: Host, base_url: str, instances: int, log: Path,
                 timeout_s: float = 180) -> dict:
    """Poll GET /health until it answers 200 with `instances` alive instances; returns the body."""
    deadline = time.monotonic() + timeout_s
    last: dict = {}
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode}) before it was healthy:\n{_tail(log)}")
        last = http_in_host(host, [{"method": "GET", "url": f"{base_url}/health"}])[0]
        alive = [i for i in (last["body"] or {}).get("instances", []) if i.get("state") == "alive"]
        if last["status"] == 200 and len(alive) == instances:
            return last["body"]
        time.sleep(1.0)
    raise TimeoutError(f"/health not ready after {timeout_s} s (last answer {last}):\n{_tail(log)}")


def _tail(log: Path, chars: int = 6000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.exists() else "(no log)"


def instance_actor_namespaces(hosts: list[Host]) -> dict[int, str]:
    """pid -> host namespace of every instance actor process, found by its Ray process title."""
    found: dict[int, str] = {}
    for host in hosts:
        for pid in run(["ip", "netns", "pids", host.ns], check=False).stdout.split():
            try:
                title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            except (FileNotFoundError, ProcessLookupError):
                continue  # exited meanwhile
            if title.startswith(INSTANCE_ACTOR_TITLE):
                found[int(pid)] = host.ns
    return found


def _http_call(call: dict) -> dict:
    import urllib.error
    import urllib.request

    data = None if call.get("body") is None else json.dumps(call["body"]).encode()
    req = urllib.request.Request(call["url"], data=data, method=call["method"],
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=call.get("timeout", 180)) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as err:
        status, raw = err.code, err.read()
    except (urllib.error.URLError, ConnectionError) as err:  # not listening yet
        return {"status": None, "body": None, "error": str(err)}
    try:
        body = json.loads(raw)
    except ValueError:
        body = {"raw": raw.decode(errors="replace")}
    return {"status": status, "body": body}


def http_main(calls_json: str) -> list[dict]:
    """The `http` subcommand: the calls in parallel threads (so requests share engine steps)."""
    from concurrent.futures import ThreadPoolExecutor

    calls = json.loads(calls_json)
    with ThreadPoolExecutor(max_workers=max(len(calls), 1)) as pool:
        return list(pool.map(_http_call, calls))


# ---------------------------------------------------------------------------------- driver


def expected_link_bytes(model_config, decode_tokens: int, remote_holders: int) -> int:
    """A lower bound on what one home sends per request and gets back over its link for decode:
    per token, per layer, per remote holder, the query goes out and (out, lse) come back; only
    the tensor payload is counted (no headers, no TCP/IP overhead, no prefill)."""
    heads, dim, layers = model_config.num_attention_heads, model_config.head_dim, model_config.num_hidden_layers
    query = heads * dim * 4  # float32
    partial = heads * dim * 4 + heads * 4  # out + lse
    return decode_tokens * layers * remote_holders * (query + partial)


def _wait_for_nodes(count: int, timeout_s: float = 60) -> list[dict]:
    import ray

    deadline = time.monotonic() + timeout_s
    while True:
        alive = [n for n in ray.nodes() if n["Alive"]]
        if len(alive) >= count:
            return alive
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(alive)} of {count} Ray nodes joined")
        time.sleep(0.2)


def _actor_facts(actor) -> dict:
    """Where a Ray actor runs: pid, Ray node id and the address its ZeroMQ endpoint bound."""
    import ray

    def facts(self) -> dict:
        import os

        import ray

        return {"pid": os.getpid(), "node_ip": ray.util.get_node_ip_address(),
                "node_id": ray.get_runtime_context().get_node_id(), "zmq": self.endpoint.address}

    return ray.get(actor.__ray_call__.remote(facts), timeout=30)


def _endpoint_counters(actors) -> list[dict]:
    """Each actor endpoint's own send counters: messages and serialized bytes (header + tensor
    frames), i.e. what the engine handed to ZeroMQ, to set beside the links' wire bytes."""
    import ray

    def counters(self) -> dict:
        return {"messages": self.endpoint.messages_sent, "bytes": self.endpoint.bytes_sent}

    return ray.get([a.__ray_call__.remote(counters) for a in actors], timeout=30)


def _run_requests(engine, batch: list[list[int]], max_tokens: int) -> dict[str, dict]:
    """Each request homed on its own instance (request i on instance i); returns the outputs."""
    from infinite_llm.sampling import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    for i, prompt in enumerate(batch):
        engine.add_request(f"r{i}", prompt, params, home=i % engine.config.cluster.num_instances)
    final: dict = {}
    deadline = time.monotonic() + 180
    while engine.has_unfinished_requests():
        if time.monotonic() > deadline:
            raise TimeoutError("requests did not finish")
        for out in engine.step(timeout_s=0.02):
            final[out.request_id] = out
    return {rid: {"tokens": o.output_token_ids, "error": o.error, "first_token_time": o.first_token_time,
                  "finished_time": o.finished_time, "num_output_tokens": o.num_output_tokens}
            for rid, o in final.items()}


def apply_condition(hosts: list[Host], condition: str) -> tuple[str, Callable[[], None]]:
    """Put the links in a condition; returns what was applied and how to undo it.

    "none"; "DELAY_MS,RATE" (tc netem on every host's egress, or tbf rate-only without sch_netem);
    "switch:DELAY_MS" or "switch:DELAY_MS,RATE" (the user-space delay switch instead of the
    bridge, plus a tbf/netem rate when given).
    """
    clear_shaping(hosts)
    if condition == "none":
        return "bridge, no shaping", lambda: None
    if not condition.startswith("switch:"):
        delay, rate = condition.split(",")
        return shape_links(hosts, float(delay), rate), lambda: clear_shaping(hosts)
    delay, _, rate = condition.removeprefix("switch:").partition(",")
    applied = f"user-space switch, {delay} ms"
    if rate:
        applied += ", " + shape_links(hosts, 0.0, rate)
    proc = start_delay_switch(hosts, float(delay))

    def undo() -> None:
        stop_delay_switch(proc, hosts)
        clear_shaping(hosts)

    return applied, undo


def drive(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(prog="multihost_netns drive")
    parser.add_argument("--address", required=True)
    parser.add_argument("--num-hosts", type=int, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompts", required=True, help="JSON list of token-id lists; request i is homed on instance i")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--blocks", type=int, default=16)
    parser.add_argument("--block-size", type=int, default=8)
    parser.add_argument("--placement", default="striped")
    parser.add_argument("--conditions", default="none",
                        help='";"-separated link conditions (see apply_condition), run in turn')
    parser.add_argument("--repeats", type=int, default=1, help="rounds over all conditions (interleaved)")
    args = parser.parse_args(argv)

    import ray

    from infinite_llm.config import CacheConfig, ClusterConfig, EngineConfig, SchedulerConfig
    from infinite_llm.engine import LLMEngine

    ray.init(address=args.address, log_to_driver=False)
    nodes = _wait_for_nodes(args.num_hosts)
    config = EngineConfig(
        model=args.model,
        cache=CacheConfig(block_size=args.block_size, num_blocks_per_instance=args.blocks),
        cluster=ClusterConfig(num_instances=args.num_hosts, backend="ray", ray_address=args.address,
                              placement=args.placement, rebalance_interval_s=3600.0),
        scheduler=SchedulerConfig(max_num_batched_tokens=32, max_num_seqs=16),
    )
    hosts = [Host(i) for i in range(1, args.num_hosts + 1)]
    engine = LLMEngine(config)
    try:
        cluster = engine.cluster
        # Read while the actors live: the engine's shutdown ends their processes.
        actors = [dict(_actor_facts(a), netns=namespace_of_pid(pid),
                       placed_on=cluster.node_of(rank) if hasattr(cluster, "node_of") else None)
                  for rank, (a, pid) in enumerate(zip(cluster.actors, cluster.pids))]
        gmanager = _actor_facts(cluster.gmanager)
        gmanager["netns"] = namespace_of_pid(gmanager["pid"])
        batch = json.loads(args.prompts)
        # Warm-up: every pair's TCP connection opens and every code path runs once, so the
        # measured windows hold steady-state traffic only.
        _run_requests(engine, batch, 2)
        runs = []
        for _ in range(args.repeats):
            for condition in args.conditions.split(";"):
                applied, undo = apply_condition(hosts, condition)
                try:
                    sent_before = _endpoint_counters(cluster.actors)
                    before = all_link_bytes(hosts)
                    t0 = time.monotonic()
                    outputs = _run_requests(engine, batch, args.max_tokens)
                    elapsed = time.monotonic() - t0
                    after = all_link_bytes(hosts)
                    sent_after = _endpoint_counters(cluster.actors)
                finally:
                    undo()
                runs.append({"condition": condition, "applied": applied, "outputs": outputs, "elapsed_s": elapsed,
                             "links_before": before, "links_after": after,
                             "sent": [{k: a[k] - b[k] for k in a} for a, b in zip(sent_after, sent_before)]})
        clear_shaping(hosts)
        # As long as the last run, with no request: Ray's and the engine's own background
        # traffic (resource reports, heartbeats), which the counters above include too.
        idle_before = all_link_bytes(hosts)
        time.sleep(runs[-1]["elapsed_s"])
        idle = {"before": idle_before, "after": all_link_bytes(hosts), "seconds": runs[-1]["elapsed_s"]}
        return {
            "nodes": [{"ip": n["NodeManagerAddress"], "node_id": n["NodeID"]} for n in nodes],
            "actors": actors,
            "gmanager": gmanager,
            "router_zmq": cluster.router_endpoint.address,
            "runs": runs,
            "idle": idle,
            "per_request_payload_bound": expected_link_bytes(engine.model_config, args.max_tokens - 1,
                                                             args.num_hosts - 1),
        }
    finally:
        clear_shaping(hosts)
        engine.shutdown()


def main() -> None:
    if len(sys.argv) >= 2 and sys.argv[1] == "drive":
        print(json.dumps(drive(sys.argv[2:])), flush=True)
    elif len(sys.argv) == 3 and sys.argv[1] == "http":
        print(json.dumps(http_main(sys.argv[2])), flush=True)
    else:
        raise SystemExit("usage: python -m tests.multihost_netns drive --address ... | http CALLS_JSON"
                         " (inside a host namespace)")


if __name__ == "__main__":
    main()
