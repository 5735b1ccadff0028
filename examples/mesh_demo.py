#!/usr/bin/env python3
"""Brings up a Hearth mesh of several nodes on this one Linux machine, for a look around.

Each node is a real `hearth serve` in a network namespace of its own, with its own IPv4
address, all on one Linux bridge: machines on a LAN (or a Thunderbolt bridge), minus the
machines. They find each other over mDNS, agree on a plan that gives each a share of the
model's layers in proportion to its memory, and every one of them serves the
OpenAI-compatible API. The demo prints the plan and how to reach each node, sends one
request, then keeps printing the plan whenever it changes (kill a node to watch the
survivors re-plan) until Ctrl-C, which tears everything down.

    sudo python3 examples/mesh_demo.py                       # 3 nodes: 400MiB, 800MiB, 1200MiB
    sudo python3 examples/mesh_demo.py --memory 1GiB 1GiB    # 2 equal nodes
    sudo python3 examples/mesh_demo.py --peer-only           # multicast blocked, --peer instead
    sudo python3 examples/mesh_demo.py --serve-arg=--context --serve-arg=1024

Needs root and iproute2 (`ip`). The binary is $HEARTH_BIN (default
/root/.cache/hearth-target/release/hearth), the model $HEARTH_MODEL (default: the cached
default model, `hearth pull`). Logs and data dirs stay in the printed work directory.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from harness import netns  # noqa: E402 - after the sys.path line
from harness.netns import Cluster, ClusterView, Node  # noqa: E402

DEFAULT_MEMORY = ("400MiB", "800MiB", "1200MiB")
DEMO_PROMPT = "The capital of France is"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="\n\n".join(__doc__.split("\n\n")[:2]), formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[2:]),
    )
    parser.add_argument("--memory", nargs="+", default=list(DEFAULT_MEMORY), metavar="LIMIT",
                        help="one --memory-limit per node, which also sets the number of nodes "
                             f"(default: {' '.join(DEFAULT_MEMORY)})")
    parser.add_argument("--peer-only", action="store_true",
                        help="block multicast on the bridge (no mDNS) and give every node but the first "
                             "--peer <first node>:5281")
    parser.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                        help="an extra argument for every `hearth serve` (repeatable)")
    parser.add_argument("--binary", type=Path, help="the hearth binary (default: $HEARTH_BIN or the release build)")
    parser.add_argument("--model", help="the model every node serves (default: $HEARTH_MODEL or `hearth pull`)")
    parser.add_argument("--workdir", type=Path, help="where logs and data dirs go (default: a new temp dir)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for a plan (default: 60)")
    return parser.parse_args()


def print_plan(cluster: Cluster, view: ClusterView) -> None:
    """The plan as `hearth status` shows it (from inside the first node), else our own table."""
    status = cluster.nodes[0].run([str(cluster.binary), "status"])
    if status.returncode == 0 and status.stdout.strip():
        print(status.stdout.rstrip())
    else:
        print(view.describe(cluster.names_by_ip()))


def print_access(cluster: Cluster, model: str) -> None:
    """How to reach every node's API, from inside its namespace and from this machine."""
    body = json.dumps({"model": model, "prompt": DEMO_PROMPT, "max_tokens": 16, "temperature": 0})
    print("\nEach node serves the API on 127.0.0.1:5280 inside its namespace; while this demo runs it")
    print("is also forwarded to a port on this machine's loopback:\n")
    for node in cluster.nodes:
        print(f"  {node.name}  {node.ip:<15} namespace {node.netns:<18} {node.base_url}")
    first = cluster.nodes[0]
    print("\nFrom inside a node, as a user on that machine would:\n")
    print(f"  sudo ip netns exec {first.netns} curl -s {first.in_netns_base_url}/completions \\\n"
          f"       -H 'Content-Type: application/json' -d {shlex.quote(body)}")
    print(f"  sudo ip netns exec {first.netns} {cluster.binary} status")
    print("\nFrom this machine, with the official client (pip install openai):\n")
    print("  from openai import OpenAI")
    print(f'  client = OpenAI(base_url="{first.base_url}", api_key="unused")')
    print(f'  print(client.completions.create(model="{model}", prompt="{DEMO_PROMPT}", max_tokens=16).choices[0].text)')
    print(f"\nLogs: {cluster.workdir}/node<i>/serve.log")


def served_model(node: Node) -> str:
    result = node.http("GET", "/v1/models")
    if result.status != 200:
        raise netns.HarnessError(f"GET /v1/models -> {result.status}: {result.text}")
    return str(result.json()["data"][0]["id"])


def demo_request(node: Node, model: str) -> None:
    """One greedy completion through the whole pipeline, to show that it works."""
    started = time.monotonic()
    result = node.http("POST", "/v1/completions",
                       json={"model": model, "prompt": DEMO_PROMPT, "max_tokens": 16, "temperature": 0})
    took = time.monotonic() - started
    if result.status == 200:
        text = result.json()["choices"][0]["text"]
        print(f"\n{node.name} answered in {took:.2f} s: {DEMO_PROMPT!r} -> {text!r}")
    else:
        print(f"\n{node.name} answered {result.status}: {result.text}")


def watch(cluster: Cluster, view: ClusterView) -> None:
    """Print the plan again whenever a node sees a new one, and nodes that exit, until Ctrl-C."""
    print("\nWatching the plan (try: sudo kill -9 <pid>); Ctrl-C tears everything down.")
    print("  pids: " + ", ".join(f"{n.name}={n.pid}" for n in cluster.nodes))
    seen = {view.plan()}
    exited: set[str] = set()
    while True:
        time.sleep(1.0)
        for node in cluster.nodes:
            if not node.is_running() and node.name not in exited:
                exited.add(node.name)
                code = node.process.returncode if node.process else None
                print(f"\n{time.strftime('%H:%M:%S')} {node.name} exited ({code})")
        for current in cluster.views().values():
            if isinstance(current, ClusterView) and current.plan() not in seen:
                seen.add(current.plan())
                print(f"\n{time.strftime('%H:%M:%S')} new plan:\n{current.describe(cluster.names_by_ip())}")


def main() -> int:
    args = parse_args()
    problem = netns.preflight()
    if problem:
        print(f"mesh_demo: cannot make network namespaces here: {problem}", file=sys.stderr)
        return 2
    try:
        with Cluster(binary=args.binary, model=args.model, workdir=args.workdir) as cluster:
            if args.peer_only:
                cluster.block_multicast()
            nodes = [cluster.add_node(memory_limit=limit, extra_args=args.serve_arg, start=False)
                     for limit in args.memory]
            if args.peer_only:
                for node in nodes[1:]:
                    node.extra_args += ["--peer", nodes[0].control_addr]
            print(f"Starting {len(nodes)} nodes ({cluster.binary}, model {cluster.model}) on bridge "
                  f"{cluster.bridge} ({cluster.subnet}, namespace {cluster.hub_netns})...")
            cluster.start_nodes(nodes)
            assert cluster.started_at is not None
            view = cluster.wait_for_plan(nodes, timeout_s=args.timeout)
            print(f"The nodes agreed on a plan {time.monotonic() - cluster.started_at:.2f} s after starting:\n")
            print_plan(cluster, view)
            model = served_model(nodes[0])
            print_access(cluster, model)
            demo_request(cluster.node_at(view.stages[-1].ip), model)
            watch(cluster, view)
    except KeyboardInterrupt:
        print("\nTorn down: nodes stopped, namespaces, veths and bridge deleted.")
        return 0
    except netns.HarnessError as err:
        print(f"mesh_demo: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
