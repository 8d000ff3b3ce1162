"""The model card (README.md) that travels with the GGUF files: what the model is, what it
learned from, how well it does, how it may be used — every number read from the run's ledger."""

from __future__ import annotations

import json

from edgedistill import __version__
from edgedistill.evaluate.audit_report import (
    card_rows,
    licence_for_export,
    licence_text,
)
from edgedistill.evaluate.report import markdown_table, quality_table
from edgedistill.recipe import Recipe
from edgedistill.run import Ledger, RunDir, atomic_write_text


def model_card(recipe: Recipe, run: RunDir, ledger: Ledger, export_table: str) -> str:
    meta = ledger.meta()
    gen = ledger.metrics("generate").get("stage", {})
    student = ledger.metrics("student").get("stage", {})
    train = ledger.metrics("train").get("stage", {})
    header, rows = quality_table(ledger)
    languages = ["en"] + (["ja"] if gen.get("prompts_ja") else [])
    teacher = meta.get("teacher", recipe.teacher.model)
    license_id = licence_for_export(recipe, ledger)
    front = {"license": license_id or "other", "language": languages,
             "tags": ["gguf", "llama.cpp", "distillation", "edgedistill"], "base_model_relation": "distilled"}
    quality = markdown_table(header, rows) if rows else "Not evaluated in this run."
    return f"""---
{chr(10).join(f"{k}: {json.dumps(v, ensure_ascii=False)}" for k, v in front.items())}
---

# {recipe.run.name}

A small language model distilled with edgedistill {__version__} from **{teacher}**, to run
privately and offline in llama.cpp, Ollama or LM Studio.

## Model

- Student: {meta.get('student_init', 'not recorded')};
  {student.get('student_params', 0) / 1e6:.1f}M parameters = {student.get('param_fraction', 0):.0%} of the teacher.
- Tokenizer and chat template: {meta.get('student_tokenizer', 'not recorded')}.

## Data

{int(gen.get('prompts', 0))} prompts ({int(gen.get('train_prompts', 0))} for training,
{int(gen.get('heldout_prompts', 0))} held out; {int(gen.get('prompts_ja', 0))} in Japanese) from
`{', '.join(recipe.generate.seeds)}`{' plus ' + str(int(gen['new_instructions'])) + ' Self-Instruct tasks' if gen.get('new_instructions') else ''},
answered by the teacher ({int(gen.get('answer_tokens', 0))} answer tokens; {int(gen.get('text_only_answers', 0))} kept as
text only).

## Training

{meta.get('kd_mode', 'Not trained in this run.')}; {int(train.get('steps', 0))} steps over
{int(train.get('train_tokens', 0))} tokens.

## Evaluation (held-out prompts)

{quality}

{card_rows(ledger)}## Files

{export_table}
## Intended use and limits

For private, offline assistants on a laptop or phone, in the teacher's domain and languages.
A distilled student imitates its teacher: it inherits the teacher's errors and biases, knows
less, and drifts further from it on long answers and on topics the distill set did not
cover. Check it on your own held-out prompts before relying on it; do not use it for
decisions about people without human review.

## License

{licence_text(recipe, ledger)}
"""


def write_model_card(recipe: Recipe, run: RunDir, ledger: Ledger, export_table: str) -> None:
    atomic_write_text(run.export_dir / "README.md", model_card(recipe, run, ledger, export_table))
