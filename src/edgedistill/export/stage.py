"""The export stage: the trained student as GGUF files for llama.cpp / Ollama, each checked.

For every type in the recipe: write the file (atomic), load it in llama.cpp, measure prefill
and decode speed, and — against the highest-precision file — KL and top-1 agreement on
held-out text, and ROUGE-L/chrF of its greedy answers to the held-out prompts against the
teacher's (the evaluate stage's columns, so GGUF rows join the same table). The highest-precision file is also checked against transformers (tokenizer,
chat template, greedy tokens, log-probs). Results go to the ledger (subjects `gguf:<type>`
and `parity`), to `export/export.md`; an Ollama Modelfile points at the best small file and
a model card (README.md) goes with the files.
"""

from __future__ import annotations

import json

from edgedistill.console import console, stage_progress
from edgedistill.data.store import load_distill_set
from edgedistill.errors import UserError
from edgedistill.evaluate.metrics import peak_rss_bytes, rouge_by_lang
from edgedistill.evaluate.report import greedy_summary
from edgedistill.export.card import write_model_card
from edgedistill.export.edge import export_edge, write_device_bundle
from edgedistill.export.gguf import export_gguf
from edgedistill.export.ollama import write_modelfile
from edgedistill.export.verify import (
    LlamaCppClient,
    check_parity,
    greedy_answers,
    serve,
    sparse_kl_top1,
    speed,
    teacher_forced,
)
from edgedistill.recipe import GGUF_TYPES, Recipe
from edgedistill.run import Ledger, RunDir, atomic_write_text


def _markdown(rows: list[dict], parity: dict[str, float], reference: str) -> str:
    lines = ["| file | type | size MB | bits/weight | KL vs " + reference + " | top-1 vs " + reference
             + " | prefill tok/s | decode tok/s |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        kl = "—" if r["type"] == reference else f"{r.get('kl_vs_reference', float('nan')):.4f}"
        top1 = "—" if r["type"] == reference else f"{r.get('top1_vs_reference', float('nan')):.1%}"
        lines.append(f"| {r['file']} | {r['type']} | {r['size_bytes'] / 1e6:.1f} | {r['bits_per_weight']:.2f} | "
                     f"{kl} | {top1} | {r['prefill_tokens_per_s']:.0f} | {r['decode_tokens_per_s']:.1f} |")
    lines += ["", f"Parity of `{reference}` with transformers: tokenizer "
              f"{'identical' if parity.get('tokenizer_match') else 'DIFFERENT'} on a mixed English/Japanese/emoji "
              f"text, chat template {'identical' if parity.get('template_match') else 'DIFFERENT'}, "
              f"{greedy_summary(parity)}, largest log-prob difference "
              f"{parity.get('max_logprob_diff', float('nan')):.4f} over {int(parity.get('compared_positions', 0))} "
              "listed entries."]
    return "\n".join(lines) + "\n"


def run_export(recipe: Recipe, run: RunDir, ledger: Ledger) -> dict[str, float]:
    from edgedistill.models.hf import encode_prompts, load_causal_lm

    cfg = recipe.export
    source = run.student_dir
    if not (source / "config.json").is_file():
        raise UserError(f"{source}: no trained student — run the train stage first")
    types = sorted(dict.fromkeys(cfg.types), key=GGUF_TYPES.index)
    reference = types[0]
    heldout = load_distill_set(run, split="heldout")
    sequences = [s.prompt_ids.tolist() + s.answer_ids.tolist() for s in heldout]
    meta = ledger.meta()
    metadata = {"general.license": cfg.license or "", "edgedistill.run": recipe.run.name,
                "edgedistill.teacher": meta.get("teacher", recipe.teacher.model),
                "edgedistill.distill_set": json.loads(run.distill_set_path.read_text(encoding="utf-8"))["settings"],
                "edgedistill.kept_layers": meta.get("student_kept_layers", "")}
    model, tokenizer, _ = load_causal_lm(str(source))
    max_new = recipe.evaluate.max_new_tokens or recipe.generate.max_new_tokens
    rows: list[dict] = []
    parity: dict[str, float] = {}
    reference_dist = None
    with stage_progress() as progress:
        task = progress.add_task("export", total=len(types), rate="")
        for export_type in types:
            path = run.export_dir / f"{recipe.run.name}-{export_type}.gguf"
            result = export_gguf(source, path, export_type, name=recipe.run.name, metadata=metadata,
                                 embeddings_type=cfg.embeddings_type)
            row = {"file": path.name, "type": export_type, "size_bytes": result.size_bytes,
                   "bits_per_weight": result.bits_per_weight, "parameters": result.parameters,
                   "tensor_types": result.tensor_types}
            with serve(path) as server:
                client = LlamaCppClient(server)
                try:
                    if export_type == reference and cfg.parity_prompts:
                        conversations = [s.prompt_messages for s in heldout[:cfg.parity_prompts]]
                        check = check_parity(client, model, tokenizer, conversations, cfg.parity_tokens)
                        parity = check.as_metrics()
                        if check.first_difference:
                            console.print(f"[yellow]parity note ({export_type}): {check.first_difference}[/]")
                    if cfg.eval_positions:
                        dist = teacher_forced(client, sequences, cfg.eval_positions)
                        if export_type == reference:
                            reference_dist = dist
                        else:
                            row |= sparse_kl_top1(reference_dist, dist)
                    prompt = (sum(sequences, []) * 8)[:cfg.speed_prompt_tokens] or encode_prompts(
                        tokenizer, [[{"role": "user", "content": "Hello"}]])[0]
                    row |= speed(client, prompt, cfg.speed_tokens)
                    if cfg.quality_prompts:  # the same comparison as the evaluate stage, in llama.cpp
                        asked = heldout[:cfg.quality_prompts]
                        answers, ttft = greedy_answers(client, [s.prompt_ids.tolist() for s in asked], max_new)
                        row |= rouge_by_lang(answers, asked) | {"time_to_first_token_s": ttft}
                    if (peak := peak_rss_bytes(server.process.pid)) is not None:
                        row["peak_rss_bytes"] = peak
                finally:
                    client.close()
            rows.append(row)
            ledger.log_metrics("export", f"gguf:{export_type}", {k: v for k, v in row.items()
                                                                if isinstance(v, (int, float))})
            progress.update(task, advance=1, rate=f"{export_type}: {row['decode_tokens_per_s']:.0f} tok/s decode")
    if parity:
        ledger.log_metrics("export", "parity", parity)
    small = next((t for t in ("q8_0", "q4_k_m", "q5_k_m", "q6_k", "q4_0") if t in types), types[-1])
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    write_modelfile(run.export_dir, f"{recipe.run.name}-{small}.gguf", template,
                    [tokenizer.eos_token] if tokenizer.eos_token else [])
    table = _markdown(rows, parity, reference)
    edge = export_edge(recipe, run, ledger, model, tokenizer, heldout, rows)  # .pte files, the student as a draft
    table += edge.markdown
    atomic_write_text(run.export_dir / "export.md", f"# GGUF export — run `{recipe.run.name}`\n\n{table}")
    write_model_card(recipe, run, ledger, table)
    atomic_write_text(run.export_dir / "export.json", json.dumps({"reference": reference, "files": rows,
                                                                  "parity": parity} | edge.record, indent=2))
    write_device_bundle(recipe, run, tokenizer)  # export/bundle/: the files to copy to a phone
    console.print(table)
    return {"files": len(rows), "reference_bits": rows[0]["bits_per_weight"]} | \
        {f"parity_{k}": v for k, v in parity.items()}
