"""Benchmark: two costs of the export stage's checks, side by side on a finished demo run, as JSON.

1. Answering a file's held-out prompts on a 4-slot llama.cpp server on one thread (the GGUF
   checks' setting while the .pte builds on the other core), with and without the slots' prompt
   cache (`cache_prompt`: a slot reuses the start its last prompt shares with the next, the chat
   template's system turn). Runs alternate (off, on, off, on); also reported: how many answers
   are the same as the first uncached run's, and whether the two cached runs are identical.
2. The draft check (`export/draft.py`) at `draft_max` 8 and 3, wall seconds and acceptance.

The fp32 matmul anchor is measured before and after.

    .venv/bin/python bench/export_checks.py runs/demo [--file q8_0]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from demo_timings import matmul_gflops

from edgedistill.data.store import load_distill_set
from edgedistill.export.draft import measure_drafts
from edgedistill.export.verify import LlamaCppClient, greedy_answers, serve
from edgedistill.models.hf import encode_prompts, load_tokenizer, resolve_source
from edgedistill.run import RunDir


def answer_runs(gguf: Path, prompts: list[list[int]], n_predict: int) -> list[dict]:
    """Four runs, cache off/on alternating, each on a fresh 4-slot one-thread server."""
    runs = []
    for cache in (False, True, False, True):
        with serve(gguf, slots=4, threads=1) as server:
            client = LlamaCppClient(server, slots=4)
            post = client._post

            def with_cache(route: str, body: dict, _cache: bool = cache, _post=post):
                many = route == "/completion" and isinstance(body.get("prompt"), list) and \
                    bool(body["prompt"]) and isinstance(body["prompt"][0], list)
                return _post(route, body | {"cache_prompt": _cache} if many else body)

            client._post = with_cache
            try:
                greedy_answers(client, prompts[:4], 8)  # warm-up
                started = time.perf_counter()
                answers, _ = greedy_answers(client, prompts, n_predict)
                runs.append({"cache_prompt": cache, "seconds": round(time.perf_counter() - started, 2),
                             "answers": answers})
            finally:
                client.close()
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a finished demo run folder")
    parser.add_argument("--file", default="q8_0", help="the run's GGUF type to answer with")
    args = parser.parse_args()
    run = RunDir(args.run)
    heldout = load_distill_set(run, split="heldout")
    name = next(run.export_dir.glob(f"*-{args.file}.gguf"))
    anchors = [matmul_gflops()]
    runs = answer_runs(name, [s.prompt_ids.tolist() for s in heldout], 64)
    first = runs[0]["answers"]
    cached = [r for r in runs if r["cache_prompt"]]
    answering = {"file": name.name, "prompts": len(heldout), "runs": [
        {k: r[k] for k in ("cache_prompt", "seconds")} | {"same_as_first_uncached": sum(
            a == b for a, b in zip(r["answers"], first))} for r in runs],
        "cached_runs_identical": cached[0]["answers"] == cached[1]["answers"]}
    anchors.append(matmul_gflops())
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
