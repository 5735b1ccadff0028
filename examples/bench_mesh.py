#!/usr/bin/env python3
"""Measures what the mesh costs: decode speed of 1, 2 and 3 Hearth nodes on one Linux bridge.

Each configuration is a cluster of its own (its own bridge, its own network namespaces,
one `hearth serve` per namespace, equal --memory-limit so the layers split evenly), and
all of them stay up for the whole run, so the measurements can alternate between them.
Every measurement is the same greedy 256-token completion of the same prompt, streamed
(SSE) from the node that runs the first stage. The decode time per token is the time
between consecutive chunks after the first; the figure reported for a configuration is
the median over every gap of every repeat, with tokens/s = 1 / that.

In the ring pipeline a token crosses one link per stage (stage i -> i+1, the last stage's
sampled token -> the first), so a token costs N hops with N >= 2 nodes and none with one.
The added latency per hop is (time per token with N nodes - with 1 node) / N. The issue's
targets: 3 nodes decode at >= 0.9x the single node's rate, and <= 100 us per hop on the
bridge. For context the script also measures the bridge's raw round trip (a TCP echo
between two namespaces, against the same echo over loopback inside one), the engine's own
decode speed without any serving (`hearth bench`), and where each token's time goes,
from the nodes' threads' scheduler statistics: computing (each stage's busiest thread on
a CPU) and not computing (the network, waking the next process, gRPC work on other
threads, waiting for a CPU). The added time no stage computed, per hop, is the hop cost
without the compute, which can differ between configurations on its own.

    sudo python3 examples/bench_mesh.py                    # 1, 2, 3 nodes, 3 repeats each
    sudo python3 examples/bench_mesh.py --json             # one JSON object on stdout
    sudo python3 examples/bench_mesh.py --threads 2 --repeats 5
    sudo python3 examples/bench_mesh.py --nodes 1 3 --no-engine-bench

Every node runs on this one machine: N-node figures include the CPU contention of N
processes sharing its cores, which a real cluster would not have. That is why nodes get
--threads 1 by default (the stages of one token run one after another, so with one
compute thread each they rarely compete). Before each measurement the script waits for
the machine to go quiet (no other process using more than --max-foreign-load cores), and
a measurement during which other processes used more is repeated (--retries).

Needs root and iproute2 (`ip`). The binary is $HEARTH_BIN (default
/root/.cache/hearth-target/release/hearth), the model $HEARTH_MODEL (default: the cached
default model, `hearth pull`). Progress goes to stderr; logs stay in the work directory.
"""

from __future__ import annotations

import argparse
import atexit
import hashlib
import http.client
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from harness import netns  # noqa: E402 - after the sys.path line
from harness.netns import Cluster, ClusterView, Node  # noqa: E402

DEFAULT_PROMPT = "Once upon a time"
TARGET_RATIO = 0.9
TARGET_HOP_US = 100.0
ECHO_PORT = 5399
ECHO_SIZES = (64, 2304)
"""Bytes per echo: a small message, and one f32 hidden state of SmolLM2-135M (576 x 4 B)."""
CLK_TCK = os.sysconf("SC_CLK_TCK")
N_CPUS = os.cpu_count() or 1


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def parse_args() -> argparse.Namespace:
    parts = __doc__.split("\n\n")
    parser = argparse.ArgumentParser(
        description="\n\n".join(parts[:3]), formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(parts[3:]),
    )
    parser.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 3], metavar="N",
                        help="cluster sizes to measure; 1 (the baseline) is always added (default: 1 2 3)")
    parser.add_argument("--threads", type=int, default=1,
                        help="--threads of every node and of the engine bench (default: 1)")
    parser.add_argument("--memory-limit", default="1GiB",
                        help="--memory-limit of every node; equal limits give equal layer splits (default: 1GiB)")
    parser.add_argument("--context", type=int, default=1024, help="--context of every node (default: 1024)")
    parser.add_argument("--max-tokens", type=int, default=256, help="tokens per completion (default: 256)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"the prompt (default: {DEFAULT_PROMPT!r})")
    parser.add_argument("--repeats", type=int, default=3,
                        help="measurements per configuration, alternating between configurations (default: 3)")
    parser.add_argument("--max-foreign-load", type=float, default=0.25, metavar="CORES",
                        help="CPU cores other processes may use during a measurement before it is repeated, "
                             "and the quiet level to wait for before each one (default: 0.25)")
    parser.add_argument("--quiet-timeout", type=float, default=60.0, metavar="S",
                        help="longest wait for the machine to go quiet before a measurement (default: 60)")
    parser.add_argument("--retries", type=int, default=2,
                        help="times a measurement disturbed by other processes is repeated (default: 2)")
    parser.add_argument("--echo-count", type=int, default=500,
                        help="round trips per size for the bridge RTT (default: 500)")
    parser.add_argument("--no-engine-bench", action="store_true",
                        help="skip `hearth bench` (the engine's decode speed without serving)")
    parser.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                        help="an extra argument for every `hearth serve` (repeatable)")
    parser.add_argument("--binary", type=Path, help="the hearth binary (default: $HEARTH_BIN or the release build)")
    parser.add_argument("--model", help="the model every node serves (default: $HEARTH_MODEL or `hearth pull`)")
    parser.add_argument("--workdir", type=Path, help="where logs and data dirs go (default: new temp dirs)")
    parser.add_argument("--timeout", type=float, default=90.0, help="seconds to wait for each plan (default: 90)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--json-file", type=Path, metavar="PATH", help="also write the JSON object to PATH")
    args = parser.parse_args()
    args.nodes = sorted(set(args.nodes) | {1})
    if min(args.nodes) < 1 or args.repeats < 1 or args.max_tokens < 3:
        parser.error("--nodes must be >= 1, --repeats >= 1 and --max-tokens >= 3")
    return args


# --- CPU accounting -------------------------------------------------------------------------


def machine_busy_s() -> float:
    """CPU seconds the whole machine has spent busy (all cores), from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return (sum(values[:8]) - idle) / CLK_TCK


def process_cpu_s(pid: int) -> float:
    """CPU seconds a process has used: the sum over its threads' schedstat (ns), else /proc/<pid>/stat."""
    total_ns = 0
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                    total_ns += int(f.read().split()[0])
            except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
                pass
        if total_ns:
            return total_ns / 1e9
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (FileNotFoundError, ProcessLookupError):
        return 0.0


class CpuMeter:
    """CPU used between :meth:`start` and :meth:`stop`: by each of our nodes, by this process,
    and by everything else on the machine ("foreign" load, in cores)."""

    def __init__(self, all_nodes: list[Node]) -> None:
        self.all_nodes = all_nodes

    def _sample(self) -> tuple[float, float, dict[str, float], float]:
        nodes = {n.netns: process_cpu_s(n.pid) for n in self.all_nodes if n.pid is not None}
        return time.monotonic(), machine_busy_s(), nodes, process_cpu_s(os.getpid())

    def start(self) -> None:
        self._begin = self._sample()

    def stop(self) -> tuple[float, dict[str, float], float]:
        """(wall seconds, {netns: node CPU seconds}, foreign cores)."""
        t1, busy1, nodes1, self1 = self._sample()
        t0, busy0, nodes0, self0 = self._begin
        wall = max(t1 - t0, 1e-9)
        per_node = {ns: nodes1.get(ns, 0.0) - nodes0.get(ns, 0.0) for ns in nodes0}
        ours = sum(per_node.values()) + (self1 - self0)
        foreign = max(0.0, (busy1 - busy0) - ours) / wall
        return wall, per_node, foreign

    def wait_quiet(self, max_cores: float, timeout_s: float, window_s: float = 0.5) -> tuple[float, float]:
        """Wait until other processes use less than ``max_cores`` over a ``window_s`` window.
        Returns (seconds waited, foreign cores of the last window)."""
        started = time.monotonic()
        while True:
            self.start()
            time.sleep(window_s)
            _, _, foreign = self.stop()
            waited = time.monotonic() - started
            if foreign < max_cores or waited >= timeout_s:
                return waited, foreign


def thread_stats(pid: int) -> dict[int, tuple[str, int, int]]:
    """``{tid: (name, ns on CPU, ns waiting on a run queue)}`` for every thread of a process."""
    out: dict[int, tuple[str, int, int]] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except (FileNotFoundError, ProcessLookupError):
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                on_cpu, run_delay = (int(v) for v in f.read().split()[:2])
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                name = f.read().strip()
        except (FileNotFoundError, ProcessLookupError, ValueError):
            continue
        out[int(tid)] = (name, on_cpu, run_delay)
    return out


@dataclass
class StageTime:
    """Where one stage's node spent a decode window, in seconds: its busiest thread (the one
    that runs the layers) on CPU and waiting for a CPU, and all its other threads on CPU."""

    node: str
    compute_thread: str
    compute_s: float
    compute_runq_s: float
    other_cpu_s: float


def stage_times(nodes: list[Node], before: dict[str, dict[int, tuple[str, int, int]]],
                after: dict[str, dict[int, tuple[str, int, int]]]) -> list[StageTime]:
    out = []
    for node in nodes:
        deltas = []
        for tid, (name, cpu1, rq1) in after.get(node.name, {}).items():
            _, cpu0, rq0 = before.get(node.name, {}).get(tid, (name, 0, 0))
            deltas.append((cpu1 - cpu0, rq1 - rq0, name))
        if not deltas:
            out.append(StageTime(node.name, "?", 0.0, 0.0, 0.0))
            continue
        deltas.sort(reverse=True)
        top_cpu, top_rq, top_name = deltas[0]
        out.append(StageTime(node.name, top_name, top_cpu / 1e9, top_rq / 1e9,
                             sum(d[0] for d in deltas[1:]) / 1e9))
    return out


# --- configurations -------------------------------------------------------------------------


@dataclass
class Mesh:
    """One configuration: a cluster of ``n`` nodes that agreed on a plan."""

    n: int
    cluster: Cluster
    view: ClusterView
    formed_s: float
    model_id: str = ""

    @property
    def holder(self) -> Node:
        """Requests go to the first stage's node, so holder and first stage share a process."""
        return self.cluster.node_at(self.view.stages[0].ip)

    @property
    def stage_nodes(self) -> list[Node]:
        return [self.cluster.node_at(s.ip) for s in self.view.stages]

    @property
    def layers(self) -> list[int]:
        return [s.layer_count for s in self.view.stages]

    @property
    def hops(self) -> int:
        return self.n if self.n >= 2 else 0


def start_mesh(n: int, args: argparse.Namespace, binary: Path, model: str) -> Mesh:
    workdir = args.workdir / f"n{n}" if args.workdir else None
    cluster = Cluster(binary=binary, model=model, workdir=workdir)
    extra = ["--context", str(args.context), "--threads", str(args.threads), "--cluster", f"bench-{n}",
             *args.serve_arg]
    nodes = [cluster.add_node(memory_limit=args.memory_limit, extra_args=extra, start=False) for _ in range(n)]
    cluster.start_nodes(nodes)
    assert cluster.started_at is not None
    view = cluster.wait_for_plan(nodes, timeout_s=args.timeout)
    mesh = Mesh(n=n, cluster=cluster, view=view, formed_s=time.monotonic() - cluster.started_at)
    result = mesh.holder.http("GET", "/v1/models")
    if result.status != 200:
        raise netns.HarnessError(f"GET /v1/models -> {result.status}: {result.text}")
    mesh.model_id = str(result.json()["data"][0]["id"])
    return mesh


# --- one streamed completion ----------------------------------------------------------------


@dataclass
class Run:
    n: int
    repeat: int
    gaps_s: list[float]
    text: str
    finish_reason: str | None
    completion_tokens: int | None
    ttft_s: float
    decode_s: float
    server_tokens_per_s: float | None
    node_cpu_s: dict[str, float]
    foreign_cores: float
    quiet_wait_s: float
    attempt: int
    window_s: float
    """From the first text chunk to the chunk with the finish reason: ``window_tokens`` tokens."""
    window_tokens: int
    stages: list[StageTime]
    """Per stage (pipeline order), over the window."""

    def per_token_us(self, seconds: float) -> float:
        return seconds / max(1, self.window_tokens) * 1e6

    @property
    def wall_us(self) -> float:
        return self.per_token_us(self.window_s)

    @property
    def compute_us(self) -> float:
        return self.per_token_us(sum(s.compute_s for s in self.stages))

    @property
    def runq_us(self) -> float:
        return self.per_token_us(sum(s.compute_runq_s for s in self.stages))

    @property
    def not_computing_us(self) -> float:
        """Wall time per token in which no stage's compute thread ran (stages take turns)."""
        return self.wall_us - self.compute_us

    @property
    def other_cpu_us(self) -> float:
        return self.per_token_us(sum(s.other_cpu_s for s in self.stages))

    @property
    def median_gap_s(self) -> float:
        return statistics.median(self.gaps_s)

    @property
    def mean_gap_s(self) -> float:
        return self.decode_s / max(1, len(self.gaps_s))


_FINISHED = re.compile(r"generation finished.*?completion_tokens=(\d+).*?tokens_per_s=\"?([0-9.]+)")


def holder_log_line(node: Node, offset: int, timeout_s: float = 3.0) -> tuple[int | None, float | None]:
    """(completion_tokens, tokens_per_s) of the first `generation finished` line after ``offset``."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with node.log_path.open("rb") as f:
                f.seek(offset)
                text = f.read().decode("utf-8", errors="replace")
        except OSError:
            text = ""
        match = _FINISHED.search(text)
        if match:
            return int(match.group(1)), float(match.group(2))
        if time.monotonic() >= deadline:
            return None, None
        time.sleep(0.05)


def stream_completion(node: Node, body: dict[str, Any], timeout_s: float,
                      on_first: Callable[[], None] | None = None,
                      on_finish: Callable[[], None] | None = None) -> tuple[list[int], str, str | None, int | None]:
    """POST a streamed completion over a socket opened inside the node's namespace (no
    forwarder in between). Returns (arrival time of each text chunk in ns, text,
    finish_reason, usage completion_tokens). ``on_first`` runs once the first text chunk
    is stamped, ``on_finish`` once the chunk with the finish reason is."""
    sock = netns.call_in_netns(node.netns, socket.create_connection, (node.api_host, node.api_port), 10.0)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.settimeout(timeout_s)
    conn = http.client.HTTPConnection(node.api_host, node.api_port, timeout=timeout_s)
    conn.sock = sock
    stamps: list[int] = []
    pieces: list[str] = []
    finish: str | None = None
    tokens: int | None = None
    try:
        conn.request("POST", "/v1/completions", body=json.dumps(body).encode(),
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            raise netns.HarnessError(f"{node.name} POST /v1/completions -> {response.status}: "
                                     f"{response.read()[:500]!r}")
        for raw in response:
            now = time.perf_counter_ns()
            line = raw.decode("utf-8", errors="replace").strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            event = json.loads(data)
            if event.get("usage"):
                tokens = event["usage"].get("completion_tokens")
            for choice in event.get("choices") or []:
                if choice.get("text"):
                    stamps.append(now)
                    pieces.append(choice["text"])
                    if len(stamps) == 1 and on_first is not None:
                        on_first()
                if choice.get("finish_reason"):
                    finish = choice["finish_reason"]
                    if on_finish is not None:
                        on_finish()
    finally:
        conn.close()
    return stamps, "".join(pieces), finish, tokens


def measure(mesh: Mesh, args: argparse.Namespace, meter: CpuMeter, repeat: int) -> Run:
    body = {"model": mesh.model_id, "prompt": args.prompt, "max_tokens": args.max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    run: Run | None = None
    for attempt in range(args.retries + 1):
        waited, _ = meter.wait_quiet(args.max_foreign_load, args.quiet_timeout)
        holder = mesh.holder
        offset = holder.log_path.stat().st_size
        stages = mesh.stage_nodes
        marks: list[tuple[int, dict[str, dict[int, tuple[str, int, int]]]]] = []

        def mark(marks: list[Any] = marks, stages: list[Node] = stages) -> None:
            marks.append((time.perf_counter_ns(), {nd.name: thread_stats(nd.pid) for nd in stages if nd.pid}))

        meter.start()
        sent = time.perf_counter_ns()
        stamps, text, finish, tokens = stream_completion(holder, body, timeout_s=300.0,
                                                         on_first=mark, on_finish=mark)
        _, node_cpu, foreign = meter.stop()
        if len(marks) < 2:
            raise netns.HarnessError(f"{mesh.n} nodes: the stream ended without a finish reason")
        if len(stamps) < 3:
            raise netns.HarnessError(f"{mesh.n} nodes: only {len(stamps)} text chunks came back")
        log_tokens, server_rate = holder_log_line(holder, offset)
        gaps = [(b - a) / 1e9 for a, b in zip(stamps[:-1], stamps[1:], strict=True)]
        run = Run(n=mesh.n, repeat=repeat, gaps_s=gaps, text=text, finish_reason=finish,
                  completion_tokens=tokens if tokens is not None else log_tokens,
                  ttft_s=(stamps[0] - sent) / 1e9, decode_s=(stamps[-1] - stamps[0]) / 1e9,
                  server_tokens_per_s=server_rate,
                  node_cpu_s={n.netns: node_cpu.get(n.netns, 0.0) for n in mesh.cluster.nodes},
                  foreign_cores=foreign, quiet_wait_s=waited, attempt=attempt,
                  window_s=(marks[-1][0] - marks[0][0]) / 1e9,
                  window_tokens=(tokens if tokens is not None else log_tokens or len(stamps)) - 1,
                  stages=stage_times(stages, marks[0][1], marks[-1][1]))
        log(f"  {mesh.n} node{'s' if mesh.n > 1 else ' '} repeat {repeat + 1}: "
            f"median {run.median_gap_s * 1e3:6.2f} ms/token, mean {run.mean_gap_s * 1e3:6.2f} ms, "
            f"server {server_rate or float('nan'):5.1f} tok/s, compute {run.compute_us / 1e3:5.2f} ms, "
            f"not computing {run.not_computing_us:5.0f} us, finish {finish}, "
            f"other load {foreign:.2f} cores" + (f" (waited {waited:.1f} s for quiet)" if waited > 1 else ""))
        if foreign <= args.max_foreign_load:
            break
        if attempt < args.retries:
            log(f"    other processes used {foreign:.2f} cores during it: measuring again")
    assert run is not None
    return run


# --- bridge round trip ----------------------------------------------------------------------

ECHO_SERVER = """
import socket, sys
server = socket.create_server((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
conn, _ = server.accept()
conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
while True:
    data = conn.recv(65536)
    if not data:
        break
    conn.sendall(data)
"""


def echo_rtts(client_ns: str, server_ns: str, host: str, count: int) -> dict[str, dict[str, float]]:
    """Round trips of a TCP echo (a Python echo server in ``server_ns`` on ``host``) from
    ``client_ns``, per message size: median, p10 and p90 in microseconds."""
    server = subprocess.Popen(["ip", "netns", "exec", server_ns, sys.executable, "-c", ECHO_SERVER, host,
                               str(ECHO_PORT)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        if server.stdout.readline().strip() != "ready":
            detail = server.stderr.read() if server.stderr else ""
            raise netns.HarnessError(f"echo server in {server_ns} did not start: {detail}")
        sock = netns.call_in_netns(client_ns, socket.create_connection, (host, ECHO_PORT), 5.0)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        out: dict[str, dict[str, float]] = {}
        try:
            for size in ECHO_SIZES:
                payload = os.urandom(size)
                samples = []
                for i in range(count + 50):
                    t0 = time.perf_counter_ns()
                    sock.sendall(payload)
                    got = 0
                    while got < size:
                        chunk = sock.recv(65536)
                        if not chunk:
                            raise netns.HarnessError("echo server closed the connection")
                        got += len(chunk)
                    if i >= 50:  # the first ones warm up
                        samples.append((time.perf_counter_ns() - t0) / 1e3)
                samples.sort()
                out[f"{size}B"] = {"median_us": statistics.median(samples),
                                   "p10_us": samples[len(samples) // 10],
                                   "p90_us": samples[len(samples) * 9 // 10]}
        finally:
            sock.close()
        return out
    finally:
        try:
            server.wait(timeout=5)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


# --- the engine alone -----------------------------------------------------------------------


def engine_bench(binary: Path, model: str, args: argparse.Namespace) -> dict[str, Any] | None:
    """`hearth bench` (the engine alone, no serving), repeated like a measurement when other
    processes load the machine meanwhile; its JSON plus ``foreign_load_cores``."""
    argv = [str(binary), "bench", "--model", model, "--threads", str(args.threads), "--context",
            str(args.context), "--decode-tokens", str(args.max_tokens), "--repeat", "3"]
    meter = CpuMeter([])
    report = None
    for attempt in range(args.retries + 1):
        meter.wait_quiet(args.max_foreign_load, args.quiet_timeout)
        meter.start()
        child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 stdin=subprocess.DEVNULL)
        # The child's CPU is ours, not foreign: sample it until it exits.
        child_cpu = 0.0
        while child.poll() is None:
            child_cpu = max(child_cpu, process_cpu_s(child.pid))
            time.sleep(0.05)
        stdout, stderr = child.communicate()
        wall, _, foreign_raw = meter.stop()
        foreign = max(0.0, foreign_raw - child_cpu / wall)
        if child.returncode != 0:
            log(f"`{' '.join(argv)}` failed ({child.returncode}): {stderr[-500:]}")
            return None
        lines = [line for line in stdout.splitlines() if line.strip().startswith("{")]
        if not lines:
            return None
        report = {**json.loads(lines[-1]), "foreign_load_cores": round(foreign, 3), "attempt": attempt}
        log(f"  engine alone: {report.get('decode_tokens_per_s')} tok/s decode, other load {foreign:.2f} cores")
        if foreign <= args.max_foreign_load:
            break
    return report


# --- summary ---------------------------------------------------------------------------------


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summarize(meshes: dict[int, Mesh], runs: list[Run]) -> dict[int, dict[str, Any]]:
    out: dict[int, dict[str, Any]] = {}
    for n, mesh in meshes.items():
        mine = [r for r in runs if r.n == n]
        per_token = statistics.median([g for r in mine for g in r.gaps_s])
        mean_per_token = median([r.mean_gap_s for r in mine])
        rates = [r.server_tokens_per_s for r in mine if r.server_tokens_per_s]
        out[n] = {
            "nodes": n,
            "hops_per_token": mesh.hops,
            "layers_per_stage": mesh.layers,
            "plan_formed_s": round(mesh.formed_s, 2),
            "per_token_median_us": per_token * 1e6,
            "tokens_per_s": 1.0 / per_token,
            "per_token_mean_us": mean_per_token * 1e6,
            "tokens_per_s_mean": 1.0 / mean_per_token,
            "server_tokens_per_s_median": median(rates) if rates else None,
            "ttft_ms_median": median([r.ttft_s for r in mine]) * 1e3,
            "finish_reasons": sorted({str(r.finish_reason) for r in mine}),
            "completion_tokens": sorted({r.completion_tokens or 0 for r in mine}),
            "foreign_load_cores_max": max(r.foreign_cores for r in mine),
            # Where the time of one token goes (medians over runs, microseconds per token).
            "time_per_token_us": {
                "wall": median([r.wall_us for r in mine]),
                "compute": median([r.compute_us for r in mine]),
                "compute_by_stage": [median([r.per_token_us(r.stages[i].compute_s) for r in mine])
                                     for i in range(len(mesh.stage_nodes))],
                "not_computing": median([r.not_computing_us for r in mine]),
                "run_queue_wait": median([r.runq_us for r in mine]),
                "other_threads_cpu": median([r.other_cpu_us for r in mine]),
                "compute_threads": sorted({s.compute_thread for r in mine for s in r.stages}),
            },
            "runs": [{"repeat": r.repeat, "attempt": r.attempt, "median_us": r.median_gap_s * 1e6,
                      "mean_us": r.mean_gap_s * 1e6, "server_tokens_per_s": r.server_tokens_per_s,
                      "foreign_load_cores": round(r.foreign_cores, 3), "wall_us": r.wall_us,
                      "compute_us": r.compute_us, "not_computing_us": r.not_computing_us,
                      "run_queue_wait_us": r.runq_us, "other_threads_cpu_us": r.other_cpu_us}
                     for r in mine],
        }
    base = out[1]
    for row in out.values():
        row["ratio_to_1_node"] = row["tokens_per_s"] / base["tokens_per_s"]
        row["ratio_to_1_node_mean"] = row["tokens_per_s_mean"] / base["tokens_per_s_mean"]
        hops = row["hops_per_token"]
        if not hops:
            row.update(added_us_per_hop=None, added_us_per_hop_mean=None, added_us_per_hop_by_repeat=[],
                       not_computing_us_per_hop=None)
            continue
        row["added_us_per_hop"] = (row["per_token_median_us"] - base["per_token_median_us"]) / hops
        row["added_us_per_hop_mean"] = (row["per_token_mean_us"] - base["per_token_mean_us"]) / hops
        # Each repeat against the 1-node run of the same round: the spread says how far the
        # pooled figure can be trusted on this machine.
        base_runs = {r["repeat"]: r["median_us"] for r in base["runs"]}
        row["added_us_per_hop_by_repeat"] = [(r["median_us"] - base_runs[r["repeat"]]) / hops
                                             for r in row["runs"] if r["repeat"] in base_runs]
        # The same question without the compute: time no stage computed, per hop.
        t, b = row["time_per_token_us"], base["time_per_token_us"]
        row["not_computing_us_per_hop"] = (t["not_computing"] - b["not_computing"]) / hops
    return out


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_report(report: dict[str, Any]) -> None:
    s = report["setup"]
    results = report["results"]
    print(f"Hearth mesh decode benchmark: {Path(s['model']).name}, prompt {s['prompt']!r}, {s['max_tokens']} "
          f"greedy tokens, {s['repeats']} repeats per configuration (alternating)")
    print(f"Binary {s['binary']} (built {s.get('binary_built', '?')}, sha256 {s.get('binary_sha256', '?')})")
    print(f"Every node: --memory-limit {s['memory_limit']} --context {s['context']} --threads {s['threads']}; "
          "requests go to the first stage's node (it holds the request)")
    print(f"All nodes share this one {s['cpus']}-core machine, so N-node figures include CPU contention "
          "a real cluster would not have (see --threads).")
    print("Hops per token: a token crosses N links with N >= 2 nodes (stage i -> i+1, last -> first), none with 1.")
    print()
    print("Decode speed. per token: median gap between consecutive streamed chunks after the first, over all")
    print("repeats; mean: (last chunk - first chunk) / gaps, median over repeats; server: the holder's")
    print("`generation finished` tokens_per_s; us/hop = (per token with N - with 1) / hops.")
    header = (f"{'nodes':>5} {'layers':>9} {'hops':>4} | {'per token':>10} {'tok/s':>6} {'x 1 node':>8} {'us/hop':>7} "
              f"| {'mean':>9} {'tok/s':>6} {'us/hop':>7} | {'server':>6}")
    print(header)
    print("-" * len(header))
    for row in results:
        print(f"{row['nodes']:>5} {'/'.join(map(str, row['layers_per_stage'])):>9} {row['hops_per_token']:>4} | "
              f"{row['per_token_median_us'] / 1e3:>7.2f} ms {row['tokens_per_s']:>6.1f} "
              f"{row['ratio_to_1_node']:>8.3f} {fmt(row['added_us_per_hop'], '7.0f'):>7} | "
              f"{row['per_token_mean_us'] / 1e3:>6.2f} ms {row['tokens_per_s_mean']:>6.1f} "
              f"{fmt(row['added_us_per_hop_mean'], '7.0f'):>7} | "
              f"{fmt(row['server_tokens_per_s_median'], '6.1f'):>6}")
    print("Per run, median per token (ms):  "
          + ";  ".join(f"{row['nodes']} node{'s' if row['nodes'] > 1 else ''}: "
                       + " ".join(f"{r['median_us'] / 1e3:.2f}" for r in row["runs"]) for row in results))
    paired = [row for row in results if row["added_us_per_hop_by_repeat"]]
    if paired:
        print("us/hop per repeat, against the 1-node run of the same round:  "
              + ";  ".join(f"{row['nodes']} nodes: " + " ".join(f"{v:.0f}" for v in row["added_us_per_hop_by_repeat"])
                           for row in paired))
    print()
    print("Where a token's time goes (us per token, first chunk to finish, median over repeats, from the")
    print("threads' schedstat): compute = each stage's busiest thread on a CPU (its layers, sampling, packing")
    print("what it sends); not computing = wall - compute, when no stage computed: the network, waking the")
    print("next process, gRPC work on other threads, waiting for a CPU. A stage's thread can keep working")
    print("after it has passed a token on, alongside the next stage, so 'not computing' is a lower bound.")
    print("'runnable' is how long the compute threads waited for a CPU, on the token's path or not; other")
    print("threads' CPU (API, gRPC, membership) runs alongside.")
    if s["threads"] > 1:
        print(f"With --threads {s['threads']} the helper compute threads count as 'other CPU', and the busiest thread")
        print("waiting for them counts as 'not computing'.")
    header = (f"{'nodes':>5} | {'wall':>7} {'compute':>8} {'(by stage)':<20} {'not computing':>13} | "
              f"{'not computing/hop':>17} | {'runnable':>8} {'other CPU':>9}")
    print(header)
    print("-" * len(header))
    for row in results:
        t = row["time_per_token_us"]
        stages = "/".join(f"{v:.0f}" for v in t["compute_by_stage"])
        print(f"{row['nodes']:>5} | {t['wall']:>7.0f} {t['compute']:>8.0f} {stages:<20} {t['not_computing']:>13.0f} | "
              f"{fmt(row['not_computing_us_per_hop'], '17.0f'):>17} | {t['run_queue_wait']:>8.0f} "
              f"{t['other_threads_cpu']:>9.0f}")
    print()
    rtt = report.get("bridge_rtt")
    if rtt:
        print(f"Raw round trip, Python TCP echo with TCP_NODELAY ({rtt['count']} each, median [p10..p90]; other "
              f"processes used {rtt['foreign_load_cores']:.2f} cores meanwhile):")
        for size in rtt["bridge"]:
            b, lo = rtt["bridge"][size], rtt["loopback"][size]
            print(f"  {size:>6}: bridge {rtt['from']} -> {rtt['to']} {b['median_us']:6.1f} us "
                  f"[{b['p10_us']:.0f}..{b['p90_us']:.0f}]   loopback inside {rtt['from']} {lo['median_us']:6.1f} us "
                  f"[{lo['p10_us']:.0f}..{lo['p90_us']:.0f}]")
        print("  A hop is one way: about half a round trip, plus the nodes' own work.")
    engine = report.get("engine_bench")
    if engine:
        one = results[0]
        print(f"Engine alone (`hearth bench --threads {s['threads']}`, no serving, other load "
              f"{engine['foreign_load_cores']:.2f} cores): {engine['decode_tokens_per_s']:.1f} tok/s decode; "
              f"the 1-node mesh streams {one['tokens_per_s']:.1f} tok/s "
              f"({one['tokens_per_s'] / engine['decode_tokens_per_s']:.2f}x)")
    load = report["load"]
    print(f"Other processes on the machine: up to {load['max_foreign_cores']:.2f} cores during a kept measurement; "
          f"{load['discarded']} measurement(s) repeated because of them")
    print()
    for line in report["verdict"]:
        print(line)
    if report["warnings"]:
        print()
        for warning in report["warnings"]:
            print(f"warning: {warning}")
    print("\nLogs: " + ", ".join(f"{n} node(s) {d}" for n, d in s["workdirs"].items()))


def verdict(results: list[dict[str, Any]]) -> tuple[list[str], dict[str, Any]]:
    lines, targets = [], {}
    three = next((r for r in results if r["nodes"] == 3), None)
    if three is not None:
        ok = three["ratio_to_1_node"] >= TARGET_RATIO
        targets["three_nodes_ratio"] = {"value": three["ratio_to_1_node"], "target": TARGET_RATIO, "met": ok}
        lines.append(f"Target: 3 nodes decode at >= {TARGET_RATIO}x one node: {three['ratio_to_1_node']:.3f}x "
                     f"-> {'met' if ok else 'MISSED'}")
    hops = [r for r in results if r["added_us_per_hop"] is not None]
    if hops:
        worst = max(r["added_us_per_hop"] for r in hops)
        ok = worst <= TARGET_HOP_US
        targets["added_us_per_hop"] = {"value": worst, "target": TARGET_HOP_US, "met": ok,
                                      "by_nodes": {r["nodes"]: r["added_us_per_hop"] for r in hops}}
        lines.append(f"Target: <= {TARGET_HOP_US:.0f} us added per hop: "
                     + ", ".join(f"{r['nodes']} nodes {r['added_us_per_hop']:.0f} us" for r in hops)
                     + f" -> {'met' if ok else 'MISSED'}")
        spreads = [r["added_us_per_hop_by_repeat"] for r in hops if len(r["added_us_per_hop_by_repeat"]) > 1]
        low = min((min(v) for v in spreads), default=0.0)
        high = max((max(v) for v in spreads), default=0.0)
        resolvable = high - low <= 2 * TARGET_HOP_US
        targets["added_us_per_hop"]["per_repeat_range"] = [low, high]
        targets["added_us_per_hop"]["resolvable"] = resolvable
        if spreads and not resolvable:
            lines.append(f"        but single repeats give {low:.0f}..{high:.0f} us per hop: on this machine the "
                         "figure is within run-to-run drift; see the figure without compute")
        flight = max(r["not_computing_us_per_hop"] for r in hops)
        targets["not_computing_us_per_hop"] = {"value": flight, "target": TARGET_HOP_US, "met": flight <= TARGET_HOP_US,
                                              "by_nodes": {r["nodes"]: r["not_computing_us_per_hop"] for r in hops}}
        lines.append("        without compute (time no stage computed, per hop): "
                     + ", ".join(f"{r['nodes']} nodes {r['not_computing_us_per_hop']:.0f} us" for r in hops)
                     + f" -> {'met' if flight <= TARGET_HOP_US else 'MISSED'}")
    return lines, targets


def snapshot(binary: Path) -> Path:
    """A private copy of the binary, so a rebuild during the run cannot mix two builds."""
    copy_dir = Path(tempfile.mkdtemp(prefix="hearth-bench-bin-"))
    atexit.register(shutil.rmtree, copy_dir, ignore_errors=True)
    copy = copy_dir / binary.name
    shutil.copy2(binary, copy)
    return copy


def main() -> int:
    args = parse_args()
    problem = netns.preflight()
    if problem:
        log(f"bench_mesh: cannot make network namespaces here: {problem}")
        return 2
    try:
        source = args.binary or netns.find_binary()
        built = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(source.stat().st_mtime))
        binary = snapshot(source)
        with binary.open("rb") as f:
            build_sha = hashlib.file_digest(f, "sha256").hexdigest()[:16]
        missing = {"--memory-limit", "--threads", "--context", "--cluster"} - netns.serve_flags(binary)
        if missing:
            log(f"bench_mesh: `{binary} serve` has no {', '.join(sorted(missing))}")
            return 2
        model = args.model or netns.resolve_model(binary)
        engine = None
        if not args.no_engine_bench:
            log(f"Engine alone: hearth bench --threads {args.threads} --decode-tokens {args.max_tokens} ...")
            engine = engine_bench(binary, model, args)
        meshes: dict[int, Mesh] = {}
        try:
            for n in args.nodes:
                log(f"Starting {n} node(s) on a bridge of their own ...")
                meshes[n] = start_mesh(n, args, binary, model)
                log(f"  plan after {meshes[n].formed_s:.1f} s: layers {meshes[n].layers} on "
                    f"{[node.name for node in meshes[n].stage_nodes]}")
            all_nodes = [node for mesh in meshes.values() for node in mesh.cluster.nodes]
            meter = CpuMeter(all_nodes)
            log("Warming up every configuration ...")
            for mesh in meshes.values():
                warm = {"model": mesh.model_id, "prompt": args.prompt, "max_tokens": 32, "temperature": 0,
                        "stream": True}
                stream_completion(mesh.holder, warm, timeout_s=120.0)
            rtt = None
            big = meshes[max(meshes)]
            if big.n >= 2:
                a, b = big.cluster.nodes[0], big.cluster.nodes[1]
                log(f"Bridge round trip {a.name} -> {b.name} ({args.echo_count} TCP echoes per size) ...")
                meter.wait_quiet(args.max_foreign_load, args.quiet_timeout)
                meter.start()
                rtt = {"from": a.name, "to": b.name, "count": args.echo_count,
                       "bridge": echo_rtts(a.netns, b.netns, b.ip, args.echo_count),
                       "loopback": echo_rtts(a.netns, a.netns, "127.0.0.1", args.echo_count)}
                rtt["foreign_load_cores"] = round(meter.stop()[2], 3)
            log(f"Measuring {args.max_tokens}-token completions, {args.repeats} repeats ...")
            runs: list[Run] = []
            order = list(meshes)
            for repeat in range(args.repeats):
                rotated = order[repeat % len(order):] + order[:repeat % len(order)]
                for n in rotated:
                    runs.append(measure(meshes[n], args, meter, repeat))
            summary = summarize(meshes, runs)
            workdirs = {n: str(mesh.cluster.workdir) for n, mesh in meshes.items()}
        finally:
            for mesh in meshes.values():
                mesh.cluster.close()
    except netns.HarnessError as err:
        log(f"bench_mesh: {err}")
        return 1
    except KeyboardInterrupt:
        log("bench_mesh: interrupted; nodes stopped, namespaces deleted")
        return 130

    results = [summary[n] for n in sorted(summary)]
    warnings = []
    reference = next(r.text for r in runs if r.n == 1)
    differing = sorted({r.n for r in runs if r.text != reference})
    if differing:
        warnings.append(f"the text of {differing} node(s) differs from the single node's (greedy should match)")
    for row in results:
        if row["finish_reasons"] != ["length"]:
            warnings.append(f"{row['nodes']} node(s) finished with {row['finish_reasons']}, not only 'length': "
                            "the completion was shorter than --max-tokens")
        if len(set(row["layers_per_stage"])) > 1:
            warnings.append(f"{row['nodes']} nodes split the layers unevenly: {row['layers_per_stage']}")
    base_compute = results[0]["time_per_token_us"]["compute"]
    for row in results[1:]:
        delta = row["time_per_token_us"]["compute"] - base_compute
        if abs(delta) > TARGET_HOP_US:
            warnings.append(f"{row['nodes']} nodes compute {delta:+.0f} us per token against one node (the stages' "
                            "busiest threads on CPU), which the added-per-hop figure includes as if it were hop "
                            "cost; the 'without compute' figure leaves it out")
    kept_load = [r.foreign_cores for r in runs]
    if max(kept_load) > args.max_foreign_load:
        warnings.append(f"some measurements ran while other processes used up to {max(kept_load):.2f} cores")
    lines, targets = verdict(results)
    report = {
        "setup": {"model": model, "binary": str(source), "binary_built": built, "binary_sha256": build_sha,
                  "prompt": args.prompt, "max_tokens": args.max_tokens,
                  "repeats": args.repeats, "threads": args.threads, "memory_limit": args.memory_limit,
                  "context": args.context, "cpus": N_CPUS, "nodes": args.nodes, "workdirs": workdirs,
                  "note": (f"all nodes share one {N_CPUS}-core machine; N-node figures include CPU contention "
                           "a real cluster would not have. hops per token = N for N >= 2 nodes, 0 for 1. "
                           "Requests go to the first stage's node.")},
        "results": results,
        "bridge_rtt": rtt,
        "engine_bench": engine,
        "load": {"max_foreign_cores": max(kept_load), "discarded": sum(r.attempt for r in runs),
                 "threshold_cores": args.max_foreign_load},
        "targets": targets,
        "verdict": lines,
        "warnings": warnings,
    }
    if args.json_file:
        args.json_file.write_text(json.dumps(report, indent=1) + "\n")
    if args.json:
        print(json.dumps(report))
    else:
        print_report(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
