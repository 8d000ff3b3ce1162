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
# Survivors read and found equivalent: no input can tell them from the code (mutmut numbers
# mutants per function in source order, so a name holds while that function is unchanged).
_LAST_AXIS = "dim -1 and +1 are the same axis of these 2-D (rows, vocabulary) tensors"
EQUIVALENT: dict[str, str] = {
    **{f"edgedistill.distill.losses.{name}": _LAST_AXIS for name in (
        "x_divergence_rows__mutmut_98", "x_kd_dense__mutmut_17", "x_kd_dense__mutmut_24",
        "x_kl_from_logprobs__mutmut_15", "x_soften__mutmut_10", "x_sparse_student_logprobs__mutmut_6",
        "x_sparse_student_logprobs__mutmut_15", "x_sparse_table__mutmut_5", "x_sparse_table__mutmut_11",
        "x_sparse_teacher_logprobs__mutmut_5")},
    "edgedistill.distill.losses.x_kd_dense__mutmut_1": "chunk_size 1025: the value does not depend on the chunking "
                                                        "(tests/test_losses.py checks 1 and 1024)",
    "edgedistill.distill.losses.x_log1mexp__mutmut_7": "> or >= at x = log 1/2: both branches give log(1/2) there",
    # the cross-vocabulary losses: (H, V) and (H, k) rows in gold_hybrid_loss, (M, V), (M, k) and (M, k+1) in
    # mapped_sparse_table, (G, V) and (G, k) in uld_sorted_l1
    **{f"edgedistill.distill.losses.{name}": _LAST_AXIS for name in (
        *(f"x_gold_hybrid_loss__mutmut_{n}" for n in (7, 34, 47, 50, 77, 89, 91, 105, 118, 131)),
        *(f"x_mapped_sparse_table__mutmut_{n}" for n in (24, 40, 42, 48, 60, 66)),
        *(f"x_uld_sorted_l1__mutmut_{n}" for n in (2, 9, 17, 24)))},
    **{f"edgedistill.distill.losses.{name}": "sort and topk without a dim take the last axis" for name in (
        "x_gold_hybrid_loss__mutmut_65", "x_gold_hybrid_loss__mutmut_96", "x_uld_sorted_l1__mutmut_7",
        "x_uld_sorted_l1__mutmut_16")},
    **{f"edgedistill.distill.losses.{name}": "float() reads 'inf' in any case" for name in (
        "x_gold_hybrid_loss__mutmut_72", "x_mapped_sparse_table__mutmut_11")},
    "edgedistill.distill.losses.x_gold_hybrid_loss__mutmut_5": "H = 0: the sum of the empty rows is 0 already, so "
                                                               "×1.0 gives the same 0 and the same (empty) gradient",
    "edgedistill.distill.losses.x_gold_hybrid_loss__mutmut_156": "float32 sums / int64 counts: true division "
                                                                 "promotes the counts to float32, as .to(rows.dtype)",
    "edgedistill.distill.losses.x_gold_hybrid_loss__mutmut_160": "unique's inverse numbers the n sequences 0..n-1, "
                                                                 "each used, so bincount is n = len(sums) long anyway",
    **{f"edgedistill.data.store.x{name}": "SQLite keywords, names and pragma values ignore case" for name in (
        "ǁInstructionStoreǁadd_batch__mutmut_7", "ǁInstructionStoreǁadd_batch__mutmut_8",
        "ǁInstructionStoreǁadd_batch__mutmut_15", "ǁInstructionStoreǁadd_batch__mutmut_16",
        "ǁInstructionStoreǁcounts__mutmut_7", "ǁInstructionStoreǁcounts__mutmut_8",
        "ǁInstructionStoreǁinstructions__mutmut_7", "ǁInstructionStoreǁinstructions__mutmut_8",
        "ǁInstructionStoreǁinstructions__mutmut_10", "ǁInstructionStoreǁinstructions__mutmut_11",
        "ǁInstructionStoreǁrequests_done__mutmut_6", "ǁInstructionStoreǁrequests_done__mutmut_7",
        "ǁSampleStoreǁ__init____mutmut_11", "ǁSampleStoreǁ__init____mutmut_12", "ǁSampleStoreǁ__init____mutmut_15",
        "ǁSampleStoreǁ__init____mutmut_16", "ǁSampleStoreǁ__init____mutmut_22", "ǁSampleStoreǁ__init____mutmut_23",
        "ǁSampleStoreǁadd__mutmut_89", "ǁSampleStoreǁadd__mutmut_90", "ǁSampleStoreǁcount__mutmut_6",
        "ǁSampleStoreǁcount__mutmut_7", "ǁSampleStoreǁcount__mutmut_14", "ǁSampleStoreǁcount__mutmut_15",
        "ǁSampleStoreǁsamples__mutmut_3", "ǁSampleStoreǁsamples__mutmut_4", "ǁSampleStoreǁsamples__mutmut_6",
        "ǁSampleStoreǁsamples__mutmut_8", "ǁSampleStoreǁsamples__mutmut_9", "ǁSampleStoreǁsamples__mutmut_14",
        "ǁSampleStoreǁsamples__mutmut_15", "ǁSampleStoreǁsamples__mutmut_23", "ǁSampleStoreǁsamples__mutmut_24",
        "ǁSampleStoreǁstored_ids__mutmut_7", "ǁSampleStoreǁstored_ids__mutmut_8",
        "ǁSampleStoreǁstored_keys__mutmut_10", "ǁSampleStoreǁstored_keys__mutmut_11")},
    "edgedistill.data.store.x__array__mutmut_18": "numpy takes any negative size as the one inferred dimension",
    "edgedistill.data.store.x_load_distill_set__mutmut_5": "encoding=None is the locale's: UTF-8 on every machine "
                                                           "the tests run on (Python's UTF-8 mode in the C locale)",
    "edgedistill.data.store.x_load_distill_set__mutmut_7": "'UTF-8' and 'utf-8' name one codec",
    "edgedistill.data.store.xǁSampleStoreǁadd__mutmut_7": "ensure_ascii=None is falsy, as False",
    "edgedistill.data.store.xǁSampleStoreǁadd__mutmut_55": "reasoning_k is read only with a trace's blob, absent here",
    **{f"edgedistill.data.selfinstruct.xǁTaskFilterǁ_near_duplicate__mutmut_{n}":
       "a weaker prune (a smaller bound, `and`, the bags' union): it only skips pairs below the threshold, so "
       "verdicts stay (tests/test_selfinstruct.py compares with similarity.rouge_l on every pair)"
       for n in (18, 19, 20, 21, 22, 29)},
    **{f"edgedistill.data.selfinstruct.xǁTaskFilterǁ_near_duplicate__mutmut_{n}":
       "< or <= against need = threshold·(m+n)/2 - 1e-9: an integer never equals it" for n in (27, 30)},
    "edgedistill.data.selfinstruct.xǁTaskFilterǁ_near_duplicate__mutmut_9": "one empty side: the prune below skips "
                                                                            "it (min(m, n) = 0 < need)",
    "edgedistill.data.selfinstruct.x__bad_start__mutmut_9": "no Unicode category starts with X",
    "edgedistill.data.selfinstruct.x__no_input__mutmut_3": "_normalize lowercases: no X is left to strip",
    **{f"edgedistill.data.selfinstruct.x_parse_tasks__mutmut_{n}": "`labelled` is set at the first item, before "
       "it is ever read" for n in (2, 3)},
    **{f"edgedistill.data.selfinstruct.x_parse_tasks__mutmut_{n}": "the parser only asks whether the state is "
       "instruction, closed or input: any other value acts as output" for n in (73, 74, 75)},
    "edgedistill.data.privacy.x__apply__mutmut_2": "text[None:start] is text[0:start]",
    **{f"edgedistill.data.privacy.x__spans__mutmut_{n}": "scrub and find_pii rescan to a fixpoint: a match this "
       "pass skips (`<=`, `break`) is found on the next" for n in (14, 18)},
    "edgedistill.evaluate.tasks.x_exact_match__mutmut_14": "math.isclose's default rel_tol is 1e-9",
    "edgedistill.data.privacy.x__luhn_valid__mutmut_23": "-total % 10 == 0 exactly when total % 10 == 0",
    "edgedistill.data.privacy.x_find_pii__mutmut_5": "None and False: `changed` is only tested for truth",
    "edgedistill.data.privacy.x_scrub__mutmut_3": "None and False: `changed` is only tested for truth",
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
    print(f"{'module':<30} {'killed':>7} {'total':>6} {'score':>7} {'survived':>9} {'equivalent':>10} {'no tests':>9} "
          f"{'not run':>8} {'(timeouts)':>10}")
    for module, patterns in TARGETS.items():
        mine = {name: code for name, code in codes.items() if any(fnmatch.fnmatch(name, p) for p in patterns)}
        killed = sum(code in KILLED for code in mine.values())
        alive = sorted(name for name, code in mine.items() if code in SURVIVED and name not in EQUIVALENT)
        equivalent = sum(code in SURVIVED and name in EQUIVALENT for name, code in mine.items())
        no_tests = sum(code in NO_TESTS for code in mine.values())
        not_run = sum(code is None for code in mine.values())
        timeouts = sum(code in TIMEOUT for code in mine.values())
        score = f"{killed / (len(mine) - equivalent):.1%}" if len(mine) > equivalent else "–"  # of those that can die
        print(f"{module:<30} {killed:>7} {len(mine):>6} {score:>7} {len(alive):>9} {equivalent:>10} {no_tests:>9} "
              f"{not_run:>8} {timeouts:>10}")
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
