"""What the export stage adds beside the GGUF files: the student as ExecuTorch programs for
phones (each checked in ExecuTorch's runtime as the GGUF files are in llama.cpp), the student
before and after KD as the teacher's speculative-decoding draft, and the on-device bundle.

Ledger (stage `export`): subjects `pte:<type>` (size, speed, KL/top-1 against the fp32 student
in transformers, parity with the transformers model of the program's own numerics), and `draft`
(`draft_acceptance_before` / `draft_acceptance_after` in 0-1, tokens/s, speed-ups, identical
outputs). export.json gets a `pte` list, a `draft` object and the seconds each part took.
"""

from __future__ import annotations

import math
import multiprocessing
import time
from dataclasses import dataclass, field
from pathlib import Path

from edgedistill.console import console
from edgedistill.data.store import Sample
from edgedistill.errors import UserError
from edgedistill.evaluate.metrics import rouge_by_lang
from edgedistill.evaluate.report import pte_markdown
from edgedistill.export.bundle import write_bundle
from edgedistill.export.draft import NO_DRAFT, measure_drafts
from edgedistill.export.pte import (
    PteClient,
    byte_fallback_tokenizer,
    check_executorch,
    export_pte,
    quantized_reference,
    transformers_distributions,
    write_runner_tokenizer,
)
from edgedistill.export.verify import (
    check_parity,
    greedy_answers,
    sparse_kl_top1,
    speed,
    teacher_forced,
)
from edgedistill.recipe import GGUF_TYPES, PTE_TYPES, Recipe
from edgedistill.run import Ledger, RunDir

# The llama.cpp file each .pte is compared with: the same bits where there is one, else the nearest.
GGUF_TWINS = {"fp32": ("f32", "f16", "bf16"), "8da4w": ("q4_k_m", "q4_0", "q4_1", "q5_0", "q5_k_m", "q6_k", "q8_0")}


@dataclass
class EdgeExport:
    """What export/edge.py measured, for export.json (`record`) and export.md / the card (`markdown`)."""

    record: dict = field(default_factory=dict)
    markdown: str = ""


def draft_type(gguf_types: list[str]) -> str:
    """The run's GGUF file used as the draft: the highest-precision quantised one (q8_0 in the
    demo), the order `edgedistill serve` picks a run's file in; else the reference."""
    return next((t for t in GGUF_TYPES if t.startswith("q") and t in gguf_types), gguf_types[0])


def _twin(pte_type: str, gguf_rows: list[dict]) -> dict | None:
    by_type = {r["type"]: r for r in gguf_rows}
    return next((by_type[t] for t in GGUF_TWINS[pte_type] if t in by_type), None)


@dataclass(frozen=True)
class ProgramChecks:
    """What a fresh program is checked on in the build process, while the GGUF files are checked in
    the parent: greedy parity prompts against the transformers model of the program's own numerics,
    and teacher-forced held-out sequences for KL / top-1 against the fp32 student. Its speed waits
    for a quiet machine (`pte_files`)."""

    conversations: list[list[dict]]
    parity_tokens: int
    sequences: list[list[int]]
    eval_positions: int

    @classmethod
    def of(cls, recipe: Recipe, heldout: list[Sample]) -> ProgramChecks:
        cfg = recipe.export
        fitting = [s for s in heldout if len(s.prompt_ids) + cfg.parity_tokens < cfg.pte_max_seq_len]  # static cache
        return cls([s.prompt_messages for s in fitting[:cfg.parity_prompts]], cfg.parity_tokens,
                   [(s.prompt_ids.tolist() + s.answer_ids.tolist())[:cfg.pte_max_seq_len - 1] for s in heldout],
                   cfg.pte_eval_positions)


def check_program(folder: Path, path: Path, pte_type: str, tokenizer_dir: Path, checks: ProgramChecks
                  ) -> tuple[dict, str]:
    """The program's parity and KL / top-1 figures (export.json row keys), and the parity's
    first-difference note ("" if none)."""
    from edgedistill.models.hf import load_causal_lm

    row, note = {}, ""
    if not checks.conversations and not checks.eval_positions:
        return row, note
    model, tokenizer, _ = load_causal_lm(str(folder))  # the fp32 student
    client = PteClient(path, tokenizer_dir)
    try:
        if checks.conversations:
            reference = model if pte_type == "fp32" else quantized_reference(folder)
            parity = check_parity(client, reference, tokenizer, checks.conversations, checks.parity_tokens)
            row, note = parity.as_metrics(), parity.first_difference
        if checks.eval_positions:
            reference_dist = transformers_distributions(model, checks.sequences, checks.eval_positions)
            row |= sparse_kl_top1(reference_dist, teacher_forced(client, checks.sequences, checks.eval_positions))
    finally:
        client.close()
    return row, note


def _build_ptes(jobs: list[tuple[Path, Path, str, int]], checks: ProgramChecks, tokenizer_dir: Path, results,
                spawned: float) -> None:
    """In the builder process: each (folder, .pte path, type, max_seq_len) exported, lowered and
    checked (`check_program`), on one thread, each outcome sent back as ("ok", (PteResult, check
    row, note, seconds)) or ("error", message); `seconds` is where the build's time went, from
    `spawned` (the parent's wall clock when it started this process) on."""
    import torch

    torch.set_num_threads(1)  # the lowering is single-threaded Python; the other core is the parent's
    ready = time.time()  # (the program's checks run XNNPACK on PteClient's one thread)
    for folder, destination, pte_type, max_seq_len in jobs:
        try:
            built = export_pte(folder, destination, pte_type, max_seq_len=max_seq_len)
            checked = time.perf_counter()
            row, note = check_program(folder, destination, pte_type, tokenizer_dir, checks)
            seconds = {"start": ready - spawned, "prepare": built.prepare_s, "export": built.export_s,
                       "lower": built.lower_s, "write": built.write_s, "checks": time.perf_counter() - checked}
            results.send(("ok", (built, row, note, {k: round(v, 3) for k, v in seconds.items()})))
            ready = spawned  # the start-up belongs to the first program
        except UserError as exc:
            results.send(("error", str(exc)))
            return
        except Exception as exc:  # noqa: BLE001 — a bug: its type and line reach the parent's error
            results.send(("error", f"{destination}: ExecuTorch export failed ({type(exc).__name__}: {exc})"))
            return


class PteBuilds:
    """The .pte files built in a child process while the GGUF files are checked in this one.

    Exporting and lowering a program is ExecuTorch's single-threaded Python (the demo's 8da4w
    program: 163 s of one core), so on a 2-core machine the other core would idle through it.
    While `busy()`, the GGUF checks run llama.cpp and torch on one thread and leave their speed
    figures for a quiet pass (export/stage.py); the .pte checks wait for `results()`."""

    def __init__(self, recipe: Recipe, run: RunDir, checks: ProgramChecks):
        cfg = recipe.export
        self.types = sorted(dict.fromkeys(cfg.pte_types), key=PTE_TYPES.index)
        self.checks = checks
        self.paths = {t: run.export_dir / f"{recipe.run.name}-{t}.pte" for t in self.types}
        jobs = [(run.student_dir, self.paths[t], t, cfg.pte_max_seq_len) for t in self.types]
        context = multiprocessing.get_context("spawn")  # no forked copy of this process's torch threads
        self._receive, send = context.Pipe(duplex=False)
        self._process = context.Process(target=_build_ptes, args=(jobs, checks, run.export_dir, send, time.time()),
                                        name="pte-build", daemon=True)
        self.started = time.perf_counter()
        self._process.start()
        send.close()
        self.seconds = float("nan")
        self._built: dict | None = None

    def busy(self) -> bool:
        return self._process.is_alive()

    def results(self) -> dict[str, tuple]:
        """Wait for every build: {type: (PteResult, check row, parity note, build seconds)}; a failed one is the
        UserError it raised in the child."""
        if self._built is not None:
            return self._built
        built = {}
        for pte_type in self.types:
            try:
                status, value = self._receive.recv()
            except EOFError:  # the child died without a word (killed, out of memory)
                self._process.join(timeout=10)  # for its exit code
                raise UserError(f"{self.paths[pte_type]}: the ExecuTorch build process ended without a result "
                                f"(exit code {self._process.exitcode}) — rerun the export stage") from None
            if status == "error":
                raise UserError(value)
            built[pte_type] = value
        self._process.join()
        self.seconds = time.perf_counter() - self.started
        self._built = built
        return built

    def close(self) -> None:
        """Stop a build still running (the stage failed or was interrupted): no orphan lowering."""
        if self._process.is_alive():
            self._process.terminate()
        self._process.join()
        self._receive.close()


def pte_files(recipe: Recipe, run: RunDir, ledger: Ledger, heldout: list[Sample], gguf_rows: list[dict],
              builds: PteBuilds) -> list[dict]:
    """One export.json row per .pte: what the build process measured (size, lowering, parity and
    KL / top-1, `check_program`), then speed on the quiet machine."""
    cfg = recipe.export
    max_new = recipe.evaluate.max_new_tokens or recipe.generate.max_new_tokens
    fitting = lambda n: [s for s in heldout if len(s.prompt_ids) + n < cfg.pte_max_seq_len]  # noqa: E731  (static cache)
    sequences = builds.checks.sequences
    rows = []
    if builds.busy():
        console.print(f"waiting for the ExecuTorch build ({', '.join(builds.types)}) …")
    built = builds.results()
    for pte_type in builds.types:
        path, (result, checked, note, build_seconds) = builds.paths[pte_type], built[pte_type]
        row = {"file": path.name, "type": pte_type, "size_bytes": result.size_bytes,
               "bits_per_weight": result.size_bytes * 8 / result.parameters, "parameters": result.parameters,
               "max_seq_len": result.max_seq_len, "attention": result.attention, "export_seconds": result.export_s,
               "lower_seconds": result.lower_s, "export_lower_cpu_seconds": result.cpu_s,
               "build_seconds": build_seconds,
               "xnnpack_partitions": result.delegated_partitions,
               "portable_ops": result.portable_ops} | checked
        if note:
            console.print(f"[yellow]parity note ({pte_type}): {note}[/]")
        client = PteClient(path, run.export_dir)
        prompt = (sum(sequences, []) * 8)[:min(cfg.speed_prompt_tokens, cfg.pte_max_seq_len - cfg.speed_tokens - 1)]
        row |= speed(client, prompt, cfg.speed_tokens) | {"runtime_threads": client.threads}
        if cfg.pte_quality_prompts and (asked := fitting(max_new)[:cfg.pte_quality_prompts]):
            answers, ttft = greedy_answers(client, [s.prompt_ids.tolist() for s in asked], max_new)
            row |= rouge_by_lang(answers, asked) | {"time_to_first_token_s": ttft}
        client.close()
        if (twin := _twin(pte_type, gguf_rows)) is not None:
            row |= {"gguf_twin": twin["type"], "gguf_twin_size_bytes": twin["size_bytes"],
                    "gguf_twin_prefill_tokens_per_s": twin["prefill_tokens_per_s"],
                    "gguf_twin_decode_tokens_per_s": twin["decode_tokens_per_s"]}
        rows.append(row)
        ledger.log_metrics("export", f"pte:{pte_type}", {k: v for k, v in row.items()
                                                         if isinstance(v, (int, float)) and not isinstance(v, bool)})
    return rows


def draft_check(recipe: Recipe, run: RunDir, ledger: Ledger, tokenizer, heldout: list[Sample],
                gguf_rows: list[dict]) -> dict:
    """The teacher in llama.cpp alone and with the student before / after KD as its draft."""
    from edgedistill.export.gguf import export_gguf
    from edgedistill.models.hf import encode_prompts, load_tokenizer, resolve_source
    from edgedistill.models.vocab import vocab_matches

    cfg = recipe.export
    local = recipe.teacher.local_model
    if not cfg.draft_prompts or not heldout or not local:
        return {}
    if not vocab_matches(load_tokenizer(local), tokenizer):
        console.print("[yellow]draft check skipped: the student's vocabulary is not the teacher's[/]")
        return {"skipped": "the student's vocabulary is not the teacher's"}
    kind = draft_type([r["type"] for r in gguf_rows])
    work = run.export_dir / "draft"
    source = resolve_source(local)
    if source.gguf_file:
        teacher = source.folder / source.gguf_file
    else:  # a Hugging Face teacher: its GGUF at the draft's type, written once per export
        teacher = work / f"teacher-{kind}.gguf"
        export_gguf(source.folder, teacher, kind, name="teacher", embeddings_type=cfg.embeddings_type)
    drafts = {"after": run.export_dir / f"{recipe.run.name}-{kind}.gguf"}
    if (run.student_init_dir / "config.json").is_file():
        drafts = {"before": work / f"{recipe.run.name}-before-kd-{kind}.gguf"} | drafts
        export_gguf(run.student_init_dir, drafts["before"], kind, name=f"{recipe.run.name}-before-kd",
                    embeddings_type=cfg.embeddings_type)
    prompts = encode_prompts(tokenizer, [s.prompt_messages for s in heldout[:cfg.draft_prompts]])
    console.print(f"draft check: {teacher.name} alone and with the student as draft ({', '.join(drafts)} KD), "
                  f"{len(prompts)} prompts …")
    try:
        result = measure_drafts(teacher, drafts, prompts, cfg.draft_tokens, n_max=cfg.draft_max,
                                n_min=cfg.draft_min, p_min=cfg.draft_p_min)
    except UserError as exc:  # llama.cpp refuses the pair (e.g. special tokens differ): say so, keep the export
        console.print(f"[yellow]draft check skipped: {exc}[/]")
        return {"skipped": str(exc)}
    metrics = {"teacher_tokens_per_s": result[NO_DRAFT]["tokens_per_s"], "draft_prompts": len(prompts),
               "draft_max": cfg.draft_max}
    for label in drafts:
        r = result[label]
        metrics |= {f"draft_acceptance_{label}": r["acceptance"], f"draft_tokens_per_s_{label}": r["tokens_per_s"],
                    f"draft_speedup_{label}": r["speedup"], f"draft_identical_{label}": r["identical"],
                    f"draft_drafted_{label}": r["drafted"]}
    ledger.log_metrics("export", "draft", {k: v for k, v in metrics.items() if not math.isnan(v)})
    return {"teacher": teacher.name, "draft_file_type": kind, "prompts": len(prompts), "tokens": cfg.draft_tokens,
            "n_max": cfg.draft_max, "n_min": cfg.draft_min, "p_min": cfg.draft_p_min} | result


def draft_markdown(draft: dict) -> str:
    if not draft:
        return ""
    if "skipped" in draft:
        return f"\nSpeculative decoding: not measured ({draft['skipped']}).\n"
    parts = []
    for label, words in (("before", "before KD"), ("after", "after KD")):
        if label in draft:
            r = draft[label]
            parts.append(f"{words}: acceptance {r['acceptance']:.1%} ({r['accepted']}/{r['drafted']} drafted tokens), "
                         f"{r['tokens_per_s']:.1f} tok/s ({r['speedup']:.2f}x), output identical on "
                         f"{r['identical']}/{r['prompts']} prompts")
    return (f"\nSpeculative decoding: the teacher `{draft['teacher']}` in llama.cpp, greedy, {draft['prompts']} held-out "
            f"prompts × ≤{draft['tokens']} tokens, draft = the student's {draft['draft_file_type']} file "
            f"(≤{draft['n_max']} tokens per step); teacher alone {draft[NO_DRAFT]['tokens_per_s']:.1f} tok/s (median); "
            + "; ".join(parts) + ".\n")


def start_pte_builds(recipe: Recipe, run: RunDir, heldout: list[Sample]) -> PteBuilds | None:
    """The run's .pte builds and their checks, started now in a child process (None when the
    recipe has none)."""
    if "pte" not in recipe.export.formats or not recipe.export.pte_types:
        return None
    check_executorch()
    write_runner_tokenizer(run.student_dir, run.export_dir)  # the runner's tokenizer, beside the programs
    console.print(f"ExecuTorch {', '.join(recipe.export.pte_types)}: export and XNNPACK lowering in a second process "
                  "(minutes for a 24-layer model), beside the GGUF checks …")
    return PteBuilds(recipe, run, ProgramChecks.of(recipe, heldout))


def export_edge(recipe: Recipe, run: RunDir, ledger: Ledger, tokenizer, heldout: list[Sample],
                gguf_rows: list[dict], builds: PteBuilds | None) -> EdgeExport:
    """The .pte files (built by `builds`, checked here) and the draft check (before the model
    card, which lists them)."""
    started = time.perf_counter()
    pte_rows = pte_files(recipe, run, ledger, heldout, gguf_rows, builds) if builds else []
    pte_done = time.perf_counter()
    draft = draft_check(recipe, run, ledger, tokenizer, heldout, gguf_rows)
    # what each adds to the stage after the GGUF files (the build ran beside them: `pte_build`)
    seconds = {"pte": pte_done - started, "draft": time.perf_counter() - pte_done} | (
        {"pte_build": builds.seconds} if builds else {})
    console.print(f"ExecuTorch export and checks {seconds['pte']:.0f} s, draft check {seconds['draft']:.0f} s")
    record = ({"pte": pte_rows} if pte_rows else {}) | ({"draft": draft} if draft else {}) | {"seconds": seconds}
    table = "\n" + pte_markdown([(r["type"], r) for r in pte_rows]) if pte_rows else ""
    return EdgeExport(record, table + draft_markdown(draft))


def write_device_bundle(recipe: Recipe, run: RunDir, tokenizer) -> None:
    """export/bundle/ (after the model card, which it carries)."""
    example = tokenizer.apply_chat_template([{"role": "user", "content": "Hello"}], tokenize=False,
                                            add_generation_prompt=True)
    fallback = (run.export_dir / "tokenizer.json").is_file() and byte_fallback_tokenizer(run.export_dir)
    write_bundle(run.export_dir, recipe.run.name, example, fallback)
