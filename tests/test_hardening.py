"""Bad input and faults as a new user met them (issue 20): each is one clear line naming the file or
flag and what to do, exit code 2, nothing half-written, and a ledger that tells the truth."""

from __future__ import annotations

import json
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import subprocess_env

from edgedistill.run import Ledger

ENV = subprocess_env()


def edgedistill(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgedistill.cli", *args], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr
    # A stage that had begun printed its header rule first; the failure itself is one line.
    lines = [line for line in result.stderr.strip().splitlines() if line.strip() and not line.lstrip().startswith("─")]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    return lines[0]


def tiny_toml(teacher: Path, extra: str = "", name: str = "h", seeds: Path | None = None) -> str:
    seeds_line = f'seeds = ["{seeds}"]\n' if seeds else ""
    return f"""
[run]
name = "{name}"
[teacher]
model = "{teacher}"
[generate]
{seeds_line}limit_per_source = 3
max_new_tokens = 6
batch_size = 2
[student]
keep_layers = 2
[train]
epochs = 1
batch_size = 2
[evaluate]
speed_prompts = 1
speed_tokens = 8
[export]
types = ["f16"]
parity_prompts = 1
parity_tokens = 4
eval_positions = 8
quality_prompts = 2
speed_prompt_tokens = 16
speed_tokens = 8
{extra}"""


def temporary_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".tmp-")]


# --- 1. a seed longer than the teacher's context -------------------------------------------------

def test_a_prompt_longer_than_the_teachers_context_is_named_with_its_line(tiny_teacher_dir, tmp_path):
    seeds = tmp_path / "seeds.jsonl"
    long_instruction = "Summarize this: " + "the quarterly numbers " * 400  # tiny model: 512 positions
    seeds.write_text(json.dumps({"instruction": "Say hello."}) + "\n" + json.dumps({"instruction": long_instruction})
                     + "\n", encoding="utf-8")
    (tmp_path / "r.toml").write_text(tiny_toml(tiny_teacher_dir, seeds=seeds), encoding="utf-8")
    line = one_line_error(edgedistill("run", "r.toml", cwd=tmp_path, timeout=300))
    assert f"{seeds}:2: this prompt is" in line and "does not fit the teacher's context of 512 tokens" in line
    assert not (tmp_path / "runs").exists()  # the preflight runs before anything is created


# --- 1. any signal leaves the ledger truthful ---------------------------------------------------

def _wait_for_running(run: Path, stage: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            db = sqlite3.connect(run / "run.db")
            row = db.execute("SELECT status FROM stages WHERE name=?", (stage,)).fetchone()
            db.close()
            if row and row[0] == "running":
                return
        except sqlite3.Error:
            pass
        time.sleep(0.05)
    raise AssertionError(f"stage {stage} never ran (exit {proc.poll()})")


@pytest.mark.parametrize("sig, expected_exit", [(signal.SIGTERM, 130), (signal.SIGKILL, -signal.SIGKILL)])
def test_a_signal_mid_stage_leaves_the_stage_interrupted_and_the_rerun_finishes(tiny_teacher_dir, tmp_path, sig,
                                                                               expected_exit):
    (tmp_path / "r.toml").write_text(tiny_toml(tiny_teacher_dir).replace("epochs = 1", "epochs = 1000"),
                                     encoding="utf-8")
    run = tmp_path / "runs" / "h"
    proc = subprocess.Popen([sys.executable, "-m", "edgedistill.cli", "run", "r.toml"], cwd=tmp_path, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for_running(run, "train", proc)
    time.sleep(1.0)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == expected_exit, stderr
    ledger = Ledger(run / "run.db")
    try:
        record = ledger.stage("train")
        assert record.status == "interrupted", record
        assert ledger.stage("generate").status == "done"
    finally:
        ledger.close()
    if sig == signal.SIGTERM:
        assert not temporary_files(run)  # a handled signal cleans up after itself
        return
    # kill -9 may land inside a checkpoint save: the unfinished folder is no checkpoint, and the
    # rerun (here with a shorter training) removes it and finishes.
    rerun = subprocess.run([sys.executable, "-m", "edgedistill.cli", "train", "r.toml", "--set", "train.epochs=1"],
                           cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    ledger = Ledger(run / "run.db")
    try:
        assert ledger.stage("train").status == "done"
    finally:
        ledger.close()
    assert not temporary_files(run)


# --- 2. a full disk, a runs-dir that is a file ---------------------------------------------------

@pytest.fixture()
def small_disk(tmp_path):
    """A 160 KB tmpfs: enough for the recipe, the ledger and the sample store, not for a student."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_is_one_line_and_the_rerun_loses_nothing(tiny_teacher_dir, tmp_path, small_disk):
    (tmp_path / "r.toml").write_text(tiny_toml(tiny_teacher_dir), encoding="utf-8")
    line = one_line_error(edgedistill("run", "r.toml", "--runs-dir", str(small_disk), cwd=tmp_path))
    assert "no space left on the device" in line and "run the same command again" in line
    run = small_disk / "h"
    assert not temporary_files(run)
    ledger = Ledger(run / "run.db")
    statuses = {s.name: s.status for s in ledger.stages()}
    ledger.close()
    assert "running" not in statuses.values(), statuses
    stored = sqlite3.connect(run / "distill.db").execute("SELECT COUNT(*) FROM samples").fetchone()[0]
    # Space freed (the run moved to a roomy disk): the rerun reuses the stored answers.
    roomy = tmp_path / "roomy"
    shutil.copytree(run, roomy / "h")
    result = edgedistill("run", "r.toml", "--runs-dir", str(roomy), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    db = sqlite3.connect(roomy / "h" / "run.db")
    requested, prompts = (db.execute("SELECT value FROM metrics WHERE stage='generate' AND name=?", (name,)).fetchone()[0]
                          for name in ("requested_prompts", "prompts"))
    db.close()
    if statuses.get("generate") == "done":
        assert "generate: done earlier" in result.stderr
    else:  # only the answers the full disk kept out were asked for again
        assert requested == prompts - stored


def test_a_runs_dir_that_is_a_file_is_one_line(tiny_teacher_dir, tmp_path):
    (tmp_path / "r.toml").write_text(tiny_toml(tiny_teacher_dir), encoding="utf-8")
    (tmp_path / "afile").write_text("not a folder")
    line = one_line_error(edgedistill("run", "r.toml", "--runs-dir", "afile", cwd=tmp_path, timeout=300))
    assert line == "error: afile: --runs-dir / run.runs_dir is a file, not a folder — pick another --runs-dir or --name"


def test_a_stage_command_on_a_run_that_does_not_exist_creates_nothing(tiny_teacher_dir, tmp_path):
    (tmp_path / "r.toml").write_text(tiny_toml(tiny_teacher_dir), encoding="utf-8")
    line = one_line_error(edgedistill("train", "r.toml", cwd=tmp_path, timeout=300))
    assert "runs/h: no such run yet" in line
    assert not (tmp_path / "runs").exists()


# --- 3. a truncated GGUF teacher -----------------------------------------------------------------

def test_a_truncated_gguf_teacher_is_one_line_in_the_preflight(tmp_path):
    from edgedistill.models.hf import embedded_gguf_path

    truncated = tmp_path / "cut.gguf"
    with embedded_gguf_path().open("rb") as whole:
        truncated.write_bytes(whole.read(1 << 20))
    (tmp_path / "r.toml").write_text(f'[teacher]\nmodel = "{truncated}"\n', encoding="utf-8")
    line = one_line_error(edgedistill("run", "r.toml", cwd=tmp_path, timeout=300))
    assert f"{truncated}: not a readable GGUF model" in line and "is the file complete?" in line


# --- 7. a bad evaluation set is found before any stage ------------------------------------------

@pytest.mark.parametrize("record, complaint", [
    ({"question": "no messages here", "label": 0}, "'messages' must be a list of {role, content}"),
    ({"messages": [{"role": "user", "content": "2+2?"}], "choices": ["3", "4"], "label": 5}, "'label' must be"),
])
def test_a_bad_eval_set_fails_before_generation(tiny_teacher_dir, tmp_path, record, complaint):
    evalset = tmp_path / "eval.jsonl"
    good = {"messages": [{"role": "user", "content": "1+1?"}], "answer": "2"}
    evalset.write_text(json.dumps(good) + "\n" + json.dumps(record) + "\n", encoding="utf-8")
    extra = f'[[evaluate.tasks]]\nname = "mine"\npath = "{evalset}"\nformat = "jsonl"\n'
    (tmp_path / "r.toml").write_text(tiny_toml(tiny_teacher_dir, extra), encoding="utf-8")
    line = one_line_error(edgedistill("run", "r.toml", cwd=tmp_path, timeout=300))
    assert f"{evalset}:2:" in line and complaint in line
    assert not (tmp_path / "runs").exists()


# --- 8. what Windows Notepad and a Japanese keyboard write ---------------------------------------

def test_seeds_with_a_byte_order_mark_are_read(tmp_path):
    from edgedistill.data.prompts import read_seed_tasks

    seeds = tmp_path / "notepad.jsonl"
    seeds.write_bytes("\ufeff".encode() + '{"instruction": "会議の要点をまとめてください。"}\n'.encode())
    assert [t.instruction for t in read_seed_tasks(str(seeds))] == ["会議の要点をまとめてください。"]


def test_full_width_json_punctuation_gets_a_hint(tmp_path):
    seeds = tmp_path / "ime.jsonl"
    seeds.write_text('｛"instruction"： "挨拶文を書いてください。"｝\n', encoding="utf-8")
    (tmp_path / "r.toml").write_text(f'[generate]\nseeds = ["{seeds}"]\n', encoding="utf-8")
    line = one_line_error(edgedistill("run", "r.toml", cwd=tmp_path, timeout=300))
    assert f"{seeds}:1: not valid JSON" in line and "full-width punctuation (：｛ ｝)" in line.replace("： ｛", "：｛")


# --- smaller: flags are blamed for their own values ----------------------------------------------

def test_flag_values_are_blamed_on_the_flag_in_words(tiny_teacher_dir, tmp_path):
    (tmp_path / "r.toml").write_text(tiny_toml(tiny_teacher_dir), encoding="utf-8")
    line = one_line_error(edgedistill("export", "r.toml", "--quant", "q3_x", cwd=tmp_path, timeout=300))
    assert line.startswith("error: --quant: 'q3_x' is not a GGUF type we write — choose from f32, f16")
    line = one_line_error(edgedistill("run", "r.toml", "--name", "../x", cwd=tmp_path, timeout=300))
    assert line.startswith("error: --name: run.name: use letters, digits, '.', '_' and '-' only")
    assert "[A-Za-z" not in line and not (tmp_path / "runs").exists()


def test_gguf_type_names_are_case_blind():
    from edgedistill.recipe import ExportCfg

    assert ExportCfg(types=["Q8_0", "F16", "q4_K_M"]).types == ["q8_0", "f16", "q4_k_m"]


def test_a_second_process_on_a_run_in_use_is_one_line_and_touches_nothing(tiny_teacher_dir, tmp_path):
    """Two `make demo` in one clone: the second used to race the first through its files and died
    with a tokenizer traceback mid-stage. Now it stops before writing anything; once the first
    process is gone (even by kill -9: the kernel drops an flock) the run is free again."""
    from edgedistill.run import RunDir

    (tmp_path / "r.toml").write_text(tiny_toml(tiny_teacher_dir), encoding="utf-8")
    run = RunDir(tmp_path / "runs" / "h")
    run.root.mkdir(parents=True)
    run.recipe_path.write_text("# the first process's recipe\n")
    with run.held():  # this test process is the first one
        line = one_line_error(edgedistill("run", "r.toml", "--runs-dir", "runs", cwd=tmp_path, timeout=300))
        assert line == ("error: runs/h: another edgedistill process is working on this run — "
                        "wait for it to finish, or give this one another --name")
        line = one_line_error(edgedistill("generate", "r.toml", "--runs-dir", "runs", cwd=tmp_path, timeout=300))
        assert "another edgedistill process" in line
    assert run.recipe_path.read_text() == "# the first process's recipe\n"
    assert sorted(p.name for p in run.root.iterdir()) == ["recipe.toml"]  # no ledger, no stage output
    with run.held():  # released on leaving: the same folder can be held again
        pass
