"""Benchmark: two costs of the export stage's checks, side by side on a finished demo run, as JSON.

1. Answering a file's held-out prompts and its audit (refusal requests, leakage probes) on one
   llama.cpp thread (the GGUF checks' setting while the .pte builds on the other core): 4 slots
   with 4 prompts per request (until commit f79f2ba: each request waits for its slowest answer)
   against 8 slots with all of a check's prompts in one request (continuous batching: a slot
   takes the next prompt as soon as it is free). Runs alternate (before, after, before, after),
   each on a fresh server; also reported: how many answers are the same as the first run's, and
   whether the two runs of each setting are identical.
2. The draft check (`export/draft.py`) at `draft_max` 8 and 3, wall seconds and acceptance.

The fp32 matmul anchor is measured before, between and after.

    .venv/bin/python bench/export_checks.py runs/demo [--file q8_0] [--skip-draft]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from demo_timings import matmul_gflops

from edgedistill.data.store import load_distill_set
from edgedistill.evaluate.audit import AuditInputs
from edgedistill.export.draft import measure_drafts
from edgedistill.export.gguf_audit import audit_file
from edgedistill.export.verify import LlamaCppClient, greedy_answers, serve
from edgedistill.models.hf import encode_prompts, load_tokenizer, resolve_source
from edgedistill.recipe import load_recipe
from edgedistill.run import Ledger, RunDir


def chunked(client: LlamaCppClient, prompts: list[list[int]], n_predict: int) -> list[dict]:
    """The answering before: `client.slots` prompts per request, one request after another."""
    replies: list[dict] = []
    for start in range(0, len(prompts), client.slots):
        replies += LlamaCppClient.complete_many(client, prompts[start:start + client.slots], n_predict)
    return replies


def answer_runs(gguf: Path, prompts: list[list[int]], n_predict: int, inputs: AuditInputs, tokenizer) -> list[dict]:
    """Four runs, before / after alternating, each on a fresh one-thread server."""
    runs = []
    for setting, slots in (("4 slots, 4 per request", 4), ("8 slots, one request", 8)) * 2:
        with serve(gguf, slots=slots, threads=1) as server:
            client = LlamaCppClient(server, slots=slots)
            if slots == 4:
                client.complete_many = lambda many, n, _client=client: chunked(_client, many, n)
            try:
                greedy_answers(client, prompts[:4], 8)  # warm-up
                started = time.perf_counter()
                answers, _ = greedy_answers(client, prompts, n_predict)
                answered = time.perf_counter()
                audit = audit_file(client, inputs, tokenizer)["audit"]
                runs.append({"setting": setting, "answers_seconds": round(answered - started, 2),
                             "audit_seconds": round(time.perf_counter() - answered, 2),
                             "answers": answers + [r["answer"] for r in audit["safety"]]
                             + [r["continuation"] for r in audit["probes"]]})
            finally:
                client.close()
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a finished demo run folder")
    parser.add_argument("--file", default="q8_0", help="the run's GGUF type to answer with")
    parser.add_argument("--skip-draft", action="store_true", help="only the answering part")
    args = parser.parse_args()
    run = RunDir(args.run)
    heldout = load_distill_set(run, split="heldout")
    name = next(run.export_dir.glob(f"*-{args.file}.gguf"))
    recipe = load_recipe(run.recipe_path)
    ledger = Ledger(run.ledger_path)
    inputs = AuditInputs.of(recipe, load_distill_set(run, split="train"), heldout, ledger.meta().get("canaries"))
    tokenizer = load_tokenizer(str(run.student_dir))
    anchors = [matmul_gflops()]
    runs = answer_runs(name, [s.prompt_ids.tolist() for s in heldout], 64, inputs, tokenizer)
    first = runs[0]["answers"]
    answering = {"file": name.name, "heldout_prompts": len(heldout), "audit_requests": len(first) - len(heldout),
                 "runs": [{k: r[k] for k in ("setting", "answers_seconds", "audit_seconds")}
                          | {"same_as_first_run": sum(a == b for a, b in zip(r["answers"], first))} for r in runs],
                 "repeat_exactly": [runs[0]["answers"] == runs[2]["answers"], runs[1]["answers"] == runs[3]["answers"]]}
    anchors.append(matmul_gflops())
    if args.skip_draft:
        print(json.dumps({"benchmark": "export_checks", "run": str(args.run), "answering": answering,
                          "anchor_matmul_fp32_gflops": [round(a, 1) for a in anchors]}, indent=2))
        return
    source = resolve_source("embedded")
    drafts = {"before": run.export_dir / "draft" / name.name.replace(f"-{args.file}", f"-before-kd-{args.file}"),
              "after": name}
    prompts = encode_prompts(load_tokenizer(str(run.student_dir)), [s.prompt_messages for s in heldout[:4]])
    draft = {}
    for n_max in (8, 3):
        started = time.perf_counter()
        result = measure_drafts(source.folder / source.gguf_file, drafts, prompts, 48, n_max=n_max)
        draft[f"n_max_{n_max}"] = {"seconds": round(time.perf_counter() - started, 1)} | {
            label: {k: round(v, 3) for k, v in r.items()} for label, r in result.items()}
    anchors.append(matmul_gflops())
    print(json.dumps({"benchmark": "export_checks", "run": str(args.run), "answering": answering, "draft": draft,
                      "anchor_matmul_fp32_gflops": [round(a, 1) for a in anchors]}, indent=2))


if __name__ == "__main__":
    main()
