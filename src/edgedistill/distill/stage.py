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
