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
| stored logits, bytes per answer token | {int(gen.get('logit_bytes_per_token', 0))} |
| student / teacher parameters | {student.get('param_fraction', float('nan')):.1%} |
| training steps / tokens | {int(train.get('steps', 0))} / {int(train.get('train_tokens', 0))} |
| training speed | {train.get('tokens_per_s', 0):.0f} tokens/s |

## Stages

{_markdown_table(['stage', 'status', 'seconds'], stage_rows)}

## Recipe

```toml
{recipe.to_toml().strip()}
```
"""
    atomic_write_text(run.report_path, text)
    return {}
