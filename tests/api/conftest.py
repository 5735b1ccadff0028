"""Fixtures that run a real `hearth serve` process for the OpenAI-compatible API tests.

Environment variables:

* ``HEARTH_BIN``: the hearth binary. Default: ``/root/.cache/hearth-target/release/hearth``,
  then ``$CARGO_TARGET_DIR/release/hearth``.
* ``HEARTH_MODEL``: the value given to ``--model``. Default: ``default`` (the cached
  SmolLM2-135M-Instruct Q4_1 GGUF, which the golden tests are written against).

Two servers can run during a session: ``server`` (the model's own context window) and
``small_context_server`` (``--context 256``), started on first use and stopped at the end.
When a test fails, the tail of the log of each server it used is attached to the report.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

DEFAULT_BINARY = Path("/root/.cache/hearth-target/release/hearth")
DEFAULT_MODEL = "default"
SMALL_CONTEXT = 256

STARTUP_TIMEOUT_S = 120.0
POLL_INTERVAL_S = 0.2
SHUTDOWN_GRACE_S = 10.0
REQUEST_TIMEOUT_S = 60.0
LOG_TAIL_LINES = 40
DEFAULT_TEST_TIMEOUT_S = 300

MARKERS = {
    "reference_model": "asserts outputs of the default model (SmolLM2-135M-Instruct Q4_1)",
    "streaming": "Server-Sent Events responses",
    "sampling": "seeded sampling",
    "stop": "stop sequences",
    "errors": "OpenAI error responses",
    "context": "context-window limits (runs a second server with --context 256)",
    "concurrency": "several requests at once, client disconnects",
    "chat": "/v1/chat/completions",
    "auth": "API keys (runs a third server with --api-key)",
}

# The key the `keyed_server` requires.
API_KEY = "hearth-test-key-0123456789"


def find_binary() -> Path:
    """Return the hearth binary to test, or fail the session with where it was looked for."""
    explicit = os.environ.get("HEARTH_BIN")
    if explicit:
        candidates = [Path(explicit)]
    else:
        candidates = [DEFAULT_BINARY]
        target_dir = os.environ.get("CARGO_TARGET_DIR")
        if target_dir:
            candidates.append(Path(target_dir) / "release" / "hearth")
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    looked = ", ".join(str(c) for c in candidates)
    pytest.fail(
        f"hearth binary not found (looked at: {looked}). Build it with "
        "`cargo build --release` (CARGO_TARGET_DIR=/root/.cache/hearth-target) or set HEARTH_BIN.",
        pytrace=False,
    )


def free_port() -> int:
    """Ask the kernel for a free TCP port on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class HearthServer:
    """A running `hearth serve` child process and where to reach it."""

    name: str
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def root_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        """The OpenAI base URL (what `openai.OpenAI(base_url=...)` takes)."""
        return f"{self.root_url}/v1"

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = self.log_path.read_bytes().decode("utf-8", errors="replace")
        except OSError as err:
            return f"(cannot read {self.log_path}: {err})"
        return "\n".join(text.splitlines()[-lines:])

    def is_running(self) -> bool:
        return self.process.poll() is None

    def ensure_running(self) -> None:
        """Fail the current test if the server process has exited."""
        if not self.is_running():
            pytest.fail(
                f"hearth serve [{self.name}] exited with code {self.process.returncode}; "
                f"log tail ({self.log_path}):\n{self.log_tail()}",
                pytrace=False,
            )

    def health(self) -> dict[str, Any]:
        """GET /health, asserting a 200 JSON object."""
        response = httpx.get(f"{self.root_url}/health", timeout=REQUEST_TIMEOUT_S)
        assert response.status_code == 200, f"GET /health -> {response.status_code}: {response.text}"
        body = response.json()
        assert isinstance(body, dict), f"GET /health returned {body!r}, not a JSON object"
        return body

    def wait_ready(self, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
        """Poll GET /health until it answers 200; fail if the process exits or time runs out."""
        deadline = time.monotonic() + timeout_s
        last_error = "no attempt yet"
        while time.monotonic() < deadline:
            if not self.is_running():
                pytest.fail(
                    f"hearth serve [{self.name}] exited with code {self.process.returncode} "
                    f"before /health answered; log tail:\n{self.log_tail()}",
                    pytrace=False,
                )
            try:
                response = httpx.get(f"{self.root_url}/health", timeout=2.0)
                if response.status_code == 200:
                    return
                last_error = f"HTTP {response.status_code}: {response.text[:200]}"
            except httpx.HTTPError as err:
                last_error = repr(err)
            time.sleep(POLL_INTERVAL_S)
        self.stop()
        pytest.fail(
            f"hearth serve [{self.name}] not ready after {timeout_s:.0f} s (last: {last_error}); "
            f"log tail:\n{self.log_tail()}",
            pytrace=False,
        )

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after a grace period."""
        if not self.is_running():
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=SHUTDOWN_GRACE_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=SHUTDOWN_GRACE_S)


# Servers started in this session, so hooks can check them and attach their logs.
_SERVERS: dict[str, HearthServer] = {}
# Which fixture gives which server (a test "uses" a server when its fixture closure has it).
_FIXTURE_TO_SERVER = {"server": "default", "small_context_server": "context256", "keyed_server": "keyed"}


def start_server(name: str, extra_args: Sequence[str], log_dir: Path) -> HearthServer:
    """Start `hearth serve` on a free port and wait until it is ready."""
    binary = find_binary()
    model = os.environ.get("HEARTH_MODEL", DEFAULT_MODEL)
    port = free_port()
    # A one-node cluster of its own, on loopback only: its planes on free ports, its own
    # identity and cluster name (so the two servers never join each other), and no mDNS,
    # which would otherwise reach the machine's real network.
    data_dir = log_dir / f"data-{name}"
    command = [
        str(binary), "serve", "--model", model, "--api-addr", f"127.0.0.1:{port}",
        "--data-addr", "127.0.0.1:0", "--control-addr", "127.0.0.1:0", "--no-mdns",
        "--cluster", f"api-tests-{name}-{os.getpid()}", "--data-dir", str(data_dir), *extra_args,
    ]
    log_path = log_dir / f"hearth-serve-{name}.log"
    env = {**os.environ, "RUST_LOG": "info"}
    with log_path.open("wb") as log_file:
        log_file.write(f"$ {' '.join(command)}\n".encode())
        log_file.flush()
        process = subprocess.Popen(
            command, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
        )
    server = HearthServer(name=name, process=process, port=port, log_path=log_path)
    _SERVERS[name] = server
    server.wait_ready()
    return server


def models_of(server: HearthServer) -> list[dict[str, Any]]:
    """The `data` list of GET /v1/models."""
    response = httpx.get(f"{server.base_url}/models", timeout=REQUEST_TIMEOUT_S)
    assert response.status_code == 200, f"GET /v1/models -> {response.status_code}: {response.text}"
    data = response.json().get("data")
    assert isinstance(data, list), f"GET /v1/models has no `data` list: {response.text}"
    return data


def only_model_id(server: HearthServer) -> str:
    """The id of the single model the server lists."""
    data = models_of(server)
    assert len(data) == 1, f"expected exactly one model in /v1/models, got {data!r}"
    model_id = data[0].get("id")
    assert isinstance(model_id, str) and model_id, f"model entry has no string id: {data[0]!r}"
    return model_id


def openai_client(server: HearthServer) -> openai.OpenAI:
    """An OpenAI client for the server; no retries so every error surfaces."""
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=REQUEST_TIMEOUT_S)


# --- fixtures: default server -------------------------------------------------


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HearthServer]:
    """`hearth serve` with the model's own context window."""
    hearth = start_server("default", [], tmp_path_factory.mktemp("hearth-default"))
    try:
        yield hearth
    finally:
        hearth.stop()


@pytest.fixture(scope="session")
def model_id(server: HearthServer) -> str:
    """The model id to send, read from GET /v1/models."""
    return only_model_id(server)


@pytest.fixture(scope="session")
def client(server: HearthServer) -> Iterator[openai.OpenAI]:
    with openai_client(server) as api:
        yield api


@pytest.fixture(scope="session")
def http(server: HearthServer) -> Iterator[httpx.Client]:
    """A raw HTTP client rooted at the server (for malformed bodies and SSE framing)."""
    with httpx.Client(base_url=server.root_url, timeout=REQUEST_TIMEOUT_S) as raw:
        yield raw


# --- fixtures: small-context server -------------------------------------------


@pytest.fixture(scope="session")
def keyed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HearthServer]:
    """`hearth serve --api-key-file ...`: every /v1 request needs the bearer token."""
    directory = tmp_path_factory.mktemp("hearth-keyed")
    key_file = directory / "api-key"
    key_file.write_text(API_KEY + "\n")
    hearth = start_server("keyed", ["--api-key-file", str(key_file)], directory)
    try:
        yield hearth
    finally:
        hearth.stop()


@pytest.fixture(scope="session")
def small_context_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HearthServer]:
    """`hearth serve --context 256`, so over-long prompts are cheap to build."""
    hearth = start_server(
        "context256", ["--context", str(SMALL_CONTEXT)], tmp_path_factory.mktemp("hearth-context256")
    )
    try:
        yield hearth
    finally:
        hearth.stop()


@pytest.fixture(scope="session")
def small_context() -> int:
    """The --context of `small_context_server`."""
    return SMALL_CONTEXT


@pytest.fixture(scope="session")
def small_context_model_id(small_context_server: HearthServer) -> str:
    return only_model_id(small_context_server)


@pytest.fixture(scope="session")
def small_context_client(small_context_server: HearthServer) -> Iterator[openai.OpenAI]:
    with openai_client(small_context_server) as api:
        yield api


# --- hooks --------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _servers_alive(request: pytest.FixtureRequest) -> None:
    """Fail a test up front, with the log tail, if a server it uses has died."""
    for fixture_name, server_name in _FIXTURE_TO_SERVER.items():
        hearth = _SERVERS.get(server_name)
        if hearth is not None and fixture_name in request.fixturenames:
            hearth.ensure_running()


def pytest_configure(config: pytest.Config) -> None:
    for name, description in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {description}")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Give every test a timeout (pytest-timeout) unless it sets its own."""
    for item in items:
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(DEFAULT_TEST_TIMEOUT_S))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Attach the log tail of the servers a failed test used."""
    report = yield
    if report.failed:
        fixture_names = getattr(item, "fixturenames", ())
        for fixture_name, server_name in _FIXTURE_TO_SERVER.items():
            hearth = _SERVERS.get(server_name)
            if hearth is not None and fixture_name in fixture_names:
                report.sections.append((f"hearth serve [{server_name}] log tail", hearth.log_tail()))
    return report
