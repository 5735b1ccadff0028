"""Hearth as a mesh of real processes in Linux network namespaces.

Run with ``python3 -m pytest tests/mesh -q`` (as root; see conftest.py).

* Harness tests check the namespaces themselves (addresses, multicast and blocking it,
  unplugging a node, netem, teardown on errors and signals) with stand-in processes,
  so a broken network never passes for a broken node.
* Mesh tests run ``hearth serve`` in each namespace: three nodes at memory limits 1:2:3
  find each other by mDNS and agree on one plan, split the layers 15/10/5 (the largest
  node first), answer greedy requests on any node with exactly the single-node tokens,
  hold memory in proportion to their layers; ``--peer`` alone forms a cluster where
  multicast is blocked; a SIGKILLed last stage is planned around within 5 s.

Fault tests to come (SIGKILL mid-stream, link down, netem, a 4th node joining) build on
``make_cluster`` / ``start_mesh`` and the ``Node`` helpers: ``kill``, ``restart``,
``link_down``/``link_up``, ``netem``, ``sse`` (events as they arrive), ``rss_bytes``.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
from harness import netns
from harness.netns import Cluster, ClusterView, Node

HARNESS_DIR = Path(netns.__file__).resolve().parents[1]

N_LAYERS = 30
"""Layers of the default model (SmolLM2-135M-Instruct)."""
MEMORY_LIMITS = ("400MiB", "800MiB", "1200MiB")
"""In the ratio 1:2:3, each ample for its share of the layers with the full 8192-token context."""
EXPECTED_LAYERS = {"400MiB": 5, "800MiB": 10, "1200MiB": 15}
MAX_TOKENS = 16
FORMATION_LIMIT_S = 10.0
REPLAN_LIMIT_S = 5.0
SETTLE_TIMEOUT_S = 60.0
"""How long to wait for a plan at all; the tests assert the tighter limits above, so a
slow formation fails one test rather than every test that needs a cluster."""


# --- clusters of hearth nodes -------------------------------------------------------------


@dataclass
class Mesh:
    """A running cluster whose nodes agreed on a plan."""

    cluster: Cluster
    view: ClusterView
    formed_after_s: float
    """From starting the last process to every node reporting the same ready plan."""

    @property
    def nodes(self) -> list[Node]:
        return self.cluster.nodes

    def stage_node(self, position: int) -> Node:
        """The node at this pipeline position of :attr:`view` (0 the first, -1 the last)."""
        return self.cluster.node_at(self.view.stages[position].ip)


def start_mesh(cluster: Cluster, limits: tuple[str, ...] = MEMORY_LIMITS,
               extra_args: Callable[[int, list[Node]], list[str]] | None = None) -> Mesh:
    """Add one node per memory limit, start them together and wait for their plan.

    ``extra_args(i, nodes)`` gives node ``i`` more flags once every namespace (so every
    address) exists, e.g. ``--peer``.
    """
    nodes = [cluster.add_node(memory_limit=limit, start=False) for limit in limits]
    if extra_args is not None:
        for i, node in enumerate(nodes):
            node.extra_args += extra_args(i, nodes)
    cluster.start_nodes(nodes)
    assert cluster.started_at is not None
    view = cluster.wait_for_plan(nodes, n_layers=N_LAYERS, timeout_s=SETTLE_TIMEOUT_S)
    return Mesh(cluster=cluster, view=view, formed_after_s=time.monotonic() - cluster.started_at)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory, hearth_binary: Path, model_path: str,
         record_timing: Callable[[str, float], None]) -> Iterator[Mesh]:
    """Three nodes at memory limits 1:2:3 with no flag but ``--memory-limit`` and
    ``--data-dir``, found by mDNS; shared by the tests that leave it as it is."""
    with Cluster(binary=hearth_binary, model=model_path, workdir=tmp_path_factory.mktemp("mesh")) as cluster:
        try:
            formed = start_mesh(cluster)
        except netns.HarnessError as err:
            pytest.fail(f"the 3-node mesh did not form:\n{err}", pytrace=False)
        record_timing("3 nodes (mDNS) agree on a plan, from process start", formed.formed_after_s)
        yield formed


def served_model_id(node: Node) -> str:
    """The one model id a node lists in ``GET /v1/models``."""
    result = node.http("GET", "/v1/models")
    assert result.status == 200, f"{node.name} GET /v1/models -> {result.status}: {result.text}"
    data = result.json()["data"]
    assert len(data) == 1, f"{node.name}: expected one model, got {data!r}"
    return str(data[0]["id"])


@pytest.fixture(scope="module")
def model_id(mesh: Mesh) -> str:
    return served_model_id(mesh.nodes[0])


@pytest.fixture(scope="session")
def reference(single_node: Any, prompts: list[str]) -> dict[str, str]:
    """``{prompt: hearth generate's greedy MAX_TOKENS-token continuation}``."""
    return dict(single_node.prefetch(prompts, MAX_TOKENS))


# --- helpers ------------------------------------------------------------------------------


def complete(node: Node, model: str, prompt: str, *, stream: bool, max_tokens: int = MAX_TOKENS) -> str:
    """A greedy completion from ``node`` with the official client (in this process,
    through the node's forwarder), streamed or not; returns the text."""
    with openai.OpenAI(base_url=node.base_url, api_key="unused", max_retries=0, timeout=60.0) as client:
        if not stream:
            return client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens,
                                             temperature=0).choices[0].text
        with client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                       stream=True) as chunks:
            return "".join(choice.text or "" for chunk in chunks for choice in chunk.choices)


# Runs inside a namespace: the same request a user on that machine would make.
OPENAI_STREAM_SCRIPT = """
import sys
from openai import OpenAI
base_url, model, prompt, max_tokens = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
with OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=60.0) as client:
    with client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens,
                                   temperature=0, stream=True) as chunks:
        sys.stdout.write("".join(c.text or "" for chunk in chunks for c in chunk.choices))
"""


def listen_in(node: Node, port: int) -> socket.socket:
    """A TCP listener on ``node``'s address, inside its namespace."""
    return netns.call_in_netns(node.netns, socket.create_server, (node.ip, port))


def connect_time(src: Node, dst_ip: str, port: int, timeout_s: float = 0.5) -> float | None:
    """Seconds a TCP connect from ``src`` to ``dst_ip:port`` takes, or None if it fails."""

    def attempt() -> float | None:
        started = time.monotonic()
        try:
            socket.create_connection((dst_ip, port), timeout=timeout_s).close()
        except OSError:
            return None
        return time.monotonic() - started

    return netns.call_in_netns(src.netns, attempt)


def wait_until(predicate: Callable[[], bool], timeout_s: float, interval_s: float = 0.05) -> float | None:
    """Poll ``predicate`` until it holds; the seconds that took, or None on timeout."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if predicate():
            return time.monotonic() - started
        time.sleep(interval_s)
    return None


def process_gone(pid: int) -> bool:
    """Whether ``pid`` no longer runs (absent, or a zombie nobody reaped yet)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return "\nState:\tZ" in status


def ip_output(*argv: str) -> str:
    return subprocess.run(["ip", *argv], capture_output=True, text=True, check=True).stdout


# --- the harness itself -------------------------------------------------------------------


def test_each_namespace_has_its_own_address_and_the_root_namespace_is_untouched(tmp_path: Path) -> None:
    root_links, root_addrs = ip_output("-o", "link", "show"), ip_output("-o", "addr", "show")
    with Cluster(workdir=tmp_path) as cluster:
        nodes = [cluster.add_node(command=["sleep", "600"]) for _ in range(3)]
        assert len({node.ip for node in nodes}) == 3
        for node in nodes:
            addrs = node.run(["ip", "-o", "-4", "addr", "show"], check=True).stdout
            assert f"inet {node.ip}/24" in addrs and "inet 127.0.0.1/8" in addrs, addrs
            links = node.run(["ip", "-o", "link", "show"], check=True).stdout
            assert "lo:" in links and "LOWER_UP" in links.split("lo:")[1].splitlines()[0], links
            assert "MULTICAST" in next(line for line in links.splitlines() if f" {netns.NODE_IFACE}@" in line)
        # Unicast between every pair.
        listeners = [listen_in(node, 7001) for node in nodes]
        try:
            for src in nodes:
                for dst in nodes:
                    if src is not dst:
                        assert connect_time(src, dst.ip, 7001) is not None, f"{src.name} cannot reach {dst.name}"
        finally:
            for listener in listeners:
                listener.close()
        # Nothing of it in the root namespace: no new link, no new address.
        assert ip_output("-o", "link", "show") == root_links
        assert ip_output("-o", "addr", "show") == root_addrs
        names = netns.netns_list()
        assert {node.netns for node in nodes} | {cluster.hub_netns} <= set(names)
    assert not {node.netns for node in nodes} & set(netns.netns_list()), "namespaces left behind"


def test_multicast_reaches_every_namespace_and_blocking_it_keeps_unicast(tmp_path: Path) -> None:
    with Cluster(workdir=tmp_path) as cluster:
        a, b, c = (cluster.add_node(command=["sleep", "600"]) for _ in range(3))
        for src, dst in ((a, b), (b, c), (c, a)):
            assert netns.multicast_reaches(src, dst), f"mDNS multicast {src.name} -> {dst.name} did not arrive"
        cluster.block_multicast()
        d = cluster.add_node(command=["sleep", "600"])  # joins blocked too
        for src, dst in ((a, b), (b, c), (c, d), (d, a)):
            assert not netns.multicast_reaches(src, dst, timeout_s=0.5), f"{src.name} -> {dst.name} got through"
        listener = listen_in(b, 7002)
        try:
            assert connect_time(a, b.ip, 7002) is not None, "unicast must survive blocking multicast"
        finally:
            listener.close()
        cluster.unblock_multicast()
        assert netns.multicast_reaches(d, a), "multicast did not come back"


def test_link_down_unplugs_a_node_and_link_up_plugs_it_back(
    tmp_path: Path, record_timing: Callable[[str, float], None]
) -> None:
    with Cluster(workdir=tmp_path) as cluster:
        a, b = (cluster.add_node(command=["sleep", "600"]) for _ in range(2))
        listener = listen_in(b, 7003)
        try:
            assert connect_time(a, b.ip, 7003) is not None
            a.link_down()
            assert connect_time(a, b.ip, 7003, timeout_s=0.3) is None, "traffic passed a downed link"
            assert connect_time(b, a.ip, 7003, timeout_s=0.3) is None
            a.link_up()
            # The kernel brings carrier back through linkwatch, within about a second.
            back = wait_until(lambda: connect_time(a, b.ip, 7003, timeout_s=0.2) is not None, timeout_s=5.0)
            assert back is not None, "no connectivity 5 s after link up"
            record_timing("harness: connectivity back after link_up", back)
        finally:
            listener.close()


def test_netem_delays_a_nodes_packets(tmp_path: Path) -> None:
    with Cluster(workdir=tmp_path) as cluster:
        a, b = (cluster.add_node(command=["sleep", "600"]) for _ in range(2))
        listener = listen_in(b, 7004)
        try:
            try:
                a.netem(delay_ms=150)
            except netns.NetemUnavailable as err:
                pytest.skip(str(err))
            took = connect_time(a, b.ip, 7004, timeout_s=2.0)
            assert took is not None and took >= 0.14, f"connect took {took} s under 150 ms of netem delay"
            a.clear_netem()
            took = connect_time(a, b.ip, 7004)
            assert took is not None and took < 0.1, f"connect took {took} s after clearing netem"
        finally:
            listener.close()


CLEANUP_CHILD = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
from harness.netns import Cluster
how = sys.argv[2]
with Cluster(workdir=sys.argv[3]) as cluster:
    nodes = [cluster.add_node(command=["sleep", "600"]) for _ in range(2)]
    # Once each process is `sleep`, setpriv has set its parent-death signal: before that,
    # a SIGKILLed harness would leave it running (a race of the test, not of the harness).
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not all(
            open(f"/proc/{node.pid}/comm").read().strip() == "sleep" for node in nodes):
        time.sleep(0.01)
    names = [node.netns for node in nodes] + [cluster.hub_netns]
    print(json.dumps({"netns": names, "pids": [node.pid for node in nodes]}), flush=True)
    sys.stdin.readline()  # the parent has looked at the namespaces
    if how == "exception":
        raise RuntimeError("a failing test")
    time.sleep(600)
"""


@pytest.mark.parametrize("how", ["exception", "SIGINT", "SIGTERM", "SIGKILL"])
def test_teardown_on_errors_and_signals(how: str, tmp_path: Path) -> None:
    """A harness process that fails or is signalled leaves no node, namespace or veth
    behind; after SIGKILL the nodes die with it (parent-death signal) and the next
    cluster sweeps its namespaces away."""
    # A job started in the background by a shell (`bash .ci/run &`) inherits SIGINT ignored,
    # and the harness rightly leaves an ignored signal ignored; this test is about Ctrl-C at
    # a terminal, so the child starts with SIGINT at its default.
    child = subprocess.Popen(
        [sys.executable, "-c", CLEANUP_CHILD, str(HARNESS_DIR), how, str(tmp_path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        assert child.stdin is not None and child.stdout is not None
        line = child.stdout.readline()
        assert line, f"the child printed nothing: {child.stderr.read() if child.stderr else ''}"
        made = json.loads(line)
        assert set(made["netns"]) <= set(netns.netns_list())
        assert not any(process_gone(pid) for pid in made["pids"])
        if how == "exception":
            child.stdin.write("go\n")
            child.stdin.flush()
        else:
            child.send_signal(getattr(signal, how))
        child.wait(timeout=20)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    gone = wait_until(lambda: all(process_gone(pid) for pid in made["pids"]), timeout_s=5.0)
    assert gone is not None, f"stand-in nodes survived {how}: {made['pids']}"
    if how == "SIGKILL":
        assert set(made["netns"]) <= set(netns.netns_list()), "SIGKILL cannot clean up, yet namespaces vanished"
        Cluster(workdir=tmp_path / "sweeper").close()  # a new run sweeps a dead run's leftovers
    left = set(made["netns"]) & set(netns.netns_list())
    assert not left, f"namespaces left after {how}: {left}"


# --- the mesh -----------------------------------------------------------------------------


def test_three_nodes_agree_on_one_plan_within_10s(mesh: Mesh) -> None:
    print(f"\n3-node mesh formed {mesh.formed_after_s:.2f} s after the processes started:\n"
          f"{mesh.view.describe(mesh.cluster.names_by_ip())}")
    assert mesh.formed_after_s <= FORMATION_LIMIT_S, (
        f"the nodes took {mesh.formed_after_s:.1f} s to agree on a plan (limit {FORMATION_LIMIT_S} s)")
    # Still one plan, now: same epoch, coordinator, all three nodes, ready.
    views = {node.name: node.cluster_view() for node in mesh.nodes}
    plans = {name: view.plan() for name, view in views.items()}
    assert len(set(plans.values())) == 1, f"the nodes disagree: {plans}"
    for name, view in views.items():
        problems = view.problems([n.ip for n in mesh.nodes], N_LAYERS)
        assert not problems, f"{name}: {problems}"
        assert view.coordinator in {entry.id for entry in view.nodes}, f"coordinator {view.coordinator} not a node"
        assert len({entry.id for entry in view.stages}) == 3


def test_a_ready_plan_leaves_no_problem_reported(mesh: Mesh) -> None:
    """Once every node agrees on a ready plan, no node still reports a placement problem
    (``problem`` in /v1/cluster, shown by `hearth status`), e.g. one left over from when
    it was alone and the model did not fit."""

    def problems() -> dict[str, object]:
        return {node.name: node.cluster_view().raw.get("problem") for node in mesh.nodes}

    wait_until(lambda: not any(problems().values()), timeout_s=2.0)
    stale = {name: problem for name, problem in problems().items() if problem}
    assert not stale, f"ready at epoch {mesh.view.epoch}, yet: {stale}"


def test_layers_follow_the_memory_ratio_largest_first(mesh: Mesh) -> None:
    stages = mesh.view.stages
    by_limit = {mesh.cluster.node_at(stage.ip).memory_limit: stage for stage in stages}
    counts = {limit: stage.layer_count for limit, stage in by_limit.items()}
    usable_mib = {limit: round(stage.usable_memory_bytes / 2**20, 1) for limit, stage in by_limit.items()}
    assert counts == EXPECTED_LAYERS, (
        f"layers per memory limit: {counts}, expected {EXPECTED_LAYERS} (usable MiB reported: {usable_mib})")
    order = [mesh.cluster.node_at(stage.ip).memory_limit for stage in stages]
    assert order == sorted(MEMORY_LIMITS, key=lambda limit: EXPECTED_LAYERS[limit], reverse=True), (
        f"pipeline order {order}: the largest node should come first")
    usable = [by_limit[limit].usable_memory_bytes for limit in MEMORY_LIMITS]
    assert usable == sorted(usable) and usable[0] > 0, f"usable memory does not follow the limits: {usable}"
    for limit in MEMORY_LIMITS:
        stage = by_limit[limit]
        assert stage.usable_memory_bytes <= int(limit.removesuffix("MiB")) * 2**20, (limit, stage)


def test_greedy_tokens_on_any_node_equal_single_node(
    mesh: Mesh, model_id: str, prompts: list[str], reference: dict[str, str],
    record_timing: Callable[[str, float], None],
) -> None:
    """Every prompt, to every node, streamed and not: exactly `hearth generate`'s text."""
    mismatches = []
    started = time.monotonic()
    for prompt in prompts:
        for node in mesh.nodes:
            for stream in (False, True):
                text = complete(node, model_id, prompt, stream=stream)
                if text != reference[prompt]:
                    mismatches.append(f"{node.name} stream={stream} {prompt!r}: {text!r} != {reference[prompt]!r}")
    requests = len(prompts) * len(mesh.nodes) * 2
    record_timing(f"{requests} greedy {MAX_TOKENS}-token completions through the 3-stage pipeline",
                  time.monotonic() - started)
    assert not mismatches, "mesh output differs from single-node output:\n" + "\n".join(mismatches)


def test_openai_client_inside_each_namespace_streams_the_single_node_tokens(
    mesh: Mesh, model_id: str, prompts: list[str], reference: dict[str, str]
) -> None:
    """What a user on each machine runs: the openai package against 127.0.0.1:5280."""
    prompt = prompts[-1]
    for node in mesh.nodes:
        result = node.python(OPENAI_STREAM_SCRIPT, node.in_netns_base_url, model_id, prompt, str(MAX_TOKENS),
                             timeout=120)
        assert result.stdout == reference[prompt], f"{node.name}: {result.stdout!r} != {reference[prompt]!r}"


RSS_MARGIN_BYTES = 16 * 2**20
"""Three quarters of the Q4_1 weights (~21 MiB) of the 10 layers by which the largest stage
exceeds the smallest. (Measured: 148 MiB for 15 layers, 86 MiB for 5.)"""


def test_resident_memory_follows_the_layer_share(mesh: Mesh, model_id: str, prompts: list[str]) -> None:
    """The node with 15 layers holds clearly more than the one with 5 (both hold the
    embedding: the first stage for the input, the last for the tied output head)."""
    complete(mesh.stage_node(0), model_id, prompts[0], stream=False)  # every stage has computed
    rows = []
    for stage in mesh.view.stages:
        node = mesh.cluster.node_at(stage.ip)
        rows.append((node, stage.layer_count, node.rss_bytes()))
    print("\n" + "\n".join(f"{n.name} {n.memory_limit:>8}: {layers:>2} layers, RSS {rss / 2**20:7.1f} MiB"
                           for n, layers, rss in rows))
    most = max(rows, key=lambda row: row[1])
    least = min(rows, key=lambda row: row[1])
    assert most[1] == 15 and least[1] == 5
    assert most[2] > least[2] + RSS_MARGIN_BYTES, (
        f"the 15-layer node holds {most[2] / 2**20:.1f} MiB, the 5-layer node {least[2] / 2**20:.1f} MiB")


def test_status_command_shows_the_plan(mesh: Mesh, hearth_binary: Path) -> None:
    node = mesh.nodes[0]
    result = node.run([str(hearth_binary), "status"], check=True)
    for stage in mesh.view.stages:
        assert stage.ip in result.stdout or stage.id in result.stdout, (
            f"`hearth status` does not show {stage.addr} ({stage.id}):\n{result.stdout}")


@pytest.mark.timeout(120)
def test_peer_flag_alone_forms_the_cluster_when_multicast_is_blocked(
    make_cluster: Callable[[], Cluster], prompts: list[str], reference: dict[str, str],
    record_timing: Callable[[str, float], None],
) -> None:
    """Multicast blocked on the bridge (checked), nodes 1 and 2 given `--peer node0`:
    the same plan as with mDNS."""
    cluster = make_cluster()
    cluster.block_multicast()

    def peer_with_first(i: int, nodes: list[Node]) -> list[str]:
        if i == 0:
            blocked = [not netns.multicast_reaches(a, b, timeout_s=0.5) for a, b in zip(nodes, nodes[1:] + nodes[:1])]
            assert all(blocked), "multicast still gets through; this test would prove nothing"
            return []
        return ["--peer", nodes[0].control_addr]

    formed = start_mesh(cluster, extra_args=peer_with_first)
    record_timing("3 nodes (--peer, no multicast) agree on a plan, from process start", formed.formed_after_s)
    print(f"\n--peer cluster formed in {formed.formed_after_s:.2f} s:\n{formed.view.describe(cluster.names_by_ip())}")
    assert formed.formed_after_s <= FORMATION_LIMIT_S
    counts = {cluster.node_at(s.ip).memory_limit: s.layer_count for s in formed.view.stages}
    assert counts == EXPECTED_LAYERS
    node = cluster.nodes[2]  # knows only node0 by itself
    prompt = prompts[0]
    assert complete(node, served_model_id(node), prompt, stream=True) == reference[prompt]


@pytest.mark.timeout(120)
def test_sigkill_of_the_last_stage_between_requests_replans_within_5s(
    make_cluster: Callable[[], Cluster], prompts: list[str], reference: dict[str, str],
    record_timing: Callable[[str, float], None],
) -> None:
    """The last stage dies between two requests to the first: the two survivors agree on
    a new plan (higher epoch) within 5 s, and greedy output is still the single node's."""
    formed = start_mesh(make_cluster())
    serving, victim = formed.stage_node(0), formed.stage_node(-1)
    assert serving is not victim
    model = served_model_id(serving)
    before, after = prompts[1], prompts[2]
    assert complete(serving, model, before, stream=False) == reference[before]

    killed_at = time.monotonic()
    victim.kill(signal.SIGKILL)
    survivors = [node for node in formed.nodes if node is not victim]
    try:
        view = formed.cluster.wait_for_plan(survivors, n_layers=N_LAYERS, min_epoch=formed.view.epoch,
                                            timeout_s=REPLAN_LIMIT_S)
    except netns.PlanTimeout as err:
        pytest.fail(f"no new plan for the 2 survivors within {REPLAN_LIMIT_S} s of SIGKILL:\n{err}", pytrace=False)
    replanned = time.monotonic() - killed_at
    record_timing("re-plan of 2 survivors after SIGKILL of the last stage", replanned)
    print(f"\nre-planned {replanned:.2f} s after SIGKILL:\n{view.describe(formed.cluster.names_by_ip())}")
    assert view.epoch > formed.view.epoch
    assert [s.ip for s in view.stages if s.ip == victim.ip] == []
    assert len(view.stages) == 2
    assert complete(serving, model, after, stream=False) == reference[after]
    assert complete(serving, model, after, stream=True) == reference[after]
