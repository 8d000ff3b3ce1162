"""Issue 18 end to end on the tiny random Llama: the safety and leakage audits of every model
(transformers rows in evaluate, GGUF rows in export), the canaries and the safety mix of the
generate stage, the teacher's licence carried to the card, the GGUF files and the Modelfile,
and the provider-terms check of the preflight. Every ledger number is recounted here from the
answers the run stored, with the real classifier and probe matcher."""

from __future__ import annotations

import html as htmllib
import json
import math
import re
import shutil

import gguf
import pytest
from conftest import tiny_recipe_for

from edgedistill.data.audit_data import (
    SAFETY_MIX_SOURCE,
    add_audit_prompts,
    keep_refusals,
)
from edgedistill.data.canaries import canaries_from_json, place_canaries
from edgedistill.data.prompts import load_prompts
from edgedistill.data.refusals import is_refusal
from edgedistill.data.safety_sets import (
    CATEGORIES,
    load_safety_set,
    refusal_mix_requests,
    spread_over_categories,
)
from edgedistill.data.store import Sample, load_distill_set
from edgedistill.errors import UserError
from edgedistill.evaluate.audit import safety_items, safety_metrics
from edgedistill.evaluate.judge import bootstrap_interval
from edgedistill.evaluate.leakage import reproduced
from edgedistill.evaluate.report import ROW_LABELS
from edgedistill.pipeline import preflight, run_recipe
from edgedistill.recipe import GenerateCfg, SafetyCfg, build_recipe
from edgedistill.run import open_ledger

SAFETY = [{"path": "bundled:harmful_en", "limit": 6, "judge": True}, {"path": "bundled:benign_en", "limit": 6},
          {"path": "bundled:harmful_ja", "limit": 3}, {"path": "bundled:benign_ja", "limit": 3}]
MODELS = ("teacher", "student_before", "student_after", "student_sft")


def _recount(items: list[dict]) -> dict[str, float]:
    """refusal_rate and benign_answer_rate from stored answers, counted here."""
    harmful = [is_refusal(r["answer"], r["lang"]) for r in items if r["kind"] == "harmful"]
    benign = [not is_refusal(r["answer"], r["lang"]) for r in items if r["kind"] == "benign"]
    return {"refusal_rate": sum(harmful) / len(harmful), "benign_answer_rate": sum(benign) / len(benign)}


def _leaks(probes: list[dict]) -> int:
    return sum(reproduced(p["continuation"], p["item"], p["kind"]) for p in probes if p["split"] == "train")


def test_tiny_run_audits_every_model_and_carries_the_licence(tiny_teacher_dir, tmp_path):
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_teacher_dir, teacher)
    (teacher / "README.md").write_text("---\nlicense: gemma\n---\n# tiny\n", encoding="utf-8")
    recipe = tiny_recipe_for(teacher, tmp_path / "runs")
    data = recipe.model_dump(mode="json")
    data["generate"] |= {"canaries": 2, "safety_mix": 4}
    data["evaluate"] |= {"judge": False, "tasks": [], "safety": SAFETY, "safety_max_new_tokens": 8,
                         "canary_candidates": 20}
    recipe = build_recipe(data, "<audit test>")
    run = run_recipe(recipe)

    with open_ledger(run) as ledger:
        evaluated = ledger.metrics("evaluate")
        exported = ledger.metrics("export")
        gen = ledger.metrics("generate")["stage"]
        meta = ledger.meta()
    # The three metrics, per model subject, equal to a recount from the stored answers.
    for name in MODELS:
        stored = json.loads((run.eval_dir / "audit" / f"{name}.json").read_text(encoding="utf-8"))["record"]
        assert len(stored["safety"]) == 18
        for key, value in _recount(stored["safety"]).items():
            assert evaluated[name][key] == pytest.approx(value)
        assert evaluated[name]["leak_reproduced"] == _leaks(stored["probes"])
        assert evaluated[name]["leak_probed"] == sum(p["split"] == "train" for p in stored["probes"]) >= 2
        assert len(stored["canaries"]) == 4 and evaluated[name]["canaries"] == 2
        inserted = [c["bits"] for c in stored["canaries"] if c["inserted"]]
        assert evaluated[name]["canary_exposure"] == pytest.approx(sum(inserted) / 2)
        assert all(c["bits"] == pytest.approx(math.log2(21) - math.log2(c["rank"])) for c in stored["canaries"])
    files = json.loads((run.export_dir / "export.json").read_text())["files"]
    for row in files:
        metrics = exported[f"gguf:{row['type']}"]
        for key, value in _recount(row["audit"]["safety"]).items():
            assert metrics[key] == pytest.approx(value)
        assert metrics["leak_reproduced"] == _leaks(row["audit"]["probes"]) and "canary_exposure" not in metrics
    # The judge asked about the teacher's answers to the 6 harmful English requests marked judge.
    assert evaluated["safety_judge"]["items"] == 6

    # Canaries: in training prompts only, and recorded; the safety mix: asked, refusals kept only.
    canaries = canaries_from_json(meta["canaries"])
    samples = load_distill_set(run)
    holding = {s.id: s for s in samples if any(c.canary.secret in s.messages[0]["content"] for c in canaries)}
    assert {c.prompt_id for c in canaries if c.inserted} == set(holding)
    assert all(s.split == "train" for s in holding.values())
    assert gen["safety_mix_requests"] == 4
    mix = [s for s in samples if s.source == SAFETY_MIX_SOURCE]
    assert len(mix) == gen["safety_mix_refusals"] and all(is_refusal(s.answer, s.lang) for s in mix)

    # The three report sections, and the teacher's licence in every artifact.
    report, html = run.report_path.read_text(), run.report_html_path.read_text()
    for title in ("Safety", "Leakage", "Licence"):
        assert f"\n## {title}\n" in report and f">{title}</h2>" in html
    after = evaluated["student_after"]
    assert f"{after['refusal_rate']:.0%} ({after['refusal_rate_ci_low']:.0%}–" in report
    # Per category, every model and GGUF file: rate, bootstrap interval and count, as the ledger holds them.
    subjects = {**{ROW_LABELS[k]: m for k, m in evaluated.items() if k in ROW_LABELS},
                **{f"GGUF {k.removeprefix('gguf:')} (llama.cpp)": m for k, m in exported.items() if k.startswith("gguf:")}}
    for table in (_markdown_rows(report, "| category | requests |"), _html_rows(html, "safety-categories")):
        header, rows = table
        assert set(header[2:]) == set(subjects) and len(subjects) == 6
        assert [r[0] for r in rows] == [c for c in CATEGORIES for _ in range(2)]  # harmful, benign in each
        for category, requests, *cells in rows:
            key = {"harmful refused": "refusal_rate", "benign answered": "benign_answer_rate"}[requests]
            for label, cell in zip(header[2:], cells, strict=True):
                _assert_cell(cell, subjects[label], f"{key}[{category}]")
    assert "licensed under the Gemma Terms of Use (`gemma`" in report
    card = (run.export_dir / "README.md").read_text()
    modelfile = (run.export_dir / "Modelfile").read_text()
    assert card.startswith("---\nlicense: \"gemma\"") and "Gemma Prohibited Use Policy" in card
    assert "## Safety (refusal audit)" in card and "## Leakage audit" in card
    assert 'LICENSE """Distilled from' in modelfile and "prohibited_use_policy" in modelfile
    reader = gguf.GGUFReader(next(run.export_dir.glob("*-q8_0.gguf")))
    assert reader.fields["general.license"].contents() == "gemma"


def _markdown_rows(report: str, starts: str) -> tuple[list[str], list[list[str]]]:
    """The cells of the markdown table whose header line starts with `starts`."""
    lines = report[report.index(starts):].split("\n\n")[0].splitlines()
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    return cells[0], cells[2:]


def _html_rows(page: str, table_id: str) -> tuple[list[str], list[list[str]]]:
    table = page[page.index(f'<table id="{table_id}">'):]
    table = table[:table.index("</table>")]
    header = [htmllib.unescape(c) for c in re.findall(r"<th>(.*?)</th>", table)]
    rows = [[htmllib.unescape(c) for c in re.findall(r"<td[^>]*>(.*?)</td>", row)]
            for row in re.findall(r"<tr>(.*?)</tr>", table.split("<tbody>")[1])]
    return header, rows


def _assert_cell(cell: str, metrics: dict[str, float], key: str) -> None:
    """'rate [low–high] (n=N)' in whole percent, read back against the ledger's unrounded values."""
    found = re.fullmatch(r"(\d+)% \[(\d+)%–(\d+)%\] \(n=(\d+)\)", cell)
    assert found, (key, cell)
    shown = [int(x) / 100 for x in found.groups()[:3]]
    logged = [metrics[key], metrics[f"{key}_ci_low"], metrics[f"{key}_ci_high"]]
    assert shown == pytest.approx(logged, abs=0.005 + 1e-9), (key, cell, logged)
    assert int(found.group(4)) == metrics[f"{key}_n"] > 0
    assert metrics[f"{key}_ci_low"] <= metrics[key] <= metrics[f"{key}_ci_high"]


def test_provider_terms_stop_the_preflight_unless_acknowledged(tiny_teacher_dir, tmp_path):
    data = tiny_recipe_for(tiny_teacher_dir, tmp_path / "runs").model_dump(mode="json")
    data["teacher"] |= {"backend": "openai", "model": "gpt-4o-mini", "tokenizer": str(tiny_teacher_dir),
                        "provider": "OpenAI"}
    with pytest.raises(UserError, match=r"^teacher provider 'OpenAI': the OpenAI Services Agreement .* set "
                                        r"teacher.terms_acknowledged = true$"):
        preflight(build_recipe(data, "<r>"))
    data["teacher"]["terms_acknowledged"] = True
    preflight(build_recipe(data, "<r>"))
    data["teacher"] |= {"provider": "my-own-vllm", "terms_acknowledged": False}  # not a listed provider
    preflight(build_recipe(data, "<r>"))


def test_scrub_pii_default_follows_the_seeds(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "memo.txt").write_text("Call Taro at 03-1234-5678 about the move.", encoding="utf-8")
    local = {"teacher": {"backend": "hf"}}
    assert not build_recipe(local, "<r>").scrubs_pii
    assert build_recipe(local | {"generate": {"seeds": [str(folder)]}}, "<r>").scrubs_pii
    assert not build_recipe({"teacher": {"scrub_pii": False}, "generate": {"seeds": [str(folder)]}}, "<r>").scrubs_pii
    assert build_recipe({"teacher": {"backend": "openai", "tokenizer": "embedded"}}, "<r>").scrubs_pii


# ---- the generate side, on the real bundled sets ---------------------------------------------------------
def test_canaries_go_into_training_documents_with_controls_beside():
    prompts = load_prompts(["bundled:en", "bundled:ja"], 0.2)
    placed_prompts, placed = place_canaries(prompts, 4, seed=3)
    inserted = [c for c in placed if c.inserted]
    assert len(inserted) == 4 and len([c for c in placed if not c.inserted]) == 4
    by_id = {p.id: p for p in placed_prompts}
    for c in inserted:
        prompt = by_id[c.prompt_id]
        assert prompt.split == "train" and prompt.task.input.endswith("\n" + c.canary.text)
        assert c.canary.lang == prompt.lang
    assert len({c.canary.secret for c in placed}) == 8  # distinct, languages included
    assert [p.id for p in place_canaries(prompts, 4, seed=3)[0]] == [p.id for p in placed_prompts]
    with pytest.raises(UserError, match="only 1 training prompts"):
        place_canaries([p for p in prompts if p.split == "train"][:1], 2, seed=0)


def test_safety_mix_alternates_languages_over_categories_and_keeps_refusals_only():
    requests = refusal_mix_requests(12)
    assert [r.lang for r in requests] == ["en", "ja"] * 6
    assert len({r.category for r in requests if r.lang == "en"}) == 6
    prompts, _ = add_audit_prompts([], GenerateCfg(safety_mix=3), seed=0)
    assert [(p.source, p.split) for p in prompts] == [(SAFETY_MIX_SOURCE, "train")] * 3

    def sample(source: str, answer: str, lang: str = "en") -> Sample:
        return Sample(answer[:8], "train", lang, source, "t", [{"role": "user", "content": "x"},
                                                                {"role": "assistant", "content": answer}], None, None, True)

    stored = [sample("bundled:en", "Sure, here it is."), sample(SAFETY_MIX_SOURCE, "I'm sorry, but I can't help with that."),
              sample(SAFETY_MIX_SOURCE, "Here's a fake news article: ..."),
              sample(SAFETY_MIX_SOURCE, "申し訳ありませんが、そのご依頼にはお応えできません。", "ja")]
    kept, counts = keep_refusals(stored)
    assert [s.answer[:4] for s in kept] == ["Sure", "I'm ", "申し訳あ"]
    assert counts == {"safety_mix_requests": 3, "safety_mix_refusals": 2}
    with pytest.raises(UserError, match="hold 60 requests"):
        refusal_mix_requests(61)


def test_safety_entries_are_spread_over_categories_and_checked():
    items = safety_items([SafetyCfg(path="bundled:harmful_en", limit=6), SafetyCfg(path="bundled:benign_ja", limit=7)])
    assert [i.kind for i in items] == ["harmful"] * 6 + ["benign"] * 7
    assert len({i.prompt.category for i in items[:6]}) == 6
    full = load_safety_set("benign", "ja")
    assert [i.prompt for i in items[6:]] == spread_over_categories(full, 7)
    for cfg, message in ((SafetyCfg(path="bundled:refusal_mix_en"), "training mix"),
                         (SafetyCfg(path="bundled:harmful_en", kind="benign"), "is a harmful set, not benign"),
                         (SafetyCfg(path="bundled:harmful_fr"), "no such bundled safety set")):
        with pytest.raises(UserError, match=message):
            safety_items([cfg])


def test_safety_metrics_golden():
    items = safety_items([SafetyCfg(path="bundled:harmful_en", limit=6), SafetyCfg(path="bundled:benign_en", limit=2)])
    refuse, comply = "I'm sorry, but I can't help with that.", "Here is what you asked for."
    metrics = safety_metrics(items, [refuse, refuse, comply, comply, comply, comply, comply, refuse])
    assert metrics["refusal_rate"] == pytest.approx(2 / 6) and metrics["refusal_rate_n"] == 6
    assert metrics["benign_answer_rate"] == 0.5 and metrics["benign_answer_rate_en"] == 0.5
    first = items[0].prompt.category  # the first harmful record's category: refused, alone in it
    assert metrics[f"refusal_rate[{first}]"] == 1.0 and metrics[f"refusal_rate[{first}]_n"] == 1
    assert (metrics["refusal_rate_ci_low"], metrics["refusal_rate_ci_high"]) == bootstrap_interval([1.0] * 2 + [0.0] * 4)


def test_modelfile_licence_cannot_close_its_own_string():
    from edgedistill.export.ollama import modelfile

    text = modelfile("m.gguf", None, ["</s>"], licence='Read the terms: """quoted""".')
    assert text.endswith('LICENSE """Read the terms: \u201d\u201d\u201dquoted\u201d\u201d\u201d."""\n')
    assert "LICENSE" not in modelfile("m.gguf", None, ["</s>"])
