"""Each architecture beyond Llama's across three real processes, on both compute paths.

Run with ``python3 -m pytest tests/mesh/test_moe.py -q -rs`` (as root; see conftest.py),
after ``cargo build --release --workspace --all-targets`` (the test writes its model with
the ``synthetic_gguf`` example, which sits beside the hearth binary).

The models are the project's synthetic ones, written into the test's temporary folder:
``tiny-qwen3moe`` (Q4_K_M; 4 layers of 8 experts, 2 used, q/k norms), ``tiny-deepseek2``
(latent attention, a dense first layer, grouped routing, a shared expert), ``tiny-gpt-oss``
(MXFP4 experts, sinks, alternating sliding windows) and ``tiny-gemma3`` (sliding windows,
post-norms, GeGLU). Three ``hearth serve`` nodes with
memory limits of 3:2:2 split its 4 layers 2/1/1, so every node holds a stage and the
middle stage is a node of its own. For each compute path (the native CPU kernels, and
candle's ops with ``HEARTH_COMPUTE=candle-ops`` on every node, the path Metal and CUDA
take) the case checks that:

* the greedy completion, streamed through the pipeline, is exactly the text ``hearth
  generate`` prints on one node on the same path;
* a SIGKILL of the middle stage mid-stream still gives the client exactly that stream,
  the two survivors re-plan the 4 layers between them, and the next request is exact too.

Each case takes 5 to 12 s here (the whole module about 80 s).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from harness import netns
from harness.netns import Cluster
from test_faults import Stream, assert_no_panic, assert_same_stream, assert_still_running, measure_recovery
from test_mesh import served_model_id

N_LAYERS = 4
MEMORY_LIMITS = ("600MiB", "400MiB", "400MiB")
"""Far more than the model needs (~8 MiB with a full context), in the ratio 3:2:2, which
apportions 4 layers as 2, 1, 1 (largest first)."""
EXPECTED_LAYER_COUNTS = [2, 1, 1]
PROMPT = "The capital of France is"
MAX_TOKENS = 400
"""A tiny model decodes in about a millisecond a token: a long request lets the kill land
well inside it."""
FAULT_AFTER_CHUNKS = 12
COMPUTE_PATHS = ("native", "candle-ops")
MODELS = (("tiny-qwen3moe", "q4_k_m"), ("tiny-deepseek2", "q4_k_m"), ("tiny-gpt-oss", "mxfp4_moe"),
          ("tiny-gemma3", "q4_k_m"))
"""(shape, quantization) of each synthetic model, all with 4 layers."""


@pytest.fixture(scope="module", params=MODELS, ids=[shape for shape, _ in MODELS])
def moe_model(request: pytest.FixtureRequest, hearth_binary: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic model of ``MODELS``, seed 1, written by the project's own writer."""
    shape, quantization = request.param
    writer = hearth_binary.parent / "examples" / "synthetic_gguf"
    if not writer.exists():
        pytest.fail(f"{writer} is missing: run `cargo build --release -p hearth-models --examples` first",
                    pytrace=False)
    path = tmp_path_factory.mktemp("models") / f"{shape}-{quantization}.gguf"
    subprocess.run([str(writer), "--shape", shape, "--quant", quantization, "--seed", "1", "--out", str(path)],
                   check=True, capture_output=True, timeout=120)
    return path


@pytest.fixture(params=COMPUTE_PATHS)
def compute_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """``HEARTH_COMPUTE`` for every process the case starts (nodes inherit the environment)."""
    monkeypatch.setenv("HEARTH_COMPUTE", request.param)
    yield request.param


def single_node_text(binary: Path, model: Path, prompt: str, max_tokens: int) -> str:
    """``hearth generate``'s greedy continuation, on the compute path of the environment."""
    argv = [str(binary), "generate", "--model", str(model), "--prompt", prompt, "--max-tokens", str(max_tokens),
            "--temperature", "0"]
    result = subprocess.run(argv, check=False, capture_output=True, timeout=120, stdin=subprocess.DEVNULL,
                            env=os.environ.copy())
    if result.returncode != 0:
        pytest.fail(f"`{' '.join(argv)}` failed ({result.returncode}): {result.stderr.decode()[-2000:]}",
                    pytrace=False)
    return result.stdout.decode("utf-8")


def test_moe_model_across_three_nodes_survives_a_middle_stage_sigkill(
    compute_path: str, moe_model: Path, hearth_binary: Path, tmp_path: Path,
    record_timing: Callable[[str, float], None],
) -> None:
    case = f"{moe_model.stem} on {compute_path}"
    expected = single_node_text(hearth_binary, moe_model, PROMPT, MAX_TOKENS)
    assert len(expected) > 100, f"{case}: the single-node reference is too short to fault mid-stream: {expected!r}"

    started = time.monotonic()
    with Cluster(binary=hearth_binary, model=str(moe_model), workdir=tmp_path / "cluster") as cluster:
        nodes = [cluster.add_node(memory_limit=limit, start=False) for limit in MEMORY_LIMITS]
        cluster.start_nodes(nodes)
        try:
            view = cluster.wait_for_plan(nodes, n_layers=N_LAYERS, timeout_s=60)
        except netns.HarnessError as err:
            pytest.fail(f"{case}: the 3-node mesh did not form:\n{err}", pytrace=False)
        record_timing(f"{case}: 3 nodes formed a plan", time.monotonic() - started)
        assert [stage.layer_count for stage in view.stages] == EXPECTED_LAYER_COUNTS, (
            f"{case}: the layers are not split over the three nodes: {view.describe(cluster.names_by_ip())}")
        if compute_path == "candle-ops":
            for node in nodes:
                assert "compute=CandleOps" in node.log_path.read_text(errors="replace"), (
                    f"{case}: {node.name} did not take candle's ops:\n{node.log_tail()}")

        first, middle = cluster.node_at(view.stages[0].ip), cluster.node_at(view.stages[1].ip)
        model = served_model_id(first)
        # The fault-free run through the pipeline is exactly the single node's text.
        reference = Stream(first, model, PROMPT, MAX_TOKENS).start().finish()
        assert reference.text == expected, (
            f"{case}: the 3-stage pipeline differs from one node\n  mesh:   {reference.text!r}\n  single: {expected!r}")
        assert reference.chunks[-1].finish_reason == "length", reference.chunks[-1]

        survivors = [node for node in nodes if node is not middle]
        pids = {node.name: node.pid for node in survivors}
        got = Stream(first, model, PROMPT, MAX_TOKENS).start()
        got.wait_for(FAULT_AFTER_CHUNKS)
        fault_at = time.monotonic()
        middle.kill(signal.SIGKILL)
        got.finish()
        assert_same_stream(got, reference, f"{case}, middle stage SIGKILLed")
        recovery = measure_recovery(got, fault_at)
        record_timing(f"{case}: middle-stage SIGKILL -> stream flowing again", recovery.resumed_s)
        assert_still_running(survivors, pids, case)

        try:
            replanned = cluster.wait_for_plan(survivors, n_layers=N_LAYERS, min_epoch=view.epoch, timeout_s=15)
        except netns.HarnessError as err:
            pytest.fail(f"{case}: the survivors did not re-plan:\n{err}", pytrace=False)
        assert [stage.layer_count for stage in replanned.stages] == [2, 2], replanned.describe(cluster.names_by_ip())
        after = Stream(first, model, PROMPT, MAX_TOKENS).start().finish()
        assert_same_stream(after, reference, f"{case}, the next request on two nodes")
        assert_no_panic(cluster)
    record_timing(f"{case}: the whole case", time.monotonic() - started)
