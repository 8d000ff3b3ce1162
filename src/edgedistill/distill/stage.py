"""The student stage: choose the layers to keep on the distill set, cut, save as safetensors."""

from __future__ import annotations

from edgedistill.console import console
from edgedistill.data.generate import load_distill_set
from edgedistill.distill.student import choose_layers, count_parameters, cut_student, save_model
from edgedistill.errors import UserError
from edgedistill.recipe import Recipe
from edgedistill.run import Ledger, RunDir
from edgedistill.teachers.hf import load_causal_lm


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
    ledger.set_meta("student_kept_layers", ",".join(map(str, kept)))
    ledger.set_meta("kd_mode", "logit KD on the teacher's sparse top-k (same tokenizer: student cut from teacher)")
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
    teacher_params, student_params = count_parameters(teacher), count_parameters(student)
    console.print(f"student: {cfg.init}, {student_params / 1e6:.1f}M parameters = "
                  f"{student_params / teacher_params:.0%} of the teacher")
    save_model(student, student_tokenizer, run.student_init_dir, extra=extra)
    ledger.set_meta("student_kept_layers", f"{cfg.init} ({student.config.num_hidden_layers} layers)")
    return {"teacher_params": teacher_params, "student_params": student_params,
            "param_fraction": student_params / teacher_params, "kept_layers": student.config.num_hidden_layers}
