"""The student stage: choose the layers to keep on the distill set, cut, save as safetensors
(or take a checkpoint of any family, or a fresh model from a config). What was done is written
to the ledger in words (`student_init`, `student_tokenizer`) for the report, the model card and
the GGUF metadata, so they say what this run did rather than what runs usually do."""

from __future__ import annotations

from edgedistill.console import console
from edgedistill.data.store import load_distill_set
from edgedistill.distill.student import (
    STRATEGY_WORDS,
    choose_layers,
    cut_student,
    layer_ranges,
)
from edgedistill.errors import UserError
from edgedistill.models.hf import count_parameters, load_causal_lm, save_model
from edgedistill.models.vocab import vocab_matches
from edgedistill.recipe import Recipe
from edgedistill.run import Ledger, RunDir


def run_student(recipe: Recipe, run: RunDir, ledger: Ledger) -> dict[str, float]:
    cfg = recipe.student
    teacher, tokenizer, _ = load_causal_lm(recipe.teacher.local_model, recipe.teacher.dtype)
    if cfg.init != "cut":
        return _other_student(recipe, run, ledger, teacher, tokenizer)
    probe = load_distill_set(run, split="train")[:cfg.probe_samples]
    kept, scores = choose_layers(teacher, cfg.strategy, cfg.keep_layers, probe)
    student = cut_student(teacher, kept)
    teacher_params, student_params = count_parameters(teacher), count_parameters(student)
    fraction = student_params / teacher_params
    if fraction > cfg.max_param_fraction:
        raise UserError(f"student.keep_layers: {cfg.keep_layers} layers give {fraction:.0%} of the teacher's "
                        f"parameters, above student.max_param_fraction = {cfg.max_param_fraction:.0%}")
    console.print(f"student: {len(kept)} of {teacher.config.num_hidden_layers} layers ({cfg.strategy}), "
                  f"{student_params / 1e6:.1f}M parameters = {fraction:.0%} of the teacher; kept {kept}")
    save_model(student, tokenizer, run.student_init_dir,
               extra={"kept_layers": kept, "strategy": cfg.strategy, "layer_scores": scores,
                      "teacher_layers": teacher.config.num_hidden_layers})
    n_layers = teacher.config.num_hidden_layers
    ledger.set_meta("student_kept_layers", ",".join(map(str, kept)))
    ledger.set_meta("student_init", f"{len(kept)} of the teacher's {n_layers} decoder layers (kept "
                    f"{layer_ranges(kept)}, chosen by {STRATEGY_WORDS[cfg.strategy]})")
    ledger.set_meta("student_tokenizer", "the teacher's tokenizer and chat template, unchanged")
    return {"teacher_params": teacher_params, "student_params": student_params, "param_fraction": fraction,
            "kept_layers": len(kept)}


def _other_student(recipe: Recipe, run: RunDir, ledger: Ledger, teacher, tokenizer) -> dict[str, float]:
    """A local checkpoint as it is, or a fresh model from the teacher's config with overrides."""
    import torch
    from transformers import AutoModelForCausalLM

    cfg = recipe.student
    if cfg.init == "checkpoint":
        if not cfg.model:
            raise UserError("student.model: init = 'checkpoint' needs a local Hugging Face folder")
        student, student_tokenizer, _ = load_causal_lm(cfg.model)
        extra = {"init": "checkpoint", "from": cfg.model}
        init = (f"the checkpoint {cfg.model} ({student.config.model_type}, "
                f"{student.config.num_hidden_layers} decoder layers), not cut")
    else:
        config = teacher.config.__class__.from_dict({**teacher.config.to_dict(), **cfg.config})
        if getattr(config, "layer_types", None) and len(config.layer_types) != config.num_hidden_layers:
            config.layer_types = config.layer_types[:config.num_hidden_layers]
        torch.manual_seed(recipe.run.seed)
        try:
            student = AutoModelForCausalLM.from_config(config)
        except (ValueError, TypeError) as exc:
            raise UserError(f"student.config: the teacher's config with these overrides is not a valid model ({exc})") from None
        student.generation_config = teacher.generation_config
        student_tokenizer = tokenizer
        extra = {"init": "config", "overrides": cfg.config}
        init = (f"a fresh random {config.model_type} ({config.num_hidden_layers} decoder layers): the teacher's "
                f"config with {', '.join(f'{k} = {v}' for k, v in cfg.config.items()) or 'no changes'}")
    teacher_params, student_params = count_parameters(teacher), count_parameters(student)
    console.print(f"student: {cfg.init}, {student_params / 1e6:.1f}M parameters = "
                  f"{student_params / teacher_params:.0%} of the teacher")
    save_model(student, student_tokenizer, run.student_init_dir, extra=extra)
    ledger.set_meta("student_kept_layers", "")
    ledger.set_meta("student_init", init)
    ledger.set_meta("student_tokenizer", tokenizer_words(tokenizer, student_tokenizer))
    return {"teacher_params": teacher_params, "student_params": student_params,
            "param_fraction": student_params / teacher_params, "kept_layers": student.config.num_hidden_layers}


def tokenizer_words(teacher_tokenizer, student_tokenizer) -> str:
    """The student's tokenizer against the teacher's, in words."""
    if student_tokenizer is teacher_tokenizer:
        return "the teacher's tokenizer and chat template, unchanged"
    if vocab_matches(teacher_tokenizer, student_tokenizer):
        return "its own tokenizer, with the same vocabulary as the teacher's"
    return (f"its own tokenizer ({len(student_tokenizer)} tokens; the teacher's has {len(teacher_tokenizer)}): "
            "another vocabulary")
