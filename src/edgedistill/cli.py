"""The `edgedistill` command: thin wrappers that parse, call one library function, and turn
known errors into one line and exit code 2. Each docstring is the command's --help."""

from __future__ import annotations

import os

# Offline by default and no telemetry: nothing reaches a model hub from this tool.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import functools  # noqa: E402
import json  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Annotated, Optional  # noqa: E402

import typer  # noqa: E402
from rich.table import Table  # noqa: E402

from edgedistill.console import console  # noqa: E402
from edgedistill.errors import UserError  # noqa: E402

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Distil a big open-weights LLM into a small private one that runs offline.")

SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Override a recipe field: section.field=value (TOML value).")]
NameOpt = Annotated[Optional[str], typer.Option("--name", help="Run name (overrides run.name).")]
RunsDirOpt = Annotated[Optional[Path], typer.Option("--runs-dir", help="Folder of runs (overrides run.runs_dir).")]


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks (or set EDGEDISTILL_DEBUG=1).")] = False) -> None:
    if debug:
        os.environ["EDGEDISTILL_DEBUG"] = "1"


def user_errors(fn: Callable) -> Callable:
    """One line and exit code 2 for a UserError (traceback with --debug)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            if os.environ.get("EDGEDISTILL_DEBUG") == "1":
                raise
            console.print(f"[red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            console.print("interrupted — run the same command again to resume")
            raise typer.Exit(130) from None
    return wrapper


# The recipe fields the CLI's own flags set: an invalid value is blamed on the flag.
FLAGS = {"run.name": "--name", "run.runs_dir": "--runs-dir", "export.types": "--quant"}


def _overrides(sets: list[str] | None, name: str | None, runs_dir: Path | None) -> list[str]:
    out = list(sets or [])
    if name:
        out.append(f"run.name={json.dumps(name)}")  # a JSON string is a valid TOML basic string
    if runs_dir:
        out.append(f"run.runs_dir={json.dumps(str(runs_dir))}")
    return out


def _load(target: Path, overrides: list[str]):
    """A recipe file, or a run folder (its saved recipe.toml)."""
    from edgedistill.recipe import load_recipe

    if target.is_dir():
        if not (target / "recipe.toml").is_file():
            raise UserError(f"{target}: not a run folder (no recipe.toml) — pass a recipe file or a run folder")
        recipe = load_recipe(target / "recipe.toml", overrides, FLAGS)
        # A run folder is its own location, wherever it has been moved to.
        return recipe.model_copy(update={"run": recipe.run.model_copy(
            update={"name": target.resolve().name, "runs_dir": str(target.resolve().parent)})})
    return load_recipe(target, overrides, FLAGS)


def _finish(run) -> None:
    from edgedistill.evaluate.report import TERMINAL_COLUMNS, quality_table
    from edgedistill.run import is_main_process, open_ledger

    if not is_main_process():
        return

    with open_ledger(run) as ledger:
        header, rows = quality_table(ledger, TERMINAL_COLUMNS)
    if rows:
        table = Table(*header, title="teacher vs student (held-out prompts)")
        for row in rows:
            table.add_row(*row)
        console.print(table)
    console.print(f"run folder: [bold]{run.root}[/]")
    if run.student_dir.is_dir():
        console.print(f"student (safetensors, loads with AutoModelForCausalLM): {run.student_dir}")
    modelfile = run.export_dir / "Modelfile"
    if modelfile.is_file():
        files = ", ".join(sorted(p.name for p in run.export_dir.glob("*.gguf")))
        console.print(f"GGUF for llama.cpp / Ollama: {run.export_dir} ({files}; "
                      f"`ollama create {run.root.name} -f {modelfile}`)")
    if ptes := sorted(p.name for p in run.export_dir.glob("*.pte")):
        console.print(f"ExecuTorch for phones: {run.export_dir} ({', '.join(ptes)}); everything to copy to a "
                      f"phone, with a README: {run.export_dir / 'bundle'}")
    if run.report_path.is_file():
        console.print(f"report: {run.report_path}")
    if run.report_html_path.is_file():
        console.print(f"report (open in a browser): [bold]{run.report_html_path}[/]")


@app.command()
@user_errors
def run(recipe: Annotated[Path, typer.Argument(help="Recipe TOML file, or a run folder to resume.")],
        set_: SetOpt = None, name: NameOpt = None, runs_dir: RunsDirOpt = None) -> None:
    """Run every stage of a recipe: generate, student, train, evaluate, export, report. Finished stages are reused."""
    from edgedistill.pipeline import run_recipe

    _finish(run_recipe(_load(recipe, _overrides(set_, name, runs_dir))))


@app.command()
@user_errors
def demo(tiny: Annotated[bool, typer.Option("--tiny", help="A tiny configuration that finishes in about a minute.")] = False,
         set_: SetOpt = None, name: NameOpt = None, runs_dir: RunsDirOpt = None) -> None:
    """Distil the embedded SmolLM2-135M-Instruct on the bundled EN/JA seeds (the bundled demo recipe)."""
    from edgedistill.pipeline import run_recipe
    from edgedistill.recipe import bundled_recipe

    _finish(run_recipe(bundled_recipe("demo_tiny" if tiny else "demo", _overrides(set_, name, runs_dir), FLAGS)))


def _stage_command(stage: str, summary: str) -> None:
    @user_errors
    def command(target: Annotated[Path, typer.Argument(help="Recipe TOML file or run folder.")],
                set_: SetOpt = None, name: NameOpt = None, runs_dir: RunsDirOpt = None) -> None:
        from edgedistill.pipeline import run_recipe

        _finish(run_recipe(_load(target, _overrides(set_, name, runs_dir)), only=stage))
    command.__doc__ = summary + " Earlier stages must be done."
    app.command(name=stage)(command)


_stage_command("generate", "Answer the seed prompts with the teacher and store its top-k log-probs.")
_stage_command("student", "Cut the student from the teacher (layers chosen on the distill set).")
_stage_command("train", "Distil: train the student on the cached teacher targets.")
_stage_command("evaluate", "Compare teacher, student before and after KD (and the SFT baseline) on the held-out "
               "prompts: fidelity, task accuracy, speed, memory, optional judge.")


@app.command()
@user_errors
def export(target: Annotated[Path, typer.Argument(help="Recipe TOML file, run folder, or any Hugging Face model "
                                                  "folder (safetensors).")],
           quant: Annotated[Optional[str], typer.Option("--quant", help="GGUF types, comma separated, e.g. "
                                                        "f16,q8_0,q4_k_m (overrides export.types).")] = None,
           format_: Annotated[Optional[str], typer.Option("--format", help="Formats, comma separated: gguf "
                                                          "(always written), pte (ExecuTorch, for phones) "
                                                          "(overrides export.formats).")] = None,
           out: Annotated[Optional[Path], typer.Option("--out", help="Where the files go, for a model folder "
                                                       "(default: FOLDER-gguf beside it).")] = None,
           set_: SetOpt = None, name: NameOpt = None, runs_dir: RunsDirOpt = None) -> None:
    """Write a run's student — or any Hugging Face model folder — as GGUF files (llama.cpp / Ollama) with
    an export.json, a Modelfile and (for a run) a model card; each file is checked in llama.cpp. For a
    run, --format pte also writes ExecuTorch programs for phones (checked in ExecuTorch), an
    on-device bundle, and measures the student as the teacher's speculative-decoding draft."""
    types = [q.strip().lower() for q in quant.split(",") if q.strip()] if quant else None
    if target.is_dir() and (target / "config.json").is_file() and not (target / "recipe.toml").is_file():
        from edgedistill.export.stage import export_folder
        from edgedistill.recipe import ExportCfg, build_recipe

        data = ({"export": {"types": types}} if types else {}) | ({"run": {"name": name}} if name else {})
        chosen = build_recipe(data, "<export>", flags=FLAGS)
        export_folder(target, out or target.with_name(target.name + "-gguf"), chosen.export.types or ExportCfg().types,
                      name=chosen.run.name if name else None)
        return
    if out is not None:
        raise UserError("--out is for exporting a model folder; a run writes into its export/ folder")
    if format_ and target.is_dir() and not (target / "recipe.toml").is_file():
        raise UserError("--format is for a run: a model folder is exported as GGUF")
    from edgedistill.pipeline import run_recipe

    overrides = _overrides(set_, name, runs_dir)
    if types:
        overrides.append(f"export.types={json.dumps(types)}")
    if format_:
        formats = ["gguf"] + [f.strip() for f in format_.split(",") if f.strip() and f.strip() != "gguf"]
        overrides.append(f"export.formats={json.dumps(formats)}")
    _finish(run_recipe(_load(target, overrides), only="export"))


_stage_command("report", "Write report.html and report.md from the run's ledger.")


@app.command()
@user_errors
def runs(runs_dir: Annotated[Path, typer.Option("--runs-dir", help="Folder of runs.")] = Path("runs")) -> None:
    """List runs with the status of each stage."""
    from edgedistill.pipeline import STAGE_NAMES
    from edgedistill.run import list_runs

    found = list_runs(runs_dir)
    if not found:
        console.print(f"no runs in {runs_dir}")
        return
    table = Table("run", *STAGE_NAMES, "seconds", "path")
    for r in found:
        table.add_row(str(r["name"]), *[r["stages"].get(s, "–") for s in STAGE_NAMES],
                      f"{r['seconds']:.0f}", str(r["path"]))
    console.print(table)


@app.command()
@user_errors
def serve(target: Annotated[str, typer.Argument(help="A run folder (its exported GGUF, else its HF student), "
                                                "a .gguf file, a HF model folder, or 'embedded'.")],
          engine: Annotated[str, typer.Option(help="auto | llamacpp (GGUF) | transformers (HF folder).")] = "auto",
          host: Annotated[str, typer.Option(help="Address to listen on. Anything but loopback needs an API key.")] = "127.0.0.1",
          port: Annotated[int, typer.Option(help="Port.")] = 8000,
          api_key_env: Annotated[Optional[str], typer.Option("--api-key-env", help="NAME of the environment "
                                                             "variable holding the API key.")] = None,
          parallel: Annotated[int, typer.Option(help="Requests generating at once.", min=1, max=64)] = 2,
          queue: Annotated[int, typer.Option(help="Requests waiting beyond those; more get 503.", min=0)] = 16,
          max_tokens: Annotated[int, typer.Option(help="Largest max_tokens a request may ask for.", min=1)] = 2048,
          context: Annotated[int, typer.Option(help="Context tokens per request slot.", min=256)] = 4096,
          log_content: Annotated[bool, typer.Option("--log-content", help="Log prompts and completions "
                                                    "(off: request ids and token counts only).")] = False,
          threads: Annotated[int, typer.Option(help="CPU threads the engine computes with (1 for a tiny model "
                                               "on a busy machine).", min=1)] = 2,
          exact: Annotated[bool, typer.Option("--exact", help="llama.cpp: float32 attention (F32 KV cache, no "
                                              "flash attention), so an F32 GGUF scores as transformers does; "
                                              "slower.")] = False,

          policy: Annotated[Optional[str], typer.Option("--policy", help="TOML file with system_prompt (sent with "
                                                        "chat requests that have no system message) and policy (a "
                                                        "usage policy served at /policy and shown on the chat "
                                                        "page).")] = None,
          draft: Annotated[Optional[str], typer.Option("--draft", help="A run folder (or .gguf) whose student is "
                                                       "the served model's speculative-decoding draft: same "
                                                       "vocabulary, same greedy output, faster when it agrees "
                                                       "(llama.cpp only).")] = None) -> None:
    """A private OpenAI-compatible server (chat, completions, streaming, logprobs) on llama.cpp or
    transformers, with a chat page at /."""
    from edgedistill.serve.server import run_server

    run_server(target, host=host, port=port, api_key_env=api_key_env, engine=engine, parallel=parallel, queue_size=queue,
               max_tokens=max_tokens, context_per_slot=context, log_content=log_content, threads=threads,
               exact=exact, policy=policy, draft=draft)


@app.command()
@user_errors
def recipe(name: Annotated[Optional[str], typer.Argument(
               help="A bundled recipe: demo, demo_tiny, self_instruct, remote_teacher, gpt_oss (a reasoning "
                    "teacher).")] = None,
           tiny: Annotated[bool, typer.Option("--tiny", help="The tiny demo recipe.")] = False,
           commented: Annotated[bool, typer.Option("--commented", help="The file as shipped, with its comments, "
                                                   "instead of every field resolved.")] = False) -> None:
    """Print a bundled recipe (a starting point for your own), with every field resolved."""
    from importlib import resources

    from edgedistill.recipe import BUNDLED_RECIPES, bundled_recipe

    chosen = name or ("demo_tiny" if tiny else "demo")
    if chosen not in BUNDLED_RECIPES:
        raise UserError(f"no bundled recipe '{chosen}' (have: {', '.join(BUNDLED_RECIPES)})")
    if commented:
        typer.echo(resources.files("edgedistill.recipes").joinpath(f"{chosen}.toml").read_text(encoding="utf-8"))
    else:
        typer.echo(bundled_recipe(chosen).to_toml())


def main() -> None:
    app()


if __name__ == "__main__":
    main()
