import pytest

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
