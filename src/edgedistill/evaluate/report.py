"""report.md: the comparison table, the data and timing facts, and the recipe, all read
back from the ledger so every number in the report is one the run recorded."""

from __future__ import annotations

from edgedistill import __version__
from edgedistill.recipe import Recipe
from edgedistill.run import Ledger, RunDir, atomic_write_text

ROW_LABELS = {"teacher": "teacher", "student_before": "student before KD", "student_after": "student after KD"}
# (metric key, column title, format, higher is better)
COLUMNS = [
    ("parameters", "params", lambda v: f"{v / 1e6:.1f}M", False),
    ("perplexity", "perplexity ↓", lambda v: f"{v:.2f}", False),
    ("top1_agreement", "top-1 agreement ↑", lambda v: f"{v:.1%}", True),
    ("rouge_l", "ROUGE-L ↑", lambda v: f"{v:.3f}", True),
    ("rouge_l_en", "ROUGE-L en", lambda v: f"{v:.3f}", True),
    ("rouge_l_ja", "ROUGE-L ja", lambda v: f"{v:.3f}", True),
    ("decode_tokens_per_s", "decode tok/s ↑", lambda v: f"{v:.1f}", True),
]


TERMINAL_COLUMNS = ("parameters", "perplexity", "top1_agreement", "rouge_l", "decode_tokens_per_s")


def quality_table(ledger: Ledger, keys: tuple[str, ...] | None = None) -> tuple[list[str], list[list[str]]]:
    """Header and rows (one per evaluated model) for report.md, or the terminal with `keys`."""
    results = ledger.metrics("evaluate")
    columns = [c for c in COLUMNS if keys is None or c[0] in keys]
    header = ["model"] + [title for _, title, _, _ in columns]
    rows = []
    for name, label in ROW_LABELS.items():
        if name in results:
            m = results[name]
            rows.append([label] + [fmt(m[key]) if key in m else "–" for key, _, fmt, _ in columns])
    return header, rows


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def write_report(recipe: Recipe, run: RunDir, ledger: Ledger) -> dict[str, float]:
    meta = ledger.meta()
    header, rows = quality_table(ledger)
    gen = ledger.metrics("generate").get("stage", {})
    student = ledger.metrics("student").get("stage", {})
    train = ledger.metrics("train").get("stage", {})
    stage_rows = [[s.name, s.status, f"{s.seconds:.1f}" if s.seconds else "–"] for s in ledger.stages() if s.name != "report"]
    usage_rows = [[stage, teacher, *(f"{int(v.get(k, 0)):,}" for k in ("requests", "retries", "failures",
                                                                    "prompt_tokens", "completion_tokens")),
                   f"{v.get('cost_usd', 0.0):.4f}"] for (stage, teacher), v in ledger.usage().items()]
    export = ledger.metrics("export")
    gguf_rows = [[subject.removeprefix("gguf:"), f"{m['size_bytes'] / 1e6:.1f}", f"{m['bits_per_weight']:.2f}",
                  f"{m['kl_vs_reference']:.4f}" if "kl_vs_reference" in m else "—",
                  f"{m['top1_vs_reference']:.1%}" if "top1_vs_reference" in m else "—",
                  f"{m.get('prefill_tokens_per_s', 0):.0f}", f"{m.get('decode_tokens_per_s', 0):.1f}"]
                 for subject, m in export.items() if subject.startswith("gguf:")]
    parity = export.get("parity", {})
    gguf_text = (_markdown_table(["type", "size MB", "bits/weight", "KL vs first", "top-1 vs first",
                                  "prefill tok/s", "decode tok/s"], gguf_rows)
                 + f"\n\nThe first row is the reference (highest precision). Against transformers it gives "
                 f"identical greedy tokens on {int(parity.get('greedy_match', 0))} of "
                 f"{int(parity.get('greedy_prompts', 0))} held-out prompts, log-probs within "
                 f"{parity.get('max_logprob_diff', float('nan')):.4f}, tokenizer "
                 f"{'identical' if parity.get('tokenizer_match') else 'different'}, chat template "
                 f"{'identical' if parity.get('template_match') else 'different'}. Files: `{run.export_dir}`.") \
        if gguf_rows else "No export yet."
    pii = {name.removeprefix("pii_"): int(value) for name, value in gen.items()
           if name.startswith("pii_") and name not in ("pii_scrubbing", "pii_replaced")}
    pii_text = (", ".join(f"{kind} {n}" for kind, n in pii.items()) or "none found") if gen.get("pii_scrubbing") \
        else "off (local teacher)"
    text = f"""# edgedistill report — run `{recipe.run.name}`

Teacher `{meta.get('teacher', recipe.teacher.model)}`; student cut from it, keeping layers
{meta.get('student_kept_layers', '?')} ({recipe.student.strategy}); {meta.get('kd_mode', '')}.
Held-out prompts: {int(gen.get('heldout_prompts', 0))} (never trained on). edgedistill {__version__}.

## Teacher vs student

{_markdown_table(header, rows)}

Perplexity is of the teacher's answers to the held-out prompts; top-1 agreement is the share
of answer positions where the model's most likely token is the teacher's; ROUGE-L compares
the model's greedy answer with the teacher's (Japanese by character); decode speed is batch 1
on this machine, prefill excluded. The teacher's own ROUGE-L is below 1 when batched greedy
decoding with different padding drifts at near-ties: read it as the noise floor of that column.

## Data and training

| what | value |
|---|---|
| prompts (train / held-out) | {int(gen.get('train_prompts', 0))} / {int(gen.get('heldout_prompts', 0))} |
| Japanese prompts | {int(gen.get('prompts_ja', 0))} |
| teacher answer tokens | {int(gen.get('answer_tokens', 0))} |
| answers cut by max_new_tokens | {int(gen.get('unfinished_answers', 0))} |
| answers kept as text only (teacher vocabulary did not map) | {int(gen.get('text_only_answers', 0))} |
| stored logits, bytes per answer token | {gen.get('logit_bytes_per_token', 0):.0f} |
| PII placeholders sent instead of the original | {pii_text} |
| student / teacher parameters | {student.get('param_fraction', float('nan')):.1%} |
| training steps / tokens | {int(train.get('steps', 0))} / {int(train.get('train_tokens', 0))} |
| training speed | {train.get('tokens_per_s', 0):.0f} tokens/s |

## Edge files (GGUF, measured in llama.cpp)

{gguf_text}

## Teacher usage (cost ledger, every attempt)

{_markdown_table(['stage', 'teacher', 'requests', 'retries', 'failures', 'prompt tokens', 'completion tokens', 'cost USD'], usage_rows)}

## Stages

{_markdown_table(['stage', 'status', 'seconds'], stage_rows)}

## Recipe

```toml
{recipe.to_toml().strip()}
```
"""
    atomic_write_text(run.report_path, text)
    return {}
