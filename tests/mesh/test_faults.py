"""Fault injection: faults during a streamed greedy generation on a 3-node mesh.

Run with ``python3 -m pytest tests/mesh/test_faults.py -q -s`` (as root; see conftest.py).

Every case starts a fresh cluster (``make_cluster``), streams one greedy request to a
node the case leaves alone, to get the fault-free reference on that very cluster, then
streams the same request again and injects the fault once ``FAULT_AFTER_CHUNKS`` chunks
have reached the client:

1-3. SIGKILL the first, the middle, the last stage;
4.   SIGKILL the coordinator (with three nodes it is always one of the stages: the case
     says which);
5.   unplug a node (its link goes down) and plug it back in after the request;
6.   50 ms of delay and 5 % loss on one link for the rest of the request (``tc netem``,
     or where the kernel has no sch_netem the harness's user-space relay, which does the
     same to every frame the node sends; skipped, loudly, only if neither is possible);
7.   a fourth node, with the model file, joins mid-request (its process starts just
     before the request; the case checks that the plan changed before the last chunk);
     and the same with no model file of its own (it fetches the model's header, then
     its stage's weights, from its peers), in an open and in a keyed cluster; alone,
     such a node keeps running and answers 503 until it has peers;
8.   memory limits where no node can hold the model alone but two can: two of three
     nodes die (the survivor answers a clear 503 ``cluster_unavailable``), one comes
     back (requests succeed again).

In 1-7 the client must get exactly the fault-free stream (the same chunks, finish
reason and token count), with no error, and no surviving node may restart. Each case
prints ``RECOVERY <case>: <s> s``: from the fault to the first chunk after the longest
wait for a chunk from the fault on, i.e. when the stream is flowing again (the line also
gives the time to the very next chunk, which may have been in flight already; for netem,
which slows the stream without stopping it, the figure is the time to the next chunk;
for the join, the fault is the moment the client's node reports the new plan). The
figures go into the end-of-session timings (conftest's ``record_timing``) and into a
summary printed when the module ends. The target is 2 s; only a sanity bound of 10 s is
asserted, since timing belongs in reports.
"""

from __future__ import annotations

import re
import signal
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import openai
import pytest
from harness import netns
from harness.netns import Cluster, ClusterView, Node
from test_mesh import N_LAYERS, Mesh, served_model_id, start_mesh, wait_until

MAX_TOKENS = 80
JOIN_MAX_TOKENS = 400
"""The join cases need a request that outlasts the ~1 s a join takes to become a plan, with
room to spare however fast this machine decodes (~2 s here at ~5 ms a token)."""
MIN_TOKENS = 64
"""Every reference stream must run at least this many tokens (no early end of text)."""
FAULT_AFTER_CHUNKS = 12
"""The fault comes once this many chunks have reached the client."""
RECOVERY_TARGET_S = 2.0
RECOVERY_SANITY_S = 10.0
STREAM_TIMEOUT_S = 60.0
"""The client's read timeout: a stall this long is an error the client sees."""
REPLAN_TIMEOUT_S = 15.0
LEAVE_TARGET_S = 2.0
"""An unplugged node should be out of the survivors' plan within about this long."""
FAULT_LIMITS = ("400MiB", "800MiB", "1200MiB")
"""As in test_mesh: 5/10/15 layers; any two nodes can hold the model at full context."""
TIGHT_LIMIT = "80MiB"
TIGHT_ARGS = ["--context", "512"]
"""Case 8: the model needs ~143 MiB at 512 tokens of context, so one node (80 MiB) cannot
hold it and two can."""

RECOVERIES: dict[str, float] = {}
"""``{case: seconds}`` for the summary at the end of the module."""


@pytest.fixture(scope="module", autouse=True)
def recovery_summary() -> Iterator[None]:
    """Print every case's recovery time when the module is done (shown with ``-s``; the
    same figures are in the end-of-session "mesh timings" either way)."""
    yield
    if RECOVERIES:
        width = max(len(name) for name in RECOVERIES)
        lines = [f"  {name:<{width}}  {seconds:6.2f} s{'' if seconds <= RECOVERY_TARGET_S else '  (over the 2 s target)'}"
                 for name, seconds in RECOVERIES.items()]
        print("\n==== fault injection: time from the fault to the stream flowing again (netem: to the next chunk) "
              "====\n" + "\n".join(lines))


# --- streaming with timestamps -----------------------------------------------------------


@dataclass(frozen=True)
class Chunk:
    """One choice of one streamed chunk, and when it reached the client."""

    at: float
    text: str
    finish_reason: str | None


@dataclass
class Stream:
    """A greedy streamed completion read on a thread with the official client, each chunk
    timestamped on arrival, so a fault can be injected while it runs."""

    node: Node
    model: str
    prompt: str
    max_tokens: int = MAX_TOKENS
    chunks: list[Chunk] = field(default_factory=list)
    completion_tokens: int | None = None
    error: BaseException | None = None
    started_at: float = 0.0
    ended_at: float | None = None
    _cond: threading.Condition = field(default_factory=threading.Condition, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    def start(self) -> Stream:
        self._thread = threading.Thread(target=self._read, name=f"stream-{self.node.name}", daemon=True)
        self.started_at = time.monotonic()
        self._thread.start()
        return self

    def _read(self) -> None:
        try:
            with openai.OpenAI(base_url=self.node.base_url, api_key="unused", max_retries=0,
                               timeout=STREAM_TIMEOUT_S) as client:
                with client.completions.create(model=self.model, prompt=self.prompt, max_tokens=self.max_tokens,
                                               temperature=0, stream=True,
                                               stream_options={"include_usage": True}) as chunks:
                    for chunk in chunks:
                        now = time.monotonic()
                        with self._cond:
                            for choice in chunk.choices:
                                self.chunks.append(Chunk(now, choice.text or "", choice.finish_reason))
                            if chunk.usage is not None:
                                self.completion_tokens = chunk.usage.completion_tokens
                            self._cond.notify_all()
        except BaseException as err:  # noqa: BLE001 - reported by finish()
            self.error = err
        finally:
            with self._cond:
                self.ended_at = time.monotonic()
                self._cond.notify_all()

    def wait_for(self, n_chunks: int, timeout_s: float = 30.0) -> int:
        """Wait until ``n_chunks`` chunks arrived (or the stream ended); how many did."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while len(self.chunks) < n_chunks and self.ended_at is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            return len(self.chunks)

    def finish(self, timeout_s: float = STREAM_TIMEOUT_S + 10) -> Stream:
        """Wait for the end of the stream; fail if it did not end or ended in an error."""
        assert self._thread is not None
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), f"the stream from {self.node.name} did not end in {timeout_s:.0f} s"
        if self.error is not None:
            detail = getattr(self.error, "body", None) or ""
            pytest.fail(f"the client got an error from {self.node.name} after {len(self.chunks)} chunks: "
                        f"{self.error!r} {detail}", pytrace=False)
        return self

    @property
    def text(self) -> str:
        return "".join(chunk.text for chunk in self.chunks)

    def signature(self) -> list[tuple[str, str | None]]:
        """What must be identical to the fault-free run: every chunk's text and finish reason."""
        return [(chunk.text, chunk.finish_reason) for chunk in self.chunks]

    def count_at(self, moment: float) -> int:
        """Chunks that had arrived by ``moment``."""
        with self._cond:
            return sum(1 for chunk in self.chunks if chunk.at <= moment)

    def interval_s(self) -> float:
        """The median time between chunks."""
        times = [chunk.at for chunk in self.chunks]
        gaps = [b - a for a, b in zip(times, times[1:])]
        return statistics.median(gaps) if gaps else 0.0


def stream(node: Node, model: str, prompt: str, max_tokens: int = MAX_TOKENS) -> Stream:
    """One whole streamed request (no fault), checked for errors."""
    return Stream(node, model, prompt, max_tokens).start().finish()


def reference_stream(node: Node, model: str, prompt: str, max_tokens: int = MAX_TOKENS) -> Stream:
    """The fault-free run on this cluster; long enough that the fault lands mid-stream."""
    ref = stream(node, model, prompt, max_tokens)
    assert ref.completion_tokens is not None and ref.completion_tokens >= MIN_TOKENS, (
        f"the reference for {prompt!r} ran {ref.completion_tokens} tokens, fewer than {MIN_TOKENS}: pick another prompt")
    assert ref.chunks[-1].finish_reason == "length", ref.chunks[-1]
    return ref


def assert_same_stream(got: Stream, ref: Stream, case: str) -> None:
    """The faulted stream is exactly the fault-free one."""
    assert got.text == ref.text, (
        f"{case}: the text differs from the fault-free run\n  got:      {got.text!r}\n  expected: {ref.text!r}")
    assert got.completion_tokens == ref.completion_tokens, (
        f"{case}: {got.completion_tokens} completion tokens, fault-free {ref.completion_tokens}")
    assert got.signature() == ref.signature(), (
        f"{case}: same text, but the chunks differ\n  got:      {got.signature()!r}\n  expected: {ref.signature()!r}")


# --- faults and what they must leave behind -----------------------------------------------


@dataclass(frozen=True)
class Recovery:
    next_chunk_s: float
    """From the fault to the very next chunk."""
    resumed_s: float
    """From the fault to the chunk that ended the longest wait after it."""
    longest_wait_s: float


def measure_recovery(got: Stream, fault_at: float) -> Recovery:
    after = [chunk.at for chunk in got.chunks if chunk.at > fault_at]
    assert after, (f"no chunk reached the client after the fault ({len(got.chunks)} chunks in all): "
                   "the stream ended first, so this case proved nothing")
    marks = [fault_at, *after]
    wait, ended = max((b - a, b) for a, b in zip(marks, marks[1:]))
    return Recovery(next_chunk_s=after[0] - fault_at, resumed_s=ended - fault_at, longest_wait_s=wait)


def report_recovery(case: str, got: Stream, ref: Stream, fault_at: float, note: str,
                    record_timing: Callable[[str, float], None], *, slowdown: bool = False) -> Recovery:
    """Print ``RECOVERY <case>: <s> s`` and record it; assert only the sanity bound.

    The figure is from the fault to the end of the longest wait for a chunk after it
    (the stream flowing again), except for a ``slowdown`` (netem), which stops nothing
    and slows everything: there it is the time to the next chunk.
    """
    rec = measure_recovery(got, fault_at)
    before = got.count_at(fault_at)
    figure = rec.next_chunk_s if slowdown else rec.resumed_s
    print(f"\nRECOVERY {case}: {figure:.2f} s  (next chunk after {rec.next_chunk_s:.2f} s, longest wait "
          f"{rec.longest_wait_s:.2f} s; fault after chunk {before} of {len(ref.chunks)}; fault-free chunk interval "
          f"{ref.interval_s() * 1000:.0f} ms; {note})", flush=True)
    RECOVERIES[case] = figure
    record_timing(f"RECOVERY {case} (fault -> {'next chunk' if slowdown else 'stream flowing again'})", figure)
    assert figure < RECOVERY_SANITY_S, f"{case}: {figure:.1f} s from the fault to the stream flowing again"
    assert rec.longest_wait_s < RECOVERY_SANITY_S, f"{case}: the client waited {rec.longest_wait_s:.1f} s for a chunk"
    return rec


def pids_of(nodes: list[Node]) -> dict[str, int | None]:
    return {node.name: node.pid for node in nodes}


def assert_still_running(nodes: list[Node], pids: dict[str, int | None], case: str) -> None:
    """Every node that was not the victim is the very process it was before the fault."""
    for node in nodes:
        assert node.is_running(), f"{case}: {node.name} exited (code {node.process and node.process.returncode}):\n{node.log_tail()}"
        assert node.pid == pids[node.name], f"{case}: {node.name} was restarted ({pids[node.name]} -> {node.pid})"


def assert_no_panic(cluster: Cluster) -> None:
    for node in cluster.nodes:
        try:
            log = node.log_path.read_text(errors="replace")
        except OSError:
            continue
        match = re.search(r"^.*panicked at.*$", log, re.MULTILINE)
        assert match is None, f"{node.name} panicked: {match.group(0) if match else ''}\n{node.log_tail()}"


def agreed_view(nodes: list[Node], case: str) -> ClusterView:
    """Every node's /v1/cluster right now: one epoch, one coordinator, one plan."""
    views = {node.name: node.cluster_view() for node in nodes}
    plans = {name: (view.epoch, view.coordinator, view.plan()) for name, view in views.items()}
    assert len(set(plans.values())) == 1, f"{case}: the nodes disagree on the plan: {plans}"
    return next(iter(views.values()))


def stage_position(view: ClusterView, ip: str) -> str:
    ips = [stage.ip for stage in view.stages]
    if ip not in ips:
        return "not a stage"
    position = ips.index(ip)
    return {0: "the first stage", len(ips) - 1: "the last stage"}.get(position, f"stage {position}")


def coordinator_node(mesh: Mesh) -> Node:
    entry = next(entry for entry in mesh.view.nodes if entry.id == mesh.view.coordinator)
    return mesh.cluster.node_at(entry.ip)


def fresh_mesh(make_cluster: Callable[[], Cluster], limits: tuple[str, ...] = FAULT_LIMITS,
               extra: list[str] | None = None) -> Mesh:
    cluster = make_cluster()
    try:
        return start_mesh(cluster, limits, extra_args=(lambda i, nodes: list(extra)) if extra else None)
    except netns.HarnessError as err:
        pytest.fail(f"the 3-node mesh did not form:\n{err}", pytrace=False)


# --- 1-4: SIGKILL mid-stream --------------------------------------------------------------


def sigkill_case(mesh: Mesh, victim: Node, client: Node, prompt: str, case: str,
                 record_timing: Callable[[str, float], None]) -> None:
    """SIGKILL ``victim`` mid-stream (the client on ``client``): exact stream, the
    survivors re-plan without it, and keep running."""
    assert victim is not client
    cluster = mesh.cluster
    model = served_model_id(client)
    was_coordinator = victim is coordinator_node(mesh)
    note = (f"{victim.name} was {stage_position(mesh.view, victim.ip)}"
            f"{' and the coordinator' if was_coordinator else ''}; client on {client.name} "
            f"({stage_position(mesh.view, client.ip)})")
    ref = reference_stream(client, model, prompt)

    survivors = [node for node in cluster.nodes if node is not victim]
    pids = pids_of(survivors)
    got = Stream(client, model, prompt).start()
    got.wait_for(FAULT_AFTER_CHUNKS)
    fault_at = time.monotonic()
    victim.kill(signal.SIGKILL)
    got.finish()

    assert_same_stream(got, ref, case)
    report_recovery(case, got, ref, fault_at, note, record_timing)
    assert_still_running(survivors, pids, case)
    try:
        view = cluster.wait_for_plan(survivors, n_layers=N_LAYERS, min_epoch=mesh.view.epoch,
                                     timeout_s=REPLAN_TIMEOUT_S)
    except netns.HarnessError as err:
        pytest.fail(f"{case}: the survivors did not agree on a new plan:\n{err}", pytrace=False)
    assert victim.ip not in [stage.ip for stage in view.stages]
    assert view.coordinator in {entry.id for entry in view.nodes if entry.ip != victim.ip}
    # And the next request on the new plan is still exact.
    assert_same_stream(stream(client, model, prompt), ref, f"{case}, next request")
    assert_no_panic(cluster)


def test_sigkill_first_stage_mid_stream(make_cluster: Callable[[], Cluster], prompts: list[str],
                                        record_timing: Callable[[str, float], None]) -> None:
    mesh = fresh_mesh(make_cluster)
    sigkill_case(mesh, victim=mesh.stage_node(0), client=mesh.stage_node(-1), prompt=prompts[1],
                 case="first-stage-sigkill", record_timing=record_timing)


def test_sigkill_middle_stage_mid_stream(make_cluster: Callable[[], Cluster], prompts: list[str],
                                         record_timing: Callable[[str, float], None]) -> None:
    mesh = fresh_mesh(make_cluster)
    sigkill_case(mesh, victim=mesh.stage_node(1), client=mesh.stage_node(0), prompt=prompts[3],
                 case="middle-stage-sigkill", record_timing=record_timing)


def test_sigkill_last_stage_mid_stream(make_cluster: Callable[[], Cluster], prompts: list[str],
                                       record_timing: Callable[[str, float], None]) -> None:
    mesh = fresh_mesh(make_cluster)
    sigkill_case(mesh, victim=mesh.stage_node(-1), client=mesh.stage_node(1), prompt=prompts[4],
                 case="last-stage-sigkill", record_timing=record_timing)


def test_sigkill_coordinator_mid_stream(make_cluster: Callable[[], Cluster], prompts: list[str],
                                        record_timing: Callable[[str, float], None]) -> None:
    """With three nodes the coordinator is always a stage; which one is printed."""
    mesh = fresh_mesh(make_cluster)
    victim = coordinator_node(mesh)
    client = next(mesh.stage_node(i) for i in (0, 1) if mesh.stage_node(i) is not victim)
    position = stage_position(mesh.view, victim.ip)
    print(f"\nthe coordinator {victim.name} is {position}")
    sigkill_case(mesh, victim=victim, client=client, prompt=prompts[0],
                 case=f"coordinator-sigkill ({position.removeprefix('the ')})", record_timing=record_timing)


# --- 5: a link goes down, and comes back ----------------------------------------------------


@pytest.mark.timeout(150)
def test_link_down_mid_stream_then_back(make_cluster: Callable[[], Cluster], prompts: list[str],
                                        record_timing: Callable[[str, float], None]) -> None:
    """The middle stage is unplugged mid-stream: it leaves the survivors' plan within
    ~2 s, the request finishes exactly; plugged back in, it rejoins and every node
    agrees on one plan (epoch and coordinator) that includes it, and it serves exactly."""
    case = "link-down"
    mesh = fresh_mesh(make_cluster)
    cluster = mesh.cluster
    victim, client = mesh.stage_node(1), mesh.stage_node(0)
    survivors = [node for node in cluster.nodes if node is not victim]
    model = served_model_id(client)
    prompt = prompts[4]
    ref = reference_stream(client, model, prompt)
    note = (f"{victim.name} ({stage_position(mesh.view, victim.ip)}"
            f"{', the coordinator' if victim is coordinator_node(mesh) else ''}) unplugged; client on {client.name}")

    pids = pids_of(cluster.nodes)
    got = Stream(client, model, prompt).start()
    got.wait_for(FAULT_AFTER_CHUNKS)
    fault_at = time.monotonic()
    victim.link_down()
    try:
        try:
            survivors_view = cluster.wait_for_plan(survivors, n_layers=N_LAYERS, min_epoch=mesh.view.epoch,
                                                   timeout_s=RECOVERY_SANITY_S)
        except netns.HarnessError as err:
            pytest.fail(f"{case}: the unplugged node never left the survivors' plan:\n{err}", pytrace=False)
        left_after = time.monotonic() - fault_at
        print(f"\n{case}: {victim.name} out of the survivors' plan {left_after:.2f} s after the link went down "
              f"(target ~{LEAVE_TARGET_S:.0f} s)")
        record_timing(f"{case}: unplugged node out of the plan", left_after)
        got.finish()
        assert_same_stream(got, ref, case)
        report_recovery(case, got, ref, fault_at, note, record_timing)
        assert_still_running(cluster.nodes, pids, case)  # the unplugged node too: it only lost its cable
        isolated = victim.cluster_view()
        print(f"{case}: the survivors' plan:\n{survivors_view.describe(cluster.names_by_ip())}\n"
              f"{case}: meanwhile the unplugged node sees:\n{isolated.describe(cluster.names_by_ip())}")
    finally:
        victim.link_up()
    plugged_at = time.monotonic()
    try:
        view = cluster.wait_for_plan(cluster.nodes, n_layers=N_LAYERS, min_epoch=survivors_view.epoch,
                                     timeout_s=30.0)
    except netns.HarnessError as err:
        pytest.fail(f"{case}: after link up the three nodes did not agree on one plan:\n{err}", pytrace=False)
    rejoined_after = time.monotonic() - plugged_at
    print(f"{case}: after link up, all three agree on one plan in {rejoined_after:.2f} s:\n"
          f"{view.describe(cluster.names_by_ip())}")
    record_timing(f"{case}: one plan for all three again after link up", rejoined_after)
    # Never two plans: they keep agreeing (polled for a second), and each serves the exact stream.
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        final = agreed_view(cluster.nodes, case)
        assert final.plan() == view.plan(), f"{case}: the plan changed again: {final.plan()} after {view.plan()}"
        time.sleep(0.1)
    assert final.ready and not final.problems([n.ip for n in cluster.nodes], N_LAYERS), final.describe()
    for node in (victim, client):
        assert_same_stream(stream(node, model, prompt), ref, f"{case}, after link up, on {node.name}")
    assert agreed_view(cluster.nodes, case).plan() == final.plan()
    assert_still_running(cluster.nodes, pids, case)
    assert_no_panic(cluster)


# --- 6: a slow, lossy link --------------------------------------------------------------------


@pytest.mark.timeout(150)
def test_netem_delay_and_loss_on_one_link(make_cluster: Callable[[], Cluster], prompts: list[str],
                                          record_timing: Callable[[str, float], None],
                                          pytestconfig: pytest.Config) -> None:
    """50 ms of delay and 5 % loss on everything the middle stage sends (its interface's
    egress: hidden states to the last stage, control traffic), from mid-stream to the
    end of the request."""
    case = "netem-50ms-5pct-loss"
    mesh = fresh_mesh(make_cluster)
    cluster = mesh.cluster
    victim, client = mesh.stage_node(1), mesh.stage_node(0)
    model = served_model_id(client)
    prompt = prompts[3]
    ref = reference_stream(client, model, prompt)
    note = f"on the link of {victim.name} ({stage_position(mesh.view, victim.ip)}); client on {client.name}"

    pids = pids_of(cluster.nodes)
    got = Stream(client, model, prompt).start()
    got.wait_for(FAULT_AFTER_CHUNKS)
    fault_at = time.monotonic()
    try:
        how = victim.netem(delay_ms=50, loss_pct=5)
        note += f"; impaired by {how}"
    except netns.NetemUnavailable as err:
        got.finish()
        capture = pytestconfig.pluginmanager.getplugin("capturemanager")
        with capture.global_and_fixture_disabled():
            print(f"\nSKIPPED {case}: {err}", flush=True)
        pytest.skip(f"{case}: {err}")
    try:
        got.finish()
    finally:
        victim.clear_netem()
    took = (got.ended_at or 0) - got.started_at
    assert_same_stream(got, ref, case)
    rec = report_recovery(case, got, ref, fault_at, note, record_timing, slowdown=True)
    end_view = agreed_view(cluster.nodes, case) if all(n.is_running() for n in cluster.nodes) else None
    print(f"{case}: the request took {took:.2f} s (fault-free {(ref.ended_at or 0) - ref.started_at:.2f} s); "
          f"longest wait {rec.longest_wait_s:.2f} s; plan epoch {mesh.view.epoch} -> "
          f"{end_view.epoch if end_view else '?'}")
    assert_still_running(cluster.nodes, pids, case)
    assert_no_panic(cluster)


# --- 7: a fourth node joins mid-request ------------------------------------------------------


def join_case(mesh: Mesh, newcomer: Node, prompt: str, case: str,
              record_timing: Callable[[str, float], None]) -> None:
    """``newcomer`` joins while a request streams: the stream is exact, then the 4-node
    plan is ready and serves exactly, on the newcomer too.

    Its process starts just before the request (its API answers a moment before it
    joins the membership), so the join, and the re-plan ~1 s later, land mid-request;
    the client's node is watched for the new epoch, and the case fails as inconclusive
    if the plan did not change before the last chunk. Recovery is measured from the
    moment the client's node reported the new plan.
    """
    cluster = mesh.cluster
    old = [node for node in cluster.nodes if node is not newcomer]
    client = mesh.stage_node(0)
    model = served_model_id(client)
    ref = reference_stream(client, model, prompt, JOIN_MAX_TOKENS)

    pids = pids_of(old)
    process_started = time.monotonic()
    cluster.start_nodes([newcomer])
    newcomer.wait_api()
    got = Stream(client, model, prompt, JOIN_MAX_TOKENS).start()
    changed_at: float | None = None
    while got.ended_at is None:
        if changed_at is None:
            try:
                if client.cluster_view(timeout=2.0).epoch > mesh.view.epoch:
                    changed_at = time.monotonic()
            except (OSError, ValueError):
                pass
        time.sleep(0.02)
    got.finish()
    assert_same_stream(got, ref, case)
    last_chunk_at = got.chunks[-1].at
    assert changed_at is not None and changed_at < last_chunk_at, (
        f"{case}: the plan did not change while the request streamed (it ran {last_chunk_at - got.started_at:.2f} s; "
        f"new epoch seen {'never' if changed_at is None else f'{changed_at - got.started_at:.2f} s'} after it "
        "started): the join did not happen mid-request, so this case proved nothing")
    report_recovery(case, got, ref, changed_at,
                    f"the new plan reached {client.name} {changed_at - got.started_at:.2f} s into the request, "
                    f"{changed_at - process_started:.2f} s after the newcomer's process started", record_timing)
    try:
        view = cluster.wait_for_plan(cluster.nodes, n_layers=N_LAYERS, min_epoch=mesh.view.epoch, timeout_s=30.0)
    except netns.HarnessError as err:
        pytest.fail(f"{case}: no ready 4-node plan after the join:\n{err}", pytrace=False)
    planned_after = time.monotonic() - process_started
    print(f"{case}: 4-node plan ready {planned_after:.2f} s after the newcomer's process started:\n"
          f"{view.describe(cluster.names_by_ip())}")
    record_timing(f"{case}: 4-node plan ready, from starting the newcomer", planned_after)
    assert_still_running(old, pids, case)
    for node in (client, newcomer):
        assert_same_stream(stream(node, model, prompt, JOIN_MAX_TOKENS), ref,
                           f"{case}, on the 4-node plan, on {node.name}")
    assert_no_panic(cluster)


@pytest.mark.timeout(150)
def test_fourth_node_with_model_joins_mid_request(make_cluster: Callable[[], Cluster], prompts: list[str],
                                                  record_timing: Callable[[str, float], None]) -> None:
    mesh = fresh_mesh(make_cluster)
    newcomer = mesh.cluster.add_node(memory_limit="800MiB", start=False)  # namespace ready, process not yet
    join_case(mesh, newcomer, prompts[1], "join-with-model", record_timing)


@pytest.mark.timeout(150)
@pytest.mark.parametrize("keyed", [False, True], ids=["open", "cluster-key"])
def test_fourth_node_without_model_joins_mid_request(make_cluster: Callable[[], Cluster], prompts: list[str],
                                                     record_timing: Callable[[str, float], None],
                                                     hearth_binary: Path, tmp_path: Path, keyed: bool) -> None:
    """The newcomer has no model file and no way to download one: an empty model cache
    (``HEARTH_CACHE_DIR``), the default model spec, and pip barred from any index
    (``PIP_NO_INDEX=1``), so its only source for its stage's weights is its peers
    (``Pipeline.FetchWeights``). It must join, get its layers from them and serve; in a
    private cluster too, where fetching weights takes a session ticket like any
    data plane call."""
    key_args: list[str] = []
    if keyed:
        key = tmp_path / "cluster.key"
        made = subprocess.run([str(hearth_binary), "key", "new", "--out", str(key)], capture_output=True, text=True,
                              timeout=30, check=False)
        assert made.returncode == 0, f"`hearth key new` failed: {made.stderr}"
        key_args = ["--cluster-key-file", str(key)]
    mesh = fresh_mesh(make_cluster, extra=key_args or None)
    cache = tmp_path / "empty-model-cache"
    cache.mkdir()
    newcomer = mesh.cluster.add_node(start=False)
    newcomer.command = ["env", f"HEARTH_CACHE_DIR={cache}", "PIP_NO_INDEX=1", "PIP_FIND_LINKS=",
                        str(hearth_binary), "serve", "--model", "default", "--data-dir", str(newcomer.data_dir),
                        "--memory-limit", "800MiB", *key_args]
    newcomer.memory_limit = "800MiB"
    case = "join-without-model" + (" (cluster key)" if keyed else "")
    join_case(mesh, newcomer, prompts[1], case, record_timing)
    fetched = re.findall(r"fetched the stage's weights from peers.*", newcomer.log_path.read_text(errors="replace"))
    assert fetched, f"{case}: the newcomer's log says nothing of fetching its weights:\n{newcomer.log_tail()}"
    print(f"{case}: {fetched[-1]}")


SLOW_FETCH_RATE = "8mbit"


@pytest.mark.timeout(300)
def test_a_drop_while_a_newcomer_fetches_slowly_is_replanned_at_once(
    make_cluster: Callable[[], Cluster], prompts: list[str], record_timing: Callable[[str, float], None],
    hearth_binary: Path, tmp_path: Path,
) -> None:
    """A newcomer with no model file fetches its weights over a slow link (what its peers
    send it capped at 8 Mbit/s: tens of seconds for its layers). A node of the plan in force
    is killed meanwhile. The survivors re-plan among themselves and serve again within
    seconds, exactly, without waiting for the newcomer (whose loading runs on a task of its
    own, so it follows the cluster meanwhile, even when it is the coordinator); then the
    newcomer, once it has its layers, is planned in and serves exactly too."""
    case = "drop-during-slow-fetch"
    mesh = fresh_mesh(make_cluster)
    cluster = mesh.cluster
    client, victim = mesh.stage_node(0), mesh.stage_node(-1)
    model = served_model_id(client)
    prompt = prompts[2]
    ref = reference_stream(client, model, prompt)

    cache = tmp_path / "empty-model-cache"
    cache.mkdir()
    newcomer = cluster.add_node(start=False)
    newcomer.command = ["env", f"HEARTH_CACHE_DIR={cache}", "PIP_NO_INDEX=1", "PIP_FIND_LINKS=",
                        str(hearth_binary), "serve", "--model", "default", "--data-dir", str(newcomer.data_dir),
                        "--memory-limit", "800MiB"]
    newcomer.memory_limit = "800MiB"
    # The bridge's port to the newcomer carries what its peers send it.
    netns.limit_rate(cluster.hub_netns, newcomer.hub_port, SLOW_FETCH_RATE)
    cluster.start_nodes([newcomer])

    def log() -> str:
        return newcomer.log_path.read_text(errors="replace")

    assert wait_until(lambda: "got the model's header" in log(), timeout_s=60.0) is not None, (
        f"{case}: the newcomer never got the model's header:\n{newcomer.log_tail()}")
    assert "fetched the stage's weights" not in log(), f"{case}: the fetch was not slow enough to prove anything"
    survivors = [node for node in cluster.nodes if node is not victim and node is not newcomer]
    pids = pids_of(survivors)
    killed_at = time.monotonic()
    victim.kill(signal.SIGKILL)

    def serves() -> bool:
        try:
            answer = client.http("POST", "/v1/completions", timeout=10.0,
                                 json={"model": model, "prompt": prompt, "max_tokens": 4, "temperature": 0})
        except OSError:
            return False
        return answer.status == 200

    assert wait_until(serves, timeout_s=REPLAN_TIMEOUT_S, interval_s=0.1) is not None, (
        f"{case}: the survivors did not serve again within {REPLAN_TIMEOUT_S:.0f} s of the kill:\n"
        f"{cluster.views()}\n{client.log_tail()}")
    back_after = time.monotonic() - killed_at
    fetching = "fetched the stage's weights" not in log()
    print(f"\n{case}: the survivors served again {back_after:.2f} s after the kill; the newcomer was "
          f"{'still fetching' if fetching else 'done fetching'} then")
    record_timing(f"{case}: survivors serve again after the kill", back_after)
    assert fetching, f"{case}: the newcomer finished fetching before the survivors served: inconclusive"
    assert_same_stream(stream(client, model, prompt), ref, f"{case}, on the survivors' plan")
    assert_still_running(survivors, pids, case)

    # Then the newcomer comes in, once it has its layers.
    try:
        view = cluster.wait_for_plan([*survivors, newcomer], n_layers=N_LAYERS, min_epoch=mesh.view.epoch + 1,
                                     timeout_s=200.0)
    except netns.HarnessError as err:
        pytest.fail(f"{case}: the newcomer was not planned in:\n{err}\n{newcomer.log_tail()}", pytrace=False)
    joined_after = time.monotonic() - killed_at
    print(f"{case}: planned in {joined_after:.1f} s after the kill:\n{view.describe(cluster.names_by_ip())}")
    assert newcomer.ip in [stage.ip for stage in view.stages]
    for node in (client, newcomer):
        assert_same_stream(stream(node, model, prompt), ref, f"{case}, with the newcomer, on {node.name}")
    assert_no_panic(cluster)


def test_a_node_without_model_or_peers_waits_answering_503(make_cluster: Callable[[], Cluster],
                                                             hearth_binary: Path, tmp_path: Path) -> None:
    """Alone, a node with no model file and no way to download one keeps running, and its
    API says why it cannot serve yet: 503 everywhere, naming what it waits for."""
    cache = tmp_path / "empty-model-cache"
    cache.mkdir()
    cluster = make_cluster()
    node = cluster.add_node(start=False)
    node.command = ["env", f"HEARTH_CACHE_DIR={cache}", "PIP_NO_INDEX=1", "PIP_FIND_LINKS=",
                    str(hearth_binary), "serve", "--model", "default", "--data-dir", str(node.data_dir)]
    cluster.start_nodes([node])
    node.wait_api()
    health = node.http("GET", "/health", timeout=10.0)
    assert health.status == 503 and health.json()["model"] is None, health.text
    for method, path, body in [("GET", "/v1/models", None),
                               ("POST", "/v1/completions", {"model": "x", "prompt": "Hi", "max_tokens": 4})]:
        answer = node.http(method, path, json=body, timeout=10.0)
        assert answer.status == 503, f"{method} {path}: {answer.status} {answer.text}"
        assert answer.json()["error"]["code"] == "model_unavailable", answer.text
    time.sleep(2.5)  # a few rounds of looking for peers
    node.ensure_running()
    assert_no_panic(cluster)


# --- 8: not enough memory left, then enough again -------------------------------------------


@pytest.mark.timeout(150)
def test_too_few_nodes_for_the_model_answer_503_until_one_returns(
    make_cluster: Callable[[], Cluster], prompts: list[str], record_timing: Callable[[str, float], None],
) -> None:
    """80 MiB each at 512 tokens of context: three or two nodes hold the model, one
    cannot. Kill two: the survivor keeps running and answers a clear 503; start one of
    them again: requests succeed again (exactly as before the faults)."""
    case = "capacity"
    mesh = fresh_mesh(make_cluster, (TIGHT_LIMIT,) * 3, TIGHT_ARGS)
    cluster = mesh.cluster
    print(f"\n{case}: three nodes at {TIGHT_LIMIT}, {' '.join(TIGHT_ARGS)}:\n{mesh.view.describe(cluster.names_by_ip())}")
    survivor, first_victim, second_victim = mesh.stage_node(0), mesh.stage_node(1), mesh.stage_node(2)
    model = served_model_id(survivor)
    prompt = prompts[3]
    ref = reference_stream(survivor, model, prompt)
    pid = survivor.pid

    # Two of three: still enough.
    first_victim.kill(signal.SIGKILL)
    try:
        two = cluster.wait_for_plan([survivor, second_victim], n_layers=N_LAYERS, min_epoch=mesh.view.epoch,
                                    timeout_s=REPLAN_TIMEOUT_S)
    except netns.HarnessError as err:
        pytest.fail(f"{case}: two nodes at {TIGHT_LIMIT} should hold the model:\n{err}", pytrace=False)
    assert_same_stream(stream(survivor, model, prompt), ref, f"{case}, two nodes left")

    # One: not enough. The survivor says so, clearly, and keeps running.
    killed_at = time.monotonic()
    second_victim.kill(signal.SIGKILL)

    def problem() -> str | None:
        value = survivor.cluster_view().raw.get("problem")
        return str(value) if value else None

    said = wait_until(lambda: problem() is not None, timeout_s=REPLAN_TIMEOUT_S)
    assert said is not None, f"{case}: one node left, yet /v1/cluster reports no problem: {survivor.cluster_view().raw}"
    print(f"{case}: {time.monotonic() - killed_at:.2f} s after the second kill the survivor reports: {problem()}")
    with openai.OpenAI(base_url=survivor.base_url, api_key="unused", max_retries=0, timeout=30.0) as client:
        with pytest.raises(openai.APIStatusError) as refused:
            with client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                           stream=True) as chunks:
                for _ in chunks:
                    pass
    error = refused.value
    body = error.body if isinstance(error.body, dict) else {}
    inner = body.get("error", body) if isinstance(body, dict) else {}
    message = str(inner.get("message", ""))
    print(f"{case}: with one node left the client gets {error.status_code}: {inner}")
    assert error.status_code == 503, f"expected 503, got {error.status_code}: {body}"
    assert inner.get("code") == "cluster_unavailable", inner
    amounts = [float(x) for x in re.findall(r"(\d+(?:\.\d+)?) ?MiB", message)]
    assert len(amounts) >= 2 and max(amounts) > min(amounts), (
        f"the 503 should say how much memory the model needs and how much the nodes offer: {message!r}")
    assert "80.0 MiB" in message or "80 MiB" in message, f"the survivor's 80 MiB is not mentioned: {message!r}"
    health = survivor.http("GET", "/health")
    assert health.status == 503, f"/health with one node left: {health.status} {health.text}"
    assert survivor.is_running() and survivor.pid == pid, f"the survivor exited or restarted:\n{survivor.log_tail()}"

    # One comes back: enough again.
    second_victim.start()
    restarted_at = time.monotonic()
    second_victim.wait_api()

    attempts: list[str] = []

    def serves() -> bool:
        started = time.monotonic()
        try:
            result = survivor.http("POST", "/v1/completions", timeout=10.0,
                                   json={"model": model, "prompt": prompt, "max_tokens": 4, "temperature": 0})
        except OSError as err:
            attempts.append(f"{err!r} after {time.monotonic() - started:.1f} s")
            return False
        attempts.append(f"{result.status} after {time.monotonic() - started:.1f} s: {result.text[:200]}")
        return result.status == 200

    back = wait_until(serves, timeout_s=30.0, interval_s=0.2)
    views = cluster.views([survivor, second_victim])
    detail = "\n".join(f"{name}: {v.describe(cluster.names_by_ip()) if isinstance(v, ClusterView) else v}"
                       f"\n  problem: {v.raw.get('problem') if isinstance(v, ClusterView) else ''}"
                       for name, v in views.items())
    if back is None:
        pytest.fail(f"{case}: 30 s after {second_victim.name} came back, requests to {survivor.name} still fail; "
                    "the last attempts:\n  " + "\n  ".join(attempts[-5:]) + f"\nviews:\n{detail}\n"
                    f"{survivor.name} log:\n{survivor.log_tail(15)}\n{second_victim.name} log:\n"
                    f"{second_victim.log_tail(15)}", pytrace=False)
    served_after = time.monotonic() - restarted_at
    print(f"{case}: requests succeed again {served_after:.2f} s after restarting {second_victim.name}")
    record_timing(f"{case}: requests succeed again, from restarting a node", served_after)
    view = cluster.wait_for_plan([survivor, second_victim], n_layers=N_LAYERS, timeout_s=REPLAN_TIMEOUT_S)
    assert not survivor.cluster_view().raw.get("problem"), survivor.cluster_view().raw
    for node in (survivor, second_victim):
        assert_same_stream(stream(node, model, prompt), ref, f"{case}, after the restart, on {node.name}")
    assert view.epoch >= two.epoch
    assert survivor.is_running() and survivor.pid == pid
    assert_no_panic(cluster)
