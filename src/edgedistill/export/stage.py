"""The export stage: the trained student (or any Hugging Face model folder) as GGUF files for
llama.cpp / Ollama, each checked in llama.cpp.

The folder is converted once to F32 by llama.cpp's converter (export/gguf.py) and every type of
the recipe is written from that file. Each file is then loaded in llama.cpp and checked
against transformers — tokenizer ids on mixed English/Japanese/emoji text, the chat template,
greedy tokens and log-probabilities (near-ties counted apart) — and measured: size, bits per
weight, prefill/decode speed, KL and top-1 agreement against the highest-precision file on
held-out text, and (in a run) ROUGE-L/chrF of its greedy answers against the teacher's, the
refusal and leakage audits and, when the evaluate stage scores thinking, task accuracy with
thinking on and off, so GGUF rows join the evaluate tables. Results go to the ledger (subjects
`gguf:<type>` and `parity`), `export.md` and `export.json` (each file with its architecture and
parity figures); an Ollama Modelfile points at the best small file and a model card
(README.md) goes with the files.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from edgedistill.console import console, stage_progress
from edgedistill.data.store import load_distill_set
from edgedistill.errors import UserError
from edgedistill.evaluate.audit import AuditInputs
from edgedistill.evaluate.audit_report import licence_for_export, licence_text
from edgedistill.evaluate.metrics import peak_rss_bytes, rouge_by_lang
from edgedistill.evaluate.report import greedy_summary
from edgedistill.export.card import write_model_card
from edgedistill.export.edge import (
    PteBuilds,
    export_edge,
    start_pte_builds,
    write_device_bundle,
)
from edgedistill.export.gguf import convert_folder, write_type
from edgedistill.export.gguf_audit import audit_file
from edgedistill.export.gguf_reasoning import ThinkingSets, reasoning_file
from edgedistill.export.ollama import write_modelfile
from edgedistill.export.verify import (
    LlamaCppClient,
    check_parity,
    greedy_answers,
    serve,
    sparse_kl_top1,
    speed,
    teacher_forced,
)
from edgedistill.models.reasoning import model_style
from edgedistill.recipe import GGUF_TYPES, Recipe
from edgedistill.run import Ledger, RunDir, atomic_write_text


def _markdown(rows: list[dict], parity: dict[str, float], reference: str) -> str:
    lines = ["| file | type | size MB | bits/weight | KL vs " + reference + " | top-1 vs " + reference
             + " | prefill tok/s | decode tok/s |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        kl = "—" if r["type"] == reference else f"{r.get('kl_vs_reference', float('nan')):.4f}"
        top1 = "—" if r["type"] == reference else f"{r.get('top1_vs_reference', float('nan')):.1%}"
        lines.append(f"| {r['file']} | {r['type']} | {r['size_bytes'] / 1e6:.1f} | {r['bits_per_weight']:.2f} | "
                     f"{kl} | {top1} | {r['prefill_tokens_per_s']:.0f} | {r['decode_tokens_per_s']:.1f} |")
    lines += ["", f"Parity of `{reference}` with transformers: tokenizer "
              f"{'identical' if parity.get('tokenizer_match') else 'DIFFERENT'} on a mixed English/Japanese/emoji "
              f"text, chat template {'identical' if parity.get('template_match') else 'DIFFERENT'}, "
              f"{greedy_summary(parity)}, largest log-prob difference "
              f"{parity.get('max_logprob_diff', float('nan')):.4f} over {int(parity.get('compared_positions', 0))} "
              "listed entries."]
    return "\n".join(lines) + "\n"


@dataclass
class Checks:
    """What each file is checked and measured on."""

    conversations: list[list[dict[str, str]]]  # parity prompts (chat)
    sequences: list[list[int]]  # token ids of held-out text, for KL / top-1 against the reference file
    quality: list  # held-out Samples whose teacher answers the file's greedy answers are scored against
    parity_tokens: int
    eval_positions: int
    speed_prompt_tokens: int
    speed_tokens: int
    answer_tokens: int
    audit: AuditInputs | None = None  # refusal and leakage audits, as the evaluate stage runs them
    thinking: ThinkingSets | None = None  # eval sets with thinking on and off, as the evaluate stage scores them


def write_and_check(source: Path, out_dir: Path, name: str, types: list[str], metadata: dict[str, str],
                    embeddings_type: str, checks: Checks, model, tokenizer,
                    shared_cpu: Callable[[], bool] | None = None) -> tuple[list[dict], dict[str, float]]:
    """Every GGUF type of the model folder `source`, written into `out_dir` and checked: one row
    per file (the first type is the reference) and the reference file's parity figures. With
    `shared_cpu` (True while a .pte build holds the other core) a file's checks run on one thread
    then, and speed, time to first token and memory are left to the caller's `measure_speeds`
    once the machine is quiet; without it they are measured here, after the checks."""
    rows: list[dict] = []
    reference_parity: dict[str, float] = {}
    reference_dist = None
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".convert-") as tmp, stage_progress() as progress:
        task = progress.add_task("export", total=len(types) + 1, rate="converting (llama.cpp's converter)")
        f32 = Path(tmp) / "f32.gguf"
        started = time.perf_counter()
        architecture = convert_folder(source, f32, name=name, metadata=metadata)
        convert_seconds = round(time.perf_counter() - started, 2)
        progress.update(task, advance=1, rate=f"{architecture}")
        for export_type in types:
            path = out_dir / f"{name}-{export_type}.gguf"
            row: dict = {"file": path.name, "type": export_type, "architecture": architecture,
                         "seconds": {"convert_f32": convert_seconds} if not rows else {}}
            with _timed(row, "write"):
                result = write_type(f32, path, export_type, architecture, embeddings_type)
            row |= {"size_bytes": result.size_bytes, "bits_per_weight": result.bits_per_weight,
                    "parameters": result.parameters, "tensor_types": result.tensor_types}
            threads = 1 if shared_cpu and shared_cpu() else 2
            with serve(path, slots=ANSWER_SLOTS, threads=threads) as server, torch_threads(threads):
                client = LlamaCppClient(server, slots=ANSWER_SLOTS)
                try:
                    if checks.conversations:
                        with _timed(row, "parity"):
                            check = check_parity(client, model, tokenizer, checks.conversations, checks.parity_tokens)
                        row["parity"] = check.as_metrics()
                        if export_type == types[0]:
                            reference_parity = row["parity"]
                            if check.first_difference:
                                console.print(f"[yellow]parity note ({export_type}): {check.first_difference}[/]")
                    if checks.eval_positions and checks.sequences and len(types) > 1:
                        with _timed(row, "kl_positions"):
                            dist = teacher_forced(client, checks.sequences, checks.eval_positions)
                        if export_type == types[0]:
                            reference_dist = dist
                        else:
                            row |= sparse_kl_top1(reference_dist, dist)
                    if checks.quality:  # the same comparison as the evaluate stage, in llama.cpp
                        with _timed(row, "answers"):
                            answers, _ = greedy_answers(client, [s.prompt_ids.tolist() for s in checks.quality],
                                                        checks.answer_tokens)
                        row |= rouge_by_lang(answers, checks.quality)
                    if checks.audit is not None:
                        with _timed(row, "audit"):
                            row |= audit_file(client, checks.audit, tokenizer)
                    if checks.thinking is not None:
                        with _timed(row, "thinking"):
                            row |= reasoning_file(client, checks.thinking, tokenizer)
                finally:
                    client.close()
            rows.append(row)
            progress.update(task, advance=1, rate=f"{export_type}: checked" + (" on one thread" if threads == 1 else ""))
    if shared_cpu is None:
        measure_speeds(rows, out_dir, checks, tokenizer)
    return rows, reference_parity


# Held-out prompts answered one at a time for a file's time to first token.
TTFT_PROMPTS = 4


def measure_speeds(rows: list[dict], out_dir: Path, checks: Checks, tokenizer) -> None:
    """Each file's prefill/decode speed, time to first token (TTFT_PROMPTS held-out prompts, one
    at a time) and the server's peak memory, from a fresh one-slot server on two threads: run
    after the .pte build, so no file is timed while another process holds a core."""
    from edgedistill.models.hf import encode_prompts

    prompt = (sum(checks.sequences, []) * 8)[:checks.speed_prompt_tokens] or encode_prompts(
        tokenizer, [[{"role": "user", "content": "Hello"}]])[0]
    for row in rows:
        with serve(out_dir / row["file"]) as server:
            client = LlamaCppClient(server)
            try:
                with _timed(row, "speed"):
                    row |= speed(client, prompt, checks.speed_tokens)
                    if checks.quality:
                        _, row["time_to_first_token_s"] = greedy_answers(
                            client, [s.prompt_ids.tolist() for s in checks.quality[:TTFT_PROMPTS]], checks.answer_tokens)
                if (peak := peak_rss_bytes(server.process.pid)) is not None:
                    row["peak_rss_bytes"] = peak
            finally:
                client.close()


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """torch's intra-op threads set for a block (the transformers side of the parity checks)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(min(threads, before))
    try:
        yield
    finally:
        torch.set_num_threads(before)


# llama.cpp slots answering a file's held-out, audit and thinking prompts together, each check's
# prompts in one request (verify.LlamaCppClient.complete_many; bench/export_checks.py).
ANSWER_SLOTS = 8


@contextmanager
def _timed(row: dict, step: str) -> Iterator[None]:
    """Wall seconds of one step of a file's checks, kept in export.json (`seconds`): where the
    export stage's time goes."""
    started = time.perf_counter()
    yield
    row["seconds"][step] = round(time.perf_counter() - started, 3)


def _numbers(row: dict) -> dict[str, float]:
    """A file's row as ledger metrics (its parity figures prefixed)."""
    flat = {k: v for k, v in row.items() if isinstance(v, (int, float))}
    return flat | {f"parity_{k}": v for k, v in (row.get("parity") or {}).items()}


def _write_tables(out_dir: Path, title: str, rows: list[dict], parity: dict[str, float], reference: str,
                  edge_markdown: str = "", edge_record: dict | None = None) -> str:
    """export.md and export.json; `edge_*`: the .pte files and the draft check of a run."""
    table = _markdown(rows, parity, reference) + edge_markdown
    atomic_write_text(out_dir / "export.md", f"# GGUF export — {title}\n\n{table}")
    atomic_write_text(out_dir / "export.json", json.dumps({"reference": reference, "files": rows, "parity": parity}
                                                          | (edge_record or {}), indent=2))
    return table


def _modelfile(out_dir: Path, name: str, types: list[str], tokenizer, source: Path, licence: str = "") -> None:
    small = next((t for t in ("q8_0", "q4_k_m", "q5_k_m", "q6_k", "q4_0") if t in types), types[-1])
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    write_modelfile(out_dir, f"{name}-{small}.gguf", template, [tokenizer.eos_token] if tokenizer.eos_token else [],
                    style=model_style(source, tokenizer), licence=licence)


def run_export(recipe: Recipe, run: RunDir, ledger: Ledger) -> dict[str, float]:
    from edgedistill.models.hf import load_causal_lm

    cfg = recipe.export
    source = run.student_dir
    if not (source / "config.json").is_file():
        raise UserError(f"{source}: no trained student — run the train stage first")
    types = sorted(dict.fromkeys(cfg.types), key=GGUF_TYPES.index)
    heldout = load_distill_set(run, split="heldout")
    meta = ledger.meta()
    metadata = {"general.license": licence_for_export(recipe, ledger), "edgedistill.run": recipe.run.name,
                "edgedistill.teacher": meta.get("teacher", recipe.teacher.model),
                "edgedistill.student": meta.get("student_init", ""),
                "edgedistill.tokenizer": meta.get("student_tokenizer", ""),
                "edgedistill.training": meta.get("kd_mode", ""),
                "edgedistill.distill_set": json.loads(run.distill_set_path.read_text(encoding="utf-8"))["settings"]}
    run.export_dir.mkdir(parents=True, exist_ok=True)
    builds = start_pte_builds(recipe, run, heldout)  # beside the GGUF checks, in a second process
    try:
        model, tokenizer, _ = load_causal_lm(str(source))
        return _export_files(recipe, run, ledger, types, heldout, meta, metadata, model, tokenizer, builds)
    finally:
        if builds:
            builds.close()


def _export_files(recipe: Recipe, run: RunDir, ledger: Ledger, types: list[str], heldout, meta: dict, metadata: dict,
                  model, tokenizer, builds: PteBuilds | None) -> dict[str, float]:
    """The GGUF files written and checked (on one thread while `builds` holds the other core),
    then timed on the quiet machine, then everything that follows them."""
    cfg, source = recipe.export, run.student_dir
    checks = Checks(conversations=[s.prompt_messages for s in heldout[:cfg.parity_prompts]],
                    sequences=[s.prompt_ids.tolist() + s.answer_ids.tolist() for s in heldout],
                    quality=heldout[:cfg.quality_prompts], parity_tokens=cfg.parity_tokens,
                    eval_positions=cfg.eval_positions, speed_prompt_tokens=cfg.speed_prompt_tokens,
                    speed_tokens=cfg.speed_tokens,
                    answer_tokens=recipe.evaluate.max_new_tokens or recipe.generate.max_new_tokens,
                    audit=AuditInputs.of(recipe, load_distill_set(run, split="train"), heldout, meta.get("canaries")),
                    thinking=ThinkingSets.of(recipe, heldout, model_style(source, tokenizer)))
    rows, parity = write_and_check(source, run.export_dir, recipe.run.name, types, metadata, cfg.embeddings_type,
                                   checks, model, tokenizer, shared_cpu=builds.busy if builds else lambda: False)
    if builds:
        builds.results()  # wait: the timings below need both cores
    measure_speeds(rows, run.export_dir, checks, tokenizer)
    return _finish_export(recipe, run, ledger, types, rows, parity, model, tokenizer, heldout, builds)


def _finish_export(recipe: Recipe, run: RunDir, ledger: Ledger, types: list[str], rows: list[dict],
                   parity: dict[str, float], model, tokenizer, heldout, builds: PteBuilds | None) -> dict[str, float]:
    """Ledger rows, Modelfile, the .pte checks and the draft, export.md/json, card and bundle."""
    source = run.student_dir
    for row in rows:
        ledger.log_metrics("export", f"gguf:{row['type']}", _numbers(row))
    if parity:
        ledger.log_metrics("export", "parity", parity)
    ledger.set_meta("export_architecture", rows[0]["architecture"])
    _modelfile(run.export_dir, recipe.run.name, types, tokenizer, source, licence_text(recipe, ledger))
    edge = export_edge(recipe, run, ledger, tokenizer, heldout, rows, builds)  # .pte files, the student as a draft
    table = _write_tables(run.export_dir, f"run `{recipe.run.name}`", rows, parity, types[0], edge.markdown,
                          edge.record)
    write_model_card(recipe, run, ledger, table)
    write_device_bundle(recipe, run, tokenizer)  # export/bundle/: the files to copy to a phone
    console.print(table)
    return {"files": len(rows), "reference_bits": rows[0]["bits_per_weight"]} | \
        {f"parity_{k}": v for k, v in parity.items()}


def export_folder(folder: Path, out_dir: Path, types: list[str], *, name: str | None = None,
                  embeddings_type: str = "q8_0", parity_prompts: int = 4, parity_tokens: int = 24,
                  eval_positions: int = 512) -> list[dict]:
    """Any Hugging Face model folder (trained anywhere) as checked GGUF files in `out_dir`:
    `edgedistill export FOLDER --out DIR`. Parity and KL run on held-out prompts of the bundled
    English/Japanese seeds and on the model's own greedy answers to them."""
    from edgedistill.data.prompts import load_prompts
    from edgedistill.models.hf import generate_batch, load_causal_lm, resolve_source
    from edgedistill.models.licence import gguf_licence_name, read_folder_licence

    resolve_source(str(folder))  # config.json, safetensors, an architecture transformers knows
    name = name or folder.resolve().name
    types = sorted(dict.fromkeys(types), key=GGUF_TYPES.index)
    model, tokenizer, _ = load_causal_lm(str(folder))
    prompts = [p for p in load_prompts(["bundled:en", "bundled:ja"], 0.2) if p.split == "heldout"]
    prompts = prompts[:max(parity_prompts, 8)]
    answers = generate_batch(model, tokenizer, [p.messages for p in prompts], max_new_tokens=48, temperature=0.0,
                             top_k_logprobs=None)
    checks = Checks(conversations=[p.messages for p in prompts[:parity_prompts]],
                    sequences=[a.prompt_ids + a.token_ids for a in answers], quality=[],
                    parity_tokens=parity_tokens, eval_positions=eval_positions, speed_prompt_tokens=128,
                    speed_tokens=64, answer_tokens=48)
    out_dir.mkdir(parents=True, exist_ok=True)
    metadata = {"general.license": gguf_licence_name(read_folder_licence(folder)),
                "edgedistill.source": str(folder.resolve())}
    rows, parity = write_and_check(folder, out_dir, name, types, metadata, embeddings_type, checks, model, tokenizer)
    _modelfile(out_dir, name, types, tokenizer, folder)
    console.print(_write_tables(out_dir, f"`{folder}`", rows, parity, types[0]))
    return rows
