#!/usr/bin/env python3
"""Hearth against llama.cpp on one machine: decode and prefill speed, side by side.

For each model, the two engines run the same GGUF file with the same thread count, in
alternating rounds (hearth, llama.cpp, hearth, llama.cpp, ...) so that drifts in the
machine's state (heat, other load) touch both alike. Each round is a fresh process:

- Hearth: `hearth bench --repeat 1` (node/src/bench.rs), which prints one JSON object.
- llama.cpp: this script again, as `--llama-worker`, driving llama.cpp through the
  low-level API of the `llama-cpp-python` package (no Python-side sampling or logits
  copies in the timed loops). It measures what `hearth bench` measures, the same way:
  prefill = one decode call over a 512-token prompt (n_ctx 1024, n_batch 512), timed by
  the wall clock to the end of the computation; decode = after a 16-token prompt, N
  single-token decode calls, each followed by greedy sampling, timed by the wall clock.
  The prompt is the same filler text hearth bench uses (its ids do not affect speed).

Both engines report their own peak RSS (getrusage of their process). The table gives,
per engine, the median over the rounds and the min-max range, and the ratio
hearth/llama.cpp of the medians.

It also measures this machine's memory read bandwidth with the same number of threads
(numpy sums over 1 GiB, best of several) and prints each model's decode bound: the bytes
a decoded token must read (every tensor except the token embedding, which is gathered a
row at a time, plus the LM head, which for a tied model is that embedding read in full;
the KV cache, under 1% here, is left out) over that bandwidth, and the fraction of it
each engine reaches. It prints the CPU's model and the instruction-set extensions the
kernels choose between, so that every figure says where it was measured.

    python3 examples/bench_vs_llamacpp.py
    python3 examples/bench_vs_llamacpp.py --threads 2 --repeats 3 --models default,1b-q4_0
    python3 examples/bench_vs_llamacpp.py --hearth target/release/hearth --models path/to/model.gguf

Models: `default` (what `hearth pull --model default` fetches), a synthetic model
(`<shape>-<quant>`: a Llama 3 `1b`, `3b`, `8b`, or a mixture of experts `qwen3-30b-a3b`,
`deepseek-v3`; quant `q4_k_m`, `q4_0` or `q2_k`; written with the `synthetic_gguf`
example into --cache-dir on first use), or a path to a .gguf file. For a mixture, the
decode bound counts the experts a token uses, not all of them.

    python3 examples/bench_vs_llamacpp.py --models qwen3-30b-a3b-q4_k_m,deepseek-v3-q4_k_m,deepseek-v3-q2_k

Needs `llama-cpp-python` (installed with pip into this Python if missing: it builds
llama.cpp from source for this CPU, which takes about 15 minutes on 2 cores) and, unless
--hearth is given, cargo (the script builds `hearth` in release mode). Progress goes to
stderr, the table to stdout.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LLAMA_CPP_PACKAGE = "llama-cpp-python==0.3.36"

PREFILL_TOKENS = 512
DECODE_PROMPT_TOKENS = 16
LLAMA_CONTEXT = 1024
"""llama.cpp's n_ctx; hearth gets the same cap (--context) so neither sizes for more."""

FILLER = (
    "The history of astronomy spans thousands of years, from the first people who "
    "tracked the moon and the seasons to the telescopes that now look back to the early universe. "
    "Each generation added careful measurements, bold ideas and better instruments. "
)
"""The text `hearth bench` repeats to make its prompts (FILLER in node/src/bench.rs)."""

SYNTHETIC_SHAPES = {
    "1b": "llama-3.2-1b",
    "3b": "llama-3.2-3b",
    "8b": "llama-3.1-8b",
    # Mixtures of experts: every dimension of the real models, fewer layers (and, for
    # DeepSeek-V3, fewer experts); see `Shape` in models/src/synthetic.rs.
    "qwen3-30b-a3b": "qwen3-30b-a3b",
    "deepseek-v3": "deepseek-v3",
}
SYNTHETIC_QUANTS = ("q4_k_m", "q4_0", "q2_k")
SYNTHETIC_SEED = 1

BANDWIDTH_BYTES = 1 << 30
BANDWIDTH_TRIES = 5


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class BenchError(Exception):
    """A problem the user can fix, reported without a traceback."""


# ---------------------------------------------------------------------------------------
# The llama.cpp side: a worker process per measurement round


def llama_worker(model: Path, threads: int, decode_tokens: int, extra_buffers: bool) -> None:
    """Measures llama.cpp on `model` and prints one JSON object (run as --llama-worker)."""
    import llama_cpp as llama

    llama.llama_backend_init()
    model_params = llama.llama_model_default_params()
    # Extra buffer types hold weights repacked for faster kernels (CPU_REPACK, AMX).
    model_params.use_extra_bufts = extra_buffers
    loaded = llama.llama_model_load_from_file(str(model).encode(), model_params)
    if not loaded:
        raise BenchError(f"llama.cpp could not load {model}")
    context_params = llama.llama_context_default_params()
    context_params.n_ctx = LLAMA_CONTEXT
    context_params.n_batch = PREFILL_TOKENS
    context_params.n_ubatch = PREFILL_TOKENS
    context_params.n_threads = threads
    context_params.n_threads_batch = threads
    ctx = llama.llama_init_from_model(loaded, context_params)
    if not ctx:
        raise BenchError("llama.cpp could not create a context")
    sampler = llama.llama_sampler_chain_init(llama.llama_sampler_chain_default_params())
    llama.llama_sampler_chain_add(sampler, llama.llama_sampler_init_greedy())
    prompt = llama_filler_tokens(llama, llama.llama_model_get_vocab(loaded), PREFILL_TOKENS)

    def clear() -> None:
        llama.llama_memory_clear(llama.llama_get_memory(ctx), True)

    def decode(tokens: list[int]) -> None:
        array = (llama.llama_token * len(tokens))(*tokens)
        if llama.llama_decode(ctx, llama.llama_batch_get_one(array, len(tokens))) != 0:
            raise BenchError(f"llama_decode failed on {len(tokens)} tokens")

    def generate(prompt_tokens: list[int], steps: int) -> float:
        """Decodes the prompt, then `steps` sampled tokens; returns the seconds of the steps."""
        clear()
        decode(prompt_tokens)
        token = llama.llama_sampler_sample(sampler, ctx, -1)
        started = time.perf_counter()
        for _ in range(steps):
            decode([token])
            token = llama.llama_sampler_sample(sampler, ctx, -1)
        return time.perf_counter() - started

    # One untimed run warms caches and lets lazy initialisation happen, as in hearth bench.
    generate(prompt[:DECODE_PROMPT_TOKENS], 3)

    clear()
    started = time.perf_counter()
    decode(prompt)
    llama.llama_synchronize(ctx)
    prefill_seconds = time.perf_counter() - started

    decode_seconds = generate(prompt[:DECODE_PROMPT_TOKENS], decode_tokens)

    llama.llama_sampler_free(sampler)
    llama.llama_free(ctx)
    llama.llama_model_free(loaded)
    print(
        json.dumps(
            {
                "prefill_512_tokens_per_s": PREFILL_TOKENS / prefill_seconds,
                "decode_tokens_per_s": decode_tokens / decode_seconds,
                "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                "system_info": llama.llama_print_system_info().decode().strip(),
            }
        )
    )


def llama_filler_tokens(llama, vocab, count: int) -> list[int]:
    """`count` tokens of FILLER, as llama.cpp tokenizes it (with BOS if the model adds one)."""
    text = FILLER
    while True:
        encoded = text.encode()
        capacity = len(encoded) + 8
        tokens = (llama.llama_token * capacity)()
        n = llama.llama_tokenize(vocab, encoded, len(encoded), tokens, capacity, True, False)
        if n < 0:
            raise BenchError("llama.cpp could not tokenize the prompt")
        if n >= count:
            return list(tokens[:count])
        text += FILLER


# ---------------------------------------------------------------------------------------
# Setup: llama-cpp-python, the hearth binary, the models


def ensure_llama_cpp() -> str:
    """Installs llama-cpp-python if this Python lacks it; returns its version."""
    if importlib.util.find_spec("llama_cpp") is None:
        log(
            f"llama-cpp-python is not installed: installing {LLAMA_CPP_PACKAGE} with pip into "
            f"{sys.executable}.\nIt builds llama.cpp from source for this CPU: about 15 minutes "
            "on 2 cores (CMAKE_ARGS left as they are)."
        )
        command = [sys.executable, "-m", "pip", "install", LLAMA_CPP_PACKAGE]
        if subprocess.run(command, check=False).returncode != 0:
            raise BenchError(
                f"`{' '.join(command)}` failed (its output is above). llama.cpp needs a C++ "
                "compiler; pip fetches CMake and Ninja itself. Install the package by hand and "
                "run this script again."
            )
    version = subprocess.run(
        [sys.executable, "-c", "import llama_cpp; print(llama_cpp.__version__)"],
        check=False,
        capture_output=True,
        text=True,
    )
    if version.returncode != 0:
        raise BenchError(f"llama-cpp-python is installed but does not import:\n{version.stderr.strip()}")
    return version.stdout.strip()


def cargo_target_dir() -> Path:
    """Where cargo puts binaries: $CARGO_TARGET_DIR (relative to the repository, where cargo
    runs) or the repository's `target/`."""
    return REPO / os.environ.get("CARGO_TARGET_DIR", "target")


def hearth_binary(explicit: str | None) -> Path:
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise BenchError(f"--hearth {path}: no such file")
        return path
    log("building hearth (cargo build --release -p hearth-node)...")
    cargo(["build", "--release", "-p", "hearth-node"])
    return cargo_target_dir() / "release" / "hearth"


def cargo(arguments: list[str]) -> None:
    command = ["cargo", *arguments]
    try:
        result = subprocess.run(command, check=False, cwd=REPO)
    except FileNotFoundError:
        raise BenchError("cargo is not on PATH: install Rust, or pass --hearth PATH") from None
    if result.returncode != 0:
        raise BenchError(f"`{' '.join(command)}` failed (its output is above)")


@dataclass
class Model:
    label: str
    path: Path


def resolve_model(spec: str, hearth: Path, cache_dir: Path) -> Model:
    if spec == "default":
        result = subprocess.run(
            [str(hearth), "pull", "--model", "default"], check=False, capture_output=True, text=True
        )
        if result.returncode != 0:
            raise BenchError(f"`hearth pull --model default` failed:\n{result.stderr.strip()}")
        path = Path(result.stdout.strip().splitlines()[-1])
        return Model(f"default ({path.name})", path)
    size, _, quant = spec.rpartition("-")
    if size in SYNTHETIC_SHAPES and quant in SYNTHETIC_QUANTS:
        return Model(f"synthetic {SYNTHETIC_SHAPES[size]} {quant}", synthetic_model(size, quant, cache_dir))
    path = Path(spec)
    if path.suffix == ".gguf" and path.is_file():
        return Model(path.name, path)
    sizes = ", ".join(f"{s}-{q}" for s in SYNTHETIC_SHAPES for q in SYNTHETIC_QUANTS)
    raise BenchError(f"model `{spec}`: expected `default`, one of {sizes}, or a .gguf file")


def synthetic_model(size: str, quant: str, cache_dir: Path) -> Path:
    shape = SYNTHETIC_SHAPES[size]
    path = cache_dir / f"synthetic-{shape}-{quant}-seed{SYNTHETIC_SEED}.gguf"
    if path.is_file():
        return path
    cache_dir.mkdir(parents=True, exist_ok=True)
    log(f"writing {path} (once; the 1B shape takes about a minute)...")
    cargo(
        ["run", "--release", "-p", "hearth-models", "--example", "synthetic_gguf", "--",
         "--shape", shape, "--quant", quant, "--seed", str(SYNTHETIC_SEED), "--out", str(path)]
    )  # fmt: skip
    return path


def default_cache_dir() -> Path:
    """`synthetic/` in Hearth's own cache folder, found as hearth's model store finds it."""
    if os.environ.get("HEARTH_CACHE_DIR"):
        hearth_cache = Path(os.environ["HEARTH_CACHE_DIR"])
    elif os.environ.get("XDG_CACHE_HOME"):
        hearth_cache = Path(os.environ["XDG_CACHE_HOME"]) / "hearth"
    else:
        hearth_cache = Path.home() / ".cache" / "hearth"
    return hearth_cache / "synthetic"


# ---------------------------------------------------------------------------------------
# The machine

# The instruction-set extensions the kernels choose between, as /proc/cpuinfo names them.
KERNEL_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "asimd", "asimddp", "i8mm")


def cpu_description() -> str:
    """The CPU's model and the extensions the kernels use: where a figure was measured."""
    model, flags, family = "", set(), ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                key, value = key.strip(), value.strip()
                if key in ("model name", "Model") and not model:
                    model = value
                elif key in ("flags", "Features") and not flags:
                    flags = set(value.split())
                elif key == "cpu family" and not family:
                    family = value
                elif key == "model" and family and "model " not in family:
                    family = f"family {family} model {value}"
    except OSError:
        pass
    if not model and sys.platform == "darwin":
        result = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True)
        model = result.stdout.strip()
    used = " ".join(flag for flag in KERNEL_FLAGS if flag in flags) or "-"
    return f"{model or 'unknown CPU'}{f' ({family})' if 'model' in family else ''}; extensions: {used}"


# Memory bandwidth and the decode bound


def read_bandwidth(threads: int) -> float:
    """Measures memory read bandwidth in a child process. Not in this one: Linux counts a
    process's peak RSS in the ru_maxrss of every child it starts afterwards (vfork, then
    exec), so holding the 1 GiB buffer here would inflate both engines' peak RSS."""
    command = [sys.executable, __file__, "--bandwidth-worker", "--threads", str(threads)]
    return float(run_json(command, "the bandwidth measurement")["read_bytes_per_s"])


def bandwidth_worker(threads: int) -> None:
    """Bytes per second `threads` threads read from memory: numpy sums over 1 GiB, each
    thread its own slice (numpy releases the GIL while it sums), best of several tries."""
    try:
        import numpy as np
    except ImportError:
        raise BenchError("numpy is missing (llama-cpp-python depends on it): pip install numpy") from None

    data = np.ones(BANDWIDTH_BYTES // 8, dtype=np.int64)  # touched, so really in memory
    slices = np.array_split(data, threads)
    best = float("inf")
    for _ in range(BANDWIDTH_TRIES):
        workers = [threading.Thread(target=np.sum, args=(part,)) for part in slices]
        started = time.perf_counter()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        best = min(best, time.perf_counter() - started)
    print(json.dumps({"read_bytes_per_s": data.nbytes / best}))


# ggml_type -> (elements per block, bytes per block), from ggml's type traits.
GGML_BLOCKS = {
    0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34),
    9: (32, 36), 10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210),
    15: (256, 292), 16: (256, 66), 17: (256, 74), 18: (256, 98), 19: (256, 50), 20: (32, 18),
    21: (256, 110), 22: (256, 82), 23: (256, 136), 29: (256, 56), 30: (1, 2),
}  # fmt: skip


@dataclass
class GgufHeader:
    tensor_bytes: dict[str, int]
    """The stored size of each tensor."""
    integers: dict[str, int]
    """The metadata's integer values (the rest is skipped)."""


def read_gguf_header(path: Path) -> GgufHeader:
    """The tensor sizes and integer metadata of a GGUF file, from its header."""
    integer_formats = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 10: "Q", 11: "q"}
    scalar_sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
    with path.open("rb") as f:

        def read(fmt: str):
            return struct.unpack("<" + fmt, f.read(struct.calcsize(fmt)))[0]

        def skip_string() -> None:
            f.seek(read("Q"), os.SEEK_CUR)

        def skip_value(kind: int) -> None:
            if kind == 8:
                skip_string()
            elif kind == 9:
                element_kind, count = read("I"), read("Q")
                if element_kind in scalar_sizes:
                    f.seek(scalar_sizes[element_kind] * count, os.SEEK_CUR)
                else:
                    for _ in range(count):
                        skip_value(element_kind)
            else:
                f.seek(scalar_sizes[kind], os.SEEK_CUR)

        if f.read(4) != b"GGUF":
            raise BenchError(f"{path} is not a GGUF file")
        version = read("I")
        if version < 2:
            raise BenchError(f"{path}: GGUF version {version} is too old to size")
        n_tensors, n_metadata = read("Q"), read("Q")
        integers = {}
        for _ in range(n_metadata):
            key = f.read(read("Q")).decode()
            kind = read("I")
            if kind in integer_formats:
                integers[key] = read(integer_formats[kind])
            else:
                skip_value(kind)
        sizes = {}
        for _ in range(n_tensors):
            name = f.read(read("Q")).decode()
            elements = 1
            for _ in range(read("I")):
                elements *= read("Q")
            ggml_type = read("I")
            read("Q")  # offset
            if ggml_type not in GGML_BLOCKS:
                raise BenchError(f"{path}: tensor {name} has a ggml type ({ggml_type}) this script cannot size")
            block_elements, block_bytes = GGML_BLOCKS[ggml_type]
            sizes[name] = elements // block_elements * block_bytes
        return GgufHeader(sizes, integers)


def bytes_read_per_token(path: Path) -> int:
    """Weights a decoded token reads: all but the embedding, plus the head (the embedding
    itself when the model ties them); of a mixture's stacked experts (`*_exps`), only the
    share its router picks (`expert_used_count` of `expert_count`). The router and the
    shared experts are read whole."""
    header = read_gguf_header(path)
    sizes = header.tensor_bytes
    count = next((v for k, v in header.integers.items() if k.endswith(".expert_count")), 0)
    used = next((v for k, v in header.integers.items() if k.endswith(".expert_used_count")), 0)
    embedding = sizes.get("token_embd.weight", 0)
    tied_head = embedding if "output.weight" not in sizes else 0
    total = 0
    for name, size in sizes.items():
        if name == "token_embd.weight":
            continue
        total += size * used // count if count and "_exps." in name else size
    return total + tied_head


# ---------------------------------------------------------------------------------------
# Measurement rounds


@dataclass
class Samples:
    decode: list[float] = field(default_factory=list)
    prefill: list[float] = field(default_factory=list)
    peak_rss: list[int] = field(default_factory=list)
    system_info: str = ""

    def add(self, report: dict) -> None:
        self.system_info = report.get("system_info", "")
        self.decode.append(float(report["decode_tokens_per_s"]))
        self.prefill.append(float(report["prefill_512_tokens_per_s"]))
        self.peak_rss.append(int(report["peak_rss_bytes"]))


def run_json(command: list[str], what: str, crash_hint: str = "", env: dict[str, str] | None = None) -> dict:
    """Runs a command that prints a JSON object last; `crash_hint` is added to the error
    if it dies of a signal."""
    result = subprocess.run(command, check=False, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        tail = "\n".join(result.stderr.strip().splitlines()[-15:])
        hint = crash_hint if result.returncode < 0 else ""
        raise BenchError(f"{what} failed (exit {result.returncode}):\n{tail}{hint}")
    try:
        return json.loads(result.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        raise BenchError(f"{what} printed no JSON report:\n{result.stdout[-2000:]}") from None


def hearth_round(hearth: Path, model: Path, threads: int, decode_tokens: int) -> dict:
    command = [
        str(hearth), "bench", "--model", str(model), "--threads", str(threads),
        "--context", str(LLAMA_CONTEXT), "--decode-tokens", str(decode_tokens), "--repeat", "1",
    ]  # fmt: skip
    return run_json(command, "hearth bench")


LLAMA_CRASH_HINT = """
llama.cpp crashed. On Intel CPUs with AMX, llama-cpp-python 0.3.36's llama.cpp segfaults in
ggml_backend_amx_mul_mat on any batch of more than one token. Either rebuild it without AMX
(still for this CPU otherwise):
  CMAKE_ARGS='-DCMAKE_C_FLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" \\
    -DCMAKE_CXX_FLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"' \\
    pip install --force-reinstall --no-deps --no-cache-dir llama-cpp-python==0.3.36
or pass --llama-no-extra-buffers (no AMX, but no weight repacking either: slower llama.cpp)."""


def llama_round(model: Path, args: argparse.Namespace) -> dict:
    command = [
        sys.executable, __file__, "--llama-worker", str(model), "--threads", str(args.threads),
        "--decode-tokens", str(args.decode_tokens),
    ]  # fmt: skip
    if args.llama_no_extra_buffers:
        command.append("--llama-no-extra-buffers")
    env = dict(os.environ)
    if args.llama_omp_passive:
        # llama.cpp's OpenMP threads then sleep between parallel regions instead of spinning.
        env["OMP_WAIT_POLICY"] = "passive"
    return run_json(command, "the llama.cpp worker", LLAMA_CRASH_HINT, env)


def measure(model: Model, hearth: Path, args: argparse.Namespace) -> tuple[Samples, Samples]:
    hearth_samples, llama_samples = Samples(), Samples()
    for round_number in range(1, args.repeats + 1):
        log(f"{model.label}: round {round_number}/{args.repeats}: hearth")
        hearth_samples.add(hearth_round(hearth, model.path, args.threads, args.decode_tokens))
        log(f"{model.label}: round {round_number}/{args.repeats}: llama.cpp")
        llama_samples.add(llama_round(model.path, args))
    return hearth_samples, llama_samples


# ---------------------------------------------------------------------------------------
# The table


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):8.1f} ({min(values):.1f}-{max(values):.1f})"


def table(results: list[tuple[Model, Samples, Samples]], bandwidth: float) -> str:
    header = (
        f"{'model / engine':<34} {'decode tok/s':>22} {'prefill-512 tok/s':>24} "
        f"{'peak RSS':>10} {'of decode bound':>16}"
    )
    lines = [header, "-" * len(header)]
    for model, hearth, llama in results:
        per_token = bytes_read_per_token(model.path)
        bound = bandwidth / per_token
        lines.append(f"{model.label}  [{per_token / 2**20:.0f} MiB read per token -> bound {bound:.1f} tok/s]")
        for name, samples in (("hearth", hearth), ("llama.cpp", llama)):
            lines.append(
                f"  {name:<32} {spread(samples.decode):>22} {spread(samples.prefill):>24} "
                f"{max(samples.peak_rss) / 2**20:>6.0f} MiB {statistics.median(samples.decode) / bound:>15.0%}"
            )
        decode_ratio = statistics.median(hearth.decode) / statistics.median(llama.decode)
        prefill_ratio = statistics.median(hearth.prefill) / statistics.median(llama.prefill)
        lines.append(f"  {'hearth / llama.cpp':<32} {decode_ratio:>21.2f}x {prefill_ratio:>23.2f}x")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------


def warn_if_busy(threads: int) -> None:
    """Other work on the machine slows whichever engine it overlaps: say so up front."""
    load = os.getloadavg()[0]
    if load > 0.5:
        log(
            f"warning: the machine is busy (load average {load:.1f}, benchmark threads {threads}); "
            "the figures will be noisy and may favour either engine"
        )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="compute threads for both engines (default 2)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds per model (default 3)")
    parser.add_argument(
        "--models",
        default="default,1b-q4_k_m,1b-q4_0",
        help="comma-separated: default, <shape>-<quant> (shapes 1b, 3b, 8b, qwen3-30b-a3b, deepseek-v3; "
        "quants q4_k_m, q4_0, q2_k), or .gguf paths",
    )
    parser.add_argument("--hearth", help="the hearth binary (default: build it with cargo --release)")
    parser.add_argument("--decode-tokens", type=int, default=128, help="tokens decoded per round (default 128)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="where synthetic models are written")
    parser.add_argument(
        "--llama-no-extra-buffers",
        action="store_true",
        help="run llama.cpp without its repacked weight buffers (CPU_REPACK, AMX): a workaround for AMX crashes",
    )
    parser.add_argument(
        "--llama-omp-passive",
        action="store_true",
        help="OMP_WAIT_POLICY=passive for llama.cpp: its threads sleep instead of spinning, "
        "which it needs on a machine busy with other work",
    )
    parser.add_argument("--llama-worker", type=Path, metavar="MODEL", help=argparse.SUPPRESS)
    parser.add_argument("--bandwidth-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads < 1 or args.repeats < 1 or args.decode_tokens < 1:
        parser.error("--threads, --repeats and --decode-tokens must be at least 1")
    return args


def main() -> int:
    args = parse_args()
    try:
        if args.llama_worker:
            llama_worker(args.llama_worker, args.threads, args.decode_tokens, not args.llama_no_extra_buffers)
            return 0
        if args.bandwidth_worker:
            bandwidth_worker(args.threads)
            return 0
        llama_version = ensure_llama_cpp()
        hearth = hearth_binary(args.hearth)
        cache_dir = args.cache_dir or default_cache_dir()
        models = [resolve_model(spec.strip(), hearth, cache_dir) for spec in args.models.split(",") if spec.strip()]
        warn_if_busy(args.threads)
        load_before = os.getloadavg()[0]
        log(f"measuring memory read bandwidth with {args.threads} threads...")
        bandwidth = read_bandwidth(args.threads)
        results = [(model, *measure(model, hearth, args)) for model in models]
        load_after = os.getloadavg()[0]
    except BenchError as error:
        log(f"error: {error}")
        return 1
    print(
        f"threads {args.threads}, {args.repeats} alternating rounds, decode {args.decode_tokens} tokens "
        f"after a {DECODE_PROMPT_TOKENS}-token prompt, prefill {PREFILL_TOKENS} tokens; "
        f"median (min-max); llama-cpp-python {llama_version}; "
        f"memory read bandwidth {bandwidth / 1e9:.1f} GB/s ({args.threads} threads)"
    )
    print(f"CPU: {cpu_description()}")
    print(f"load average: {load_before:.1f} before, {load_after:.1f} after (this machine has {os.cpu_count()} CPUs)")
    print(f"llama.cpp's CPU features: {enabled_features(results[-1][2].system_info) if results else '-'}")
    print(f"llama.cpp's settings: {llama_settings(args)}")
    print(table(results, bandwidth))
    return 0


def llama_settings(args: argparse.Namespace) -> str:
    extra_buffers = "off" if args.llama_no_extra_buffers else "on (weights repacked)"
    wait_policy = "passive" if args.llama_omp_passive else os.environ.get("OMP_WAIT_POLICY", "default (spinning)")
    return (
        f"n_ctx {LLAMA_CONTEXT}, n_batch {PREFILL_TOKENS}, extra buffers {extra_buffers}, OMP_WAIT_POLICY {wait_policy}"
    )


def enabled_features(system_info: str) -> str:
    """The features llama_print_system_info() marks `= 1` (SIMD sets, AMX, REPACK...)."""
    pairs = (item.split("=") for item in system_info.replace("CPU :", "|").split("|") if "=" in item)
    return " ".join(name.strip() for name, value in pairs if value.strip() == "1")


if __name__ == "__main__":
    sys.exit(main())
