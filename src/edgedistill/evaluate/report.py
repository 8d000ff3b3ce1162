"""report.html and report.md: every number read back from the run's ledger (and the training
logs it points to), so what the report says is what the run recorded.

report.html is one self-contained file (plots as embedded PNG from matplotlib, no scripts, no
external requests) that a manager can open from a mail: the headline ratio, the quality
table with the best student value per column marked, quality vs size and vs decode speed,
training curves, the judge, task accuracy, a per-example viewer, the cost ledger, the stages
and the recipe. report.md carries the same tables for terminals and pull requests.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

from edgedistill import __version__
from edgedistill.recipe import Recipe
from edgedistill.run import Ledger, RunDir, atomic_write_text

ROW_LABELS = {"teacher": "teacher", "student_before": "student before KD", "student_after": "student after KD",
              "student_sft": "SFT baseline (text only)"}


@dataclass(frozen=True)
class Column:
    key: str
    title: str
    fmt: str  # "params" | "mb" | "pct" | "f2" | "f3" | "f1" | "s"
    better: str | None  # "high" | "low" | None (no best marked)


COLUMNS = [
    Column("parameters", "params", "params", None),
    Column("size_bytes", "size MB", "mb", "low"),
    Column("perplexity", "perplexity ↓", "f2", "low"),
    Column("bits_per_byte", "bits/byte ↓", "f3", "low"),
    Column("kl_one_to_one", "KL at 1:1 tokens ↓", "f3", "low"),
    Column("top1_agreement", "top-1 agreement ↑", "pct", "high"),
    Column("rouge_l", "ROUGE-L ↑", "f3", "high"),
    Column("chrf", "chrF ↑", "f3", "high"),
    Column("rouge_l_en", "ROUGE-L en", "f3", "high"),
    Column("rouge_l_ja", "ROUGE-L ja", "f3", "high"),
    Column("chrf_ja", "chrF ja", "f3", "high"),
    Column("decode_tokens_per_s", "decode tok/s ↑", "f1", "high"),
    Column("prefill_tokens_per_s", "prefill tok/s ↑", "f0", "high"),
    Column("time_to_first_token_s", "first token s ↓", "f3", "low"),
    Column("peak_rss_bytes", "peak RSS MB ↓", "mb", "low"),
    Column("draft_acceptance", "draft acceptance ↑", "pct", "high"),
]
TERMINAL_COLUMNS = ("parameters", "perplexity", "top1_agreement", "rouge_l", "chrf", "decode_tokens_per_s")
TASK_METRICS = {"exact_match": "exact match", "mc_loglik_acc": "MC log-likelihood", "mc_generate_acc": "MC generation"}


def fmt(kind: str, value: float) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return {"params": lambda v: f"{v / 1e6:.1f}M", "mb": lambda v: f"{v / 1e6:.1f}", "pct": lambda v: f"{v:.1%}",
            "f0": lambda v: f"{v:.0f}", "f1": lambda v: f"{v:.1f}", "f2": lambda v: f"{v:.2f}",
            "f3": lambda v: f"{v:.3f}"}[kind](value)


# ---- what the ledger holds ------------------------------------------------------------------
def model_rows(ledger: Ledger) -> list[tuple[str, str, dict[str, float]]]:
    """(key, label, metrics) for every evaluated model, then every GGUF file measured in llama.cpp."""
    results = ledger.metrics("evaluate")
    rows = [(name, label, results[name]) for name, label in ROW_LABELS.items() if name in results]
    if not exports_current(ledger):
        return rows
    export = ledger.metrics("export")
    for subject, metrics in export.items():
        if subject.startswith("gguf:"):
            rows.append((subject, f"GGUF {subject.removeprefix('gguf:')} (llama.cpp)", metrics))
    rows += [(subject, f"ExecuTorch {subject.removeprefix('pte:')} (XNNPACK)", metrics)
             for subject, metrics in export.items() if subject.startswith("pte:")]
    return _with_draft_acceptance(rows, export.get("draft", {}))


def _with_draft_acceptance(rows: list[tuple[str, str, dict[str, float]]], draft: dict[str, float]
                           ) -> list[tuple[str, str, dict[str, float]]]:
    """The students before and after KD get their acceptance rate as the teacher's draft."""
    keys = {"student_before": "draft_acceptance_before", "student_after": "draft_acceptance_after"}
    return [(key, label, m | {"draft_acceptance": draft[keys[key]]} if keys.get(key) in draft else m)
            for key, label, m in rows]


DRAFT_TITLE = "Speculative decoding (the student as the teacher's draft)"


def draft_text(ledger: Ledger) -> str | None:
    """Speculative decoding in words: the teacher in llama.cpp with the student as its draft."""
    draft = ledger.metrics("export").get("draft") if exports_current(ledger) else None
    if not draft or "teacher_tokens_per_s" not in draft:
        return None
    parts = [f"{words}: {draft[f'draft_acceptance_{label}']:.1%} of drafted tokens accepted, "
             f"{draft[f'draft_tokens_per_s_{label}']:.1f} tokens/s ({draft[f'draft_speedup_{label}']:.2f}x), "
             f"output identical to the teacher's on {int(draft[f'draft_identical_{label}'])} of "
             f"{int(draft['draft_prompts'])} prompts"
             for label, words in (("before", "student before KD"), ("after", "student after KD"))
             if f"draft_acceptance_{label}" in draft]
    return (f"The teacher in llama.cpp, greedy, on {int(draft['draft_prompts'])} held-out prompts, alone "
            f"{draft['teacher_tokens_per_s']:.1f} tokens/s (median), and with the student as its speculative-"
            f"decoding draft (up to {int(draft['draft_max'])} tokens per step) — " + "; ".join(parts)
            + ". Speed-ups are medians of side-by-side requests on this machine; acceptance is the share of the "
            "student's proposals the teacher keeps, a direct measure of how closely it imitates the teacher.")


def exports_current(ledger: Ledger) -> bool:
    """GGUF measurements belong in the report only when they are of this student: the export
    stage is done or running (the model card), and the evaluation is not being redone."""
    export, evaluate = ledger.stage("export"), ledger.stage("evaluate")
    return (export is not None and export.status in ("done", "running")
            and not (evaluate is not None and evaluate.status == "running"))


def best_values(rows: list[tuple[str, str, dict[str, float]]], columns: list[Column]) -> dict[str, float]:
    """The best value per column among the students (the teacher is the reference, not a contender)."""
    best = {}
    for col in columns:
        values = [m[col.key] for key, _, m in rows if key != "teacher" and col.key in m and not math.isnan(m[col.key])]
        if col.better and len(set(values)) > 1:  # a tie among all (a shared speed measurement) marks none
            best[col.key] = max(values) if col.better == "high" else min(values)
    return best


SPEED_KEYS = ("decode_tokens_per_s", "prefill_tokens_per_s", "time_to_first_token_s")


def speed_unreliable(ledger: Ledger) -> bool:
    return bool(ledger.metrics("evaluate").get("speed", {}).get("speed_unreliable"))


def speed_note(ledger: Ledger) -> str:
    """How the HF rows' speeds were measured, with the anchor beside them."""
    speed = ledger.metrics("evaluate").get("speed")
    if not speed:
        return ""
    rounds = next((int(m["speed_rounds"]) for _, _, m in model_rows(ledger) if "speed_rounds" in m), 0)
    note = (f" HF speeds are the median of {rounds} rounds measured in turns across the models, with the machine's "
            f"float32 matmul speed beside them: {speed['speed_anchor_gflops']:.1f} GFLOP/s, which moved "
            f"{speed['speed_anchor_spread']:.0%} during the measurement.")
    shared = [label for _, label, m in model_rows(ledger) if m.get("speed_shared")]
    if shared:
        note += (f" Rows with the architecture and precision of a row above show that row's measured speed (it "
                 f"does not depend on the weights' values): {', '.join(shared)}.")
    if speed.get("speed_unreliable"):
        note += " More than 30%: the speed columns are marked unreliable — compare them only as rough orders."
    return note


def _present(rows, columns: list[Column]) -> list[Column]:
    return [c for c in columns if any(c.key in m for _, _, m in rows)]


def quality_cells(ledger: Ledger, keys: tuple[str, ...] | None = None
                  ) -> tuple[list[str], list[list[str]], set[tuple[int, int]]]:
    """Header, rows (one per model or GGUF file; the label first) and the (row, column) cells
    holding each column's best student value; `keys` picks the columns (the terminal's)."""
    rows = model_rows(ledger)
    columns = _present(rows, [c for c in COLUMNS if keys is None or c.key in keys])
    best = best_values(rows, columns)
    table, marked = [], set()
    for r, (key, label, m) in enumerate(rows):
        cells = [label]
        for c, col in enumerate(columns, start=1):
            cells.append(fmt(col.fmt, m[col.key]) if col.key in m else "–")
            if col.key in best and key != "teacher" and col.key in m and m[col.key] == best[col.key]:
                marked.add((r, c))
        table.append(cells)
    unreliable = speed_unreliable(ledger)
    titles = [c.title + (" (unreliable)" if unreliable and c.key in SPEED_KEYS else "") for c in columns]
    return ["model"] + titles, table, marked


def quality_table(ledger: Ledger, keys: tuple[str, ...] | None = None,
                  mark_best: str | None = None) -> tuple[list[str], list[list[str]]]:
    """quality_cells' header and rows, for report.md, the card or the terminal; `mark_best`
    wraps each column's best student value (e.g. "**{}**")."""
    header, rows, best = quality_cells(ledger, keys)
    if mark_best:
        rows = [[mark_best.format(cell) if (r, c) in best else cell for c, cell in enumerate(row)]
                for r, row in enumerate(rows)]
    return header, rows


def task_table(ledger: Ledger) -> tuple[list[str], list[list[str]]]:
    """Task accuracy: one row per model, one column per (eval set, scoring)."""
    rows = [(k, label, m) for k, label, m in model_rows(ledger) if not k.startswith(("gguf:", "pte:"))]
    keys = sorted({k for _, _, m in rows for k in m if k.startswith("task_") and not k.endswith("_items")})
    if not keys:
        return [], []
    def title(key: str) -> str:
        for metric, name in TASK_METRICS.items():
            if key.endswith("_" + metric):
                task = key.removeprefix("task_").removesuffix("_" + metric)
                n = next((int(m[f"task_{task}_items"]) for _, _, m in rows if f"task_{task}_items" in m), 0)
                return f"{task} {name} (n={n})"
        return key
    return ["model"] + [title(k) for k in keys], [[label] + [fmt("pct", m[k]) if k in m else "–" for k in keys]
                                                  for _, label, m in rows]


def filter_table(ledger: Ledger) -> tuple[list[str], list[list[str]]]:
    """Self-Instruct filter outcomes per reason × language, read from the generate stage's
    `filter_<outcome>` totals and `filter_<outcome>_<lang>` splits; the last row is each
    language's kept share, so a filter that eats one language shows at once. Empty when the
    run has no per-language split (not self_instruct, or a run from before the split)."""
    gen = ledger.metrics("generate").get("stage", {})
    totals: dict[str, float] = {}
    split: dict[str, dict[str, float]] = {}
    for name, n in gen.items():
        if not name.startswith("filter_"):
            continue
        total, _, lang = name.rpartition("_")
        if total in gen:  # filter_near_duplicate_ja, beside filter_near_duplicate
            split.setdefault(total.removeprefix("filter_"), {})[lang] = n
        else:
            totals[name.removeprefix("filter_")] = n
    if not split:
        return [], []
    langs = sorted({lang for by in split.values() for lang in by})
    rows = [[outcome, *(f"{int(split[outcome].get(lang, 0))}" if outcome in split else "–" for lang in langs),
             f"{int(n)}"] for outcome, n in sorted(totals.items(), key=lambda item: (item[0] != "kept", item[0]))]
    seen = {lang: sum(by.get(lang, 0) for by in split.values()) for lang in langs}  # teacher_failed has no language
    kept = split.get("kept", {})
    every = sum(totals[outcome] for outcome in split)
    rows.append(["kept share", *(fmt("pct", kept.get(lang, 0) / seen[lang]) if seen[lang] else "–" for lang in langs),
                 fmt("pct", totals.get("kept", 0) / every)])
    return ["outcome", *langs, "all"], rows


def reasoning_table(ledger: Ledger) -> tuple[list[str], list[list[str]]]:
    """Thinking on vs off: one row per (model, eval set), from the reasoning_* metrics of the
    evaluate stage (transformers) and of the export stage (each GGUF file in llama.cpp)."""
    from edgedistill.evaluate.reasoning import METRICS

    kinds = {"accuracy_on": "pct", "accuracy_off": "pct", "thinking_tokens": "f1"}
    rows = []
    for _, label, m in model_rows(ledger):
        tasks = sorted({k.removeprefix("reasoning_").removesuffix("_accuracy_on") for k in m
                        if k.startswith("reasoning_") and k.endswith("_accuracy_on")})
        for task in tasks:
            rows.append([label, task] + [fmt(kinds.get(metric, "f2"), m.get(f"reasoning_{task}_{metric}"))
                                         for metric in METRICS])
    return (["model", "eval set", *METRICS.values()], rows) if rows else ([], [])


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def headline(ledger: Ledger) -> str | None:
    """One sentence for a manager: how close the distilled student is to the teacher, against
    the student before KD and the SFT baseline, and what the smallest edge file keeps."""
    rows = {key: m for key, _, m in model_rows(ledger)}
    teacher, after = rows.get("teacher"), rows.get("student_after")
    if not teacher or not after or "top1_agreement" not in after:
        return None
    before, base = rows.get("student_before", {}), rows.get("student_sft", {})
    compare = [f"{before['top1_agreement']:.0%} before distillation"] if "top1_agreement" in before else []
    compare += [f"{base['top1_agreement']:.0%} for the SFT baseline"] if "top1_agreement" in base else []
    text = (f"With {after['parameters'] / teacher['parameters']:.0%} of the teacher's parameters, the distilled "
            f"student predicts the teacher's next token {after['top1_agreement']:.0%} of the time"
            + (f" ({', '.join(compare)})" if compare else "") + ".")
    ggufs = [(k, m) for k, m in rows.items() if k.startswith("gguf:") and "chrf" in m and m.get("size_bytes")]
    if ggufs and "chrf" in after:
        key, m = min(ggufs, key=lambda item: item[1]["size_bytes"])
        text += (f" As {key.removeprefix('gguf:')} GGUF it is {m['size_bytes'] / 1e6:.0f} MB "
                 f"({m['size_bytes'] / teacher['size_bytes']:.0%} of the teacher's {teacher['size_bytes'] / 1e6:.0f} MB "
                 f"as evaluated) with chrF {m['chrf']:.3f} against the teacher's answers (F32 student: {after['chrf']:.3f})"
                 + (f", decoding {m['decode_tokens_per_s']:.0f} tokens/s in llama.cpp" if m.get("decode_tokens_per_s") else "")
                 + ".")
    return text


def judge_text(ledger: Ledger) -> str:
    judge = ledger.metrics("evaluate").get("judge")
    if not judge:
        return "Not run (`evaluate.judge = true` to ask the teacher, or any teacher backend, to judge)."
    return (f"Judge {ledger.meta().get('judge', '')}: {int(judge['wins'])} wins, {int(judge['ties'])} ties, "
            f"{int(judge['losses'])} losses for the distilled student; win rate (ties count half) "
            f"{judge['win_rate']:.2f}, 95% bootstrap interval {judge['ci_low']:.2f}–{judge['ci_high']:.2f}. Each prompt "
            f"was judged in both orders; {int(judge['inconsistent'])} pairs where the order changed the verdict and "
            f"{int(judge['invalid'])} unreadable verdicts count as ties.")


def xtok_summary(run: RunDir, ledger: Ledger) -> tuple[str, list[str], list[list[str]]] | None:
    """The cross-tokenizer section (a student of another vocabulary): what training used, in
    words, and coverage per language. None when the vocabularies were the same."""
    train = ledger.metrics("train").get("stage", {})
    if "xtok_byte_coverage" not in train:
        return None
    log = _read_log(run.root / "train_log.jsonl")
    with_kd = [r for r in log if "kd" in r]
    if with_kd:
        terms = ", ".join(f"{name.removeprefix('xtok_')} {sum(r[name] for r in with_kd) / len(with_kd):.3f}"
                          for name in ("xtok_mapped_kl", "xtok_alm", "xtok_uld") if name in with_kd[0])
        used = (f"Training used the teacher's logits: {len(with_kd)} of {len(log)} optimizer steps had a KD term "
                f"(mean per term: {terms}).")
    else:
        used = "Training used the teacher's text only (no step had a KD term)."
    text = (f"The student speaks another vocabulary than the teacher. {used} The loss: "
            f"{ledger.meta().get('kd_mode', '')}. Coverage below is of the training answers: the share of answer "
            "bytes whose teacher and student tokens coincide (1:1 groups, where the mapped KL applies) and the "
            "share of the teacher's top-k probability there on tokens the student's vocabulary spells too.")
    rows = {key: m for key, _, m in model_rows(ledger)}
    after, sft = rows.get("student_after", {}), rows.get("student_sft", {})
    if "bits_per_byte" in after and "bits_per_byte" in sft:
        text += (f" Held out, the KD student needs {after['bits_per_byte']:.3f} bits per byte of the teacher's "
                 f"answers against {sft['bits_per_byte']:.3f} for the SFT baseline (text only, same steps)"
                 + (f"; KL at 1:1 tokens {after['kl_one_to_one']:.3f} against {sft['kl_one_to_one']:.3f}"
                    if "kl_one_to_one" in after and "kl_one_to_one" in sft else "") + ".")
    langs = [""] + sorted(k.removeprefix("xtok_byte_coverage_") for k in train if k.startswith("xtok_byte_coverage_"))
    table = [[lang or "all", fmt("pct", train.get(f"xtok_byte_coverage{'_' + lang if lang else ''}")),
              fmt("pct", train.get(f"xtok_mass_coverage{'_' + lang if lang else ''}"))] for lang in langs]
    return text, ["language", "answer bytes in 1:1 groups", "teacher top-k mass mapped there"], table


def _xtok_markdown(run: RunDir, ledger: Ledger) -> str:
    summary = xtok_summary(run, ledger)
    return "" if summary is None else \
        f"## Cross-tokenizer distillation\n\n{summary[0]}\n\n{markdown_table(summary[1], summary[2])}\n\n"


def _xtok_html(run: RunDir, ledger: Ledger) -> str:
    summary = xtok_summary(run, ledger)
    return "" if summary is None else (f'<h2>Cross-tokenizer distillation</h2>\n<p id="xtok">{html.escape(summary[0])}</p>\n'
                                       f'{_html_table(summary[1], summary[2], table_id="xtok-coverage")}')


# ---- plots ------------------------------------------------------------------------------------
def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _read_log(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def plots(run: RunDir, ledger: Ledger) -> dict[str, str]:
    """{title: base64 PNG}: training curves, quality vs size, quality vs decode speed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out: dict[str, str] = {}
    kd, sft = _read_log(run.root / "train_log.jsonl"), _read_log(run.root / "train_log_sft.jsonl")
    if kd:
        fig, ax = plt.subplots(figsize=(6.4, 3.4))
        ax.plot([r["step"] for r in kd], [r["loss"] for r in kd], label="KD loss (CE + KL mix)", lw=1)
        if any("ce" in r for r in kd):
            ax.plot([r["step"] for r in kd], [r.get("ce") for r in kd], label="KD run: CE on teacher text", lw=1)
        if sft:
            ax.plot([r["step"] for r in sft], [r["loss"] for r in sft], label="SFT baseline: CE", lw=1)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        out["Training loss"] = _png(fig)
        plt.close(fig)
    rows = [(label, m) for _, label, m in model_rows(ledger) if "chrf" in m]
    for key, xlabel, title, log_x in (("size_bytes", "size on disk (MB, log scale)", "Quality vs size", True),
                                      ("decode_tokens_per_s", "decode tokens/s (batch 1, this CPU)",
                                       "Quality vs decode speed", False)):
        points = [(label, m[key] / (1e6 if key == "size_bytes" else 1), m["chrf"]) for label, m in rows if m.get(key)]
        if len(points) < 2:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 3.6))
        for label, x, y in points:
            ax.scatter([x], [y], s=36)
            ax.annotate(label, (x, y), fontsize=7, xytext=(4, 4), textcoords="offset points")
        if log_x:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("chrF vs teacher answers")
        ax.grid(alpha=0.3)
        out[title] = _png(fig)
        plt.close(fig)
    return out


# ---- HTML -------------------------------------------------------------------------------------
CSS = """body{font-family:system-ui,-apple-system,"Segoe UI","Hiragino Sans","Noto Sans CJK JP",sans-serif;
max-width:72rem;margin:2rem auto;padding:0 1rem;color:#1d1d1f;line-height:1.45}
h1{font-size:1.5rem}h2{font-size:1.15rem;margin-top:2rem;border-bottom:1px solid #ddd;padding-bottom:.2rem}
table{border-collapse:collapse;margin:.6rem 0;font-size:.88rem}th,td{border:1px solid #d4d4d8;padding:.25rem .5rem;
text-align:right}th:first-child,td:first-child{text-align:left}th{background:#f4f4f5}td.best{font-weight:700;
background:#e7f6e7}.headline{font-size:1.1rem;background:#f0f6ff;border-left:4px solid #3b82f6;padding:.6rem .9rem}
img{max-width:100%;border:1px solid #eee;margin:.4rem .4rem 0 0}details{margin:.3rem 0;border:1px solid #e4e4e7;
border-radius:4px;padding:.3rem .6rem}summary{cursor:pointer}.answers{display:grid;grid-template-columns:10rem 1fr;
gap:.2rem .8rem;font-size:.88rem}.answers div{white-space:pre-wrap}pre{background:#f7f7f8;padding:.6rem;
overflow:auto;font-size:.8rem}.note{color:#555;font-size:.85rem}"""


def _html_table(header: list[str], rows: list[list[str]], best_cells: set[tuple[int, int]] = frozenset(),
                table_id: str = "") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    best_td = '<td class="best">'
    body = "".join("<tr>" + "".join(
        f"{best_td if (r, c) in best_cells else '<td>'}{html.escape(cell)}</td>" for c, cell in enumerate(row))
        + "</tr>" for r, row in enumerate(rows))
    ident = f' id="{table_id}"' if table_id else ""
    return f"<table{ident}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _quality_html(ledger: Ledger) -> str:
    header, rows, best = quality_cells(ledger)
    return _html_table(header, rows, best, "quality")


def _filters_html(ledger: Ledger) -> str:
    header, rows = filter_table(ledger)
    if not rows:
        return ""
    return (f'<h3>Self-Instruct filters</h3>\n{_html_table(header, rows, table_id="filters")}'
            f'\n<p class="note">{html.escape(FILTER_NOTE)}</p>')


def _examples_html(run: RunDir) -> str:
    path = run.eval_dir / "answers.jsonl"
    if not path.is_file():
        return "<p>No answers recorded.</p>"
    parts = []
    for record in (json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()):
        # the distill set's answer, shown apart only where the teacher row's greedy answer differs from it
        reference = [("reference_answer", "reference (distill set)")] \
            if record.get("reference_answer", record.get("teacher_answer")) != record.get("teacher_answer") else []
        answers = "".join(f"<b>{html.escape(label)}</b><div>{html.escape(record[field])}</div>"
                          for field, label in (*reference, ("teacher_answer", "teacher"),
                                               ("student_before_answer", "before KD"),
                                               ("student_after_answer", "after KD"),
                                               ("student_sft_answer", "SFT baseline")) if field in record)
        prompt = record["prompt"]
        parts.append(f"<details><summary>[{html.escape(record['lang'])}] {html.escape(prompt[:110])}"
                     f"{'…' if len(prompt) > 110 else ''}</summary><p>{html.escape(prompt)}</p>"
                     f"<div class=\"answers\">{answers}</div></details>")
    return "\n".join(parts)


REASONING_NOTE = ("Greedy, per eval set: thinking on is the model's own generation prompt, off its template's "
                  "switch (enable_thinking=False) or an empty trace prefilled; accuracy per 1k tokens counts every "
                  "generated token (trace and answer). GGUF rows: the same prompts, greedy answers and scoring in "
                  "llama.cpp (export stage).")


def _reasoning_html(ledger: Ledger) -> str:
    header, rows = reasoning_table(ledger)
    if not rows:
        return ""
    return (f'<h2>Reasoning</h2>\n{_html_table(header, rows, table_id="reasoning")}\n'
            f'<p class="note">{html.escape(REASONING_NOTE)}</p>\n')


def _reasoning_markdown(ledger: Ledger) -> str:
    header, rows = reasoning_table(ledger)
    return f"## Reasoning\n\n{markdown_table(header, rows)}\n\n{REASONING_NOTE}\n\n" if rows else ""


def render_html(recipe: Recipe, run: RunDir, ledger: Ledger, sections: dict[str, str]) -> str:
    pictures = "".join(f'<figure style="display:inline-block;margin:0"><img alt="{html.escape(t)}" '
                       f'src="data:image/png;base64,{png}"><figcaption class="note">{html.escape(t)}</figcaption></figure>'
                       for t, png in plots(run, ledger).items())
    task_header, task_rows = task_table(ledger)
    line = headline(ledger)
    spec = draft_text(ledger)
    draft_html = f'<h2>{html.escape(DRAFT_TITLE)}</h2>\n<p id="draft">{html.escape(spec)}</p>' if spec else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>edgedistill report — {html.escape(recipe.run.name)}</title><style>{CSS}</style></head>
<body>
<h1>edgedistill report — run <code>{html.escape(recipe.run.name)}</code></h1>
<p class="note">{html.escape(sections['intro'])}</p>
{f'<p class="headline" id="headline">{html.escape(line)}</p>' if line else ''}
<h2>Teacher vs students vs edge files</h2>
{_quality_html(ledger)}
<p class="note">{html.escape(sections['quality_note'])} Bold: the best student value in each column.</p>
{pictures}
{draft_html}
<h2>Task accuracy</h2>
{_html_table(task_header, task_rows, table_id="tasks") if task_rows else '<p>No eval sets with answers in this run (evaluate.tasks).</p>'}
{_reasoning_html(ledger)}<h2>Judge (pairwise, both orders)</h2>
<p id="judge">{html.escape(judge_text(ledger))}</p>
{_audit_html(recipe, ledger)}
<h2>Held-out answers</h2>
{_examples_html(run)}
<h2>Data and training</h2>
{_html_table(['what', 'value'], sections['data_rows'])}
{_filters_html(ledger)}
{_xtok_html(run, ledger)}
<h2>Teacher usage (cost ledger)</h2>
{_html_table(*sections['usage'], table_id="usage")}
<h2>Stages</h2>
{_html_table(*sections['stages'])}
<h2>Recipe</h2>
<pre>{html.escape(recipe.to_toml().strip())}</pre>
<p class="note">edgedistill {__version__}. Every number above is read from {html.escape(str(run.ledger_path))}.</p>
</body></html>
"""


# ---- the stage ----------------------------------------------------------------------------------
def _sections(recipe: Recipe, run: RunDir, ledger: Ledger) -> dict:
    meta = ledger.meta()
    gen = ledger.metrics("generate").get("stage", {})
    student = ledger.metrics("student").get("stage", {})
    train = ledger.metrics("train").get("stage", {})
    sft = ledger.metrics("train").get("sft", {})
    pii = {name.removeprefix("pii_"): int(value) for name, value in gen.items()
           if name.startswith("pii_") and name not in ("pii_scrubbing", "pii_replaced")}
    pii_text = (", ".join(f"{kind} {n}" for kind, n in pii.items()) or "none found") if gen.get("pii_scrubbing") \
        else "off (local teacher)"
    train_seconds = train.get("train_seconds", 0) + sft.get("train_seconds", 0)
    stage_seconds = sum(s.seconds or 0 for s in ledger.stages())
    data_rows = [
        ["prompts (train / held-out)", f"{int(gen.get('train_prompts', 0))} / {int(gen.get('heldout_prompts', 0))}"],
        ["Japanese prompts", f"{int(gen.get('prompts_ja', 0))}"],
        ["teacher answer tokens", f"{int(gen.get('answer_tokens', 0))}"],
        ["answers cut by max_new_tokens", f"{int(gen.get('unfinished_answers', 0))}"],
        ["answers kept as text only (teacher vocabulary did not map)", f"{int(gen.get('text_only_answers', 0))}"],
        ["stored logits, bytes per answer token", f"{gen.get('logit_bytes_per_token', 0):.0f}"],
        *_reasoning_rows(gen, meta),
        ["PII placeholders sent instead of the original", pii_text],
        ["student / teacher parameters", f"{student.get('param_fraction', float('nan')):.1%}"],
        ["training steps / tokens (KD)", f"{int(train.get('steps', 0))} / {int(train.get('train_tokens', 0))}"],
        ["training speed (KD)", f"{train.get('tokens_per_s', 0):.0f} tokens/s"],
    ]
    if sft:
        data_rows.append(["SFT baseline steps / tokens", f"{int(sft.get('steps', 0))} / {int(sft.get('train_tokens', 0))}"])
    data_rows.append(["machine hours (wall clock), all stages (training alone)", f"{stage_seconds / 3600:.2f} ({train_seconds / 3600:.2f})"])
    usage = (['stage', 'teacher', 'requests', 'retries', 'failures', 'prompt tokens', 'completion tokens', 'cost USD',
              'of which reasoning'],
             [[stage, teacher, *(f"{int(v.get(k, 0)):,}" for k in ("requests", "retries", "failures",
                                                                   "prompt_tokens", "completion_tokens")),
               f"{v.get('cost_usd', 0.0):.4f}", f"{int(v.get('reasoning_tokens', 0)):,}"]
              for (stage, teacher), v in ledger.usage().items()])
    stages = (['stage', 'status', 'seconds'],
              [[s.name, s.status, f"{s.seconds:.1f}" if s.seconds else "–"] for s in ledger.stages() if s.name != "report"])
    intro = (f"Teacher {meta.get('teacher', recipe.teacher.model)}. Student: {meta.get('student_init', '?')}; "
             f"{meta.get('student_tokenizer', '')}. Training: {meta.get('kd_mode', 'not run yet')}. "
             f"Held-out prompts: {int(gen.get('heldout_prompts', 0))} (never trained on).")
    quality_note = ("Perplexity is of the teacher's answers to the held-out prompts; top-1 agreement is the share of "
                    "answer positions where the model's most likely token is the teacher's; ROUGE-L and chrF compare "
                    "the model's greedy answer with the teacher's (Japanese by character); speed is batch 1 on this "
                    "machine (transformers for HF rows, llama.cpp for GGUF rows); peak RSS is the process's peak "
                    "while that model was loaded and evaluated (for HF rows an upper bound: the process keeps memory "
                    "from the rows before; GGUF rows are the llama.cpp server's own). The teacher's own ROUGE-L/chrF are 1 when its stored "
                    "greedy answers are reused, and below 1 where they were regenerated and batched greedy decoding "
                    "drifted at near-ties: read them as the noise floor.")
    quality_note += speed_note(ledger)
    if "xtok_byte_coverage" in train:
        quality_note += (" The student speaks another vocabulary: its perplexity is per token of its own tokenizer, "
                         "not comparable with the teacher's; bits per byte (nats of every answer token over the "
                         "answer's UTF-8 bytes) is, and its KL and top-1 agreement are taken at 1:1 tokens (where "
                         "both tokenizations have the same token).")
    return {"data_rows": data_rows, "usage": usage, "stages": stages, "intro": intro, "quality_note": quality_note}


def _reasoning_rows(gen: dict[str, float], meta: dict[str, str]) -> list[list[str]]:
    """Traces and rejection sampling, when the run had them."""
    rows = []
    if gen.get("reasoning_samples"):
        rows.append(["answers with a teacher trace / trace tokens (kept as text only)",
                     f"{int(gen['reasoning_samples'])} / {int(gen.get('reasoning_tokens', 0))} "
                     f"({int(gen.get('text_only_traces', 0))})"])
    if gen.get("verified_prompts"):
        reasons = ", ".join(f"{k.removeprefix('verified_rejected_').replace('_', ' ')} {int(v)}"
                            for k, v in sorted(gen.items()) if k.startswith("verified_rejected_") and v)
        rows.append(["verified answers kept / rejected (why)",
                     f"{int(gen.get('verified_kept', 0))} / {int(gen.get('verified_rejected', 0))}"
                     + (f" ({reasons})" if reasons else "")
                     + f"; {int(gen.get('verified_prompts_unsolved', 0))} of {int(gen['verified_prompts'])} "
                     "prompts with none kept"])
    if "reasoning" in meta:
        rows.append(["student's reasoning target", meta["reasoning"]])
    return rows


def _gguf_markdown(ledger: Ledger, run: RunDir) -> str:
    export = ledger.metrics("export") if exports_current(ledger) else {}
    rows = [[subject.removeprefix("gguf:"), f"{m['size_bytes'] / 1e6:.1f}", f"{m['bits_per_weight']:.2f}",
             f"{m['kl_vs_reference']:.4f}" if "kl_vs_reference" in m else "—",
             f"{m['top1_vs_reference']:.1%}" if "top1_vs_reference" in m else "—",
             f"{m.get('prefill_tokens_per_s', 0):.0f}", f"{m.get('decode_tokens_per_s', 0):.1f}"]
            for subject, m in export.items() if subject.startswith("gguf:")]
    if not rows:
        return "No export yet."
    parity = export.get("parity", {})
    return (markdown_table(["type", "size MB", "bits/weight", "KL vs first", "top-1 vs first", "prefill tok/s",
                             "decode tok/s"], rows)
            + f"\n\nThe first row is the reference (highest precision). Against transformers it gives "
            f"{greedy_summary(parity, 'held-out prompts')}, log-probs within "
            f"{parity.get('max_logprob_diff', float('nan')):.4f}, tokenizer "
            f"{'identical' if parity.get('tokenizer_match') else 'different'}, chat template "
            f"{'identical' if parity.get('template_match') else 'different'}. Files: `{run.export_dir}`.")


def pte_markdown(rows: list[tuple[str, dict]]) -> str:
    """ExecuTorch programs, (type, metrics): size, KL and top-1 against the fp32 student in
    transformers, speed next to the llama.cpp file of comparable bits, and each program's parity
    with the transformers model of its own numerics. For export.md, the model card and report.md."""
    if not rows:
        return ""
    threads = int(rows[0][1].get("runtime_threads", 0))
    on_threads = f", XNNPACK on {threads} thread{'s' if threads > 1 else ''}" if threads else ""
    lines = [f"ExecuTorch programs (.pte, XNNPACK, static KV cache of {int(rows[0][1].get('max_seq_len', 0))} "
             f"tokens, one token per call), run in ExecuTorch's Python runtime on this machine{on_threads}:", "",
             markdown_table(["type", "size MB", "KL vs fp32 student", "top-1 vs fp32 student", "prefill tok/s",
                             "decode tok/s", "llama.cpp file of comparable bits: MB, decode tok/s"],
                            [[kind, f"{m['size_bytes'] / 1e6:.1f}",
                              f"{m['kl_vs_reference']:.4f}" if "kl_vs_reference" in m else "—",
                              f"{m['top1_vs_reference']:.1%}" if "top1_vs_reference" in m else "—",
                              f"{m.get('prefill_tokens_per_s', 0):.0f}", f"{m.get('decode_tokens_per_s', 0):.1f}",
                              f"{m.get('gguf_twin', 'GGUF')} {m['gguf_twin_size_bytes'] / 1e6:.1f} MB, "
                              f"{m['gguf_twin_decode_tokens_per_s']:.1f}" if "gguf_twin_size_bytes" in m else "—"]
                             for kind, m in rows])]
    for kind, m in rows:
        if "greedy_prompts" in m:
            against = "the student" if kind == "fp32" else "the student quantized the same way by torchao"
            lines += ["", f"Parity of the {kind} program with {against}, in transformers: ExecuTorch's C++ "
                      f"tokenizer {'identical' if m.get('tokenizer_match') else 'DIFFERENT'} on a mixed "
                      f"English/Japanese/emoji text, {greedy_summary(m)}, largest log-prob difference "
                      f"{m.get('max_logprob_diff', float('nan')):.2e} over {int(m.get('compared_positions', 0))} "
                      "listed entries."]
    return "\n".join(lines) + "\n"


def _pte_ledger_markdown(ledger: Ledger) -> str:
    export = ledger.metrics("export") if exports_current(ledger) else {}
    rows = [(subject.removeprefix("pte:"), m) for subject, m in export.items() if subject.startswith("pte:")]
    return "\n" + pte_markdown(sorted(rows, key=lambda r: r[1].get("size_bytes", 0), reverse=True)) if rows else ""


FILTER_NOTE = ("What happened to each task the teacher proposed, by the language of its instruction; the kept "
               "share is kept / proposed. The length cap counts English words (Japanese characters converted at "
               "the ratio measured on parallel text), near duplicates compare words and Japanese character pairs.")


def _filters_markdown(ledger: Ledger) -> str:
    header, rows = filter_table(ledger)
    return f"\n### Self-Instruct filters\n\n{markdown_table(header, rows)}\n\n{FILTER_NOTE}\n" if rows else ""


def greedy_summary(parity: dict[str, float], prompts: str = "prompts") -> str:
    """The greedy comparison in words, for the export table and the run report."""
    text = (f"greedy tokens identical on {int(parity.get('greedy_match', 0))} of "
            f"{int(parity.get('greedy_prompts', 0))} {prompts}")
    if near_ties := int(parity.get("greedy_near_ties", 0)):
        text += (f" ({near_ties} more part where transformers' top two are closer than twice the largest "
                 "log-prob difference: rounding, not a conversion error)")
    return text


def _audit_markdown(recipe: Recipe, ledger: Ledger) -> str:
    """Issue 18's Safety, Leakage and Licence sections (evaluate/audit_report.py)."""
    from edgedistill.evaluate.audit_report import audit_markdown

    return audit_markdown(recipe, ledger)


def _audit_html(recipe: Recipe, ledger: Ledger) -> str:
    from edgedistill.evaluate.audit_report import audit_html

    return audit_html(recipe, ledger)


def write_report(recipe: Recipe, run: RunDir, ledger: Ledger) -> dict[str, float]:
    sections = _sections(recipe, run, ledger)
    header, rows = quality_table(ledger, mark_best="**{}**")
    task_header, task_rows = task_table(ledger)
    line = headline(ledger)
    spec = draft_text(ledger)
    draft_md = f"## {DRAFT_TITLE}\n\n{spec}\n\n" if spec else ""
    text = f"""# edgedistill report — run `{recipe.run.name}`

{sections['intro']} edgedistill {__version__}.
The same report with plots and every held-out answer: `{run.report_html_path}`.
{chr(10) + '**' + line + '**' + chr(10) if line else ''}
## Teacher vs students vs edge files

{markdown_table(header, rows)}

{sections['quality_note']} Bold: the best student value in each column.

{draft_md}## Task accuracy

{markdown_table(task_header, task_rows) if task_rows else 'No eval sets with answers in this run (evaluate.tasks).'}

{_reasoning_markdown(ledger)}## Judge (pairwise, both orders)

{judge_text(ledger)}

## Data and training

{markdown_table(['what', 'value'], sections['data_rows'])}
{_filters_markdown(ledger)}
{_xtok_markdown(run, ledger)}{_audit_markdown(recipe, ledger)}
## Edge files (GGUF, measured in llama.cpp)

{_gguf_markdown(ledger, run)}
{_pte_ledger_markdown(ledger)}
## Teacher usage (cost ledger, every attempt)

{markdown_table(*sections['usage'])}

## Stages

{markdown_table(*sections['stages'])}

## Recipe

```toml
{recipe.to_toml().strip()}
```
"""
    atomic_write_text(run.report_path, text)
    atomic_write_text(run.report_html_path, render_html(recipe, run, ledger, sections))
    return {}
