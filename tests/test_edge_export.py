"""The export stage's phone and draft part, end to end on the tiny run: a .pte checked in
ExecuTorch, the student before and after KD as the teacher's draft in llama.cpp, the on-device
bundle, and their rows in export.json, the ledger, the model card and the report."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

if importlib.util.find_spec("executorch") is None:
    if os.environ.get("CI"):
        pytest.fail("executorch is not installed — `make setup` installs the pte extra", pytrace=False)
    pytest.skip("executorch not installed (pip install 'edgedistill[pte]')", allow_module_level=True)


@pytest.fixture(scope="module")
def edge_run(tiny_teacher_dir, tmp_path_factory):
    from conftest import tiny_recipe_for

    from edgedistill.pipeline import run_recipe

    recipe = tiny_recipe_for(tiny_teacher_dir, tmp_path_factory.mktemp("runs"))
    recipe = recipe.model_copy(update={"export": recipe.export.model_copy(update={
        "formats": ["gguf", "pte"], "pte_types": ["8da4w"], "pte_max_seq_len": 512, "pte_eval_positions": 40,
        "draft_prompts": 2, "draft_tokens": 16})})
    return recipe, run_recipe(recipe)


def test_the_pte_is_written_checked_and_recorded(edge_run):
    from edgedistill.run import open_ledger

    recipe, run = edge_run
    record = json.loads((run.export_dir / "export.json").read_text())
    [row] = record["pte"]
    assert row["file"] == "tiny-8da4w.pte" and (run.export_dir / row["file"]).stat().st_size == row["size_bytes"]
    assert row["attention"] == "executorch_sdpa" and row["gguf_twin"] == "q8_0"
    # against the student quantized the same way by torchao, in PyTorch: only kernel rounding apart
    assert row["greedy_match"] + row["greedy_near_ties"] == row["greedy_prompts"] == recipe.export.parity_prompts
    assert row["tokenizer_match"] == 1.0 and row["template_match"] == 1.0
    assert row["kl_positions"] == 40 and row["kl_vs_reference"] > 0 and row["decode_tokens_per_s"] > 0
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in run.export_dir.iterdir()}
    with open_ledger(run) as ledger:
        metrics = ledger.metrics("export")
    assert metrics["pte:8da4w"]["size_bytes"] == row["size_bytes"]
    report = run.report_path.read_text()
    assert "ExecuTorch 8da4w (XNNPACK)" in report and "Parity of the 8da4w program" in report
    assert row["runtime_threads"] == 1 and "XNNPACK on 1 thread:" in report  # how its speed was measured
    card = (run.export_dir / "README.md").read_text()
    assert "ExecuTorch programs (.pte" in card and "| 8da4w |" in card  # the model card lists it
    # built in a second process beside the GGUF checks; every GGUF file timed afterwards, quietly
    assert record["seconds"]["pte_build"] > 0
    phases = row["build_seconds"]  # where the build's time went, each phase measured
    assert set(phases) == {"start", "prepare", "export", "lower", "write", "checks"} and min(phases.values()) > 0
    assert sum(phases.values()) <= record["seconds"]["pte_build"]
    for gguf in record["files"]:
        assert gguf["decode_tokens_per_s"] > 0 and gguf["time_to_first_token_s"] > 0 and gguf["peak_rss_bytes"] > 0
        # every step's wall time kept (ms precision: a tiny model's answers with a warm prompt cache take ~10 ms)
        assert {"write", "parity", "answers", "audit", "speed"} <= set(gguf["seconds"])
        assert gguf["seconds"]["speed"] > 0 and gguf["seconds"]["answers"] > 0


def test_a_pte_build_that_fails_in_its_process_is_one_line(tmp_path, tiny_recipe):
    from edgedistill.errors import UserError
    from edgedistill.export.edge import ProgramChecks, PteBuilds
    from edgedistill.run import RunDir

    run = RunDir(tmp_path / "run")
    run.student_dir.mkdir(parents=True)
    (run.student_dir / "config.json").write_text("{not json")
    recipe = tiny_recipe.model_copy(update={"export": tiny_recipe.export.model_copy(update={
        "formats": ["gguf", "pte"], "pte_types": ["8da4w"]})})
    builds = PteBuilds(recipe, run, ProgramChecks.of(recipe, []))
    try:
        with pytest.raises(UserError, match="config.json"):
            builds.results()
    finally:
        builds.close()
    assert not builds.busy() and not list(run.export_dir.glob("*.pte"))


def test_the_student_before_and_after_kd_as_the_teachers_draft(edge_run):
    from edgedistill.run import open_ledger

    _, run = edge_run
    draft = json.loads((run.export_dir / "export.json").read_text())["draft"]
    assert draft["prompts"] == 2 and draft["teacher"] == "teacher-q8_0.gguf"  # the HF teacher, converted once
    with open_ledger(run) as ledger:
        metrics = ledger.metrics("export")["draft"]
    for label in ("before", "after"):
        assert 0.0 <= metrics[f"draft_acceptance_{label}"] <= 1.0
        assert metrics[f"draft_acceptance_{label}"] == draft[label]["accepted"] / draft[label]["drafted"]
        assert metrics[f"draft_identical_{label}"] == 2  # a draft never changes the teacher's greedy answer
    report = run.report_path.read_text()
    assert "## Speculative decoding (the student as the teacher's draft)" in report
    assert "draft acceptance ↑" in report and f"{metrics['draft_acceptance_after']:.1%}" in report
    assert 'id="draft"' in run.report_html_path.read_text()


def test_the_bundle_links_every_file_a_phone_needs(edge_run):
    _, run = edge_run
    bundle = run.export_dir / "bundle"
    names = {p.name for p in bundle.iterdir()}
    assert {"tiny-f16.gguf", "tiny-q8_0.gguf", "tiny-8da4w.pte", "tokenizer.json", "tokenizer_config.json",
            "MODEL_CARD.md", "README.md"} <= names
    assert not any(name.startswith(".") for name in os.listdir(run.export_dir) if "bundle" in name)  # no leftovers
    for name in ("tiny-q8_0.gguf", "tiny-8da4w.pte"):
        assert (bundle / name).stat().st_ino == (run.export_dir / name).stat().st_ino  # hard links, not copies
    readme = (bundle / "README.md").read_text()
    assert "adb push tiny-8da4w.pte tokenizer.json tokenizer_config.json /data/local/tmp/llama/" in readme
    assert "llama-server -m /sdcard/Download/tiny-q8_0.gguf" in readme and "<|im_start|>user\nHello" in readme
