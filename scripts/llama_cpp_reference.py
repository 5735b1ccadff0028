#!/usr/bin/env python3
"""Reference outputs of llama.cpp for tiny synthetic models, for the tests to compare with.

Writes each model with the project's own writer (`synthetic_gguf`, which gives the same
bytes for the same seed), runs it through llama.cpp (llama-cpp-python 0.3.36, which pip
builds from source) and records, for a fixed prompt of token ids: the logits at every
position of the prompt and of a greedy continuation, the greedy tokens, and the file's
SHA-256 (the test checks that its own copy of the file is the same).

    pip install llama-cpp-python==0.3.36
    cargo build --release -p hearth-models --examples
    python3 scripts/llama_cpp_reference.py [--suite moe|quants|gemma3|gpt-oss|deepseek-kv-b] [--out PATH]

Suites: `moe` (the default) writes models/tests/fixtures/moe_llama_cpp.json, the mixtures
of experts; `quants` writes models/tests/fixtures/quant_llama_cpp.json, a model in each of
the low-bit and 5-bit mixes (Q2_K, Q3_K_M, Q5_0, Q5_1) and in BF16, keeping only the prompt's last
row of logits (all that its test compares) to keep the file small; `gemma3` writes
models/tests/fixtures/gemma3_llama_cpp.json, Gemma 3's layout, with a prompt long enough
(and a generation after it) that its sliding windows of 4 positions move past the 64
positions Hearth's caches forget at a time, also keeping only the prompt's last row;
`gpt-oss` writes models/tests/fixtures/gpt_oss_llama_cpp.json, gpt-oss's layout (in its
own MXFP4_MOE mix and in Q4_K_M) and MXFP4 experts in Qwen3-MoE's, with the same long
prompt past its windows of 8 positions; `deepseek-kv-b` writes
models/tests/fixtures/deepseek_kv_b_llama_cpp.json, DeepSeek's layout as llama.cpp converted
it before MLA (`attn_kv_b`), which llama.cpp runs as multi-head attention.
"""

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# (shape, quantization, seed) of each model per suite; the tests write the same ones.
SUITES = {
    "moe": [
        ("tiny-mixtral", "q4_0", 1),
        ("tiny-mixtral", "q4_k_m", 1),
        ("tiny-qwen3moe", "q4_0", 1),
        ("tiny-qwen3moe", "q4_k_m", 1),
        ("tiny-deepseek2", "q4_0", 1),
        ("tiny-deepseek2", "q4_k_m", 1),
    ],
    # tiny-mixtral's embedding is in the mix's base type (its head is untied); tiny is dense.
    "quants": [
        ("tiny-mixtral", "q2_k", 1),
        ("tiny-mixtral", "q3_k_m", 1),
        ("tiny-mixtral", "q5_0", 1),
        ("tiny-mixtral", "q5_1", 1),
        ("tiny", "q2_k", 1),
        ("tiny", "q3_k_m", 1),
        ("tiny", "q5_0", 1),
        ("tiny", "bf16", 1),
        ("tiny-qwen3moe", "bf16", 1),
    ],
    "gemma3": [
        ("tiny-gemma3", "q4_0", 1),
        ("tiny-gemma3", "q4_k_m", 1),
    ],
    "gpt-oss": [
        ("tiny-gpt-oss", "mxfp4_moe", 1),
        ("tiny-gpt-oss", "q4_k_m", 1),
        ("tiny-qwen3moe", "mxfp4_moe", 1),
    ],
    "deepseek-kv-b": [
        ("tiny-deepseek2-kv-b", "q4_0", 1),
        ("tiny-deepseek2-kv-b", "q4_k_m", 1),
    ],
}
FIXTURES = {
    "moe": "moe_llama_cpp.json",
    "quants": "quant_llama_cpp.json",
    "gemma3": "gemma3_llama_cpp.json",
    "gpt-oss": "gpt_oss_llama_cpp.json",
    "deepseek-kv-b": "deepseek_kv_b_llama_cpp.json",
}
PROMPT = [300, 17, 942, 5, 611, 88, 123, 45]
STEPS = 12
# Ids below the synthetic vocabulary's control tokens (768 of 1024), in no order.
LONG_PROMPT = [(37 * i + 11) % 760 for i in range(140)]
# The prompt and greedy steps of each suite.
RUNS = {
    "moe": (PROMPT, STEPS),
    "quants": (PROMPT, STEPS),
    "gemma3": (LONG_PROMPT, 16),
    "gpt-oss": (LONG_PROMPT, 16),
    "deepseek-kv-b": (PROMPT, STEPS),
}


def writer() -> Path:
    target = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
    if not target.is_absolute():
        target = REPO / target
    binary = target / "release" / "examples" / "synthetic_gguf"
    if not binary.exists():
        sys.exit(f"{binary} is missing: run `cargo build --release -p hearth-models --examples` first")
    return binary


def reference(path: Path, prompt: list, steps: int, every_prompt_row: bool) -> dict:
    import llama_cpp  # imported here so that --help works without it
    import numpy as np

    model = llama_cpp.Llama(
        model_path=str(path), n_ctx=256, n_threads=2, n_batch=256, logits_all=True, verbose=False, seed=0
    )
    model.eval(prompt)
    # Logits of every prompt position: what a prefill computes, row by row.
    prompt_logits = np.array(model.eval_logits, dtype=np.float32)
    kept_rows = prompt_logits if every_prompt_row else prompt_logits[-1:]
    tokens, step_logits = [], []
    logits = prompt_logits[-1]
    for _ in range(steps):
        token = int(np.argmax(logits))
        tokens.append(token)
        model.eval([token])
        logits = np.array(model.eval_logits[-1], dtype=np.float32)
        step_logits.append(logits)
    return {
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "prompt_logits": [[float(f"{x:.7g}") for x in row] for row in kept_rows],
        "generated_ids": tokens,
        "step_logits": [[float(f"{x:.7g}") for x in row] for row in step_logits],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=sorted(SUITES), default="moe")
    parser.add_argument("--out", help="default: models/tests/fixtures/<the suite's fixture>")
    args = parser.parse_args()
    out = args.out or str(REPO / "models/tests/fixtures" / FIXTURES[args.suite])
    import llama_cpp

    binary = writer()
    prompt, steps = RUNS[args.suite]
    results = {
        "llama_cpp_python": llama_cpp.__version__,
        "prompt_ids": prompt,
        "steps": steps,
        "models": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        for shape, quant, seed in SUITES[args.suite]:
            path = Path(tmp) / f"{shape}-{quant}-{seed}.gguf"
            subprocess.run(
                [str(binary), "--shape", shape, "--quant", quant, "--seed", str(seed), "--out", str(path)],
                check=True,
                stdout=subprocess.DEVNULL,
            )
            entry = {"shape": shape, "quantization": quant, "seed": seed, **reference(path, prompt, steps, args.suite == "moe")}
            print(f"{shape} {quant}: greedy {entry['generated_ids']}")
            results["models"].append(entry)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(results, separators=(",", ":")) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
