"""The report's `Safety`, `Leakage` and `Licence` sections (issue 18), and the licence text the
model card, the GGUF metadata and the Ollama Modelfile carry — every line computed from the
run's ledger: the evaluate stage's audit metrics per model, the export stage's per GGUF file,
the generate stage's safety-mix counts, and the teacher's licence as the generate stage read it.
"""

from __future__ import annotations

import html
import math
import re

from edgedistill.data.safety_sets import CATEGORIES, LANGS
from edgedistill.evaluate.report import _html_table, markdown_table, model_rows
from edgedistill.evaluate.safety import Rate, headline
from edgedistill.models.licence import (
    Licence,
    gguf_licence_name,
    licence_from_json,
    provider_terms,
)
from edgedistill.recipe import Recipe
from edgedistill.run import Ledger

Table = tuple[list[str], list[list[str]]]
RATES = ("refusal_rate", "benign_answer_rate")
_CATEGORY = re.compile(r"(refusal_rate|benign_answer_rate)\[(.+)\]")  # a per-category rate's metric name


# ---- safety ---------------------------------------------------------------------------------------
def _rate(m: dict[str, float], key: str) -> Rate | None:
    if key not in m:
        return None
    n = int(m.get(f"{key}_n", 0))
    return Rate("all", n, round(m[key] * n), m[key], m.get(f"{key}_ci_low", math.nan), m.get(f"{key}_ci_high", math.nan))


def _with_interval(m: dict[str, float], key: str) -> str:
    rate = _rate(m, key)
    if rate is None:
        return "–"
    return f"{rate.rate:.0%} ({rate.low:.0%}–{rate.high:.0%}, n={rate.n})"


def _bracketed(m: dict[str, float], key: str) -> str:
    """A per-category cell: 'rate [low–high] (n=N)', the bootstrap interval as _rates logged it."""
    rate = _rate(m, key)
    if rate is None:
        return "–"
    return f"{rate.rate:.0%} [{rate.low:.0%}–{rate.high:.0%}] (n={rate.n})"


def safety_table(ledger: Ledger) -> Table:
    """One row per model and GGUF file: harmful requests refused and benign look-alikes answered,
    each with its bootstrap 95% interval, then the same per language."""
    rows = [(k, label, m) for k, label, m in model_rows(ledger) if "refusal_rate" in m or "benign_answer_rate" in m]
    langs = [lang for lang in LANGS if any(f"{what}_{lang}" in m for _, _, m in rows for what in RATES)]
    header = ["model", "harmful refused (95% CI)", "benign answered (95% CI)"]
    header += [f"{what} {lang}" for lang in langs for what in ("refused", "answered")]
    body = [[label, _with_interval(m, "refusal_rate"), _with_interval(m, "benign_answer_rate")]
            + [f"{m[key]:.0%}" if key in m else "–" for lang in langs
               for key in (f"refusal_rate_{lang}", f"benign_answer_rate_{lang}")]
            for _, label, m in rows]
    return header, body


CATEGORY_MEASURES = {"refusal_rate": "harmful refused", "benign_answer_rate": "benign answered"}


def category_table(ledger: Ledger) -> Table:
    """Per category and measure (rows) and model (columns): the share of that category's harmful
    requests refused, and of its benign look-alikes answered, each with its bootstrap 95%
    interval and count — a category of 8 requests spans tens of points, so the interval shows
    which differences between models the audit can tell apart."""
    rows = [(k, label, m) for k, label, m in model_rows(ledger) if "refusal_rate" in m or "benign_answer_rate" in m]
    found = {match.groups(): None for _, _, m in rows for name in m if (match := _CATEGORY.fullmatch(name))}
    order = {c: i for i, c in enumerate(CATEGORIES)}  # bundled order, then others alphabetically
    categories = sorted({category for _, category in found}, key=lambda c: (order.get(c, len(order)), c))
    if not categories:
        return [], []
    body = [[category, words] + [_bracketed(m, f"{what}[{category}]") for _, _, m in rows]
            for category in categories for what, words in CATEGORY_MEASURES.items() if (what, category) in found]
    return ["category", "requests", *(label for _, label, _ in rows)], body


def safety_headline(ledger: Ledger) -> str | None:
    """The distilled student against the teacher, then the smallest GGUF file, in one or two sentences."""
    rows = {k: m for k, _, m in model_rows(ledger)}
    teacher, after = rows.get("teacher", {}), rows.get("student_after", {})
    refusal, benign = _rate(after, "refusal_rate"), _rate(after, "benign_answer_rate")
    if refusal is None or benign is None:
        return None
    text = headline("distilled student", refusal, benign, "teacher", _rate(teacher, "refusal_rate"),
                    _rate(teacher, "benign_answer_rate"))
    ggufs = [(k, m) for k, m in rows.items() if k.startswith("gguf:") and "refusal_rate" in m and m.get("size_bytes")]
    if ggufs:
        key, m = min(ggufs, key=lambda item: item[1]["size_bytes"])
        text += (f" As the {key.removeprefix('gguf:')} GGUF file it refuses {m['refusal_rate']:.0%} and answers "
                 f"{m.get('benign_answer_rate', math.nan):.0%}.")
    return text


def safety_notes(ledger: Ledger) -> list[str]:
    """The judge's agreement with the rule classifier, and what generate.safety_mix added."""
    notes = []
    judge = ledger.metrics("evaluate").get("safety_judge")
    if judge:
        readable = int(judge.get("readable", 0))
        agreed = (f"; on those, agreement with the rule classifier {judge['agreement']:.0%}, Cohen's kappa "
                  f"{judge['kappa']:.2f}" if "agreement" in judge else "")
        if "kappa" in judge and math.isnan(judge["kappa"]):
            agreed = agreed.replace("Cohen's kappa nan", "Cohen's kappa undefined (one label only)")
        notes.append(f"Judge (yes/no: does the answer decline?) on the teacher's answers to {int(judge['items'])} "
                     f"requests: {readable} readable verdicts, {int(judge.get('judge_refusals', 0))} saying it declines "
                     f"(rule classifier: {int(judge.get('rule_refusals', 0))}){agreed}.")
    gen = ledger.metrics("generate").get("stage", {})
    if "safety_mix_requests" in gen:
        requests, refusals = int(gen["safety_mix_requests"]), int(gen["safety_mix_refusals"])
        notes.append(f"generate.safety_mix: the teacher was asked {requests} refusal_mix requests and declined "
                     f"{refusals}; those {refusals} answers are training samples, its other answers are not.")
    return notes


SAFETY_NOTE = ("Greedy answers to the requests of [[evaluate.safety]]; a refusal is a refusal phrase in the answer's "
               "opening sentences (English and Japanese rules, data/refusals.py). Intervals: bootstrap over requests, "
               "95%. Per category: share of harmful requests refused and of benign look-alikes answered, "
               "rate [95% interval] (n=requests).")


# ---- leakage ----------------------------------------------------------------------------------------
def leakage_table(ledger: Ledger) -> Table:
    rows = [(k, label, m) for k, label, m in model_rows(ledger) if "leak_probed" in m]
    if not rows:
        return [], []

    def bits(m: dict[str, float], key: str) -> str:
        return f"{m[key]:.2f}" if key in m and not math.isnan(m[key]) else "–"

    return (["model", "training items reproduced", "held-out (control) reproduced", "canary exposure, bits (max)",
             "control canaries, bits", "canaries ranked first"],
            [[label, f"{int(m['leak_reproduced'])} / {int(m['leak_probed'])}",
              f"{int(m.get('leak_heldout_reproduced', 0))} / {int(m.get('leak_heldout_probed', 0))}",
              f"{bits(m, 'canary_exposure')} ({bits(m, 'canary_exposure_max')})" if "canary_exposure" in m else "–",
              bits(m, "canary_exposure_control"),
              f"{int(m['canary_ranked_first'])} / {int(m['canaries'])}" if "canaries" in m else "–"]
             for _, label, m in rows])


def leakage_note(ledger: Ledger) -> str:
    rows = [m for _, _, m in model_rows(ledger) if "leak_probed" in m]
    if not rows:
        return ""
    kinds = {name.split("/", 1)[1]: int(value) for name, value in rows[0].items() if name.startswith("leak_probed/")}
    probed = ", ".join(f"{kind} {n}" for kind, n in sorted(kinds.items())) or "none"
    cap = next((m["canary_exposure_cap"] for m in rows if "canary_exposure_cap" in m), None)
    text = (f"Probed items in the training samples, by kind: {probed} (PII found by the privacy scrubber's detectors, "
            "and the canaries of generate.canaries). Each model is prompted with the rendered training text before "
            "the item and continues greedily; an item counts as reproduced when the continuation contains it. "
            "Held-out samples (never trained on) are the control.")
    if cap is not None:
        text += (f" Canary exposure (Carlini et al. 2019): log2 of the candidates ranked minus log2 of the canary's "
                 f"rank by log-perplexity; 0 bits is chance, {cap:.1f} bits (ranked first) is the cap here. Controls "
                 "are canaries never inserted. GGUF rows have no exposure: llama.cpp gives no prompt log-probabilities.")
    return text


# ---- licence ---------------------------------------------------------------------------------------------
def teacher_licence(ledger: Ledger) -> Licence | None:
    return licence_from_json(ledger.meta().get("teacher_licence"))


def licence_for_export(recipe: Recipe, ledger: Ledger) -> str:
    """general.license of the GGUF files and the card: export.license, else the teacher's."""
    licence = teacher_licence(ledger)
    return recipe.export.license or (gguf_licence_name(licence) if licence else "")


def licence_text(recipe: Recipe, ledger: Ledger) -> str:
    """What the model card's licence section and the Modelfile's LICENSE say."""
    licence = teacher_licence(ledger)
    teacher = ledger.meta().get("teacher", recipe.teacher.model)
    if licence is None:
        head = f"Distilled from {teacher}; the teacher's licence was not recorded in this run."
    elif licence.known:
        head = (f"Distilled from {teacher}, which is licensed under the {licence.title} ({licence.spdx_or_name}): "
                f"{licence.url}. The distill set was generated by the teacher: its licence applies to this model too.")
    else:
        head = (f"Distilled from {teacher}, whose licence is not known to edgedistill "
                f"({licence.spdx_or_name}; {licence.source}): check its terms before passing this model on.")
    if recipe.export.license and (licence is None or recipe.export.license != licence.spdx_or_name):
        head += f" The recipe declares this model's licence as {recipe.export.license} (export.license)."
    if licence is not None and licence.restrictions_text:
        head += "\n\n" + licence.restrictions_text
    return head


def licence_lines(recipe: Recipe, ledger: Ledger) -> list[str]:
    """The report's licence section: what was read, from where, what is passed on, and warnings."""
    licence = teacher_licence(ledger)
    meta = ledger.meta()
    if licence is None:
        return ["The teacher's licence was not recorded (a run from before it was read): run the generate stage again."]
    lines = []
    if licence.known:
        lines.append(f"The teacher (`{meta.get('teacher', recipe.teacher.model)}`) is licensed under the {licence.title} "
                     f"(`{licence.spdx_or_name}`, {licence.url}), read from {licence.source}.")
    else:
        lines.append(f"**Warning:** the teacher's licence is unknown (`{licence.spdx_or_name}`: {licence.source}). "
                     "Find out its terms before handing the student out, then set export.license.")
    if licence.requires_passing_restrictions:
        lines.append("Its use restrictions must be passed on to whoever receives the model: they are copied into the "
                     "model card and the Ollama Modelfile (LICENSE):")
        lines.append(f"> {licence.restrictions_text}")
    elif licence.restrictions_text:
        lines.append(f"Passed on with the model: {licence.restrictions_text}")
    written = licence_for_export(recipe, ledger)
    source = "export.license in the recipe" if recipe.export.license else "the teacher's licence"
    lines.append(f"GGUF `general.license`, model card and Modelfile: `{written or '(none)'}` ({source}).")
    terms = provider_terms(meta.get("teacher_provider"))
    if terms is not None:
        lines.append(f"The teacher is served by {terms.provider}, whose {terms.terms} ({terms.url}) forbid {terms.clause}; "
                     "the recipe acknowledges it (teacher.terms_acknowledged = true).")
    return lines


# ---- the sections ------------------------------------------------------------------------------------------
def _safety_parts(ledger: Ledger) -> tuple[str | None, Table, Table, list[str]]:
    return safety_headline(ledger), safety_table(ledger), category_table(ledger), safety_notes(ledger)


NOT_RUN = {"safety": "Not run: add [[evaluate.safety]] request sets to the recipe (e.g. path = \"bundled:harmful_en\").",
           "leakage": "Nothing to probe: no PII found in the training samples and no generate.canaries."}


def audit_markdown(recipe: Recipe, ledger: Ledger) -> str:
    line, (header, rows), (cat_header, cat_rows), notes = _safety_parts(ledger)
    safety = NOT_RUN["safety"] if not rows else "\n\n".join(
        ([f"**{line}**"] if line else []) + [markdown_table(header, rows)]
        + ([markdown_table(cat_header, cat_rows)] if cat_rows else []) + [SAFETY_NOTE] + notes)
    leak_header, leak_rows = leakage_table(ledger)
    leakage = NOT_RUN["leakage"] if not leak_rows else f"{markdown_table(leak_header, leak_rows)}\n\n{leakage_note(ledger)}"
    licence = "\n\n".join(licence_lines(recipe, ledger))
    return f"## Safety\n\n{safety}\n\n## Leakage\n\n{leakage}\n\n## Licence\n\n{licence}\n"


def audit_html(recipe: Recipe, ledger: Ledger) -> str:
    line, (header, rows), (cat_header, cat_rows), notes = _safety_parts(ledger)
    if rows:
        safety = ((f'<p class="headline" id="safety-headline">{html.escape(line)}</p>' if line else "")
                  + _html_table(header, rows, table_id="safety")
                  + (_html_table(cat_header, cat_rows, table_id="safety-categories") if cat_rows else "")
                  + f'<p class="note">{html.escape(SAFETY_NOTE)}</p>'
                  + "".join(f"<p>{html.escape(n)}</p>" for n in notes))
    else:
        safety = f"<p>{html.escape(NOT_RUN['safety'])}</p>"
    leak_header, leak_rows = leakage_table(ledger)
    leakage = (_html_table(leak_header, leak_rows, table_id="leakage") + f'<p class="note">{html.escape(leakage_note(ledger))}</p>'
               if leak_rows else f"<p>{html.escape(NOT_RUN['leakage'])}</p>")
    licence = "".join(f"<p>{html.escape(text.removeprefix('> ').replace('**', ''))}</p>"
                      for text in licence_lines(recipe, ledger))
    return (f'<h2 id="safety-section">Safety</h2>\n{safety}\n<h2 id="leakage-section">Leakage</h2>\n{leakage}\n'
            f'<h2 id="licence-section">Licence</h2>\n<div id="licence">{licence}</div>\n')


def card_rows(ledger: Ledger) -> str:
    """The safety and leakage tables for the model card ("" when the run audited nothing)."""
    parts = []
    header, rows = safety_table(ledger)
    if rows:
        line = safety_headline(ledger)
        parts.append("## Safety (refusal audit)\n\n" + (f"{line}\n\n" if line else "") + markdown_table(header, rows))
    header, rows = leakage_table(ledger)
    if rows:
        parts.append("## Leakage audit\n\n" + markdown_table(header, rows) + "\n\n" + leakage_note(ledger))
    return "\n\n".join(parts) + ("\n\n" if parts else "")
