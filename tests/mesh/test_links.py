"""Activations take the fastest link (issue 7), on the network-namespace harness.

Three nodes joined by two bridges, as Macs on Wi-Fi and a Thunderbolt bridge are: the
main bridge (``eth0``, which every node announces as its data address, so a node that
did not measure would use it) capped at ``SLOW_RATE``, and a second, fast bridge
(``eth1``). Hearth must find both paths to every peer, measure them and carry every hop
over the fast one whatever order the nodes start in; fail a hop over to the slow bridge
within about a second when a node's fast link goes down mid-request, with exactly the
fault-free tokens and no re-partition; and move it back once the link returns.

The slow bridge has a rate cap (``tc ... tbf``) and 20 ms of delay on what every node sends
over it (``Node.netem``: ``tc netem``, or the harness's user-space relay where the kernel
has no sch_netem). A 2.3 KB activation there takes ~30 ms a hop, against tens of
microseconds on the fast bridge.

Each test prints its figures (time to choose the paths, time to fail over and back,
per-token latency on each path, and on a cluster with the fast bridge only); only
sanity bounds are asserted, since timing belongs in reports.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable
from typing import Any

import pytest
from harness import netns
from harness.netns import Cluster, Node
from test_faults import (
    FAULT_AFTER_CHUNKS,
    FAULT_LIMITS,
    JOIN_MAX_TOKENS,
    RECOVERY_SANITY_S,
    Stream,
    assert_no_panic,
    assert_same_stream,
    assert_still_running,
    measure_recovery,
    pids_of,
    reference_stream,
)
from test_mesh import N_LAYERS, SETTLE_TIMEOUT_S, served_model_id, wait_until

SLOW_RATE = "2mbit"
SLOW_DELAY_MS = 20.0
FAST = "fast"
CHOOSE_TIMEOUT_S = 20.0
"""Every hop must be on the fast bridge within this long of the plan being ready."""
RETURN_TIMEOUT_S = 20.0
LATENCY_TOKENS = 64


# --- clusters ------------------------------------------------------------------------------


def two_bridge_cluster(make_cluster: Callable[[], Cluster], *, order: str = "forward",
                       extra: list[str] | None = None) -> tuple[Cluster, Any]:
    """Three nodes (memory 1:2:3) on a slow main bridge and a fast second one, started
    in ``order``; returns the cluster and its agreed view once the plan is ready."""
    cluster = make_cluster()
    cluster.limit_primary_rate(SLOW_RATE)
    cluster.add_link(FAST)
    return cluster, start(cluster, order, extra)


def start(cluster: Cluster, order: str = "forward", extra: list[str] | None = None) -> Any:
    nodes = [cluster.add_node(memory_limit=limit, extra_args=list(extra or []), start=False) for limit in FAULT_LIMITS]
    if cluster.primary_rate is not None:
        # The slow bridge is the main one: delay what each node sends over it.
        for node in nodes:
            node.netem(delay_ms=SLOW_DELAY_MS)
    for node in nodes if order == "forward" else reversed(nodes):
        cluster.start_nodes([node])
        time.sleep(0.3)
    try:
        return cluster.wait_for_plan(nodes, n_layers=N_LAYERS, timeout_s=SETTLE_TIMEOUT_S)
    except netns.HarnessError as err:
        pytest.fail(f"the 3-node mesh did not form:\n{err}", pytrace=False)


def raw_view(node: Node) -> dict[str, Any]:
    result = node.http("GET", "/v1/cluster")
    assert result.status == 200, f"{node.name} GET /v1/cluster -> {result.status}: {result.text}"
    return result.json()


def hop_paths(node: Node) -> list[tuple[str, str, str | None, str | None]]:
    """``[(from, to, path address, interface)]`` for every hop of the plan, as ``node``
    sees it (``None`` while the sender has not reported its path)."""
    out = []
    for hop in raw_view(node)["hops"]:
        path = hop.get("path") or {}
        out.append((hop["from"], hop["to"], path.get("addr"), path.get("interface")))
    return out


def on_link(addr: str | None, subnet: ipaddress.IPv4Network) -> bool:
    return addr is not None and ipaddress.ip_address(addr.rsplit(":", 1)[0]) in subnet


def all_hops_on(cluster: Cluster, subnet: ipaddress.IPv4Network,
                touching: Node | None = None, others_on: ipaddress.IPv4Network | None = None) -> bool:
    """Every running node sees every hop (3 nodes: 3 hops, the ring included) on ``subnet``;
    with ``touching``, only the hops to or from that node, and the rest on ``others_on``."""
    ids = {node.name: node_id(node) for node in cluster.running} if touching is not None else {}
    for node in cluster.running:
        try:
            hops = hop_paths(node)
        except (OSError, ValueError, AssertionError):
            return False
        if len(hops) != 3:
            return False
        for source, target, addr, _ in hops:
            involved = touching is None or ids[touching.name] in (source, target)
            expected = subnet if involved else others_on
            if expected is not None and not on_link(addr, expected):
                return False
    return True


def node_id(node: Node) -> str:
    return str(raw_view(node)["node"])


def describe_hops(cluster: Cluster) -> str:
    lines = []
    for node in cluster.running:
        try:
            view = raw_view(node)
        except (OSError, ValueError, AssertionError) as err:
            lines.append(f"{node.name}: {err!r}")
            continue
        lines.append(f"{node.name} (epoch {view['epoch']}):")
        lines += [f"  hop {h['from'][-6:]} -> {h['to'][-6:]}: {h.get('path')}" for h in view["hops"]]
        lines += [f"  path -> {p['to'][-6:]} {p['addr']} {p['interface']} in_use={p['in_use']} alive={p['alive']} "
                  f"rtt={p['rtt_us']} rate={p['bytes_per_second']}" for p in view["paths"]]
    return "\n".join(lines)


def token_interval_ms(node: Node, prompt: str) -> float:
    """The time per generated token of a streamed greedy request, from its first chunk to
    its end, in milliseconds (the best of three runs after one that warms every stage)."""
    model = served_model_id(node)
    Stream(node, model, prompt, LATENCY_TOKENS).start().finish()
    times = []
    for _ in range(3):
        got = Stream(node, model, prompt, LATENCY_TOKENS).start().finish()
        assert got.ended_at is not None and got.chunks and got.completion_tokens == LATENCY_TOKENS, (
            f"{prompt!r} ended after {got.completion_tokens} tokens: pick a prompt that runs {LATENCY_TOKENS}")
        times.append((got.ended_at - got.chunks[0].at) / max(1, got.completion_tokens - 1) * 1000)
    return min(times)


# --- choosing the path ---------------------------------------------------------------------


@pytest.mark.timeout(240)
@pytest.mark.parametrize("order", ["forward", "reverse"])
def test_every_hop_ends_up_on_the_fast_bridge(make_cluster: Callable[[], Cluster], order: str,
                                             record_timing: Callable[[str, float], None]) -> None:
    """Whichever node starts first, every hop of the plan (and the ring back to the first
    stage) moves to the fast bridge, on its fast interface, with its RTT and throughput
    measured, and every node's /v1/cluster says so."""
    cluster, _ = two_bridge_cluster(make_cluster, order=order)
    ready_at = time.monotonic()
    fast = cluster.links[FAST]
    chose_in = wait_until(lambda: all_hops_on(cluster, fast.subnet), CHOOSE_TIMEOUT_S)
    assert chose_in is not None, (f"the hops did not all move to the fast bridge {fast.subnet} within "
                                  f"{CHOOSE_TIMEOUT_S:.0f} s of the plan:\n{describe_hops(cluster)}")
    assert cluster.started_at is not None
    print(f"\nPATHS chosen ({order}): {chose_in:.2f} s after the plan was ready, "
          f"{ready_at + chose_in - cluster.started_at:.2f} s after the last node started", flush=True)
    record_timing(f"every hop on the fast bridge, after the plan is ready ({order} start)", chose_in)
    for node in cluster.running:
        view = raw_view(node)
        for hop in view["hops"]:
            path = hop["path"]
            assert path["interface"] == fast.iface, f"{node.name}: {hop} leaves by {path['interface']!r}"
            assert path["rtt_us"] > 0 and path["bytes_per_second"] > 0, f"{node.name}: {hop} is not measured"
        in_use = [p for p in view["paths"] if p["in_use"]]
        assert len(in_use) == 2, f"{node.name} should use one path to each of its two peers: {view['paths']}"
        assert all(on_link(p["addr"], fast.subnet) for p in in_use), view["paths"]
    status = cluster.nodes[0].run([str(cluster.binary), "status"], check=True).stdout
    assert "eth1" in status and "hop from" in status, status
    assert_no_panic(cluster)


@pytest.mark.timeout(360)
def test_per_token_latency_on_each_path(make_cluster: Callable[[], Cluster], prompts: list[str],
                                        record_timing: Callable[[str, float], None]) -> None:
    """Per-token latency with the hops on the fast bridge matches a cluster that has only
    the fast bridge; pinned to the slow one with ``--interface eth0`` (the manual
    override), every hop stays there. Figures are printed, not asserted."""
    fast_only = make_cluster()
    start(fast_only)
    fast_only_ms = token_interval_ms(fast_only.nodes[0], prompts[0])
    fast_only.close()

    both, _ = two_bridge_cluster(make_cluster)
    fast = both.links[FAST]
    assert wait_until(lambda: all_hops_on(both, fast.subnet), CHOOSE_TIMEOUT_S) is not None, describe_hops(both)
    chosen_ms = token_interval_ms(both.nodes[0], prompts[0])
    both.close()

    pinned, _ = two_bridge_cluster(make_cluster, extra=["--interface", netns.NODE_IFACE])
    slow = pinned.subnet
    assert wait_until(lambda: all_hops_on(pinned, slow), CHOOSE_TIMEOUT_S) is not None, (
        f"--interface eth0 must keep every hop on {slow}:\n{describe_hops(pinned)}")
    # Measured and reported: now it must never move.
    time.sleep(2)
    assert all_hops_on(pinned, slow), f"a hop left {slow} despite --interface eth0:\n{describe_hops(pinned)}"
    for node in pinned.running:
        assert all(on_link(p["addr"], slow) for p in raw_view(node)["paths"]), "a pinned node probed another link"
    slow_ms = token_interval_ms(pinned.nodes[0], prompts[0])

    print(f"\nLATENCY per token (median, {LATENCY_TOKENS} tokens, 3 nodes): fast bridge only {fast_only_ms:.2f} ms; "
          f"two bridges, hops on the fast one {chosen_ms:.2f} ms ({chosen_ms / fast_only_ms:.2f}x); "
          f"pinned to the slow one ({SLOW_RATE}, {SLOW_DELAY_MS:.0f} ms) {slow_ms:.2f} ms ({slow_ms / fast_only_ms:.2f}x)", flush=True)
    record_timing("per-token latency, fast bridge only", fast_only_ms / 1000)
    record_timing("per-token latency, two bridges, on the path chosen", chosen_ms / 1000)
    record_timing(f"per-token latency, pinned to the {SLOW_RATE} {SLOW_DELAY_MS:.0f} ms bridge", slow_ms / 1000)


# --- failover -------------------------------------------------------------------------------


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("victim_stage", "client_stage"), [(1, 0), (0, 2)],
                         ids=["middle-stage-unplugged", "first-stage-unplugged-client-on-last"])
def test_fast_link_down_fails_over_mid_request_and_comes_back(
        make_cluster: Callable[[], Cluster], prompts: list[str], record_timing: Callable[[str, float], None],
        victim_stage: int, client_stage: int) -> None:
    """A stage's fast link goes down during a streaming greedy request: its hops move to
    the slow bridge, the request finishes with exactly the fault-free tokens, nothing
    re-plans and no process restarts; once the link is back, the hops return to the fast
    bridge. Unplugging the middle stage moves two pipeline hops; unplugging the first
    stage, with the client on the last, moves the ring hop and the request holder's own
    link to the first stage too."""
    cluster, view = two_bridge_cluster(make_cluster)
    fast = cluster.links[FAST]
    assert wait_until(lambda: all_hops_on(cluster, fast.subnet), CHOOSE_TIMEOUT_S) is not None, describe_hops(cluster)
    client = cluster.node_at(view.stages[client_stage].ip)
    victim = cluster.node_at(view.stages[victim_stage].ip)
    case = f"stage {victim_stage}'s fast link down, client on stage {client_stage}"
    model = served_model_id(client)
    prompt = prompts[0]
    ref = reference_stream(client, model, prompt, JOIN_MAX_TOKENS)
    epoch = raw_view(client)["epoch"]
    pids = pids_of(cluster.nodes)

    got = Stream(client, model, prompt, JOIN_MAX_TOKENS).start()
    got.wait_for(FAULT_AFTER_CHUNKS)
    fault_at = time.monotonic()
    victim.link_down(FAST)
    try:
        got.finish()
        assert_same_stream(got, ref, case)
        recovery = measure_recovery(got, fault_at)
        # The victim's hops are on the slow bridge now; the others never left the fast one.
        moved = wait_until(lambda: all_hops_on(cluster, cluster.subnet, touching=victim, others_on=fast.subnet), 5.0)
        assert moved is not None, f"the victim's hops did not move to the slow bridge:\n{describe_hops(cluster)}"
    finally:
        back_at = time.monotonic()
        victim.link_up(FAST)
    print(f"\nFAILOVER ({case}): the stream flowed again {recovery.resumed_s:.2f} s after the fast link went down "
          f"(longest wait {recovery.longest_wait_s:.2f} s; fault after chunk {got.count_at(fault_at)}; "
          f"fault-free chunk interval {ref.interval_s() * 1000:.1f} ms)", flush=True)
    record_timing(f"failover to the slow bridge, {case} (-> stream flowing again)", recovery.resumed_s)
    assert recovery.resumed_s < RECOVERY_SANITY_S

    returned_in = wait_until(lambda: all_hops_on(cluster, fast.subnet), RETURN_TIMEOUT_S)
    assert returned_in is not None, f"the hops did not return to the fast bridge:\n{describe_hops(cluster)}"
    print(f"RETURN: every hop back on the fast bridge {time.monotonic() - back_at:.2f} s after the link came up",
          flush=True)
    record_timing(f"back on the fast bridge after link up, {case}", returned_in)

    # A path failover is not a node loss: the plan never changed.
    for node in cluster.nodes:
        assert raw_view(node)["epoch"] == epoch, f"{node.name} re-planned:\n{describe_hops(cluster)}"
    assert_still_running(cluster.nodes, pids, case)
    again = Stream(client, model, prompt, JOIN_MAX_TOKENS).start().finish()
    assert_same_stream(again, ref, "after the fast link returned")
    assert_no_panic(cluster)
