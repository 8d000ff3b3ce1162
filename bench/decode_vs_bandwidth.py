"""Benchmark: llama.cpp decode speed against this machine's memory-bandwidth bound.

Decoding one token reads every weight once, so tokens/s can not beat
bandwidth ÷ bytes of weights. This measures the bandwidth (a large array copy, best of 5),
then decodes with llama.cpp (batch 1, 128 tokens, 2 threads) for the teacher and for a run's
student at each GGUF type — the teacher exported at the same types in the same run — and
reports each measured speed as a fraction of its bound. Prints JSON.

    .venv/bin/python bench/decode_vs_bandwidth.py runs/demo [--types f16,q8_0,q4_k_m]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from gguf import GGUFReader

from edgedistill.export.gguf import export_gguf
from edgedistill.export.verify import LlamaCppClient, serve, speed
from edgedistill.models.hf import gguf_as_safetensors, resolve_source


def copy_bandwidth_gbs(size_bytes: int = 1 << 30, repeat: int = 5) -> float:
    """GB/s of memory traffic for a large copy (read + write)."""
    source = np.ones(size_bytes // 8, dtype=np.float64)
    target = np.empty_like(source)
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        np.copyto(target, source)
        best = min(best, time.perf_counter() - started)
    return 2 * source.nbytes / best / 1e9


def weight_bytes(path: Path) -> int:
    return sum(int(t.n_bytes) for t in GGUFReader(path).tensors)


def measure(path: Path, bandwidth: float, prompt: list[int], tokens: int) -> dict:
    with serve(path, threads=2, ctx=1024) as server:
        client = LlamaCppClient(server)
        try:
            decode = speed(client, prompt, tokens)["decode_tokens_per_s"]
        finally:
            client.close()
    read = weight_bytes(path)
    bound = bandwidth * 1e9 / read
    return {"file": path.name, "weight_MB": round(read / 1e6, 1), "decode_tokens_per_s": round(decode, 1),
            "bound_tokens_per_s": round(bound, 1), "fraction_of_bound": round(decode / bound, 3)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run", type=Path)
    parser.add_argument("--types", default="f16,q8_0,q4_k_m")
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args()
    bandwidth = copy_bandwidth_gbs()
    prompt = list(range(100, 132))
    results: dict = {"benchmark": "decode_vs_bandwidth", "copy_bandwidth_GBps": round(bandwidth, 2),
                     "decode_tokens": args.tokens, "teacher": {}, "student": {}}
    teacher_folder = gguf_as_safetensors(resolve_source("embedded"))
    with tempfile.TemporaryDirectory() as tmp:
        for export_type in args.types.split(","):
            teacher_file = export_gguf(teacher_folder, Path(tmp) / f"teacher-{export_type}.gguf", export_type,
                                       name="teacher").path
            results["teacher"][export_type] = measure(teacher_file, bandwidth, prompt, args.tokens)
            student_file = next((args.run / "export").glob(f"*-{export_type}.gguf"), None)
            if student_file is not None:
                results["student"][export_type] = measure(student_file, bandwidth, prompt, args.tokens)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
