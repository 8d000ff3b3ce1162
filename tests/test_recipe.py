import pytest
import tomllib

from edgedistill.errors import UserError
from edgedistill.recipe import Recipe, build_recipe, bundled_recipe, load_recipe


def test_bundled_recipes_validate():
    demo, tiny = bundled_recipe("demo"), bundled_recipe("demo_tiny")
    assert demo.student.keep_layers == 24 and tiny.student.keep_layers == 4


def test_unknown_field_names_file_and_field(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text("[train]\nepochz = 3\n")
    with pytest.raises(UserError, match=r"r\.toml: unknown field 'train\.epochz'"):
        load_recipe(path)


def test_out_of_range_value_names_field_and_value(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text("[generate]\ntop_k_logprobs = 500\n")
    with pytest.raises(UserError, match=r"generate\.top_k_logprobs: .*64.*got 500"):
        load_recipe(path)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(UserError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\n")
    with pytest.raises(UserError, match="not valid TOML"):
        load_recipe(bad)


def test_cli_style_overrides_parse_toml_values():
    recipe = build_recipe({}, "<t>", ["train.epochs=2", "train.lr=3e-4", "generate.seeds=['bundled:ja']",
                                      "run.name=abc"])
    assert recipe.train.epochs == 2 and recipe.train.lr == 3e-4
    assert recipe.generate.seeds == ["bundled:ja"] and recipe.run.name == "abc"
    with pytest.raises(UserError, match="section.field=value"):
        build_recipe({}, "<t>", ["train.epochs"])


def test_toml_round_trip_and_fingerprints():
    recipe = bundled_recipe("demo")
    import tomllib
    again = Recipe.model_validate(tomllib.loads(recipe.to_toml()))
    assert again == recipe
    changed = build_recipe(tomllib.loads(recipe.to_toml()), "<t>", ["train.epochs=9"])
    assert changed.fingerprint("generate") == recipe.fingerprint("generate")
    assert changed.fingerprint("train") != recipe.fingerprint("train")


def test_runs_made_before_reasoning_settings_keep_their_fingerprints():
    # Computed with the code of commit fab01b8, before the reasoning settings existed: new fields
    # at their defaults change no stage fingerprint and no stored-answer key, so old runs resume.
    from edgedistill.data.generate import generation_settings

    before = {"demo_tiny": ("e582dae753c20e8f", "b75fb2a0293fbf72", "774e7a30b9bbfecd", "79b46fffef0b6b1f",
                            "6b898e422dfa7efd"),
              "remote_teacher": ("c5c0881c2302e4d0", "9dccf478dd38eb5e", "52a205c0ddda56b3", "c38e3a5f72d68a2b",
                                 "d6e43dcacda0597e")}
    audit_fields = {"generate": ("canaries",), "evaluate": ("safety", "safety_max_new_tokens", "canary_candidates")}
    for name, (settings, *sections) in before.items():
        data = tomllib.loads(bundled_recipe(name).to_toml())
        for section, fields in audit_fields.items():  # issue 18 added the audit to demo_tiny itself
            for field in fields:
                data[section].pop(field, None)
        recipe = build_recipe(data, name)
        assert generation_settings(recipe) == settings
        assert [recipe.fingerprint(s) for s in ("teacher", "generate", "train", "evaluate")] == sections


def test_the_export_fingerprint_takes_the_eval_sets_only_where_it_scores_thinking(tmp_path):
    # The export stage scores each GGUF file with thinking on and off when the evaluate stage does
    # (issue 16): its eval sets then enter the export's fingerprint; runs without traces keep theirs.
    from edgedistill.pipeline import thinking_settings
    from edgedistill.run import Ledger

    data = tomllib.loads(bundled_recipe("demo_tiny").to_toml())
    ledger = Ledger(tmp_path / "run.db")
    recipe = build_recipe(data, "<t>")
    assert recipe.evaluate.tasks and recipe.evaluate.reasoning == "auto"
    assert thinking_settings(recipe, ledger) == ""  # no teacher traces: nothing is scored
    ledger.log_metrics("generate", "stage", {"reasoning_samples": 3})
    scored = thinking_settings(recipe, ledger)
    assert scored.startswith("|thinking=")
    assert thinking_settings(build_recipe(data, "<t>", ["evaluate.reasoning_max_new_tokens=64"]), ledger) != scored
    assert thinking_settings(build_recipe(data, "<t>", ["evaluate.reasoning='off'"]), ledger) == ""
    ledger.close()


def test_reasoning_settings_are_checked():
    recipe = bundled_recipe("gpt_oss")
    assert recipe.generate.samples_per_prompt == 4 and recipe.generate.tasks[0].verifier == "numeric"
    assert recipe.train.reasoning == "budget:512" and recipe.student.init == "checkpoint"
    for bad, message in ((["generate.samples_per_prompt=2"], "needs temperature > 0"),
                         (["train.reasoning='budget:0'"], "train.reasoning"),
                         (["train.reasoning='some'"], "train.reasoning"),
                         (["generate.tasks=[{path = 'x.jsonl', verifier = 'regex'}]"], "needs a pattern"),
                         (["generate.tasks=[{path = 'x.jsonl', verifier = 'regex', pattern = '('}]"], "not a valid"),
                         (["generate.seeds=[]"], "give seed sources or tasks"),
                         (["generate.self_consistency=true"], "samples_per_prompt >= 2"),
                         (["teacher.reasoning_effort='max'"], "reasoning_effort")):
        with pytest.raises(UserError, match=message):
            build_recipe({}, "<t>", bad)
