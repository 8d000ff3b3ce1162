"""Run a recipe's stages in order, each one skipped when it already finished with the same
settings, so a crash or a second `make demo` resumes instead of starting over."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from edgedistill.console import console
from edgedistill.errors import UserError
from edgedistill.recipe import Recipe
from edgedistill.run import FollowerLedger, Ledger, RunDir, is_main_process, open_ledger

StageFn = Callable[[Recipe, RunDir, Ledger], dict[str, float]]


@dataclass(frozen=True)
class Stage:
    name: str
    depends_on: tuple[str, ...]  # recipe sections whose change makes the stage rerun
    load: Callable[[], StageFn]  # imported lazily: `edgedistill runs` should not import torch
    also: Callable[[Recipe, Ledger], str] = lambda recipe, ledger: ""  # settings outside depends_on that it reads


def _generate() -> StageFn:
    from edgedistill.data.generate import run_generate
    return run_generate


def _student() -> StageFn:
    from edgedistill.distill.stage import run_student
    return run_student


def _train() -> StageFn:
    from edgedistill.distill.train import run_train
    return run_train


def _evaluate() -> StageFn:
    from edgedistill.evaluate.stage import run_evaluate
    return run_evaluate


def _export() -> StageFn:
    from edgedistill.export.stage import run_export
    return run_export


def _report() -> StageFn:
    from edgedistill.evaluate.report import write_report
    return write_report


STAGES = (
    Stage("generate", ("teacher", "generate"), _generate),
    Stage("student", ("teacher", "generate", "student"), _student),
    Stage("train", ("teacher", "generate", "student", "train"), _train),
    Stage("evaluate", ("teacher", "generate", "student", "train", "evaluate"), _evaluate),
    Stage("export", ("teacher", "generate", "student", "train", "export"), _export,
          lambda r, ledger: audit_settings(r) + thinking_settings(r, ledger)),
    Stage("report", ("teacher", "generate", "student", "train", "evaluate", "export"), _report),
)
STAGE_NAMES = tuple(s.name for s in STAGES)


def audit_settings(recipe: Recipe) -> str:
    """The evaluate fields the export stage reads too: it answers the refusal audit and the leak
    probes with each GGUF file in llama.cpp. Empty when they are at their defaults, so runs from
    before the audit keep their fingerprints."""
    cfg = recipe.evaluate
    fields = {"safety": [s.model_dump(mode="json") for s in cfg.safety],
              "safety_max_new_tokens": cfg.safety_max_new_tokens, "leak_probes": cfg.leak_probes}
    changed = {k: v for k, v in fields.items() if v != type(cfg).model_fields[k].get_default(call_default_factory=True)}
    return f"|audit={json.dumps(changed, sort_keys=True)}" if changed else ""


def thinking_settings(recipe: Recipe, ledger: Ledger) -> str:
    """The evaluate fields the export stage reads when it scores each GGUF file with thinking on
    and off (export/gguf_reasoning.py): only when it does — asked for, or ('auto') the generate
    stage kept teacher traces — so runs without traces keep their fingerprints."""
    cfg = recipe.evaluate
    if not cfg.scores_thinking(ledger.metrics("generate").get("stage", {}).get("reasoning_samples", 0) > 0):
        return ""
    fields = {"tasks": [t.model_dump(mode="json") for t in cfg.tasks],
              "reasoning_max_new_tokens": cfg.reasoning_max_new_tokens}
    return f"|thinking={json.dumps(fields, sort_keys=True)}"


def run_recipe(recipe: Recipe, only: str | None = None) -> RunDir:
    """Run every stage (or just `only`, whose upstream stages must be done) of the recipe's run."""
    if only is not None and only not in STAGE_NAMES:
        raise UserError(f"unknown stage '{only}' (stages: {', '.join(STAGE_NAMES)})")
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed and only != "train":
        raise UserError("a distributed launch (torchrun / accelerate launch) runs the train stage only — "
                        "`torchrun --nproc_per_node N -m edgedistill train RUN`")
    inputs = preflight(recipe)
    run = RunDir.for_recipe(recipe)
    if only not in (None, STAGE_NAMES[0]) and not run.ledger_path.is_file():
        raise UserError(f"{run.root}: no such run yet — start it with `edgedistill run RECIPE` (stage '{only}' "
                        "needs the stages before it)")
    with _writing(run, recipe), open_ledger(run) as main_ledger, _signals_as_interrupts():
        ledger = main_ledger if is_main_process() else FollowerLedger(main_ledger)
        ledger.set_meta("run", recipe.run.name)
        upstream_ran = False
        for stage in STAGES:
            # Seed contents are inputs too; the run seed matters from the student on.
            extra = inputs if stage.name == "generate" else f"{inputs}|seed={recipe.run.seed}"
            fingerprint = recipe.fingerprint(*stage.depends_on, extra=extra + stage.also(recipe, ledger))
            record = ledger.stage(stage.name)
            fresh = record is not None and record.status == "done" and record.fingerprint == fingerprint
            if only is not None and stage.name != only:
                if STAGE_NAMES.index(stage.name) < STAGE_NAMES.index(only) and not fresh:
                    raise UserError(f"{run.root}: stage '{stage.name}' is not done for this recipe — "
                                    f"run it first (`edgedistill {stage.name} ...` or `edgedistill run ...`)")
                continue
            if fresh and not upstream_ran and only is None:
                console.print(f"[green]✓[/] {stage.name}: done earlier ({record.seconds:.0f} s), reused")
                continue
            _run_stage(stage, recipe, run, ledger, fingerprint)
            upstream_ran = True
        if only is not None:
            ledger.mark_stale(list(STAGE_NAMES[STAGE_NAMES.index(only) + 1:]))
    return run


def preflight(recipe: Recipe) -> str:
    """Check the cheap things (the runs folder, seed, task and eval files, teacher path,
    architecture, prompt lengths against the teacher's context, student size) before any stage
    starts, so a typo costs a second and one line, not a half-run. Returns a hash of the
    prompts, so that edited seed files make the stages rerun."""
    from edgedistill.data.prompts import check_prompts_fit
    from edgedistill.data.verify import generation_prompts
    from edgedistill.evaluate.tasks import load_task
    from edgedistill.models.families import check_cuttable
    from edgedistill.models.hf import load_tokenizer, model_shape, resolve_source

    _check_runs_dir(Path(recipe.run.runs_dir), Path(recipe.run.runs_dir) / recipe.run.name)
    if "pte" in recipe.export.formats:  # the optional ExecuTorch packages: missing is one line now, not after training
        from edgedistill.export.pte import check_executorch

        check_executorch()
    prompts = generation_prompts(recipe.generate)
    for task in recipe.evaluate.tasks:  # a bad eval set fails now, not after an hour of generation
        load_task(task.path, task.format, task.limit)
    _preflight_hand_out(recipe)
    local = recipe.teacher.local_model
    if recipe.teacher.backend == "openai" and not local:
        raise UserError("teacher.tokenizer: the openai backend needs the local model the student is cut from "
                        "('embedded', a model folder or a .gguf) — its tokenizer also maps the server's tokens")
    if recipe.teacher.reasoning_budget is not None and recipe.teacher.backend != "llamacpp":
        raise UserError(f"teacher.reasoning_budget: the {recipe.teacher.backend} backend has no thinking budget of "
                        "ours — use backend = 'llamacpp', or vLLM's `thinking_token_budget` in teacher.extra_body")
    if recipe.generate.sparse_target == "sampled" and recipe.teacher.backend != "hf":
        raise UserError(f"generate.sparse_target = 'sampled' needs the teacher's full distribution — use "
                        f"teacher.backend = 'hf' (the {recipe.teacher.backend} backend gives top-k only)")
    built_in = recipe.teacher.backend in ("hf", "llamacpp", "openai")  # a registered backend brings its own model
    if built_in and local and recipe.student.init == "cut":
        check_cuttable(model_shape(resolve_source(local)), recipe.student.keep_layers)
    if recipe.student.init == "checkpoint":
        resolve_source(recipe.student.model or "")  # the folder exists, is safetensors, a known architecture
    if built_in and local:
        check_prompts_fit(prompts, load_tokenizer(local), teacher_context(recipe), recipe.generate.max_new_tokens)
    # A reference edited in a task file reselects the verified answers (plain prompts hash as before).
    keys = (f"{p.id}:{p.split}" + (f":{p.reference}" if p.reference is not None else "") for p in prompts)
    placed = f"|canaries={recipe.generate.canaries}:{recipe.run.seed}" if recipe.generate.canaries else ""
    return hashlib.sha256(("".join(sorted(keys)) + placed).encode()).hexdigest()[:16]


def _preflight_hand_out(recipe: Recipe) -> None:
    """Issue 18's cheap checks: the teacher provider's terms, and the safety sets of the audit."""
    from edgedistill.evaluate.audit import safety_items
    from edgedistill.models.licence import check_provider_terms

    check_provider_terms(recipe.teacher.provider, recipe.teacher.terms_acknowledged)
    safety_items(recipe.evaluate.safety)


def teacher_context(recipe: Recipe) -> int:
    """Tokens a prompt and its answer may use together: the local model's context, and for the
    llamacpp backend the context of each server slot it starts."""
    import json

    from edgedistill.models.hf import gguf_cache_dir, resolve_source

    source = resolve_source(recipe.teacher.local_model or "")
    folder = source.folder if source.gguf_file is None else gguf_cache_dir(source)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8")) if (folder / "config.json").is_file() else {}
    context = int(config.get("max_position_embeddings") or 2048)
    if recipe.teacher.backend == "llamacpp":
        from edgedistill.teachers.llamacpp import context_per_slot

        context = min(context, context_per_slot(recipe.generate))
    return context


def _check_runs_dir(runs_dir: Path, root: Path) -> None:
    for path, what in ((runs_dir, "--runs-dir / run.runs_dir"), (root, "the run folder")):
        if path.exists() and not path.is_dir():
            raise UserError(f"{path}: {what} is a file, not a folder — pick another --runs-dir or --name")


@contextmanager
def _writing(run: RunDir, recipe: Recipe) -> Iterator[None]:
    """The run folder created (or reopened) and held by this process, its recipe written; the
    other processes of a distributed launch only follow the main one's ledger."""
    if not is_main_process():
        yield
        return
    with ExitStack() as held:
        try:
            held.enter_context(run.held())
            run.create(recipe)
        except OSError as exc:
            raise UserError(f"{run.root}: cannot create the run folder ({exc.strerror or exc}) — check --runs-dir "
                            "and its permissions and free space") from None
        yield


@contextmanager
def _signals_as_interrupts() -> Iterator[None]:
    """SIGTERM and SIGHUP (`kill`, a closed terminal, a job scheduler's stop) end a stage as
    Ctrl-C does: the ledger says 'interrupted', child servers are stopped by the stages' own
    cleanup, and the same command resumes. (kill -9 cannot be caught: the ledger then shows
    the stage as interrupted once its process is gone — see run.Ledger.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, _frame) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def _out_of_space(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno in _NO_SPACE:
        return True
    return isinstance(exc, sqlite3.OperationalError) and "full" in str(exc)


def _run_stage(stage: Stage, recipe: Recipe, run: RunDir, ledger: Ledger, fingerprint: str) -> None:
    console.rule(f"[bold]{stage.name}")
    ledger.start_stage(stage.name, fingerprint)
    try:
        metrics = stage.load()(recipe, run, ledger)
    except KeyboardInterrupt:
        _end_stage(ledger, stage.name, "interrupted")
        raise
    except BaseException as exc:
        _end_stage(ledger, stage.name, "failed", f"{type(exc).__name__}: {exc}".splitlines()[0])
        if _out_of_space(exc):
            raise UserError(f"{run.root}: no space left on the device during the {stage.name} stage — free some "
                            "space and run the same command again (finished work is kept)") from None
        raise
    ledger.log_metrics(stage.name, "stage", metrics)
    ledger.end_stage(stage.name, "done")


def _end_stage(ledger: Ledger, name: str, status: str, error: str | None = None) -> None:
    """Record how a stage ended; on a full disk the ledger itself may not take the write, and
    then the process-liveness check in run.Ledger keeps it truthful."""
    try:
        ledger.end_stage(name, status, error)
    except sqlite3.OperationalError:
        pass
