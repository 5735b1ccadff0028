"""Fixtures for the mesh tests: real ``hearth serve`` processes in Linux network namespaces.

The harness is ``tests/harness/netns.py`` (see its docstring for the network layout).

Environment variables:

* ``HEARTH_BIN``: the hearth binary (default ``/root/.cache/hearth-target/release/hearth``).
* ``HEARTH_MODEL``: the model to serve (default: the path ``hearth pull --model default``
  prints, the cached SmolLM2-135M-Instruct Q4_1).
* ``CI``: when ``true`` and running as root, a machine that cannot make namespaces fails
  the tests instead of skipping them.

Without root or iproute2 the tests are skipped, and the session ends with a line on
stderr saying why. When a test fails, the log tails of the nodes of every cluster still
up are attached to its report; the full logs stay under pytest's temporary directory.
The session ends with the timings the tests recorded (how long clusters took to form,
and so on).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import netns
from harness.netns import Cluster

MESH_DIR = Path(__file__).resolve().parent
FIXTURES = MESH_DIR.parent / "fixtures" / "smollm2-q4_1.json"
DEFAULT_TEST_TIMEOUT_S = 120

# Timings the tests record, printed at the end of the session.
TIMINGS: dict[str, float] = {}
_SKIP_REASONS: list[str] = []
_preflight: list[str | None] = []


@pytest.fixture(scope="session")
def record_timing() -> Callable[[str, float], None]:
    """``record_timing(label, seconds)``: show a timing in the end-of-session summary."""

    def record(label: str, seconds: float) -> None:
        TIMINGS[label] = seconds

    return record


# --- skipping where namespaces are impossible --------------------------------------------


def _ci_as_root() -> bool:
    return os.environ.get("CI", "").lower() == "true" and os.geteuid() == 0


def _namespace_problem() -> str | None:
    if not _preflight:
        _preflight.append(netns.preflight())
    return _preflight[0]


@pytest.fixture(scope="session", autouse=True)
def _namespaces_available() -> None:
    """Skip (or, in CI as root, fail) every mesh test where namespaces cannot be made."""
    problem = _namespace_problem()
    if problem is None:
        return
    if _ci_as_root():
        pytest.fail(f"CI=true and running as root, yet network namespaces do not work: {problem}", pytrace=False)
    message = f"namespace tests need root ({problem})"
    if message not in _SKIP_REASONS:
        _SKIP_REASONS.append(message)
    pytest.skip(message)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Give every mesh test a timeout (pytest-timeout) unless it sets its own."""
    for item in items:
        if MESH_DIR in Path(str(item.path)).resolve().parents and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(DEFAULT_TEST_TIMEOUT_S))


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    """Print why namespace tests were skipped (on stderr), and the recorded timings."""
    if _SKIP_REASONS:
        capture = config.pluginmanager.getplugin("capturemanager")
        with capture.global_and_fixture_disabled():
            for reason in _SKIP_REASONS:
                print(f"SKIPPED: {reason}", file=sys.stderr, flush=True)
    if TIMINGS:
        terminalreporter.write_sep("-", "mesh timings")
        for label, seconds in TIMINGS.items():
            figure = f"{seconds:8.2f} s " if seconds >= 0.1 else f"{seconds * 1000:8.2f} ms"
            terminalreporter.write_line(f"{figure}  {label}")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Attach the log tails of every node still up to a failed test's report."""
    report = yield
    if report.failed and MESH_DIR in Path(str(item.path)).resolve().parents:
        for cluster in netns.live_clusters():
            for node in cluster.nodes:
                report.sections.append((f"{node.netns} ({node.name}, {node.ip}) log tail", node.log_tail()))
    return report


# --- the hearth binary and the model -----------------------------------------------------


@pytest.fixture(scope="session")
def hearth_binary() -> Path:
    """The hearth binary; fails the test if it is missing or predates the mesh."""
    try:
        binary = netns.find_binary()
    except netns.HarnessError as err:
        pytest.fail(str(err), pytrace=False)
    missing = {"--peer", "--memory-limit", "--data-dir"} - netns.serve_flags(binary)
    if missing:
        pytest.fail(f"`{binary} serve` has no {', '.join(sorted(missing))}: this build predates the mesh",
                    pytrace=False)
    return binary


@pytest.fixture(scope="session")
def model_path(hearth_binary: Path) -> str:
    """What every node and the single-node reference get as ``--model``."""
    return netns.resolve_model(hearth_binary)


@pytest.fixture(scope="session")
def prompts() -> list[str]:
    """The prompts of the golden fixture (tests/fixtures/smollm2-q4_1.json)."""
    return [entry["prompt"] for entry in json.loads(FIXTURES.read_text())["completions"]]


class SingleNode:
    """Greedy continuations printed by ``hearth generate`` (the single-node reference), cached."""

    def __init__(self, binary: Path, model: str) -> None:
        self.binary = binary
        self.model = model
        self._cache: dict[tuple[str, int], str] = {}

    def __call__(self, prompt: str, max_tokens: int) -> str:
        """``hearth generate --model M --prompt P --max-tokens N --temperature 0``'s stdout."""
        key = (prompt, max_tokens)
        if key not in self._cache:
            argv = [str(self.binary), "generate", "--model", self.model, "--prompt", prompt,
                    "--max-tokens", str(max_tokens), "--temperature", "0"]
            result = subprocess.run(argv, check=False, capture_output=True, timeout=300, stdin=subprocess.DEVNULL)
            if result.returncode != 0:
                pytest.fail(f"`{' '.join(argv)}` failed ({result.returncode}): {result.stderr.decode()[-2000:]}",
                            pytrace=False)
            self._cache[key] = result.stdout.decode("utf-8")
        return self._cache[key]

    def prefetch(self, prompts: list[str], max_tokens: int) -> dict[str, str]:
        """Generate several at once (two processes at a time); ``{prompt: text}``."""
        with ThreadPoolExecutor(max_workers=2) as pool:
            return dict(zip(prompts, pool.map(lambda p: self(p, max_tokens), prompts)))


@pytest.fixture(scope="session")
def single_node(hearth_binary: Path, model_path: str) -> SingleNode:
    """The single-node reference: ``single_node(prompt, max_tokens)``."""
    return SingleNode(hearth_binary, model_path)


@pytest.fixture
def make_cluster(tmp_path: Path, hearth_binary: Path, model_path: str) -> Iterator[Callable[[], Cluster]]:
    """A factory of clusters private to one test (hearth binary and model preset), all
    closed when the test ends."""
    clusters: list[Cluster] = []

    def make() -> Cluster:
        cluster = Cluster(binary=hearth_binary, model=model_path, workdir=tmp_path / f"cluster{len(clusters)}")
        clusters.append(cluster)
        return cluster

    try:
        yield make
    finally:
        for cluster in clusters:
            cluster.close()
