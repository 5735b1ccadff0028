"""A multi-host test harness for Hearth on Linux network namespaces.

Each :class:`Node` is a network namespace with its own IPv4 address and one ``hearth
serve`` process in it; a :class:`Cluster` joins its nodes on one Linux bridge, the
stand-in for a Thunderbolt bridge or a home switch. Everything is real: real
processes, real sockets, real multicast (mDNS works between the namespaces).

Layout of a cluster (``<run>`` is ``<pid>-<serial>``, unique per cluster)::

    namespace hth-<run>-hub        bridge hthbr<pid>, ports p0, p1, ...
        p<i>  <== veth ==>  eth0   namespace hth-<run>-<i>   10.213.X.(i+1)/24, lo up,
                                                             default via 10.213.X.254

The bridge lives in a namespace of its own, so the root namespace gets no interface
and no address at all, and deleting the namespaces deletes every veth and the bridge
with them. The default gateway is an address nobody holds: nothing leaves the bridge.
Multicast snooping is off, so the bridge floods multicast like a plain switch;
:meth:`Cluster.block_multicast` stops that flooding on every port (mDNS then never
reaches another node, while unicast and ARP still work).

Reaching a node's API from the test process: every node gets a TCP forwarder on the
root namespace's loopback (``node.api_url``, ``node.base_url``) whose connections
are opened *inside* the node's namespace, to its ``127.0.0.1:5280``. So the official
``openai`` client works in-process, and :meth:`Node.http` is plain ``http.client``.
To run something inside a namespace instead, use :meth:`Node.run` or
:meth:`Node.python` (``ip netns exec``).

Cleanup: nodes are started in their own sessions (``start_new_session=True``) and,
when ``setpriv`` exists and they are started from the main thread, with a parent-death
signal, so they die with the harness. :meth:`Cluster.close` (the context manager's
exit) stops the process groups, kills anything left in the namespaces and deletes
them; it also runs from ``atexit`` and from SIGTERM/SIGINT/SIGHUP handlers. Names
carry the harness's pid, and every new cluster first removes leftovers of crashed
runs whose pid is dead.

Requirements: Linux, root, iproute2 (``ip``; ``tc`` for :meth:`Node.netem`, which uses
the kernel's ``sch_netem`` or, without it, a user-space relay (``relay.py``) that also
needs ``ethtool``; ``tc``'s ``tbf`` for slow links). :func:`preflight` says whether they
are met. The harness installs nothing and needs nothing beyond the standard library.
"""

from __future__ import annotations

import atexit
import ctypes
import http.client
import ipaddress
import json as jsonlib
import os
import re
import secrets
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

__all__ = [
    "API_PORT",
    "CONTROL_PORT",
    "DATA_PORT",
    "Cluster",
    "ClusterView",
    "HarnessError",
    "HttpResult",
    "NetemUnavailable",
    "Node",
    "NodeExited",
    "PlanEntry",
    "PlanTimeout",
    "call_in_netns",
    "cleanup_stale",
    "find_binary",
    "live_clusters",
    "multicast_reaches",
    "preflight",
    "resolve_model",
    "serve_flags",
]

PREFIX = "hth"
"""Every namespace this harness creates is named ``hth-<pid>-...``."""

DEFAULT_BINARY = Path("/root/.cache/hearth-target/release/hearth")
API_PORT = 5280
CONTROL_PORT = 5281
DATA_PORT = 5282
NODE_IFACE = "eth0"
"""The node side of each veth. Not ``veth*``: Hearth skips such interfaces as container plumbing."""

MDNS_GROUP = "224.0.0.251"
MDNS_PORT = 5353

STOP_GRACE_S = 5.0
POLL_INTERVAL_S = 0.05
COMMAND_TIMEOUT_S = 30.0
REQUEST_TIMEOUT_S = 60.0
LOG_TAIL_LINES = 40

_CLONE_NEWNET = 0x40000000
_NETNS_DIR = Path("/run/netns")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_STALE_NETNS = re.compile(rf"^{PREFIX}-(\d+)-")
_STALE_LINK = re.compile(rf"^{PREFIX}(?:br)?(\d+)")

T = TypeVar("T")


class HarnessError(RuntimeError):
    """Setting up, driving or tearing down the namespaces failed."""


class NetemUnavailable(HarnessError):
    """``tc qdisc ... netem`` is not possible here (no ``tc``, or a kernel without sch_netem)."""


class NodeExited(HarnessError):
    """A node's process exited when it should be running."""


class PlanTimeout(HarnessError):
    """The nodes did not agree on the expected plan in time."""


# --- commands -------------------------------------------------------------------------


def _run(argv: Sequence[str], *, check: bool = True, timeout: float = COMMAND_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    """Run a command, capturing its output; raise :class:`HarnessError` on failure if ``check``."""
    try:
        result = subprocess.run(
            list(argv), check=False, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        raise HarnessError(f"`{' '.join(argv)}` failed: {err}") from err
    if check and result.returncode != 0:
        detail = (result.stderr or result.stdout).strip()
        raise HarnessError(f"`{' '.join(argv)}` exited with {result.returncode}: {detail}")
    return result


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def netns_list() -> list[str]:
    """Names of the named network namespaces (``ip netns list``)."""
    out = _run(["ip", "netns", "list"], check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def netns_pids(netns: str) -> list[int]:
    """Pids of the processes inside a namespace (``ip netns pids``)."""
    out = _run(["ip", "netns", "pids", netns], check=False).stdout
    return [int(word) for word in out.split() if word.isdigit()]


def _delete_netns(netns: str) -> None:
    """Kill whatever still runs in a namespace, then delete it (its veths and bridge go with it)."""
    for pid in netns_pids(netns):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    _run(["ip", "netns", "del", netns], check=False)


def cleanup_stale() -> list[str]:
    """Remove namespaces (and root-namespace links) left by harness runs whose pid is dead.

    Returns what was removed.
    """
    removed = []
    for name in netns_list():
        match = _STALE_NETNS.match(name)
        if match and not _pid_alive(int(match.group(1))):
            _delete_netns(name)
            removed.append(name)
    links = _run(["ip", "-o", "link", "show"], check=False).stdout
    for line in links.splitlines():
        parts = line.split(":", 2)
        if len(parts) < 2:
            continue
        name = parts[1].strip().split("@")[0]
        match = _STALE_LINK.match(name)
        if match and not _pid_alive(int(match.group(1))):
            _run(["ip", "link", "del", name], check=False)
            removed.append(name)
    return removed


def preflight() -> str | None:
    """Why namespace tests cannot run here, or ``None`` if they can.

    Checks for root and ``ip``, then really creates a namespace, a bridge and a veth.
    """
    if sys.platform != "linux":
        return f"needs Linux, this is {sys.platform}"
    if os.geteuid() != 0:
        return f"running as euid {os.geteuid()}, not root"
    if shutil.which("ip") is None:
        return "`ip` from iproute2 is not installed"
    probe = f"{PREFIX}-{os.getpid()}-preflight"
    try:
        _run(["ip", "netns", "add", probe])
        _run(["ip", "-n", probe, "link", "add", "pbr", "type", "bridge"])
        _run(["ip", "-n", probe, "link", "add", "pa", "type", "veth", "peer", "name", "pb"])
        _run(["ip", "-n", probe, "link", "set", "pa", "master", "pbr"])
        call_in_netns(probe, lambda: None)
    except HarnessError as err:
        return f"cannot create network namespaces, bridges and veths: {err}"
    finally:
        _run(["ip", "netns", "del", probe], check=False)
    return None


# --- the hearth binary ------------------------------------------------------------------


def find_binary() -> Path:
    """The hearth binary: ``$HEARTH_BIN``, else ``/root/.cache/hearth-target/release/hearth``,
    else ``$CARGO_TARGET_DIR/release/hearth``. Raises :class:`HarnessError` if none exists."""
    explicit = os.environ.get("HEARTH_BIN")
    candidates = [Path(explicit)] if explicit else [DEFAULT_BINARY]
    if not explicit and os.environ.get("CARGO_TARGET_DIR"):
        candidates.append(Path(os.environ["CARGO_TARGET_DIR"]) / "release" / "hearth")
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    looked = ", ".join(str(c) for c in candidates)
    raise HarnessError(
        f"hearth binary not found (looked at {looked}); build it with `cargo build --release` "
        "or set HEARTH_BIN"
    )


def resolve_model(binary: Path) -> str:
    """The model to serve: ``$HEARTH_MODEL``, else the path ``hearth pull --model default`` prints."""
    explicit = os.environ.get("HEARTH_MODEL")
    if explicit:
        return explicit
    result = _run([str(binary), "pull", "--model", "default"], timeout=600)
    lines = [line.strip() for line in result.stdout.splitlines() if line.strip()]
    if not lines:
        raise HarnessError(f"`{binary} pull --model default` printed no path; stderr: {result.stderr[-500:]}")
    return lines[-1]


def serve_flags(binary: Path) -> set[str]:
    """The long options ``hearth serve --help`` lists (``{"--peer", "--memory-limit", ...}``)."""
    result = _run([str(binary), "serve", "--help"])
    return set(re.findall(r"(--[a-z][a-z0-9-]*)", result.stdout))


# --- entering namespaces from this process -----------------------------------------------


def _enter_netns(netns: str) -> None:
    """Move the *calling thread* into a named network namespace (setns(2) is per thread)."""
    fd = os.open(_NETNS_DIR / netns, os.O_RDONLY | os.O_CLOEXEC)
    try:
        setns = getattr(os, "setns", None)  # Python 3.12+
        if setns is not None:
            setns(fd, _CLONE_NEWNET)
            return
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"setns({netns}): {os.strerror(errno)}")
    finally:
        os.close(fd)


def call_in_netns(netns: str, fn: Callable[..., T], *args: Any) -> T:
    """Call ``fn(*args)`` on a fresh thread inside ``netns`` and return its result.

    Sockets created there stay in that namespace for their whole life, whichever thread
    uses them afterwards, which is how the harness talks to nodes without subprocesses.
    """
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            _enter_netns(netns)
            outcome["value"] = fn(*args)
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller
            outcome["error"] = err

    thread = threading.Thread(target=target, name=f"in-{netns}", daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        error = outcome["error"]
        if isinstance(error, OSError):
            raise HarnessError(f"in namespace {netns}: {error}") from error
        raise error
    return outcome["value"]


class _Forwarder:
    """Forwards TCP connections from ``127.0.0.1:<port>`` here to ``host:port`` inside a namespace."""

    def __init__(self, netns: str, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.netns = netns
        self.target = (target_host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        threading.Thread(target=self._accept_loop, name=f"fwd-{netns}", daemon=True).start()

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), name=f"fwd-{self.netns}-conn", daemon=True).start()

    def _track(self, sock: socket.socket, add: bool) -> None:
        with self._lock:
            (self._open.add if add else self._open.discard)(sock)

    def _serve(self, client: socket.socket) -> None:
        upstream: socket.socket | None = None
        self._track(client, True)
        try:
            try:
                _enter_netns(self.netns)
                upstream = socket.create_connection(self.target, timeout=5.0)
            except OSError:
                # Refused or namespace gone: reset the client's connection, as a refusal would.
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                return
            upstream.settimeout(None)
            self._track(upstream, True)
            self._relay(client, upstream)
        finally:
            for sock in (client, upstream):
                if sock is not None:
                    self._track(sock, False)
                    sock.close()

    @staticmethod
    def _relay(a: socket.socket, b: socket.socket) -> None:
        """Copy bytes both ways until both sides have finished (or one breaks)."""
        peer = {a: b, b: a}
        open_reads = {a, b}
        with selectors.DefaultSelector() as sel:
            for sock in open_reads:
                sel.register(sock, selectors.EVENT_READ)
            while open_reads:
                for key, _ in sel.select():
                    src: socket.socket = key.fileobj  # type: ignore[assignment]
                    try:
                        data = src.recv(65536)
                    except OSError:
                        data = None
                    if data:
                        try:
                            peer[src].sendall(data)
                            continue
                        except OSError:
                            data = None
                    if data is None:  # reset: pass it on
                        peer[src].setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        return
                    sel.unregister(src)  # clean end of stream
                    open_reads.discard(src)
                    try:
                        peer[src].shutdown(socket.SHUT_WR)
                    except OSError:
                        pass

    def close(self) -> None:
        self._closed.set()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        except OSError:
            pass
        self._listener.close()
        with self._lock:
            for sock in list(self._open):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


# --- multicast probe ----------------------------------------------------------------------


def _mdns_receiver(group: str, port: int, iface_ip: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("0.0.0.0", port))
    membership = socket.inet_aton(group) + socket.inet_aton(iface_ip)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, membership)
    return sock


def _mdns_sender(iface_ip: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(iface_ip))
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 255)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 0)
    return sock


def multicast_reaches(
    sender: Node, receiver: Node, *, group: str = MDNS_GROUP, port: int = MDNS_PORT, timeout_s: float = 1.5
) -> bool:
    """Whether a datagram multicast to ``group:port`` from ``sender`` arrives at ``receiver``.

    The datagram is an empty mDNS response (a DNS header with a random id and no
    records), so mDNS daemons already listening just ignore it. It is resent every
    100 ms until it arrives or ``timeout_s`` passes.
    """
    query_id = secrets.randbits(16)
    payload = struct.pack("!HHHHHH", query_id, 0x8400, 0, 0, 0, 0)
    rx = call_in_netns(receiver.netns, _mdns_receiver, group, port, receiver.ip)
    tx = call_in_netns(sender.netns, _mdns_sender, sender.ip)
    try:
        rx.setblocking(False)
        deadline = time.monotonic() + timeout_s
        with selectors.DefaultSelector() as sel:
            sel.register(rx, selectors.EVENT_READ)
            while time.monotonic() < deadline:
                tx.sendto(payload, (group, port))
                resend_at = min(deadline, time.monotonic() + 0.1)
                while (remaining := resend_at - time.monotonic()) > 0 and sel.select(remaining):
                    data, (src, _) = rx.recvfrom(9000)
                    if data == payload and src == sender.ip:
                        return True
        return False
    finally:
        rx.close()
        tx.close()


# --- the cluster API's view --------------------------------------------------------------


@dataclass(frozen=True)
class PlanEntry:
    """One node of ``GET /v1/cluster``'s ``nodes``."""

    id: str
    addr: str
    usable_memory_bytes: int
    layers: tuple[int, int] | None

    @property
    def ip(self) -> str:
        """The host part of ``addr``."""
        return self.addr.rsplit(":", 1)[0].strip("[]")

    @property
    def layer_count(self) -> int:
        return 0 if self.layers is None else self.layers[1] - self.layers[0]


@dataclass(frozen=True)
class ClusterView:
    """One node's answer to ``GET /v1/cluster``."""

    epoch: int
    coordinator: str
    ready: bool
    nodes: tuple[PlanEntry, ...]
    raw: dict[str, Any] = field(compare=False, repr=False)

    @classmethod
    def parse(cls, body: Any) -> ClusterView:
        """Parse and type-check a ``/v1/cluster`` body; raises ``ValueError`` if malformed."""
        if not isinstance(body, dict):
            raise ValueError(f"/v1/cluster is not a JSON object: {body!r}")
        try:
            entries = []
            for node in body["nodes"]:
                layers = node.get("layers")
                span = None
                if layers:  # absent, null or [] means: not in the plan
                    start, end = (int(x) for x in layers)
                    span = (start, end) if end > start else None
                entries.append(PlanEntry(
                    id=str(node["id"]),
                    addr=str(node["addr"]),
                    usable_memory_bytes=int(node.get("usable_memory_bytes") or 0),
                    layers=span,
                ))
            return cls(epoch=int(body["epoch"]), coordinator=str(body["coordinator"]),
                       ready=bool(body["ready"]), nodes=tuple(entries), raw=body)
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"malformed /v1/cluster body ({err!r}): {body!r}") from err

    @property
    def stages(self) -> tuple[PlanEntry, ...]:
        """The nodes that hold layers, in pipeline order."""
        return tuple(node for node in self.nodes if node.layers is not None)

    def plan(self) -> tuple[int, str, tuple[tuple[str, tuple[int, int] | None], ...]]:
        """What every node must agree on: epoch, coordinator, and each stage's id and layers."""
        return (self.epoch, self.coordinator, tuple((s.id, s.layers) for s in self.stages))

    def problems(self, expected_ips: Sequence[str], n_layers: int | None) -> list[str]:
        """Why this view is not a ready plan over exactly ``expected_ips`` (empty if it is)."""
        found: list[str] = []
        if not self.ready:
            found.append("not ready")
        stage_ips = sorted(stage.ip for stage in self.stages)
        if stage_ips != sorted(expected_ips):
            found.append(f"stages on {stage_ips}, expected {sorted(expected_ips)}")
        position = 0
        for stage in self.stages:
            assert stage.layers is not None
            if stage.layers[0] != position:
                found.append(f"layers not contiguous: {[s.layers for s in self.stages]}")
                break
            position = stage.layers[1]
        if n_layers is not None and position != n_layers:
            found.append(f"layers cover 0..{position}, expected 0..{n_layers}")
        return found

    def describe(self, names: dict[str, str] | None = None) -> str:
        """A table like ``hearth status`` prints; ``names`` maps IPs to labels."""
        names = names or {}
        lines = [f"epoch {self.epoch}   coordinator {self.coordinator}   ready {str(self.ready).lower()}"]
        for node in self.nodes:
            layers = f"{node.layers[0]:>2}..{node.layers[1]:<2}" if node.layers else "-"
            mib = node.usable_memory_bytes / 2**20
            lines.append(f"  {names.get(node.ip, ''):<18} {node.addr:<21} layers {layers:<7} "
                         f"({node.layer_count:>2})  usable {mib:7.1f} MiB  id {node.id}")
        return "\n".join(lines)


# --- HTTP -------------------------------------------------------------------------------


@dataclass
class HttpResult:
    """A complete HTTP response. For ``stream=True`` requests, ``events`` holds the
    Server-Sent Events' ``data`` payloads (parsed JSON, or the string ``"[DONE]"``)."""

    status: int
    headers: dict[str, str]
    body: bytes
    events: list[Any] = field(default_factory=list)

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")

    def json(self) -> Any:
        return jsonlib.loads(self.body)


def _sse_payload(line: str) -> Any | None:
    """The payload of one SSE line, or ``None`` for lines without data."""
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    return data if data == "[DONE]" else jsonlib.loads(data)


# --- nodes ------------------------------------------------------------------------------


@dataclass(eq=False)
class Node:
    """One namespace of a :class:`Cluster`, and the ``hearth serve`` (or stand-in) process in it."""

    cluster: Cluster = field(repr=False)
    index: int
    netns: str
    ip: str
    hub_port: str
    workdir: Path
    memory_limit: str | None
    extra_args: list[str]
    command: list[str] | None = None
    link_ips: dict[str, str] = field(default_factory=dict)
    """The node's address on each extra link (:meth:`Cluster.add_link`), by link name."""
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    started_at: float | None = None
    _forwarder: _Forwarder | None = field(default=None, repr=False)
    _relay: subprocess.Popen[str] | None = field(default=None, repr=False)
    """The user-space netem stand-in spliced between the node and its bridge, if any."""

    # -- identity and addresses --

    @property
    def name(self) -> str:
        """A short label for messages: ``node<i>``."""
        return f"node{self.index}"

    @property
    def data_dir(self) -> Path:
        return self.workdir / "data"

    @property
    def log_path(self) -> Path:
        return self.workdir / "serve.log"

    @property
    def control_addr(self) -> str:
        """What another node's ``--peer`` takes."""
        return f"{self.ip}:{CONTROL_PORT}"

    def _api_addr_arg(self) -> str | None:
        for i, arg in enumerate(self.extra_args):
            if arg.startswith("--api-addr="):
                return arg.split("=", 1)[1]
            if arg == "--api-addr" and i + 1 < len(self.extra_args):
                return self.extra_args[i + 1]
        return None

    @property
    def api_port(self) -> int:
        """The API port inside the namespace (from ``--api-addr`` in ``extra_args``, else 5280)."""
        addr = self._api_addr_arg()
        return int(addr.rsplit(":", 1)[1]) if addr else API_PORT

    @property
    def api_host(self) -> str:
        """The API host inside the namespace (from ``--api-addr``, else 127.0.0.1)."""
        addr = self._api_addr_arg()
        host = addr.rsplit(":", 1)[0].strip("[]") if addr else ""
        return "127.0.0.1" if host in ("", "0.0.0.0") else host

    @property
    def forward_port(self) -> int:
        """The root-namespace loopback port that forwards to this node's API."""
        if self._forwarder is None:
            self._forwarder = _Forwarder(self.netns, self.api_port, self.api_host)
        return self._forwarder.port

    @property
    def api_url(self) -> str:
        """The node's API root, reachable from this (root-namespace) process."""
        return f"http://127.0.0.1:{self.forward_port}"

    @property
    def base_url(self) -> str:
        """The OpenAI base URL for this node, from this process (``openai.OpenAI(base_url=...)``)."""
        return f"{self.api_url}/v1"

    @property
    def in_netns_base_url(self) -> str:
        """The OpenAI base URL as seen from inside the node's namespace."""
        return f"http://{self.api_host}:{self.api_port}/v1"

    # -- process lifecycle --

    def serve_command(self) -> list[str]:
        """The command run inside the namespace: ``hearth serve ...`` or the stand-in ``command``."""
        if self.command is not None:
            return list(self.command)
        argv = [str(self.cluster.binary), "serve", "--model", self.cluster.model, "--data-dir", str(self.data_dir)]
        if self.memory_limit:
            argv += ["--memory-limit", self.memory_limit]
        return argv + list(self.extra_args)

    @property
    def pid(self) -> int | None:
        """The node's pid (``ip netns exec`` execs the command, so it is the command's own pid)."""
        return self.process.pid if self.process is not None else None

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        """Start the process in the namespace; returns at once (see :meth:`wait_api`)."""
        if self.is_running():
            raise HarnessError(f"{self.name} is already running (pid {self.pid})")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        argv = ["ip", "netns", "exec", self.netns]
        if shutil.which("setpriv") and threading.current_thread() is threading.main_thread():
            # Dies with this process even if that is SIGKILLed. The parent-death signal
            # fires when the *thread* that forked exits, hence the main thread only.
            argv += ["setpriv", "--pdeathsig", "KILL", "--"]
        argv += self.serve_command()
        env = {**os.environ, "NO_COLOR": "1", "RUST_BACKTRACE": "1"}
        env.setdefault("RUST_LOG", "info")
        with self.log_path.open("ab") as log:
            log.write(f"=== {time.strftime('%H:%M:%S')} $ {' '.join(argv)}\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                start_new_session=True, cwd=self.workdir,
            )
        self.started_at = time.monotonic()

    def kill(self, sig: int = signal.SIGKILL, *, wait: bool | None = None) -> None:
        """Send ``sig`` to the node's process group. Waits for the exit after SIGKILL,
        or as ``wait`` says."""
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, sig)
        except ProcessLookupError:
            pass
        if wait if wait is not None else sig == signal.SIGKILL:
            self.process.wait(timeout=STOP_GRACE_S)

    def stop(self, grace_s: float = STOP_GRACE_S) -> int | None:
        """SIGTERM the process group, SIGKILL it after ``grace_s``; returns the exit code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.kill(signal.SIGTERM, wait=False)
            try:
                self.process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self.kill(signal.SIGKILL)
        try:  # a child of the node may outlive it in the group
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        return self.process.returncode

    def restart(self, *, wait_api: bool = True) -> None:
        """Stop the node and start it again with the same namespace, data dir (identity) and flags."""
        self.stop()
        self.start()
        if wait_api:
            self.wait_api()

    def ensure_running(self) -> None:
        """Raise :class:`NodeExited` (with the log tail) if the process is not running."""
        if not self.is_running():
            code = None if self.process is None else self.process.returncode
            raise NodeExited(f"{self.name} ({self.netns}) is not running (exit code {code}); "
                             f"log tail:\n{self.log_tail()}")

    def wait_api(self, timeout_s: float = 60.0) -> None:
        """Wait until the API answers HTTP at all (any status), or raise."""
        deadline = time.monotonic() + timeout_s
        last = "no attempt"
        while time.monotonic() < deadline:
            self.ensure_running()
            try:
                self.http("GET", "/health", timeout=2.0)
                return
            except OSError as err:
                last = repr(err)
            time.sleep(POLL_INTERVAL_S)
        raise HarnessError(f"{self.name}: API not answering after {timeout_s:.0f} s ({last}); "
                           f"log tail:\n{self.log_tail()}")

    # -- talking to it --

    def http(self, method: str, path: str, json: Any = None, stream: bool = False,
             timeout: float = REQUEST_TIMEOUT_S) -> HttpResult:
        """An HTTP request to the node's API, made inside its namespace (through the forwarder).

        ``stream=True`` reads the body as Server-Sent Events into ``events`` (the caller
        still puts ``"stream": true`` in the JSON). Connection problems raise ``OSError``.
        """
        conn = http.client.HTTPConnection("127.0.0.1", self.forward_port, timeout=timeout)
        try:
            body = None if json is None else jsonlib.dumps(json).encode()
            headers = {"Content-Type": "application/json"} if body is not None else {}
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            result = HttpResult(status=response.status, body=response.read(),
                                headers={k.lower(): v for k, v in response.getheaders()})
        finally:
            conn.close()
        if stream and result.status == 200:
            result.events = [p for line in result.text.splitlines() if (p := _sse_payload(line)) is not None]
        return result

    @contextmanager
    def sse(self, path: str, json: Any, timeout: float = REQUEST_TIMEOUT_S) -> Iterator[Iterator[Any]]:
        """POST ``json`` and yield its Server-Sent Events one by one as they arrive
        (for faults injected mid-stream)::

            with node.sse("/v1/completions", {..., "stream": True}) as events:
                first = next(events)
        """
        conn = http.client.HTTPConnection("127.0.0.1", self.forward_port, timeout=timeout)
        try:
            conn.request("POST", path, body=jsonlib.dumps(json).encode(),
                         headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            if response.status != 200:
                raise HarnessError(f"{self.name} POST {path} -> {response.status}: {response.read()[:500]!r}")

            def events() -> Iterator[Any]:
                for raw in response:
                    payload = _sse_payload(raw.decode("utf-8", errors="replace").rstrip("\r\n"))
                    if payload is not None:
                        yield payload

            yield events()
        finally:
            conn.close()

    def cluster_view(self, timeout: float = 5.0) -> ClusterView:
        """``GET /v1/cluster``, parsed. Raises ``OSError`` or ``ValueError``."""
        result = self.http("GET", "/v1/cluster", timeout=timeout)
        if result.status != 200:
            raise ValueError(f"GET /v1/cluster -> {result.status}: {result.text[:300]}")
        return ClusterView.parse(result.json())

    def run(self, argv: Sequence[str], *, timeout: float = COMMAND_TIMEOUT_S, check: bool = False,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run a command inside the node's namespace (``ip netns exec``) and capture its output."""
        full = ["ip", "netns", "exec", self.netns, *argv]
        result = subprocess.run(full, check=False, capture_output=True, text=True, timeout=timeout,
                                stdin=subprocess.DEVNULL,
                                env=None if env is None else {**os.environ, **env})
        if check and result.returncode != 0:
            raise HarnessError(f"`{' '.join(full)}` exited with {result.returncode}: {result.stderr.strip()[-2000:]}")
        return result

    def python(self, code: str, *args: str, timeout: float = COMMAND_TIMEOUT_S,
               check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run Python ``code`` (with ``args`` as ``sys.argv[1:]``) inside the namespace with
        this interpreter, so the same packages (``openai``) are importable."""
        return self.run([sys.executable, "-c", code, *args], timeout=timeout, check=check)

    # -- observing it --

    def rss_bytes(self) -> int:
        """The process's resident memory (VmRSS of /proc/<pid>/status), in bytes."""
        self.ensure_running()
        status = Path(f"/proc/{self.pid}/status").read_text()
        match = re.search(r"^VmRSS:\s+(\d+)\s+kB", status, re.MULTILINE)
        if not match:
            raise HarnessError(f"no VmRSS in /proc/{self.pid}/status")
        return int(match.group(1)) * 1024

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last lines of the node's log, without colour codes."""
        try:
            text = self.log_path.read_bytes().decode("utf-8", errors="replace")
        except OSError as err:
            return f"(cannot read {self.log_path}: {err})"
        return "\n".join(_ANSI.sub("", line) for line in text.splitlines()[-lines:])

    # -- the network --

    def link_down(self, link: str | None = None) -> None:
        """Unplug the node: its bridge port goes down, so its ``eth0`` loses carrier
        (addresses and routes inside the namespace stay, as with a pulled cable). With
        ``link``, unplug it from that extra link only."""
        self.cluster.hub(["link", "set", "dev", self._hub_port(link), "down"])

    def link_up(self, link: str | None = None) -> None:
        """Plug the node back in (into ``link`` only, if given)."""
        self.cluster.hub(["link", "set", "dev", self._hub_port(link), "up"])

    def _hub_port(self, link: str | None) -> str:
        return self.hub_port if link is None else self.cluster.links[link].port(self)

    def netem(self, delay_ms: float = 0.0, loss_pct: float = 0.0, jitter_ms: float = 0.0) -> str:
        """Delay and drop the node's outgoing packets: with ``tc qdisc replace ... netem``,
        or, where the kernel has no sch_netem, with a user-space relay (``relay.py``)
        spliced between the node and its bridge port. Returns which was used.

        Raises :class:`NetemUnavailable` where neither can be had (no ``tc``, no
        ``ethtool`` to turn off the segmentation offloads the relay cannot pass).
        """
        try:
            self._tc_netem(delay_ms, loss_pct, jitter_ms)
            return "tc netem"
        except NetemUnavailable as missing:
            if shutil.which("ethtool") is None:
                raise NetemUnavailable(f"{missing}; and `ethtool` is missing for the user-space relay") from missing
            self._relay_netem(delay_ms, loss_pct, jitter_ms)
            return "user-space relay (no sch_netem in this kernel)"

    def _relay_netem(self, delay_ms: float, loss_pct: float, jitter_ms: float) -> None:
        cluster = self.cluster
        port_a, port_b = f"r{self.index}a", f"r{self.index}b"
        # A packet socket resends frames as they are: they must fit the MTU and carry their
        # checksums, so no super-frames and no checksum offload anywhere on the way (every
        # node's sender, and the veths the relay reads).
        for node in cluster.nodes:
            _run(["ip", "netns", "exec", node.netns, "ethtool", "-K", NODE_IFACE, "tx", "off", "tso", "off",
                  "gso", "off", "gro", "off"], check=False)
        cluster.hub(["link", "add", port_a, "type", "veth", "peer", "name", port_b])
        for port in (port_a, port_b):
            cluster.hub(["link", "set", "dev", port, "addrgenmode", "none"])
        cluster.hub(["link", "set", "dev", port_b, "master", cluster.bridge])
        cluster.hub(["link", "set", "dev", self.hub_port, "nomaster"])
        for port in (self.hub_port, port_a, port_b):
            _run(["ip", "netns", "exec", cluster.hub_netns, "ethtool", "-K", port, "tx", "off", "tso", "off",
                  "gso", "off", "gro", "off"], check=False)
            cluster.hub(["link", "set", "dev", port, "promisc", "on", "up"])
        argv = ["ip", "netns", "exec", cluster.hub_netns, sys.executable, str(Path(__file__).with_name("relay.py")),
                self.hub_port, port_a, "--delay-ms", str(delay_ms), "--jitter-ms", str(jitter_ms),
                "--loss", str(loss_pct), "--seed", str(self.index)]
        self._relay = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                       stdin=subprocess.DEVNULL, start_new_session=True)
        assert self._relay.stdout is not None
        ready = self._relay.stdout.readline().strip()
        if ready != "ready":
            self._stop_relay()
            raise HarnessError(f"the netem relay did not start: {ready} {self._relay.stdout.read()}")

    def _stop_relay(self) -> None:
        if self._relay is None:
            return
        if self._relay.poll() is None:
            self._relay.kill()
        self._relay.wait()
        self._relay = None
        cluster = self.cluster
        _run(["ip", "-n", cluster.hub_netns, "link", "del", f"r{self.index}a"], check=False)
        cluster.hub(["link", "set", "dev", self.hub_port, "promisc", "off"])
        cluster.hub(["link", "set", "dev", self.hub_port, "master", cluster.bridge])

    def _tc_netem(self, delay_ms: float, loss_pct: float, jitter_ms: float) -> None:
        if shutil.which("tc") is None:
            raise NetemUnavailable("`tc` (iproute2) is not installed")
        argv = ["tc", "-n", self.netns, "qdisc", "replace", "dev", NODE_IFACE, "root", "netem",
                "delay", f"{delay_ms}ms"]
        if jitter_ms:
            argv.append(f"{jitter_ms}ms")
        argv += ["loss", f"{loss_pct}%"]
        result = _run(argv, check=False)
        if result.returncode != 0:
            detail = result.stderr.strip()
            if "unknown" in detail.lower() or "not supported" in detail.lower():
                raise NetemUnavailable(f"netem is not available in this kernel (CONFIG_NET_SCH_NETEM): {detail}")
            raise HarnessError(f"`{' '.join(argv)}` failed: {detail}")

    def clear_netem(self) -> None:
        """Remove any netem qdisc (or relay) from the node's link."""
        if self._relay is not None:
            self._stop_relay()
            return
        _run(["tc", "-n", self.netns, "qdisc", "del", "dev", NODE_IFACE, "root"], check=False)


# --- teardown on exit and on signals ------------------------------------------------------

_LIVE: list[Cluster] = []
_LIVE_LOCK = threading.RLock()
_SERIAL = iter(range(1, 1_000_000))
_HANDLERS_INSTALLED = False
_PREVIOUS_HANDLERS: dict[int, Any] = {}
_CLOSING: list[Cluster] = []  # clusters being closed right now: signals wait for them
_DEFERRED: list[int] = []  # signals that arrived meanwhile


def live_clusters() -> list[Cluster]:
    """The clusters of this process that are not closed yet."""
    with _LIVE_LOCK:
        return list(_LIVE)


def close_all() -> None:
    """Close every cluster still open in this process (the atexit and signal handlers call this)."""
    with _LIVE_LOCK:
        clusters = list(_LIVE)
    for cluster in reversed(clusters):
        cluster.close()


def _on_signal(signum: int, frame: FrameType | None) -> None:
    """Tear everything down, then let the signal have its usual effect.

    A signal that arrives while a cluster is closing waits until the close is done,
    so a second Ctrl-C cannot cut a teardown short.
    """
    if _CLOSING:
        _DEFERRED.append(signum)
        return
    close_all()
    previous = _PREVIOUS_HANDLERS.get(signum, signal.SIG_DFL)
    if callable(previous):
        previous(signum, frame)  # e.g. SIGINT's default_int_handler raises KeyboardInterrupt
    elif previous == signal.SIG_DFL:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def _install_handlers() -> None:
    """Install the atexit hook and SIGTERM/SIGINT/SIGHUP handlers (once, from the main thread)."""
    global _HANDLERS_INSTALLED
    if _HANDLERS_INSTALLED or threading.current_thread() is not threading.main_thread():
        return
    atexit.register(close_all)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        previous = signal.getsignal(signum)
        if previous == signal.SIG_IGN:
            continue
        _PREVIOUS_HANDLERS[signum] = previous
        signal.signal(signum, _on_signal)
    _HANDLERS_INSTALLED = True


# --- clusters ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ExtraLink:
    """A second (third, ...) network joining every node of a cluster: a bridge of its own
    in the hub namespace, and on each node an interface ``iface`` with an address of
    ``subnet`` (no default route: only the link's own subnet is reached over it)."""

    name: str
    bridge: str
    subnet: ipaddress.IPv4Network
    iface: str
    port_prefix: str
    rate: str | None
    """Each node's sending rate on the link (``tc ... tbf``), or unlimited."""

    def port(self, node: Node) -> str:
        return f"{self.port_prefix}{node.index}"

    def ip(self, node: Node) -> str:
        return str(self.subnet.network_address + node.index + 1)


def limit_rate(netns: str, iface: str, rate: str) -> None:
    """Cap what ``iface`` in ``netns`` sends at ``rate`` (``tc qdisc ... tbf``, which every
    kernel has, unlike netem): a slow link. Every packet on a link leaves some node's
    interface, so capping each node's side caps the link both ways."""
    if shutil.which("tc") is None:
        raise HarnessError("`tc` (iproute2) is not installed")
    # The smallest bucket that passes a full frame: with a larger one, a few kilobytes of
    # activations now and then would go out at line rate and never see the cap.
    _run(["tc", "-n", netns, "qdisc", "replace", "dev", iface, "root", "tbf", "rate", rate,
          "burst", "1600", "latency", "400ms"])


class Cluster:
    """Network namespaces on one bridge, each with one ``hearth serve``.

    Use as a context manager (or call :meth:`close`)::

        with Cluster() as cluster:
            for limit in ("400MiB", "800MiB", "1200MiB"):
                cluster.add_node(memory_limit=limit)
            view = cluster.wait_for_plan(n_layers=30)

    ``binary`` and ``model`` default to :func:`find_binary` and :func:`resolve_model`,
    looked up when the first hearth node starts (stand-in nodes, ``command=``, need
    neither). ``workdir`` holds each node's data dir and log (default: a new temp dir,
    kept after close so the logs can be read).
    """

    def __init__(self, *, binary: Path | None = None, model: str | None = None,
                 workdir: Path | None = None, subnet: str | None = None) -> None:
        _install_handlers()
        cleanup_stale()
        self.serial = next(_SERIAL)
        self.run_id = f"{os.getpid()}-{self.serial}"
        self._binary = binary
        self._model = model
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix=f"hearth-mesh-{self.run_id}-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        third = (os.getpid() * 7 + self.serial) % 250 + 1
        self.subnet = ipaddress.ip_network(subnet or f"10.213.{third}.0/24")
        self.hub_netns = f"{PREFIX}-{self.run_id}-hub"
        self.bridge = f"{PREFIX}br{os.getpid()}"[:15]
        self.nodes: list[Node] = []
        self.links: dict[str, ExtraLink] = {}
        self.primary_rate: str | None = None
        self.multicast_blocked = False
        self.started_at: float | None = None
        self._closed = False
        with _LIVE_LOCK:
            _LIVE.append(self)
        try:
            _run(["ip", "netns", "add", self.hub_netns])
            self.hub(["link", "add", self.bridge, "type", "bridge", "stp_state", "0", "mcast_snooping", "0"])
            self.hub(["link", "set", "dev", self.bridge, "addrgenmode", "none"])
            self.hub(["link", "set", "dev", self.bridge, "up"])
        except BaseException:
            self.close()
            raise

    # -- plumbing --

    @property
    def gateway(self) -> str:
        """The nodes' default gateway: the subnet's last host address, which no node holds."""
        return str(self.subnet.broadcast_address - 1)

    def hub(self, argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        """Run ``ip -n <hub namespace> <argv>`` (the namespace that holds the bridge)."""
        return _run(["ip", "-n", self.hub_netns, *argv])

    @property
    def binary(self) -> Path:
        if self._binary is None:
            self._binary = find_binary()
        return self._binary

    @property
    def model(self) -> str:
        if self._model is None:
            self._model = resolve_model(self.binary)
        return self._model

    def add_node(self, memory_limit: str | None = None, extra_args: Sequence[str] = (), *,
                 start: bool = True, command: Sequence[str] | None = None) -> Node:
        """Create a namespace on the bridge and (if ``start``) start ``hearth serve`` in it.

        The node gets the next address of the subnet, ``--data-dir`` in its own work
        directory, ``--memory-limit memory_limit`` if given, then ``extra_args``.
        ``command`` replaces the whole ``hearth serve ...`` command (stand-in processes).
        """
        if self._closed:
            raise HarnessError("the cluster is closed")
        index = len(self.nodes)
        node = Node(
            cluster=self, index=index, netns=f"{PREFIX}-{self.run_id}-{index}",
            ip=str(self.subnet.network_address + index + 1), hub_port=f"p{index}",
            workdir=self.workdir / f"node{index}", memory_limit=memory_limit, extra_args=list(extra_args),
            command=None if command is None else list(command),
        )
        node.workdir.mkdir(parents=True, exist_ok=True)
        self.nodes.append(node)
        ns = node.netns
        _run(["ip", "netns", "add", ns])
        self.hub(["link", "add", node.hub_port, "type", "veth", "peer", "name", NODE_IFACE, "netns", ns])
        self.hub(["link", "set", "dev", node.hub_port, "addrgenmode", "none"])
        self.hub(["link", "set", "dev", node.hub_port, "master", self.bridge])
        if self.multicast_blocked:
            self._set_mcast_flood(node, False)
        self.hub(["link", "set", "dev", node.hub_port, "up"])
        _run(["ip", "-n", ns, "link", "set", "dev", "lo", "up"])
        _run(["ip", "-n", ns, "addr", "add", f"{node.ip}/{self.subnet.prefixlen}", "dev", NODE_IFACE])
        _run(["ip", "-n", ns, "link", "set", "dev", NODE_IFACE, "multicast", "on", "up"])
        # Like a machine on a LAN, a default route; its gateway is an address nobody holds,
        # so anything meant for the outside dies on the bridge.
        _run(["ip", "-n", ns, "route", "add", "default", "via", self.gateway, "dev", NODE_IFACE, "onlink"])
        if self.primary_rate is not None:
            limit_rate(ns, NODE_IFACE, self.primary_rate)
        for link in self.links.values():
            self._plug(link, node)
        if start:
            self.start_nodes([node])
        return node

    def add_link(self, name: str, *, rate: str | None = None) -> ExtraLink:
        """Join every node, present and future, by one more network (``eth1``, ``eth2``,
        ...), optionally capped at ``rate`` (``"10mbit"``): a machine with Ethernet and
        Wi-Fi, or a Thunderbolt bridge beside the LAN. Bring it down on one node with
        ``node.link_down(name)``."""
        index = len(self.links) + 1
        third = (self.subnet.network_address.packed[2] + 17 * index) % 250 + 1
        link = ExtraLink(
            name=name, bridge=f"{PREFIX}b{index}{os.getpid()}"[:15],
            subnet=ipaddress.ip_network(f"10.{213 + index}.{third}.0/24"), iface=f"eth{index}",
            port_prefix=f"{'qrstuvw'[index - 1]}", rate=rate,
        )
        self.hub(["link", "add", link.bridge, "type", "bridge", "stp_state", "0", "mcast_snooping", "0"])
        self.hub(["link", "set", "dev", link.bridge, "addrgenmode", "none"])
        self.hub(["link", "set", "dev", link.bridge, "up"])
        self.links[name] = link
        for node in self.nodes:
            self._plug(link, node)
        return link

    def limit_primary_rate(self, rate: str) -> None:
        """Cap every node's sending rate on the main bridge (``eth0``), now and for nodes
        added later: turns it into the slow one of two links."""
        self.primary_rate = rate
        for node in self.nodes:
            limit_rate(node.netns, NODE_IFACE, rate)

    def _plug(self, link: ExtraLink, node: Node) -> None:
        port = link.port(node)
        self.hub(["link", "add", port, "type", "veth", "peer", "name", link.iface, "netns", node.netns])
        self.hub(["link", "set", "dev", port, "addrgenmode", "none"])
        self.hub(["link", "set", "dev", port, "master", link.bridge])
        self.hub(["link", "set", "dev", port, "up"])
        ip = link.ip(node)
        _run(["ip", "-n", node.netns, "addr", "add", f"{ip}/{link.subnet.prefixlen}", "dev", link.iface])
        _run(["ip", "-n", node.netns, "link", "set", "dev", link.iface, "multicast", "on", "up"])
        if link.rate is not None:
            limit_rate(node.netns, link.iface, link.rate)
        node.link_ips[link.name] = ip

    def start_nodes(self, nodes: Sequence[Node] | None = None) -> None:
        """Start the given nodes (default: all that are not running) back to back, and set
        :attr:`started_at` (the moment the last one was started)."""
        targets = [n for n in (self.nodes if nodes is None else nodes) if not n.is_running()]
        if not targets:
            return
        if any(n.command is None for n in targets):
            _ = self.binary, self.model  # resolve before any clock starts
        for node in targets:
            node.start()
        self.started_at = time.monotonic()

    @property
    def running(self) -> list[Node]:
        """The nodes whose process is running."""
        return [node for node in self.nodes if node.is_running()]

    def _set_mcast_flood(self, node: Node, on: bool) -> None:
        self.hub(["link", "set", "dev", node.hub_port, "type", "bridge_slave", "mcast_flood", "on" if on else "off"])

    def block_multicast(self) -> None:
        """Stop the bridge from passing multicast to any port, now and for nodes added later.

        mDNS (and all other multicast, IPv4 and IPv6) then reaches no other node, while
        unicast, broadcast and ARP still work: a network where only ``--peer`` can form
        a cluster. Check it with :func:`multicast_reaches`.
        """
        self.multicast_blocked = True
        for node in self.nodes:
            self._set_mcast_flood(node, False)

    def unblock_multicast(self) -> None:
        """Undo :meth:`block_multicast`."""
        self.multicast_blocked = False
        for node in self.nodes:
            self._set_mcast_flood(node, True)

    # -- waiting for a plan --

    def views(self, nodes: Sequence[Node] | None = None) -> dict[str, ClusterView | str]:
        """Each node's ``/v1/cluster`` (or the error getting it), by node name."""
        out: dict[str, ClusterView | str] = {}
        for node in self.running if nodes is None else nodes:
            try:
                out[node.name] = node.cluster_view(timeout=2.0)
            except (OSError, ValueError) as err:
                out[node.name] = f"error: {err!r}"
        return out

    def wait_for_plan(self, nodes: Sequence[Node] | None = None, *, n_layers: int | None = None,
                      timeout_s: float = 30.0, min_epoch: int | None = None) -> ClusterView:
        """Poll every node in ``nodes`` (default: all running) until they all report the
        same ready plan whose stages are exactly those nodes, cover ``0..n_layers``
        contiguously (if given) and whose epoch is above ``min_epoch`` (if given).

        Raises :class:`PlanTimeout` (with each node's last view and log tail) after
        ``timeout_s``, or :class:`NodeExited` as soon as one of them dies.
        """
        members = list(self.running if nodes is None else nodes)
        if not members:
            raise HarnessError("wait_for_plan: no nodes")
        expected_ips = [node.ip for node in members]
        deadline = time.monotonic() + timeout_s
        while True:
            for node in members:
                node.ensure_running()
            last = self.views(members)
            views = [v for v in last.values() if isinstance(v, ClusterView)]
            if len(views) == len(members):
                first = views[0]
                if (all(v.plan() == first.plan() and v.ready for v in views)
                        and not first.problems(expected_ips, n_layers)
                        and (min_epoch is None or first.epoch > min_epoch)):
                    return first
            if time.monotonic() >= deadline:
                break
            time.sleep(POLL_INTERVAL_S)
        report = [(f"{[n.name for n in members]} did not agree on a ready plan over {expected_ips} "
                   f"(n_layers={n_layers}, min_epoch={min_epoch}) within {timeout_s:.1f} s:")]
        names = self.names_by_ip()
        for node in members:
            view = last.get(node.name)
            if isinstance(view, ClusterView):
                problems = "; ".join(view.problems(expected_ips, n_layers)) or "a complete plan"
                report.append(f"--- {node.name} ({node.ip}) sees {problems}:\n{view.describe(names)}")
            else:
                report.append(f"--- {node.name} ({node.ip}): {view}")
            report.append(f"--- {node.name} log tail:\n{node.log_tail(25)}")
        raise PlanTimeout("\n".join(report))

    def names_by_ip(self) -> dict[str, str]:
        """``{ip: "node<i> <memory limit>"}``, to label views."""
        return {n.ip: f"{n.name} {n.memory_limit or ''}".strip() for n in self.nodes}

    def node_at(self, ip: str) -> Node:
        """The node with this address."""
        for node in self.nodes:
            if node.ip == ip:
                return node
        raise KeyError(f"no node has address {ip} (nodes: {[n.ip for n in self.nodes]})")

    # -- teardown --

    def close(self) -> None:
        """Stop every node, delete the namespaces (their veths go with them) and the bridge.

        Idempotent, and safe to call from signal handlers and ``atexit``. The work
        directory (logs) is kept.
        """
        with _LIVE_LOCK:
            if self._closed:
                return
            self._closed = True
            _CLOSING.append(self)
        try:
            self._teardown()
        finally:
            with _LIVE_LOCK:
                _CLOSING.remove(self)
                if self in _LIVE:
                    _LIVE.remove(self)
            if not _CLOSING and _DEFERRED and threading.current_thread() is threading.main_thread():
                signum = _DEFERRED[0]
                _DEFERRED.clear()
                _on_signal(signum, None)

    def _teardown(self) -> None:
        for node in self.nodes:  # SIGTERM everyone first, so they stop in parallel
            if node.process is not None and node.process.poll() is None:
                try:
                    os.killpg(node.process.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + STOP_GRACE_S
        for node in self.nodes:
            if node.process is not None:
                try:
                    node.process.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
                node.stop(grace_s=0.0)
            if node._forwarder is not None:
                node._forwarder.close()
            if node._relay is not None and node._relay.poll() is None:
                node._relay.kill()
        for node in self.nodes:
            _delete_netns(node.netns)
        _delete_netns(self.hub_netns)

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
