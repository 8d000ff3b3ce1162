"""Mutation testing (`make mutation`): mutmut over the modules whose maths and rules the unit
tests pin down, then killed/total per module.

mutmut (3.8.1, configured in pyproject.toml [tool.mutmut]) copies src/ and tests/ into
mutants/, changes one thing in a function (an operator, a constant, a condition, a string),
and runs the selected tests that call that function; a mutant the tests still pass on
"survived". Timeouts count as killed (mutmut's own score does the same) and are shown apart.

    .venv/bin/python bench/mutation_scores.py             # fresh run, then the table
    .venv/bin/python bench/mutation_scores.py --report    # the table of the last run only
    .venv/bin/python bench/mutation_scores.py --survivors # ... and every survivor's name

A run takes a few minutes per module on an idle 2-core machine (mutmut prints its progress
into mutants/run.log). `mutmut show NAME` (in .venv/bin) prints a survivor's diff.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# module -> the mutants (mutmut names, globs) that count for it: whole modules, and of
# evaluate/tasks.py only the scoring (the eval-set readers are not under test here).
TARGETS: dict[str, list[str]] = {
    "distill/losses.py": ["edgedistill.distill.losses.*"],
    "data/selfinstruct.py": ["edgedistill.data.selfinstruct.*"],
    "data/store.py": ["edgedistill.data.store.*"],
    "data/privacy.py": ["edgedistill.data.privacy.*"],
    "data/answers.py": ["edgedistill.data.answers.*"],
    "evaluate/tasks.py (scoring)": [f"edgedistill.evaluate.tasks.x_{name}__mutmut_*" for name in (
        "_normalise", "exact_match", "chosen_by_text", "choice_logliks", "_argmax", "score_task")],
}
TIMEOUT = {24, -24, 152, 255, 36}  # mutmut's exit codes
KILLED, SURVIVED, NO_TESTS = {1, 3} | TIMEOUT, {0}, {5, 33}


def mutmut_binary() -> str:
    found = Path(sys.executable).with_name("mutmut")
    return str(found) if found.is_file() else "mutmut"


def run(max_children: int) -> int:
    shutil.rmtree(ROOT / "mutants", ignore_errors=True)  # stale stats would map tests to old code
    (ROOT / "mutants").mkdir()
    globs = [g for patterns in TARGETS.values() for g in patterns]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    print(f"mutmut run over {', '.join(TARGETS)} (progress: mutants/run.log)", flush=True)
    with open(ROOT / "mutants" / "run.log", "w") as log:
        return subprocess.run([mutmut_binary(), "run", "--max-children", str(max_children), *globs], cwd=ROOT,
                              env=env, stdout=log, stderr=subprocess.STDOUT).returncode


def results() -> dict[str, int | None]:
    """mutant name -> exit code, from mutmut's per-file records."""
    codes: dict[str, int | None] = {}
    for meta in (ROOT / "mutants" / "src").rglob("*.py.meta"):
        codes |= json.loads(meta.read_text())["exit_code_by_key"]
    return codes


def table(codes: dict[str, int | None], survivors: bool) -> None:
    print(f"{'module':<30} {'killed':>7} {'total':>6} {'score':>7} {'survived':>9} {'no tests':>9} {'not run':>8} "
          f"{'(timeouts)':>10}")
    for module, patterns in TARGETS.items():
        mine = {name: code for name, code in codes.items() if any(fnmatch.fnmatch(name, p) for p in patterns)}
        killed = sum(code in KILLED for code in mine.values())
        alive = sorted(name for name, code in mine.items() if code in SURVIVED)
        no_tests = sum(code in NO_TESTS for code in mine.values())
        not_run = sum(code is None for code in mine.values())
        timeouts = sum(code in TIMEOUT for code in mine.values())
        score = f"{killed / len(mine):.1%}" if mine else "–"
        print(f"{module:<30} {killed:>7} {len(mine):>6} {score:>7} {len(alive):>9} {no_tests:>9} {not_run:>8} "
              f"{timeouts:>10}")
        if survivors:
            print("".join(f"    {name}\n" for name in alive), end="")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", action="store_true", help="only print the table of the last run")
    parser.add_argument("--survivors", action="store_true", help="list the surviving mutants too")
    parser.add_argument("--max-children", type=int, default=len(os.sched_getaffinity(0)))
    args = parser.parse_args()
    if not args.report:
        code = run(args.max_children)
        if code:
            print(f"mutmut exited with {code}: see mutants/run.log", file=sys.stderr)
            return code
    table(results(), args.survivors)
    return 0


if __name__ == "__main__":
    sys.exit(main())
