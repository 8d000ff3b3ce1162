"""Benchmark: the Self-Instruct filters on human-written instructions — how many each keeps,
per language and per reason, with the filters as they were (main at 02b3d27) and as they are.

Every instruction here was written by a person on purpose, so each drop is a false positive.
Sources: the Self-Instruct seed tasks (English, instruction + first instance's input), the
IFEval prompts (English), the JCommonsenseQA v1.3 validation questions (Japanese, distinct),
all from ../shared/data, and bench/data/business_instructions.jsonl (71 instructions written
for this project in English and, as translations, in Japanese: code, tables, rules,
separators, TSV, long specifications, shared IFEval-style clauses). Each source is filtered
on its own, from an empty pool, in file order. Also measured: the calibrations the filters
cite (characters per word and near-duplicate scores on the parallel set, letter loops in
real text). "Before" is read from git (`git show 02b3d27:...`), so the script needs the
repository's history. Prints JSON; no model, no network; under a minute on one core.

    .venv/bin/python bench/filters_on_real_text.py [--shared ../shared/data] [--examples 3]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import subprocess
import sys
import types
import unicodedata
from collections import Counter
from pathlib import Path

from edgedistill.data.selfinstruct import (
    _LETTER_LOOP,
    REASONS,
    Task,
    TaskFilter,
    _is_loop,
)
from edgedistill.data.similarity import (
    CJK_CHAR,
    dedup_units,
    detect_lang,
    lcs_length,
    text_units,
)

ROOT = Path(__file__).resolve().parents[1]
BUSINESS = ROOT / "bench" / "data" / "business_instructions.jsonl"


# --- the filters as on main at 02b3d27 ------------------------------------------------------------
BEFORE = "02b3d27"


def filter_before() -> type:
    """TaskFilter as it was at BEFORE, loaded from git: "before" is that code itself, not a copy
    (there, one unit per CJK character for length and ROUGE-L, and any piece of 1-4 characters
    repeated 5 times was broken text, in the instruction and the input alike)."""
    source = subprocess.run(["git", "show", f"{BEFORE}:src/edgedistill/data/selfinstruct.py"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout
    module = types.ModuleType(f"selfinstruct_{BEFORE}")
    sys.modules[module.__name__] = module  # dataclasses look their module up
    exec(compile(source, f"{BEFORE}:src/edgedistill/data/selfinstruct.py", "exec"), module.__dict__)
    return module.TaskFilter


# --- data --------------------------------------------------------------------------------------
def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def sources(shared: Path) -> dict[str, list[Task]]:
    business = _jsonl(BUSINESS)
    seeds = _jsonl(shared / "self-instruct" / "seed_tasks.jsonl")
    ifeval = _jsonl(shared / "ifeval-en" / "input_data.jsonl")
    jcqa = dict.fromkeys(r["question"] for r in _jsonl(shared / "jcommonsenseqa" / "valid-v1.3.jsonl"))

    def task(instruction: str, extra: str = "") -> Task:
        return Task(instruction, extra, detect_lang(instruction))

    return {
        "self-instruct seeds (en)": [task(r["instruction"], r["instances"][0]["input"]) for r in seeds],
        "IFEval prompts (en)": [task(r["prompt"]) for r in ifeval],
        "business (en)": [task(r["instruction"], r["input"]) for r in business if r["lang"] == "en"],
        "JCommonsenseQA valid (ja)": [task(q) for q in jcqa],
        "business (ja)": [task(r["instruction"], r["input"]) for r in business if r["lang"] == "ja"],
    }


# --- filtering ---------------------------------------------------------------------------------
def run_filter(make: type, tasks: list[Task], n_examples: int
               ) -> tuple[dict[str, int], dict[str, list[dict[str, str]]]]:
    """Counts as TaskFilter keeps them ('kept', 'kept_ja', ...) and a few dropped examples per
    reason and language; `make` is this TaskFilter or the one at BEFORE (totals only)."""
    flt = make([])
    counts: Counter = Counter()
    examples: dict[str, list[dict[str, str]]] = {}
    for task in tasks:
        before = dict(flt.counts)
        flt.add(task)
        outcome = next(r for r in ("kept", *REASONS) if flt.counts[r] > before.get(r, 0))
        counts.update([outcome, f"{outcome}_{task.lang}"])
        if outcome != "kept" and len(examples.setdefault(f"{outcome}_{task.lang}", [])) < n_examples:
            examples[f"{outcome}_{task.lang}"].append(
                {"instruction": task.instruction[:160], **({"input": task.input[:120]} if task.input else {})})
    return dict(counts), examples


def by_language(counts: dict[str, int]) -> dict[str, dict[str, object]]:
    """{lang: {items, kept, kept_share, dropped: {reason: n}}} from TaskFilter-style counts."""
    out: dict[str, dict[str, object]] = {}
    for key, n in counts.items():
        outcome, _, lang = key.rpartition("_")
        if outcome not in ("kept", *REASONS):
            continue
        entry = out.setdefault(lang, {"items": 0, "kept": 0, "dropped": {}})
        entry["items"] += n
        if outcome == "kept":
            entry["kept"] += n
        else:
            entry["dropped"][outcome] = n
    for entry in out.values():
        entry["kept_share"] = round(entry["kept"] / entry["items"], 4)
    return dict(sorted(out.items()))


# --- calibrations ------------------------------------------------------------------------------
def _f1(a: list[str], b: list[str]) -> float:
    lcs = lcs_length(a, b)
    return 2 * lcs / (len(a) + len(b)) if lcs else 0.0


def parallel_calibration(business: list[dict]) -> dict[str, object]:
    """Characters per word and near-duplicate scores on the instructions written in both languages."""
    en = {r["id"]: r["instruction"] for r in business if r["lang"] == "en"}
    ja = {r["id"]: r["instruction"] for r in business if r["lang"] == "ja"}
    ids = [i for i in en if i in ja]

    def count(selected: list[str]) -> dict[str, float]:
        """CJK characters per English word, the Latin words a Japanese text keeps (SQL, 2024) aside."""
        words = sum(len(text_units(en[i])) for i in selected)
        cjk = sum(sum(1 for u in text_units(ja[i]) if CJK_CHAR.fullmatch(u)) for i in selected)
        latin = sum(sum(1 for u in text_units(ja[i]) if not CJK_CHAR.fullmatch(u)) for i in selected)
        return {"pairs": len(selected), "en_words": words, "ja_cjk_chars": cjk, "ja_latin_units": latin,
                "ja_cjk_chars_per_en_word": round(cjk / (words - latin), 3)}

    length = {"all": count(ids), "over_40_words": count([i for i in ids if len(text_units(en[i])) > 40]),
              "up_to_10_words": count([i for i in ids if len(text_units(en[i])) <= 10])}

    pairs = list(itertools.combinations(ids, 2))
    en_units = {i: text_units(en[i]) for i in ids}
    scores = {"en_words": [_f1(en_units[a], en_units[b]) for a, b in pairs]}
    for name, units in (("ja_characters", text_units), ("ja_bigrams", dedup_units)):
        split = {i: units(ja[i]) for i in ids}
        scores[name] = [_f1(split[a], split[b]) for a, b in pairs]

    def sequential_drops(texts: dict[str, str], units, threshold: float = 0.7) -> list[str]:
        pool, dropped = [], []
        for i in ids:
            u = units(texts[i])
            if any(_f1(u, p) >= threshold for p in pool):
                dropped.append(i)
            else:
                pool.append(u)
        return dropped

    near = {"pairs": len(pairs),
            "mean_rouge_l": {k: round(statistics.mean(v), 3) for k, v in scores.items()},
            "mean_abs_diff_from_en": {k: round(statistics.mean(abs(x - y) for x, y in zip(scores["en_words"], v)), 3)
                                      for k, v in scores.items() if k != "en_words"},
            "pairs_at_or_over_0.7": {k: sum(s >= 0.7 for s in v) for k, v in scores.items()},
            "dropped_at_0.7": {"en_words": sequential_drops(en, text_units),
                               "ja_characters": sequential_drops(ja, text_units),
                               "ja_bigrams": sequential_drops(ja, dedup_units)}}
    return {"length": length, "near_duplicate": near}


def letter_loops(shared: Path) -> dict[str, object]:
    """The longest letter loop (as `_is_loop` counts one) in every text of the shared data."""
    texts: list[str] = []
    for r in _jsonl(shared / "self-instruct" / "seed_tasks.jsonl"):
        texts += [r["instruction"]] + [v for inst in r["instances"] for v in (inst["input"], inst["output"])]
    texts += [r["prompt"] for r in _jsonl(shared / "ifeval-en" / "input_data.jsonl")]
    for name in ("train-v1.3.jsonl", "valid-v1.3.jsonl"):
        texts += [r[k] for r in _jsonl(shared / "jcommonsenseqa" / name)
                  for k in ("question", "choice0", "choice1", "choice2", "choice3", "choice4")]
    texts += [r[k] for r in _jsonl(shared / "gsm8k" / "train.jsonl") for k in ("question", "answer")]
    longest, where = 0, ""
    for text in texts:
        for m in _LETTER_LOOP.finditer(text):
            repeats = len(m.group()) // len(m.group(1))
            if _is_loop(m.group(1)) and repeats > longest:
                longest, where = repeats, m.group()
    return {"texts": len(texts), "longest_letter_loop_repeats": longest, "longest_letter_loop": where,
            "texts_with_fffd_or_controls": sum(1 for t in texts if "\ufffd" in t or any(
                unicodedata.category(c) == "Cc" and c not in "\t\n\r" for c in t))}


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--examples", type=int, default=3, help="dropped examples kept per reason and language")
    args = parser.parse_args()
    data = sources(args.shared)
    result: dict[str, object] = {"benchmark": "filters_on_real_text", "commit": _commit(),
                                 "sources": {name: len(tasks) for name, tasks in data.items()}}
    per_source, totals, examples = {}, {}, {}
    for label, make in (("before", filter_before()), ("after", TaskFilter)):
        total: Counter = Counter()
        examples[label] = {}
        for name, tasks in data.items():
            counts, dropped = run_filter(make, tasks, args.examples)
            per_source.setdefault(name, {})[label] = by_language(counts)
            total.update(counts)
            for key, items in dropped.items():
                examples[label].setdefault(key, []).extend(items[:max(0, args.examples - len(examples[label].get(key, [])))])
        totals[label] = by_language(dict(total))
    result |= {"kept_share": {label: {lang: v["kept_share"] for lang, v in t.items()} for label, t in totals.items()},
               "by_language": totals, "by_source": per_source,
               "calibration": parallel_calibration(_jsonl(BUSINESS)) | {"letter_loops": letter_loops(args.shared)},
               "dropped_examples": examples}
    print(json.dumps(result, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
