"""The generate stage in self_instruct mode, on a scripted teacher backend (registered like
any backend) so the bootstrap loop, filters, store and resume are what is under test."""

import sqlite3

from edgedistill.data.generate import bootstrap_settings
from edgedistill.data.store import load_distill_set
from edgedistill.pipeline import run_recipe
from edgedistill.recipe import build_recipe
from edgedistill.run import open_ledger


def _recipe(tmp_path, backend: str, new: int = 12):
    return build_recipe({
        "run": {"name": "si", "runs_dir": str(tmp_path / "runs")},
        "teacher": {"backend": backend, "model": "unused"},
        "generate": {"mode": "self_instruct", "limit_per_source": 5, "new_instructions": new, "batch_size": 2,
                     "bootstrap_examples": 3, "top_k_logprobs": 4},
    }, "<self-instruct test recipe>")


def test_self_instruct_grows_filters_and_answers_new_tasks(tmp_path, scripted_teacher):
    recipe = _recipe(tmp_path, scripted_teacher)
    run = run_recipe(recipe, only="generate")
    with open_ledger(run) as ledger:
        m = ledger.metrics("generate")["stage"]
    assert m["new_instructions"] == 12
    assert m["filter_exact_duplicate"] >= m["bootstrap_requests"]  # each request repeats an example
    assert m["filter_blacklist"] >= m["bootstrap_requests"]  # ... and asks for a picture
    assert m["filter_kept"] >= 12
    # the same outcomes per language: each language's counts add up to the total
    assert m["filter_kept_en"] > 0 and m["filter_kept_ja"] > 0
    for outcome in ("kept", "exact_duplicate", "blacklist"):
        assert sum(v for k, v in m.items() if k.startswith(f"filter_{outcome}_")) == m[f"filter_{outcome}"], outcome
    samples = load_distill_set(run)
    grown = [s for s in samples if s.source == "self_instruct"]
    assert len(grown) == 12 and all(s.split == "train" for s in grown)
    assert {s.lang for s in grown} == {"en", "ja"}  # Japanese survives the filters
    assert len(samples) == 10 + 12 and m["prompts"] == 22


def test_self_instruct_resumes_after_the_last_stored_request(tmp_path, scripted_teacher):
    recipe = _recipe(tmp_path, scripted_teacher)
    run = run_recipe(recipe, only="generate")
    settings = bootstrap_settings(recipe)
    db = sqlite3.connect(run.store_path)
    first = db.execute("SELECT instruction FROM instructions WHERE settings=? ORDER BY request, position",
                       (settings,)).fetchall()
    # A crash after the first batch (requests 0 and 1): later batches and every answer are gone.
    db.execute("DELETE FROM instructions WHERE request > 1")
    db.execute("DELETE FROM bootstrap_requests WHERE request > 1")
    db.execute("DELETE FROM samples")
    db.commit()
    run_recipe(recipe, only="generate")
    again = db.execute("SELECT instruction FROM instructions WHERE settings=? ORDER BY request, position",
                       (settings,)).fetchall()
    db.close()
    assert again == first  # the same tasks, in the same order: requests are reproducible


def test_raising_the_target_continues_the_same_sequence(tmp_path, scripted_teacher):
    run = run_recipe(_recipe(tmp_path, scripted_teacher, new=6), only="generate")
    small = [s.messages[0]["content"] for s in load_distill_set(run) if s.source == "self_instruct"]
    run_recipe(_recipe(tmp_path, scripted_teacher, new=12), only="generate")
    large = [s.messages[0]["content"] for s in load_distill_set(run) if s.source == "self_instruct"]
    assert set(small) < set(large) and len(large) == 12
