"""A private cluster (``--cluster-key-file``) among intruders on the same bridge.

Three nodes share a cluster key; on the same bridge a node holding another key and a
node holding none find them by mDNS and, with ``--peer``, dial the first keyed node's
control port directly. Over about ten seconds:

* no intruder appears in a keyed node's ``/v1/cluster``, nor a keyed node in an
  intruder's;
* the keyed nodes plan over exactly themselves and answer greedy requests with the
  single-node text, throughout;
* the intruders' data planes accept no frame (``/health`` ``data_plane``);
* the keyed nodes log refusals of the intruders' control connections;
* a data-plane call from the wrong-key node's namespace straight to a keyed node's data
  port (HTTP/2 gRPC by ``curl``), without a session ticket and with a forged one, is
  refused with UNAUTHENTICATED before any frame reaches the stage (its counters do not
  move) and logged.
"""

from __future__ import annotations

import base64
import re
import secrets
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from harness import netns
from harness.netns import Cluster, Node

N_LAYERS = 30
KEYED_LIMITS = ("400MiB", "800MiB", "1200MiB")
INTRUDER_LIMIT = "1200MiB"
MAX_TOKENS = 16
OBSERVE_S = 10.0
SETTLE_TIMEOUT_S = 60.0
PIPELINE_STREAM = "/hearth.v1.Pipeline/Stream"
SESSION_METADATA = "hearth-session-bin"

CONTROL_REFUSAL = "refused a control connection"
DATA_CALL_REFUSAL = "refused a data plane call"


def make_key(binary: Path, path: Path) -> Path:
    result = subprocess.run([str(binary), "key", "new", "--out", str(path)], capture_output=True, text=True,
                            timeout=30, check=False)
    assert result.returncode == 0, f"`hearth key new` failed: {result.stderr}"
    assert path.stat().st_mode & 0o077 == 0, f"the key file is not private: {oct(path.stat().st_mode)}"
    return path


def health(node: Node) -> dict[str, Any]:
    result = node.http("GET", "/health", timeout=10.0)
    body = result.json()
    assert isinstance(body.get("data_plane"), dict), f"{node.name} /health has no data_plane: {body!r}"
    return body


def data_plane(node: Node) -> tuple[int, int]:
    counters = health(node)["data_plane"]
    return int(counters["frames_accepted"]), int(counters["frames_refused"])


def greedy(node: Node, model: str, prompt: str) -> str:
    result = node.http("POST", "/v1/completions",
                       json={"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0})
    assert result.status == 200, f"{node.name} POST /v1/completions -> {result.status}: {result.text[:500]}"
    return str(result.json()["choices"][0]["text"])


def model_of(node: Node) -> str:
    result = node.http("GET", "/v1/models")
    assert result.status == 200, result.text
    return str(result.json()["data"][0]["id"])


def log_text(node: Node) -> str:
    return node.log_path.read_bytes().decode("utf-8", errors="replace")


def refusals_from(node: Node, ip: str, marker: str) -> list[str]:
    """Lines of ``node``'s log with ``marker`` that name ``ip`` (as /ip4/IP/ or IP:port)."""
    pattern = re.compile(rf"(/ip4/{re.escape(ip)}/|{re.escape(ip)}:\d)")
    return [line for line in log_text(node).splitlines() if marker in line and pattern.search(line)]


def grpc_call(caller: Node, target: str, ticket: bytes | None) -> subprocess.CompletedProcess[str]:
    """A Pipeline.Stream call from ``caller``'s namespace, by curl over HTTP/2 without TLS;
    prints the response headers (a refusal is trailers-only, so they hold grpc-status).

    The request stream carries no message and ends with its headers: were a body still
    to come when the refusal arrives, the server would reset the stream and curl would
    report that instead of the response.
    """
    argv = ["curl", "-sS", "--http2-prior-knowledge", "--max-time", "10", "-o", "/dev/null", "-D", "-",
            "-X", "POST", "-H", "content-type: application/grpc", "-H", "te: trailers"]
    if ticket is not None:
        argv += ["-H", f"{SESSION_METADATA}: {base64.b64encode(ticket).decode()}"]
    argv.append(f"http://{target}{PIPELINE_STREAM}")
    return caller.run(argv, timeout=30)


@pytest.mark.timeout(300)
def test_intruders_without_the_cluster_key_are_kept_out(
    make_cluster: Callable[[], Cluster], single_node: Any, prompts: list[str], tmp_path: Path,
    record_timing: Callable[[str, float], None],
) -> None:
    cluster = make_cluster()
    key = make_key(cluster.binary, tmp_path / "cluster.key")
    wrong_key = make_key(cluster.binary, tmp_path / "wrong.key")
    assert key.read_bytes() != wrong_key.read_bytes()

    keyed = [cluster.add_node(memory_limit=limit, start=False, extra_args=["--cluster-key-file", str(key)])
             for limit in KEYED_LIMITS]
    target = keyed[0].control_addr
    wrong = cluster.add_node(memory_limit=INTRUDER_LIMIT, start=False,
                             extra_args=["--cluster-key-file", str(wrong_key), "--peer", target])
    keyless = cluster.add_node(memory_limit=INTRUDER_LIMIT, start=False, extra_args=["--peer", target])
    intruders = [wrong, keyless]
    names = {n.ip: n.name for n in cluster.nodes}
    keyed_ips = {n.ip for n in keyed}
    intruder_ips = {n.ip for n in intruders}

    expected = single_node.prefetch(prompts[:2], MAX_TOKENS)
    cluster.start_nodes()
    assert cluster.started_at is not None
    try:
        view = cluster.wait_for_plan(keyed, n_layers=N_LAYERS, timeout_s=SETTLE_TIMEOUT_S)
    except netns.HarnessError as err:
        pytest.fail(f"the keyed cluster did not form among intruders:\n{err}", pytrace=False)
    record_timing("3 keyed nodes (mDNS, 2 intruders on the bridge) agree on a plan",
                  time.monotonic() - cluster.started_at)
    assert {s.ip for s in view.stages} == keyed_ips, view.describe(names)
    for intruder in intruders:
        intruder.wait_api()
    model = model_of(keyed[0])

    # Watch for OBSERVE_S while serving greedy requests on every keyed node in turn.
    deadline = time.monotonic() + OBSERVE_S
    served = 0
    while time.monotonic() < deadline or served < len(keyed):
        for node in cluster.nodes:
            node.ensure_running()
        for observer in keyed:
            seen = {n.ip for n in observer.cluster_view().nodes}
            assert not seen & intruder_ips, (
                f"{observer.name} lists an intruder: {[names[ip] for ip in seen & intruder_ips]}\n"
                f"{observer.cluster_view().describe(names)}")
            assert observer.cluster_view().plan() == view.plan(), (
                f"{observer.name}'s plan changed:\n{observer.cluster_view().describe(names)}")
        for intruder in intruders:
            seen = {n.ip for n in intruder.cluster_view().nodes}
            assert not seen & keyed_ips, (
                f"{intruder.name} lists a keyed node: {[names[ip] for ip in seen & keyed_ips]}\n"
                f"{intruder.cluster_view().describe(names)}")
            assert data_plane(intruder)[0] == 0, f"{intruder.name} accepted frames: {health(intruder)}"
        node = keyed[served % len(keyed)]
        prompt = prompts[served % 2]
        got = greedy(node, model, prompt)
        assert got == expected[prompt], f"{node.name} answered {got!r} for {prompt!r}, single node {expected[prompt]!r}"
        served += 1
    print(f"\n{served} greedy requests served by the keyed cluster in {OBSERVE_S:.0f}+ s among intruders")

    # A data-plane call from the wrong-key node's namespace straight to a keyed data port.
    if shutil.which("curl"):
        stage = keyed[-1]
        before = data_plane(stage)
        for ticket, refusal in [(None, "no session ticket"), (secrets.token_bytes(64), "unknown or expired session ticket")]:
            call = grpc_call(wrong, f"{stage.ip}:{netns.DATA_PORT}", ticket)
            assert call.returncode == 0, f"curl from {wrong.name} failed ({call.returncode}): {call.stderr}"
            headers = call.stdout.lower()
            assert "grpc-status: 16" in headers, f"not refused UNAUTHENTICATED ({refusal}):\n{call.stdout}"
            deadline = time.monotonic() + 5.0
            while not [line for line in refusals_from(stage, wrong.ip, DATA_CALL_REFUSAL) if refusal in line]:
                assert time.monotonic() < deadline, (
                    f"{stage.name} did not log {DATA_CALL_REFUSAL!r} ({refusal}) from {wrong.ip}")
                time.sleep(0.1)
        assert data_plane(stage) == before, f"{stage.name}'s frame counters moved on refused calls"

    # Refusals logged: every keyed node refused both intruders' control connections (both
    # dial every keyed node found by mDNS, and the first by --peer too).
    missing = [f"{k.name} has no {CONTROL_REFUSAL!r} from {i.name} ({i.ip})"
               for k in keyed for i in intruders if not refusals_from(k, i.ip, CONTROL_REFUSAL)]
    assert not missing, "\n".join(missing)
    # The wrong-key node, private too, refuses the keyed nodes that dial it.
    assert any(refusals_from(wrong, k.ip, CONTROL_REFUSAL) for k in keyed), (
        f"{wrong.name} logged no refusal of a keyed node:\n{wrong.log_tail()}")

    # Still serving, same plan, intruders still alone and idle.
    for node in keyed:
        assert node.cluster_view().plan() == view.plan()
    assert greedy(keyed[0], model, prompts[0]) == expected[prompts[0]]
    for intruder in intruders:
        assert data_plane(intruder)[0] == 0, f"{intruder.name} accepted frames: {health(intruder)}"
        assert not {n.ip for n in intruder.cluster_view().nodes} & keyed_ips
