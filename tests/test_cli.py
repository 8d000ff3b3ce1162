"""The command as a user runs it: a real subprocess, exit codes, one-line errors."""

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import subprocess_env

from edgedistill.run import RunDir, open_ledger

ENV = subprocess_env()


def edgedistill(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgedistill.cli", *args], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=600)


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_missing_recipe(tmp_path):
    assert_one_line_error(edgedistill("run", "nope.toml", cwd=tmp_path), "nope.toml", "not found")


def test_unknown_field_and_out_of_range_value(tmp_path):
    (tmp_path / "r.toml").write_text("[student]\nkeep_layerz = 3\n")
    assert_one_line_error(edgedistill("run", "r.toml", cwd=tmp_path), "r.toml", "student.keep_layerz")
    (tmp_path / "r.toml").write_text("[train]\nlr = -1\n")
    assert_one_line_error(edgedistill("run", "r.toml", cwd=tmp_path), "train.lr", "greater than 0")


def test_missing_model_writes_no_stage_output(tmp_path):
    (tmp_path / "r.toml").write_text('[teacher]\nmodel = "/no/such/model"\n[run]\nname = "x"\n')
    assert_one_line_error(edgedistill("run", "r.toml", cwd=tmp_path), "/no/such/model", "not found")
    assert not (tmp_path / "runs" / "x" / "distill.db").exists()


def test_unsupported_architecture(tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "not_a_real_arch"}')
    (model / "model.safetensors").write_bytes(b"")
    (tmp_path / "r.toml").write_text(f'[teacher]\nmodel = "{model}"\n')
    assert_one_line_error(edgedistill("run", "r.toml", cwd=tmp_path), "unsupported architecture 'not_a_real_arch'")


def test_debug_shows_the_traceback(tmp_path):
    result = edgedistill("--debug", "run", "nope.toml", cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_run_and_runs_on_the_tiny_model(tiny_teacher_dir, tmp_path):
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(f"""
[teacher]
model = "{tiny_teacher_dir}"
[generate]
limit_per_source = 3
max_new_tokens = 6
[student]
keep_layers = 2
[train]
epochs = 1
[evaluate]
speed_prompts = 1
speed_tokens = 8
[export]
types = ["f16"]
parity_prompts = 1
parity_tokens = 4
eval_positions = 16
speed_prompt_tokens = 16
speed_tokens = 8
""")
    result = edgedistill("run", "tiny.toml", "--name", "cli", "--set", "train.batch_size=2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "teacher vs student" in result.stderr and "student after KD" in result.stderr
    saved = (tmp_path / "runs" / "cli" / "recipe.toml").read_text()
    assert "batch_size = 2" in saved  # the resolved recipe, overrides included
    listing = edgedistill("runs", cwd=tmp_path)
    assert listing.returncode == 0 and "cli" in listing.stderr and "done" in listing.stderr
    again = edgedistill("evaluate", "runs/cli", cwd=tmp_path)  # a stage on a run folder
    assert again.returncode == 0, again.stderr
    quant = edgedistill("export", "runs/cli", "--quant", "f16,q4_0", cwd=tmp_path)
    assert quant.returncode == 0, quant.stderr
    export = tmp_path / "runs" / "cli" / "export"
    assert sorted(p.name for p in export.glob("*.gguf")) == ["cli-f16.gguf", "cli-q4_0.gguf"]
    card = (export / "README.md").read_text(encoding="utf-8")
    assert card.startswith("---\nlicense:") and "## Evaluation (held-out prompts)" in card
    assert "student after KD" in card and "| cli-q4_0.gguf | q4_0 |" in card
    assert 'FROM ./cli-q4_0.gguf' in (export / "Modelfile").read_text()


@pytest.mark.slow
def test_embedded_teacher_loads_and_answers(tmp_path):
    from edgedistill.recipe import GenerateCfg, TeacherCfg
    from edgedistill.teachers import build_teacher

    teacher = build_teacher(TeacherCfg(), GenerateCfg(max_new_tokens=12, top_k_logprobs=8))
    (answer,) = teacher.chat([[{"role": "user", "content": "What is the capital of France?"}]])
    assert teacher.model_id == "SmolLM2-135M-Instruct-Q4_1"
    assert "Paris" in answer.text
    assert answer.topk_ids.shape == (len(answer.token_ids), 8)


@pytest.mark.slow
def test_demo_tiny_runs_the_whole_path_on_the_embedded_teacher(tmp_path):
    result = edgedistill("demo", "--tiny", "--runs-dir", "runs", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    run = tmp_path / "runs" / "demo-tiny"
    assert (run / "student" / "model.safetensors").is_file() and (run / "report.md").is_file()
    assert "student after KD" in result.stderr and str(run.name) in result.stderr
    assert sorted(p.name for p in (run / "export").glob("*.gguf")) == ["demo-tiny-f16.gguf", "demo-tiny-q8_0.gguf"]
    assert "ollama create demo-tiny" in result.stderr
    report = (run / "report.md").read_text()  # issue 18's acceptance names
    assert all(f"\n## {title}\n" in report for title in ("Safety", "Leakage", "Licence"))
    with open_ledger(RunDir(run)) as ledger:
        evaluated = ledger.metrics("evaluate")
    for subject in ("teacher", "student_before", "student_after"):
        assert {"refusal_rate", "benign_answer_rate", "leak_reproduced"} <= set(evaluated[subject])
    again = edgedistill("demo", "--tiny", "--runs-dir", "runs", cwd=tmp_path)
    assert again.returncode == 0 and again.stderr.count("reused") == 6
